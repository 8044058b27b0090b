"""Serving: a predictor that holds a model and its parameters and runs any speedup.

Every program is compiled ahead of time for one (batch size, length bucket, schedule) and
kept in a dict, so a later call at the same key neither traces nor compiles::

    pred = Predictor.from_loaded(convert.load(run_dir, "sequence_classification"))
    pred.warmup(speedups=[1, 2, 4.8], lengths=[32, 64])   # compile ahead (optional)
    logits = pred.predict(batch, speedup=4.8)               # [B, C] numpy

Inputs of any length are right-padded to the smallest length bucket that holds them
(32/64/128/256/512 by default, capped at the model's maximum); any number of examples is
split into chunks of ``batch_size`` and the last chunk padded with one-token filler rows.
The speedup is turned into a plan for the padded length (``accjax.schedule.plan``: clamped to
what the length permits, dense at 1), so two speedups whose bucketed schedules coincide share
one program (``accjax.programs.ProgramCache``).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from accjax import models, programs
from accjax import schedule as sched_lib

DEFAULT_LENGTH_BUCKETS = (32, 64, 128, 256, 512)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def cap_buckets(config, buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct padded lengths, capped at the model's longest input."""
    max_len = getattr(config, "max_position_embeddings", None) or max(buckets)
    return tuple(sorted({min(int(b), max_len) for b in buckets}))


def bucket_for(buckets: Sequence[int], n: int) -> int:
    """The smallest length bucket that holds ``n`` tokens."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"input of {n} tokens is longer than the largest length bucket "
                     f"{buckets[-1]}; truncate it (tokenizer max_length)")


def cast_params(params, param_dtype: str | None):
    """Parameters on the device, cast once to ``param_dtype`` when given."""
    if param_dtype is not None:
        dt = jnp.dtype(param_dtype)
        params = jax.tree.map(lambda x: jnp.asarray(x, dt), params)
    return jax.device_put(params)


def load_exported(folder):
    """Serves a folder written by ``python -m accjax.export`` with no model code
    (``accjax.serving.ExportedModel``: ``.predict(texts or batch, speedup=...)``); the entry
    issue 15 names, kept beside ``accjax.export.load_exported``."""
    from accjax import serving

    return serving.load_exported(folder)


class Planned:
    """What every predictor shares: a length bucket for an input, a plan (``schedule.plan``:
    the keep-lengths a speedup runs at a padded length) and the counters of its
    ``programs`` cache. Needs ``cost``, ``bucket``, ``floor``, ``programs`` (and
    ``length_buckets`` for ``length_bucket``)."""

    searched: dict = {}  # (speedup, length) -> keep-lengths searched for the task (schedule.plan)
    prune_every = 1  # schedule.plan's prune_every: only every k-th layer drops rows

    @property
    def traces(self) -> int:
        return self.programs.traces

    @property
    def num_programs(self) -> int:
        return len(self.programs)

    def length_bucket(self, n: int) -> int:
        return bucket_for(self.length_buckets, n)

    def plan(self, length: int, speedup: float = 1.0, schedule: Sequence[int] | None = None, *,
             prune_every: int | None = None, floor: int | None = None) -> sched_lib.Plan:
        """What runs at ``length``: ``schedule.plan`` for a speedup (at ``prune_every`` and
        ``floor``, default this predictor's), or an explicit schedule."""
        if schedule is not None:
            return sched_lib.explicit(self.cost, length, schedule)
        return sched_lib.plan(self.cost, length, speedup, bucket=self.bucket,
                              floor=self.floor if floor is None else floor,
                              searched=self.searched,
                              prune_every=self.prune_every if prune_every is None else prune_every)

    def schedule(self, length: int, speedup: float) -> tuple[int, ...]:
        """The keep-lengths ``speedup`` runs at ``length``."""
        return self.plan(length, speedup).keep


class Predictor(Planned):
    """Compiled-once inference for a classification (or base) model at any speedup.

    Args:
      module: the Flax module (built from ``config``).
      params: its parameters (numpy or jax arrays); cast once to ``param_dtype`` if given.
      config: the model config (for schedules and limits).
      batch_size: examples per program; larger inputs are chunked, smaller padded.
      length_buckets: padded lengths; inputs go to the smallest that holds them.
      acc_variant: ACC form used for ranking (``accjax.acc.VARIANTS``).
      bucket, floor: schedule rounding and minimum keep-length.
      prune_every: k > 1 drops rows only in layers 1, 1 + k, ... (``schedule.plan``).
      output: which ``BertOutput`` field ``predict`` returns ('logits', 'pooler_output').
      searched: (speedup, length) -> keep-lengths an offline-tuning search stored for the task.
      pick: (examples, length) -> (speedup, batch size, prune_every, floor or None): the program ``predict``
        runs when no speedup is asked (``evaluation.RunModel.predictor(max_drop=...)``: the
        fastest one measured at that batch size and length within a dev accuracy drop).
    """

    def __init__(
        self,
        module,
        params,
        config,
        *,
        batch_size: int = 32,
        length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
        acc_variant: str = "plain",
        bucket: int = 8,
        floor: int = 1,
        prune_every: int = 1,
        output: str = "logits",
        param_dtype: str | None = None,
        searched: dict | None = None,
        pick=None,
    ):
        self.searched = dict(searched or {})
        self.pick = pick
        self.module = module
        self.config = config
        self.batch_size = int(batch_size)
        self.length_buckets = cap_buckets(config, length_buckets)
        self.acc_variant = acc_variant
        self.bucket = bucket
        self.floor = floor
        self.prune_every = sched_lib.check_every(prune_every)
        self.output = output
        self.params = cast_params(params, param_dtype)
        self.cost = models.cost_model(config)
        self.programs = programs.ProgramCache()
        # Only the inputs the family's modules take (GPT-2 has no token types).
        fam = models.get_family(config.family)
        names = tuple(fam.dummy_inputs(config, 1, 8)) if fam.dummy_inputs else ()
        self.input_names = tuple(n for n in INPUT_NAMES if n in names)

    @classmethod
    def from_loaded(cls, loaded, **kw) -> "Predictor":
        return cls(loaded.module, loaded.params, loaded.config, **kw)

    # ----------------------------------------------------------------------- programs
    def _forward(self, params, batch, schedule):
        out = self.module.apply({"params": params}, **batch, schedule=schedule,
                                acc_variant=self.acc_variant)
        return getattr(out, self.output)

    def program(self, batch_size: int, plan: sched_lib.Plan):
        """The compiled program for (batch size, plan); compiled on first use only."""
        spec = jax.ShapeDtypeStruct((batch_size, plan.length), jnp.int32)
        return self.programs.get(
            (batch_size, plan.length, plan.schedule),
            lambda: jax.jit(self.programs.counted(self._forward), static_argnums=2).lower(
                self.params, {k: spec for k in self.input_names}, plan.schedule),
            rows=self._gemm_rows(batch_size, plan))

    def _gemm_rows(self, batch_size: int, plan: sched_lib.Plan) -> float | None:
        """The program's GEMMs' rows on average (``programs.compiler_options``), for 16-bit
        compute (where it was measured; float32 GEMMs keep cuBLAS)."""
        return programs.gemm_rows(getattr(self.config, "dtype", "float32"),
                                  batch_size * plan.length / plan.analytic)

    def warmup(self, speedups: Iterable[float], lengths: Iterable[int] | None = None,
               batch_sizes: Iterable[int] | None = None) -> int:
        """Compiles every (batch size, length bucket, speedup) ahead; returns programs made."""
        before = self.num_programs
        for b in batch_sizes or (self.batch_size,):
            for n in lengths or self.length_buckets:
                t = self.length_bucket(n)
                for s in speedups:
                    self.program(b, self.plan(t, s))
        return self.num_programs - before

    # ------------------------------------------------------------------------ running
    def predict(self, batch: dict[str, np.ndarray], speedup: float | None = None, *,
                schedule: Sequence[int] | None = None) -> np.ndarray:
        """Runs a [b, t] batch (any b, any t up to the largest bucket) -> [b, ...] numpy, at
        ``speedup`` or at an explicit ``schedule`` of keep-lengths for the padded length;
        with neither, the program ``pick`` chooses for (b, padded length), in chunks of its
        batch size (without ``pick``: dense)."""
        ids = np.asarray(batch["input_ids"])
        n, t = ids.shape
        if n == 0:
            raise ValueError("empty batch")
        full = {"input_ids": ids,
                "attention_mask": np.asarray(batch.get("attention_mask", np.ones_like(ids))),
                "token_type_ids": np.asarray(batch.get("token_type_ids", np.zeros_like(ids)))}
        real = int(full["attention_mask"].sum(1).max())  # trailing all-padding columns can go
        length, size, every, floor = self.length_bucket(real), self.batch_size, None, None
        if speedup is None and schedule is None and self.pick is not None:
            speedup, size, every, floor = self.pick(n, length)
        plan = self.plan(length, 1.0 if speedup is None else speedup, schedule, prune_every=every, floor=floor)
        prog = self.program(size, plan)
        outs = []
        for i in range(0, n, size):
            chunk = {k: programs.pad_rows(full[k][i:i + size], size, plan.length,
                                          fill=int(k == "attention_mask"))
                     for k in self.input_names}
            outs.append(prog(self.params, chunk))
        return np.concatenate([np.asarray(o) for o in outs])[:n]

    def time_program(self, batch_size: int, length: int, speedup: float = 1.0, *,
                     schedule: Sequence[int] | None = None, iters: int = 30, warmup: int = 3,
                     seed: int = 0, prune_every: int | None = None, floor: int | None = None) -> dict[str, Any]:
        """Median wall time (ms) of one compiled program on random full-length inputs."""
        plan = self.plan(length, speedup, schedule, prune_every=prune_every, floor=floor)
        prog = self.program(batch_size, plan)
        batches = self.random_batches(batch_size, length, seed)
        return {**programs.time_calls(lambda b: prog(self.params, b), batches, iters=iters,
                                      warmup=warmup), "schedule": plan.keep}

    def random_batches(self, batch_size: int, length: int, seed: int = 0) -> list[dict]:
        """Full-length random inputs on the device, for timing programs."""
        ids = programs.random_batches(np.random.default_rng(seed), (batch_size, length),
                                      getattr(self.config, "vocab_size", 1000))
        fill = {"input_ids": None, "attention_mask": 1, "token_type_ids": 0}
        return [jax.device_put({k: a if fill[k] is None else np.full_like(a, fill[k])
                                for k in self.input_names}) for a in ids]
