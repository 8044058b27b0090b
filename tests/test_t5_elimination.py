"""Encoder elimination in T5: original-position bias, kept rows, cross-attention mask, programs."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from accjax import acc as acc_lib
from accjax import convert, models, seq2seq
from accjax import schedule as S
from accjax.models import t5
from tests.t5_helpers import decoder_batch, make_hf_t5, random_batch

# 3 encoder layers; 8 buckets with max_distance 16, so moved positions change buckets.
CFG = dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3, num_decoder_layers=2,
           relative_attention_num_buckets=8, relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, _ = make_hf_t5(tmp_path_factory.mktemp("tiny") / "m", seed=1, **CFG)
    return convert.load(folder, "lm")


@functools.lru_cache(maxsize=None)
def _jitted(module, **kw):
    return jax.jit(functools.partial(module.apply, **kw))


def _apply(ld, *args, schedule=None, **kw):
    return _jitted(ld.module, schedule=schedule, **kw)({"params": ld.params}, *args)


def test_speedup_one_is_dense_exactly(tiny):
    batch = random_batch(np.random.default_rng(0), 4, 16, 99)
    dec, dmask = decoder_batch(np.random.default_rng(1), 4, 5, 99)
    sch = S.schedule_for_speedup(models.cost_model(tiny.config), 16, 1.0)
    assert sch == (16, 16, 16)
    dense = _apply(tiny, batch["input_ids"], batch["attention_mask"], dec, dmask)
    same = _apply(tiny, batch["input_ids"], batch["attention_mask"], dec, dmask, schedule=sch)
    np.testing.assert_array_equal(np.asarray(same.logits), np.asarray(dense.logits))
    assert all(layer == {} for layer in same.encoder.layers)  # nothing was eliminated


# ---------------------------------------------------------------- numpy reference encoder
def _np_bias(table, q_pos, k_pos, cfg):
    """table[bucket(k_pos[j] - q_pos[i])] -> [B, N, T, S], buckets from HF's own function."""
    rel = k_pos[:, None, :] - q_pos[:, :, None]
    buckets = T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional=True, num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance).numpy()
    return np.transpose(table[buckets], (0, 3, 1, 2))


def _np_encoder(params, ids, mask, schedule, cfg, positions_from: str):
    """Numpy T5 encoder with plain-ACC elimination. ``positions_from`` = 'original' (right)
    or 'compacted' (the bug the design forbids: bias from the kept rows' new indices)."""
    enc = params["encoder"]
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.layer_norm_epsilon) * f64(w)

    table = f64(enc["relative_attention_bias"]["embedding"])
    x = f64(params["shared"]["embedding"])[ids]
    b, t = ids.shape
    mask = mask.astype(bool)
    pos = np.broadcast_to(np.arange(t), (b, t)).copy()
    hidden, kept = [], []
    for i, keep in enumerate(schedule):
        w = enc[f"layer_{i}"]
        h = rms(x, w["attn_norm"]["scale"])
        qkv = np.einsum("btd,dqnh->btqnh", h, f64(w["qkv"]["kernel"]))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        n = x.shape[1]
        bpos = pos if positions_from == "original" else np.broadcast_to(np.arange(n), (b, n))
        logits = np.einsum("btnh,bsnh->bnts", q, k) + _np_bias(table, bpos, bpos, cfg)
        logits = np.where(mask[:, None, None, :], logits, -1e30)
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = np.einsum("bnts,bsnh->btnh", pr, v)
        if keep < n:
            col = (pr * mask[:, None, :, None]).sum((1, 2)) / (cfg.num_heads * mask.sum(1, keepdims=True))
            col = np.where(mask, col, -np.inf)
            idx = np.sort(np.argsort(-col, axis=1, kind="stable")[:, :keep], axis=1)
            ctx = np.take_along_axis(ctx, idx[:, :, None, None], 1)
            x = np.take_along_axis(x, idx[:, :, None], 1)
            mask = np.take_along_axis(mask, idx, 1)
            pos = np.take_along_axis(pos, idx, 1)
            kept.append(idx)
        x = x + np.einsum("btnh,nhd->btd", ctx, f64(w["attn_out"]["kernel"]))
        h = rms(x, w["mlp_norm"]["scale"])
        g = np.einsum("btd,dgf->btgf", h, f64(w["mlp"]["wi"]["kernel"]))
        a = g[:, :, 0]
        a = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
        x = x + (a * g[:, :, 1]) @ f64(w["mlp"]["wo"]["kernel"])
        hidden.append(x)
    return hidden, kept, pos


def test_position_bias_comes_from_original_positions(tiny):
    """Fails if the bias after elimination were recomputed from compacted positions."""
    cfg = tiny.config
    batch = random_batch(np.random.default_rng(3), 4, 24, 99, min_len=14)
    schedule = (16, 10, 6)
    out = _apply(tiny, batch["input_ids"], batch["attention_mask"], method="encode",
                 schedule=schedule, output_hidden_states=True)
    right, kept, pos = _np_encoder(tiny.params, batch["input_ids"], batch["attention_mask"], schedule,
                                   cfg, "original")
    wrong, _, _ = _np_encoder(tiny.params, batch["input_ids"], batch["attention_mask"], schedule,
                              cfg, "compacted")
    for i in range(len(schedule)):
        np.testing.assert_array_equal(np.asarray(out.layers[i]["keep_idx"]), kept[i], err_msg=f"layer {i}")
        got = np.asarray(out.hidden_states[i + 1])
        assert np.abs(got - right[i]).max() <= 2e-5, f"layer {i} differs from the original-position reference"
    np.testing.assert_array_equal(np.asarray(out.rows.positions), pos)
    # Layer 1 is the first to see moved rows: the wrong bias changes it far beyond rounding.
    gap = np.abs(np.asarray(out.hidden_states[2]) - wrong[1]).max()
    assert gap > 1e-2, f"the compacted-position variant is indistinguishable ({gap})"


def test_take_bias_worked_example():
    """The module docstring's example: keeping rows [0, 3] keeps bucket(3) and bucket(-3)."""
    table = np.arange(8, dtype=np.float32)[:, None] * 10  # [buckets, N=1]: value = 10 * bucket
    pos = jnp.arange(4)[None]
    full = np.asarray(jnp.transpose(jnp.take(table, t5.relative_position_bucket(
        pos[:, None, :] - pos[:, :, None], bidirectional=True, num_buckets=8, max_distance=16), axis=0),
        (0, 3, 1, 2)))  # [1, 1, 4, 4]
    kept = np.asarray(t5.take_bias(jnp.asarray(full), jnp.array([[0, 3]])))[0, 0]
    b = lambda r: int(t5.relative_position_bucket(jnp.array(r), bidirectional=True,  # noqa: E731
                                                  num_buckets=8, max_distance=16))
    np.testing.assert_array_equal(kept, 10 * np.array([[b(0), b(3)], [b(-3), b(0)]], np.float32))
    assert b(3) != b(1) and b(-3) != b(-1)  # compacted positions would have given these


def test_kept_rows_and_cross_attention_mask_follow_the_schedule(tiny):
    cfg = tiny.config
    rng = np.random.default_rng(4)
    batch = random_batch(rng, 5, 16, 99, lengths=[16, 3, 9, 2, 12])
    dec, dmask = decoder_batch(rng, 5, 4, 99)
    schedule = (12, 8, 4)
    out = _apply(tiny, batch["input_ids"], batch["attention_mask"], dec, dmask, schedule=schedule)
    lengths = batch["attention_mask"].sum(1)
    n_in = 16
    for i, keep in enumerate(schedule):
        layer = out.encoder.layers[i]
        assert layer["acc"].shape == (5, n_in) and layer["keep_idx"].shape == (5, keep)
        p = np.asarray(layer["positions"])
        assert np.all(np.diff(p, axis=1) > 0)  # original order
        assert np.all((p < lengths[:, None]).sum(1) == np.minimum(lengths, keep))  # padding first out
        n_in = keep
    enc = out.encoder
    assert enc.last_hidden_state.shape == (5, 4, cfg.d_model) and enc.rows.mask.shape == (5, 4)
    np.testing.assert_array_equal(np.asarray(enc.rows.mask), np.asarray(enc.rows.positions) < lengths[:, None])
    # The decoder reads exactly the kept rows under their mask: rows masked out do not matter,
    # a kept real row does.
    h = np.asarray(enc.last_hidden_state).copy()
    m = np.asarray(enc.rows.mask)
    assert (~m).any()  # a short example keeps padding rows at this keep-length
    noisy = np.where(m[..., None], h, 100.0)
    dec_fn = functools.partial(tiny.module.apply, method="decode")
    logits = np.asarray(jax.jit(dec_fn)({"params": tiny.params}, dec, noisy, m, dmask))
    np.testing.assert_allclose(logits, np.asarray(out.logits), atol=1e-5)
    h2 = h.copy()
    h2[0, 0] += 1.0
    moved = np.asarray(jax.jit(dec_fn)({"params": tiny.params}, dec, h2, m, dmask))
    assert np.abs(moved[0] - logits[0]).max() > 1e-4


def test_first_step_attends_over_one_key_as_its_value(tiny):
    """The first decoding step (``seq2seq.first_token``'s: one cached slot) has one key in
    every decoder layer's self-attention, so the dispatch returns its value with no softmax
    traced there; its logits equal the first position of a teacher-forced two-token decode,
    whose self-attention runs in full."""
    cfg, m = tiny.config, tiny.module
    rng = np.random.default_rng(12)
    batch = random_batch(rng, 3, 16, 99)
    start = jnp.full((3,), cfg.decoder_start_token_id, jnp.int32)
    dec = jnp.stack([start, jnp.asarray(rng.integers(3, 99, size=3), jnp.int32)], axis=1)

    def step(p, enc, slots):
        kv = m.apply(p, enc.last_hidden_state, method="cross_kv")
        return m.apply(p, start, jnp.int32(0), t5.init_cache(cfg, 3, slots), kv, enc.rows.mask,
                       method="decode_step")[0]

    @jax.jit
    def run(p):
        enc = m.apply(p, batch["input_ids"], batch["attention_mask"], method="encode", schedule=(12, 8, 4))
        forced = m.apply(p, dec, enc.last_hidden_state, enc.rows.mask, method="decode")
        return step(p, enc, 1), step(p, enc, 4), forced[:, 0], enc

    params = {"params": tiny.params}
    first, four, forced, enc = run(params)
    np.testing.assert_allclose(np.asarray(first), np.asarray(forced), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(four), np.asarray(first), rtol=1e-5, atol=1e-5)
    exps = [sum(e.primitive.name == "exp" for e in jax.make_jaxpr(lambda p: step(p, enc, n))(params).jaxpr.eqns)
            for n in (1, 2)]
    # the cross-attention's softmax stays in both; one slot drops self-attention's in every layer
    assert exps[0] < exps[1] and (exps[1] - exps[0]) % cfg.num_decoder_layers == 0, exps


def test_packed_cross_kv_is_one_product_with_the_per_layer_values(tiny, monkeypatch):
    """t5.pack_cross_kv: every decoder layer's cross-attention K/V from one product over the
    kernels stacked once; the same values as the per-layer projections, and a predictor's
    first tokens are unchanged. New params assigned to a predictor (a training run's
    evaluation) are packed again."""
    cfg, m = tiny.config, tiny.module
    enc = jnp.asarray(np.random.default_rng(13).normal(size=(3, 7, cfg.d_model)), jnp.float32)
    packed = t5.pack_cross_kv(tiny.params)
    assert packed[t5.PACKED_CROSS_KV].shape == (cfg.d_model, cfg.num_decoder_layers, 2, cfg.num_heads, cfg.d_kv)
    want, got = t5.cross_kv(m, tiny.params, enc), t5.cross_kv(m, packed, enc)
    assert len(got) == len(want) == cfg.num_decoder_layers
    for (k1, v1), (k2, v2) in zip(want, got):
        np.testing.assert_allclose(np.asarray(k2), np.asarray(k1), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(v2), np.asarray(v1), rtol=1e-6, atol=1e-6)

    def dots(jaxpr):  # dot_generals, nested jaxprs (jnp.einsum's) included
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        return sum((e.primitive.name == "dot_general") + sum(
            dots(v) for v in e.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr"))
            for e in jaxpr.eqns)

    counts = [dots(jax.make_jaxpr(lambda p, x: t5.cross_kv(m, p, x))(p, enc)) for p in (packed, tiny.params)]
    assert counts == [1, cfg.num_decoder_layers], counts

    batch = random_batch(np.random.default_rng(14), 3, 16, 99)
    batch = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}
    _serving_layout_on_and_off(tiny, monkeypatch, "PACK_CROSS_KV", t5.PACKED_CROSS_KV, t5.pack_cross_kv, batch)


def _serving_layout_on_and_off(tiny, monkeypatch, flag, key, pack, batch):
    """A predictor's first tokens with ``seq2seq.<flag>`` on and off: its params carry ``key``
    only when on, the tokens are equal, and params assigned to it are packed again from their
    own kernels (``pack``). Returns the compiled first-token programs' text by on/off."""
    outs, texts = {}, {}
    for on in (True, False):
        monkeypatch.setattr(seq2seq, flag, on)
        pred = seq2seq.Seq2SeqPredictor.from_loaded(tiny, batch_size=4, length_buckets=(16,))
        assert (key in pred.params) is on
        first = pred.first_token_program(4, pred.plan(16, 2.0))
        outs[on] = np.asarray(first(pred.params, batch["input_ids"], batch["attention_mask"]))
        texts[on] = first.as_text()  # the compiled program (AOT)
        if on:
            moved = jax.tree.map(lambda x: x * 2, tiny.params)
            pred.params = moved
            np.testing.assert_array_equal(np.asarray(pred.params[key]), np.asarray(pack(moved)[key]))
    np.testing.assert_array_equal(outs[True], outs[False])
    return texts


def _step_encoder_rows(cfg, seed: int):
    """Random cross-attention (k, v) per decoder layer for 3 sequences of 5, 3 and 1 encoder
    rows (float32), and their mask: what a decoding step attends to."""
    rng = np.random.default_rng(seed)
    b, s = 3, 5
    kv = tuple((jnp.asarray(rng.normal(size=(b, s, cfg.num_heads, cfg.d_kv)), jnp.float32),
                jnp.asarray(rng.normal(size=(b, s, cfg.num_heads, cfg.d_kv)), jnp.float32))
               for _ in range(cfg.num_decoder_layers))
    return kv, jnp.asarray(np.arange(s)[None] < np.array([[5], [3], [1]]))


def test_first_step_self_attention_folds_into_one_product(tiny, monkeypatch):
    """t5.pack_self_vo: at the first decoder step (one key) each layer's self-attention is
    h W_V W_O, one [D, D] product: the same logits as the attention path, one product fewer
    per layer in the compiled first-token program, refused for a longer cache; a predictor's
    params carry it and fold assigned params again."""
    cfg, m = tiny.config, tiny.module
    folded = t5.pack_self_vo(tiny.params)
    assert folded[t5.PACKED_SELF_VO].shape == (cfg.num_decoder_layers, cfg.d_model, cfg.d_model)
    b = 3
    kv, enc_mask = _step_encoder_rows(cfg, 15)
    tok = jnp.asarray([cfg.decoder_start_token_id, 7, 11], jnp.int32)
    step = lambda p, vo, cache: m.apply({"params": p}, tok, jnp.int32(0), cache, kv, enc_mask, vo,  # noqa: E731
                                        method="decode_step")
    want, cache_a = step(tiny.params, None, t5.init_cache(cfg, b, 1))
    got, cache_b = step(folded, folded[t5.PACKED_SELF_VO], t5.init_cache(cfg, b, 1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for (ka, va), (kb, vb) in zip(cache_a, cache_b):  # the cache is still written
        np.testing.assert_allclose(np.asarray(kb), np.asarray(ka), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(vb), np.asarray(va), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="hold for one key, a cache of one slot; this cache has 2"):
        step(folded, folded[t5.PACKED_SELF_VO], t5.init_cache(cfg, b, 2))

    batch = random_batch(np.random.default_rng(16), 4, 16, 99)
    texts = _serving_layout_on_and_off(tiny, monkeypatch, "FOLD_SELF_VO", t5.PACKED_SELF_VO, t5.pack_self_vo,
                                       batch)
    dots = {on: text.count(" dot(") for on, text in texts.items()}
    assert dots[False] - dots[True] == cfg.num_decoder_layers, dots


def test_decoding_step_runs_each_projection_in_one_kernel(tmp_path, monkeypatch):
    """t5.STEP_KERNEL (opt-in) with ``step_proj`` interpreted: the first step (folded self-attention) and
    later steps give the XLA path's logits (float32, 1e-5) and caches, greedy generation the
    same tokens; each decoder layer calls the kernel five times a step (self-attention output,
    cross-attention query and output, the gated input, the output); more sequences than
    ``step_proj.MAX_ROWS`` or a feed-forward width off its tiling keep XLA's path."""
    from accjax.kernels import step_proj

    folder, _ = make_hf_t5(tmp_path / "m", seed=3, **{**CFG, "d_ff": 64})
    ld = convert.load(folder, "lm")
    cfg, m = ld.config, ld.module
    params = t5.pack_self_vo(ld.params)
    b = 3
    kv, enc_mask = _step_encoder_rows(cfg, 21)
    calls = []
    real = step_proj.step_proj
    monkeypatch.setattr(t5, "STEP_KERNEL", True)  # opt-in
    monkeypatch.setattr(step_proj, "step_proj", lambda *a, **k: calls.append(1) or real(*a, **k))

    def steps(mode):
        monkeypatch.setattr(step_proj, "KERNEL", mode)
        calls.clear()
        tok = jnp.asarray([cfg.decoder_start_token_id, 7, 11], jnp.int32)
        first, _ = m.apply({"params": params}, tok, jnp.int32(0), t5.init_cache(cfg, b, 1), kv, enc_mask,
                           params[t5.PACKED_SELF_VO], method="decode_step")
        n_first = len(calls)
        cache, out = t5.init_cache(cfg, b, 3), [first]
        for i in range(2):
            logits, cache = m.apply({"params": params}, tok, jnp.int32(i), cache, kv, enc_mask, method="decode_step")
            out.append(logits)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
        return [np.asarray(o) for o in out], cache, (n_first, len(calls))

    want, cache_a, counts = steps("never")
    assert counts == (0, 0)
    got, cache_b, counts = steps("interpret")
    assert counts == (5 * cfg.num_decoder_layers, 3 * 5 * cfg.num_decoder_layers), counts
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    for (ka, va), (kb, vb) in zip(cache_a, cache_b):
        np.testing.assert_allclose(np.asarray(kb), np.asarray(ka), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(vb), np.asarray(va), rtol=1e-6, atol=1e-6)
    batch = random_batch(np.random.default_rng(22), 4, 16, 99)
    tokens = {}
    for mode in ("never", "interpret"):
        monkeypatch.setattr(step_proj, "KERNEL", mode)
        tokens[mode] = np.asarray(seq2seq.generate_tokens(m, params, batch["input_ids"], batch["attention_mask"],
                                                          max_new_tokens=3))
    np.testing.assert_array_equal(tokens["interpret"], tokens["never"])
    x = jnp.zeros((3, 1, cfg.d_model), jnp.float32)
    assert t5._step_kernel(x, cfg)
    monkeypatch.setattr(t5, "STEP_KERNEL", False)
    assert not t5._step_kernel(x, cfg)
    monkeypatch.setattr(t5, "STEP_KERNEL", True)
    monkeypatch.setattr(step_proj, "MAX_ROWS", 2)
    assert not t5._step_kernel(x, cfg)
    monkeypatch.setattr(step_proj, "MAX_ROWS", 64)
    assert not t5._step_kernel(x, dataclasses.replace(cfg, d_ff=48))


def test_protect_last_keeps_the_eos(tiny):
    batch = random_batch(np.random.default_rng(5), 4, 16, 99)
    out = _apply(tiny, batch["input_ids"], batch["attention_mask"], method="encode",
                 schedule=(8, 4, 2), protect_last=True)
    last = batch["attention_mask"].sum(1) - 1
    for layer in out.layers:
        assert np.all((np.asarray(layer["positions"]) == last[:, None]).any(1))


def test_generation_programs_compile_once_and_sampling(tiny):
    rng = np.random.default_rng(6)
    pred = seq2seq.Seq2SeqPredictor.from_loaded(tiny, batch_size=4, length_buckets=(16,))
    a = pred.generate(random_batch(rng, 3, 14, 99), speedup=2.0, max_new_tokens=6)
    assert a.shape == (3, 6) and pred.traces == 1
    pred.generate(random_batch(rng, 4, 16, 99), speedup=2.0, max_new_tokens=6)  # new data, same key
    assert pred.traces == 1 and pred.num_programs == 1
    batch = random_batch(rng, 3, 14, 99)
    greedy = pred.generate(batch, speedup=2.0, max_new_tokens=6)
    top1 = pred.generate(batch, speedup=2.0, max_new_tokens=6, mode="sample", top_k=1, seed=3)
    np.testing.assert_array_equal(top1, greedy)  # top-1 sampling is greedy
    s1 = pred.generate(batch, speedup=2.0, max_new_tokens=6, mode="sample", temperature=5.0, seed=1)
    s2 = pred.generate(batch, speedup=2.0, max_new_tokens=6, mode="sample", temperature=5.0, seed=2)
    assert not np.array_equal(s1, s2)  # the seed matters
    assert pred.num_programs == 3


def test_cost_model_counts_the_decoder_first_token(tiny):
    cfg = tiny.config
    cm = models.cost_model(cfg)
    assert cm.a == cfg.num_heads * cfg.d_kv and cm.ffn_mats == 3 and cm.num_layers == 3
    assert cm.tail_per_row > 0 and cm.head > 2 * cfg.d_model * cfg.vocab_size
    sch = S.schedule_for_speedup(cm, 64, 2.0)
    # Fewer kept encoder rows also make fewer cross-attention keys and values.
    no_tail = S.CostModel(**{**cm.__dict__, "tail_per_row": 0.0})
    assert S.analytic_speedup(cm, 64, sch) > S.analytic_speedup(no_tail, 64, sch)
    assert abs(S.analytic_speedup(cm, 64, sch) - 2.0) < 0.25


def test_bench_t5_smoke(tmp_path):
    import json

    from eval import bench_t5

    out = tmp_path / "b.json"
    assert bench_t5.main(["--tiny", "--batch", "2", "--length", "16", "--speedups", "2",
                          "--iters", "1", "--attention_impl", "xla", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["speedup"] for r in rows] == [1.0, 2.0]
    assert rows[1]["schedule"][-1] < 16 and rows[1]["analytic"] > 1.5


def test_torch_timing_model_holds_our_weights(tiny):
    """The HF model eval.bench_t5 --vs-torch times computes what ours does (else the
    comparison would time a different network)."""
    from accjax import benchmark

    hf = benchmark.hf_t5_model(tiny.config, tiny.params)
    batch = random_batch(np.random.default_rng(5), 2, 16, 99)
    start = np.full((2, 1), tiny.config.decoder_start_token_id, np.int32)
    ours = np.asarray(_apply(tiny, batch["input_ids"], batch["attention_mask"], start).logits)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                 decoder_input_ids=torch.tensor(start, dtype=torch.long)).logits.numpy()
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_bias_lookup_at_original_positions_equals_gathering_the_entering_bias(tiny):
    """What the encoder does after an eliminating layer (look the bias up at the kept rows'
    original positions) equals take_bias on the previous bias, through two eliminations."""
    cfg = tiny.config
    rel = t5.RelativeBias(cfg, bidirectional=True)
    variables = {"params": tiny.params["encoder"]["relative_attention_bias"]}
    lookup = jax.jit(lambda p: rel.apply(variables, p, p))
    rng = np.random.default_rng(8)
    pos = jnp.arange(24, dtype=jnp.int32)[None].repeat(3, 0)
    bias = lookup(jnp.arange(24, dtype=jnp.int32)[None])  # [1, N, 24, 24]
    for keep in (15, 7):
        idx = jnp.asarray(np.sort(np.stack([rng.choice(pos.shape[1], keep, replace=False)
                                            for _ in range(3)]), axis=1))
        bias = t5.take_bias(bias, idx)  # [3, N, keep, keep]
        pos = jnp.take_along_axis(pos, idx, axis=1)
        np.testing.assert_array_equal(np.asarray(lookup(pos)), np.asarray(bias))
    assert len(np.unique(np.asarray(bias))) > 4  # a bias with structure, not a constant


@pytest.mark.parametrize("distance_attention,acc_impl", [
    ("never", "pallas_interpret"), ("interpret", "fused_interpret")])
# (16, 16, 6): layer 1 keeps every row but reads them at positions that differ per example:
# with 'interpret' it runs attention alone in the kernel
@pytest.mark.parametrize("schedule", [(16, 10, 6), (16, 16, 6)])
def test_pallas_acc_with_bias_by_distance_matches_probabilities(tiny, monkeypatch, distance_attention, acc_impl,
                                                                 schedule):
    """The kernel paths GPUs take, run in Pallas' interpreter, score and keep what ACC from
    the materialised probabilities does, through three eliminations, reading the bias by key
    - query distance of the ORIGINAL positions. 'pallas_interpret': attention with its
    log-sum-exp, then the second ACC pass adding the bias by distance (what 'never' runs);
    'fused_interpret' with 'interpret': attention and column sums in one kernel that reads the
    bias by distance (``acc_pallas.self_attention_by_distance_packed``), as on GPUs."""
    import dataclasses

    from accjax.models import get_family

    cfg = dataclasses.replace(tiny.config, acc_impl=acc_impl)
    module = get_family("t5").module(cfg, "lm")
    batch = random_batch(np.random.default_rng(9), 4, 24, 99, min_len=10)
    kw = dict(method="encode", schedule=schedule)
    ref = _apply(tiny, batch["input_ids"], batch["attention_mask"], **kw)
    monkeypatch.setattr(acc_lib, "DISTANCE_ATTENTION", distance_attention)
    got = jax.jit(functools.partial(module.apply, **kw))({"params": tiny.params}, batch["input_ids"],
                                                         batch["attention_mask"])
    for i in (i for i in range(len(schedule)) if "acc" in ref.layers[i]):
        a, b = np.asarray(got.layers[i]["acc"]), np.asarray(ref.layers[i]["acc"])
        fin = np.isfinite(b)
        assert (np.isfinite(a) == fin).all()
        np.testing.assert_allclose(a[fin], b[fin], rtol=1e-5, atol=1e-6, err_msg=f"layer {i}")
        np.testing.assert_array_equal(np.asarray(got.layers[i]["keep_idx"]), np.asarray(ref.layers[i]["keep_idx"]))
    np.testing.assert_allclose(np.asarray(got.last_hidden_state), np.asarray(ref.last_hidden_state), atol=1e-5)
    # A kernel that dropped the bias would miss these tolerances: the lse it is given includes
    # the bias, so exp(s - lse) would no longer sum to the probabilities' column sums.
    tab = np.asarray(tiny.params["encoder"]["relative_attention_bias"]["embedding"])
    assert tab.std() > 0.1, tab.std()


def test_bench_t5_vs_torch_keeps_the_model_name(tmp_path):
    import json

    from eval import bench_t5

    out = tmp_path / "b.json"
    assert bench_t5.main(["--tiny", "--batch", "2", "--length", "16", "--speedups", "", "--iters", "1",
                          "--attention_impl", "xla", "--vs-torch", "--no-torch-compile",
                          "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == "tiny"  # the torch rows' labels once overwrote it
    assert [r["impl"] for r in res["torch"]] == ["torch eager"] and res["torch"][0]["median_ms"] > 0
