"""Configs (every file loads, overrides work, unknown keys fail) and bad input to the trainer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import jax

from accjax import loop, sharding
from accjax.data import DataError, DataNotFoundError
from accjax.tasks import UnknownTaskError
from tests.train_helpers import REPO, load_config_file, sentiment_task, subprocess_env, tiny_config, write_csv

# Tiny training runs: the same programs in many tests, compiled once per session.
pytestmark = pytest.mark.usefixtures("shared_compile_cache")


@pytest.mark.parametrize("name,arg", [
    ("rt_minilm", None), ("rt_minilm", "elastic"), ("rt_minilm", "tiny,fixed"), ("rt_minilm", "elastic,sandwich"),
    ("rt_minilm", "elastic,sandwich,hidden"), ("rt_minilm", "elastic,sandwich,long"),
    ("glue_bert_base", "sst2"), ("glue_bert_base", "mnli,elastic,fsdp"), ("glue_bert_base", "stsb,tiny"),
    ("flan_t5_instruct", None), ("flan_t5_instruct", "tiny,dense"),
])
def test_every_config_loads_and_validates(name, arg):
    from accjax import experiment

    c = load_config_file(name, arg)
    experiment.validate_config(c)
    text = (REPO / "configs" / f"{name}.py").read_text()
    doc = text.split('"""')[1]
    assert "python -m train.finetune --config configs/" + name + ".py" in doc  # its launch command
    # every field carries a comment: the shared defaults (experiment.base_config) and the
    # fields a config file adds (the tiny block and recipe changes only change values)
    import inspect

    body = inspect.getsource(experiment.base_config) + "\n".join(
        line for line in text.split('if "tiny" in words:')[0].split("if tiny:")[0].splitlines()
        if not any(line.strip().startswith(f"c.{k}") for k in _base_keys()))
    fields = [line for line in body.splitlines() if line.strip().startswith("c.") and " = " in line]
    assert len(fields) > 40
    assert [f for f in fields if "#" not in f and "ConfigDict()" not in f] == []


def _base_keys() -> list[str]:
    """Dotted keys base_config defines (a config file may set them without a comment)."""
    from accjax import experiment

    c = experiment.base_config("classification", "dense")
    return sorted({k for k in c} | {f"{k}.{j}" for k in c if hasattr(c[k], "keys") for j in c[k]},
                  key=len, reverse=True)


def test_config_arguments_select_modes():
    assert load_config_file("rt_minilm").elimination.mode == "dense"
    el = load_config_file("rt_minilm", "elastic")
    assert el.elimination.mode == "elastic" and el.eval.select_mean and el.run_dir == "runs/rt_minilm_elastic"
    rt = load_config_file("rt_minilm")  # the HF PyTorch reference recipe (docs/results.md)
    assert (rt.batch_size, rt.max_length, rt.optim.lr, rt.optim.weight_decay, rt.optim.warmup_ratio,
            rt.optim.clip, rt.epochs, rt.seed) == (32, 64, 5e-5, 0.01, 0.1, 1.0, 3, 0)
    fsdp = load_config_file("glue_bert_base", "qqp,fsdp")
    assert (fsdp.mesh.data, fsdp.mesh.fsdp) == (1, -1) and ("embed", "fsdp") in fsdp.logical_axis_rules
    with pytest.raises(ValueError, match="name one GLUE task"):
        load_config_file("glue_bert_base", "sst3")
    with pytest.raises(ValueError, match="unknown config argument"):
        load_config_file("rt_minilm", "elastc")
    fuse = load_config_file("rt_minilm", "elastic,sandwich,hidden,warm,fuse")
    assert fuse.elimination.fuse == "acc" and fuse.run_dir.endswith("_warm_fuse")
    assert load_config_file("rt_minilm", "elastic,sandwich,hidden,warm").elimination.fuse == ""


def _parse(*argv):
    fv = flags.FlagValues()
    # Override flags are defined from the argument list when the config flag is declared.
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=["prog", *argv])
    fv(["prog", *argv])
    return fv.config


def test_command_line_overrides_and_unknown_keys():
    path = str(REPO / "configs" / "rt_minilm.py")
    c = _parse(f"--config={path}:elastic", "--config.optim.lr=3e-5", "--config.eval.speedups=(1.0,2.5)",
               "--config.elimination.speedup_range=(1.0,3.0)")
    assert c.optim.lr == 3e-5 and tuple(c.eval.speedups) == (1.0, 2.5)
    assert tuple(c.elimination.speedup_range) == (1.0, 3.0) and c.elimination.mode == "elastic"
    with pytest.raises((AttributeError, KeyError), match="lrr"):
        _parse(f"--config={path}", "--config.optim.lrr=3e-5")


def test_cli_reports_an_unknown_key_in_one_line():
    r = subprocess.run([sys.executable, "-m", "train.finetune", "--config=configs/rt_minilm.py",
                        "--config.optim.lrr=3e-5"], cwd=REPO, env=subprocess_env(1),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error: the config has no key 'lrr'" in r.stderr and 'Did you mean "lr"' in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("arg,says", [("elastic,bogus", "unknown config argument(s) ['bogus']"),
                                      ("elastic,long", "'long' extends 'sandwich'"),
                                      ("elastic,hidden", "'hidden' extends 'sandwich'"),
                                      ("fuse", "'fuse' needs elimination")])
def test_cli_reports_a_bad_config_word_in_one_line(arg, says):
    r = subprocess.run([sys.executable, "-m", "train.finetune", f"--config=configs/rt_minilm.py:{arg}"],
                       cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and says in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_input_fails_clearly(tmp_path):
    spec = sentiment_task(tmp_path / "ok", n_train=32, n_dev=16)
    cases = []
    cases.append((tiny_config(tmp_path / "r1", "no_such_task"), UnknownTaskError, "unknown task 'no_such_task'"))
    missing = spec.replace(str(tmp_path / "ok" / "dev.csv"), str(tmp_path / "nope.csv"))
    cases.append((tiny_config(tmp_path / "r2", missing), DataNotFoundError, "missing data file .*nope.csv"))
    write_csv(tmp_path / "bad" / "dev.csv", [("good film", "pos"), ("odd film", "maybe")])
    badlabel = spec.replace(str(tmp_path / "ok" / "dev.csv"), str(tmp_path / "bad" / "dev.csv"))
    cases.append((tiny_config(tmp_path / "r3", badlabel), DataError,
                  r"label 'maybe' in .*dev.csv line 3 is not in the label set"))
    cases.append((tiny_config(tmp_path / "r4", spec, **{"elimination.mode": "sometimes"}), ValueError,
                  "elimination.mode must be one of"))
    cases.append((tiny_config(tmp_path / "r5", spec, **{"eval.select_speedup": 3.0}), ValueError,
                  "select_speedup 3.0 is not one of eval.speedups"))
    cases.append((tiny_config(tmp_path / "r6", spec, batch_size=12), ValueError,
                  "batch_size 12 does not split over 8 devices"))
    cases.append((tiny_config(tmp_path / "r7", spec, **{"distill.hidden_weight": 0.5}), ValueError,
                  "hidden_weight > 0 needs elimination.sandwich"))
    cases.append((tiny_config(tmp_path / "r8", spec, **{"distill.hidden_weight": -1.0}), ValueError,
                  "distill.hidden_weight must be >= 0, got -1.0"))
    cases.append((tiny_config(tmp_path / "r9", spec, **{"distill.hidden_layers": "first"}), ValueError,
                  "distill.hidden_layers must be one of last, all, both, got 'first'"))
    cases.append((tiny_config(tmp_path / "r10", spec, train_pad_multiple=-8), ValueError,
                  r"train_pad_multiple must be >= 0 \(0: pad to the length bucket\), got -8"))
    cases.append((tiny_config(tmp_path / "r11", spec, matmul_dtype="bf16"), ValueError,
                  r"matmul_dtype must be one of '', 'float32', 'bfloat16', 'float16', 'auto', not 'bf16'"))
    cases.append((tiny_config(tmp_path / "r12", spec, **{"optim.average": 1.0}), ValueError,
                  r"optim.average must be in \[0, 1\) \(0: no weight average\), got 1"))
    cases.append((tiny_config(tmp_path / "r13", spec, **{"optim.layer_decay": 0.0}), ValueError,
                  "optim.layer_decay must be > 0, got 0"))
    cases.append((tiny_config(tmp_path / "r14", spec, **{"warm_start.epochs": 1}), ValueError,
                  "warm_start.epochs > 0 needs elimination.mode 'fixed' or 'elastic'"))
    cases.append((tiny_config(tmp_path / "r15", spec, "elastic,tiny", **{"warm_start.epochs": 1,
                                                                       "warm_start.lr": 0.0}),
                  ValueError, "warm_start.lr must be > 0, got 0"))
    cases.append((tiny_config(tmp_path / "r16", spec, **{"elimination.fuse": "sum"}), ValueError,
                  "elimination.fuse must be one of '', 'acc', 'mean', not 'sum'"))
    gpt2 = tiny_config(tmp_path / "r17", spec, "elastic,tiny", **{"elimination.fuse": "acc"})
    gpt2.model = "preset:gpt2"
    cases.append((gpt2, ValueError, "elimination.fuse works for BERT-family encoders only"))
    for cfg, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            loop.fit(cfg)
    assert not (tmp_path / "r1" / "checkpoints").exists()  # nothing was started
    assert not (tmp_path / "r15" / "dense").exists()  # no warm start was begun either


def test_a_warm_start_fine_tunes_densely_first_and_the_run_starts_from_its_model(tmp_path, monkeypatch):
    from accjax import convert, experiment

    spec = sentiment_task(tmp_path / "d", n_train=32, n_dev=16)
    cfg = tiny_config(tmp_path / "r", spec, "elastic,tiny",
                      **{"warm_start.epochs": 2, "warm_start.lr": 3e-3, "debug.max_steps": 1,
                         "elimination.levels": 2})
    started = []
    original = experiment.build
    monkeypatch.setattr(experiment, "build", lambda c: started.append(c) or original(c))
    res = loop.fit(cfg)
    dense, run = started  # two runs were built: the dense one first
    assert (dense.elimination.mode, dense.epochs, dense.optim.lr) == ("dense", 2, 3e-3)
    assert dense.run_dir == str(tmp_path / "r" / "dense") and dense.debug.max_steps == 0
    assert loop.runfolder.finished(tmp_path / "r" / "dense", 2 * 2)  # 2 epochs of 2 steps: complete
    # the elastic run starts from the dense run's exported model and records it
    assert run.elimination.mode == "elastic" and run.model == str(tmp_path / "r" / "dense")
    saved = (tmp_path / "r" / "train_config.json").read_text()
    assert f'"model": "{tmp_path / "r" / "dense"}"' in saved
    start = experiment.build(run).params  # what the elastic run began from ...
    end = convert.load(tmp_path / "r" / "dense").params  # ... is the dense fine-tune's model
    np.testing.assert_array_equal(start["bert"]["layer_0"]["mlp_in"]["kernel"],
                                  end["layer_0"]["mlp_in"]["kernel"])
    assert res.steps == 1  # debug.max_steps stopped the elastic run, not the dense one
    # run again: the dense run is found finished, the elastic one resumes where it stopped
    cfg.debug.max_steps, built = 0, len(started)
    assert loop.fit(cfg).resumed_from == 1
    assert len(started) == built + 2


def test_a_fused_run_trains_says_so_and_exports_a_model_that_fuses(tmp_path, capsys):
    """elimination.fuse through the whole loop: the sandwich step with every layer's hidden
    states (fused rows left out) trains, the run's first line names it, and the exported model
    (what eval.glue, Predictor and accjax.export load) fuses as well."""
    from accjax import convert

    spec = sentiment_task(tmp_path / "d", n_train=32, n_dev=16)
    cfg = tiny_config(tmp_path / "r", spec, "elastic,sandwich,hidden,tiny,fuse", **{"elimination.levels": 2})
    cfg.eval.speedups, cfg.eval.select_mean = (1.0, 3.0), True
    res = loop.fit(cfg)
    assert "dropped rows fused into one (acc weights)" in capsys.readouterr().out
    assert np.isfinite(res.final_eval[0]["primary"]) and {r["speedup"] for r in res.final_eval} == {1.0, 3.0}
    assert convert.load(tmp_path / "r").config.fuse_dropped == "acc"


def test_glue_config_trains_with_fsdp_on_a_glue_tsv_folder(tmp_path):
    """configs/glue_bert_base.py:sst2,tiny,fsdp on a GLUE-layout SST-2 folder (8 fake devices)."""
    import json

    from accjax import checkpoint
    from tests.train_helpers import sentiment_rows

    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for name, seed, n in (("train.tsv", 0, 64), ("dev.tsv", 1, 32)):
        rows = [f"{t}\t{int(y == 'pos')}" for t, y in sentiment_rows(n, seed)]
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    c = load_config_file("glue_bert_base", "sst2,tiny,fsdp")
    c.data_dir = str(tmp_path / "glue")
    c.run_dir = str(tmp_path / "run")
    c.length_buckets = (32,)
    c.max_length = 32
    c.eval.speedups = (1.0,)
    c.dropout = False
    c.progress = False
    result = loop.fit(c)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["mesh"] == {"data": 1, "fsdp": 8}
    assert [r["split"] for r in summary["final"]] == ["validation"]  # no test file: not scored
    assert summary["data"]["examples"] == {"train": 64, "validation": 32}
    params, meta = checkpoint.restore_params(result.run_dir)  # sharded state saved and read back
    assert meta["step"] == 4 and params["bert"]["layer_0"]["mlp_in"]["kernel"].shape == (32, 64)


def test_seeds_train_one_folder_each_and_report_their_mean_and_deviation(tmp_path):
    """train.finetune --seeds: one run per seed (the sandwich recipe: one two-pass program for
    the one length bucket), then the mean and sample standard deviation of their final rows."""
    import json

    from accjax import loop

    spec = sentiment_task(tmp_path / "data")
    c = tiny_config(tmp_path / "runs", spec, "tiny,elastic,sandwich", **{"debug.max_steps": 4})
    out = loop.fit_seeds(c, [0, 1])
    finals = {}
    for seed in (0, 1):
        summary = json.loads((tmp_path / "runs" / f"seed{seed}" / "summary.json").read_text())
        assert summary["train_programs"] == 1 and summary["steps"] == 4
        for r in summary["final"]:
            finals.setdefault((r["split"], r["speedup"]), []).append(r["primary"])
    assert {(r["split"], r["speedup"]) for r in out["rows"]} == set(finals) and len(finals) == 2  # dev, test
    for r in out["rows"]:
        v = finals[(r["split"], r["speedup"])]
        assert r["values"] == v and r["seeds"] == 2
        np.testing.assert_allclose([r["mean"], r["std"]], [np.mean(v), np.std(v, ddof=1)], atol=1e-9)
    saved = json.loads((tmp_path / "runs" / "seeds.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["rows"] == out["rows"]
    assert "mean +- std over seeds [0, 1]" in (tmp_path / "runs" / "seeds.md").read_text()


def test_prune_every_plans_every_train_program_and_is_recorded(tmp_path):
    """elimination.prune_every = 2: the train programs a run compiles (``loop.step_programs``,
    what ``fit`` hands to ``precompile``) run ``schedule.plan(..., prune_every=2)``'s
    schedules, and the config ``fit`` records in the run folder holds k."""
    from accjax import experiment, schedule

    spec = sentiment_task(tmp_path / "d", n_train=32, n_dev=16)
    cfg = tiny_config(tmp_path / "r", spec, "tiny,elastic",
                      **{"elimination.prune_every": 2, "model_overrides.num_layers": 3})
    experiment.validate_config(cfg)
    exp, sampler = experiment.build(cfg), experiment.sampler(cfg)
    got = {s for _, s in loop.step_programs(exp, sampler, cfg.elimination, 0, 2)}
    want = {schedule.plan(exp.cost, 32, s, prune_every=2).schedule for s in sampler.levels}
    every = {schedule.plan(exp.cost, 32, s).schedule for s in sampler.levels}
    assert got == want != every and None in want and len(want) >= 3  # dense and eliminating levels
    assert all(k[1] == k[0] and k[2] < k[1] for k in want - {None})  # layers 1 and 3 drop rows
    assert loop.config_dict(cfg)["elimination"]["prune_every"] == 2


def test_a_run_with_a_weight_average_scores_and_exports_the_average(tmp_path, monkeypatch):
    from accjax import convert, train

    seen = []
    original = train.Trainer.weights

    def weights(self, state):
        w = original(self, state)
        seen.append((sharding.to_host(state.params), sharding.to_host(w)))
        return w

    monkeypatch.setattr(train.Trainer, "weights", weights)
    spec = sentiment_task(tmp_path / "d", n_train=32, n_dev=16)
    cfg = tiny_config(tmp_path / "r", spec, **{"optim.average": 0.8, "optim.layer_decay": 0.9})
    loop.fit(cfg)
    assert len(seen) == 1  # one epoch, scored once

    def flat(tree):
        return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    (raw, avg), exported = (flat(t) for t in seen[0]), flat(convert.load(tmp_path / "r").params)
    name = "layer_0/mlp_in/kernel"
    np.testing.assert_array_equal(exported[name], avg["bert/" + name])  # the average was exported
    assert not np.allclose(avg["bert/" + name], raw["bert/" + name])  # and it is not the weights
    # stopped after step 1 of 2 and resumed: the average comes back from the checkpoint, and
    # the last step's average is the uninterrupted run's
    cut = {"optim.average": 0.8, "optim.layer_decay": 0.9}
    loop.fit(tiny_config(tmp_path / "cut", spec, **cut, **{"debug.max_steps": 1}))
    assert loop.fit(tiny_config(tmp_path / "cut", spec, **cut)).resumed_from == 1
    assert len(seen) == 3
    np.testing.assert_array_equal(flat(seen[2][1])["bert/" + name], avg["bert/" + name])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_prune_every_stops_before_training(tmp_path, bad):
    import ml_collections

    cfg = tiny_config(tmp_path / "r", "rt_polarity")
    # a whole sub-config: ConfigDict refuses 1.5 for an int field (the command line says so itself)
    cfg.elimination = ml_collections.ConfigDict({**cfg.elimination.to_dict(), "prune_every": bad})
    with pytest.raises(ValueError, match=rf"config: prune_every must be an int >= 1 .*got {bad!r}"):
        loop.fit(cfg)
    assert not (tmp_path / "r").exists()


def test_a_run_started_before_prune_every_existed_resumes_only_at_k_1():
    saved = loop.config_dict(load_config_file("rt_minilm", "tiny"))
    del saved["elimination"]["prune_every"]  # the config such a run recorded
    del saved["distill"]["hidden_weight"]  # (added later still)
    del saved["train_pad_multiple"], saved["matmul_dtype"]  # (and later)
    del saved["optim"]["average"], saved["optim"]["layer_decay"]  # (and later still)
    now = loop.config_dict(load_config_file("rt_minilm", "tiny"))
    loop.check_resume_config(saved, now)  # k = 1, no hidden-state term: trains as that run did
    now["elimination"]["prune_every"] = 2
    with pytest.raises(ValueError, match=r"elimination.prune_every: 1 -> 2"):
        loop.check_resume_config(saved, now)
    now["elimination"]["prune_every"], now["distill"]["hidden_weight"] = 1, 0.5
    with pytest.raises(ValueError, match=r"distill.hidden_weight: 0.0 -> 0.5"):
        loop.check_resume_config(saved, now)
    now["distill"]["hidden_weight"], now["train_pad_multiple"] = 0.0, 8
    with pytest.raises(ValueError, match=r"train_pad_multiple: 0 -> 8"):
        loop.check_resume_config(saved, now)
    now["train_pad_multiple"], now["matmul_dtype"] = 0, "bfloat16"
    with pytest.raises(ValueError, match=r"matmul_dtype: '' -> 'bfloat16'"):
        loop.check_resume_config(saved, now)
    now["matmul_dtype"], now["optim"]["average"] = "", 0.99
    with pytest.raises(ValueError, match=r"optim.average: 0.0 -> 0.99"):
        loop.check_resume_config(saved, now)
    del saved["warm_start"]  # (and later still)
    now["optim"]["average"], now["warm_start"]["epochs"] = 0.0, 1
    with pytest.raises(ValueError, match=r"warm_start.epochs: 0 -> 1"):
        loop.check_resume_config(saved, now)
    del saved["elimination"]["fuse"]  # (and later still)
    now["warm_start"]["epochs"], now["elimination"]["fuse"] = 0, "acc"
    with pytest.raises(ValueError, match=r"elimination.fuse: '' -> 'acc'"):
        loop.check_resume_config(saved, now)
    now["elimination"]["fuse"] = ""
    loop.check_resume_config(saved, now)  # off: trains as that run did
