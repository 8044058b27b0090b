"""accjax.export: exported programs give Predictor's logits with no model code; the smallest
program is picked; incompatible manifests and bad CLI input are refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from accjax import export, inference, models
from tests.conftest import make_hf_bert
from tests.train_helpers import REPO

WORDS = ("good great fine fun loved wonderful bad awful boring dull hated terrible the movie "
         "film plot was is a and it this").split()
SPEEDUPS = (1.0, 2.0, 4.8)


def make_run(root: Path) -> Path:
    """A classifier run folder (as train.finetune writes one) holding a random 3-layer BERT
    with a WordPiece vocabulary of real words, without training it."""
    from accjax import convert

    hf = root / "hf"
    hf.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += [f"w{i}" for i in range(99 - len(vocab))]
    (hf / "vocab.txt").write_text("\n".join(vocab) + "\n")
    make_hf_bert(hf, num_hidden_layers=3, num_labels=3, max_position_embeddings=64, seed=1)
    loaded = convert.load(hf, "sequence_classification")
    run = root / "run"
    convert.save_accjax(loaded, out_dir=run, extra={
        "train_config": {"max_length": 64, "length_buckets": [32, 64],
                         "elimination": {"bucket": 8, "floor": 1, "acc_variant": "plain"}}})
    return run


def texts(n: int, seed: int, words: tuple[int, int] = (3, 12)) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(*words)))) for _ in range(n)]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = make_run(root)
    before = snapshot(run)
    out = root / "out"
    rc = export.main([str(run), str(out), "--speedups", "1,2,4.8", "--batch_sizes", "1,4",
                      "--lengths", "32,64"])
    assert rc == 0
    assert snapshot(run) == before  # RUN_DIR is only read
    return run, out


@pytest.fixture(scope="module")
def predictor(exported):
    from accjax import evaluation

    rm = evaluation.RunModel.load(exported[0])
    return rm, rm.predictor(batch_size=4)


def test_manifest_describes_every_program(exported):
    run, out = exported
    m = json.loads((out / export.MANIFEST).read_text())
    import jax

    assert m["format_version"] == export.FORMAT_VERSION and m["jax_version"] == jax.__version__
    assert m["platforms"] == ["cpu"] and m["speedups"] == list(SPEEDUPS)
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert m["output"]["shape"] == ["batch", 3]
    keys = {(p["batch_size"], p["length"], p["speedup"]) for p in m["programs"]}
    assert keys == {(b, t, s) for b in (1, 4) for t in (32, 64) for s in SPEEDUPS}
    for p in m["programs"]:
        assert (out / p["file"]).exists()
        if p["speedup"] == 1.0:
            assert p["schedule"] == [p["length"]] * 3 and p["analytic_speedup"] == 1.0
        else:
            assert p["schedule"] != [p["length"]] * 3 and abs(p["analytic_speedup"] - p["speedup"]) < 0.5
    assert "vocab.txt" in m["tokenizer"]["files"] and (out / "vocab.txt").exists()
    assert m["params"]["embedded"] is False and (out / export.PARAMS_FILE).exists()


@pytest.mark.parametrize("speedup", [1.0, 4.8])
def test_texts_and_batch_match_predictor(exported, predictor, speedup):
    from accjax import tokenization

    rm, pred = predictor
    model = export.load_exported(exported[1])
    xs = texts(6, seed=0) + [" ".join(WORDS * 2)]  # the last one needs the 64 bucket
    enc = rm.tokenizer.encode(xs, max_length=rm.max_length)
    batch = tokenization.pad(enc, 64, rm.tokenizer.pad_id)
    want = pred.predict(batch, speedup=speedup)
    got_texts = model.predict(xs, speedup=speedup)
    got_batch = model.predict(batch, speedup=speedup)
    assert got_texts.shape == got_batch.shape == (7, 3)
    np.testing.assert_allclose(got_texts, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_batch, want, atol=1e-5, rtol=0)
    short = tokenization.pad(rm.tokenizer.encode(xs[:3]), 32, rm.tokenizer.pad_id)
    np.testing.assert_allclose(model.predict(short, speedup=speedup),
                               pred.predict(short, speedup=speedup), atol=1e-5, rtol=0)


def test_speedups_give_different_logits(exported):
    model = export.load_exported(exported[1])
    xs = texts(4, seed=3, words=(20, 28))
    dense, fast = model.predict(xs, speedup=1), model.predict(xs, speedup=4.8)
    assert np.abs(dense - fast).max() > 1e-4  # the 4.8x program really eliminates


def test_smallest_program_is_picked(exported):
    model = inference.load_exported(exported[1])  # the entry issue 15 names; same object
    model.predict(texts(1, seed=1), speedup=2)
    assert model.calls == [(1, 32, 2.0)]
    model.calls.clear()
    model.predict(texts(3, seed=1), speedup=2)
    assert model.calls == [(4, 32, 2.0)]  # 3 rows: padded into the batch-4 program
    model.calls.clear()
    xs = texts(9, seed=2)
    chunked = model.predict(xs, speedup=2)
    assert model.calls == [(4, 32, 2.0), (4, 32, 2.0), (1, 32, 2.0)]
    one_by_one = np.concatenate([model.predict([x], speedup=2) for x in xs])
    np.testing.assert_allclose(chunked, one_by_one, atol=1e-5, rtol=0)
    model.calls.clear()
    model.predict([" ".join(WORDS * 2)], speedup=2)  # 44 tokens
    assert model.calls == [(1, 64, 2.0)]


def test_unknown_speedup_and_too_long_input(exported):
    model = export.load_exported(exported[1])
    with pytest.raises(export.ExportError, match=r"speedup 3 was not exported.*1, 2, 4\.8"):
        model.predict(["good film"], speedup=3)
    ids = np.ones((1, 70), np.int32)
    with pytest.raises(export.ExportError, match="longer than the largest exported length 64"):
        model.predict({"input_ids": ids}, speedup=1)


def test_loading_needs_no_model_code(exported):
    script = textwrap.dedent(f"""
        import sys
        from accjax.export import load_exported
        m = load_exported({str(exported[1])!r})
        y = m.predict(["good fun film", "dull plot"], speedup=4.8)
        assert y.shape == (2, 3), y.shape
        bad = sorted(k for k in sys.modules if k.startswith(("accjax.models", "flax",
                     "accjax.convert", "accjax.evaluation", "accjax.inference", "torch")))
        print("IMPORTED", bad)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout


def _edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / export.MANIFEST).read_text())
    m.update(changes)
    (dst / export.MANIFEST).write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"format_version": 99}, "format version 99"),
    ({"format": "something-else"}, "is not an accjax export"),
    ({"serialization_version": 999}, "serialization version 999"),
    ({"platforms": ["tpu"]}, "was exported for tpu, this machine runs cpu"),
])
def test_incompatible_manifest_is_refused(exported, tmp_path, changes, message):
    folder = _edited(exported[1], tmp_path / "x", **changes)
    with pytest.raises(export.ExportError, match=message) as e:
        export.load_exported(folder)
    assert "\n" not in str(e.value)


def test_damaged_program_is_refused(exported, tmp_path):
    folder = _edited(exported[1], tmp_path / "x")
    prog = next((folder / export.PROGRAMS_DIR).iterdir())
    data = bytearray(prog.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    prog.write_bytes(bytes(data))
    model = export.load_exported(folder)
    b, t, s = (int(x[1:]) if i < 2 else float(x[1:]) for i, x in enumerate(prog.stem.split("_")))
    with pytest.raises(export.ExportError, match="does not match the manifest"):
        model.program(b, t, s)


def _cli_error(capsys, argv) -> str:
    rc = export.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_cli_input(exported, tmp_path, capsys):
    run, out = exported
    new = str(tmp_path / "new")
    assert "does not exist" in _cli_error(capsys, [str(tmp_path / "nope"), new])
    assert "inside it" in _cli_error(capsys, [str(run), str(run / "exported")])
    assert "inside it" in _cli_error(capsys, [str(run), str(run)])
    assert "contains the run folder" in _cli_error(capsys, [str(run), str(run.parent), "--overwrite"])
    assert "not a number" in _cli_error(capsys, [str(run), new, "--speedups", "fast"])
    assert "below 1" in _cli_error(capsys, [str(run), new, "--speedups", "0.5"])
    assert "whole number" in _cli_error(capsys, [str(run), new, "--batch_sizes", "1,x"])
    assert "at least 1" in _cli_error(capsys, [str(run), new, "--batch_sizes", "0"])
    assert "maximum of 64" in _cli_error(capsys, [str(run), new, "--lengths", "32,128"])
    assert "unknown" in _cli_error(capsys, [str(run), new, "--platforms", "metal"])
    assert "not empty" in _cli_error(capsys, [str(run), str(out)])
    (tmp_path / "empty").mkdir()
    assert "holds no accjax model" in _cli_error(capsys, [str(tmp_path / "empty"), new])
    assert not Path(new).exists()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "keep.txt").write_text("mine")
    assert "no manifest.json" in _cli_error(capsys, [str(run), str(junk), "--overwrite"])
    assert (junk / "keep.txt").read_text() == "mine"


def test_cli_exit_code_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "accjax.export", str(tmp_path / "nope"),
                          str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr


def test_cpu_cuda_export_runs_on_cpu(exported, predictor, tmp_path):
    from accjax import tokenization

    rm, pred = predictor
    out = tmp_path / "not" / "yet" / "multi"  # parents are created
    manifest = export.export_run(exported[0], out, speedups=[2.0], batch_sizes=[4], lengths=[32],
                                 platforms=["cpu", "cuda"])
    assert manifest["platforms"] == ["cpu", "cuda"] and len(manifest["programs"]) == 1
    model = export.load_exported(out)
    batch = tokenization.pad(rm.tokenizer.encode(texts(4, seed=5)), 32, rm.tokenizer.pad_id)
    np.testing.assert_allclose(model.predict(batch, speedup=2), pred.predict(batch, speedup=2),
                               atol=1e-5, rtol=0)


def test_embedded_params_match(exported, predictor, tmp_path):
    from accjax import tokenization

    rm, pred = predictor
    out = tmp_path / "embedded"
    manifest = export.export_run(exported[0], out, speedups=[4.8], batch_sizes=[4], lengths=[32],
                                 embed_params=True)
    assert manifest["params"]["embedded"] is True and not (out / export.PARAMS_FILE).exists()
    model = export.load_exported(out)
    batch = tokenization.pad(rm.tokenizer.encode(texts(4, seed=6)), 32, rm.tokenizer.pad_id)
    np.testing.assert_allclose(model.predict(batch, speedup=4.8), pred.predict(batch, speedup=4.8),
                               atol=1e-5, rtol=0)
    # overwrite replaces an earlier export, and only that
    export.export_run(exported[0], out, speedups=[1.0], batch_sizes=[1], lengths=[32], overwrite=True)
    assert json.loads((out / export.MANIFEST).read_text())["params"]["embedded"] is False


def test_manifest_missing_a_field_is_refused(exported, tmp_path):
    folder = _edited(exported[1], tmp_path / "x")
    m = json.loads((folder / export.MANIFEST).read_text())
    del m["speedups"]
    (folder / export.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(export.ExportError, match="lacks the field 'speedups'"):
        export.load_exported(folder)
    (folder / export.MANIFEST).write_text("{not json")
    with pytest.raises(export.ExportError, match="not valid JSON"):
        export.load_exported(folder)
    with pytest.raises(export.ExportError, match="has no manifest.json"):
        export.load_exported(tmp_path)


def test_text_pairs_use_token_types(exported, predictor):
    from accjax import tokenization

    rm, pred = predictor
    model = export.load_exported(exported[1])
    xs, ys = texts(3, seed=7), texts(3, seed=8)
    enc = rm.tokenizer.encode(xs, ys, max_length=rm.max_length)
    assert any(1 in t for t in enc.type_ids)  # the pair text is segment 1
    batch = tokenization.pad(enc, 64, rm.tokenizer.pad_id)
    np.testing.assert_allclose(model.predict(xs, speedup=2, pairs=ys), pred.predict(batch, speedup=2),
                               atol=1e-5, rtol=0)


def test_speedup_above_a_lengths_maximum_is_clamped(exported, tmp_path):
    from accjax import evaluation
    from accjax import schedule as sched_lib

    rm = evaluation.RunModel.load(exported[0])
    top = sched_lib.max_speedup(models.cost_model(rm.loaded.config), 32, bucket=rm.bucket, floor=rm.floor)
    assert top < 6  # 6x is out of reach at length 32 for this 3-layer model
    m = export.export_run(exported[0], tmp_path / "x", speedups=[6.0], batch_sizes=[1], lengths=[32])
    (p,) = m["programs"]
    assert p["clamped"] is True and p["analytic_speedup"] == pytest.approx(top, rel=1e-3)
    y = export.load_exported(tmp_path / "x").predict(["good film"], speedup=6)
    assert y.shape == (1, 3) and np.isfinite(y).all()
