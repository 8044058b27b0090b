"""What a training config describes, built: model, tokenizer, data, loss, evaluation, export.

``build(config)`` returns an experiment for ``config.objective``:

  * ``classification``: a ``sequence_classification`` model on a task of ``accjax.tasks``
    (GLUE, ``rt_polarity``, your own files); cross-entropy, or MSE for regression; dev
    metrics through the task's official metrics at every eval speedup.
  * ``seq2seq``: a T5 ``lm`` model on instruction JSONL (``{"instruction", "input",
    "target"}``, ``accjax.prompting``); token cross-entropy; dev evaluation by
    ``prompting.evaluate`` (label likelihood accuracy when ``config.labels`` names the label
    words, else exact match and token F1 of greedy generations).

``accjax.loop.fit`` drives either through the same small interface (``train``, ``params``,
``param_specs``, ``loss_fn``, ``forward``, ``evaluate``, ``export``, ``final_eval``).

Models: ``config.model`` is a ``convert.load`` spec or ``preset:NAME`` (random weights; its
tokenizer from ``config.tokenizer``).

Bad input raises as ``accjax.data`` says; its drop and truncation counts go to ``metrics.jsonl``
(the ``data`` record), ``summary.json`` and the log. A ``max_length`` above the model's
position table is cut to it, with a warning.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from accjax import acc as acc_lib
from accjax import checkpoint as ckpt_lib
from accjax import convert, data as data_lib, evaluation, guards, hub
from accjax import models as models_lib
from accjax import schedule as sched_lib
from accjax.models.common import MATMUL_DTYPES, resolve_matmul_dtype
from accjax import sharding as shard_lib
from accjax import train as train_lib

log = logging.getLogger(__name__)

OBJECTIVES = ("classification", "seq2seq")
MODES_ORDER = ("elastic", "fixed", "dense")  # a config argument naming several: the first wins


# ------------------------------------------------------------------------------- configs
def config_words(arg: str | None, allowed: Sequence[str], modes: Sequence[str] = MODES_ORDER,
                 default_mode: str = "dense") -> tuple[set[str], str]:
    """A config file's argument ('elastic,tiny') -> (its words, the elimination mode); an
    unknown word raises naming the allowed ones."""
    words = {w.strip().lower() for w in (arg or "").split(",") if w.strip()}
    unknown = words - set(allowed) - set(modes)
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use {'|'.join(modes)}"
                         f"[,{','.join(allowed)}]")
    return words, next((w for w in modes if w in words), default_mode)


def base_config(objective: str, mode: str):
    """The fields every training config has, with their defaults; a config file
    (``configs/*.py``) changes what its recipe needs."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.objective = objective  # 'classification' (task labels; STS-B: regression) | 'seq2seq' (T5 text-to-text)
    c.model = ""  # convert.load spec: HF folder, hub id, built-in name, accjax folder; or 'preset:NAME' (random init)
    c.model_overrides = ml_collections.ConfigDict()  # model config fields to change (e.g. hidden_dropout)
    c.tokenizer = ""  # folder / spec holding tokenizer.json or vocab.txt; '' = the model's folder
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and optimizer state stay float32)
    # bf16 products: a training step 1.8x faster on a CPU with AMX, 1.3-1.4x slower on one
    # with AVX2 alone (docs/results.md "Time"); the evaluation and the exported model run them in
    # dtype. 'auto': bfloat16 where the device has bf16 instructions (common.resolve_matmul_dtype)
    c.matmul_dtype = ""  # the training step's projection products: '' = in dtype; 'bfloat16' = bf16 inputs, f32 sums; 'auto'
    c.max_examples = 0  # keep the first n examples of every split (quick runs); 0 = all
    c.batch_size = 32  # GLOBAL batch (split over all devices of all processes)
    c.eval_batch_size = 64  # GLOBAL evaluation batch
    c.epochs = 3  # passes over the train split
    c.seed = 0  # data order, dropout keys, elastic level draws, fresh head init
    c.dropout = True  # dropout on in training (the model's own probabilities)
    # Schedules are still planned at the bucket and padding is always dropped first, so a step
    # computes the same function on fewer rows; each padded length is one more train program
    # to compile (docs/results.md "Time")
    c.train_pad_multiple = 0  # classification: pad training batches to a multiple of this within their bucket; 0 = to it

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-5  # peak learning rate
    c.optim.weight_decay = 0.01  # AdamW decoupled decay; not on biases and norm scales
    c.optim.warmup_ratio = 0.1  # linear warmup over ceil(ratio * total steps), then linear decay to 0
    c.optim.clip = 1.0  # global gradient-norm clipping; <= 0 = none
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.layer_decay = 1.0  # layer i of L learns at lr * layer_decay^(L - i), the embeddings at ^(L + 1), the head at lr
    c.optim.average = 0.0  # > 0: evaluate and export a moving average of the weights with this decay

    c.elimination = ml_collections.ConfigDict()
    c.elimination.mode = mode  # 'dense' | 'fixed' (one training speedup) | 'elastic' (a speedup drawn per step)
    c.elimination.speedup = 2.0  # fixed mode: the training speedup
    c.elimination.speedup_range = (1.0, 4.0)  # elastic mode: speedups drawn from this range ...
    c.elimination.levels = 7  # ... quantised to this many levels (bounds the compiled train programs)
    c.elimination.sandwich = False  # elastic: every step also trains the full model (1x) and the top level
    c.elimination.samples = 1  # elastic: levels drawn per step (sandwich: besides 1x and the top; may be 0)
    c.elimination.acc_variant = "plain"  # ACC form ranking the rows (accjax.acc.VARIANTS)
    c.elimination.bucket = 8  # keep-lengths rounded up to multiples of this (powers of two below it)
    c.elimination.floor = 1  # no layer keeps fewer rows
    c.elimination.prune_every = 1  # k > 1: only layers 1, 1 + k, ... drop rows (schedule.plan)
    # BERT family: 'acc' / 'mean' keeps one row fewer and appends the ACC-weighted / plain mean
    # of the rows a layer drops (acc.fuse_dropped; the exported model keeps it)
    c.elimination.fuse = ""  # '' = the dropped rows are discarded (acc.FUSE_MODES)

    # Start from a dense fine-tune: the run first fine-tunes densely (1x, its own warmup and
    # decay) into RUN_DIR/dense, resumably, then trains as configured from that model
    c.warm_start = ml_collections.ConfigDict()
    c.warm_start.epochs = 0  # epochs of that dense fine-tune; 0 = none (start from config.model)
    c.warm_start.lr = 5e-5  # its peak learning rate

    c.distill = ml_collections.ConfigDict()  # in-place distillation (needs elimination.sandwich)
    c.distill.weight = 0.0  # each eliminated pass: (1 - w) task loss + w distillation from the step's 1x pass
    c.distill.temperature = 1.0  # softmax temperature of the soft targets (classification)
    c.distill.hidden_weight = 0.0  # + w x squared distance of its kept rows to the 1x pass's (layers below)
    c.distill.hidden_layers = "last"  # rows compared: the last layer's, 'all' (each layer's, mean) or 'both' (the two summed)

    c.eval = ml_collections.ConfigDict()
    c.eval.speedups = (1.0, 1.5, 2.0, 3.0, 4.0)  # dev evaluation at each epoch end, at each speedup
    c.eval.epochs = ()  # epochs (from 1) whose end scores dev and may export the best model; () = every
    # epoch. The run's last epoch is always scored, so a run always exports a model
    c.eval.select_speedup = 1.0  # the best model is chosen by the dev primary metric at this speedup ...
    c.eval.select_mean = mode == "elastic"  # ... or by its mean over eval.speedups (elastic: serve them all)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 = all devices left
    c.mesh.fsdp = 1  # parameter-sharding axis size (FSDP: also add ('embed', 'fsdp') to the rules)
    c.logical_axis_rules = [("batch", ("data", "fsdp"))]  # (logical axis, mesh axes); unnamed = replicated. DP

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # resume checkpoints every n steps (and at every epoch end)
    c.checkpoint.keep = 2  # newest resume checkpoints kept

    c.run_dir = "runs/run"  # run folder: checkpoints, best model, metrics, TensorBoard
    c.log_every_steps = 10  # metrics.jsonl / TensorBoard / progress-bar interval
    c.progress = True  # tqdm progress bar (loss, lr, examples/s, ETA)
    c.compile_cache = True  # JAX's persistent compilation cache in $ACCJAX_CACHE/xla (env ACCJAX_COMPILE_CACHE=0: off)

    c.debug = ml_collections.ConfigDict()
    c.debug.max_steps = 0  # stop after n steps (0 = the full run); the lr schedule still spans all epochs
    c.debug.step_delay_s = 0.0  # sleep after every step (lets a test interrupt a run mid-way)
    return c


# --------------------------------------------------------------------------- validation
def validate_config(config) -> None:
    """Values the loop relies on; each error names the key and the permitted values."""
    def need(cond, msg):
        if not cond:
            raise guards.UserError(f"config: {msg}")

    need(config.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, not {config.objective!r}")
    need(int(config.epochs) >= 1, f"epochs must be >= 1, got {config.epochs}")
    need(int(config.batch_size) >= 1 and int(config.eval_batch_size) >= 1, "batch sizes must be >= 1")
    need(config.elimination.mode in train_lib.MODES,
         f"elimination.mode must be one of {train_lib.MODES}, not {config.elimination.mode!r}")
    speedups = [float(s) for s in config.eval.speedups]
    need(speedups and all(s >= 1 for s in speedups), f"eval.speedups must be numbers >= 1, got {speedups}")
    epochs = tuple(config.eval.get("epochs", ()))
    need(all(1 <= int(e) <= int(config.epochs) for e in epochs),
         f"eval.epochs must be epochs 1..{config.epochs} (or () for every epoch), got {epochs}")
    need(bool(config.eval.select_mean) or float(config.eval.select_speedup) in speedups,
         f"eval.select_speedup {config.eval.select_speedup} is not one of eval.speedups {speedups}")
    need(config.dtype in ("float32", "bfloat16", "float16"),
         f"dtype must be float32, bfloat16 or float16, not {config.dtype!r}")
    need(config.get("matmul_dtype", "") in MATMUL_DTYPES + ("auto",),
         f"matmul_dtype must be one of {', '.join(repr(d) for d in MATMUL_DTYPES + ('auto',))}, "
         f"not {config.get('matmul_dtype')!r}")
    need(str(config.run_dir).strip() != "", "run_dir must be set")
    need(int(config.get("train_pad_multiple", 0)) >= 0,
         f"train_pad_multiple must be >= 0 (0: pad to the length bucket), got {config.get('train_pad_multiple')}")
    guards.check_optim(config.optim)
    el = config.elimination
    need(not el.sandwich or (el.mode == "elastic" and config.objective == "classification"),
         "elimination.sandwich needs elimination.mode 'elastic' and objective 'classification'")
    need(0 <= float(config.distill.weight) <= 1, f"distill.weight must be in [0, 1], got {config.distill.weight}")
    need(float(config.distill.hidden_weight) >= 0,
         f"distill.hidden_weight must be >= 0, got {config.distill.hidden_weight}")
    need((float(config.distill.weight) == 0 and float(config.distill.hidden_weight) == 0) or el.sandwich,
         "distill.weight or hidden_weight > 0 needs elimination.sandwich = True (the teacher is the step's 1x pass)")
    need(config.distill.hidden_layers in train_lib.HIDDEN_LAYERS,
         f"distill.hidden_layers must be one of {', '.join(train_lib.HIDDEN_LAYERS)}, got {config.distill.hidden_layers!r}")
    need(float(config.distill.temperature) > 0, f"distill.temperature must be > 0, got {config.distill.temperature}")
    warm = config.get("warm_start", {})
    need(isinstance(warm.get("epochs", 0), int) and int(warm.get("epochs", 0)) >= 0,
         f"warm_start.epochs must be a whole number >= 0, got {warm.get('epochs')!r}")
    need(int(warm.get("epochs", 0)) == 0 or el.mode != "dense",
         "warm_start.epochs > 0 needs elimination.mode 'fixed' or 'elastic' (a dense run would "
         "just train longer: raise epochs instead)")
    if int(warm.get("epochs", 0)) > 0:
        guards.finite_number(warm.get("lr"), "config: warm_start.lr", above=0.0)
    need(el.get("fuse", "") in acc_lib.FUSE_MODES,
         f"elimination.fuse must be one of {', '.join(repr(m) for m in acc_lib.FUSE_MODES)}, not {el.get('fuse')!r}")
    try:  # constructing the sampler checks the elimination values
        sampler(config)
        sched_lib.check_every(el.prune_every)
    except ValueError as e:
        raise guards.UserError(f"config: {e}") from None


def warm_start_config(config):
    """The dense fine-tune a run with ``warm_start.epochs`` > 0 starts from: the same model,
    data, batches, seed, products and optimizer, dense, for ``warm_start.epochs`` epochs at
    peak lr ``warm_start.lr``, in ``RUN_DIR/dense``, dev scored at 1x after its last epoch
    (``loop.fit`` trains it first, or finds it finished, and starts the run from its model)."""
    d = copy.deepcopy(config)
    n = int(config.warm_start.epochs)
    d.warm_start.epochs = 0
    d.elimination.update(mode="dense", sandwich=False)
    d.distill.update(weight=0.0, hidden_weight=0.0)
    d.epochs, d.optim.lr = n, float(config.warm_start.lr)
    d.eval.update(speedups=(1.0,), epochs=(n,), select_speedup=1.0, select_mean=False)
    d.run_dir = str(Path(config.run_dir) / "dense")
    d.debug.max_steps = 0  # debug.max_steps stops the run after its warm start
    return d


def plan_kw(el) -> dict:
    """``schedule.plan``'s rounding, floor and stride, as ``config.elimination`` says."""
    return dict(bucket=int(el.bucket), floor=int(el.floor), prune_every=el.prune_every)


def sampler(config) -> train_lib.SpeedupSampler:
    """The training speedups of each step, as ``config.elimination`` says."""
    el = config.elimination
    return train_lib.SpeedupSampler(el.mode, speedup=el.speedup, speedup_range=tuple(el.speedup_range),
                                    levels=el.levels, seed=int(config.seed), sandwich=bool(el.sandwich),
                                    samples=int(el.samples))


# ------------------------------------------------------------------------------- models
def load_model(config, head: str, num_labels: int | None) -> tuple[convert.Loaded, Path]:
    """(the model as ``convert.Loaded`` with numpy params, the folder of its tokenizer files)."""
    overrides = dict(config.model_overrides.to_dict() if hasattr(config.model_overrides, "to_dict")
                     else config.model_overrides or {})
    overrides["dtype"] = config.dtype
    if config.elimination.get("fuse", ""):  # else the model's own (config.json) setting holds
        overrides["fuse_dropped"] = config.elimination.fuse
    try:
        return _load_model(config, head, num_labels, overrides)
    except TypeError as e:  # a family whose config has no such field
        if "fuse_dropped" not in str(e):
            raise
        raise guards.UserError("config: elimination.fuse works for BERT-family encoders only; "
                               "leave it '' for this model") from None


def _load_model(config, head: str, num_labels: int | None, overrides: dict) -> tuple[convert.Loaded, Path]:
    spec = str(config.model)
    if spec.startswith("preset:"):
        if num_labels is not None and head == "sequence_classification":
            overrides["num_labels"] = num_labels
        cfg = models_lib.preset(spec.removeprefix("preset:"), **overrides)
        family = models_lib.get_family(cfg.family)
        params = models_lib.init_params(cfg, head, int(config.seed))
        if not config.tokenizer:
            raise guards.UserError("config.tokenizer must name a tokenizer folder or model for a preset: model")
        tok = hub.resolve(config.tokenizer)
        return convert.Loaded(family, cfg, head, params, tok, convert.LoadReport()), tok
    loaded = convert.load(spec, head, num_labels=num_labels if head == "sequence_classification" else None,
                          seed=int(config.seed), **overrides)
    tok = hub.resolve(config.tokenizer) if config.tokenizer else loaded.folder
    for k in loaded.report.initialized:
        log.info("initialised fresh %s", k)
    return loaded, tok


# ------------------------------------------------------------------- shared reporting
class _Base:
    objective: str
    dev_split: str
    primary_name: str
    head: str

    def __init__(self, config):
        self.config = config
        self.select_mean = bool(config.eval.select_mean)
        self.select_speedup = float(config.eval.select_speedup)
        self.acc_variant = str(config.elimination.acc_variant)

    def _load_model(self, num_labels: int | None) -> None:
        loaded, self.tokenizer_dir = load_model(self.config, self.head, num_labels)
        self.loaded, self.model_config, self.family = loaded, loaded.config, loaded.family
        self.module, self.params = loaded.module, loaded.params
        # the training step's module: its projections' products in config.matmul_dtype; the
        # evaluation, the exported model and whoever loads it run them in the compute dtype
        low = self.train_matmul_dtype = resolve_matmul_dtype(str(self.config.get("matmul_dtype", "") or ""))
        self.train_module = (loaded.family.module(dataclasses.replace(loaded.config, matmul_dtype=low), loaded.head)
                             if low else self.module)
        variables = models_lib.abstract_variables(loaded.config, loaded.head)
        self.param_specs = shard_lib.logical_specs(variables)["params"]  # from the modules' axis names
        self.cost = models_lib.cost_model(self.model_config, self.head)

    def export(self, params, run_dir: Path, extra: dict) -> None:
        ckpt_lib.export_model(run_dir, self.family, self.model_config, params, self.head,
                              tokenizer_from=self.tokenizer_dir,
                              extra={"objective": self.objective, **self.export_meta, **extra})

    def final_eval(self, trainer, run_dir: Path, speedups: Sequence[float],
                   scored: tuple[list[dict], Any] | None = None) -> list[dict]:
        """The exported best model, reloaded from the run folder, on every labelled dev/test split.

        ``scored``: (dev rows, host params) of the best model as this run scored and exported
        it. Its dev rows are then not scored again; the export round trip is checked instead:
        the reloaded model's outputs on one dev batch, at the lowest and the highest speedup,
        must equal those of the parameters that were exported.
        """
        if not (Path(run_dir) / convert.ACCJAX_META).exists():
            return []
        best = convert.load(run_dir, self.head)
        params = shard_lib.put(best.params, trainer.param_shardings)
        if scored is None or self.forward is None:  # (text-to-text: no forward pass to compare)
            return self.evaluate(trainer, params, speedups, include_test=True)
        rows, exported = scored
        exported = shard_lib.put(exported, trainer.param_shardings)
        self.check_export(trainer, params, exported, speedups, run_dir)
        return rows + self.evaluate(trainer, params, speedups, include_test=True, dev=False)

    @property
    def select_label(self) -> str:
        where = "mean over eval speedups" if self.select_mean else f"{self.select_speedup:g}x"
        return f"{self.dev_split} {self.primary_name} ({where})"

    def selection_score(self, rows: list[dict]) -> float:
        dev = [r for r in rows if r["split"] == self.dev_split]
        if self.select_mean:
            return float(np.mean([r["primary"] for r in dev]))
        return float(next(r["primary"] for r in dev if r["speedup"] == self.select_speedup))

    def describe(self, total: int, per_epoch: int, mesh, sampler, n_params: int) -> str:
        el = self.config.elimination
        mode = el.mode if el.mode == "dense" else (
            f"fixed {el.speedup:g}x" if el.mode == "fixed"
            else f"elastic {len(sampler.levels)} levels {[round(s, 3) for s in sampler.levels]}"
            + (f", sandwich: 1x + top + {sampler.samples} drawn per step"
               + (f", distillation weight {self.config.distill.weight:g}" if self.config.distill.weight else "")
               + (f", hidden-state distillation weight {self.config.distill.hidden_weight:g}"
                  + ("" if self.config.distill.hidden_layers == "last"
                     else f" ({self.config.distill.hidden_layers} layers)")
                  if self.config.distill.hidden_weight else "")
               if sampler.sandwich else ""))
        fuse = getattr(self.model_config, "fuse_dropped", "")
        if fuse and el.mode != "dense":
            mode += f", dropped rows fused into one ({fuse} weights)"
        asked = str(self.config.get("matmul_dtype", "") or "")
        products = (f"; train products {self.train_matmul_dtype or self.config.dtype}"
                    + (" (auto)" if asked == "auto" else "")) if asked else ""
        return (f"{self.objective}: {self.config.model} ({n_params:,} "
                f"params, {self.config.dtype}{products}) on {self.task_name}; {per_epoch} steps/epoch x "
                f"{self.config.epochs} epochs = {total} steps of {self.config.batch_size}; mesh "
                f"{dict(mesh.shape)} on {jax.process_count()} process(es); elimination {mode}"
                + (f", rows dropped only in layers 1, {1 + el.prune_every}, ..." if el.prune_every > 1
                   else ""))


# -------------------------------------------------------------------- classification
class ClassificationExperiment(_Base):
    objective = "classification"
    head = "sequence_classification"

    def __init__(self, config):
        super().__init__(config)
        data = data_lib.load_task(config.task, config.data_dir or None,
                                  max_examples=int(config.max_examples) or None)
        data_lib.check_splits(data, int(config.batch_size))  # before the model loads
        self.task = data.task
        self.task_name = self.task.name
        self.dev_split = self.task.dev_split
        self.primary_name = self.task.primary_metric
        self._load_model(self.task.num_labels)
        from accjax.tokenization import Tokenizer

        tok = Tokenizer.from_folder(self.tokenizer_dir)
        limit = min(tok.max_length, getattr(self.model_config, "max_position_embeddings", tok.max_length))
        self.max_length = max_length = min(int(config.max_length), limit)
        if int(config.max_length) > limit:
            log.warning("max_length %d exceeds the model's maximum %d: using %d",
                        int(config.max_length), limit, limit)
        self.buckets = tuple(int(b) for b in config.length_buckets)
        self.features = data_lib.encode_splits(data, tok, max_length)  # check_splits: a train split
        self.train = data_lib.TrainBatches(self.features[self.task.train_split], int(config.batch_size),
                                           seed=int(config.seed), buckets=self.buckets,
                                           pad_multiple=int(config.get("train_pad_multiple", 0)))
        self.data_report = {
            "task": self.task.spec, "examples": {s: len(f) for s, f in self.features.items()},
            "truncated": {s: f.truncated for s, f in self.features.items()},
            "dropped_empty": dict(data.dropped), "skipped_corrupt": dict(data.skipped),
            "max_length": max_length, "length_buckets": list(data_lib.length_buckets(max_length, self.buckets)),
        }
        self.loss_fn = train_lib.make_classification_loss(self.train_module, self.task.num_labels, self.acc_variant)
        self.input_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids")
                                 if n in self.family.dummy_inputs(self.model_config, 1, 8))
        self.export_meta = {"task": self.task.spec, "label_names": list(self.task.label_names),
                            "data": {"max_length": self.max_length, "length_buckets": list(self.buckets)}}

    def schedule_length(self, batch) -> int:
        """The length a batch's schedule is planned at: its length bucket (the padded length,
        unless ``train_pad_multiple`` padded it tighter)."""
        return data_lib.bucket_for(self.train.buckets, int(batch["input_ids"].shape[1]))

    def forward(self, params, batch, schedule):
        out = self.module.apply({"params": params}, **{k: batch[k] for k in self.input_names},
                                schedule=schedule, acc_variant=self.acc_variant)
        return out.logits

    def _eval_splits(self, include_test: bool, dev: bool = True) -> list[str]:
        names = ((list(self.task.dev_splits) if dev else [])
                 + (list(self.task.test_splits) if include_test else []))
        return [s for s in names if s in self.features and self.features[s].has_labels]

    def check_export(self, trainer, reloaded, exported, speedups: Sequence[float], run_dir) -> None:
        """Raises unless both parameter sets give the same logits on the first dev batch at the
        lowest and the highest of ``speedups`` (programs the dev evaluation compiled)."""
        batch = data_lib.EvalBatches(self.features[self.dev_split], int(self.config.eval_batch_size),
                                     buckets=self.buckets).batch(0)
        batch = {k: batch[k] for k in self.input_names}
        for s in (min(speedups), max(speedups)):
            sched = sched_lib.plan(self.cost, self.schedule_length(batch), s,
                                   **plan_kw(self.config.elimination)).schedule
            a, b = (trainer.eval_outputs(p, batch, sched) for p in (reloaded, exported))
            if not np.array_equal(a, b):
                raise RuntimeError(f"the model exported to {run_dir} does not reproduce the trained "
                                   f"model's logits at {s:g}x (max difference {np.abs(a - b).max():.3g})")

    def evaluate(self, trainer, params, speedups: Sequence[float], *, include_test: bool = False,
                 dev: bool = True) -> list[dict]:
        """``evaluation.score_splits`` rows per split x speedup (the dev splits unless not
        ``dev``, and the test splits with ``include_test``), through the trainer's sharded
        forward pass."""
        def run(batch, plan):
            return trainer.eval_outputs(params, {k: batch[k] for k in self.input_names}, plan.schedule)

        def compile(plan, batch):
            trainer.eval_program(params, {k: batch[k] for k in self.input_names}, plan.schedule)

        return evaluation.score_splits(
            self.task, {s: self.features[s] for s in self._eval_splits(include_test, dev)}, run,
            cost=self.cost,
            speedups=speedups, batch_size=int(self.config.eval_batch_size), buckets=self.buckets,
            compile=compile, **plan_kw(self.config.elimination))


# ---------------------------------------------------------------------------- seq2seq
class Seq2SeqBatches:
    """Shuffled, fixed-shape text-to-text training batches, resumable at any (epoch, index).

    Epoch e's order is ``numpy.random.default_rng([seed, e]).permutation(n)``; batch i takes
    the next B examples (the last batch is filled with rows whose labels all count for
    nothing). Every batch is [B, source_length] / [B, target_length]: one shape, one program
    per schedule.
    """

    def __init__(self, tokenizer, examples, batch_size: int, *, seed: int, source_length: int,
                 target_length: int):
        if not examples:
            raise data_lib.DataError("the train file holds no examples")
        self.tokenizer, self.examples = tokenizer, list(examples)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.source_length, self.target_length = int(source_length), int(target_length)
        self.num_batches = -(-len(self.examples) // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def position(self, step: int) -> tuple[int, int]:
        return divmod(int(step), self.num_batches)

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        from accjax import prompting

        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.examples))
        idx = perm[index * self.batch_size:(index + 1) * self.batch_size]
        out = prompting.text_to_text_batch(self.tokenizer, [self.examples[i] for i in idx],
                                           source_length=self.source_length,
                                           target_length=self.target_length, batch_size=self.batch_size)
        return {**out, "weights": (np.arange(self.batch_size) < len(idx)).astype(np.float32)}


class Seq2SeqExperiment(_Base):
    objective = "seq2seq"
    head = "lm"
    dev_split = "validation"

    def __init__(self, config):
        super().__init__(config)
        from accjax import prompting, seq2seq
        from accjax.tokenization import Tokenizer

        files = {"train": config.train_file, "validation": config.dev_file, "test": config.test_file}
        self.splits = {k: prompting.load_jsonl(f)[:max(int(config.max_examples), 0) or None]
                       for k, f in files.items() if k != "test" or f}
        self.labels = [w.strip() for w in str(config.labels).split(",") if w.strip()] or None
        self.primary_name = "accuracy" if self.labels else "token_f1"
        self.task_name = Path(config.train_file).name
        self._load_model(None)
        self.tokenizer = Tokenizer.from_folder(self.tokenizer_dir)
        self.source_length, self.target_length = int(config.source_length), int(config.target_length)
        self.train = Seq2SeqBatches(self.tokenizer, self.splits["train"], int(config.batch_size),
                                    seed=int(config.seed), source_length=self.source_length,
                                    target_length=self.target_length)
        module, variant = self.train_module, self.acc_variant
        self.loss_fn = lambda params, batch, rng, schedule: seq2seq.seq2seq_loss(
            module, params, batch, rng, schedule=schedule, acc_variant=variant)
        self.forward, self._predictor = None, None
        self.data_report = {"task": {"train_file": str(config.train_file), "dev_file": str(config.dev_file),
                                     "test_file": str(config.test_file) or None, "labels": self.labels},
                            "examples": {k: len(v) for k, v in self.splits.items()}}
        self.export_meta = {"task": self.data_report["task"]}

    def schedule_length(self, batch) -> int:
        return self.source_length

    def _predictor_for(self, params_host):
        from accjax import seq2seq

        if self._predictor is None:
            self._predictor = seq2seq.Seq2SeqPredictor(
                self.module, params_host, self.model_config, batch_size=int(self.config.eval_batch_size),
                acc_variant=self.acc_variant, **plan_kw(self.config.elimination))
        else:  # compiled programs take params as an argument: swap them in, keep the programs
            self._predictor.params = jax.device_put(params_host)
        return self._predictor

    def evaluate(self, trainer, params, speedups: Sequence[float], *, include_test: bool = False) -> list[dict]:
        from accjax import prompting

        pred = self._predictor_for(shard_lib.to_host(params))
        rows = []
        for split in ["validation"] + (["test"] if include_test and "test" in self.splits else []):
            res = prompting.evaluate(pred, self.tokenizer, self.splits[split], speedups=list(speedups),
                                     labels=self.labels, max_new_tokens=self.target_length,
                                     max_length=self.source_length)
            for r in res["rows"]:
                m = ({"accuracy": 100 * r["accuracy"]} if self.labels else
                     {"exact_match": 100 * r["exact_match"], "token_f1": 100 * r["token_f1"]})
                rows.append({"task": self.task_name, "split": split, "speedup": float(r["speedup"]),
                             "analytic_speedup": r["analytic_speedup"], **m, "primary": m[self.primary_name]})
        return rows


def build(config):
    """The experiment ``config.objective`` names."""
    return {"classification": ClassificationExperiment, "seq2seq": Seq2SeqExperiment}[config.objective](config)
