"""Schedules: accuracy of the speedup solve, bucketing, limits."""

from __future__ import annotations

import math

import pytest

from accjax import models
from accjax import schedule as S

BERT = models.cost_model(models.preset("bert-base-uncased"))


@pytest.mark.parametrize("n", [128, 512])
@pytest.mark.parametrize("s", [1.5, 2, 3, 4, 4.8, 6])
def test_solved_speedup_within_3_percent(n, s):
    top = S.max_speedup(BERT, n)
    assert s <= top  # all of these are reachable for BERT-base at 128 and 512
    sch = S.schedule_for_speedup(BERT, n, s)
    a = S.analytic_speedup(BERT, n, sch)
    assert abs(a / s - 1) <= 0.03, (sch, a)
    # the mismatch is bucketing: every keep-length is a bucket value and one bucket step
    # more or less on the boundary layer moves the speedup to the other side of s
    assert all(k == S.bucket_up(k) for k in sch)
    assert list(sch) == sorted(sch, reverse=True) and min(sch) >= 1


def test_bucketing_explains_the_residual():
    sch = S.schedule_for_speedup(BERT, 128, 3.0)
    a = S.analytic_speedup(BERT, 128, sch)
    # moving any single layer one bucket step changes the speedup by more than |a - 3|
    for l in range(len(sch)):
        for delta in (-8, 8):
            alt = list(sch)
            alt[l] = max(1, min(128, alt[l] + delta))
            if tuple(alt) != sch and list(alt) == sorted(alt, reverse=True):
                assert abs(S.analytic_speedup(BERT, 128, alt) - a) >= abs(a - 3.0) * 0.5


def test_bucket_up():
    assert [S.bucket_up(n) for n in (1, 2, 3, 5, 8, 9, 100, 128)] == [1, 2, 4, 8, 8, 16, 104, 128]
    assert S.bucket_up(100, 128) == 128 and S.bucket_up(129, 128) == 256


def test_analytic_cost_by_hand():
    cm = S.CostModel(num_layers=2, d=4, f=8)
    # dense N=2: 2 layers x (6*2*16 + 4*4*4 + 2*2*16 + 4*2*4*8) = 2 x 576
    assert cm.total(2, (2, 2)) == 2 * (192 + 64 + 64 + 256)
    # keep 1 after the first layer's attention: layer 1 = 192 + 64 + 32 + 128; layer 2 n_in = 1
    l2 = 6 * 1 * 16 + 4 * 1 * 4 + 2 * 1 * 16 + 4 * 1 * 4 * 8
    assert cm.total(2, (1, 1)) == (192 + 64 + 32 + 128) + l2


def test_speedup_one_is_dense_and_limits_are_stated():
    assert S.schedule_for_speedup(BERT, 128, 1.0) == (128,) * 12
    with pytest.raises(S.SpeedupError, match=r"permitted range \[1, "):
        S.schedule_for_speedup(BERT, 128, 0.5)
    top = S.max_speedup(BERT, 128)
    with pytest.raises(S.SpeedupError, match=rf"permitted range \[1, {top:.2f}\]"):
        S.schedule_for_speedup(BERT, 128, top * 1.01)
    assert S.analytic_speedup(BERT, 128, S.schedule_for_speedup(BERT, 128, top)) == pytest.approx(top)


def test_explicit_schedule_checks():
    with pytest.raises(ValueError, match="non-increasing"):
        S.check((8, 16) + (8,) * 10, 12, 128)
    with pytest.raises(ValueError, match="model has 12 layers"):
        S.check((8,), 12, 128)
    with pytest.raises(ValueError, match=r"ints in \[1, 128\]"):
        S.check((200,) * 12, 12, 128)
