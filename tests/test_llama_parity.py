"""Flax Llama vs HF PyTorch ``LlamaForCausalLM`` at fp32 (random configs with GQA and
padding), through OUR converter from save_pretrained folders; round trip and key errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from accjax import convert
from tests.gpt2_testlib import jit_apply
from tests.llama_testlib import make_hf_llama, padded_batch

TOL = 1e-5

CONFIGS = [
    dict(),  # GQA 4/2, tied head
    dict(num_key_value_heads=1, head_dim=12, tie_word_embeddings=False, rms_norm_eps=1e-6,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),  # MQA, H != D/N
    dict(num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
         rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}),  # MHA, llama3 scaling
]


def _torch(batch):
    return {k: torch.tensor(v) for k, v in batch.items()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=["gqa-tied", "mqa-untied-h12", "mha-llama3rope"])
def test_lm_parity_with_padding(tmp_path, cfg):
    folder, hf = make_hf_llama(tmp_path / "m", init=0.1, attn_implementation="eager", **cfg)
    ld = convert.load(folder, "lm")
    assert ld.config.num_kv_heads == hf.config.num_key_value_heads
    rng = np.random.default_rng(1)
    for lengths, t in (([13, 7, 1, 10], 13), ([40, 17], 40)):
        batch = padded_batch(rng, lengths, t, 101)
        out = jit_apply(ld.module, ld.params, batch, output_hidden_states=True)
        with torch.no_grad():
            ref = hf(**_torch(batch), output_hidden_states=True)
        m = batch["attention_mask"].astype(bool)  # HF's padded query rows differ: real rows only
        d = np.abs(np.asarray(out.logits) - ref.logits.numpy())[m].max()
        assert d <= TOL, f"lengths {lengths}: logits max abs diff {d}"
        for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            d = np.abs(np.asarray(a) - b.numpy())[m].max()
            assert d <= TOL, f"lengths {lengths}: hidden state {i} max abs diff {d}"


def test_round_trip_to_hf_folder(tmp_path):
    folder, hf = make_hf_llama(tmp_path / "m", tie_word_embeddings=False)
    ld = convert.load(folder, "lm")
    out = convert.save_hf(ld, tmp_path / "back")
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    again = convert.load(out, "lm")
    assert again.config == ld.config


def test_bad_checkpoints_are_named(tmp_path):
    folder, _ = make_hf_llama(tmp_path / "m")
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"]
    sd["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(convert.CheckpointError) as e:
        convert.load(folder, "lm")
    msg = str(e.value)
    assert "layers.1.mlp.up_proj.weight" in msg and "extra.weight" in msg
    assert "layers.0.self_attn.k_proj.weight: checkpoint (32, 32), model expects (16, 32)" in msg


def test_unsupported_options_are_refused(tmp_path):
    folder, _ = make_hf_llama(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["attention_bias"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="attention_bias=True"):
        convert.load(folder, "lm")
