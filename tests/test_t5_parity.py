"""Flax T5 vs HF PyTorch T5 at fp32, through OUR converter from save_pretrained folders."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

from accjax import convert, seq2seq
from accjax.models import t5
from tests.t5_helpers import FLAN_CONFIGS, decoder_batch, make_hf_t5, random_batch

TOL = 1e-5


@pytest.fixture(scope="module", params=sorted(FLAN_CONFIGS))
def flan(request, tmp_path_factory):
    folder, hf = make_hf_t5(tmp_path_factory.mktemp("flan"), **FLAN_CONFIGS[request.param])
    return convert.load(folder, "lm"), hf


def _t(a):
    return torch.tensor(np.asarray(a))


def _apply(ld, *args, **kw):
    """module.apply under jit (one compile beats op-by-op dispatch on the CPU)."""
    return jax.jit(functools.partial(ld.module.apply, **kw))({"params": ld.params}, *args)


def test_encoder_and_decoder_logits_parity(flan):
    ld, hf = flan
    assert not ld.config.tie_word_embeddings and not ld.config.scale_decoder_outputs
    assert ld.config.is_gated_act and ld.config.dense_act_fn == "gelu_new"
    rng = np.random.default_rng(1)
    batch = random_batch(rng, 4, 21, 99)  # right padding of several lengths
    dec, dmask = decoder_batch(rng, 4, 7, 99)  # decoder padding too
    out = _apply(ld, batch["input_ids"], batch["attention_mask"], dec, dmask, output_hidden_states=True)
    with torch.no_grad():
        ref = hf(input_ids=_t(batch["input_ids"]), attention_mask=_t(batch["attention_mask"]),
                 decoder_input_ids=_t(dec), decoder_attention_mask=_t(dmask), output_hidden_states=True)
    # every row, padding rows included
    d = np.abs(np.asarray(out.encoder.last_hidden_state) - ref.encoder_last_hidden_state.numpy()).max()
    assert d <= TOL, f"encoder output: max abs diff {d}"
    # HF's hidden_states: embeddings, blocks 1..L-1, then the final-normed output
    for i in range(ld.config.num_layers):
        d = np.abs(np.asarray(out.encoder.hidden_states[i]) - ref.encoder_hidden_states[i].numpy()).max()
        assert d <= TOL, f"encoder hidden state {i}: max abs diff {d}"
    d = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max()
    assert d <= TOL, f"decoder logits: max abs diff {d}"
    assert np.abs(ref.logits.numpy()).max() > 1.0  # the tolerance is not trivially met


def test_original_t5_tied_scaled_relu_parity(tmp_path):
    """The other HF branch: a head tied to ``shared``, input scaled by d_model**-0.5, ReLU."""
    folder, hf = make_hf_t5(tmp_path / "t5", untied=False, feed_forward_proj="relu", seed=3)
    ld = convert.load(folder, "lm")
    assert ld.config.tie_word_embeddings and ld.config.scale_decoder_outputs
    assert not ld.config.is_gated_act and "lm_head" not in ld.params
    rng = np.random.default_rng(2)
    batch = random_batch(rng, 3, 12, 99)
    dec, dmask = decoder_batch(rng, 3, 5, 99)
    out = _apply(ld, batch["input_ids"], batch["attention_mask"], dec, dmask)
    with torch.no_grad():
        ref = hf(input_ids=_t(batch["input_ids"]), attention_mask=_t(batch["attention_mask"]),
                 decoder_input_ids=_t(dec), decoder_attention_mask=_t(dmask))
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy()).max() <= TOL


def test_encoder_model_head_parity(tmp_path):
    folder, hf = make_hf_t5(tmp_path / "enc", head="base", **FLAN_CONFIGS["L3-D2-N6-D48"])
    ld = convert.load(folder, "base")
    batch = random_batch(np.random.default_rng(3), 3, 17, 99)
    out = _apply(ld, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = hf(input_ids=_t(batch["input_ids"]), attention_mask=_t(batch["attention_mask"]))
    assert out.last_hidden_state.shape == (3, 17, 48)
    assert np.abs(np.asarray(out.last_hidden_state) - ref.last_hidden_state.numpy()).max() <= TOL


def test_greedy_generation_equals_hf(flan):
    ld, hf = flan
    batch = random_batch(np.random.default_rng(4), 5, 13, 99)
    pred = seq2seq.Seq2SeqPredictor.from_loaded(ld, batch_size=4, length_buckets=(16,))  # 2 chunks
    ours = pred.generate(batch, speedup=1.0, max_new_tokens=8)
    with torch.no_grad():
        # use_cache=False: transformers 5.23 sizes its cache by the ENCODER depth, which
        # breaks when num_decoder_layers differs (as in these configs).
        ref = hf.generate(input_ids=_t(batch["input_ids"]), attention_mask=_t(batch["attention_mask"]),
                          max_new_tokens=8, do_sample=False, num_beams=1, use_cache=False).numpy()
    assert np.all(ref[:, 0] == 0)  # HF includes the start token
    ref = ref[:, 1:]
    n = ref.shape[1]  # HF stops early when every row is done; the rest is pad for us
    np.testing.assert_array_equal(ours[:, :n], ref)
    assert np.all(ours[:, n:] == ld.config.pad_token_id)
    assert len({tuple(r) for r in ours}) > 1  # not a degenerate constant output


def test_seq2seq_loss_equals_hf_loss(flan):
    ld, hf = flan
    rng = np.random.default_rng(5)
    batch = random_batch(rng, 3, 10, 99)
    labels = rng.integers(3, 99, size=(3, 6))
    labels[:, -1] = 1
    labels[1, 4:] = -100  # a shorter target
    loss, metrics = jax.jit(functools.partial(seq2seq.seq2seq_loss, ld.module))(
        ld.params, {**batch, "labels": labels})
    with torch.no_grad():
        ref = hf(input_ids=_t(batch["input_ids"]), attention_mask=_t(batch["attention_mask"]),
                 labels=_t(labels)).loss.item()
    assert abs(float(loss) - ref) <= TOL
    assert float(metrics["target_tokens"]) == (labels >= 0).sum()


def test_relative_position_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)[None, :] - np.zeros((1, 1), np.int64)
    for nb, md in ((32, 128), (8, 16), (16, 40)):
        for bidi in (True, False):
            ours = np.asarray(t5.relative_position_bucket(rel, bidirectional=bidi, num_buckets=nb,
                                                          max_distance=md))
            ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidi,
                                                        num_buckets=nb, max_distance=md).numpy()
            np.testing.assert_array_equal(ours, ref, err_msg=f"buckets={nb} max={md} bidi={bidi}")
            assert len(np.unique(ours)) > nb // 2  # the logarithmic buckets are exercised
