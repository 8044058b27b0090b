"""Llama prefill elimination: rotary positions of kept rows, pruned grouped-query KV caches,
cached decoding and generation (random tiny models; HF LlamaForCausalLM as the oracle)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from accjax import convert, generate, lm
from accjax import schedule as S
from accjax.models import llama, llama_family
from tests.gpt2_testlib import check_generation_uses_the_pruned_cache, jit_apply
from tests.llama_testlib import make_hf_llama, padded_batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, hf = make_hf_llama(tmp_path_factory.mktemp("tiny"), attn_implementation="eager")
    return convert.load(folder, "lm"), hf


def _hf_layer(hf, layer: int, x, positions):
    """HF decoder layer ``layer`` on rows x [B, K, D] rotated by ``positions`` [B, K]."""
    k = x.shape[1]
    mask = torch.triu(torch.full((k, k), torch.finfo(torch.float32).min), 1)[None, None]
    pe = hf.model.rotary_emb(x, position_ids=positions)
    out = hf.model.layers[layer](x, attention_mask=mask.expand(x.shape[0], 1, k, k),
                                 position_ids=positions, position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out


def test_kept_rows_keep_their_original_rotation(tiny):
    """Oracle built from HF: dense layer 0, gather the rows accjax kept, then HF layers 1-2
    on those rows rotated by their ORIGINAL positions. Rotating by compacted positions
    0..K-1 instead gives different logits, so this test fails if positions were recomputed
    after a gather."""
    ld, hf = tiny
    t, sch = 24, (10, 10, 10)
    batch = padded_batch(np.random.default_rng(0), [t, t], t, 101)
    out = jit_apply(ld.module, ld.params, batch, schedule=sch)
    idx = np.asarray(out.layers[0]["keep_idx"])  # [B, 10]
    assert idx[0, -1] == t - 1 and not np.array_equal(idx[0], np.arange(10))  # a real gap

    def oracle(positions):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(batch["input_ids"]), output_hidden_states=True)
            x = torch.stack([ref.hidden_states[1][e, torch.tensor(idx[e].copy())]
                             for e in range(2)])  # [B, 10, D]
            for l in (1, 2):
                x = _hf_layer(hf, l, x, positions)
            return hf.lm_head(hf.model.norm(x)).numpy()

    np.testing.assert_array_equal(np.asarray(out.rows.positions), idx)
    original = oracle(torch.tensor(idx))
    compacted = oracle(torch.arange(10)[None].expand(2, 10))
    got = np.asarray(out.logits)
    # 2e-5: fp32 rounding (the one masked softmax of accjax.attention vs HF's: 1.03e-5 seen),
    # three orders of magnitude under what compacted positions change
    assert np.abs(got - original).max() <= 2e-5
    assert np.abs(got - compacted).max() > 1e-2  # the test can tell the two apart


def test_speedup_one_is_the_dense_path(tiny):
    ld, _ = tiny
    assert S.schedule_for_speedup(llama_family.cost_model(ld.config), 16, 1.0) == (16,) * 3
    batch = padded_batch(np.random.default_rng(1), [16, 11, 3], 16, 101)
    dense = jit_apply(ld.module, ld.params, batch)
    same = jit_apply(ld.module, ld.params, batch, schedule=(16, 16, 16))
    np.testing.assert_array_equal(np.asarray(same.logits), np.asarray(dense.logits))
    assert all("keep_idx" not in layer for layer in same.layers)


def test_gqa_cost_model():
    cfg = llama.PRESETS["llama-3.2-1b"]
    cm = llama_family.cost_model(cfg)
    d, a, kv, f = 2048, 2048, 512, 8192
    n = 100
    want = 2 * n * d * (a + 2 * kv) + 4 * (n * (n + 1) / 2) * a + 2 * n * a * d + 6 * n * d * f
    assert cm.layer(n, n) == want
    assert cm.total(n, (n,) * 16) == 16 * want + n * d + 2 * d * cfg.vocab_size


def test_cache_sizes_follow_the_schedule_and_the_last_token_survives(tiny):
    ld, _ = tiny
    cfg = ld.config
    lengths = np.array([16, 13, 7, 2, 1])
    batch = padded_batch(np.random.default_rng(2), lengths, 16, 101)
    last = lengths - 1
    for protect_first, sch in ((False, (8, 3, 1)), (True, (6, 2, 2))):
        module = llama.LlamaForCausalLM(cfg.replace(protect_first=protect_first))
        logits, cache, out = jit_apply(module, ld.params, batch, method="prefill", max_new_tokens=5,
                                       schedule=sch)
        assert logits.shape == (5, cfg.vocab_size) and cache.prompt_slots == sch
        for l, keep in enumerate(sch):
            # grouped-query: the cache holds the 2 KV heads, not the 4 query heads
            assert cache.keys[l].shape == cache.values[l].shape == (5, keep + 5, 2, 8)
            pos, m = np.asarray(cache.positions[l]), np.asarray(cache.mask[l])
            assert not m[:, keep:].any() and np.all(pos[:, keep:] == -1)
            np.testing.assert_array_equal(m.sum(1), np.minimum(lengths, keep))
            assert all(last[e] in pos[e, :keep] for e in range(5)), (l, pos)
            if protect_first:
                assert np.all(pos[:, 0] == 0)
        np.testing.assert_array_equal(np.asarray(cache.next_position), lengths)
        assert cache.nbytes(prompt_only=True) == sum(2 * 5 * k * 2 * 8 * 4 for k in sch)


def test_cached_scoring_equals_one_forward_pass(tiny):
    ld, _ = tiny
    ev = lm.LMEvaluator(ld.module, ld.params, ld.config, batch_size=2, context=12, continuation=6)
    rng = np.random.default_rng(3)
    ctx, cont = rng.integers(3, 101, (3, 12)), rng.integers(3, 101, (3, 6))
    got = ev.score(ctx, cont, ev.schedule(1.0))
    full = jit_apply(ld.module, ld.params, {"input_ids": np.concatenate([ctx, cont], 1)})
    logp = jax.nn.log_softmax(np.asarray(full.logits)[:, 11:17], -1)
    nll = -np.take_along_axis(np.asarray(logp), cont[..., None], -1).mean()
    assert abs(got["nll"] - float(nll)) <= 1e-5
    pruned = ev.score(ctx, cont, (8, 4, 2))
    assert abs(pruned["nll"] - got["nll"]) > 1e-4  # pruning the context changes the scores


def test_greedy_generation_matches_hf_at_speedup_one(tiny):
    ld, hf = tiny
    lengths = [12, 5, 9, 1]
    batch = padded_batch(np.random.default_rng(4), lengths, 12, 101)
    gen = generate.Generator.from_loaded(ld)
    out = gen.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10, speedup=1.0)
    varied = 0
    for e, n in enumerate(lengths):
        ids = torch.tensor(batch["input_ids"][e:e + 1, :n])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                              do_sample=False, pad_token_id=2)[0, n:].numpy()
        # HF stops a lone sequence at eos (id 2); accjax pads the rest of the row with it.
        np.testing.assert_array_equal(out.tokens[e, :len(ref)], ref, err_msg=f"row {e}")
        assert np.all(out.tokens[e, len(ref):] == 2) and out.lengths[e] == len(ref)
        varied += len(set(ref.tolist())) > 2
    assert varied >= 2


def test_generation_at_a_speedup_uses_the_pruned_cache(tiny):
    ld, _ = tiny
    batch = padded_batch(np.random.default_rng(5), [16, 10], 16, 101)
    check_generation_uses_the_pruned_cache(ld, batch)
    gen = generate.Generator.from_loaded(ld)
    s = gen.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, speedup=2.0,
                     temperature=1.0, top_k=5, seed=1, eos_token_id=None)
    top5 = np.argsort(-s.first_logits, -1)[:, :5]
    assert all(s.tokens[e, 0] in top5[e] for e in range(2))  # sampling on the pruned prefill
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        gen.generate(batch["input_ids"], max_new_tokens=120)


def test_presets_have_hf_parameter_counts():
    import flax.linen as nn

    fam = llama_family.family()
    for name, want in (("smollm2-135m", 134_515_008), ("llama-3.2-1b", 1_235_814_400),
                       ("llama-3-8b", 8_030_261_248)):
        cfg = fam.presets[name]
        shapes = jax.eval_shape(lambda: fam.module(cfg, "lm").init(
            jax.random.PRNGKey(0), **fam.dummy_inputs(cfg, 1, 8)))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
        assert n == want, name
