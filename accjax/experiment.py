"""What a training config describes, built: model, tokenizer, data, loss, evaluation, export.

``build(config)`` returns an experiment for ``config.objective``:

  * ``classification``: a ``sequence_classification`` model on a task of ``accjax.tasks``
    (GLUE, ``rt_polarity``, your own files); cross-entropy, or MSE for regression; dev
    metrics through the task's official metrics at every eval speedup.
  * ``seq2seq``: a T5 ``lm`` model on instruction JSONL (``{"instruction", "input",
    "target"}``, ``accjax.prompting``); token cross-entropy; dev evaluation by
    ``prompting.evaluate`` (label likelihood accuracy when ``config.labels`` names the label
    words, else exact match and token F1 of greedy generations).

``accjax.train.fit`` drives either through the same small interface (``train``, ``params``,
``param_specs``, ``loss_fn``, ``forward``, ``evaluate``, ``export``, ``final_eval``).

Models: ``config.model`` is a ``convert.load`` spec (HF folder, hub id, ``minilm-l6``, an
accjax folder) or ``preset:NAME`` for a randomly initialised preset
(``accjax.models.preset(NAME, **config.model_overrides)``; tiny test runs), whose tokenizer
comes from ``config.tokenizer``.

Bad input, as the data layer states it (``accjax.data``): an unknown task raises
``UnknownTaskError``; a missing file ``DataNotFoundError``; a label outside the label set
``DataError``; empty texts are dropped and counted; texts longer than the model's maximum are
truncated and counted. The counts go to ``metrics.jsonl`` (the ``data`` record), to
``summary.json`` and to the log. A ``max_length`` above the model's position table is cut to
it, with a warning.

``evaluate_run(run_dir, ...)`` scores a run folder's exported model with nothing but that
folder, through ``accjax.inference.Predictor``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from accjax import checkpoint as ckpt_lib
from accjax import convert, data as data_lib, guards, hub, metrics as metrics_lib
from accjax import runfolder
from accjax import models as models_lib
from accjax import schedule as sched_lib
from accjax import sharding as shard_lib
from accjax import train as train_lib

log = logging.getLogger(__name__)

OBJECTIVES = ("classification", "seq2seq")


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
    need(bool(config.eval.select_mean) or float(config.eval.select_speedup) in speedups,
         f"eval.select_speedup {config.eval.select_speedup} is not one of eval.speedups {speedups}")
    need(config.dtype in ("float32", "bfloat16", "float16"),
         f"dtype must be float32, bfloat16 or float16, not {config.dtype!r}")
    need(str(config.run_dir).strip() != "", "run_dir must be set")
    guards.check_optim(config.optim)
    # Constructing the sampler checks the elimination values.
    el = config.elimination
    try:
        train_lib.SpeedupSampler(el.mode, speedup=el.speedup, speedup_range=tuple(el.speedup_range),
                                 levels=el.levels)
    except ValueError as e:
        raise guards.UserError(f"config: {e}") from None


# ------------------------------------------------------------------------------- models
def load_model(config, head: str, num_labels: int | None) -> tuple[convert.Loaded, Path]:
    """(the model as ``convert.Loaded`` with numpy params, the folder of its tokenizer files)."""
    overrides = dict(config.model_overrides.to_dict() if hasattr(config.model_overrides, "to_dict")
                     else config.model_overrides or {})
    overrides["dtype"] = config.dtype
    spec = str(config.model)
    if spec.startswith("preset:"):
        if num_labels is not None and head == "sequence_classification":
            overrides["num_labels"] = num_labels
        cfg = models_lib.preset(spec.removeprefix("preset:"), **overrides)
        family = models_lib.get_family(cfg.family)
        module = family.module(cfg, head)
        # One compiled init (eager init would compile every initialiser op separately).
        variables = jax.jit(module.init)(jax.random.PRNGKey(int(config.seed)), **family.dummy_inputs(cfg, 1, 8))
        params = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
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


def param_specs(loaded: convert.Loaded) -> Any:
    """Logical PartitionSpecs of the model's parameters (from the module's annotations)."""
    module = loaded.module
    inputs = loaded.family.dummy_inputs(loaded.config, 1, 8)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **inputs))
    return shard_lib.logical_specs(abstract)["params"]


class FlopCounter:
    """The analytic speedup of a whole split: dense FLOPs / FLOPs run, every example counted
    at its padded length (``accjax.schedule``'s cost model)."""

    def __init__(self, model_config):
        self.cost = sched_lib.cost_model(model_config)
        self.dense = self.run = 0.0

    def add(self, rows: float, length: int, speedup: float) -> None:
        d = rows * self.cost.total(length, (length,) * self.cost.num_layers)
        self.dense += d
        self.run += d / speedup

    @property
    def speedup(self) -> float:
        return self.dense / self.run if self.run else 1.0


def _none_if_empty(v):
    return v if v not in ("", None, 0) else None


def format_rows(rows: list[dict]) -> str:
    """A fixed-width table of evaluation rows (split, speedup, analytic speedup, metrics)."""
    if not rows:
        return "(no labelled evaluation split)"
    keys = [k for k in rows[0] if k not in ("split", "speedup", "analytic_speedup", "primary",
                                             "schedules", "n", "seconds", "shots", "shots_dropped",
                                             "truncated")]
    lines = [f"{'split':<24}{'speedup':>8}{'analytic':>10}" + "".join(f"{k:>12}" for k in keys)
             + "  schedules"]
    for r in rows:
        sch = " ".join(f"{t}:{','.join(map(str, v))}" for t, v in r.get("schedules", {}).items())
        lines.append(f"{r['split']:<24}{r['speedup']:>8g}{r['analytic_speedup']:>10.2f}"
                     + "".join(f"{r[k]:>12.2f}" for k in keys) + f"  {sch}")
    return "\n".join(lines)


# ------------------------------------------------------------------- shared reporting
class _Base:
    objective: str
    dev_split: str
    primary_name: str

    def __init__(self, config):
        self.config = config
        self.select_mean = bool(config.eval.select_mean)
        self.select_speedup = float(config.eval.select_speedup)

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
            else f"elastic {len(sampler.levels)} levels {[round(s, 3) for s in sampler.levels]}")
        return (f"{self.objective}: {self.config.model} ({n_params:,} "
                f"params, {self.config.dtype}) on {self.task_name}; {per_epoch} steps/epoch x "
                f"{self.config.epochs} epochs = {total} steps of {self.config.batch_size}; mesh "
                f"{dict(mesh.shape)} on {jax.process_count()} process(es); elimination {mode}")


# -------------------------------------------------------------------- classification
class ClassificationExperiment(_Base):
    objective = "classification"
    head = "sequence_classification"

    def __init__(self, config):
        super().__init__(config)
        data = data_lib.load_task(config.task, _none_if_empty(config.data_dir),
                                  max_examples=_none_if_empty(int(config.max_examples)))
        data_lib.check_splits(data, int(config.batch_size))  # before the model loads
        self.task = data.task
        self.task_name = self.task.name
        self.dev_split = self.task.dev_split
        self.primary_name = self.task.primary_metric
        loaded, tok_dir = load_model(config, self.head, self.task.num_labels)
        self.loaded, self.tokenizer_dir = loaded, tok_dir
        self.model_config, self.family = loaded.config, loaded.family
        self.module = loaded.module
        self.params = loaded.params
        self.param_specs = param_specs(loaded)
        from accjax.tokenization import Tokenizer

        tok = Tokenizer.from_folder(tok_dir)
        limit = min(tok.max_length, getattr(self.model_config, "max_position_embeddings", tok.max_length))
        max_length = int(config.max_length)
        if max_length > limit:
            log.warning("max_length %d exceeds the model's maximum %d: using %d", max_length, limit, limit)
            max_length = limit
        self.max_length = max_length
        self.buckets = tuple(int(b) for b in config.length_buckets)
        self.features = data_lib.encode_splits(data, tok, max_length)
        if self.task.train_split not in self.features:
            raise data_lib.DataError(f"task {self.task.name} has no {self.task.train_split!r} split")
        self.train = data_lib.TrainBatches(self.features[self.task.train_split], int(config.batch_size),
                                           seed=int(config.seed), buckets=self.buckets)
        self.data_report = {
            "task": self.task.spec, "examples": {s: len(f) for s, f in self.features.items()},
            "truncated": {s: f.truncated for s, f in self.features.items()},
            "dropped_empty": dict(data.dropped), "skipped_corrupt": dict(data.skipped),
            "max_length": max_length, "length_buckets": list(data_lib.length_buckets(max_length, self.buckets)),
        }
        for s, n in self.data_report["truncated"].items():
            if n:
                log.warning("%s/%s: %d example(s) truncated to %d tokens", self.task.name, s, n, max_length)
        self.acc_variant = str(config.elimination.acc_variant)
        self.loss_fn = train_lib.make_classification_loss(self.module, self.task.num_labels, self.acc_variant)
        self.input_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids")
                                 if n in loaded.family.dummy_inputs(self.model_config, 1, 8))

    def schedule_length(self, batch) -> int:
        return int(batch["input_ids"].shape[1])

    def forward(self, params, batch, schedule):
        out = self.module.apply({"params": params}, **{k: batch[k] for k in self.input_names},
                                schedule=schedule, acc_variant=self.acc_variant)
        return out.logits

    def _eval_splits(self, include_test: bool) -> list[str]:
        names = list(self.task.dev_splits) + (list(self.task.test_splits) if include_test else [])
        return [s for s in names if s in self.features and self.features[s].has_labels]

    def evaluate(self, trainer, params, speedups: Sequence[float], *, include_test: bool = False) -> list[dict]:
        """Rows {split, speedup, analytic_speedup, schedules, metrics..., primary} per split x speedup."""
        el = self.config.elimination
        rows = []
        for split in self._eval_splits(include_test):
            feats = self.features[split]
            batches = data_lib.EvalBatches(feats, int(self.config.eval_batch_size), buckets=self.buckets)
            for s in speedups:
                outs, flops, scheds = [], FlopCounter(self.model_config), {}
                for batch in batches:
                    t = self.schedule_length(batch)
                    sched, a = train_lib.schedule_at(self.model_config, t, s, bucket=int(el.bucket),
                                                     floor=int(el.floor))
                    scheds[t] = list(sched) if sched else [t] * self.model_config.num_layers
                    outs.append(trainer.eval_outputs(params, {k: batch[k] for k in self.input_names}, sched))
                    flops.add(float(batch["weights"].sum()), t, a)
                preds = batches.restore(outs)
                m = metrics_lib.compute(self.task, preds, feats.labels)
                rows.append({"split": split, "speedup": float(s), "analytic_speedup": flops.speedup,
                             "schedules": {str(k): v for k, v in sorted(scheds.items())}, **m,
                             "primary": metrics_lib.primary(self.task, m)})
        return rows

    def export(self, params, run_dir: Path, extra: dict) -> None:
        ckpt_lib.export_model(run_dir, self.family, self.model_config, params, self.head,
                              tokenizer_from=self.tokenizer_dir,
                              extra={"objective": self.objective, "task": self.task.spec,
                                     "label_names": list(self.task.label_names),
                                     "data": {"max_length": self.max_length,
                                              "length_buckets": list(self.buckets)}, **extra})

    def final_eval(self, trainer, run_dir: Path, speedups: Sequence[float]) -> list[dict]:
        """The exported best model, reloaded from the run folder, on every labelled dev/test split."""
        if not (Path(run_dir) / convert.ACCJAX_META).exists():
            return []
        best = convert.load(run_dir, self.head)
        params = shard_lib.put(best.params, trainer.param_shardings)
        return self.evaluate(trainer, params, speedups, include_test=True)


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
        w = np.zeros(self.batch_size, np.float32)
        w[:len(idx)] = 1.0
        out["weights"] = w
        return out


class Seq2SeqExperiment(_Base):
    objective = "seq2seq"
    head = "lm"
    dev_split = "validation"

    def __init__(self, config):
        super().__init__(config)
        from accjax import prompting, seq2seq
        from accjax.tokenization import Tokenizer

        self.splits = {"train": prompting.load_jsonl(config.train_file),
                       "validation": prompting.load_jsonl(config.dev_file)}
        if config.test_file:
            self.splits["test"] = prompting.load_jsonl(config.test_file)
        if int(config.max_examples) > 0:
            self.splits = {k: v[:int(config.max_examples)] for k, v in self.splits.items()}
        self.labels = [w.strip() for w in str(config.labels).split(",") if w.strip()] or None
        self.primary_name = "accuracy" if self.labels else "token_f1"
        self.task_name = Path(config.train_file).name
        loaded, tok_dir = load_model(config, self.head, None)
        self.loaded, self.tokenizer_dir = loaded, tok_dir
        self.model_config, self.family = loaded.config, loaded.family
        self.module = loaded.module
        self.params = loaded.params
        self.param_specs = param_specs(loaded)
        self.tokenizer = Tokenizer.from_folder(tok_dir)
        self.source_length, self.target_length = int(config.source_length), int(config.target_length)
        self.train = Seq2SeqBatches(self.tokenizer, self.splits["train"], int(config.batch_size),
                                    seed=int(config.seed), source_length=self.source_length,
                                    target_length=self.target_length)
        self.acc_variant = str(config.elimination.acc_variant)
        module, variant = self.module, self.acc_variant

        def loss_fn(params, batch, rng, schedule):
            return seq2seq.seq2seq_loss(module, params, batch, rng, schedule=schedule, acc_variant=variant)

        self.loss_fn = loss_fn
        self.forward = None
        self._predictor = None
        self.data_report = {"task": {"train_file": str(config.train_file), "dev_file": str(config.dev_file),
                                     "test_file": str(config.test_file) or None, "labels": self.labels},
                            "examples": {k: len(v) for k, v in self.splits.items()}}

    def schedule_length(self, batch) -> int:
        return self.source_length

    def _predictor_for(self, params_host):
        from accjax import seq2seq

        if self._predictor is None:
            el = self.config.elimination
            self._predictor = seq2seq.Seq2SeqPredictor(
                self.module, params_host, self.model_config, batch_size=int(self.config.eval_batch_size),
                acc_variant=self.acc_variant, bucket=int(el.bucket), floor=int(el.floor))
        else:  # compiled programs take params as an argument: swap them in, keep the programs
            self._predictor.params = jax.device_put(params_host)
        return self._predictor

    def evaluate(self, trainer, params, speedups: Sequence[float], *, include_test: bool = False,
                 host_params=None) -> list[dict]:
        from accjax import prompting

        pred = self._predictor_for(host_params if host_params is not None else shard_lib.to_host(params))
        rows = []
        for split in ["validation"] + (["test"] if include_test and "test" in self.splits else []):
            res = prompting.evaluate(pred, self.tokenizer, self.splits[split], speedups=list(speedups),
                                     labels=self.labels, max_new_tokens=self.target_length,
                                     max_length=self.source_length)
            for r in res["rows"]:
                m = ({"accuracy": 100 * r["accuracy"]} if self.labels else
                     {"exact_match": 100 * r["exact_match"], "token_f1": 100 * r["token_f1"]})
                rows.append({"split": split, "speedup": float(r["speedup"]),
                             "analytic_speedup": r["analytic_speedup"], **m, "primary": m[self.primary_name]})
        return rows

    def export(self, params, run_dir: Path, extra: dict) -> None:
        ckpt_lib.export_model(run_dir, self.family, self.model_config, params, self.head,
                              tokenizer_from=self.tokenizer_dir,
                              extra={"objective": self.objective, "task": self.data_report["task"], **extra})

    def final_eval(self, trainer, run_dir: Path, speedups: Sequence[float]) -> list[dict]:
        if not (Path(run_dir) / convert.ACCJAX_META).exists():
            return []
        best = convert.load(run_dir, self.head)
        return self.evaluate(trainer, None, speedups, include_test=True, host_params=best.params)


def build(config):
    """The experiment ``config.objective`` names."""
    return {"classification": ClassificationExperiment, "seq2seq": Seq2SeqExperiment}[config.objective](config)


# ------------------------------------------------------------------- run-folder evaluation
def evaluate_run(run_dir: str | Path, *, splits: Sequence[str] | None = None,
                 speedups: Sequence[float] | None = None, batch_size: int | None = None,
                 data_dir: str | None = None) -> list[dict]:
    """Scores a classification run folder's exported model through ``inference.Predictor``.

    Everything comes from the folder: weights, model config and tokenizer (``convert.load``),
    the task and the data settings (``accjax.json``'s ``task`` and ``train_config``). Batches
    are the same length-sorted ``EvalBatches`` the training loop evaluates, so the speedups
    map to the same schedules per length bucket (clamped to the bucket's maximum).

    Args:
      splits: default every labelled dev and test split.
      speedups: default the run's ``eval.speedups``.
      batch_size: default the run's ``eval_batch_size``.
      data_dir: where the task's files are, if not where training read them.
    Returns:
      rows {split, speedup, analytic_speedup, schedules, metrics..., primary, seconds}.
    """
    import time

    from accjax.inference import Predictor
    from accjax.tokenization import Tokenizer

    meta = ckpt_lib.read_run_meta(run_dir)
    if meta.get("objective", "classification") != "classification":
        raise ValueError(f"{run_dir} holds a {meta['objective']} model; evaluate_run scores classifiers")
    tc = meta["train_config"]
    loaded = convert.load(run_dir, "sequence_classification")
    data = data_lib.load_task(meta["task"], runfolder.recorded_data_dir(meta, data_dir),
                              max_examples=_none_if_empty(int(tc.get("max_examples") or 0)))
    task = data.task
    tok = Tokenizer.from_folder(run_dir)
    max_length = int(meta["data"]["max_length"])
    buckets = tuple(meta["data"]["length_buckets"])
    el = tc["elimination"]
    pred = Predictor.from_loaded(loaded, batch_size=batch_size or int(tc["eval_batch_size"]),
                                 length_buckets=data_lib.length_buckets(max_length, buckets),
                                 acc_variant=el.get("acc_variant", "plain"), bucket=int(el["bucket"]),
                                 floor=int(el["floor"]))
    speedups = [float(s) for s in (speedups or tc["eval"]["speedups"])]
    wanted = splits or [s for s in (*task.dev_splits, *task.test_splits) if s in data]
    rows = []
    for split in wanted:
        if split not in data:
            raise ValueError(f"task {task.name} has no split {split!r}; it has {list(data)}")
        feats = data_lib.encode(data[split], tok, regression=task.is_regression, max_length=max_length,
                                name=f"{task.name}/{split}")
        if not feats.has_labels:
            log.warning("%s/%s is unlabelled: skipped", task.name, split)
            continue
        batches = data_lib.EvalBatches(feats, pred.batch_size, buckets=buckets)
        for s in speedups:
            t0 = time.perf_counter()
            outs, flops, scheds = [], FlopCounter(loaded.config), {}
            for batch in batches:
                t = batch["input_ids"].shape[1]
                sched, a = train_lib.schedule_at(loaded.config, t, s, bucket=int(el["bucket"]),
                                                 floor=int(el["floor"]))
                sched = sched or (t,) * loaded.config.num_layers
                scheds[t] = list(sched)
                outs.append(pred.predict(batch, speedup=sched))
                flops.add(float(batch["weights"].sum()), t, a)
            m = metrics_lib.compute(task, batches.restore(outs), feats.labels)
            rows.append({"split": split, "speedup": s, "analytic_speedup": flops.speedup,
                         "schedules": {str(k): v for k, v in sorted(scheds.items())}, **m,
                         "primary": metrics_lib.primary(task, m), "seconds": time.perf_counter() - t0})
    return rows
