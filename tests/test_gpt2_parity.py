"""Flax GPT-2 vs HF PyTorch GPT-2 at fp32, through OUR converter from save_pretrained folders;
the converter's exact round trip and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from accjax import convert
from tests.gpt2_testlib import jit_apply, make_hf_gpt2, padded_batch

TOL = 1e-5

CONFIGS = [
    # depth, heads, width, MLP width (n_inner), activation, LayerNorm eps all vary
    dict(n_embd=32, n_layer=2, n_head=4),
    dict(n_embd=48, n_layer=3, n_head=2, n_inner=80, activation_function="gelu"),
    dict(n_embd=64, n_layer=1, n_head=8, activation_function="relu", layer_norm_epsilon=1e-6),
]


def _torch(batch):
    return {k: torch.tensor(v) for k, v in batch.items()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=["L2-N4-D32", "L3-N2-D48-gelu-F80", "L1-N8-D64-relu"])
def test_lm_parity_with_padding(tmp_path, cfg):
    folder, hf = make_hf_gpt2(tmp_path / "m", attn_implementation="eager", **cfg)
    ld = convert.load(folder, "lm")
    assert ld.report.initialized == [] and ld.config.num_layers == cfg["n_layer"]
    rng = np.random.default_rng(1)
    for lengths, t in (([13, 7, 1, 10], 13), ([5, 5, 2], 5), ([17, 9], 21)):
        batch = padded_batch(rng, lengths, t, 97)
        out = jit_apply(ld.module, ld.params, batch, output_hidden_states=True)
        with torch.no_grad():
            ref = hf(**_torch(batch), output_hidden_states=True)
        # Right padding: HF's padded query rows see the same real keys ours do (causal mask
        # and key mask), so every position is compared, padded ones included.
        d = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max()
        assert d <= TOL, f"lengths {lengths}: logits max abs diff {d}"
        for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            d = np.abs(np.asarray(a) - b.numpy()).max()
            assert d <= TOL, f"lengths {lengths}: hidden state {i} max abs diff {d}"


def test_base_model_folder_parity_and_round_trip(tmp_path):
    folder, hf = make_hf_gpt2(tmp_path / "m", head="base", n_layer=2)
    saved = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith("transformer.") for k in saved)  # GPT2Model: no prefix
    ld = convert.load(folder, "base")
    batch = padded_batch(np.random.default_rng(2), [9, 4, 6], 9, 97)
    out = jit_apply(ld.module, ld.params, batch)
    with torch.no_grad():
        ref = hf(**_torch(batch)).last_hidden_state.numpy()
    assert np.abs(np.asarray(out.last_hidden_state) - ref).max() <= TOL
    back = convert.to_state_dict(ld.family, ld.config, ld.params, "base")
    assert set(back) == set(saved)
    for k in saved:
        np.testing.assert_array_equal(back[k], saved[k], err_msg=k)


@pytest.mark.parametrize("num_labels", [3, 1])
def test_classifier_parity_pools_last_real_token(tmp_path, num_labels):
    # pad_token_id set, as a GPT-2 classifier must have for batches: HF pools the rightmost
    # non-pad token; accjax pools the last real token by the mask. Padding holds the pad id,
    # so both must pick the same row.
    folder, hf = make_hf_gpt2(tmp_path / "m", head="sequence_classification", n_layer=2,
                              num_labels=num_labels, pad_token_id=0)
    ld = convert.load(folder, "sequence_classification")
    assert ld.report.initialized == [] and ld.config.pad_token_id == 0
    batch = padded_batch(np.random.default_rng(3), [11, 3, 1, 8, 11], 11, 97, pad_id=0)
    out = jit_apply(ld.module, ld.params, batch)
    with torch.no_grad():
        ref = hf(**_torch(batch)).logits.numpy()
    assert out.logits.shape == (5, num_labels)
    assert np.abs(np.asarray(out.logits) - ref).max() <= TOL
    # Round trip, score.weight included (a Linear [C, D]: transposed, unlike the Conv1Ds).
    saved = load_file(str(folder / "model.safetensors"))
    back = convert.to_state_dict(ld.family, ld.config, ld.params, "sequence_classification")
    assert set(back) == set(saved) and "score.weight" in back
    for k in saved:
        np.testing.assert_array_equal(back[k], saved[k], err_msg=k)


def test_lm_round_trip_and_to_hf_folder(tmp_path):
    folder, hf = make_hf_gpt2(tmp_path / "m", n_layer=2, n_inner=40)
    ld = convert.load(folder, "lm")
    saved = load_file(str(folder / "model.safetensors"))
    back = convert.to_state_dict(ld.family, ld.config, ld.params, "lm")
    assert set(back) == set(saved)  # lm_head.weight is tied: save_pretrained omits it, so do we
    for k in saved:
        assert back[k].dtype == saved[k].dtype, k
        np.testing.assert_array_equal(back[k], saved[k], err_msg=k)
    out = convert.save_hf(ld, tmp_path / "hf_again")
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    batch = padded_batch(np.random.default_rng(4), [6, 3], 6, 97)
    with torch.no_grad():
        np.testing.assert_array_equal(again(**_torch(batch)).logits.numpy(),
                                      hf(**_torch(batch)).logits.numpy())
    assert json.loads((out / "config.json").read_text())["n_inner"] == 40


def _broken(tmp_path, folder, edit):
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    out = tmp_path / "broken"
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


def test_bad_checkpoints_are_named(tmp_path):
    folder, _ = make_hf_gpt2(tmp_path / "m", n_layer=2)
    miss = _broken(tmp_path / "a", folder, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(convert.CheckpointError,
                       match=r"missing keys \(1\): \[transformer\.\]h\.1\.mlp\.c_fc\.weight"):
        convert.load(miss, "lm")
    key = "transformer.h.0.attn.c_attn.weight"
    cut = _broken(tmp_path / "b", folder, lambda sd: sd.__setitem__(key, sd[key][:, :48].copy()))
    with pytest.raises(convert.CheckpointError) as e:
        convert.load(cut, "lm")
    assert "h.0.attn.c_attn.weight: checkpoint (32, 48), model expects (32, 96)" in str(e.value)
    extra = _broken(tmp_path / "c", folder, lambda sd: sd.__setitem__(
        "transformer.h.0.attn.rotary.weight", np.zeros(3, np.float32)))
    with pytest.raises(convert.CheckpointError, match=r"unexpected keys \(1\): h\.0\.attn\.rotary\.weight"):
        convert.load(extra, "lm")


def test_old_checkpoint_buffers_and_tied_head_are_ignored(tmp_path):
    folder, hf = make_hf_gpt2(tmp_path / "m", n_layer=2)

    def add(sd):
        sd["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        sd["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
        sd["lm_head.weight"] = sd["transformer.wte.weight"].copy()

    ld = convert.load(_broken(tmp_path, folder, add), "lm")
    assert ld.report.ignored == ["lm_head.weight", "transformer.h.0.attn.bias",
                                 "transformer.h.1.attn.masked_bias"]
    ref = convert.load(folder, "lm").params
    for k, v in convert.flatten(ref).items():
        np.testing.assert_array_equal(convert.flatten(ld.params)[k], v)


def test_unsupported_hf_options_are_refused(tmp_path):
    from accjax.models import gpt2

    base = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4).to_dict()
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        gpt2.GPT2Config.from_hf({**base, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        gpt2.GPT2Config.from_hf({**base, "tie_word_embeddings": False})
    cfg = gpt2.GPT2Config.from_hf(base)
    assert cfg.intermediate_size == 128 and cfg.pad_token_id is None  # n_inner None -> 4 D
