"""Evaluation of a fine-tuned classifier at several speedups: metrics, analytic and measured
speedups side by side, offline-tuning, and the embedded default model.

``evaluate`` scores a run folder (written by ``train.finetune``) on a task's splits, dense
first, then each speedup (``score_splits`` says what is timed and how). A speedup above what
a length bucket permits runs at that bucket's maximum; the row says so (``clamped``).

Offline-tuning (``offline_tune``) sweeps the levels on the dev split with no training and
writes its table beside the checkpoint; ``pick_level`` and ``pick_program`` choose from it.

``score_splits`` is the one classifier evaluation: training's dev evaluation
(``experiment``), ``evaluate`` (``eval.glue``, ``train.evaluate``) and ``offline_tune`` all
call it, and ``format_table`` prints all of their rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from accjax import benchmark
from accjax import checkpoint as ckpt_lib
from accjax import convert
from accjax import data as data_lib
from accjax import metrics as metrics_lib
from accjax import models, programs
from accjax import schedule as sched_lib
from accjax import search as search_lib
from accjax import tasks as tasks_lib

log = logging.getLogger(__name__)

TUNE_FILE = "offline_tune"


class EvalError(ValueError):
    """User-facing evaluation error (bad task, checkpoint, speedup, path)."""


# ------------------------------------------------------------------------- a run folder
@dataclasses.dataclass
class RunModel:
    """A classifier run folder, loaded: model, tokenizer, task and data settings."""

    folder: Path
    meta: dict
    loaded: convert.Loaded
    tokenizer: Any
    max_length: int
    buckets: tuple[int, ...]
    bucket: int
    floor: int
    acc_variant: str
    data_dir: str | None = None  # where training read the task's files
    max_examples: int | None = None  # training's cap on each split (quick runs)
    eval_batch_size: int = 64
    eval_speedups: tuple[float, ...] = (1.0,)
    prune_every: int = 1  # the stride training planned with (schedule.plan): scoring's default

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "RunModel":
        from accjax.tokenization import Tokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise EvalError(f"checkpoint folder {folder} does not exist")
        if not (folder / convert.ACCJAX_META).exists():
            raise EvalError(f"{folder} holds no accjax model ({convert.ACCJAX_META}); pass a run "
                            "folder written by train.finetune (or convert an HF checkpoint first)")
        meta = convert.read_meta(folder)
        if meta.get("head") != "sequence_classification" or meta.get("objective", "classification") != "classification":
            raise EvalError(
                f"{folder} holds a {meta.get('family')} model with head {meta.get('head')!r}; "
                "eval.glue scores sequence classifiers (for T5 text-to-text use eval.prompting)")
        try:
            loaded = convert.load(folder, "sequence_classification")
        except convert.CheckpointError as e:
            raise EvalError(str(e)) from None
        tc = meta.get("train_config", {})
        el = tc.get("elimination", {})
        data = meta.get("data", {})
        max_length = int(data.get("max_length", tc.get("max_length", 128)))
        buckets = tuple(data.get("length_buckets", tc.get("length_buckets", (32, 64, 128, 256, 512))))
        return cls(folder, meta, loaded, Tokenizer.from_folder(folder), max_length,
                   data_lib.length_buckets(max_length, buckets), int(el.get("bucket", 8)),
                   int(el.get("floor", 1)), el.get("acc_variant", "plain"),
                   data_dir=tc.get("data_dir") or None, max_examples=int(tc.get("max_examples") or 0) or None,
                   eval_batch_size=int(tc.get("eval_batch_size", 64)),
                   eval_speedups=tuple(float(x) for x in tc.get("eval", {}).get("speedups", (1.0,))),
                   prune_every=int(el.get("prune_every", 1)))

    @property
    def task_spec(self) -> str | None:
        return self.meta.get("task")

    def predictor(self, batch_size: int, *, max_drop: float | None = None, prune_every: int | None = None,
                  floor: int | None = None):
        """A ``Predictor`` planning with ``prune_every`` and ``floor`` (default: the run's); with
        ``max_drop``, one whose ``predict(batch)`` runs the fastest program measured for the
        batch's size and length within that dev drop, at its level, stride and floor (only
        ``prune_every``'s and ``floor``'s when given)
        and the searched schedules of the offline-tuning table beside the run (``pick_program``)."""
        from accjax.inference import Predictor

        table, pick = None, None
        if max_drop is not None:
            table = read_tune(self.folder)
            if not (table or {}).get("latency"):
                raise EvalError(f"no latency per batch size beside {self.folder}: run python -m "
                                f"eval.offline_tune --checkpoint {self.folder} --batch_sizes 1,8,64 first")
            # a bad bound or a stride the table lacks fails here, not mid-serving
            pick_program(table, max_drop, 1, min(self.buckets), prune_every=prune_every, floor=floor)
            pick = functools.partial(pick_program, table, max_drop, prune_every=prune_every, floor=floor)
        return Predictor.from_loaded(self.loaded, batch_size=batch_size, length_buckets=self.buckets,
                                     acc_variant=self.acc_variant, bucket=self.bucket,
                                     floor=self.floor if floor is None else floor,
                                     searched=searched(table, (table or {}).get("task")), pick=pick,
                                     prune_every=self.prune_every if prune_every is None else prune_every)

    def resolve_task(self, task: str | None) -> tasks_lib.Task:
        """The task to score: the checkpoint's own, or one with the same label count (a file
        task's label count is known only once its data is read: ``check_labels`` then)."""
        try:
            t = tasks_lib.get_task(task or self.task_spec)
        except (KeyError, ValueError) as e:
            raise EvalError(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from None
        return self.check_labels(t) if t.num_labels is not None else t

    def check_labels(self, t: tasks_lib.Task) -> tasks_lib.Task:
        if t.num_labels != self.loaded.config.num_labels:
            raise EvalError(
                f"checkpoint {self.folder} was fine-tuned for {self.task_spec!r} with "
                f"{self.loaded.config.num_labels} label(s); task {t.name!r} has {t.num_labels}: "
                "pass a checkpoint fine-tuned for this task")
        return t


# ---------------------------------------------------------------------------- scoring
# (batch [B, T] numpy, plan) -> outputs [B, ...] numpy; and what compiles that program ahead.
RunFn = Callable[[dict, sched_lib.Plan], np.ndarray]


def score_splits(task: tasks_lib.Task, features: dict[str, Any], run: RunFn, *, cost: sched_lib.CostModel,
                 speedups: Sequence[float], batch_size: int, buckets: Sequence[int], bucket: int = 8,
                 floor: int | Sequence[int] = 1, compile: Callable[[sched_lib.Plan, dict], Any] | None = None,
                 baseline: bool = False, progress: bool = False, repeats: int = 0,
                 schedules: dict[tuple[float, int], Sequence[int]] | None = None,
                 prune_every: int | Sequence[int] = 1) -> list[dict]:
    """THE classifier evaluation: every split x speedup (x stride), one row each.

    Each pass compiles what it needs first (``compile``; compilation is never timed), then
    runs every length-bucketed batch at ``schedule.plan(cost, length, speedup)``:

        analytic speedup = dense FLOPs / FLOPs run   (every example at its padded length)
        measured speedup = dense seconds / seconds   (same data, same run; needs a dense row)

    With ``repeats`` R > 0 the scoring pass is the warm-up, and ``TIMED_BATCHES`` of the
    split's batches are then timed R more times with every level interleaved (dense, 2x, 4.8x,
    dense, 2x, ...): ``measured`` is the median of the R paired ratios and ``measured_min`` /
    ``measured_max`` their spread, so a level is never judged by one pass or by a pass that
    paid for warm-up. Without repeats (training's dev evaluation) nothing is timed and the rows
    carry no measured speedup.

    Args:
      features: split -> labelled ``data.Features``.
      run: runs one batch at one plan (a ``Predictor``, or the trainer's sharded eval step).
      baseline: add a dense pass (marked ``baseline``) when 1 is not among ``speedups``.
      schedules: (speedup, padded length) -> keep-lengths searched for it (``searched``);
        the other pairs run ``schedule.plan``'s decay. A row's ``source`` says which ran.
      prune_every: the stride k of ``schedule.plan``, or several: each level is then scored
        at each (one row per level and stride; dense, which drops nothing, once, as k = 1).
      floor: the smallest keep-length (``schedule.plan``'s ``floor``), or several: each level
        and stride is then scored at each (dense once, at the first); a floor that leaves a
        level's keep-lengths as the first floor's is not scored again.
    Returns:
      rows {task, split, speedup, prune_every, analytic_speedup, measured_speedup, metrics..., primary,
      drop (vs dense), examples_per_s, ms_per_batch, seconds (of a timed pass of
      ``timed_batches`` batches), examples, batch_size,
      truncated, schedules (per length), source ('dense', 'decay' or 'searched'), clamped
      (length -> its maximum speedup)}.
    """
    speedups = list(dict.fromkeys(float(s) for s in speedups))  # a repeated speedup is scored once
    # dense first (added with ``baseline``): the other rows are measured against it
    fl = floors(floor)
    levels = ([(1.0, 1, fl[0])] if baseline or 1.0 in speedups else []) + [
        (s, k, f) for k in strides(prune_every) for f in fl for s in speedups if s != 1.0]
    rows = []
    for split, feats in features.items():
        batches = data_lib.EvalBatches(feats, batch_size, buckets=buckets)
        items = [batches.batch(k) for k in range(len(batches))]
        split_rows, first = [], {}
        for s, k, f in levels:
            plans = [sched_lib.plan(cost, b["input_ids"].shape[1], s, bucket=bucket, floor=f,
                                    searched=schedules, prune_every=k) for b in items]
            if first.setdefault((s, k), plans) is not plans and plans == first[s, k]:
                continue  # this floor changes no keep-length of the level: scored once
            if compile is not None:
                for p, b in {p: b for b, p in zip(items, plans)}.items():
                    compile(p, b)
            it = zip(items, plans)
            if progress:
                it = tqdm(list(it), desc=f"{task.name}/{split} x{s:g}" + (f" k={k}" if k > 1 else "")
                          + (f" F={f}" if len(fl) > 1 else ""),
                          leave=False, unit="batch",
                          disable=False)  # None would hide it when piped
            outs = [run(b, p) for b, p in it]
            m = metrics_lib.compute(task, batches.restore(outs), feats.labels)
            n = [float(b["weights"].sum()) for b in items]
            flops = [w * cost.total(p.length, (p.length,) * cost.num_layers) for w, p in zip(n, plans)]
            row = {"task": task.name, "split": split, "speedup": s, "prune_every": k, "floor": f,
                   "analytic_speedup": sum(flops) / sum(f / p.analytic for f, p in zip(flops, plans)),
                   **m, "primary": metrics_lib.primary(task, m),
                   "examples": len(feats), "batch_size": batch_size, "truncated": feats.truncated,
                   "schedules": {str(p.length): list(p.keep) for p in sorted(set(plans), key=lambda p: p.length)},
                   "source": _source(plans),
                   "clamped": {str(p.length): round(sched_lib.max_speedup(cost, p.length, bucket=bucket, floor=f), 2)
                               for p in sorted(set(plans), key=lambda p: p.length) if p.clamped_from}}
            if s not in speedups:
                row["baseline"] = True  # dense row added for the comparison
            split_rows.append((row, plans))
        if levels[0][0] == 1.0:
            for row, _ in split_rows:
                row["drop"] = split_rows[0][0]["primary"] - row["primary"]
        if repeats > 0:
            _time_interleaved(split_rows, items, run, repeats, with_dense=levels[0][0] == 1.0)
        rows += [r for r, _ in split_rows]
    return rows


def _source(plans: Sequence[sched_lib.Plan]) -> str:
    return "searched" if any(p.searched for p in plans) else "dense" if all(p.dense for p in plans) else "decay"


TIMED_BATCHES = 8  # a timed pass runs this many of a split's batches (all when it has fewer)


def _time_interleaved(split_rows: list, items: list[dict], run: RunFn, repeats: int, with_dense: bool):
    """Times every level's pass ``repeats`` times, levels interleaved; fills the rows' timing.

    A timed pass runs ``TIMED_BATCHES`` of the split's batches, evenly spread over their
    length-sorted order so that each padded length has its share: a median of paired passes
    needs no more, and the scoring pass has already run every batch."""
    pick = np.unique(np.linspace(0, len(items) - 1, min(TIMED_BATCHES, len(items))).round().astype(int))
    timed = [items[k] for k in pick]
    examples = sum(float(b["weights"].sum()) for b in timed)

    def one_pass(plans):
        return lambda: [run(items[k], plans[k]) for k in pick]  # numpy outputs: synchronised

    ms = programs.time_interleaved({i: one_pass(plans) for i, (_, plans) in enumerate(split_rows)},
                                   rounds=repeats, warmup=0)  # the scoring pass was the warm-up
    for i, (row, _) in enumerate(split_rows):
        secs = [t / 1e3 for t in ms[i]]
        med = float(np.median(secs))
        row.update(seconds=med, examples_per_s=examples / med, ms_per_batch=1e3 * med / len(timed),
                   seconds_min=min(secs), seconds_max=max(secs), timed_batches=len(timed))
        if with_dense:
            ratios = programs.paired_ratios(ms[0], ms[i])
            row.update(measured_speedup=float(np.median(ratios)), measured_min=float(ratios.min()),
                       measured_max=float(ratios.max()))


def evaluate(run: RunModel, *, task: str | None = None, splits: Sequence[str] | None = None,
             speedups: Sequence[float] | None = None, batch_size: int | None = None,
             data_dir: str | None = None, progress: bool = True, include_test: bool = False,
             repeats: int = 5, schedules: dict | None = None, predictor=None,
             prune_every: int | Sequence[int] | None = None,
             floor: int | Sequence[int] | None = None) -> list[dict]:
    """Scores ``run`` on ``task`` (default its own) through a ``Predictor``, with dense timed
    in the same run (``score_splits``). Defaults come from the run folder: its eval speedups,
    eval batch size, dev splits (and test splits with ``include_test``; unlabelled ones are
    skipped), where training read its data, and the schedules ``eval.offline_tune --search``
    stored beside it for this task (``schedules`` overrides them; ``{}``: the decay);
    ``prune_every`` k > 1 decays by dropping rows only in every k-th layer (``schedule.plan``,
    which runs the searched schedules at k = 1 only; default: the run's, or ``predictor``'s);
    several strides score each level at each. ``floor``: the smallest keep-length (default the
    run's), or several, each level and stride scored at each."""
    t, feats = features(run, task, splits, data_dir, include_test)
    if schedules is None:  # the schedules searched beside the run
        schedules = searched(read_tune(run.folder), t.name)
    several = None if prune_every is None or isinstance(prune_every, int) else strides(prune_every)
    pred = predictor or run.predictor(batch_size or run.eval_batch_size,
                                      prune_every=several[0] if several else prune_every)
    return score_splits(
        t, feats, lambda b, p: pred.predict(b, schedule=p.keep), cost=pred.cost,
        speedups=speedups or run.eval_speedups, batch_size=pred.batch_size, buckets=run.buckets,
        bucket=run.bucket, floor=run.floor if floor is None else floor,
        compile=lambda p, b: pred.program(pred.batch_size, p),
        baseline=True, progress=progress, repeats=repeats, schedules=schedules,
        prune_every=several or pred.prune_every)


def features(run: RunModel, task: str | None, splits: Sequence[str] | None, data_dir: str | None,
             include_test: bool = False) -> tuple[tasks_lib.Task, dict]:
    """(task, split -> labelled features) that ``evaluate`` scores: only the splits named, or
    the dev splits (and the test splits with ``include_test``)."""
    t = run.resolve_task(task)
    try:
        data = data_lib.load_task(t, data_dir or run.data_dir, max_examples=run.max_examples if task is None else None,
                                  splits=tuple(splits or (*t.dev_splits, *(t.test_splits if include_test else ()))))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise EvalError(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from None
    t = run.check_labels(data.task)
    wanted = list(splits) if splits else [  # MNLI: matched and mismatched
        s for s in (*t.dev_splits, *(t.test_splits if include_test else ())) if s in data]
    for split in wanted:
        if split not in data:
            raise EvalError(f"task {t.name} has no split {split!r}; it has {list(data)}")
    feats = {split: data_lib.encode(data[split], run.tokenizer, regression=t.is_regression,
                                    max_length=run.max_length, name=f"{t.name}/{split}") for split in wanted}
    for split in [s for s, f in feats.items() if not f.has_labels]:
        if splits:
            raise EvalError(f"{t.name}/{split} has no labels to score; choose a labelled split")
        log.warning("%s/%s is unlabelled: skipped", t.name, split)
        del feats[split]
    return t, feats


def evaluate_folder(run_dir: str | os.PathLike, *, splits: Sequence[str] | None = None,
                    speedups: Sequence[float] | None = None, batch_size: int | None = None,
                    data_dir: str | None = None) -> list[dict]:
    """``evaluate`` on a run folder's own task, every labelled dev and test split by default."""
    return evaluate(RunModel.load(run_dir), splits=splits, speedups=speedups, batch_size=batch_size,
                    data_dir=data_dir, progress=False, include_test=True)


_TABLE_FIELDS = {"slower", "source", "decay_primary", "task", "split", "speedup", "prune_every", "floor",
                 "analytic_speedup",
                 "measured_speedup", "measured_min", "measured_max", "primary", "drop", "examples_per_s",
                 "ms_per_batch", "seconds", "seconds_min", "seconds_max", "examples", "batch_size",
                 "truncated", "schedules", "clamped", "baseline", "timed_batches"}


def _spread(r: dict) -> str:
    return f"{r['measured_min']:.2f}-{r['measured_max']:.2f}" if "measured_min" in r else "-"


def format_table(rows: list[dict]) -> str:
    """One fixed-width table for every evaluation row (training, eval.glue, train.evaluate)."""
    if not rows:
        return "(nothing scored)"
    metric_keys = [k for k in rows[0] if k not in _TABLE_FIELDS]
    cols = [("measured_speedup", "measured", 9, ".2f")] + [(k, k, 11, ".2f") for k in metric_keys] + [
        ("drop", "drop", 7, ".2f"), ("examples_per_s", "ex/s", 9, ".0f"),
        ("ms_per_batch", "ms/batch", 9, ".1f")]
    sw = max(10, 1 + max(len(_label(r)) for r in rows))  # a stride and a floor lengthen the label
    head = (f"{'task':<12}{'split':<22}{'speedup':>8}{'analytic':>9}{'schedule':>{sw}}"
            + "".join(f"{h:>{w}}" for _, h, w, _ in cols) + f"{'measured range':>16}  keep")
    lines = [head, "-" * len(head)]
    for r in rows:
        keep = " ".join(f"{k}:{','.join(map(str, v))}" for k, v in r.get("schedules", {}).items())
        note = "".join(f" (len {k}: max {v})" for k, v in r.get("clamped", {}).items())
        lines.append(f"{r['task']:<12}{r['split']:<22}{r['speedup']:>8g}{r['analytic_speedup']:>9.2f}"
                     f"{_label(r):>{sw}}"
                     + "".join(f"{r[k]:>{w}{f}}" if k in r else f"{'-':>{w}}" for k, _, w, f in cols)
                     + f"{_spread(r):>16}  {keep}{note}")
    if "measured_speedup" in rows[0]:
        sizes = " or ".join(map(str, sorted({r["batch_size"] for r in rows})))
        lines.append(f"ms/batch: per batch of {sizes} examples; drop: the dense row's primary metric minus "
                     "this row's, in points; measured: dense time / this row's, median (range) of "
                     "interleaved passes; keep: rows kept per layer, by padded length; schedule: "
                     "'searched' on dev by eval.offline_tune --search, or the one-ratio 'decay'"
                     + ("; k=K: rows dropped only in layers 1, 1 + K, ... (prune_every)"
                        if any(_every(r) > 1 for r in rows) else "")
                     + ("; F=N: no layer keeps fewer than N rows (floor)"
                        if any("F=" in _label(r) for r in rows) else ""))
    return "\n".join(lines)


def _every(r: dict) -> int:
    """A row's stride (``prune_every``; 1 in rows that predate it)."""
    return int(r.get("prune_every", 1))


def _floor(r: dict) -> int | None:
    """A row's smallest keep-length (``floor``; None in rows that predate it: the run's)."""
    return r.get("floor")


def _shape(r: dict) -> tuple[int, int | None]:
    """(stride, floor): what besides its level sets a row's keep-lengths."""
    return _every(r), _floor(r)


def _label(r: dict) -> str:
    return r.get("source", "-") + (f" k={_every(r)}" if _every(r) > 1 else "") + (
        f" F={_floor(r)}" if (_floor(r) or 1) > 1 and r["speedup"] != 1 else "")


# ----------------------------------------------------------------------- offline-tuning
def offline_tune(run: RunModel, *, speedups: Sequence[float] | None = None, batch_size: int = 64,
                 data_dir: str | None = None, split: str | None = None, progress: bool = True,
                 out_dir: str | os.PathLike | None = None, repeats: int = 5, search: int = 0,
                 batch_sizes: Sequence[int] = (), prune_every: int | Sequence[int] | None = None,
                 floor: int | Sequence[int] | None = None) -> dict:
    """Sweeps speedups on the dev split; writes the table and plot beside the checkpoint.

    Every level is planned with ``prune_every`` (default: the run's), or with each of several
    strides (one row per level and stride, all timed against the same dense passes); the
    table stores them (``strides``) and the picks choose among them. The search explores
    every layer's keep-length, so its schedules run at k = 1 only, which must be among them.

    With ``search`` N > 0, first searches N schedules per (level, length bucket) on the dev
    split (``accjax.search``); the levels are then run and timed at the winners, which the
    table stores under ``schedules`` (level -> length -> keep) for ``evaluate`` to run.

    With ``batch_sizes``, every level's program is also timed per (batch size, length bucket
    of the dev rows) on random full-length inputs, levels interleaved (``latency`` rows, keyed
    by device too; ``RunModel.predictor(max_drop=...)`` picks from them).

    A level measured no faster than a less aggressive one is flagged (``slower``; in the
    latency rows, at that batch size and length): more rows dropped bought no time on this
    machine, so ``pick_level`` and ``pick_program`` never choose it there. Each stride is
    flagged against its own lower levels (and dense), not against another stride's.

    ``floor`` (default: the run's): the smallest keep-length, or several (``floors``), each
    level and stride scored and timed at each, as strides are; a floor that changes none of a
    level's keep-lengths is not scored twice. The search runs at the first floor, and a level
    with searched schedules runs them at every floor (so it is scored once)."""
    t = run.resolve_task(None)
    split = split or t.dev_split
    levels = list(speedups or ())
    if not levels:  # 1, 1.5, 2, ... up to the shortest bucket's maximum (8 at most), and 4.8 within it
        cost = models.cost_model(run.loaded.config)
        top = min(sched_lib.max_speedup(cost, min(run.buckets), bucket=run.bucket, floor=run.floor), 8.0)
        levels = sorted({*map(float, np.arange(1.0, top + 1e-9, 0.5)), *([4.8] if top >= 4.8 else [])})
    every = strides(run.prune_every if prune_every is None else prune_every)
    fl = floors(run.floor if floor is None else floor)
    if search and 1 not in every:
        k = ",".join(map(str, every))
        raise EvalError(f"--search varies every layer's keep-length, which prune_every {k} fixes: pass "
                        f"--prune_every 1,{k} with --search (searched schedules run at 1), or drop --search")
    pred, found = run.predictor(batch_size, prune_every=1 if search else every[0]), None
    pred.floor = fl[0]
    if search:
        t, feats = features(run, None, [split], data_dir)
        found = search_lib.search(t, feats[split], pred, levels=levels, buckets=run.buckets, budget=search,
                                  log=(lambda m: print(m, file=sys.stderr)) if progress else None)
    schedules = {(s, n): k for s, by_len in (found or {}).get("schedules", {}).items() for n, k in by_len.items()}
    pred.searched = schedules
    rows = evaluate(run, splits=[split], speedups=levels, batch_size=batch_size, data_dir=data_dir,
                    progress=progress, repeats=repeats, schedules=schedules, predictor=pred,
                    prune_every=every, floor=fl)
    decay = {}  # a level's first record scored the decay at every length: its dev metric
    for x in (found or {}).get("records", ()):
        decay.setdefault(x["speedup"], x["decay_primary"])
    for r in rows:
        if r["source"] == "searched":
            r["decay_primary"] = decay[r["speedup"]]
    _flag_slower(rows, "measured_speedup")
    table = {"checkpoint": str(run.folder), "model_sha256": ckpt_lib.model_fingerprint(run.folder),
             "task": t.name, "split": split, "strides": list(every), "floors": list(fl),
             "metric": t.primary_metric, "machine": benchmark.machine(), "repeats": repeats, "rows": rows}
    if programs.SETTLE_MS:  # the levels' timed passes each ran after this long of their own calls
        table["settle_ms"] = programs.SETTLE_MS
    if found is not None:
        table["schedules"] = {f"{s:g}": {str(n): list(k) for n, k in by_len.items()}
                              for s, by_len in found["schedules"].items()}
        table["search"] = {k: found[k] for k in ("budget", "programs", "seconds", "records")}
    if batch_sizes:
        lengths = sorted({int(n) for r in rows for n in r["schedules"]})
        table["latency"] = latency(pred, levels, batch_sizes, lengths, repeats, every, fl)
    out = Path(out_dir) if out_dir else run.folder
    out.mkdir(parents=True, exist_ok=True)
    benchmark.write_json(out / f"{TUNE_FILE}.json", table)
    (out / f"{TUNE_FILE}.md").write_text(tune_markdown(table))
    plot_tune(table, out / f"{TUNE_FILE}.png")
    return table


def latency(pred, speedups: Sequence[float], batch_sizes: Sequence[int], lengths: Sequence[int],
            repeats: int, prune_every: Sequence[int] = (1,), floor: Sequence[int] | int = 1) -> list[dict]:
    """Median (min, max) ms of each (level, stride, floor)'s program per (batch size, length),
    the programs interleaved over ``repeats`` rounds after one warm-up round; ``measured`` =
    dense ms / ms. A floor that leaves a level's keep-lengths as the first floor's is timed once."""
    out, dev, fl = [], benchmark.device_kind(), floors(floor)
    levels = [(1.0, 1, fl[0])] + [(s, k, f) for k in strides(prune_every) for f in fl
                                  for s in sorted(set(speedups) - {1.0})]
    for b in batch_sizes:
        for n in lengths:
            plans = {}
            for s, k, f in levels:
                p = pred.plan(n, s, prune_every=k, floor=f)
                if f == fl[0] or p.keep != plans[s, k, fl[0]].keep:
                    plans[s, k, f] = p
            (inputs,) = pred.random_batches(b, n)[:1]
            calls = {skf: functools.partial(pred.program(b, p), pred.params, inputs) for skf, p in plans.items()}
            ms = programs.time_interleaved(calls, rounds=repeats, warmup=1)
            dense = float(np.median(ms[levels[0]]))
            rows = [{"device": dev, "batch_size": b, "length": n, "speedup": s, "prune_every": k, "floor": f,
                     "keep": list(p.keep), "source": _source([p]), "ms": float(np.median(ms[s, k, f])),
                     "ms_min": min(ms[s, k, f]), "ms_max": max(ms[s, k, f]),
                     "measured": dense / float(np.median(ms[s, k, f]))}
                    for (s, k, f), p in plans.items()]
            out += _flag_slower(rows, "measured")
    return out


def _flag_slower(rows: list[dict], key: str) -> list[dict]:
    """Marks ``slower`` each level no faster (``key``) than a less aggressive one of its
    stride and floor, or dense (which drops nothing, at any)."""
    for r in rows:
        r["slower"] = False
    for shape in {_shape(r) for r in rows if r["speedup"] != 1}:
        best = 0.0
        for r in sorted((r for r in rows if r["speedup"] == 1 or _shape(r) == shape), key=lambda r: r["speedup"]):
            r["slower"] = r["speedup"] > 1 and r[key] <= best
            best = max(best, r[key])
    return rows


def _shape_note(r: dict, every: Sequence[int], fl: Sequence[int | None]) -> str:
    """', k = 2, F = 16' for a level's row in a table of several strides or floors."""
    if r["speedup"] == 1:
        return ""
    return (f", k = {_every(r)}" if len(every) > 1 else "") + (f", F = {_floor(r)}" if len(fl) > 1 else "")


def tune_markdown(table: dict) -> str:
    m, every, fl = table["machine"], strides(table), floors(table)
    k = every[0] if len(every) == 1 and every[0] > 1 else None  # one stride k > 1: said once
    lines = [f"Offline-tuning of `{table['checkpoint']}` on {table['task']}/{table['split']} "
             f"({table['metric']}); latency on {m['device']} ({m['cpu']}, {m['cpu_count']} cores), "
             f"jax {m['jax']}." + (f" Rows dropped only in layers 1, {1 + k}, ... (prune_every {k})." if k else
                                   " Strides k = " + ", ".join(map(str, every)) + ": rows dropped only in layers "
                                   "1, 1 + k, ... (prune_every k; dense drops none)." if len(every) > 1 else "")
             + (" Floors F = " + ", ".join(map(str, fl)) + ": no layer keeps fewer than F rows (a floor that "
                "changes none of a level's keep-lengths is not scored twice)." if len(fl) > 1 else ""), "",
             f"| speedup | analytic | measured (min-max of {table.get('repeats', 5)} interleaved passes"
             + (f", each after {table['settle_ms']:g} ms of its own" if table.get("settle_ms") else "") + ") | "
             f"{table['metric']} | drop | ms / batch of {table['rows'][0]['batch_size']} | schedule | "
             "keep per layer (per length) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        keep = "; ".join(f"{k}: {','.join(map(str, v))}" for k, v in r["schedules"].items())
        flag = " (no faster than a lower level: never picked)" if r.get("slower") else ""
        source = (r.get("source", "decay") + _shape_note(r, every, fl)
                  + (f" (decay {r['decay_primary']:.2f})" if "decay_primary" in r else ""))
        lines.append(f"| {r['speedup']:g} | {r['analytic_speedup']:.2f} | {r['measured_speedup']:.2f} ({_spread(r)}){flag} | "
                     f"{r['primary']:.2f} | {r['drop']:.2f} | {r['ms_per_batch']:.1f} | {source} | {keep} |")
    if "search" in table:
        s = table["search"]
        lines += ["", f"Schedule search on {table['split']} only: up to {s['budget']} schedules per level "
                  f"and length, {s['programs']} programs compiled, {s['seconds']:.0f} s. Dev {table['metric']} "
                  "of the decay and of the best schedule found (the best replaces the decay only when higher):",
                  "", "| speedup | length | decay | dev | best | dev | analytic | scored |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['speedup']:g} | {x['length']} | {','.join(map(str, x['decay_keep']))} | "
                  f"{x['decay_primary']:.2f} | {','.join(map(str, x['best_keep']))} | {x['best_primary']:.2f} | "
                  f"{x['best_analytic']:.2f} | {x['scored']} |" for x in s["records"]]
    if table.get("latency"):
        lines += ["", f"Latency per program on {table['latency'][0]['device']} (random full-length inputs, "
                  f"median of {table.get('repeats', 5)} interleaved rounds):", "",
                  "| batch | length | speedup | schedule | ms (min-max) | measured |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch_size']} | {r['length']} | {r['speedup']:g} | {r['source']}"
                  f"{_shape_note(r, every, fl)} | {r['ms']:.2f} "
                  f"({r['ms_min']:.2f}-{r['ms_max']:.2f}) | {r['measured']:.2f}"
                  f"{' (no faster than a lower level: never picked)' if r['slower'] else ''} |"
                  for r in table["latency"]]
    return "\n".join(lines) + "\n"


def plot_tune(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every, fl = strides(table), floors(table)
    shapes = sorted({_shape(r) for r in table["rows"] if r["speedup"] != 1},
                    key=lambda x: (x[0], x[1] or 0)) or [(1, None)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, (k, f) in enumerate(shapes):  # one pair of curves (one colour) per stride and floor, from dense
        rows = [r for r in table["rows"] if r["speedup"] == 1 or _shape(r) == (k, f)]
        at = (f", prune_every {k}" if len(every) > 1 else "") + (f", floor {f}" if len(fl) > 1 else "")
        ax.plot([r["analytic_speedup"] for r in rows], [r["primary"] for r in rows], "o-", color=f"C{i}",
                label=f"vs analytic speedup{at}")
        ax.plot([r["measured_speedup"] for r in rows], [r["primary"] for r in rows], "s--", color=f"C{i}",
                alpha=0.6, label=f"vs measured speedup ({table['machine']['device']}){at}")
    base = table["rows"][0]["primary"]
    ax.axhline(base, color="gray", lw=0.8, ls=":", label="dense")
    ax.set_xlabel("speedup over the dense model")
    ax.set_ylabel(f"{table['task']} {table['split']} {table['metric']}")
    ax.set_title(f"{Path(table['checkpoint']).name}: offline-tuning (no training)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def read_tune(folder: str | os.PathLike) -> dict | None:
    p = Path(folder) / f"{TUNE_FILE}.json"
    table = json.loads(p.read_text()) if p.exists() else None
    if table is not None and table.get("model_sha256") != ckpt_lib.model_fingerprint(folder):
        print(f"note: {p} was measured on other weights than {folder}'s: not used", file=sys.stderr)
        return None
    if table is not None and "strides" not in table:  # measured before strides: one k for every level
        k = int(table.pop("prune_every", 1))
        table["strides"] = [k]
        for r in [*table["rows"], *table.get("latency", ())]:
            r.setdefault("prune_every", 1 if r["speedup"] == 1 else k)
    return table


def floors(x) -> tuple[int | None, ...]:
    """The floors of an offline-tuning table (None, the run's, in a table that predates
    them), or given as one int or a sequence (``schedule.check_floors``)."""
    if isinstance(x, dict):
        return tuple(x.get("floors") or [None])
    return sched_lib.check_floors(x)


def strides(x) -> tuple[int, ...]:
    """The strides (``prune_every``) of an offline-tuning table, or given as one int or a
    sequence (``schedule.check_strides``)."""
    if isinstance(x, dict):
        x = x.get("strides", [x.get("prune_every", 1)])
    return sched_lib.check_strides(x)


def _at_shape(table: dict, rows: Sequence[dict], prune_every: int | None,
              floor: int | None = None) -> list[dict]:
    """``rows`` of stride ``prune_every`` and floor ``floor`` and the dense ones (all strides or
    floors when None). A level with no row at ``floor`` (that floor changed none of its
    keep-lengths, so it was measured once, at the table's first floor) keeps that row. A stride
    or floor the table was not measured with is refused."""
    if prune_every is not None and prune_every not in strides(table):
        k = ",".join(map(str, strides(table)))
        raise EvalError(f"--max_drop picks from the offline-tuning table of {table['checkpoint']}, measured "
                        f"with prune_every {k}: drop --prune_every, or rerun eval.offline_tune --prune_every "
                        f"{k},{prune_every} first")
    fl = floors(table)
    if floor is not None and floor not in fl:
        f = "at floor " + ",".join(map(str, fl)) if fl != (None,) else "at the run's floor only"
        raise EvalError(f"--max_drop picks from the offline-tuning table of {table['checkpoint']}, measured "
                        f"{f}: drop --floor, or rerun eval.offline_tune --floor "
                        + ",".join(map(str, [x for x in fl if x is not None] + [floor])) + " first")
    rows = [r for r in rows if r["speedup"] == 1 or prune_every is None or _every(r) == prune_every]
    if floor is None:
        return rows

    def key(r):  # a program's identity but for its floor
        return r["speedup"], _every(r), r.get("batch_size"), r.get("length")

    at_floor = {key(r) for r in rows if _floor(r) == floor}
    return [r for r in rows if r["speedup"] == 1 or _floor(r) == floor
            or (_floor(r) == fl[0] and key(r) not in at_floor)]


def searched(table: dict | None, task: str) -> dict[tuple[float, int], tuple[int, ...]]:
    """(speedup, padded length) -> the keep-lengths an offline-tuning table searched for
    ``task`` (``score_splits``'s ``schedules``); empty without a table, a search, or for
    another task than the table's."""
    if not table or table.get("task") != task:
        return {}
    return {(float(s), int(n)): tuple(k) for s, by_len in table.get("schedules", {}).items()
            for n, k in by_len.items()}


def pick_program(table: dict, max_drop: float, examples: int, length: int, *,
                 prune_every: int | None = None, floor: int | None = None) -> tuple[float, int, int, int | None]:
    """(speedup, batch size, stride, floor): the fastest program measured on this device
    (``latency`` rows; ``_fastest``: of the programs whose median lies within the fastest one's
    timings, the most accurate) whose level's dev drop at its stride and floor (None: the
    run's) is at most ``max_drop``, at the nearest
    recorded batch size at or above ``examples`` (else the largest) and the same for
    ``length``; never a level flagged ``slower`` there; only stride ``prune_every`` and floor
    ``floor`` (and dense) when given."""
    dev = benchmark.device_kind()
    here = [r for r in table.get("latency", ()) if r["device"] == dev]
    if not here:
        raise EvalError(f"the offline-tuning table of {table['checkpoint']} holds no latency measured on "
                        f"{dev}: run python -m eval.offline_tune --batch_sizes 1,8,64 on this machine")

    def at_or_above(values, x):
        return next((v for v in sorted(values) if v >= x), max(values))

    b = at_or_above({r["batch_size"] for r in here}, examples)
    n = at_or_above({r["length"] for r in here}, length)
    drop = {(r["speedup"], *_shape(r)): r["drop"] for r in table["rows"]}
    ok = [r for r in _at_shape(table, here, prune_every, floor) if (r["batch_size"], r["length"]) == (b, n)
          and not r["slower"] and drop.get((r["speedup"], *_shape(r)), math.inf) <= max_drop + 1e-9]
    if not ok:  # the dense row has drop 0; only a negative bound leaves nothing
        raise EvalError(f"no level has a dev drop within {max_drop}; the bound must be >= 0")
    best = _fastest(ok, lambda r: drop[r["speedup"], *_shape(r)],
                    lambda r: (r["ms"], -r["speedup"], _every(r), _floor(r) or 1),
                    lambda r: r.get("ms_max", r["ms"]))
    return best["speedup"], b, _every(best), _floor(best)


def pick_level(table: dict, max_drop: float, *, prune_every: int | None = None,
               floor: int | None = None) -> dict:
    """The fastest row, a level at a stride and floor (by measured speedup), whose dev drop is at most
    ``max_drop`` (``_fastest``: of the rows whose median lies within the fastest one's
    interleaved passes, the most accurate); only stride ``prune_every`` and floor ``floor`` (and
    dense) when given."""
    ok = [r for r in _at_shape(table, table["rows"], prune_every, floor)
          if r["drop"] <= max_drop + 1e-9 and not r.get("slower")]
    if not ok:  # the dense row has drop 0; only a negative bound leaves nothing
        raise EvalError(f"no level has a dev drop within {max_drop}; the bound must be >= 0")
    return _fastest(ok, lambda r: r["drop"],
                    lambda r: (-r["measured_speedup"], -r["analytic_speedup"], _every(r), _floor(r) or 1),
                    lambda r: -r.get("measured_min", r["measured_speedup"]))


def _fastest(rows: Sequence[dict], drop, time, slowest) -> dict:
    """The row of least ``time`` (a tuple, its median first), or of the rows whose median lies
    within that row's repeated timings (up to ``slowest``), the one with the smallest dev
    ``drop``: a program not measurably slower than the fastest is worth the accuracy it keeps."""
    best = min(rows, key=time)
    return min((r for r in rows if time(r)[0] <= slowest(best)), key=lambda r: (drop(r), time(r)))
