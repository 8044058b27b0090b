"""Issue 13: bad input, faults and the first hour. One test (or more) per numbered defect,
each reproducing it on tiny runs; the defect's number is in the test's docstring."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accjax import benchmark, data as data_lib, guards, loop, runfolder, train as train_lib
from tests.train_helpers import (REPO, compile_cache_in, sentiment_rows, sentiment_task, subprocess_env,
                                 tiny_config, write_csv)

# Tiny training runs: the same programs in many tests, compiled once per session.
pytestmark = pytest.mark.usefixtures("shared_compile_cache")


def _fit(tmp_path, name, spec, **kw):
    return loop.fit(tiny_config(tmp_path / name, spec, **kw))


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, session_xla_cache):
    """A tiny classifier trained on your own CSV files (labels 'neg' / 'pos')."""
    tmp = tmp_path_factory.mktemp("csv_run")
    spec = sentiment_task(tmp / "data", n_train=64, n_dev=32)
    with compile_cache_in(session_xla_cache):
        result = loop.fit(tiny_config(tmp / "run", spec, dropout=False))
    return result.run_dir, spec


# ------------------------------------------------------------------------------------ 1
def test_own_file_task_is_scored_by_eval_glue_offline_tune_and_max_drop(csv_run, tmp_path, capsys):
    """1: a checkpoint's own file task was refused (label count compared before reading)."""
    from eval import glue, offline_tune

    run, _ = csv_run
    assert glue.main(["--checkpoint", str(run), "--speedup", "2", "--batch_size", "16",
                      "--no-progress", "--json", str(tmp_path / "g.json")]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [r["speedup"] for r in rows] == [1.0, 2.0] and rows[0]["examples"] == 32
    assert offline_tune.main(["--checkpoint", str(run), "--speedups", "1,2", "--batch_size", "16",
                              "--no-progress", "--out", str(tmp_path / "tune")]) == 0
    assert (tmp_path / "tune" / "offline_tune.json").exists()
    assert glue.main(["--checkpoint", str(run), "--max_drop", "100", "--batch_size", "16",
                      "--no-progress"]) == 0
    assert "picked speedup" in capsys.readouterr().out
    # a file task with another label count is still refused, once its labels are read
    three = tmp_path / "three"
    write_csv(three / "train.csv", [("a b", "x"), ("c d", "y"), ("e f", "z")])
    write_csv(three / "dev.csv", [("a b", "x")])
    spec3 = f"csv:train={three / 'train.csv'},dev={three / 'dev.csv'},text=sentence,label=label"
    assert glue.main(["--checkpoint", str(run), "--task", spec3, "--no-progress"]) == 2
    assert "has 3" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ 2
def test_empty_dev_split_is_refused_before_training(tmp_path):
    """2: a header-only dev file crashed after the epoch (dense) or exported a NaN score."""
    spec = sentiment_task(tmp_path / "d", n_train=32, n_dev=8)
    write_csv(tmp_path / "d" / "dev.csv", [])
    for mode in ("dense", "elastic"):
        with pytest.raises(data_lib.DataError, match=r"validation split .*dev.csv.* holds no examples"):
            _fit(tmp_path, mode, spec, **{"elimination.mode": mode})
        assert not (tmp_path / mode / "checkpoints").exists()


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    """2, 3, 10: the CLI reports bad data and bad values in one line, exit 2, no traceback."""
    spec = sentiment_task(tmp_path / "d", n_train=32, n_dev=8)
    write_csv(tmp_path / "d" / "dev.csv", [])
    cmd = [sys.executable, "-m", "train.finetune", "--config=configs/rt_minilm.py:tiny",
           "--config.progress=False", f"--config.task={spec}"]
    r = subprocess.run(cmd + [f"--config.run_dir={tmp_path / 'r'}"], cwd=REPO,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: the validation split")
    r = subprocess.run(cmd + [f"--config.run_dir={tmp_path / 'r2'}", "--config.optim.lr=nan"],
                       cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: config: optim.lr must be a finite number" in r.stderr


def test_bench_and_profile_refuse_bad_shapes_and_counts_in_one_line(capsys):
    """eval.bench / eval.profile: a shape of 0 rows ran and printed a table of zeros, a
    malformed one exited 1; now each is one line, exit 2, before anything is built."""
    from eval import bench, profile

    for argv, message in (
            (["--shapes", "0x5"], "bad shape '0x5': batch and length must be >= 1, e.g. 32x128"),
            (["--shapes", "2x"], "bad shape '2x'; write BATCHxLENGTH, e.g. 32x128"),
            (["--iters", "0"], "--iters must be an integer >= 1, got 0"),
            (["--set", "foo"], "--set takes key=value, got 'foo'")):
        assert bench.main(argv) == 2
        assert capsys.readouterr().err.strip() == "error: " + message, argv
        with pytest.raises(SystemExit) as e:
            profile.main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == "error: " + message, argv


def test_glue_and_gpu_check_refuse_bad_values_before_any_work(capsys, monkeypatch):
    """eval.glue --max_drop -1 (or nan) started the default run's 15-minute training first;
    eval.gpu_check wrote its --json only at the end and died there with a traceback."""
    from accjax import loop
    from eval import glue, gpu_check

    monkeypatch.setattr(loop, "ensure_default_run", lambda: pytest.fail("trained before checking"))
    for value, says in (("-1", "must be >= 0, got -1"), ("nan", "must be a finite number, got nan")):
        assert glue.main(["--max_drop", value]) == 2
        assert capsys.readouterr().err.strip() == f"error: --max_drop (dev accuracy points) {says}"
    monkeypatch.setattr(gpu_check, "check_attention", lambda *a, **k: pytest.fail("ran before checking"))
    assert gpu_check.main(["--json", "/nonexistent/dir/x.json"]) == 2
    assert "/nonexistent/dir is not a writable folder" in capsys.readouterr().err


def test_finetune_refuses_a_missing_config_file_in_one_line():
    r = subprocess.run([sys.executable, "-m", "train.finetune", "--config=configs/no_such.py"], cwd=REPO,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --config: [Errno 2] No such file or directory: 'configs/no_such.py'; pass a config file, "
        "e.g. --config configs/rt_minilm.py"]


def test_finetune_refuses_an_override_given_twice_in_one_line(tmp_path):
    """ml_collections joins a tuple given twice, (1, 4.8) -> (1, 4.8, 1, 4.8): the run died on
    'too many values to unpack (expected 2)'. Now the repeat is named, before anything is read."""
    r = subprocess.run([sys.executable, "-m", "train.finetune", "--config=configs/rt_minilm.py:elastic,tiny",
                        "--config.elimination.speedup_range=(1.0,5.0)", "--config.epochs=1",
                        "--config.elimination.speedup_range=(1.0,4.8)", f"--config.run_dir={tmp_path / 'r'}"],
                       cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --config.elimination.speedup_range is given 2 times; pass each --config.* override once"]
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match=r"speedup_range must be \(low, high\).*got \(1.0, 4.8, 1.0, 4.8\)"):
        train_lib.SpeedupSampler("elastic", speedup_range=(1.0, 4.8, 1.0, 4.8), levels=3)


# ------------------------------------------------------------------------------------ 3
def test_nan_learning_rate_is_refused(tmp_path):
    """3: --config.optim.lr=nan trained to the end and exported an all-NaN model."""
    spec = sentiment_task(tmp_path / "d", n_train=32, n_dev=8)
    for key, value in (("optim.lr", float("nan")), ("optim.lr", float("inf")), ("optim.lr", 0.0),
                       ("optim.eps", -1.0), ("optim.b2", 1.0)):
        with pytest.raises(guards.UserError, match=key.replace(".", r"\.")):
            _fit(tmp_path, "r", spec, **{key: value})
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_divergence_stops_training_naming_the_step(tmp_path):
    """3: a loss that turns NaN mid-run stops the run; nothing NaN is saved or exported."""
    spec = sentiment_task(tmp_path / "d", n_train=64, n_dev=8)
    cfg = tiny_config(tmp_path / "r", spec, **{"optim.lr": 1e38, "optim.clip": 0.0,
                                               "optim.warmup_ratio": 0.0, "log_every_steps": 1})
    with pytest.raises(guards.NonFiniteError, match=r"training diverged at step \d+"):
        loop.fit(cfg)
    assert not (tmp_path / "r" / "accjax.json").exists()  # no NaN "best" model
    for step in runfolder.checkpoint_steps(tmp_path / "r"):  # every resume point is finite
        from accjax import checkpoint

        params, _ = checkpoint.restore_params(tmp_path / "r", step)
        assert all(np.isfinite(x).all() for x in _leaves(params))


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def test_check_finite_metrics_names_the_first_bad_step():
    guards.check_finite_metrics([{"loss": 0.5, "grad_norm": 1.0}], first_step=3)
    with pytest.raises(guards.NonFiniteError, match="step 8: grad_norm is inf"):
        guards.check_finite_metrics([{"loss": 0.5, "grad_norm": 1.0},
                                     {"loss": 0.4, "grad_norm": np.float32(np.inf)},
                                     {"loss": np.nan, "grad_norm": 1.0}], first_step=7)
    with pytest.raises(guards.NonFiniteError, match="step 2: parameter a/b holds NaN"):
        guards.check_finite_params({"a": {"b": np.array([1.0, np.nan])}, "c": np.ones(2)}, 2)


# ------------------------------------------------------------------------------------ 4
def test_run_folder_is_locked_while_a_run_writes_it(tmp_path):
    """4: two trainings in one run folder both ran to the end."""
    run = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from accjax import runfolder; "
         f"runfolder.lock({str(run)!r}); print('locked', flush=True); time.sleep(120)"],
        cwd=REPO, env=subprocess_env(1), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        spec = sentiment_task(tmp_path / "d", n_train=32, n_dev=8)
        with pytest.raises(runfolder.RunFolderBusy, match=f"in use by another training process "
                                                          f"\\(pid {holder.pid}\\)"):
            _fit(tmp_path, "r", spec)
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
        from eval import glue  # the embedded default's first run, started twice at once

        env = {"ACCJAX_DEFAULT_RUN": str(run), "ACCJAX_DEFAULT_CONFIG": "rt_minilm.py:tiny"}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            assert glue.main(["--no-progress"]) == 2
    finally:
        holder.kill()
        holder.wait()
    runfolder.lock(run)  # the kernel dropped the killed holder's lock
    runfolder.unlock(run)


# ------------------------------------------------------------------------------------ 7
def test_resume_checks_the_config_inside_the_checkpoint_and_survives_torn_files(tmp_path, capsys):
    """4: restarting after train_config.json was deleted resumed with a changed config.
    7: a torn metrics.jsonl line or a corrupt newest checkpoint blocked every restart.
    (One run serves both: the refused restart changes nothing, the same config then resumes.)"""
    spec = sentiment_task(tmp_path / "d", n_train=64, n_dev=8)
    kw = {"epochs": 2, "checkpoint.every_steps": 2, "checkpoint.keep": 3}
    _fit(tmp_path, "r", spec, **kw, **{"debug.max_steps": 6})
    run = tmp_path / "r"
    assert runfolder.checkpoint_steps(run) == [6, 4, 2]
    (run / "train_config.json").unlink()
    with pytest.raises(ValueError, match=r"another config \(optim.lr: 0.001 -> 0.002\)"):
        _fit(tmp_path, "r", spec, **kw, **{"optim.lr": 2e-3})
    assert runfolder.checkpoint_steps(run) == [6, 4, 2]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.')  # killed mid-write
    for f in glob.glob(str(run / "checkpoints" / "6" / "state" / "**" / "d" / "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(10)
    capsys.readouterr()
    result = _fit(tmp_path, "r", spec, **kw)  # the same config resumes
    out = capsys.readouterr().out
    assert result.resumed_from == 4 and result.steps == 8
    assert "checkpoint(s) at step 6" in out and "intact one at step 4" in out
    assert (run / "checkpoints.corrupt" / "6").is_dir()
    records = runfolder.read_jsonl(run / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 8


def test_read_jsonl_skips_only_torn_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert runfolder.read_jsonl(p) == [{"step": 1}, {"step": 2}]


# ----------------------------------------------------------------------------------- 10
def test_rerunning_a_finished_run_changes_nothing(csv_run):
    """10: a re-run appended duplicate final records and wiped train_seconds_per_epoch."""
    run, spec = csv_run
    before = {n: (run / n).read_bytes() for n in ("summary.json", "metrics.jsonl", "accjax.json")}
    result = loop.fit(tiny_config(run, spec, dropout=False))
    assert result.final_eval and result.seconds_per_epoch == json.loads(before["summary.json"])["train_seconds_per_epoch"]
    assert {n: (run / n).read_bytes() for n in before} == before


# ------------------------------------------------------------------------------------ 5
def test_convert_never_rewrites_a_run_folder(csv_run, tmp_path, capsys):
    """5: `accjax.convert RUN RUN` rewrote accjax.json without its task and training config."""
    from accjax import convert

    run, _ = csv_run
    before = (run / "accjax.json").read_bytes()
    assert convert.main([str(run), str(run)]) == 2
    assert "is the source folder" in capsys.readouterr().err
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "train_config.json").write_text("{}")
    assert convert.main([str(run), str(other)]) == 2
    assert "training run's folder" in capsys.readouterr().err
    assert (run / "accjax.json").read_bytes() == before
    assert convert.main([str(run), str(tmp_path / "copy")]) == 0  # a new folder is fine


# ----------------------------------------------------------------------------------- 13
def test_hf_export_carries_the_task_label_names(csv_run, tmp_path):
    """13: the HF export named the labels LABEL_0 / LABEL_1."""
    import transformers

    from accjax import convert

    run, _ = csv_run
    assert json.loads((run / "accjax.json").read_text())["label_names"] == ["neg", "pos"]
    assert convert.main([str(run), str(tmp_path / "hf"), "--to-hf"]) == 0
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert cfg.id2label == {0: "neg", 1: "pos"} and cfg.label2id == {"neg": 0, "pos": 1}
    # an older run folder without label_names: a built-in task still names them
    meta = json.loads((run / "accjax.json").read_text())
    meta.pop("label_names")
    meta["task"] = "sst2"
    old = tmp_path / "old"
    old.mkdir()
    for name in ("params.safetensors", "tokenizer.json", "vocab.txt"):
        (old / name).write_bytes((run / name).read_bytes())
    (old / "accjax.json").write_text(json.dumps(meta))
    assert convert.label_names(convert.load(old, "sequence_classification")) == ("negative", "positive")


# ----------------------------------------------------------------------------------- 10
@pytest.mark.parametrize("damage, message", [
    (lambda m: "{not json", "is not valid JSON"),
    (lambda m: {**m, "family": None}, "field 'family' is missing"),
    (lambda m: {**m, "family": "nope"}, "unknown model family 'nope'"),
    (lambda m: {**m, "config": {**m["config"], "hidden_size": "32"}}, "config field 'hidden_size' is '32'"),
    (lambda m: {**m, "config": {**m["config"], "hidden_size": 64}}, "do not match accjax.json"),
    (lambda m: {**m, "config": {**m["config"], "colour": 1}}, r"unknown config field\(s\) \['colour'\]"),
])
def test_corrupted_accjax_json_is_named_not_a_traceback(csv_run, tmp_path, capsys, damage, message):
    """10: a corrupted accjax.json field gave raw flax / TypeError / KeyError tracebacks."""
    from accjax import convert
    from eval import glue

    run, _ = csv_run
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("params.safetensors", "tokenizer.json", "vocab.txt"):
        (bad / name).write_bytes((run / name).read_bytes())
    meta = damage(json.loads((run / "accjax.json").read_text()))
    (bad / "accjax.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    with pytest.raises(convert.CheckpointError, match=message):
        convert.load(bad, "sequence_classification")
    assert glue.main(["--checkpoint", str(bad), "--no-progress"]) == 2
    assert message.split("'")[0].split("\\")[0] in capsys.readouterr().err


# ------------------------------------------------------------------------------------ 9
def test_pinned_fetch_never_builds_an_sdist(tmp_path, monkeypatch):
    """9: `pip download` built an sdist an index offered (its build backend ran code)."""
    import tarfile

    from accjax import hub

    src = tmp_path / "evilpkg-0.1"
    src.mkdir()
    marker = tmp_path / "backend-ran"
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n')
    (src / "backend.py").write_text(  # runs when pip imports the backend to build
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "def get_requires_for_build_wheel(config_settings=None): return []\n")
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: evilpkg\nVersion: 0.1\n")
    links = tmp_path / "links"
    links.mkdir()
    with tarfile.open(links / "evilpkg-0.1.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="evilpkg-0.1")
    monkeypatch.setenv("ACCJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # only the folder below is an index
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    art = hub.PypiArtifact("evilpkg", "0.1", "0" * 64, "evilpkg/")
    with pytest.raises(hub.ModelNotFoundError, match="could not download evilpkg==0.1"):
        hub.fetch_pypi(art, quiet=True)
    assert not marker.exists()


def test_hub_downloads_take_the_revision_pin(monkeypatch, tmp_path):
    """9: snapshot_download and load_dataset got no revision even when the user gave one."""
    import types

    import huggingface_hub

    from accjax import hub, tasks

    calls = []

    def fake_snapshot(repo_id, revision=None, **kw):
        calls.append((repo_id, revision))
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "model.safetensors").write_bytes(b"")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    hub.resolve("org/model@abc123")
    hub.resolve("org/model")
    assert calls == [("org/model", "abc123"), ("org/model", None)]

    loads = []

    def fake_load_dataset(hub_id, config, revision=None):
        loads.append((hub_id, config, revision))
        return {"validation": {"sentence": ["good"], "label": [1]}}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    task = tasks.get_task("sst2@v1.0")
    assert task.spec == "sst2@v1.0" and tasks.get_task(task.spec) == task
    got = data_lib.load_task(task, splits=["validation"])
    assert loads == [("nyu-mll/glue", "sst2", "v1.0")] and got["validation"][0].label == 1
    with pytest.raises(tasks.UnknownTaskError, match="NAME@REVISION"):
        tasks.get_task("rt_polarity@x")


# ------------------------------------------------------------------------------------ 6
def test_long_texts_non_utf8_and_numeric_label_spellings(tmp_path):
    """6: texts over 131,072 characters raised a raw _csv.Error; non-UTF-8 input a bare
    UnicodeDecodeError; CSV labels 1 and 1.0 were two classes."""
    long = "word " * 40_000  # 200,000 characters
    rows = [(long, "1"), ("bad film", "0"), ("good film", "1.0"), ("dull", "0.0")]
    write_csv(tmp_path / "train.csv", rows)
    write_csv(tmp_path / "dev.csv", [("fine", "1")])
    spec = f"csv:train={tmp_path / 'train.csv'},dev={tmp_path / 'dev.csv'},text=sentence,label=label"
    data = data_lib.load_task(spec)
    assert data.task.label_names == ("0", "1") and data.task.num_labels == 2
    assert [e.label for e in data["train"]] == [1, 0, 1, 0] and len(data["train"][0].text) == 200_000
    # the GLUE TSV reader (train.finetune and eval.glue --data_dir) too
    sst = tmp_path / "glue" / "SST-2"
    sst.mkdir(parents=True)
    (sst / "train.tsv").write_text(f"sentence\tlabel\n{long}\t1\nbad\t0\n")
    (sst / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    glue = data_lib.load_task("sst2", tmp_path / "glue")
    assert len(glue["train"][0].text) == 200_000 and glue["validation"][0].label == 1
    (tmp_path / "latin.csv").write_bytes("sentence,label\ncaf\xe9 cr\xe8me,1\nok,0\n".encode("latin-1"))
    bad = spec.replace(str(tmp_path / "train.csv"), str(tmp_path / "latin.csv"))
    with pytest.raises(data_lib.DataError, match=r"latin.csv: not UTF-8 text"):
        data_lib.load_task(bad)


# ------------------------------------------------------------------------------------ 8
def test_eval_glue_reads_the_data_dir_the_run_trained_with(csv_run, tmp_path, monkeypatch):
    """8: eval.glue went to the hub although the run recorded its data_dir."""
    from accjax import evaluation

    run, _ = csv_run
    sst = tmp_path / "glue" / "SST-2"
    sst.mkdir(parents=True)
    rows = "\n".join(f"{t}\t{int(y == 'pos')}" for t, y in sentiment_rows(20, 5))
    (sst / "dev.tsv").write_text("sentence\tlabel\n" + rows + "\n")
    folder = tmp_path / "sst2_run"
    folder.mkdir()
    for name in ("params.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        if (run / name).exists():
            (folder / name).write_bytes((run / name).read_bytes())
    meta = json.loads((run / "accjax.json").read_text())
    meta["task"] = "sst2"
    meta["train_config"]["data_dir"] = str(tmp_path / "glue")
    (folder / "accjax.json").write_text(json.dumps(meta))
    monkeypatch.setitem(sys.modules, "datasets", None)  # the hub path would fail at import
    rows = evaluation.evaluate(evaluation.RunModel.load(folder), batch_size=16, progress=False)
    assert rows[0]["task"] == "sst2" and rows[0]["examples"] == 20


# ----------------------------------------------------------------------------------- 10
def test_eval_clis_check_values_and_paths_before_any_work(csv_run, tmp_path, monkeypatch, capsys):
    """10: --batch_size 0 divided by zero, 100000 was killed at 24 GB; train.evaluate took
    speedups 0, -1, 0.5 and inf; 'nan is below 1'; read-only outputs failed after the work;
    eval.lm --bucket 0 divided by zero."""
    from accjax import evaluation
    from eval import glue, lm, offline_tune
    from train import evaluate as train_evaluate

    run, _ = csv_run
    worked = []
    monkeypatch.setattr(evaluation, "evaluate_folder", lambda *a, **k: worked.append(1) or [])
    monkeypatch.setattr(evaluation, "offline_tune", lambda *a, **k: worked.append(1) or {})
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: worked.append(1) or [])

    def fails(main, argv, message):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    fails(glue.main, ["--checkpoint", str(run), "--batch_size", "0"], "--batch_size must be an integer >= 1, got 0")
    fails(glue.main, ["--checkpoint", str(run), "--batch_size", "100000"], "--batch_size 100000 is larger than 4096")
    fails(offline_tune.main, ["--checkpoint", str(run), "--batch_size", "0"], "--batch_size must be")
    for bad, message in (("0,-1,0.5", "speedup 0 is below 1"), ("inf", "speedup inf is not a finite number"),
                         ("nan", "speedup nan is not a finite number")):
        fails(train_evaluate.main, [str(run), "--speedups", bad], message)
    fails(train_evaluate.main, [str(run), "--batch_size", "0"], "--batch_size must be")
    afile = tmp_path / "afile"
    afile.write_text("")
    fails(train_evaluate.main, [str(run), "--out", str(afile / "eval.json")], "is not a writable folder")
    fails(glue.main, ["--checkpoint", str(run), "--json", str(afile / "g.json")], "is not a writable folder")
    fails(lm.main, ["--model", "gpt2", "--bench", "--bucket", "0"], "--bucket must be an integer >= 1, got 0")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) in (run, afile) else real_access(p, mode))
    fails(offline_tune.main, ["--checkpoint", str(run)], f"{run} is not writable")
    fails(glue.main, ["--checkpoint", str(run), "--json", str(afile)], "the file is read-only")
    assert not worked


def test_stale_offline_tune_table_is_not_used(csv_run, tmp_path, capsys):
    """10: an offline_tune.json left by another checkpoint was used unchecked."""
    from accjax import evaluation

    run, _ = csv_run
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in run.iterdir():
        if p.is_file() and p.name != "offline_tune.json":
            (folder / p.name).write_bytes(p.read_bytes())
    model = evaluation.RunModel.load(folder)
    table = evaluation.offline_tune(model, speedups=[1.0, 2.0], batch_size=16, progress=False)
    assert evaluation.read_tune(folder)["rows"] == json.loads(json.dumps(table["rows"]))
    stale = {**table, "model_sha256": "0" * 64}
    (folder / "offline_tune.json").write_text(json.dumps(stale, default=benchmark.json_default))
    assert evaluation.read_tune(folder) is None
    assert "measured on other weights" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- 11
def test_first_run_message_names_the_recipe_it_trains(tmp_path, monkeypatch, capsys):
    """11: the first-run message named rt_minilm.py:elastic but trained another range."""
    got = []
    monkeypatch.delenv("ACCJAX_DEFAULT_CONFIG", raising=False)
    monkeypatch.setenv("ACCJAX_DEFAULT_RUN", str(tmp_path / "default"))
    monkeypatch.setattr(loop, "fit", lambda config: got.append(config))
    loop.ensure_default_run()
    err = capsys.readouterr().err
    (config,) = got
    lo, hi = config.elimination.speedup_range
    # the sandwich recipe trains 1x and the top level every step: the message says so
    assert config.elimination.sandwich and config.elimination.samples == 0
    assert tuple(config.eval.epochs) == (config.epochs - 1, config.epochs)  # dev scored after the last two
    assert config.matmul_dtype == "auto" and config.distill.hidden_layers == "all"
    import jax

    assert config.train_pad_multiple == (16 if jax.default_backend() == "cpu" else 0)
    assert config.warm_start.epochs >= 1  # a dense fine-tune first, then the elastic epochs
    assert (f"{config.warm_start.epochs} dense epoch(s), then over speedups {lo:g}-{hi:g}, "
            f"{config.epochs} epochs: each step trains 1x and {hi:g}x") in err
    # the estimate is the one measured for this CPU: bf16 products where it has their
    # instructions ('auto'), float32 ones (about twice the time) where it has AVX2 alone
    from accjax.models import common

    for flags, minutes in ((frozenset({"avx2", "amx_bf16"}), "about 13-15 minutes on 2 quiet CPU cores;"),
                           (frozenset({"avx2"}), "about 21-23 minutes on 2 quiet CPU cores without bfloat16")):
        monkeypatch.setattr(common, "cpu_features", lambda flags=flags: flags)
        loop.ensure_default_run()
        assert minutes in capsys.readouterr().err


def test_result_table_says_the_batch_size_and_what_drop_is_against(csv_run):
    """11: ms/batch did not say the batch size; drop did not say against what."""
    from accjax import evaluation

    run, _ = csv_run
    rows = evaluation.evaluate(evaluation.RunModel.load(run), speedups=[2.0], batch_size=16,
                               progress=False)
    last = evaluation.format_table(rows).splitlines()[-1]
    assert last.startswith("ms/batch: per batch of 16 examples; drop: the dense row's primary metric")
    assert rows[1]["drop"] == pytest.approx(rows[0]["primary"] - rows[1]["primary"])


# ----------------------------------------------------------------------------------- 12
def test_progress_bars_show_when_output_is_piped(csv_run, capsys):
    """12: tqdm(disable=None) hid the evaluation bars when stderr was not a terminal."""
    from accjax import evaluation

    run, _ = csv_run
    assert not sys.stderr.isatty()  # pytest's capture: a pipe, as `| tee` makes
    evaluation.evaluate(evaluation.RunModel.load(run), batch_size=16, progress=True)
    assert "validation x1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- 13
def test_readme_python_snippet_runs_and_names_the_labels(csv_run, capsys):
    """13: the README's snippet did not show how to tokenize texts into a batch."""
    text = (REPO / "README.md").read_text()
    block = next(b.split("```", 1)[0] for b in text.split("```python\n")[1:] if "Tokenizer.from_folder" in b)
    run, _ = csv_run
    exec(block.replace('"runs/rt_minilm_elastic"', repr(str(run))), {})
    printed = capsys.readouterr().out.strip()
    labels = eval(printed)
    assert len(labels) == 2 and set(labels) <= {"neg", "pos"}


def test_a_nan_model_folder_is_refused_not_scored(csv_run, tmp_path, capsys):
    """3: eval.glue reported 42.62% on an all-NaN model without a word."""
    from safetensors.numpy import load_file, save_file

    from accjax import convert
    from eval import glue

    run, _ = csv_run
    folder = tmp_path / "nan"
    folder.mkdir()
    for name in ("accjax.json", "tokenizer.json", "vocab.txt"):
        (folder / name).write_bytes((run / name).read_bytes())
    params = load_file(str(run / "params.safetensors"))
    key = sorted(params)[0]
    params[key] = np.full_like(params[key], np.nan)
    save_file(params, str(folder / "params.safetensors"))
    with pytest.raises(convert.CheckpointError, match="hold NaN or inf"):
        convert.load(folder, "sequence_classification")
    assert glue.main(["--checkpoint", str(folder), "--no-progress"]) == 2
    assert "the model diverged in training" in capsys.readouterr().err


def test_cli_reports_another_config_and_bad_mesh_values_in_one_line(csv_run, tmp_path):
    """4, 10: a restart with another config (and bad sampler / mesh values) gave tracebacks."""
    run, spec = csv_run
    files = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    before = files()
    base = [sys.executable, "-m", "train.finetune", "--config=configs/rt_minilm.py:tiny",
            "--config.progress=False", f"--config.task={spec}", "--config.max_examples=0",
            "--config.length_buckets=(32,)", "--config.max_length=32", "--config.eval.speedups=(1.0,)",
            "--config.eval.select_mean=False", "--config.dropout=False"]
    for extra, message in (
            ([f"--config.run_dir={run}", "--config.optim.lr=0.5"], "holds a run with another config"),
            ([f"--config.run_dir={tmp_path / 'x'}", "--config.elimination.mode=elastic",
              "--config.elimination.speedup_range=(3.0,2.0)"], "config: elimination.speedup_range"),
            ([f"--config.run_dir={tmp_path / 'y'}", "--config.mesh.data=3"], "mesh data=3")):
        r = subprocess.run(base + extra, cwd=REPO, env=subprocess_env(1), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert message in r.stderr.strip().splitlines()[-1]
    assert files() == before  # the refused restart left the run as it was


def test_lock_is_reentrant_in_one_process_whatever_the_path_spelling(tmp_path):
    """4: a second lock of the same folder by its holder (an in-process restart after an
    error, or a symlinked path) must not report the process itself as another writer."""
    (tmp_path / "link").symlink_to(tmp_path)
    runfolder.lock(tmp_path / "run")
    runfolder.lock(tmp_path / "link" / "run")
    assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())
    runfolder.unlock(tmp_path / "link" / "run")
    probe = subprocess.run([sys.executable, "-c", "from accjax import runfolder; "
                            f"runfolder.lock({str(tmp_path / 'run')!r}); print('free')"],
                           cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "free"  # unlocked through either spelling
