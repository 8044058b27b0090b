"""Schedules: accuracy of the speedup solve, bucketing, limits."""

from __future__ import annotations

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


@pytest.mark.parametrize("cm,n", [(BERT, 512), (models.cost_model(models.preset("gpt2"), "lm"), 1024)])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("s", [1.5, 2, 3, 4.8])
def test_prune_every_drops_rows_only_at_every_kth_layer(cm, n, k, s):
    """prune_every=k: layers 1, 1 + k, ... drop rows, the others keep what enters them, and
    the analytic speedup is the one asked (within bucketing), as with every layer pruning."""
    p = S.plan(cm, n, s, prune_every=k)
    keep = (n,) + p.keep
    drops = [l for l in range(1, len(keep)) if keep[l] < keep[l - 1]]
    assert drops and all((l - 1) % k == 0 for l in drops), p.keep
    assert len(drops) > 1  # not one big drop: several pruning layers share the speedup
    assert list(p.keep) == sorted(p.keep, reverse=True)
    assert abs(p.analytic / s - 1) <= 0.03, p
    assert p.keep != S.plan(cm, n, s).keep  # a different shape from every-layer decay


def test_prune_every_one_is_the_default_and_bad_values_are_refused():
    for s in (1.5, 3, 4.8):
        assert S.plan(BERT, 128, s, prune_every=1) == S.plan(BERT, 128, s)
    assert S.plan(BERT, 128, 1.0, prune_every=3).dense
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="prune_every must be an int >= 1"):
            S.plan(BERT, 128, 2.0, prune_every=bad)


def test_predictors_and_the_bench_take_prune_every(tmp_path, capsys):
    import json

    from accjax import inference
    from eval import bench

    cfg = models.preset("bert-base-uncased", num_layers=4, hidden_size=32, num_heads=2,
                        intermediate_size=64, vocab_size=50)
    pred = inference.Predictor(None, {}, cfg, batch_size=2, length_buckets=(64,), prune_every=2)
    keep = pred.plan(64, 2.0).keep
    assert keep == S.plan(pred.cost, 64, 2.0, prune_every=2).keep and keep[0] == keep[1] > keep[2]
    with pytest.raises(ValueError, match="prune_every"):
        inference.Predictor(None, {}, cfg, prune_every=0)
    tiny = ["--set", "num_layers=4", "--set", "hidden_size=32", "--set", "num_heads=2",
            "--set", "intermediate_size=64", "--set", "vocab_size=50"]
    assert bench.main(["--shapes", "2x16", "--speedups", "2", "--iters", "1", "--prune_every", "0",
                       *tiny]) == 2
    assert "--prune_every" in capsys.readouterr().err
    out = tmp_path / "b.json"
    assert bench.main(["--shapes", "2x32", "--speedups", "2", "--iters", "1", "--prune_every", "2",
                       "--json", str(out), *tiny]) == 0
    sch = json.loads(out.read_text())["rows"][1]["schedule"]
    assert sch[0] == sch[1] and sch[2] == sch[3] and sch[1] > sch[2], sch
    # several strides: dense once, then every level at each, timed against that one dense program
    for interleave in ([], ["--interleave"]):
        assert bench.main(["--shapes", "2x32", "--speedups", "2", "--iters", "1", "--prune_every", "2,1",
                           "--json", str(out), *interleave, *tiny]) == 0
        rows = json.loads(out.read_text())["rows"]
        assert [(r["speedup"], r["prune_every"]) for r in rows] == [(1.0, 1), (2.0, 1), (2.0, 2)]
        assert all(r["schedule"] == list(S.plan(pred.cost, 32, r["speedup"], prune_every=r["prune_every"]).keep)
                   for r in rows)
        assert rows[1]["schedule"] != rows[2]["schedule"]
        assert all(r["measured"] == pytest.approx(rows[0]["median_ms"] / r["median_ms"]) for r in rows)
    assert " k=2: analytic" in capsys.readouterr().out


def test_the_bench_times_each_level_at_each_floor_once(tmp_path, capsys):
    """--floor 1,4: every level at each floor against one dense program; a floor that leaves a
    level's keep-lengths as they were is not timed again."""
    import json

    from eval import bench

    tiny = ["--set", "num_layers=4", "--set", "hidden_size=32", "--set", "num_heads=2",
            "--set", "intermediate_size=64", "--set", "vocab_size=50"]
    out = tmp_path / "b.json"
    assert bench.main(["--shapes", "2x32", "--speedups", "2,4", "--iters", "1", "--floor", "4,1",
                       "--json", str(out), *tiny]) == 0
    rows = json.loads(out.read_text())["rows"]
    cm = models.cost_model(models.preset("bert-base-uncased", num_layers=4, hidden_size=32, num_heads=2,
                                         intermediate_size=64, vocab_size=50))
    assert S.plan(cm, 32, 2.0, floor=4).keep == S.plan(cm, 32, 2.0).keep  # 2x: the floor is not reached
    assert [(r["speedup"], r["floor"]) for r in rows] == [(1.0, 1), (2.0, 1), (4.0, 1), (4.0, 4)]
    assert min(rows[2]["schedule"]) < 4 <= min(rows[3]["schedule"])
    assert all(r["measured"] == pytest.approx(rows[0]["median_ms"] / r["median_ms"]) for r in rows)
    assert " floor=4: analytic" in capsys.readouterr().out
