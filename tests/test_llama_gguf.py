"""GGUF files: a tiny model written as llama.cpp does loads into accjax with the same logits
as transformers' own GGUF loader; bad files are clear errors naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accjax import convert, gguf_io, tokenization
from tests.gpt2_testlib import jit_apply
from tests.llama_testlib import make_hf_llama, padded_batch, write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    folder, hf = make_hf_llama(tmp / "hf", init=0.1, vocab_size=130, hidden_size=64, intermediate_size=96,
                               num_attention_heads=4, num_key_value_heads=2)
    gdir = tmp / "g"
    gdir.mkdir()
    return write_gguf(gdir / "tiny.gguf", hf, chat_template=CHAT), hf


CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def test_gguf_loads_like_transformers_gguf_loader(tiny):
    import transformers

    path, hf = tiny
    ld = convert.load(path, "lm")  # a .gguf file or its folder
    assert convert.load(path.parent, "lm").config == ld.config
    assert ld.config.num_kv_heads == 2 and ld.config.tie_word_embeddings
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    batch = padded_batch(np.random.default_rng(0), [11, 6], 11, 130)
    out = jit_apply(ld.module, ld.params, batch)
    with torch.no_grad():
        want = ref(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    m = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(out.logits) - want)[m].max() <= 1e-5
    # Q8_0 changed the weights: the file, not the original HF model, is what both read.
    with torch.no_grad():
        orig = hf(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    assert np.abs(orig - want)[m].max() > 1e-5


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)  # 4 heads of size 8
    from tests.llama_testlib import _permute

    np.testing.assert_array_equal(gguf_io._unpermute(_permute(w, 4), 4), w)
    # per head, GGUF rows interleave the two halves: [0, 4, 1, 5, 2, 6, 3, 7]
    np.testing.assert_array_equal(_permute(w, 4)[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])


def test_tokenizer_from_metadata(tiny):
    path, _ = tiny
    tok = gguf_io.folder_tokenizer(path.parent)
    ids = tok.encode("abba<|endoftext|>").ids
    toks = gguf_io.metadata(path)["tokenizer.ggml.tokens"]
    assert [toks[i] for i in ids] == ["ab", "ba", "<|endoftext|>"]  # merges and a control token
    assert tok.decode(ids, skip_special_tokens=True) == "abba"


def test_converted_folder_carries_the_tokenizer_and_chat_template(tiny, tmp_path):
    path, _ = tiny
    out = tmp_path / "acc"
    assert convert.main([str(path), str(out), "--head", "lm"]) == 0
    assert not list(out.glob("*.gguf"))  # the folder stands alone
    tok = tokenization.Tokenizer.from_folder(out)
    want = gguf_io.folder_tokenizer(path.parent)
    for s in ("abba<|endoftext|>", "h(e)llo, 12!"):
        assert tok.encode([s]).ids[0] == want.encode(s).ids
    assert tok.chat_template == CHAT
    assert convert.load(out, "lm").config == convert.load(path, "lm").config


def test_lm_cli_checks_the_context_before_reading_weights(tiny, tmp_path, monkeypatch, capsys):
    from eval import lm as lm_cli

    path, _ = tiny
    acc = tmp_path / "acc"
    assert convert.main([str(path), str(acc), "--head", "lm"]) == 0

    def no_weights(*a, **k):
        raise AssertionError("read the weights")

    monkeypatch.setattr(convert, "load", no_weights)
    for model in (path, path.parent.parent / "hf", acc):  # GGUF, HF folder, accjax folder: 128 positions
        rc = lm_cli.main(["--model", str(model), "--context", "120", "--continuation", "16"])
        assert rc == 2 and "exceeds the model's 128 positions" in capsys.readouterr().err, model
        with pytest.raises(AssertionError, match="read the weights"):  # a context that fits goes on
            lm_cli.main(["--model", str(model), "--context", "100", "--continuation", "16"])


def test_unsupported_architecture(tmp_path):
    _, hf = make_hf_llama(tmp_path / "hf", num_hidden_layers=1)
    path = write_gguf(tmp_path / "m.gguf", hf, arch="gpt2", quant=None)
    with pytest.raises(convert.CheckpointError, match="GGUF architecture 'gpt2' is not supported"):
        convert.load(path, "lm")


def test_type_that_cannot_be_dequantised(tmp_path):
    _, hf = make_hf_llama(tmp_path / "hf", num_hidden_layers=1, intermediate_size=64)
    path = write_gguf(tmp_path / "m.gguf", hf, quant=None, raw_type="Q8_1")
    with pytest.raises(convert.CheckpointError,
                       match="blk.0.ffn_up.weight has type Q8_1, which the gguf package cannot dequantise"):
        convert.load(path, "lm")


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_file(tiny, tmp_path, keep):
    path, _ = tiny
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(convert.CheckpointError, match="truncated"):
        convert.load(cut, "lm")
