"""eval.glue / eval.offline_tune: a GLUE task from a TSV folder end to end, offline-tuning,
--max_drop, the embedded default, and every bad input giving a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accjax import evaluation, metrics, schedule
from eval import glue, offline_tune
from tests.train_helpers import REPO, compile_cache_in, sentiment_rows, tiny_config

# Tiny training runs: the same programs in many tests, compiled once per session.
pytestmark = pytest.mark.usefixtures("shared_compile_cache")


def _write_sst2(root: Path) -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for name, seed, n in (("train.tsv", 0, 160), ("dev.tsv", 1, 48)):
        with open(folder / name, "w") as f:
            f.write("sentence\tlabel\n")
            for text, label in sentiment_rows(n, seed):
                f.write(f"{text}\t{1 if label == 'pos' else 0}\n")
    return root


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory, session_xla_cache):
    from accjax import loop

    root = tmp_path_factory.mktemp("glue")
    data_dir = _write_sst2(root / "data")
    run = root / "run"
    cfg = tiny_config(run, "sst2", data_dir=str(data_dir), epochs=2,
                      **{"elimination.mode": "fixed", "elimination.speedup": 2.0})
    with compile_cache_in(session_xla_cache):
        loop.fit(cfg)
    return run, data_dir


def test_glue_tsv_end_to_end(sst2_run, tmp_path, capsys):
    run, data_dir = sst2_run
    out = tmp_path / "glue.json"
    rc = glue.main(["--checkpoint", str(run), "--task", "sst2", "--data_dir", str(data_dir),
                    "--speedup", "1,2", "--json", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "measured" in printed
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["split"], r["speedup"]) for r in rows] == [("validation", 1.0), ("validation", 2.0)]
    assert res["machine"]["backend"] == "cpu"
    dense, fast = rows
    assert dense["analytic_speedup"] == 1.0 and dense["measured_speedup"] == 1.0
    assert 1.5 < fast["analytic_speedup"] <= 2.2 and fast["measured_speedup"] > 0
    assert fast["drop"] == pytest.approx(dense["accuracy"] - fast["accuracy"])
    assert fast["examples"] == 48 and fast["examples_per_s"] > 0 and fast["ms_per_batch"] > 0
    # the metric agrees with scoring the same dev set directly through a Predictor
    model = evaluation.RunModel.load(run)
    from accjax import data as data_lib
    d = data_lib.load_task("sst2", str(data_dir), splits=("validation",))
    feats = data_lib.encode(d["validation"], model.tokenizer, regression=False, max_length=model.max_length)
    pred = model.predictor(64)
    batches = data_lib.EvalBatches(feats, 64, buckets=model.buckets)
    outs = [pred.predict(b, schedule=schedule.schedule_for_speedup(pred.cost, b["input_ids"].shape[1], 2.0))
            for b in batches]
    acc = metrics.compute(model.resolve_task("sst2"), batches.restore(outs), feats.labels)["accuracy"]
    assert acc == pytest.approx(fast["accuracy"])


def test_unreachable_speedup_runs_at_the_maximum(sst2_run, capsys):
    run, data_dir = sst2_run
    rc = glue.main(["--checkpoint", str(run), "--task", "sst2", "--data_dir", str(data_dir),
                    "--speedup", "60", "--no-progress"])
    assert rc == 0
    model = evaluation.RunModel.load(run)
    top = schedule.max_speedup(model.predictor(64).cost, 32)
    assert top < 60
    assert f"max {round(top, 2)}" in capsys.readouterr().out


def test_offline_tune_and_max_drop(sst2_run, tmp_path, capsys):
    run, data_dir = sst2_run
    out = tmp_path / "tune"
    rc = offline_tune.main(["--checkpoint", str(run), "--speedups", "1,2,3", "--data_dir",
                            str(data_dir), "--out", str(out), "--no-progress"])
    assert rc == 0
    table = json.loads((out / "offline_tune.json").read_text())
    assert [r["speedup"] for r in table["rows"]] == [1.0, 2.0, 3.0]
    assert table["rows"][0]["drop"] == 0.0
    assert (out / "offline_tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 3 |" in (out / "offline_tune.md").read_text()
    # --max_drop reads the table beside the checkpoint: put it there, then pick
    for name in ("offline_tune.json", "offline_tune.md", "offline_tune.png"):
        (run / name).write_bytes((out / name).read_bytes())
    capsys.readouterr()
    rc = glue.main(["--checkpoint", str(run), "--data_dir", str(data_dir), "--max_drop", "100",
                    "--no-progress"])
    assert rc == 0
    best = evaluation.pick_level(table, 100)
    assert f"picked speedup {best['speedup']:g} for" in capsys.readouterr().out


def test_settle_holds_while_glue_and_offline_tune_time_their_levels(sst2_run, tmp_path, monkeypatch, capsys):
    """--settle_ms: programs.SETTLE_MS is the value while the levels' passes are timed and 0
    after; recorded in eval.glue's JSON and in the offline-tuning table and its Markdown."""
    from accjax import programs

    run, data_dir = sst2_run
    seen, real = [], programs.time_interleaved
    monkeypatch.setattr(programs, "time_interleaved", lambda *a, **k: seen.append(programs.SETTLE_MS) or real(*a, **k))
    out = tmp_path / "glue.json"
    assert glue.main(["--checkpoint", str(run), "--data_dir", str(data_dir), "--speedup", "1,2", "--repeats", "1",
                      "--settle_ms", "2", "--no-progress", "--json", str(out)]) == 0
    assert seen == [2.0] and programs.SETTLE_MS == 0 and json.loads(out.read_text())["settle_ms"] == 2
    seen.clear()
    assert offline_tune.main(["--checkpoint", str(run), "--speedups", "1,2", "--repeats", "1", "--data_dir",
                              str(data_dir), "--out", str(tmp_path / "tune"), "--settle_ms", "3",
                              "--no-progress"]) == 0
    assert seen and set(seen) == {3.0} and programs.SETTLE_MS == 0
    assert json.loads((tmp_path / "tune" / "offline_tune.json").read_text())["settle_ms"] == 3
    assert "each after 3 ms of its own" in (tmp_path / "tune" / "offline_tune.md").read_text()


def test_pick_level_rule():
    rows = [{"speedup": 1.0, "drop": 0.0, "measured_speedup": 1.0, "analytic_speedup": 1.0},
            {"speedup": 2.0, "drop": 0.4, "measured_speedup": 1.9, "analytic_speedup": 2.0},
            {"speedup": 3.0, "drop": 0.6, "measured_speedup": 2.7, "analytic_speedup": 3.0},
            {"speedup": 4.0, "drop": 0.3, "measured_speedup": 2.5, "analytic_speedup": 4.0}]
    assert evaluation.pick_level({"rows": rows}, 0.5)["speedup"] == 4.0  # fastest within bound
    assert evaluation.pick_level({"rows": rows}, 0.0)["speedup"] == 1.0
    with pytest.raises(evaluation.EvalError, match="must be >= 0"):
        evaluation.pick_level({"rows": rows}, -1)


def test_a_pick_at_one_floor_takes_a_level_measured_once_at_the_first():
    """--floor F restricts a pick to floor F's rows; a level F changed nothing in (so measured
    once, at the table's first floor) still counts at F; a floor the table lacks is refused."""
    def row(s, f, drop, measured):
        return {"speedup": s, "prune_every": 1, "floor": f, "drop": drop, "measured_speedup": measured,
                "analytic_speedup": s}
    table = {"rows": [row(1.0, 1, 0.0, 1.0), row(2.0, 1, 0.1, 1.9), row(4.0, 1, 2.0, 3.0),
                      row(4.0, 2, 3.0, 3.5)], "strides": [1], "floors": [1, 2], "checkpoint": "run"}
    two = evaluation.pick_level(table, 0.5, floor=2)
    assert (two["speedup"], two["floor"]) == (2.0, 1)
    assert evaluation.pick_level(table, 5, floor=1)["measured_speedup"] == 3.0
    assert evaluation.pick_level(table, 5, floor=2)["measured_speedup"] == 3.5
    assert evaluation.pick_level(table, 2.5)["measured_speedup"] == 3.0  # 4x at floor 2 drops too much
    with pytest.raises(evaluation.EvalError, match="measured at floor 1,2"):
        evaluation.pick_level(table, 5, floor=8)


def test_table_keeps_its_columns_apart_with_a_stride_and_a_floor():
    """The schedule label 'decay k=3 F=16' is longer than its column was: it ran into the
    analytic speedup ('1.91decay k=3 F=16'). Every cell of a row stays apart, header aligned."""
    base = dict(task="rt_polarity", split="validation", accuracy=80.8, primary=80.8, drop=1.07,
                schedules={32: [16] * 6})
    rows = [dict(base, speedup=1.0, analytic_speedup=1.0, source="dense"),
            dict(base, speedup=2.0, analytic_speedup=1.91, source="decay", prune_every=3, floor=16)]
    head, _, dense, level = evaluation.format_table(rows).splitlines()
    assert "1.91 decay k=3 F=16" in level
    assert level.index("decay k=3 F=16") + len("decay k=3 F=16") == head.index("schedule") + len("schedule")
    assert level.index("80.80") + len("80.80") == head.index("accuracy") + len("accuracy")
    for line in (head, dense, level):  # the columns after the label start where the header says
        assert line[head.index("schedule") + len("schedule")] == " "


def test_a_pick_no_measurably_faster_goes_to_the_more_accurate():
    """Of the levels whose median lies within the fastest one's interleaved passes (min-max),
    the pick is the one with the smallest dev drop; a level clearly faster wins whatever its
    drop, and one whose passes only overlap (its median outside) is not picked."""
    def row(s, k, drop, med, lo, hi):
        return {"speedup": s, "prune_every": k, "drop": drop, "measured_speedup": med,
                "measured_min": lo, "measured_max": hi, "analytic_speedup": s}
    rows = [row(1.0, 1, 0.0, 1.0, 1.0, 1.0), row(3.0, 1, 0.23, 3.28, 3.17, 3.82),
            row(3.0, 2, 1.30, 3.43, 2.60, 3.78), row(2.0, 1, -0.15, 2.12, 2.04, 2.57),
            row(2.0, 2, 0.0, 2.26, 1.97, 2.75)]  # passes overlap 3x k = 2's, median below them
    table = {"rows": rows, "strides": [1, 2], "checkpoint": "run"}
    assert (evaluation.pick_level(table, 1.5)["speedup"], evaluation.pick_level(table, 1.5)["prune_every"]) == (3.0, 1)
    rows[1].update(measured_speedup=2.9, measured_min=2.8, measured_max=2.95)  # now clearly slower than k = 2's
    rows[2].update(measured_min=3.0)
    assert evaluation.pick_level(table, 1.5)["prune_every"] == 2
    # the same rule over a latency table's ms: dense ties with a level that is not reliably faster
    dev = evaluation.benchmark.device_kind()
    lat = [{"device": dev, "batch_size": 1, "length": 32, "speedup": s, "prune_every": 1, "ms": ms,
            "ms_min": lo, "ms_max": hi, "slower": False}
           for s, ms, lo, hi in ((1.0, 1.00, 0.95, 1.10), (2.0, 0.96, 0.90, 1.20), (3.0, 0.70, 0.65, 0.75))]
    lt = {"rows": [row(1.0, 1, 0.0, 1, 1, 1), row(2.0, 1, 0.1, 1, 1, 1), row(3.0, 1, 0.9, 1, 1, 1)],
          "latency": lat, "strides": [1], "checkpoint": "run"}
    assert evaluation.pick_program(lt, 0.5, 1, 32) == (1.0, 1, 1, None)  # dense's median within 2x's passes
    assert evaluation.pick_program(lt, 1.0, 1, 32) == (3.0, 1, 1, None)  # 3x is clearly faster


def _err(capsys, argv):
    capsys.readouterr()  # drop what earlier steps printed
    rc = glue.main(argv + ["--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, (rc, err)
    return err


def test_bad_input_is_a_clear_message(sst2_run, tmp_path, capsys):
    run, data_dir = sst2_run
    ck = ["--checkpoint", str(run)]
    assert "unknown task 'sst3'" in _err(capsys, ck + ["--task", "sst3"]).lower()
    assert "SST-2" in _err(capsys, ck + ["--task", "sst2", "--data_dir", str(tmp_path / "nothing")])
    assert "has 1" in _err(capsys, ck + ["--task", "stsb", "--data_dir", str(data_dir)])
    assert "below 1" in _err(capsys, ck + ["--speedup", "0.5"])
    assert "'abc' is not a number" in _err(capsys, ck + ["--speedup", "2,abc"])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "cannot write --json" in _err(capsys, ck + ["--json", str(blocker / "out.json")])
    assert "does not exist" in _err(capsys, ["--checkpoint", str(tmp_path / "absent")])


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    from tests.gpt2_testlib import make_hf_gpt2
    from accjax import convert

    folder, _ = make_hf_gpt2(tmp_path / "gpt2")
    convert.save_accjax(convert.load(folder, "lm"), out_dir=tmp_path / "ax")
    err = _err(capsys, ["--checkpoint", str(tmp_path / "ax")])
    assert "gpt2" in err and "'lm'" in err and "sequence classifiers" in err


def test_cli_exit_code_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "eval.glue", "--checkpoint", str(tmp_path / "x"),
                        "--speedup", "2,abc"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr


def test_embedded_default_trains_once_then_evaluates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCJAX_DEFAULT_RUN", str(tmp_path / "default"))
    monkeypatch.setenv("ACCJAX_DEFAULT_CONFIG", "rt_minilm.py:fixed,tiny")
    assert glue.main(["--speedup", "4.8", "--no-progress"]) == 0
    first = capsys.readouterr()
    assert "no default checkpoint" in first.err
    assert "rt_polarity" in first.out and "4.8" in first.out
    summary = (tmp_path / "default" / "summary.json").stat().st_mtime
    assert glue.main(["--speedup", "2", "--no-progress"]) == 0
    second = capsys.readouterr()
    assert "no default checkpoint" not in second.err  # reused, not retrained
    assert (tmp_path / "default" / "summary.json").stat().st_mtime == summary


def test_timed_passes_run_a_spread_of_the_batches_after_scoring_every_one(monkeypatch):
    from accjax import data as data_lib, tasks

    lengths = np.r_[np.full(40, 10), np.full(12, 50)]  # 13 batches of 4: 10 at length 32, 3 at 64
    offsets = np.r_[0, np.cumsum(lengths)]
    labels = np.arange(len(lengths)) % 2
    feats = data_lib.Features(np.ones(offsets[-1], np.int32), np.zeros(offsets[-1], np.int32), offsets,
                              labels.astype(np.int32), max_length=64, pad_id=0)
    seen = []

    def run(batch, plan):  # logits that pick each row's label: accuracy 100 only if every row ran
        seen.append((plan.dense, batch["input_ids"].shape[1]))
        return np.eye(2)[batch["labels"]]

    monkeypatch.setattr(evaluation, "TIMED_BATCHES", 5)
    rows = evaluation.score_splits(tasks.get_task("sst2"), {"validation": feats}, run, speedups=[1.0, 2.0],
                                   cost=schedule.CostModel(num_layers=2, d=8, f=16), batch_size=4,
                                   buckets=(32, 64), repeats=3)
    assert [r["accuracy"] for r in rows] == [100.0, 100.0]
    scored, timed = seen[:26], seen[26:]
    assert [d for d, _ in scored].count(True) == 13  # the scoring pass ran all 13 batches a level
    assert len(timed) == 3 * 2 * 5  # 3 rounds x 2 levels x 5 batches, the levels interleaved
    assert [d for d, _ in timed[:10]] == [True] * 5 + [False] * 5
    assert sorted(n for _, n in timed[:5]) == [32, 32, 32, 32, 64]  # both lengths, in their share
    assert all(r["timed_batches"] == 5 and r["examples_per_s"] * r["seconds"] == pytest.approx(20)
               for r in rows)


def test_prune_every_reaches_the_scored_schedules(sst2_run, tmp_path, capsys):
    run, data_dir = sst2_run
    out = tmp_path / "glue.json"
    base = ["--checkpoint", str(run), "--task", "sst2", "--data_dir", str(data_dir), "--no-progress"]
    assert glue.main([*base, "--speedup", "2", "--prune_every", "2", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][1]
    cost = evaluation.RunModel.load(run).predictor(64).cost
    for length, keep in row["schedules"].items():
        want = schedule.plan(cost, int(length), 2.0, prune_every=2).keep
        assert tuple(keep) == want != schedule.plan(cost, int(length), 2.0).keep
    capsys.readouterr()
    assert glue.main([*base, "--speedup", "2", "--prune_every", "0"]) == 2
    assert "--prune_every" in capsys.readouterr().err


def _recording_every(run: Path, dest: Path, every: int) -> Path:
    """A copy of ``run``'s model whose recorded training config says elimination.prune_every
    = ``every`` (what ``train.finetune`` writes for a run trained with it)."""
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "tb", "offline_tune*"))
    meta = json.loads((dest / "accjax.json").read_text())
    meta["train_config"]["elimination"]["prune_every"] = every
    (dest / "accjax.json").write_text(json.dumps(meta))
    return dest


def test_offline_tune_floors_are_stored_and_max_drop_runs_the_picked_one(sst2_run, tmp_path, capsys):
    """--floor 1,2: each level at each smallest keep-length (a floor that changes none of a
    level's keep-lengths scored once); --max_drop runs the picked level at its floor."""
    run = _recording_every(sst2_run[0], tmp_path / "run", 1)
    assert offline_tune.main(["--checkpoint", str(run), "--speedups", "1,2,4", "--repeats", "1",
                              "--batch_sizes", "64", "--floor", "2,1", "--no-progress"]) == 0
    table = json.loads((run / "offline_tune.json").read_text())
    cost = evaluation.RunModel.load(run).predictor(64).cost
    lengths = [int(n) for n in table["rows"][0]["schedules"]]

    def keep(s, f, n):
        return list(schedule.plan(cost, n, s, floor=f).keep)

    # floor 2 is scored where it changes some keep-length (at 4x here, not at 2x), and only there
    expect = [(1.0, 1), (2.0, 1), (4.0, 1)] + [(s, 2) for s in (2.0, 4.0)
                                               if any(keep(s, 2, n) != keep(s, 1, n) for n in lengths)]
    assert table["floors"] == [1, 2] and expect[3:] == [(4.0, 2)]  # 2x at floor 2: as at floor 1
    assert [(r["speedup"], r["floor"]) for r in table["rows"]] == expect
    assert all(r["schedules"] == {str(n): keep(r["speedup"], r["floor"], n) for n in lengths} for r in table["rows"])
    assert all(r["slower"] is False for r in table["rows"] if r["speedup"] == 1)
    assert all(r["keep"] == keep(r["speedup"], r["floor"], r["length"]) for r in table["latency"])
    assert {(r["speedup"], r["floor"]) for r in table["latency"]} == set(expect)
    assert "F = 2" in (run / "offline_tune.md").read_text()
    # 4x at floor 2 made the fastest: --max_drop runs it at floor 2, as does a predictor
    four = next(i for i, r in enumerate(table["rows"]) if (r["speedup"], r["floor"]) == (4.0, 2))
    table["rows"][four].update(measured_speedup=9.0, slower=False)
    for r in table["latency"]:
        if (r["speedup"], r["floor"]) == (4.0, 2):
            r.update(ms=1e-4, ms_min=1e-4, ms_max=1e-4, slower=False)
    (run / "offline_tune.json").write_text(json.dumps(table))
    out = tmp_path / "glue.json"
    capsys.readouterr()
    assert glue.main(["--checkpoint", str(run), "--no-progress", "--max_drop", "100", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["picked"][0]["speedup"], res["picked"][0]["floor"]) == (4.0, 2)
    assert res["rows"][-1]["schedules"] == table["rows"][four]["schedules"] and res["rows"][-1]["floor"] == 2
    assert "at floor 2" in capsys.readouterr().out
    n = max(r["length"] for r in table["latency"])
    pred = evaluation.RunModel.load(run).predictor(64, max_drop=100)
    assert pred.pick(64, n) == (4.0, 64, 1, 2)
    built, program = [], pred.program
    pred.program = lambda size, plan: built.append(plan.keep) or program(size, plan)
    pred.predict({"input_ids": np.full((2, n), 5), "attention_mask": np.ones((2, n), int)})
    assert built == [tuple(keep(4.0, 2, n))]
    # --floor 1 picks among floor 1's rows only; a floor the table lacks is refused in one line
    assert glue.main(["--checkpoint", str(run), "--no-progress", "--max_drop", "100", "--floor", "1",
                      "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["picked"][0]["floor"] == 1 and res["rows"][-1]["floor"] == 1
    assert res["rows"][-1]["schedules"] == next(r["schedules"] for r in table["rows"]
                                                if (r["speedup"], r["floor"]) == (res["picked"][0]["speedup"], 1))
    assert evaluation.RunModel.load(run).predictor(64, max_drop=100, floor=1).pick(64, n)[3] == 1
    assert "eval.offline_tune --floor 1,2,8" in _err(capsys, ["--checkpoint", str(run), "--max_drop", "100",
                                                             "--floor", "8"])


def test_a_run_is_scored_with_the_prune_every_it_records(sst2_run, tmp_path):
    run = _recording_every(sst2_run[0], tmp_path / "run", 2)
    model = evaluation.RunModel.load(run)
    assert model.prune_every == 2 and model.predictor(64).prune_every == 2
    out = tmp_path / "glue.json"
    base = ["--checkpoint", str(run), "--speedup", "2", "--no-progress", "--json", str(out)]
    for flag, every in (([], 2), (["--prune_every", "1"], 1)):  # the run's k unless the flag says otherwise
        assert glue.main(base + flag) == 0
        keep = json.loads(out.read_text())["rows"][1]["schedules"]
        assert keep and keep == {n: list(schedule.plan(model.predictor(64).cost, int(n), 2.0,
                                                        prune_every=every).keep) for n in keep}


def test_offline_tune_strides_are_stored_and_max_drop_runs_the_picked_one(sst2_run, tmp_path, capsys):
    run = _recording_every(sst2_run[0], tmp_path / "run", 1)  # trained at k = 1, tuned at k = 1 and 2
    assert offline_tune.main(["--checkpoint", str(run), "--speedups", "1,2", "--repeats", "1",
                              "--batch_sizes", "64", "--prune_every", "2,1", "--no-progress"]) == 0
    table = json.loads((run / "offline_tune.json").read_text())
    cost = evaluation.RunModel.load(run).predictor(64).cost
    assert table["strides"] == [1, 2] and "decay, k = 2" in (run / "offline_tune.md").read_text()
    assert [(r["speedup"], r["prune_every"]) for r in table["rows"]] == [(1.0, 1), (2.0, 1), (2.0, 2)]
    every, fast = table["rows"][1]["schedules"], table["rows"][2]["schedules"]
    assert fast and all(k[1] == k[0] < int(n) for n, k in fast.items())  # layer 2 keeps what enters it
    assert fast == {n: list(schedule.plan(cost, int(n), 2.0, prune_every=2).keep) for n in fast} != every
    assert every == {n: list(schedule.plan(cost, int(n), 2.0).keep) for n in every}
    assert sorted((r["speedup"], r["prune_every"]) for r in table["latency"]) == [(1.0, 1), (2.0, 1), (2.0, 2)]
    assert all(r["keep"] == list(schedule.plan(cost, r["length"], r["speedup"], prune_every=r["prune_every"]).keep)
               for r in table["latency"])
    # --max_drop runs the picked level at its stride; --prune_every keeps the pick to one stride
    # 2x at k = 2 is picked, and 2x at k = 1 where only k = 1 may run, whatever this CPU measured
    # (a busy machine can time the tiny model's 2x no faster than dense)
    table["rows"][1].update(measured_speedup=1.5, measured_min=1.4, slower=False)
    table["rows"][2].update(measured_speedup=9.0, measured_min=8.0, slower=False)
    for r in table["latency"]:  # and per batch size (a tiny model's 2x can time slower than dense here)
        if r["speedup"] == 2.0:
            r.update(ms=1e-3 / r["prune_every"], ms_min=1e-4, ms_max=1e-3 / r["prune_every"], slower=False)
    (run / "offline_tune.json").write_text(json.dumps(table))
    out = tmp_path / "glue.json"
    ck = ["--checkpoint", str(run), "--no-progress"]
    for flag, k, keep in (([], 2, fast), (["--prune_every", "1"], 1, every)):
        assert glue.main(ck + ["--max_drop", "100", "--json", str(out)] + flag) == 0
        res = json.loads(out.read_text())
        assert (res["picked"][0]["speedup"], res["picked"][0]["prune_every"]) == (2.0, k)
        assert res["rows"][-1]["schedules"] == keep and res["rows"][-1]["prune_every"] == k
    assert "at prune_every 2" in capsys.readouterr().out
    assert glue.main(ck + ["--max_drop", "1", "--prune_every", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max_drop") and "prune_every 1,2" in err and "Traceback" not in err
    # a table written before strides (one k for the whole table) and floors is read as that one
    # stride, at the run's floor (None)
    old = {**table, "prune_every": 2, "rows": [table["rows"][0], table["rows"][2]],
           "latency": [r for r in table["latency"] if r["prune_every"] != 1 or r["speedup"] == 1]}
    del old["strides"], old["floors"]
    old["rows"] = [{k: v for k, v in r.items() if k not in ("prune_every", "floor")} for r in old["rows"]]
    old["latency"] = [{k: v for k, v in r.items() if k not in ("prune_every", "floor")} for r in old["latency"]]
    (run / "offline_tune.json").write_text(json.dumps(old))
    assert glue.main(ck + ["--max_drop", "100", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][-1]["schedules"] == fast
    assert evaluation.RunModel.load(run).predictor(64, max_drop=100).pick(64, 32) == (2.0, 64, 2, None)
    assert glue.main(ck + ["--max_drop", "1", "--prune_every", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max_drop") and "prune_every 2" in err and "Traceback" not in err
    # the search cannot keep to a stride: refused (here the k = 2 a run recorded), as is a bad k
    k2 = _recording_every(sst2_run[0], tmp_path / "k2", 2)
    for argv, says in ((["--checkpoint", str(k2), "--search"], "--search"),
                       (["--checkpoint", str(run), "--prune_every", "0"], "--prune_every")):
        assert offline_tune.main(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err, err
    assert not (k2 / "offline_tune.json").exists()
