"""Keep-length schedules searched per task on the dev split (``eval.offline_tune --search``).

``schedule.plan`` gives one shape per speedup: a single geometric decay. Where a task can
afford to lose rows differs (short inputs may need every row in layer 1 and few after it),
so offline-tuning can search, for each speedup level and each length bucket the dev split
uses, among keep-length vectors of the same analytic cost:

  (a) the decay ``plan`` runs without a search (scored first: the baseline),
  (b) hold + decay: the first k layers keep every row (k = 1 .. L-1), or the first layer keeps
      3/4 or 1/2 of them, then one decay ratio solved for the cost (``schedule.decay_after``),
  (c) evolution after the Length-Adaptive Transformer (Kim & Cho 2021): children of the best
      schedules so far, by mutation (layers moved one bucket step) or crossover (each layer
      from either parent), sorted non-increasing and walked back into the cost window.

Every candidate holds bucket values (``schedule.bucket_up``) in [floor, length], is
non-increasing and is never slower than what the level runs without a search: its analytic
speedup lies in ``window``, from the lower of the level and its decay's speedup up to
``1 + WINDOW`` times the level. (A window on both sides let a searched "4.8x" run at 4.70x
and win dev points by keeping more rows: the knob would no longer deliver what it names.)
Its score is the dev split's primary metric with that bucket's batches run at the candidate and every other
bucket at its current choice; outputs are cached per (length, schedule), so a candidate
costs one compiled program and one pass over its own bucket's batches. A winner replaces
the decay only when it scores higher on dev (ties keep the decay). Only the split handed in
(dev) is read. A search compiles at most levels x lengths x budget programs (the decays
included; fewer where a schedule repeats).

Example (MiniLM-L6, length 32, level 3): the decay ``(24, 16, 8, 4, 2, 2)`` against, among
others, hold-1 ``(32, 16, 4, 2, 1, 1)``; the search returns whichever scores higher on dev.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from accjax import data as data_lib
from accjax import metrics as metrics_lib
from accjax import schedule as sched_lib

WINDOW = 0.03  # a candidate's analytic speedup is at most 3% above its level (``window``)


def grid(length: int, bucket: int = 8, floor: int = 1) -> list[int]:
    """The keep-lengths a searched schedule may use at ``length``: 32, bucket 8 -> 1..32 as
    [1, 2, 4, 8, 16, 24, 32]."""
    return sorted({min(length, sched_lib.bucket_up(max(floor, n), bucket)) for n in range(1, length + 1)})


def window(cm: sched_lib.CostModel, length: int, level: float, *, bucket: int = 8,
           floor: int = 1) -> tuple[float, float]:
    """The analytic speedups a candidate at ``level`` may have: from the lower of the level and
    its decay's (``schedule.plan``'s buckets may leave it a little under), to 3% above the level."""
    decay = sched_lib.analytic_speedup(cm, length, sched_lib.plan(cm, length, level, bucket=bucket, floor=floor).keep)
    return min(level, decay) * (1 - 1e-9), level * (1 + WINDOW)


def _inside(cm: sched_lib.CostModel, length: int, keep: Sequence[int], bounds: tuple[float, float]) -> bool:
    return bounds[0] <= sched_lib.analytic_speedup(cm, length, keep) <= bounds[1]


def within(cm: sched_lib.CostModel, length: int, keep: Sequence[int], level: float, *, bucket: int = 8,
           floor: int = 1) -> bool:
    return _inside(cm, length, keep, window(cm, length, level, bucket=bucket, floor=floor))


def shapes(cm: sched_lib.CostModel, length: int, level: float, *, bucket: int = 8,
           floor: int = 1) -> list[tuple[int, ...]]:
    """Candidates (a) then (b) of the module docstring, distinct (the decay first)."""
    out = [sched_lib.plan(cm, length, level, bucket=bucket, floor=floor).keep]
    prefixes = [(length,) * k for k in range(1, cm.num_layers)] + [
        (max(floor, sched_lib.bucket_up(length * f, bucket)),) for f in (0.75, 0.5)]
    out += [k for p in prefixes
            if (k := sched_lib.decay_after(cm, length, level, p, bucket=bucket, floor=floor)) is not None]
    return list(dict.fromkeys(out))


def _into_window(keep: list[int], values: list[int], cm, length: int, bounds: tuple[float, float],
                 rng: np.random.Generator, steps: int = 200) -> tuple[int, ...] | None:
    """A random walk of one-step moves into the cost window ``bounds``: a layer down (and the
    layers after it, to stay non-increasing) while too slow, up (and those before it) while
    too fast."""
    for _ in range(steps):
        if _inside(cm, length, keep, bounds):
            return tuple(keep)
        l = int(rng.integers(len(keep)))
        i = values.index(keep[l]) + (1 if sched_lib.analytic_speedup(cm, length, keep) > bounds[1] else -1)
        if not 0 <= i < len(values):
            continue
        v = keep[l] = values[i]
        keep[:l] = [max(k, v) for k in keep[:l]]
        keep[l + 1:] = [min(k, v) for k in keep[l + 1:]]
    return None


def _child(parents: list[tuple[int, ...]], values: list[int], rng: np.random.Generator) -> list[int]:
    a = parents[int(rng.integers(len(parents)))]
    if len(parents) > 1 and rng.random() < 0.5:  # crossover: each layer from either parent
        b = parents[int(rng.integers(len(parents)))]
        keep = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
    else:  # mutation: each layer one grid step up or down with probability 1/2
        keep = list(a)
        for l in range(len(keep)):
            if rng.random() < 0.5:
                i = values.index(keep[l]) + int(rng.choice((-1, 1)))
                keep[l] = values[min(max(i, 0), len(values) - 1)]
    return sorted(keep, reverse=True)


def candidates(cm: sched_lib.CostModel, length: int, level: float, score: Callable[[tuple], float],
               budget: int, *, bucket: int = 8, floor: int = 1, seed: int = 0,
               parents: int = 4) -> dict[tuple[int, ...], float]:
    """Scores up to ``budget`` distinct schedules (the decay always, then (b), then (c)) with
    ``score``; returns schedule -> score. Children come from the ``parents`` best so far."""
    values = grid(length, bucket, floor)
    scored: dict[tuple[int, ...], float] = {}
    first = shapes(cm, length, level, bucket=bucket, floor=floor)
    bounds = window(cm, length, level, bucket=bucket, floor=floor)
    for keep in first[:1] + [k for k in first[1:] if _inside(cm, length, k, bounds)]:
        if len(scored) < budget:
            scored[keep] = score(keep)
    rng = np.random.default_rng([seed, length, int(round(level * 1000))])
    for _ in range(50 * budget):  # tries: a small space may hold fewer schedules than the budget
        if len(scored) >= budget:
            break
        best = sorted(scored, key=scored.get, reverse=True)[:parents]
        keep = _into_window(_child(best, values, rng), values, cm, length, bounds, rng)
        if keep is not None and keep not in scored:
            scored[keep] = score(keep)
    return scored


def search(task, feats: data_lib.Features, pred, *, levels: Sequence[float], buckets: Sequence[int],
           budget: int, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Searches a schedule per (level, length bucket of ``feats``) on ``feats`` (the dev split).

    Args:
      task: the task (its primary metric is maximised).
      feats: the labelled dev split, tokenised.
      pred: an ``inference.Predictor`` (its batch size, cost model, bucket and floor).
      levels: speedups; 1 (dense) and levels a length cannot reach are left to ``plan``.
      budget: schedules scored per (level, length bucket), the decay included.
    Returns:
      {"schedules": {level: {length: keep}} (only where a schedule beat the decay),
       "records": one per (level, length): decay and best keep, their dev metric and
       analytic speedup, how many were scored; "programs": programs compiled; "seconds"}.
    """
    t0, compiled = time.perf_counter(), pred.programs.compiles
    batches = data_lib.EvalBatches(feats, pred.batch_size, buckets=buckets)
    items = [batches.batch(k) for k in range(len(batches))]
    at: dict[int, list[int]] = {}  # padded length -> its batches' positions
    for i, b in enumerate(items):
        at.setdefault(b["input_ids"].shape[1], []).append(i)
    outputs: dict[tuple, list] = {}

    def metric(choice: dict[int, tuple[int, ...]]) -> float:
        out = [None] * len(items)
        for n, keep in choice.items():
            if (n, keep) not in outputs:
                outputs[n, keep] = [pred.predict(items[i], schedule=keep) for i in at[n]]
            for i, o in zip(at[n], outputs[n, keep]):
                out[i] = o
        return metrics_lib.primary(task, metrics_lib.compute(task, batches.restore(out), feats.labels))

    cm, kw = pred.cost, dict(bucket=pred.bucket, floor=pred.floor)
    found, records = {}, []
    for level in sorted({float(s) for s in levels if s > 1}):
        choice = {n: sched_lib.plan(cm, n, level, **kw).keep for n in at}
        for n in sorted(at):
            if level > sched_lib.max_speedup(cm, n, **kw) * (1 + 1e-9):
                continue  # clamped: this length runs its maximum
            decay = choice[n]
            scored = candidates(cm, n, level, lambda k: metric({**choice, n: k}), budget, seed=seed, **kw)
            best = max(scored, key=lambda k: (scored[k], k == decay))
            if best != decay:
                choice[n] = best
                found.setdefault(level, {})[n] = best
            records.append({"speedup": level, "length": n, "scored": len(scored),
                            **{f"{name}_{f}": v for name, k in (("decay", decay), ("best", best)) for f, v in (
                                ("keep", list(k)), ("primary", scored[k]),
                                ("analytic", sched_lib.analytic_speedup(cm, n, k)))}})
            if log:
                r = records[-1]
                log(f"x{level:g} len {n}: decay {decay} {r['decay_primary']:.2f} -> {best} "
                    f"{r['best_primary']:.2f} ({len(scored)} scored)")
    return {"schedules": found, "records": records, "budget": budget,
            "programs": pred.programs.compiles - compiled, "seconds": time.perf_counter() - t0}
