"""Schedules searched per task (accjax.search, eval.offline_tune --search): every candidate a
valid schedule at the level's cost, selection on dev only, and eval.glue running what the
table stored."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from accjax import data as data_lib
from accjax import evaluation, models
from accjax import schedule as S
from accjax import search
from eval import glue, offline_tune
from tests.train_helpers import compile_cache_in, sentiment_task, tiny_config

# Tiny training runs: the same programs in many tests, compiled once per session.
pytestmark = pytest.mark.usefixtures("shared_compile_cache")

MINILM = models.cost_model(models.preset("minilm-l6-h384"))


def _at_cost(cm, length, keep, level, bucket=8, floor=1):
    """Never slower than the level runs unsearched (the lower of the level and its decay), at
    most 3% faster than the level."""
    decay = S.analytic_speedup(cm, length, S.plan(cm, length, level, bucket=bucket, floor=floor).keep)
    return min(level, decay) - 1e-9 <= S.analytic_speedup(cm, length, keep) <= level * 1.03


def _valid(keep, length, level, floor=1):
    return (list(keep) == sorted(keep, reverse=True) and all(floor <= k <= length for k in keep)
            and _at_cost(MINILM, length, keep, level, floor=floor))


@pytest.mark.parametrize("length", [32, 64])
@pytest.mark.parametrize("level", [2.0, 3.0, 4.8])
def test_candidates_are_schedules_at_the_cost(length, level):
    seen = []
    scored = search.candidates(MINILM, length, level, lambda k: seen.append(k) or float(sum(k)), 24)
    decay = S.plan(MINILM, length, level).keep
    assert seen[0] == decay and len(seen) == len(set(seen)) == len(scored) <= 24
    # beyond the decay and the hold + decay shapes, the evolution adds children
    assert len(scored) > len(search.shapes(MINILM, length, level))
    for keep in seen[1:]:
        assert _valid(keep, length, level), keep
        assert set(keep) <= set(search.grid(length))  # bucket values only


def test_hold_then_decay_shapes():
    # the first layer keeps every row, the rest decays harder to pay for it
    held = S.decay_after(MINILM, 64, 2.0, (64,))
    assert held[0] == 64 and _valid(held, 64, 2.0)
    assert sum(held[1:]) < sum(S.plan(MINILM, 64, 2.0).keep[1:])
    assert S.decay_after(MINILM, 32, 4.8, (32, 32)) is None  # two whole layers cannot reach 4.8x
    with pytest.raises(ValueError, match="non-increasing"):
        S.decay_after(MINILM, 64, 2.0, (32, 64))


@pytest.mark.parametrize("flags, says", [(["--candidates", "0"], "--candidates must be an integer >= 1"),
                                         (["--batch_sizes", "1,x"], "--batch_sizes takes whole numbers"),
                                         (["--batch_sizes", "0"], "--batch_sizes takes whole numbers of at least 1")])
def test_bad_search_flags_are_one_line(flags, says, tmp_path, capsys):
    rc = offline_tune.main(["--checkpoint", str(tmp_path / "absent"), "--search", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err, err


# ------------------------------------------------------------------ on a tiny trained run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, session_xla_cache):
    from accjax import loop

    root = tmp_path_factory.mktemp("search")
    spec = sentiment_task(root / "data", 160, 64)
    run = root / "run"
    with compile_cache_in(session_xla_cache):
        loop.fit(tiny_config(run, spec, epochs=1, **{"elimination.mode": "fixed", "elimination.speedup": 2.0}))
    (root / "data" / "test.csv").unlink()  # from here on, reading the test split raises
    return run


def test_search_reads_dev_only_and_stores_valid_schedules(tiny_run, tmp_path, monkeypatch, capsys):
    encoded = []
    real_encode = data_lib.encode
    monkeypatch.setattr(data_lib, "encode", lambda ex, *a, **kw: encoded.append(kw.get("name")) or
                        real_encode(ex, *a, **kw))
    with pytest.raises(evaluation.EvalError, match="test.csv"):  # the trap is armed
        evaluation.features(evaluation.RunModel.load(tiny_run), None, ["test"], None)
    encoded.clear()
    out = tmp_path / "tune"
    rc = offline_tune.main(["--checkpoint", str(tiny_run), "--speedups", "1,2,3", "--search",
                            "--candidates", "6", "--repeats", "1", "--out", str(out), "--prune_every", "2,1",
                            "--json", str(tmp_path / "t.json"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert encoded and all(n.endswith("/validation") for n in encoded), encoded
    table = json.loads((out / "offline_tune.json").read_text())
    assert json.loads((tmp_path / "t.json").read_text())["search"] == table["search"]
    recs = table["search"]["records"]
    assert [(r["speedup"], r["length"]) for r in recs] == [(2.0, 32), (3.0, 32)]
    for r in recs:
        assert 1 <= r["scored"] <= 6
        assert r["best_primary"] >= r["decay_primary"]
        assert r["best_keep"] == r["decay_keep"] or _valid_tiny(tiny_run, r["best_keep"], 32, r["speedup"])
        stored = table.get("schedules", {}).get(f"{r['speedup']:g}", {}).get("32")
        assert stored == (r["best_keep"] if r["best_primary"] > r["decay_primary"] else None)
    assert table["strides"] == [1, 2] and [r["prune_every"] for r in table["rows"]] == [1, 1, 1, 2, 2]
    cost = evaluation.RunModel.load(tiny_run).predictor(8).cost
    for r in table["rows"][3:]:  # a searched schedule sets every layer: at k = 2 the level runs its decay
        assert r["source"] == "decay" and r["schedules"] == {"32": list(S.plan(cost, 32, r["speedup"],
                                                                                   prune_every=2).keep)}
    by_level = {r["speedup"]: r for r in table["rows"] if r["prune_every"] == 1}
    for s in (2.0, 3.0):  # each row ran what the table stored for it
        stored = table.get("schedules", {}).get(f"{s:g}")
        assert by_level[s]["source"] == ("searched" if stored else "decay")
        if stored:
            assert by_level[s]["schedules"] == stored


def _valid_tiny(run, keep, length, level):
    pred = evaluation.RunModel.load(run).predictor(8)
    return (keep == sorted(keep, reverse=True) and all(1 <= k <= length for k in keep)
            and _at_cost(pred.cost, length, keep, level, pred.bucket, pred.floor))


class _Oracle:
    """A predictor that is right on every example at one schedule and runs the model otherwise."""

    def __init__(self, pred, good):
        self.pred, self.good = pred, tuple(good)
        self.cost, self.bucket, self.floor = pred.cost, pred.bucket, pred.floor
        self.batch_size, self.programs = pred.batch_size, pred.programs

    def predict(self, batch, schedule=None):
        if tuple(schedule) == self.good:
            return np.eye(2)[batch["labels"]] * 10
        return self.pred.predict(batch, schedule=schedule)


def test_search_selects_by_dev_metric(tiny_run):
    model = evaluation.RunModel.load(tiny_run)
    t, feats = evaluation.features(model, None, ["validation"], None)
    pred = model.predictor(64)
    decay = S.plan(pred.cost, 32, 2.0).keep
    valid = [k for k in itertools.combinations_with_replacement(reversed(search.grid(32)), 2)
             if k != decay and search.within(pred.cost, 32, k, 2.0)]
    assert valid
    good = valid[-1]
    found = search.search(t, feats["validation"], _Oracle(pred, good), levels=[1, 2], buckets=model.buckets,
                          budget=len(valid) + 1)  # room for every valid schedule (2 layers: few)
    assert found["schedules"] == {2.0: {32: good}}
    assert found["records"][0]["best_primary"] == 100.0 > found["records"][0]["decay_primary"]
    assert 0 < found["programs"] <= len(valid)  # one per schedule scored (the oracle's not compiled)


def test_glue_runs_the_stored_schedule(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    model = evaluation.RunModel.load(run)
    cm = model.predictor(8).cost
    decay = S.plan(cm, 32, 2.0).keep
    other = next(k for k in itertools.combinations_with_replacement(reversed(search.grid(32)), 2)
                 if k != decay and search.within(cm, 32, k, 2.0))
    assert evaluation.offline_tune(model, speedups=[1, 2], progress=False, repeats=1)["rows"][1]["source"] == "decay"
    table = json.loads((run / "offline_tune.json").read_text())
    table["schedules"] = {"2": {"32": list(other)}}
    (run / "offline_tune.json").write_text(json.dumps(table))
    res = tmp_path / "glue.json"
    assert glue.main(["--checkpoint", str(run), "--speedup", "1,2", "--repeats", "1", "--json", str(res),
                      "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(res.read_text())["rows"]
    assert [(r["speedup"], r["source"]) for r in rows] == [(1.0, "dense"), (2.0, "searched")]
    assert rows[1]["schedules"] == {"32": list(other)}
    assert "searched" in printed
    # a searched schedule sets every layer's keep-length: at a stride the level runs its decay
    assert glue.main(["--checkpoint", str(run), "--speedup", "2", "--prune_every", "2", "--repeats", "1",
                      "--json", str(res), "--no-progress"]) == 0
    row = json.loads(res.read_text())["rows"][-1]
    assert row["source"] == "decay" and row["schedules"] == {"32": list(S.plan(cm, 32, 2.0, prune_every=2).keep)}
    assert "decay k=2" in capsys.readouterr().out
    # --max_drop picks a level from the table and runs its stored schedule too
    assert glue.main(["--checkpoint", str(run), "--max_drop", "100", "--repeats", "1", "--json", str(res),
                      "--no-progress"]) == 0
    picked = json.loads(res.read_text())
    level = picked["picked"][0]["speedup"]
    assert picked["rows"][-1]["source"] == ("searched" if level == 2.0 else "dense")
    # a table for another task (or none) leaves the decay: today's behaviour
    table["task"] = "another"
    (run / "offline_tune.json").write_text(json.dumps(table))
    assert glue.main(["--checkpoint", str(run), "--speedup", "2", "--repeats", "1", "--json", str(res),
                      "--no-progress"]) == 0
    row = json.loads(res.read_text())["rows"][-1]
    assert row["source"] == "decay" and row["schedules"] == {"32": list(decay)}


# ------------------------------------------------------- latency per batch size (issue 15)
def test_latency_rows_per_batch_size_and_length(tiny_run, tmp_path):
    out = tmp_path / "tune"
    assert offline_tune.main(["--checkpoint", str(tiny_run), "--speedups", "1,2,3", "--batch_sizes", "1,8",
                              "--repeats", "2", "--out", str(out), "--no-progress"]) == 0
    table = json.loads((out / "offline_tune.json").read_text())
    lat = table["latency"]
    keys = [(r["device"], r["batch_size"], r["length"], r["speedup"]) for r in lat]
    assert len(set(keys)) == len(keys) == 2 * 1 * 3  # batch sizes x lengths in use x levels
    assert {k[1] for k in keys} == {1, 8} and {k[2] for k in keys} == {32}
    assert "| 8 | 32 | 3 |" in (out / "offline_tune.md").read_text()
    for b in (1, 8):
        rows = sorted((r for r in lat if r["batch_size"] == b), key=lambda r: r["speedup"])
        assert rows[0]["speedup"] == 1.0 and rows[0]["measured"] == 1.0 and not rows[0]["slower"]
        for i, r in enumerate(rows[1:], 1):  # flagged iff no faster than a less aggressive level there
            assert r["slower"] == (r["measured"] <= max(x["measured"] for x in rows[:i]))


def test_predictor_picks_the_fastest_program_per_batch_size(tiny_run, tmp_path):
    from accjax import inference

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    model = evaluation.RunModel.load(run)
    with pytest.raises(evaluation.EvalError, match="--batch_sizes"):
        model.predictor(16, max_drop=1.0)
    dev = evaluation.benchmark.device_kind()
    # level 2 is slower than 1.5 for one example, faster for 64; both within the drop bound. Level
    # 2 at stride 2 (flagged against its own stride and dense only) is faster still for 64, and
    # costs 0.3 dev points
    ms = {(1, 1.0, 1): 1.0, (1, 1.5, 1): 0.8, (1, 2.0, 1): 0.9, (1, 2.0, 2): 0.95,
          (64, 1.0, 1): 10.0, (64, 1.5, 1): 8.0, (64, 2.0, 1): 5.0, (64, 2.0, 2): 4.0}
    table = {"checkpoint": str(run), "model_sha256": evaluation.ckpt_lib.model_fingerprint(run),
             "task": "data", "strides": [1, 2],
             "rows": [{"speedup": s, "prune_every": k, "drop": d}
                      for s, k, d in ((1.0, 1, 0.0), (1.5, 1, 0.1), (2.0, 1, 0.2), (2.0, 2, 0.3))],
             "latency": [r for size in (1, 64) for r in evaluation._flag_slower(
                 [{"device": dev, "batch_size": b, "length": 32, "speedup": s, "prune_every": k, "ms": v,
                   "measured": ms[b, 1.0, 1] / v} for (b, s, k), v in ms.items() if b == size], "measured")]}
    assert [r["slower"] for r in table["latency"]] == [False, False, True, False] + [False] * 4
    (run / "offline_tune.json").write_text(json.dumps(table))
    pred = evaluation.RunModel.load(run).predictor(16, max_drop=1.0)
    # (speedup, batch size, stride, floor): None, this table predates floors, is the run's
    assert pred.pick(1, 32) == (1.5, 1, 1, None)
    assert pred.pick(5, 32) == (2.0, 64, 2, None) and pred.pick(64, 32) == (2.0, 64, 2, None)
    # k = 2 too lossy
    assert evaluation.RunModel.load(run).predictor(16, max_drop=0.25).pick(64, 32) == (2.0, 64, 1, None)
    assert evaluation.RunModel.load(run).predictor(16, max_drop=1.0, prune_every=1).pick(64, 32) == (2.0, 64, 1, None)
    with pytest.raises(evaluation.EvalError, match="prune_every 1,2"):
        evaluation.RunModel.load(run).predictor(16, max_drop=1.0, prune_every=3)
    assert S.plan(pred.cost, 32, 2.0, prune_every=2).schedule != S.plan(pred.cost, 32, 2.0).schedule
    rng = np.random.default_rng(0)
    for n, (s, b, k) in ((1, (1.5, 1, 1)), (64, (2.0, 64, 2)), (100, (2.0, 64, 2))):
        batch = {"input_ids": rng.integers(1, 99, (n, 20)), "attention_mask": np.ones((n, 20), np.int64)}
        out = pred.predict(batch)
        assert out.shape == (n, 2)
        # the picked program ran, at its stride
        assert (b, 32, S.plan(pred.cost, 32, s, prune_every=k).schedule) in pred.programs._programs
        np.testing.assert_allclose(out, pred.predict(batch, schedule=S.plan(pred.cost, 32, s, prune_every=k).keep),
                                   atol=1e-5)
    assert isinstance(pred, inference.Predictor)
    with pytest.raises(evaluation.EvalError, match="must be >= 0"):
        evaluation.RunModel.load(run).predictor(16, max_drop=-1)
