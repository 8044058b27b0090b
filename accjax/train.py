"""Fine-tuning: train state, optimizer, losses, compiled train/eval steps, and the fit loop.

One training step (``Trainer.step``) is ``jax.jit`` with explicit in/out shardings derived
from the parameters' logical axis names (``accjax.sharding``), the state donated, and the
elimination schedule (a tuple of Python ints, one keep-length per layer) a STATIC argument.
Each (batch shapes, schedule) pair is lowered and compiled once and kept in a dict, as
``accjax.inference.Predictor`` does; ``Trainer.traces`` counts Python traces, so a retrace
would show (a shape that has no program raises instead of compiling silently).

Elimination while training (``config.elimination.mode``):

  * ``dense``: no elimination.
  * ``fixed``: every step at ``speedup`` (its schedule for the batch's length bucket).
  * ``elastic``: every step at a speedup drawn from ``speedup_range``, so one run serves the
    whole range. The range is quantised into ``levels`` points (``np.linspace``): the number
    of compiled train programs is then at most levels x length buckets, known up front (each
    is a compile of forward + backward, seconds to minutes), where a continuous draw would
    compile a new program whenever it lands on a schedule not seen before. The level of step
    t is drawn from ``numpy.random.default_rng([seed, t])``: a pure function of (seed, step),
    so a resumed run draws exactly the levels the uninterrupted run drew, with no generator
    state to checkpoint.

A speedup above what a length bucket permits (``schedule.max_speedup``) runs at that maximum
instead of failing; evaluation rows record the analytic speedup actually run.

Determinism and exact resume: the dropout key of step t is ``fold_in(PRNGKey(seed), t)``;
batch t is ``TrainBatches.position(t)``; the elastic level of step t is drawn as above. A
checkpoint therefore needs only (params, optimizer state, step) plus a small JSON (best dev
result so far); a restarted run continues bit for bit.

Optimizer: AdamW (decoupled weight decay, not on biases or LayerNorm / RMSNorm scales, as
Hugging Face's Trainer), learning rate warmed up linearly from 0 over
``ceil(warmup_ratio * total_steps)`` steps then decayed linearly to 0, gradients clipped by
global norm. Parameters and optimizer state are float32; ``config.dtype = 'bfloat16'``
makes the model compute in bfloat16.

Losses: weighted cross-entropy for classification (``batch['weights']``, 0 on filler rows),
weighted mean squared error for regression (one output), token cross-entropy for
text-to-text (``accjax.seq2seq``). Any ``loss_fn(params, batch, rng, schedule) -> (loss,
metrics)`` plugs in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from accjax import guards
from accjax import schedule as sched_lib
from accjax import sharding as shard_lib
from accjax.runfolder import read_jsonl, rewrite_jsonl

log = logging.getLogger(__name__)

Array = jax.Array
LossFn = Callable[..., tuple[Array, dict[str, Array]]]
MODES = ("dense", "fixed", "elastic")


# ----------------------------------------------------------------------------- the state
@struct.dataclass
class TrainState:
    """Everything a step changes. ``step`` counts the updates applied (int32 scalar)."""

    step: Array
    params: Any
    opt_state: Any


# -------------------------------------------------------------------------------- optimizer
def decay_mask(params: Any) -> Any:
    """True for parameters AdamW decays: kernels and embedding tables, not biases or norm
    scales (Hugging Face's ``no_decay = ['bias', 'LayerNorm.weight']``)."""
    def one(path, _):
        name = getattr(path[-1], "key", str(path[-1]))
        return name not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(one, params)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Hugging Face's rule: ``ceil(warmup_ratio * total_steps)``."""
    return int(math.ceil(total_steps * warmup_ratio))


def lr_schedule(lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """0 -> lr linearly over the warmup, then lr -> 0 linearly at ``total_steps``.

    The update of step t uses lr(t), t = 0, 1, ... (the first update of a warmed-up run
    has lr 0, as with HF's ``get_linear_schedule_with_warmup``).
    """
    w = warmup_steps(total_steps, warmup_ratio)
    decay = optax.linear_schedule(lr, 0.0, max(total_steps - w, 1))
    if w == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), decay], [w])


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + linear decay and global-norm clipping.

    Args:
      optim: config with lr, weight_decay, warmup_ratio, clip (<= 0: none), b1, b2, eps.
      total_steps: optimizer steps of the whole run.
    Returns:
      (the optax transformation, the learning-rate schedule).
    """
    sched = lr_schedule(float(optim.lr), total_steps, float(optim.warmup_ratio))
    parts = []
    if float(optim.clip) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip)))
    parts.append(optax.adamw(sched, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                             weight_decay=float(optim.weight_decay), mask=decay_mask))
    return optax.chain(*parts), sched


# ----------------------------------------------------------------------------------- losses
def classification_loss(module, params, batch: dict[str, Array], rng: Array | None, schedule, *,
                        num_labels: int, acc_variant: str = "plain") -> tuple[Array, dict[str, Array]]:
    """Weighted cross-entropy (classes) or mean squared error (``num_labels == 1``).

    Args:
      batch: input_ids / attention_mask / token_type_ids [B, T], labels [B] (int class ids,
        or float targets), weights [B] (0 for filler rows).
      rng: dropout key; None = deterministic.
      schedule: static keep-lengths, None = dense.
    Returns:
      (loss, {'loss', 'accuracy' (classification) or 'mse'}): means over real rows.
    """
    kw = {} if rng is None else {"rngs": {"dropout": rng}}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    out = module.apply({"params": params}, **inputs, schedule=schedule, acc_variant=acc_variant,
                       deterministic=rng is None, **kw)
    logits = out.logits.astype(jnp.float32)  # [B, C]
    w = batch["weights"].astype(jnp.float32)  # [B]
    n = jnp.maximum(w.sum(), 1.0)
    if num_labels == 1:
        per = (logits[:, 0] - batch["labels"].astype(jnp.float32)) ** 2  # [B]
        loss = (per * w).sum() / n
        return loss, {"mse": loss}
    labels = batch["labels"].astype(jnp.int32)
    per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B]
    loss = (per * w).sum() / n
    acc = 100.0 * ((jnp.argmax(logits, -1) == labels) * w).sum() / n  # percent, as dev metrics
    return loss, {"accuracy": acc}


def make_classification_loss(module, num_labels: int, acc_variant: str = "plain") -> LossFn:
    """``loss_fn(params, batch, rng, schedule)`` for ``Trainer``."""
    return functools.partial(classification_loss, module, num_labels=num_labels, acc_variant=acc_variant)


# -------------------------------------------------------------------------------- schedules
@functools.lru_cache(maxsize=4096)
def _schedule_cached(cost_model, length: int, speedup: float, bucket: int, floor: int):
    top = sched_lib.max_speedup(cost_model, length, bucket=bucket, floor=floor)
    s = min(float(speedup), top)
    sched = sched_lib.schedule_for_speedup(cost_model, length, s, bucket=bucket, floor=floor)
    return sched, sched_lib.analytic_speedup(cost_model, length, sched)


def schedule_at(model_config: Any, length: int, speedup: float | None, *, bucket: int = 8,
                floor: int = 1) -> tuple[tuple[int, ...] | None, float]:
    """The keep-lengths for ``speedup`` at a padded ``length``, clamped to what it permits.

    The same schedules ``accjax.inference.Predictor`` runs (same bucket and floor).

    Returns:
      (schedule, or None for dense; the analytic speedup of that schedule).
    """
    if speedup is None or float(speedup) <= 1.0:
        return None, 1.0
    cm = sched_lib.cost_model(model_config)
    sched, s = _schedule_cached(cm, int(length), float(speedup), int(bucket), int(floor))
    if all(k >= length for k in sched):
        return None, 1.0
    return sched, s


class SpeedupSampler:
    """The training speedup of each step (None = dense); see the module docstring.

    Args:
      mode: 'dense' | 'fixed' | 'elastic'.
      speedup: the fixed mode's speedup.
      speedup_range: (low, high) of the elastic mode.
      levels: K, the elastic range is ``np.linspace(low, high, K)``.
      seed: with the step, seeds the level draw.
    """

    def __init__(self, mode: str, *, speedup: float = 1.0, speedup_range: Sequence[float] = (1.0, 1.0),
                 levels: int = 1, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"elimination.mode must be one of {MODES}, not {mode!r}")
        self.mode, self.seed = mode, int(seed)
        if mode == "fixed":
            if not float(speedup) >= 1:
                raise ValueError(f"elimination.speedup must be >= 1, got {speedup}")
            self.levels = (float(speedup),)
        elif mode == "elastic":
            lo, hi = (float(x) for x in speedup_range)
            if not 1 <= lo <= hi:
                raise ValueError(f"elimination.speedup_range must be (low, high) with 1 <= low <= high, "
                                 f"got {tuple(speedup_range)}")
            if int(levels) < 1:
                raise ValueError(f"elimination.levels must be >= 1, got {levels}")
            self.levels = tuple(float(x) for x in np.linspace(lo, hi, int(levels)))
        else:
            self.levels = (1.0,)

    def level(self, step: int) -> int:
        if len(self.levels) == 1:
            return 0
        return int(np.random.default_rng([self.seed, int(step)]).integers(len(self.levels)))

    def speedup(self, step: int) -> float | None:
        if self.mode == "dense":
            return None
        return self.levels[self.level(step)]


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    """Compiled, sharded train and eval steps for one model and optimizer.

    Args:
      loss_fn: ``loss_fn(params, batch, rng, schedule) -> (loss, metrics)``.
      tx, lr: the optax transformation and its learning-rate schedule.
      mesh, rules: the device mesh and logical-to-mesh rules.
      param_specs: logical PartitionSpecs of the parameters (``sharding.logical_specs``).
      seed: base of the dropout keys; dropout: train with dropout (else deterministic).
      forward: ``forward(params, batch, schedule) -> [B, ...]`` for ``eval_outputs``.
    """

    def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, lr: optax.Schedule, mesh,
                 rules, param_specs: Any, *, seed: int = 0, dropout: bool = True,
                 forward: Callable | None = None):
        self.loss_fn, self.tx, self.lr = loss_fn, tx, lr
        self.mesh, self.rules = mesh, shard_lib.normalize_rules(rules)
        self.seed, self.dropout, self.forward = int(seed), bool(dropout), forward
        self.param_shardings = shard_lib.mesh_shardings(param_specs, mesh, self.rules)
        self.sharded_params = any(not s.is_fully_replicated for s in jax.tree.leaves(self.param_shardings))
        self._param_specs = param_specs
        self._programs: dict[tuple, Any] = {}
        self._eval_programs: dict[tuple, Any] = {}
        self._batch_shardings: dict[tuple, dict] = {}
        self.traces = 0

    # ------------------------------------------------------------------------- shardings
    def state_shardings(self, params_shape: Any) -> TrainState:
        """Shardings of the whole state: optimizer moments follow their parameter."""
        opt_shape = jax.eval_shape(self.tx.init, params_shape)
        repl = shard_lib.replicated(self.mesh)
        opt = optax.tree_map_params(self.tx, lambda _, s: s, opt_shape, self.param_shardings,
                                    transform_non_params=lambda _: repl)
        return TrainState(step=repl, params=self.param_shardings, opt_state=opt)

    def abstract_state(self, params_shape: Any) -> TrainState:
        """ShapeDtypeStructs with shardings (a restore target; what programs are built for)."""
        shape = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.tx.init(p)),
                               params_shape)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shape, self.state_shardings(params_shape))

    def init_state(self, params: Any) -> TrainState:
        """Host params (the same on every process) -> a sharded initial state at step 0."""
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
        sh = self.state_shardings(params)
        params = shard_lib.put(params, sh.params)
        opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
        return TrainState(step, params, opt_state)

    def batch_shardings(self, batch: dict[str, Any]) -> dict:
        key = tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))
        sh = self._batch_shardings.get(key)
        if sh is None:
            sh = shard_lib.batch_shardings(batch, self.mesh, self.rules)
            self._batch_shardings[key] = sh
        return sh

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Array]:
        """A global host batch -> global arrays sharded over the batch axis."""
        return shard_lib.to_global(batch, self.batch_shardings(batch))

    # ----------------------------------------------------------------------------- steps
    def _train_step(self, state: TrainState, batch: dict[str, Array], schedule):
        self.traces += 1  # Python side: runs once per compiled program
        rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step) if self.dropout else None

        def loss(params):
            return self.loss_fn(self._gathered(params), batch, rng, schedule)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**aux, "loss": value, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(self.lr(state.step), jnp.float32)}
        return TrainState(state.step + 1, params, opt_state), metrics

    @staticmethod
    def _signature(batch: dict[str, Any]) -> tuple:
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    def train_program(self, state: TrainState, batch: dict[str, Any], schedule):
        """The compiled step for this (batch shapes, schedule); compiled on first use only."""
        key = (self._signature(batch), schedule)
        prog = self._programs.get(key)
        if prog is None:
            st_sh = jax.tree.map(lambda x: x.sharding, state)
            b_sh = self.batch_shardings(batch)
            spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in batch.items()}
            fn = jax.jit(self._train_step, in_shardings=(st_sh, b_sh),
                         out_shardings=(st_sh, shard_lib.replicated(self.mesh)),
                         static_argnums=2, donate_argnums=0)
            prog = fn.lower(state, spec, schedule).compile()
            self._programs[key] = prog
        return prog

    def step(self, state: TrainState, batch: dict[str, np.ndarray], schedule=None
             ) -> tuple[TrainState, dict[str, Array]]:
        """One update on a GLOBAL host batch; ``state`` is donated (do not reuse it)."""
        schedule = None if schedule is None else tuple(int(k) for k in schedule)
        prog = self.train_program(state, batch, schedule)
        return prog(state, self.put_batch(batch))

    @property
    def num_programs(self) -> int:
        return len(self._programs)

    def _eval_step(self, params, batch, schedule):
        self.traces += 1
        return self.forward(self._gathered(params), batch, schedule)

    def _gathered(self, params):
        """Sharded parameters, all-gathered for compute (ZeRO-3 style FSDP).

        Left alone, XLA propagates a parameter's 'embed' sharding into the activations and
        then reshards them back to batch sharding (a full rematerialisation per use). One
        constraint gathers the parameters instead; its transpose reduce-scatters their
        gradients, so storage (params, gradients into the update, Adam moments) stays sharded.
        """
        if not self.sharded_params:
            return params
        repl = shard_lib.replicated(self.mesh)
        return jax.lax.with_sharding_constraint(params, jax.tree.map(lambda _: repl, params))

    def eval_outputs(self, params: Any, batch: dict[str, np.ndarray], schedule=None) -> np.ndarray:
        """``forward`` on a GLOBAL host batch with sharded params -> [B, ...] numpy (every process)."""
        if self.forward is None:
            raise ValueError("this Trainer has no forward function for evaluation")
        schedule = None if schedule is None else tuple(int(k) for k in schedule)
        key = (self._signature(batch), schedule)
        prog = self._eval_programs.get(key)
        b_sh = self.batch_shardings(batch)
        if prog is None:
            p_sh = jax.tree.map(lambda x: x.sharding, params)
            spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in batch.items()}
            fn = jax.jit(self._eval_step, in_shardings=(p_sh, b_sh),
                         out_shardings=shard_lib.replicated(self.mesh), static_argnums=2)
            prog = fn.lower(params, spec, schedule).compile()
            self._eval_programs[key] = prog
        return np.asarray(prog(params, shard_lib.to_global(batch, b_sh)))


# ------------------------------------------------------------------------------- feedback
class MetricsLog:
    """metrics.jsonl and TensorBoard event files in the run folder (process 0 only).

    On resume from step s, records after s (written by the interrupted run and about to be
    repeated) are dropped from metrics.jsonl, and TensorBoard purges them (``purge_step``).
    """

    def __init__(self, run_dir: Path, *, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if start_step and self.path.exists():  # a torn last line (killed mid-write) is dropped
            rewrite_jsonl(self.path, [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step])
        elif not start_step and self.path.exists():
            self.path.unlink()  # a fresh run
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step or None)
        except ImportError:  # TensorBoard files are optional; the JSONL is the record
            log.warning("tensorboardX is not installed: no TensorBoard event files")

    def write(self, record: dict[str, Any], scalars: dict[str, float] | None = None, prefix: str = ""):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
        if self._tb is not None and scalars:
            for k, v in scalars.items():
                if v is not None and np.isfinite(v):
                    self._tb.add_scalar(f"{prefix}{k}", float(v), int(record.get("step", 0)))

    def flush(self):
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ---------------------------------------------------------------------------------- fit
# Config keys that may change between an interrupted run and its restart.
RESUME_MAY_CHANGE = ("debug", "checkpoint.every_steps", "checkpoint.keep", "log_every_steps",
                     "progress", "run_dir")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_dict(config) -> dict[str, Any]:
    """An ml_collections config (or a dict) as plain JSON data."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=_json_default))


def check_resume_config(saved: dict, current: dict) -> None:
    """A restart must train the same thing: differing keys (outside RESUME_MAY_CHANGE) raise."""
    a, b = _flat(saved), _flat(current)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                  and not any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE))
    if diff:
        details = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff)
        raise ValueError(f"the run folder holds a run with another config ({details}); use a new "
                         "run_dir, or delete the old run to start over")


@dataclasses.dataclass
class FitResult:
    run_dir: Path
    steps: int
    resumed_from: int | None
    best: dict[str, Any] | None
    final_eval: list[dict[str, Any]]
    seconds_per_epoch: list[float]


def fit(config) -> FitResult:
    """Fine-tunes as ``config`` says (see ``configs/``); resumes from ``config.run_dir``.

    Writes into the run folder: ``checkpoints/`` (orbax, for resume), the best model by dev
    metric as an accjax model folder (``accjax.json``, ``params.safetensors``, tokenizer
    files; task and training config inside), ``train_config.json``, ``metrics.jsonl``,
    ``tb/`` (TensorBoard) and ``summary.json`` (final dev/test rows of the best model).

    Returns:
      FitResult: steps run, step resumed from (None: fresh), the best dev record, the final
      evaluation rows and the measured seconds per epoch.
    """
    from accjax import checkpoint as ckpt_lib
    from accjax import experiment as exp_lib

    exp_lib.validate_config(config)
    primary = shard_lib.is_primary()
    run_dir = Path(config.run_dir).absolute()
    cfg_json = config_dict(config)
    saved = run_dir / "train_config.json"
    from accjax import runfolder

    if primary:
        runfolder.lock(run_dir)  # one writer per run folder; released at the end (or exit)
    runfolder.check_resume(run_dir, cfg_json, check_resume_config)  # every process checks
    mesh = shard_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = shard_lib.normalize_rules(config.logical_axis_rules)
    shard_lib.check_batch_size(int(config.batch_size), mesh, rules, "batch_size")
    shard_lib.check_batch_size(int(config.eval_batch_size), mesh, rules, "eval_batch_size")

    exp = exp_lib.build(config)
    nb = exp.train.num_batches
    schedule_steps = int(config.epochs) * nb  # the learning-rate schedule always spans the full run
    total = schedule_steps  # where this invocation stops
    if int(config.debug.max_steps) > 0:
        total = min(total, int(config.debug.max_steps))
    tx, lr = make_optimizer(config.optim, schedule_steps)
    trainer = Trainer(exp.loss_fn, tx, lr, mesh, rules, exp.param_specs, seed=int(config.seed),
                      dropout=bool(config.dropout), forward=exp.forward)
    el = config.elimination
    sampler = SpeedupSampler(el.mode, speedup=el.speedup, speedup_range=tuple(el.speedup_range),
                             levels=el.levels, seed=int(config.seed))

    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(cfg_json, indent=2) + "\n")
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", keep=int(config.checkpoint.keep))

    params_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), exp.params)
    restored = ckpt.restore_latest(trainer.abstract_state(params_shape))  # skips a corrupt newest
    if restored is not None:
        latest, state, meta = restored
        best = meta.get("best")
        resumed_from = int(latest)
        log.info("resuming from the checkpoint at step %d of %d (%s)", latest, total, run_dir)
        if primary:
            print(f"resumed from step {latest} (checkpoint in {run_dir / 'checkpoints'})", flush=True)
    else:
        state, best, resumed_from = trainer.init_state(exp.params), None, None
    start = int(jax.device_get(state.step))
    done = runfolder.finished(run_dir, total) if start >= total else None
    if done is not None:  # a finished run: report it, rewrite nothing
        if primary:
            print(f"{run_dir} already finished ({total} steps); its results are in "
                  f"{run_dir / 'summary.json'}", flush=True)
            runfolder.unlock(run_dir)
        ckpt.close()
        return FitResult(run_dir, start, done.get("resumed_from"), done.get("best"),
                         done.get("final", []), done.get("train_seconds_per_epoch", []))
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(exp.params))
    exp.params = None  # the host copy is no longer needed

    mlog = MetricsLog(run_dir, start_step=start, enabled=primary)
    if primary and resumed_from is None:
        mlog.write({"step": 0, "event": "data", **exp.data_report})
    if primary:
        print(exp.describe(total, nb, mesh, sampler, n_params), flush=True)

    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, disable=not (primary and config.progress), unit="step",
               dynamic_ncols=True, mininterval=1.0)
    every = int(config.checkpoint.every_steps)
    log_every = max(1, int(config.log_every_steps))
    pending: list[tuple[float | None, dict, float]] = []  # (speedup, device metrics, real examples)
    t_log, t_epoch, epoch_times = time.perf_counter(), time.perf_counter(), []
    cpu_epoch, epoch_cpu = time.process_time(), []  # process CPU seconds (all threads)
    delay = float(config.debug.step_delay_s)
    saved_at = start if resumed_from is not None else None

    def meta_now(step):
        epoch, index = exp.train.position(step)
        return {"step": step, "epoch": epoch, "index": index, "seed": int(config.seed), "best": best,
                "total_steps": schedule_steps, "config": cfg_json}  # resume checks this config

    def flush_metrics(step):
        nonlocal t_log
        if not pending:
            return
        host = jax.device_get([m for _, m, _ in pending])
        guards.check_finite_metrics(host, step - len(host) + 1)
        n_ex = sum(n for _, _, n in pending)
        dt = time.perf_counter() - t_log
        t_log = time.perf_counter()
        mean = {k: float(np.mean([h[k] for h in host])) for k in host[-1]}
        rec = {"step": step, "epoch": round(step / nb, 4), **mean,
               "examples_per_s": n_ex / dt if dt > 0 else None}
        speeds = [s for s, _, _ in pending if s is not None]
        if speeds:
            rec["train_speedup_mean"] = float(np.mean(speeds))
        mlog.write(rec, {k: v for k, v in rec.items() if k not in ("step", "epoch")}, prefix="train/")
        bar.set_postfix(loss=f"{mean['loss']:.4f}", lr=f"{mean['lr']:.2e}",
                        ex_s=f"{rec['examples_per_s'] or 0:.1f}", refresh=False)
        pending.clear()

    step = start
    while step < total:
        epoch, index = exp.train.position(step)
        batch = exp.train.batch(epoch, index)
        s = sampler.speedup(step)
        sched, _ = schedule_at(exp.model_config, exp.schedule_length(batch), s,
                               bucket=int(el.bucket), floor=int(el.floor))
        state, metrics = trainer.step(state, batch, sched)
        pending.append((s, metrics, float(np.sum(batch["weights"])) if "weights" in batch
                        else float(len(next(iter(batch.values()))))))
        step += 1
        bar.update(1)
        if delay:
            jax.block_until_ready(metrics)
            time.sleep(delay)
        if step % log_every == 0:
            flush_metrics(step)
        epoch_end = index == nb - 1 or step == total
        if epoch_end:
            flush_metrics(step)
            guards.check_finite_params(state.params, step)  # never evaluate or export NaN weights
            jax.block_until_ready(state)
            epoch_times.append(time.perf_counter() - t_epoch)
            epoch_cpu.append(time.process_time() - cpu_epoch)
            rows = exp.evaluate(trainer, state.params, list(config.eval.speedups))
            for r in rows:
                rec = {"step": step, "epoch": epoch + 1, "event": "eval", **r}
                mlog.write(rec, {k: v for k, v in r.items() if isinstance(v, (int, float))
                                 and k not in ("speedup",)},
                           prefix=f"{r['split']}/{r['speedup']:g}x/")
            score = exp.selection_score(rows)
            if primary:
                bar.write(f"epoch {epoch + 1} (step {step}): "
                          + ", ".join(f"{r['split']}@{r['speedup']:g}x {r['primary']:.2f}" for r in rows
                                      if r["split"] == exp.dev_split)
                          + f"  [train {epoch_times[-1]:.0f} s]")
                mlog.write({"step": step, "epoch": epoch + 1, "event": "epoch",
                            "train_seconds": epoch_times[-1], "train_cpu_seconds": epoch_cpu[-1],
                            "selection_score": score})
            if best is None or score > best["score"]:
                best = {"score": score, "step": step, "epoch": epoch + 1,
                        "rows": [r for r in rows if r["split"] == exp.dev_split]}
                host_params = shard_lib.to_host(state.params)
                if primary:
                    exp.export(host_params, run_dir, {"train_config": cfg_json, "eval": best})
                    bar.write(f"  new best {exp.select_label} = {score:.2f}: exported to {run_dir}")
            mlog.flush()
            t_epoch = t_log = time.perf_counter()  # evaluation time counts in neither
            cpu_epoch = time.process_time()
        if (every > 0 and step % every == 0) or epoch_end or step == total:
            guards.check_finite_params(state.params, step)  # a resume point must be finite
            ckpt.save(step, state, meta_now(step))
            saved_at = step
    bar.close()
    if saved_at != step:
        guards.check_finite_params(state.params, step)
        ckpt.save(step, state, meta_now(step))
    ckpt.close()

    # The best model as exported, evaluated on every labelled dev and test split.
    final = exp.final_eval(trainer, run_dir, list(config.eval.speedups))
    for r in final:
        mlog.write({"step": step, "event": "final", **r})
    mlog.close()
    if primary:
        summary = {"run_dir": str(run_dir), "steps": step, "resumed_from": resumed_from, "best": best,
                   "final": final, "train_seconds_per_epoch": epoch_times,
                   "train_cpu_seconds_per_epoch": epoch_cpu,
                   "train_programs": trainer.num_programs, "data": exp.data_report,
                   "devices": jax.device_count(), "processes": jax.process_count(),
                   "mesh": dict(mesh.shape)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        print(f"the best model (exported to {run_dir}) on every labelled split:\n"
              + exp_lib.format_rows(final), flush=True)
        runfolder.unlock(run_dir)
    return FitResult(run_dir, step, resumed_from, best, final, epoch_times)
