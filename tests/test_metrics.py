"""Our numpy metrics agree with scikit-learn and scipy, degenerate cases included."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from accjax import metrics as M
from accjax.tasks import get_task


def _cases(seed=0, n_cases=30):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        n = int(rng.integers(1, 200))
        k = int(rng.integers(2, 4))
        yield rng.integers(0, k, n), rng.integers(0, k, n)


def test_classification_metrics_match_sklearn():
    for y, p in _cases():
        assert M.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
        assert M.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)
        yb, pb = (y == 1).astype(int), (p == 1).astype(int)
        assert M.f1(pb, yb) == pytest.approx(skm.f1_score(yb, pb, zero_division=0.0), abs=1e-12)
        assert M.matthews_corrcoef(pb, yb) == pytest.approx(skm.matthews_corrcoef(yb, pb), abs=1e-12)


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(3, 300))
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        # STS-B gold scores come in steps of 0.2: many ties; rounded predictions tie too
        y_t = np.round(np.clip(y + 2.5, 0, 5) * 5) / 5
        x_t = np.round(x, 1)
        for a, b in ((x, y), (x_t, y_t)):
            assert M.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-10)
            assert M.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-10)
    v = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 3.0])
    assert np.array_equal(M.rankdata(v), stats.rankdata(v))


def test_degenerate_cases():
    y = np.array([0, 1, 1, 0, 1])
    zeros = np.zeros_like(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert M.matthews_corrcoef(zeros, y) == 0.0 == skm.matthews_corrcoef(y, zeros)
        assert M.f1(zeros, y) == 0.0 == skm.f1_score(y, zeros, zero_division=0.0)  # none predicted
        assert M.f1(zeros, zeros) == 0.0  # no positive anywhere
        assert M.matthews_corrcoef(y, y) == pytest.approx(1.0)
        assert M.matthews_corrcoef(1 - y, y) == pytest.approx(-1.0)
        # constant input: scipy says NaN, we say 0 (documented)
        c = np.full(5, 0.1)
        assert np.isnan(stats.pearsonr(c, y.astype(float))[0])
        assert M.pearson(c, y) == 0.0 and M.spearman(c, y) == 0.0
    with pytest.raises(ValueError, match="3 predictions for 5 labels"):
        M.accuracy(y[:3], y)


def test_compute_uses_official_metrics_x100():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 101)
    logits = rng.normal(size=(101, 2))
    p = logits.argmax(1)
    m = M.compute(get_task("mrpc"), logits, y)
    assert list(m) == ["accuracy", "f1"]
    assert m["accuracy"] == pytest.approx(100 * skm.accuracy_score(y, p))
    assert m["f1"] == pytest.approx(100 * skm.f1_score(y, p))
    assert M.primary(get_task("mrpc"), m) == m["f1"]
    assert M.compute(get_task("cola"), p, y) == {"mcc": pytest.approx(100 * skm.matthews_corrcoef(y, p))}
    assert M.compute(get_task("mnli"), rng.normal(size=(101, 3)), rng.integers(0, 3, 101)).keys() == {"accuracy"}
    s = rng.uniform(0, 5, 101)
    g = np.round(s + rng.normal(size=101), 1)
    r = M.compute(get_task("stsb"), s[:, None], g)  # [N, 1] regression output
    assert r == {"pearson": pytest.approx(100 * stats.pearsonr(s, g)[0]),
                 "spearman": pytest.approx(100 * stats.spearmanr(s, g)[0])}
    assert M.primary(get_task("stsb"), r) == r["spearman"]


def test_compute_refuses_unlabelled_and_ambiguous_inputs():
    with pytest.raises(ValueError, match="unlabelled"):
        M.compute(get_task("sst2"), np.array([0, 1]), np.array([1, -1]))
    with pytest.raises(ValueError, match="unlabelled"):
        M.compute(get_task("stsb"), np.array([0.5, 1.0]), np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="not class ids"):
        M.compute(get_task("sst2"), np.array([0.3, 0.9]), np.array([0, 1]))
    with pytest.raises(KeyError, match="no 'f1'"):
        M.primary(get_task("qqp"), {"accuracy": 90.0})
