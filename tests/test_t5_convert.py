"""T5 converter: exact round trip, tied/untied heads as transformers 5 decides, bad keys named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from accjax import convert
from accjax.models import get_family
from tests.conftest import broken_copy
from tests.t5_helpers import make_hf_t5, random_batch


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_hf_t5(tmp_path_factory.mktemp("hf") / "m")


def test_round_trip_reproduces_every_saved_tensor(hf_folder):
    folder, _ = hf_folder
    ld = convert.load(folder, "lm")
    back = convert.to_state_dict(ld.family, ld.config, ld.params, "lm")
    saved = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" in saved and set(back) == set(saved)
    for k in saved:
        assert back[k].dtype == saved[k].dtype, k
        np.testing.assert_array_equal(back[k], saved[k], err_msg=k)


def test_cli_both_ways_is_exact(hf_folder, tmp_path):
    folder, _ = hf_folder
    assert convert.main([str(folder), str(tmp_path / "ax"), "--head", "lm"]) == 0
    ld = convert.load(tmp_path / "ax", "lm")  # an accjax folder
    assert ld.head == "lm" and not ld.config.tie_word_embeddings
    assert convert.main([str(tmp_path / "ax"), str(tmp_path / "hf"), "--to-hf"]) == 0
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_save_hf_folder_loads_in_transformers_with_same_outputs(hf_folder, tmp_path):
    import transformers

    folder, hf = hf_folder
    ld = convert.load(folder, "lm")
    out = convert.save_hf(ld, tmp_path / "back")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["T5ForConditionalGeneration"] and cfg["scale_decoder_outputs"] is False
    again = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    assert again.lm_head.weight.data_ptr() != again.shared.weight.data_ptr()  # still untied
    batch = {k: torch.tensor(v) for k, v in random_batch(np.random.default_rng(0), 2, 9, 99).items()}
    dec = torch.zeros((2, 3), dtype=torch.long)
    with torch.no_grad():
        a = hf(**batch, decoder_input_ids=dec).logits
        b = again(**batch, decoder_input_ids=dec).logits
    assert torch.equal(a, b)


def test_tied_head_checkpoints(tmp_path):
    """No lm_head.weight, or one equal to shared.weight -> tied (as transformers 5 loads it)."""
    folder, _ = make_hf_t5(tmp_path / "tied", untied=False)
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    ld = convert.load(folder, "lm")
    assert ld.config.tie_word_embeddings and "lm_head" not in ld.params
    sd = load_file(str(folder / "model.safetensors"))
    sd["lm_head.weight"] = sd["shared.weight"].copy()  # an older file with a duplicate
    (tmp_path / "dup").mkdir()
    save_file(sd, str(tmp_path / "dup" / "model.safetensors"))
    (tmp_path / "dup" / "config.json").write_text((folder / "config.json").read_text())
    assert convert.load(tmp_path / "dup", "lm").config.tie_word_embeddings


def test_encoder_loads_from_a_full_checkpoint(hf_folder):
    folder, hf = hf_folder
    ld = convert.load(folder, "base")
    assert set(ld.params) == {"shared", "encoder"}
    assert "lm_head.weight" in ld.report.ignored
    assert any(k.startswith("decoder.block.1.") for k in ld.report.ignored)
    batch = random_batch(np.random.default_rng(1), 2, 9, 99)
    out = ld.module.apply({"params": ld.params}, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = hf.encoder(input_ids=torch.tensor(batch["input_ids"]),
                         attention_mask=torch.tensor(batch["attention_mask"])).last_hidden_state
    assert np.abs(np.asarray(out.last_hidden_state) - ref.numpy()).max() <= 1e-5


def _broken(tmp_path, hf_folder, edit):
    return broken_copy(tmp_path, hf_folder[0], edit)


def test_bad_keys_are_named_together(tmp_path, hf_folder):
    gone = "decoder.block.1.layer.1.EncDecAttention.v.weight"
    odd = "encoder.block.0.layer.0.SelfAttention.rotary.weight"
    short = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"

    def edit(sd):
        sd.pop(gone)
        sd[odd] = np.zeros(3, np.float32)
        sd[short] = sd[short][:, :16].copy()

    with pytest.raises(convert.CheckpointError) as e:
        convert.load(_broken(tmp_path, hf_folder, edit), "lm")
    msg = str(e.value)
    assert f"missing keys (1): {gone}" in msg
    assert f"unexpected keys (1): {odd}" in msg
    assert f"{short}: checkpoint (48, 16), model expects (48, 32)" in msg


def test_ignored_duplicates_and_unknown_head():
    fam = get_family("t5")
    cfg = fam.presets["flan-t5-small"]
    with pytest.raises(ValueError, match="has no head 'sequence_classification'"):
        fam.module(cfg, "sequence_classification")
    sd = {"encoder.embed_tokens.weight": 0, "decoder.embed_tokens.weight": 0,
          "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight": 0, "shared.weight": 0}
    kept, ignored = convert._normalise_keys(fam, sd)
    assert set(kept) == {"shared.weight"} and len(ignored) == 3


def test_presets_build_abstractly():
    import jax

    fam = get_family("t5")
    for name, cfg in fam.presets.items():
        shapes = convert._flax_shapes(fam, cfg, "lm")
        n = sum(int(np.prod(s)) for s in shapes.values())
        # flan-t5-small 77M, flan-t5-base 248M parameters (HF counts, shared counted once)
        assert abs(n - {"flan-t5-small": 76_961_152, "flan-t5-base": 247_577_856}[name]) == 0, (name, n)
        assert len(fam.rules(cfg, "lm")) == len(shapes)
    assert jax.devices()  # nothing was materialised above; eval_shape only
