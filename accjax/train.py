"""Fine-tuning: train state, optimizer, losses, compiled train/eval steps, and the fit loop.

One training step (``Trainer.step``) is ``jax.jit`` with explicit in/out shardings derived
from the parameters' logical axis names (``accjax.sharding``), the state donated, and the
elimination schedule (a tuple of Python ints, one keep-length per layer) a STATIC argument.
Each (batch shapes, schedule) pair is lowered and compiled once and kept in an
``accjax.programs.ProgramCache``, as every predictor does; ``Trainer.traces`` counts Python
traces, so a retrace would show. The fit loop that drives it is ``accjax.loop.fit``.

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

A step's schedule is ``schedule.plan`` of its speedup at the batch's length bucket.

Determinism and exact resume: the dropout key of step t is ``fold_in(PRNGKey(seed), t)``;
batch t is ``TrainBatches.position(t)``; the elastic level of step t is drawn as above. A
checkpoint therefore needs only (params, optimizer state, step) plus a small JSON (best dev
result so far); a restarted run continues bit for bit.

Optimizer: AdamW (decoupled weight decay, not on biases or LayerNorm / RMSNorm scales, as
Hugging Face's Trainer), learning rate warmed up linearly from 0 over
``ceil(warmup_ratio * total_steps)`` steps then decayed linearly to 0, gradients clipped by
global norm. Parameters and optimizer state are float32; ``config.dtype = 'bfloat16'``
makes the model compute in bfloat16. Any ``loss_fn(params, batch, rng, schedule) -> (loss,
metrics)`` plugs in (``classification_loss``; ``accjax.seq2seq`` for text-to-text).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from accjax import programs
from accjax import sharding as shard_lib

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
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", str(path[-1])) not in ("bias", "scale"), params)


def layer_scales(params: Any, decay: float) -> Any:
    """Layer-wise learning-rate decay: a factor per parameter, decay^(L - i) in ``layer_i`` of L
    layers (every family names its blocks so), decay^(L + 1) outside them for a path with
    'embed' in it (every ``nn.Embed`` table's leaf is ``embedding``: GPT-2's ``wte``, T5's
    ``shared``; and BERT's embedding LayerNorm), 1 for the rest (head, pooler, final norm).
    decay 1: every factor 1."""
    def index(path):
        names = [str(getattr(k, "key", k)) for k in path]
        found = [int(n[6:]) for n in names if n.startswith("layer_") and n[6:].isdigit()]
        return found[0] if found else None, any("embed" in n for n in names)

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    n_layers = 1 + max((i for i in (index(p)[0] for p, _ in flat) if i is not None), default=-1)

    def scale(path, _):
        i, embedding = index(path)
        depth = n_layers - i if i is not None else (n_layers + 1 if embedding else 0)
        return float(decay) ** depth

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layer(decay: float) -> optax.GradientTransformation:
    """Multiplies each update by its ``layer_scales`` factor (no state)."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, f: u * f, updates, layer_scales(updates, decay)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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


class ParamAverage(NamedTuple):
    """``param_average``'s state: decayed sums of the weights after each update and of 1."""

    mass: Array  # sum_s decay^(t-s) (1 - decay) = 1 - decay^t (float32 scalar)
    total: Any  # like the parameters: sum_s decay^(t-s) (1 - decay) w_s


def param_average(decay: float) -> optax.GradientTransformation:
    """An exponential moving average of the weights after each update (Polyak averaging);
    the updates pass through unchanged. The sums start at zero and ``averaged_weights``
    divides by the mass (Adam's debiasing), so the average is a weighted mean of the weights
    after every update so far, the latest weighing most."""

    def init(params):
        return ParamAverage(jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params):
        new = optax.apply_updates(params, updates)
        total = jax.tree.map(lambda t, w: decay * t + (1.0 - decay) * w, state.total, new)
        return updates, ParamAverage(decay * state.mass + (1.0 - decay), total)

    return optax.GradientTransformation(init, update)


def _average_state(opt_state: Any) -> ParamAverage | None:
    return next((s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamAverage))
                 if isinstance(s, ParamAverage)), None)


def averaged_weights(params: Any, opt_state: Any) -> Any:
    """The weight average ``param_average`` keeps in ``opt_state``; ``params`` when it keeps
    none (or before the first update)."""
    avg = _average_state(opt_state)
    if avg is None:
        return params
    return jax.tree.map(lambda t, p: jnp.where(avg.mass > 0, t / jnp.maximum(avg.mass, 1e-30), p),
                        avg.total, params)


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + linear decay and global-norm clipping; a learning-rate factor per
    layer when ``optim.layer_decay`` != 1 (``layer_scales``); a weight average when
    ``optim.average`` (its decay) is above 0.

    Args:
      optim: config with lr, weight_decay, warmup_ratio, clip (<= 0: none), b1, b2, eps,
        layer_decay and average (both optional; 1 and 0: none).
      total_steps: optimizer steps of the whole run.
    Returns:
      (the optax transformation, the learning-rate schedule).
    """
    sched = lr_schedule(float(optim.lr), total_steps, float(optim.warmup_ratio))
    clip = [optax.clip_by_global_norm(float(optim.clip))] if float(optim.clip) > 0 else []
    avg, layer = float(optim.get("average", 0.0)), float(optim.get("layer_decay", 1.0))
    return optax.chain(*clip, optax.adamw(sched, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                                          weight_decay=float(optim.weight_decay), mask=decay_mask),
                       *([scale_by_layer(layer)] if layer != 1.0 else []),
                       *([param_average(avg)] if avg > 0 else [])), sched


# ----------------------------------------------------------------------------------- losses
def _apply(module, params, batch, rng, schedule, acc_variant, hidden_states=False):
    kw = {} if rng is None else {"rngs": {"dropout": rng}}
    if hidden_states:
        kw["output_hidden_states"] = True
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return module.apply({"params": params}, **inputs, schedule=schedule, acc_variant=acc_variant,
                        deterministic=rng is None, **kw)


def _logits(module, params, batch, rng, schedule, acc_variant):
    return _apply(module, params, batch, rng, schedule, acc_variant).logits.astype(jnp.float32)  # [B, C]


def _weighted_mean(per: Array, batch: dict[str, Array]) -> Array:
    w = batch["weights"].astype(jnp.float32)  # [B], 0 on filler rows
    return (per * w).sum() / jnp.maximum(w.sum(), 1.0)


def task_loss(logits: Array, batch: dict[str, Array], num_labels: int) -> tuple[Array, dict[str, Array]]:
    """Weighted cross-entropy (classes) or mean squared error (``num_labels == 1``) of [B, C]
    logits; (loss, {'accuracy' in percent, or 'mse'}), means over real rows."""
    if num_labels == 1:
        loss = _weighted_mean((logits[:, 0] - batch["labels"].astype(jnp.float32)) ** 2, batch)
        return loss, {"mse": loss}
    labels = batch["labels"].astype(jnp.int32)
    loss = _weighted_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), batch)
    return loss, {"accuracy": 100.0 * _weighted_mean(jnp.argmax(logits, -1) == labels, batch)}


def distill_loss(student: Array, teacher: Array, batch: dict[str, Array], num_labels: int,
                 temperature: float = 1.0) -> Array:
    """What a student pass pays for departing from the teacher (the same step's full-model
    pass): T^2 KL(softmax(teacher / T) || softmax(student / T)) for classes (Hinton et al.;
    the T^2 keeps its gradient scale independent of T), the squared difference of the
    predictions for regression; a weighted mean over real rows. Zero when they agree; no
    gradient reaches the teacher."""
    teacher = jax.lax.stop_gradient(teacher)
    if num_labels == 1:
        return _weighted_mean((student[:, 0] - teacher[:, 0]) ** 2, batch)
    t = jax.nn.log_softmax(teacher / temperature, -1)
    s = jax.nn.log_softmax(student / temperature, -1)
    kl = (jnp.exp(t) * (t - s)).sum(-1)  # [B]
    return temperature ** 2 * _weighted_mean(kl, batch)


# the rows ``hidden_distill_loss`` compares (docs/results.md, issue 16: every layer's terms
# held 1x-3x, the last layer's alone 4.8x)
HIDDEN_LAYERS = ("last", "all", "both")


def hidden_distill_loss(student, teacher, batch: dict[str, Array], layers: str = "last") -> Array:
    """Mean squared distance of the student's rows (those it kept) to the teacher's rows at
    the same original positions; ``student`` / ``teacher`` are model outputs
    (``last_hidden_state`` [B, K, D] / [B, T, D], ``rows``), the teacher a full-model pass
    (row i at position i). Means over the kept real rows, then over real examples. ``layers``
    (one of ``HIDDEN_LAYERS``): 'last' compares the last layer's rows; 'all' each layer's
    output rows (the outputs need ``hidden_states``), the mean over layers; 'both' that mean
    plus the last layer's term once more. Zero when they agree; no gradient reaches the
    teacher."""
    if layers == "last":
        pairs = [(student.last_hidden_state, teacher.last_hidden_state, student.rows.positions)]
    elif layers in ("all", "both"):
        positions, pairs = None, []
        for out, s, t in zip(student.layers, student.hidden_states[1:], teacher.hidden_states[1:]):
            positions = out.get("positions", positions)  # None until a layer drops rows
            pairs.append((s, t, positions))
    else:
        raise ValueError(f"hidden-state distillation layers must be one of {HIDDEN_LAYERS}, not {layers!r}")
    real = batch["attention_mask"].astype(jnp.float32)  # [B, T] original rows
    terms = []
    for s, t, pos in pairs:
        t = jax.lax.stop_gradient(t.astype(jnp.float32))
        if pos is None:
            mask = real
        else:  # a fused row (acc.FUSED_POSITION) has no teacher row: it is left out
            own = pos >= 0
            pos = jnp.maximum(pos, 0)
            t = jnp.take_along_axis(t, pos[..., None], axis=1)  # [B, K, D]
            mask = jnp.take_along_axis(real, pos, axis=1) * own  # [B, K]
        per = ((s.astype(jnp.float32) - t) ** 2).mean(-1)
        terms.append(_weighted_mean((per * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0), batch))
    return sum(terms) / len(terms) + (terms[-1] if layers == "both" else 0.0)


@dataclasses.dataclass(frozen=True)
class Passes:
    """The passes of one elastic step (a static, hashable train-program key): one schedule
    each (None = the full model). The loss is their sum; with ``distill_weight`` > 0 and a
    full-model first pass, every later pass's loss is (1 - w) task loss + w distillation
    from that first pass (in-place distillation), plus ``hidden_weight`` x
    ``hidden_distill_loss`` from it over ``hidden_layers`` (``HIDDEN_LAYERS``)."""

    schedules: tuple
    distill_weight: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    hidden_layers: str = "last"


def classification_loss(module, params, batch: dict[str, Array], rng: Array | None, schedule, *,
                        num_labels: int, acc_variant: str = "plain") -> tuple[Array, dict[str, Array]]:
    """Weighted cross-entropy (classes) or mean squared error (``num_labels == 1``).

    Args:
      batch: input_ids / attention_mask / token_type_ids [B, T], labels [B] (int class ids,
        or float targets), weights [B] (0 for filler rows).
      rng: dropout key; None = deterministic.
      schedule: static keep-lengths, None = dense; or ``Passes`` (several passes, summed).
    Returns:
      (loss, {'loss', 'accuracy' (classification) or 'mse'}): means over real rows; for
      ``Passes`` the metrics of the first pass and the mean distillation term.
    """
    if not isinstance(schedule, Passes):
        return task_loss(_logits(module, params, batch, rng, schedule, acc_variant), batch, num_labels)
    total, first, teacher, kd, hd = 0.0, None, None, [], []
    for i, sched in enumerate(schedule.schedules):
        r = None if rng is None else jax.random.fold_in(rng, i)  # each pass its own dropout
        out = _apply(module, params, batch, r, sched, acc_variant,
                     hidden_states=schedule.hidden_weight > 0 and schedule.hidden_layers != "last")
        logits = out.logits.astype(jnp.float32)  # [B, C]
        loss, metrics = task_loss(logits, batch, num_labels)
        if teacher is not None and schedule.distill_weight > 0:
            kd.append(distill_loss(logits, teacher.logits.astype(jnp.float32), batch, num_labels,
                                   schedule.temperature))
            loss = (1 - schedule.distill_weight) * loss + schedule.distill_weight * kd[-1]
        if teacher is not None and schedule.hidden_weight > 0:
            hd.append(hidden_distill_loss(out, teacher, batch, schedule.hidden_layers))
            loss = loss + schedule.hidden_weight * hd[-1]
        if i == 0 and sched is None:
            teacher = out
        first = metrics if first is None else first
        total = total + loss
    for name, terms in (("distill", kd), ("distill_hidden", hd)):
        if terms:
            first = {**first, name: sum(terms) / len(terms)}
    return total, first


def make_classification_loss(module, num_labels: int, acc_variant: str = "plain") -> LossFn:
    """``loss_fn(params, batch, rng, schedule or Passes)`` for ``Trainer``."""
    return functools.partial(classification_loss, module, num_labels=num_labels, acc_variant=acc_variant)


# -------------------------------------------------------------------------------- sampling
class SpeedupSampler:
    """The training speedups of each step (None = dense); see the module docstring.

    Args:
      mode: 'dense' | 'fixed' | 'elastic'.
      speedup: the fixed mode's speedup.
      speedup_range: (low, high) of the elastic mode.
      levels: K, the elastic range is ``np.linspace(low, high, K)``.
      seed: with the step, seeds the level draw.
      sandwich: elastic: every step also runs the full model (1x) and the top level (the
        sandwich rule of slimmable networks), besides ``samples`` levels drawn from those
        strictly between.
      samples: elastic: levels drawn per step (distinct; without sandwich at least 1).
    """

    def __init__(self, mode: str, *, speedup: float = 1.0, speedup_range: Sequence[float] = (1.0, 1.0),
                 levels: int = 1, seed: int = 0, sandwich: bool = False, samples: int = 1):
        if mode not in MODES:
            raise ValueError(f"elimination.mode must be one of {MODES}, not {mode!r}")
        self.mode, self.seed = mode, int(seed)
        self.sandwich, self.samples = bool(sandwich) and mode == "elastic", int(samples)
        if mode == "fixed":
            if not float(speedup) >= 1:
                raise ValueError(f"elimination.speedup must be >= 1, got {speedup}")
            self.levels = (float(speedup),)
        elif mode == "elastic":
            bounds = tuple(float(x) for x in speedup_range)
            if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
                raise ValueError(f"elimination.speedup_range must be (low, high) with 1 <= low <= high, "
                                 f"got {tuple(speedup_range)}")
            lo, hi = bounds
            if int(levels) < 1:
                raise ValueError(f"elimination.levels must be >= 1, got {levels}")
            self.levels = tuple(float(x) for x in np.linspace(lo, hi, int(levels)))
        else:
            self.levels = (1.0,)
        # the levels a step draws from: with the sandwich, those strictly between 1x and the top
        self.pool = tuple(x for x in self.levels if 1.0 < x < self.levels[-1]) if self.sandwich else self.levels
        if mode == "elastic" and not (int(not self.sandwich) <= self.samples <= len(self.pool)):
            raise ValueError(f"elimination.samples must be in [{int(not self.sandwich)}, {len(self.pool)}] "
                             f"(levels {'strictly between 1x and the top' if self.sandwich else 'drawn from'}: "
                             f"{len(self.pool)}), got {self.samples}")

    def level(self, step: int) -> int:
        return 0 if len(self.levels) == 1 else int(
            np.random.default_rng([self.seed, int(step)]).integers(len(self.levels)))

    def speedups(self, step: int) -> tuple[float | None, ...]:
        """The passes of step ``step``: one speedup each (None = dense), a pure function of
        (seed, step)."""
        if self.mode == "dense":
            return (None,)
        if not self.sandwich and self.samples == 1:  # one level per step: the original draw
            return (self.levels[self.level(step)],)
        drawn = np.random.default_rng([self.seed, int(step)]).choice(len(self.pool), self.samples, replace=False)
        sampled = tuple(self.pool[i] for i in sorted(drawn))
        return ((1.0, self.levels[-1]) if self.sandwich else ()) + sampled

    def combinations(self) -> list[tuple[float | None, ...]]:
        """Every value ``speedups`` can return (each is one train program per length bucket)."""
        if self.mode != "elastic":
            return [self.speedups(0)]
        if not self.sandwich and self.samples == 1:
            return [(x,) for x in self.levels]
        head = (1.0, self.levels[-1]) if self.sandwich else ()
        return [head + c for c in itertools.combinations(self.pool, self.samples)]

    def speedup(self, step: int) -> float | None:
        """The one speedup of a single-pass step."""
        (s,) = self.speedups(step)
        return s


# ---------------------------------------------------------------------------------- trainer
def static_schedule(schedule):
    """A step's static argument: None (dense), a tuple of ints, or ``Passes`` as it is."""
    if schedule is None or isinstance(schedule, Passes):
        return schedule
    return tuple(int(k) for k in schedule)


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
        self.programs = programs.ProgramCache()  # train steps
        self.eval_programs = programs.ProgramCache()  # forward passes
        self._batch_shardings: dict[tuple, dict] = {}
        self._average = None  # jitted ``averaged_weights``, built on first use

    @property
    def traces(self) -> int:
        return self.programs.traces + self.eval_programs.traces

    @property
    def num_programs(self) -> int:
        return len(self.programs)

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
        return TrainState(jax.device_put(jnp.zeros((), jnp.int32), sh.step), params,
                          jax.jit(self.tx.init, out_shardings=sh.opt_state)(params))

    def batch_shardings(self, batch: dict[str, Any]) -> dict:
        key = tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))
        if key not in self._batch_shardings:
            self._batch_shardings[key] = shard_lib.batch_shardings(batch, self.mesh, self.rules)
        return self._batch_shardings[key]

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Array]:
        """A global host batch -> global arrays sharded over the batch axis."""
        return shard_lib.to_global(batch, self.batch_shardings(batch))

    # ----------------------------------------------------------------------------- steps
    def _train_step(self, state: TrainState, batch: dict[str, Array], seed: Array, schedule):
        # the seed is an input, not a constant: runs that differ only in it share programs
        # (and persistent-cache entries)
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step) if self.dropout else None

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

    def _specs(self, batch: dict[str, Any]) -> tuple[dict, dict]:
        """(batch shardings, ShapeDtypeStructs with them) of a global host batch."""
        b_sh = self.batch_shardings(batch)
        return b_sh, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in batch.items()}

    def _lower_train(self, state: TrainState, batch: dict[str, Any], schedule):
        st_sh = jax.tree.map(lambda x: x.sharding, state)
        b_sh, spec = self._specs(batch)
        repl = shard_lib.replicated(self.mesh)
        fn = jax.jit(self.programs.counted(self._train_step), in_shardings=(st_sh, b_sh, repl),
                     out_shardings=(st_sh, repl), static_argnums=3, donate_argnums=0)
        return fn.lower(state, spec, jax.ShapeDtypeStruct((), jnp.uint32, sharding=repl), schedule)

    def train_program(self, state: TrainState, batch: dict[str, Any], schedule):
        """The compiled step for this (batch shapes, schedule); compiled on first use only."""
        return self.programs.get((self._signature(batch), schedule),
                                 lambda: self._lower_train(state, batch, schedule))

    def precompile(self, state: TrainState, work: Sequence[tuple[dict[str, Any], Any]], *,
                   progress: Callable[[int, int], None] | None = None) -> int:
        """Compiles the step of every (batch, schedule) ahead, in parallel threads; returns
        how many programs were built (a run's programs are known before its first step)."""
        items = [((self._signature(b), s), functools.partial(self._lower_train, state, b, s)) for b, s in work]
        return self.programs.compile_all(items, progress=progress)

    def step(self, state: TrainState, batch: dict[str, np.ndarray], schedule=None
             ) -> tuple[TrainState, dict[str, Array]]:
        """One update on a GLOBAL host batch; ``state`` is donated (do not reuse it).
        ``schedule``: keep-lengths, None (dense) or ``Passes``."""
        prog = self.train_program(state, batch, static_schedule(schedule))
        return prog(state, self.put_batch(batch), np.uint32(self.seed))

    def eval_program(self, params, batch: dict[str, Any], schedule):
        """The compiled ``forward`` for this (batch shapes, schedule); compiled on first use."""
        if self.forward is None:
            raise ValueError("this Trainer has no forward function for evaluation")

        def lower():
            b_sh, spec = self._specs(batch)
            fn = jax.jit(self.eval_programs.counted(lambda p, b, s: self.forward(self._gathered(p), b, s)),
                         in_shardings=(jax.tree.map(lambda x: x.sharding, params), b_sh),
                         out_shardings=shard_lib.replicated(self.mesh), static_argnums=2)
            return fn.lower(params, spec, schedule)

        return self.eval_programs.get((self._signature(batch), schedule), lower)

    def weights(self, state: TrainState) -> Any:
        """The weights to evaluate and export: the optimizer's weight average when it keeps one
        (``optim.average``), else ``state.params`` itself."""
        if _average_state(state.opt_state) is None:
            return state.params
        if self._average is None:
            self._average = jax.jit(averaged_weights, out_shardings=self.param_shardings)
        return self._average(state.params, state.opt_state)

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
        prog = self.eval_program(params, batch, static_schedule(schedule))
        return np.asarray(prog(params, shard_lib.to_global(batch, self.batch_shardings(batch))))
