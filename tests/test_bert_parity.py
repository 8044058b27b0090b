"""Flax BERT vs HF PyTorch BERT at fp32, through OUR converter from save_pretrained folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accjax import convert
from tests.conftest import make_hf_bert, random_batch

TOL = 1e-5

CONFIGS = [
    # different depth, heads, width, activation, token-type vocabulary
    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96,
         type_vocab_size=3, hidden_act="gelu_new"),
    dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=8, intermediate_size=128,
         hidden_act="relu", layer_norm_eps=1e-7),
]


def _hf_outputs(model, batch):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()},
                     output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["L2-N4-D32", "L3-N2-D48-gelu_new", "L1-N8-D64-relu"])
def test_classifier_and_encoder_parity(tmp_path, cfg):
    folder, hf = make_hf_bert(tmp_path / "m", attn_implementation="eager", **cfg)
    ld = convert.load(folder, "sequence_classification")
    assert ld.report.initialized == []  # every tensor came from the checkpoint
    rng = np.random.default_rng(1)
    batch = random_batch(rng, 5, 11, 99, type_vocab=cfg.get("type_vocab_size", 2))
    out = ld.module.apply({"params": ld.params}, **batch, output_hidden_states=True,
                          output_attentions=True)
    ref = _hf_outputs(hf, batch)

    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        d = np.abs(np.asarray(a) - b.numpy()).max()
        assert d <= TOL, f"hidden state {i}: max abs diff {d}"
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions)):
        m = batch["attention_mask"].astype(bool)[:, None, :, None]  # valid query rows
        d = np.abs(np.where(m, np.asarray(a) - b.numpy(), 0)).max()
        assert d <= TOL, f"attention probabilities of layer {i}: max abs diff {d}"
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy()).max() <= TOL

    base = hf.bert
    with torch.no_grad():
        r = base(**{k: torch.tensor(v) for k, v in batch.items()})
    assert np.abs(np.asarray(out.last_hidden_state) - r.last_hidden_state.numpy()).max() <= TOL
    assert np.abs(np.asarray(out.pooler_output) - r.pooler_output.numpy()).max() <= TOL


def test_base_model_folder_parity(tmp_path):
    folder, hf = make_hf_bert(tmp_path / "m", head="base", num_hidden_layers=2)
    ld = convert.load(folder, "base")
    batch = random_batch(np.random.default_rng(2), 3, 9, 99)
    out = ld.module.apply({"params": ld.params}, **batch)
    with torch.no_grad():
        r = hf(**{k: torch.tensor(v) for k, v in batch.items()})
    assert np.abs(np.asarray(out.last_hidden_state) - r.last_hidden_state.numpy()).max() <= TOL
    assert np.abs(np.asarray(out.pooler_output) - r.pooler_output.numpy()).max() <= TOL


def test_regression_head_parity(tmp_path):
    folder, hf = make_hf_bert(tmp_path / "m", num_labels=1)
    ld = convert.load(folder, "sequence_classification")
    assert ld.config.num_labels == 1
    batch = random_batch(np.random.default_rng(3), 4, 8, 99)
    out = ld.module.apply({"params": ld.params}, **batch)
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    assert out.logits.shape == (4, 1)
    assert np.abs(np.asarray(out.logits) - ref).max() <= TOL


def test_pytorch_bin_loads_like_safetensors(tmp_path):
    folder, hf = make_hf_bert(tmp_path / "st")
    # transformers 5 always writes safetensors; write the legacy pickle layout by hand.
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((folder / "config.json").read_text())
    a = convert.flatten(convert.load(folder, "sequence_classification").params)
    b = convert.flatten(convert.load(tmp_path / "bin", "sequence_classification").params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
