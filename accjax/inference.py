"""Serving: a predictor that holds a model and its parameters and runs any speedup.

Every program is compiled ahead of time for one (batch size, length bucket, schedule) and
kept in a dict, so a later call at the same key neither traces nor compiles::

    pred = Predictor.from_loaded(convert.load(run_dir, "sequence_classification"))
    pred.warmup(speedups=[1, 2, 4.8], lengths=[32, 64])   # compile ahead (optional)
    logits = pred.predict(batch, speedup=4.8)               # [B, C] numpy

Inputs of any length are right-padded to the smallest length bucket that holds them
(32/64/128/256/512 by default, capped at the model's maximum); any number of examples is
split into chunks of ``batch_size`` and the last chunk padded with one-token filler rows.
The speedup is turned into a schedule for the padded length (``accjax.schedule``), so two
speedups whose bucketed schedules coincide share one program.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from accjax import schedule as sched_lib

DEFAULT_LENGTH_BUCKETS = (32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    batch_size: int
    length: int
    schedule: tuple[int, ...]


class Predictor:
    """Compiled-once inference for a classification (or base) model at any speedup.

    Args:
      module: the Flax module (built from ``config``).
      params: its parameters (numpy or jax arrays); cast once to ``param_dtype`` if given.
      config: the model config (for schedules and limits).
      batch_size: examples per program; larger inputs are chunked, smaller padded.
      length_buckets: padded lengths; inputs go to the smallest that holds them.
      acc_variant: ACC form used for ranking (``accjax.acc.VARIANTS``).
      bucket, floor: schedule rounding and minimum keep-length.
      output: which ``BertOutput`` field ``predict`` returns ('logits', 'pooler_output').
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
        output: str = "logits",
        param_dtype: str | None = None,
    ):
        self.module = module
        self.config = config
        self.batch_size = int(batch_size)
        max_len = getattr(config, "max_position_embeddings", None) or max(length_buckets)
        buckets = sorted({min(int(b), max_len) for b in length_buckets})
        self.length_buckets = tuple(buckets)
        self.acc_variant = acc_variant
        self.bucket = bucket
        self.floor = floor
        self.output = output
        if param_dtype is not None:
            dt = jnp.dtype(param_dtype)
            params = jax.tree.map(lambda x: jnp.asarray(x, dt), params)
        self.params = jax.device_put(params)
        self._programs: dict[ProgramKey, Any] = {}
        self.traces = 0  # Python-side trace counter: a retrace would show here
        # Only the inputs the family's modules take (GPT-2 has no token types).
        from accjax import models

        fam = models.get_family(config.family)
        names = tuple(fam.dummy_inputs(config, 1, 8)) if fam.dummy_inputs else ()
        self.input_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids")
                                 if n in names)

    @classmethod
    def from_loaded(cls, loaded, **kw) -> "Predictor":
        return cls(loaded.module, loaded.params, loaded.config, **kw)

    # ------------------------------------------------------------------ shapes & schedules
    def length_bucket(self, n: int) -> int:
        for b in self.length_buckets:
            if n <= b:
                return b
        raise ValueError(
            f"input of {n} tokens is longer than the largest length bucket "
            f"{self.length_buckets[-1]}; truncate it (tokenizer max_length)")

    def schedule(self, length: int, speedup: float | Sequence[int]) -> tuple[int, ...]:
        """A speedup (number) or an explicit schedule -> validated keep-lengths."""
        if isinstance(speedup, (tuple, list)):
            return sched_lib.check(speedup, self.config.num_layers, length)
        return sched_lib.schedule_for_speedup(self.config, length, float(speedup),
                                              bucket=self.bucket, floor=self.floor)

    # ----------------------------------------------------------------------- programs
    def _forward(self, params, batch, schedule):
        self.traces += 1
        dense = all(k >= batch["input_ids"].shape[1] for k in schedule)
        out = self.module.apply({"params": params}, **batch,
                                schedule=None if dense else schedule, acc_variant=self.acc_variant)
        return getattr(out, self.output)

    def program(self, batch_size: int, length: int, schedule: tuple[int, ...]):
        """The compiled program for this key; compiled on first use only."""
        key = ProgramKey(batch_size, length, tuple(schedule))
        prog = self._programs.get(key)
        if prog is None:
            spec = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
            batch = {k: spec for k in self.input_names}
            fn = jax.jit(self._forward, static_argnums=2)
            prog = fn.lower(self.params, batch, key.schedule).compile()
            self._programs[key] = prog
        return prog

    @property
    def num_programs(self) -> int:
        return len(self._programs)

    def warmup(self, speedups: Iterable[float], lengths: Iterable[int] | None = None,
               batch_sizes: Iterable[int] | None = None) -> int:
        """Compiles every (batch size, length bucket, speedup) ahead; returns programs made."""
        before = self.num_programs
        for b in batch_sizes or (self.batch_size,):
            for n in lengths or self.length_buckets:
                t = self.length_bucket(n)
                for s in speedups:
                    self.program(b, t, self.schedule(t, s))
        return self.num_programs - before

    # ------------------------------------------------------------------------ running
    def predict(self, batch: dict[str, np.ndarray], speedup: float | Sequence[int] = 1.0) -> np.ndarray:
        """Runs a [b, t] batch (any b, any t up to the largest bucket) -> [b, ...] numpy."""
        ids = np.asarray(batch["input_ids"])
        n, t = ids.shape
        if n == 0:
            raise ValueError("empty batch")
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
        types = np.asarray(batch.get("token_type_ids", np.zeros_like(ids)))
        real = int(mask.sum(1).max())  # trailing all-padding columns can go
        length = self.length_bucket(real)
        schedule = self.schedule(length, speedup)
        prog = self.program(self.batch_size, length, schedule)
        outs = []
        for i in range(0, n, self.batch_size):
            chunk = {k: _fit(a[i:i + self.batch_size], self.batch_size, length, filler=(k == "attention_mask"))
                     for k, a in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types))
                     if k in self.input_names}
            outs.append(prog(self.params, chunk))
        out = np.concatenate([np.asarray(o) for o in outs])
        return out[:n]

    def time_program(self, batch_size: int, length: int, speedup: float | Sequence[int], *,
                     iters: int = 30, warmup: int = 3, seed: int = 0) -> dict[str, float]:
        """Median wall time (ms) of one compiled program on random full-length inputs."""
        schedule = self.schedule(length, speedup)
        prog = self.program(batch_size, length, schedule)
        rng = np.random.default_rng(seed)
        vocab = getattr(self.config, "vocab_size", 1000)
        batches = []
        for _ in range(3):  # rotate inputs so nothing is served from a cache of one buffer
            ids = rng.integers(1, vocab, (batch_size, length)).astype(np.int32)
            full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            batches.append(jax.device_put({k: full[k] for k in self.input_names}))
        for i in range(warmup):
            jax.block_until_ready(prog(self.params, batches[i % 3]))
        times = []
        for i in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(prog(self.params, batches[i % 3]))
            times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)),
                "schedule": schedule}


def _fit(a: np.ndarray, rows: int, length: int, *, filler: bool) -> np.ndarray:
    """Pads/crops [b, t] to [rows, length] (crops only trailing all-padding columns)."""
    out = np.zeros((rows, length), np.int32)
    b, t = a.shape
    t = min(t, length)
    out[:b, :t] = a[:, :t]
    if filler and b < rows:
        out[b:, 0] = 1  # one valid token per filler row: no all-padding example
    return out
