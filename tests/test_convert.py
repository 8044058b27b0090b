"""Converter: exact round trip, bad checkpoints named, the CLI both ways."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from accjax import convert
from accjax.models import get_family
from tests.conftest import broken_copy, make_hf_bert, random_batch


@pytest.fixture
def hf_folder(tmp_path):
    return make_hf_bert(tmp_path / "hf", num_hidden_layers=2)


def test_round_trip_reproduces_every_tensor(hf_folder):
    folder, hf = hf_folder
    ld = convert.load(folder, "sequence_classification")
    back = convert.to_state_dict(ld.family, ld.config, ld.params, ld.head)
    ref = {k: v.numpy() for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert set(back) == set(ref)
    for k in ref:
        assert back[k].dtype == ref[k].dtype, k
        np.testing.assert_array_equal(back[k], ref[k], err_msg=k)


def test_base_round_trip_without_prefix(tmp_path):
    folder, hf = make_hf_bert(tmp_path / "b", head="base")
    ld = convert.load(folder, "base")
    back = convert.to_state_dict(ld.family, ld.config, ld.params, "base")
    ref = hf.state_dict()
    assert set(back) == {k for k in ref if not k.endswith("position_ids")}
    assert not any(k.startswith("bert.") for k in back)


def _broken(tmp_path, hf_folder, edit):
    return broken_copy(tmp_path, hf_folder[0], edit)


def test_missing_key_is_named(tmp_path, hf_folder):
    key = "bert.encoder.layer.1.output.dense.weight"
    bad = _broken(tmp_path, hf_folder, lambda sd: sd.pop(key))
    with pytest.raises(convert.CheckpointError, match=r"missing keys \(1\): \[bert\.\]encoder\.layer\.1\.output\.dense\.weight"):
        convert.load(bad, "sequence_classification")


def test_unexpected_key_is_named(tmp_path, hf_folder):
    bad = _broken(tmp_path, hf_folder, lambda sd: sd.__setitem__(
        "bert.encoder.layer.0.attention.self.rotary.weight", np.zeros(3, np.float32)))
    with pytest.raises(convert.CheckpointError, match=r"unexpected keys \(1\): encoder\.layer\.0\.attention\.self\.rotary\.weight"):
        convert.load(bad, "sequence_classification")


def test_mis_shaped_key_is_named(tmp_path, hf_folder):
    key = "bert.encoder.layer.0.attention.self.key.weight"
    bad = _broken(tmp_path, hf_folder, lambda sd: sd.__setitem__(key, sd[key][:, :16].copy()))
    with pytest.raises(convert.CheckpointError) as e:
        convert.load(bad, "sequence_classification")
    assert "attention.self.key.weight: checkpoint (32, 16), model expects (32, 32)" in str(e.value)


def test_every_problem_reported_at_once(tmp_path, hf_folder):
    def edit(sd):
        sd.pop("bert.pooler.dense.bias")
        sd["bert.extra.weight"] = np.zeros(2, np.float32)
        sd["classifier.weight"] = np.zeros((5, 32), np.float32)
    bad = _broken(tmp_path, hf_folder, edit)
    with pytest.raises(convert.CheckpointError) as e:
        convert.load(bad, "sequence_classification")
    msg = str(e.value)
    assert "pooler.dense.bias" in msg and "extra.weight" in msg
    assert "classifier.weight: checkpoint (5, 32), model expects (2, 32)" in msg
    assert "num_labels" in msg  # says how to fix a head of another label count


def test_truncated_safetensors_is_named(tmp_path, hf_folder):
    folder, _ = hf_folder
    out = tmp_path / "trunc"
    out.mkdir()
    data = (folder / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    (out / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(convert.CheckpointError, match=r"model\.safetensors is not a readable safetensors file.*truncated"):
        convert.load(out, "sequence_classification")


def test_missing_weights_file(tmp_path, hf_folder):
    folder, _ = hf_folder
    out = tmp_path / "noweights"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(convert.CheckpointError, match="no weights in .*expected model.safetensors"):
        convert.load(out, "base")


def test_base_checkpoint_gets_fresh_classifier(tmp_path):
    folder, _ = make_hf_bert(tmp_path / "b", head="base")
    ld = convert.load(folder, "sequence_classification", num_labels=3)
    assert ld.report.initialized == ["classifier/kernel", "classifier/bias"]
    assert ld.params["classifier"]["kernel"].shape == (32, 3)
    assert np.all(ld.params["classifier"]["bias"] == 0)
    assert 0.01 < ld.params["classifier"]["kernel"].std() < 0.04  # N(0, 0.02)


def test_pretraining_heads_and_buffers_are_ignored(tmp_path):
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    hf = transformers.BertForPreTraining(config)
    hf.save_pretrained(tmp_path / "pt")
    ld = convert.load(tmp_path / "pt", "base")
    assert any(k.startswith("cls.") for k in ld.report.ignored)
    sd = {k: v for k, v in hf.state_dict().items() if k.startswith("bert.")}
    np.testing.assert_array_equal(
        ld.params["layer_0"]["mlp_in"]["kernel"],
        sd["bert.encoder.layer.0.intermediate.dense.weight"].numpy().T)


def test_other_architecture_is_refused(tmp_path, hf_folder):
    folder, _ = hf_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    out = tmp_path / "mamba"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
        convert.load(out, "base")


def test_cli_to_accjax_and_back_to_hf(tmp_path, hf_folder):
    folder, hf = hf_folder
    out = tmp_path / "ax"
    r = subprocess.run([sys.executable, "-m", "accjax.convert", str(folder), str(out),
                        "--head", "sequence_classification"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "params.safetensors").exists() and (out / "accjax.json").exists()
    ld = convert.load(out, "sequence_classification")
    batch = random_batch(np.random.default_rng(0), 3, 7, 99)
    logits = np.asarray(ld.module.apply({"params": ld.params}, **batch).logits)

    back = tmp_path / "hf_back"
    r = subprocess.run([sys.executable, "-m", "accjax.convert", str(out), str(back), "--to-hf"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hf2 = transformers.BertForSequenceClassification.from_pretrained(back).eval()
    with torch.no_grad():
        ref = hf2(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-5)


def test_cli_reports_bad_checkpoint_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "accjax.convert", str(tmp_path / "nope"),
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_rules_cover_every_parameter_once():
    fam = get_family("bert")
    from accjax.models.bert import BertConfig
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    for head in fam.modules:
        rules = fam.rules(cfg, head)
        paths = [r.path for r in rules]
        keys = [k for r in rules for k in r.hf]
        assert len(paths) == len(set(paths)) and len(keys) == len(set(keys))
        assert set(paths) == set(convert._flax_shapes(fam, cfg, head))
