"""Resume after SIGKILL, the run folder as a self-contained model, restarts that must refuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from accjax import checkpoint, convert, evaluation, experiment, guards, loop, tasks
from tests.train_helpers import (REPO, compile_cache_in, finetune_cmd, run_finetune, sentiment_task,
                                 subprocess_env, tiny_config)

# Tiny training runs: the same programs in many tests, compiled once per session.
pytestmark = pytest.mark.usefixtures("shared_compile_cache")


def _leaves(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


@pytest.mark.slow
def test_sigkill_then_restart_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    task = sentiment_task(tmp_path / "data", n_train=96)  # 6 steps of 16 per epoch
    base = {"task": task, "max_examples": 0, "length_buckets": (32,), "max_length": 32,
            "eval.speedups": (1.0,), "eval.select_mean": False, "epochs": 2, "checkpoint.every_steps": 3,
            "elimination.levels": 2, "elimination.speedup_range": (1.0, 3.0), "progress": False}
    total = 12
    # One persistent compilation cache for the three processes: they compile the same programs.
    cache = {"JAX_COMPILATION_CACHE_DIR": tmp_path / "jax-cache", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0}
    # Elastic: exact resume also needs the per-step speedup draws to repeat. The uninterrupted
    # reference runs alongside the run that gets killed.
    ref = subprocess.Popen(finetune_cmd("tiny,elastic", {**base, "run_dir": tmp_path / "ref"}), cwd=REPO,
                           env=subprocess_env(1, **cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    slow = {**base, "run_dir": run, "debug.step_delay_s": 0.25}  # 9 steps (2.25 s) left after step 3
    proc = subprocess.Popen(finetune_cmd("tiny,elastic", slow), cwd=REPO, env=subprocess_env(1, **cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # killed mid-epoch (step 3 of 6, unless the machine stalls): the restart also resumes the data order
    while not (run / "checkpoints" / "3").is_dir():  # orbax renames a finished checkpoint into place
        assert proc.poll() is None, "the run ended before its step-3 checkpoint"
        assert time.time() < deadline, "no step-3 checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = checkpoint.Checkpointer(run / "checkpoints").all_steps()
    assert not (run / "summary.json").exists() and max(steps) < total  # killed mid-run
    restart = run_finetune("tiny,elastic", {**base, "run_dir": run}, **cache)  # same config, no delay
    assert restart.returncode == 0, restart.stderr[-3000:]
    out, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err[-3000:]
    assert f"resumed from step {max(steps)}" in restart.stdout

    got, meta = checkpoint.restore_params(run)
    want, ref_meta = checkpoint.restore_params(tmp_path / "ref")
    assert meta["step"] == ref_meta["step"] == total
    got, want = _leaves(got), _leaves(want)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k  # bit for bit
    # the exported best models agree too, and the metrics log has each step once
    a = convert.load_accjax(run).params
    b = convert.load_accjax(tmp_path / "ref").params
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(a).values(), _leaves(b).values()))
    train_steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if "loss" in r]
    assert len(train_steps) == len(set(train_steps)) and max(train_steps) == total


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, session_xla_cache):
    """One in-process fit (fixed 2x elimination) on a task with an empty and an over-long text."""
    tmp = tmp_path_factory.mktemp("run")
    long_text = " ".join(["good fine fun"] * 40)  # 120 words: beyond the model's 64 positions
    task = sentiment_task(tmp / "data", n_train=96, extra_train=[("   ", "pos"), (long_text, "pos")])
    cfg = tiny_config(tmp / "run", task, "tiny,fixed", max_length=100, length_buckets=(32, 64), dropout=False,
                      **{"eval.speedups": (1.0, 50.0), "epochs": 2, "elimination.speedup": 2.0})
    with compile_cache_in(session_xla_cache):
        result = loop.fit(cfg)
    return cfg, result


def test_run_folder_alone_reproduces_the_recorded_dev_metric(tiny_run, tmp_path):
    cfg, result = tiny_run
    import shutil

    # Only the exported model files: no checkpoints, no training-time objects.
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in os.listdir(result.run_dir):
        if (result.run_dir / name).is_file() and name not in ("metrics.jsonl", "summary.json"):
            shutil.copy(result.run_dir / name, folder / name)
    meta = convert.read_meta(folder)
    assert tasks.get_task(meta["task"]).files == tasks.get_task(cfg.task).files
    assert meta["train_config"]["elimination"]["mode"] == "fixed"
    rows = evaluation.evaluate_folder(folder, splits=["validation"])
    recorded = {r["speedup"]: r for r in result.best["rows"]}
    assert len(rows) == 2
    for r in rows:
        rec = recorded[r["speedup"]]
        assert r["accuracy"] == pytest.approx(rec["accuracy"], abs=1e-9)
        assert r["analytic_speedup"] == pytest.approx(rec["analytic_speedup"])
        assert r["schedules"] == rec["schedules"]
    # 50x is beyond every length: it ran at each bucket's maximum instead of failing
    top = recorded[50.0]
    assert 2.0 < top["analytic_speedup"] < 50 and top["schedules"]["32"] == [1, 1]


def test_bad_and_odd_input_is_counted_and_reported(tiny_run):
    cfg, result = tiny_run
    summary = json.loads((result.run_dir / "summary.json").read_text())
    data = summary["data"]
    assert data["dropped_empty"]["train"] == 1  # the whitespace-only text
    assert data["truncated"]["train"] == 1  # the 120-word text
    assert data["max_length"] == 64  # 100 asked, the model has 64 positions
    assert data["examples"]["train"] == 97
    first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["event"] == "data" and first["truncated"]["train"] == 1
    assert {r["split"] for r in summary["final"]} == {"validation", "test"}
    assert (result.run_dir / "tb").is_dir() and any((result.run_dir / "tb").iterdir())


def test_epochs_left_out_of_eval_epochs_are_not_scored_and_training_is_unchanged(tiny_run, tmp_path,
                                                                                 monkeypatch):
    cfg, full = tiny_run  # the same run, dev scored at both epoch ends
    calls = []
    real = experiment.ClassificationExperiment.evaluate
    monkeypatch.setattr(experiment.ClassificationExperiment, "evaluate", lambda self, *a, **k: calls.append(
        (k.get("include_test", False), k.get("dev", True))) or real(self, *a, **k))
    other = tiny_config(tmp_path / "last", cfg.task, "tiny,fixed", max_length=100, length_buckets=(32, 64),
                        dropout=False, **{"eval.speedups": (1.0, 50.0), "epochs": 2, "elimination.speedup": 2.0,
                                          "eval.epochs": (2,)})
    result = loop.fit(other)
    # epoch 2's dev evaluation, then the final table's test splits only (dev rows reused)
    assert calls == [(False, True), (True, False)]
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in records if r.get("event") == "eval"} == {2}
    train = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = lambda recs: [(r["step"], r["loss"], r["grad_norm"]) for r in recs if "loss" in r]
    assert losses(records) and losses(records) == losses(train)  # same data order, same dropout keys
    final = {(r["split"], r["speedup"]): r["primary"] for r in result.final_eval}
    epoch2 = [r for r in train if r.get("event") == "eval" and r["epoch"] == 2]
    assert {(r["split"], r["speedup"]): r["primary"] for r in epoch2} == {
        k: v for k, v in final.items() if k[0] == "validation"}
    assert {k[0] for k in final} == {"validation", "test"}
    bad = tiny_config(tmp_path / "bad", cfg.task, "tiny,fixed", **{"eval.epochs": (3,)})
    with pytest.raises(guards.UserError, match=r"eval.epochs must be epochs 1..1"):
        loop.fit(bad)


def test_a_broken_export_round_trip_fails_the_run(tiny_run, tmp_path, monkeypatch):
    cfg, _ = tiny_run
    real = convert.load

    def reloaded_wrong(*a, **k):  # the run folder's model, one weight off
        m = real(*a, **k)
        m.params = jax.tree.map(np.copy, m.params)
        m.params["classifier"]["bias"] += 1e-3
        return m

    monkeypatch.setattr(convert, "load", reloaded_wrong)
    other = tiny_config(tmp_path / "broken", cfg.task, "tiny,fixed", dropout=False)
    with pytest.raises(RuntimeError, match="does not reproduce the trained model's logits at 1x"):
        loop.fit(other)


def test_restart_with_another_config_refuses(tiny_run):
    cfg, result = tiny_run
    other = tiny_config(result.run_dir, cfg.task, "tiny,fixed", max_length=100, length_buckets=(32, 64),
                        dropout=False, **{"eval.speedups": (1.0, 50.0), "epochs": 2, "elimination.speedup": 3.0})
    with pytest.raises(ValueError, match=r"elimination.speedup: 2.0 -> 3.0"):
        loop.fit(other)


def test_epoch_lines_are_flushed_as_each_epoch_ends(tmp_path, monkeypatch):
    """stdout redirected to a file or a pipe is block-buffered: each epoch's lines are flushed
    when the epoch ends, so a log tailed during a long run shows them, not only at its end."""
    import io
    import sys

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.snapshots = []  # what had been written at each flush

        def flush(self):
            self.snapshots.append(self.getvalue())

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    task = sentiment_task(tmp_path / "data", n_train=32, n_dev=16)
    loop.fit(tiny_config(tmp_path / "run", task, epochs=2))
    assert "epoch 2 (step" in out.getvalue()
    assert any("epoch 1 (step" in text and "epoch 2 (step" not in text for text in out.snapshots)
