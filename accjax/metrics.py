"""GLUE's official metrics, in numpy, reported x100 (as the GLUE leaderboard does).

``compute(task, predictions, labels)`` returns ``{metric: value}`` for the task's official
metrics, every value multiplied by 100 (accuracy 83.2, MCC 55.1, Spearman 88.0);
``primary(task, metrics)`` picks the one model selection maximises. MNLI's matched and
mismatched accuracies are two calls, one per dev split (``task.dev_splits``).

Definitions (checked against scikit-learn and scipy in tests/test_metrics.py):

  * accuracy = mean(pred == label)
  * f1 = 2 TP / (2 TP + FP + FN) for class 1; 0 when there is no true and no predicted
    positive (scikit-learn's ``zero_division=0``)
  * mcc: Matthews correlation from the confusion matrix (multiclass form, as
    ``sklearn.metrics.matthews_corrcoef``); 0 when undefined (a constant prediction or label)
  * pearson: the sample correlation coefficient
  * spearman: pearson of the ranks, ties sharing their average rank (``scipy.stats.rankdata``)
  * pearson and spearman are 0 when undefined (a constant input), where scipy returns NaN:
    a NaN would poison max()-based model selection.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from accjax.tasks import Task


def accuracy(predictions, labels) -> float:
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y)) if len(y) else 0.0


def f1(predictions, labels, positive: int = 1) -> float:
    """F1 score of class ``positive``."""
    p, y = _pair(predictions, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation coefficient (binary or multiclass)."""
    p, y = _pair(predictions, labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k, n = len(classes), len(y)
    cm = np.zeros((k, k), np.float64)  # [true, predicted]
    np.add.at(cm, (inv[:n], inv[n:]), 1)
    t, q = cm.sum(1), cm.sum(0)  # true, predicted count per class
    c, s = np.trace(cm), cm.sum()
    denom = np.sqrt((s * s - t @ t) * (s * s - q @ q))
    return float((c * s - t @ q) / denom) if denom else 0.0


def pearson(predictions, labels) -> float:
    x, y = _pair(predictions, labels, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0  # undefined; checked exactly, as x - mean of a constant need not be 0
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(np.clip((x @ y) / denom, -1.0, 1.0)) if denom else 0.0


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (scipy's 'average' method)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # start of each run of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(predictions, labels) -> float:
    x, y = _pair(predictions, labels, dtype=np.float64)
    return pearson(rankdata(x), rankdata(y))


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def predicted_labels(task: Task, predictions) -> np.ndarray:
    """Model outputs -> what the metrics compare: class ids [N], or scores [N] (regression).

    Args:
      predictions: class ids [N]; logits [N, C] (argmax taken); regression scores [N] or [N, 1].
    """
    p = np.asarray(predictions)
    if task.is_regression:
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        if p.ndim != 1:
            raise ValueError(f"regression predictions must be [N] or [N, 1], not {p.shape}")
        return p.astype(np.float64)
    if p.ndim == 2:
        return p.argmax(-1)
    if p.ndim != 1:
        raise ValueError(f"predictions must be class ids [N] or logits [N, C], not {p.shape}")
    if p.dtype.kind == "f" and not np.all(p == np.round(p)):
        raise ValueError("classification predictions are floats that are not class ids; "
                         "pass logits [N, C] or integer ids [N]")
    return p.astype(np.int64)


def compute(task: Task, predictions, labels) -> dict[str, float]:
    """``{metric name: 100 * value}`` of ``task.metrics``, in order, for predictions (class
    ids [N], logits [N, C] or regression scores [N] / [N, 1]) against [N] gold labels
    (unlabelled rows, -1 / NaN, are an error)."""
    p = predicted_labels(task, predictions)
    y = np.asarray(labels)
    if task.is_regression:
        y = y.astype(np.float64)
        if np.isnan(y).any():
            raise ValueError("labels contain NaN (unlabelled examples cannot be scored)")
    else:
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise ValueError("classification labels must be class ids")
        y = y.astype(np.int64)
        if (y < 0).any():
            raise ValueError("labels contain -1 (unlabelled examples cannot be scored)")
    return {name: 100.0 * METRICS[name](p, y) for name in task.metrics}


def primary(task: Task, metrics: dict[str, float]) -> float:
    """The value model selection maximises (``task.primary_metric``)."""
    if task.primary_metric not in metrics:
        raise KeyError(f"no {task.primary_metric!r} among the metrics {sorted(metrics)}")
    return metrics[task.primary_metric]


def _pair(a, b, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype).reshape(-1), np.asarray(b, dtype).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape[0]} predictions for {b.shape[0]} labels")
    return a, b
