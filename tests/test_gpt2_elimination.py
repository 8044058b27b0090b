"""Causal ACC, prefill elimination, the pruned KV cache and generation for GPT-2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from accjax import acc, attention, convert, generate, inference, models
from accjax import schedule as S
from accjax.models import common, gpt2, gpt2_family
from tests.gpt2_testlib import check_generation_uses_the_pruned_cache, jit_apply, make_hf_gpt2, padded_batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 layers, 64 positions; a large init scale so greedy decoding does not settle on one
    token (a near-zero random model repeats itself and would hide decoding bugs)."""
    folder, hf = make_hf_gpt2(tmp_path_factory.mktemp("tiny"), n_layer=3, initializer_range=0.3)
    return convert.load(folder, "lm"), hf


# ------------------------------------------------------------------------- causal ACC
def test_causal_acc_worked_example():
    # 1 head, 4 rows, row 3 padding. Rows of P are queries; causal: q_i sees keys j <= i.
    p = np.array([[1.00, 0.00, 0.00, 0.0],
                  [0.50, 0.50, 0.00, 0.0],
                  [0.25, 0.25, 0.50, 0.0],
                  [0.25, 0.25, 0.25, 0.25]], np.float32)[None, None]  # [1, 1, 4, 4]
    mask = jnp.array([[True, True, True, False]])
    # column sums over the 3 real queries: [1.75, 0.75, 0.50]; queries that can see each
    # column: [3, 2, 1]. Causal ACC = [0.5833, 0.375, 0.5]; plain divides by 3 instead and
    # would rank row 2 last only because fewer queries come after it.
    got = np.asarray(acc.acc_scores(jnp.asarray(p), mask, causal=True))
    np.testing.assert_allclose(got[0, :3], [1.75 / 3, 0.375, 0.5], rtol=1e-6)
    assert got[0, 3] == -np.inf
    plain = np.asarray(acc.acc_scores(jnp.asarray(p), mask))
    np.testing.assert_allclose(plain[0, :3], [1.75 / 3, 0.25, 0.5 / 3], rtol=1e-6)
    protected = acc.acc_scores(jnp.asarray(p), mask, causal=True, protect=jnp.array([[0, 0, 1, 0]], bool))
    np.testing.assert_array_equal(np.asarray(acc.select_rows(protected, 2)), [[0, 2]])
    np.testing.assert_array_equal(np.asarray(acc.select_rows(protected, 1)), [[2]])
    np.testing.assert_array_equal(np.asarray(acc.select_rows(protected, 3)), [[0, 1, 2]])


def _np_causal_acc(probs, mask):
    """Loop transcription of causal ACC: [B, N, T, T] probabilities -> [B, T] (no protection)."""
    b, n, t, _ = probs.shape
    out = np.full((b, t), -np.inf)
    for e in range(b):
        real = np.flatnonzero(mask[e])
        for j in real:
            seen = [i for i in real if i >= j]
            out[e, j] = sum(probs[e, h, i, j] for h in range(n) for i in seen) / (n * len(seen))
    return out


def test_layer_acc_matches_numpy_reference(tiny):
    ld, _ = tiny
    batch = padded_batch(np.random.default_rng(0), [16, 9, 4], 16, 97)
    sch = (12, 6, 2)
    out = jit_apply(ld.module, ld.params, batch, schedule=sch, output_attentions=True)
    probs = np.asarray(out.attentions[0], np.float64)  # layer 0 runs on the whole prompt
    ref = _np_causal_acc(probs, batch["attention_mask"].astype(bool))
    last = batch["attention_mask"].sum(1) - 1
    ref[np.arange(3), last] = np.inf
    np.testing.assert_allclose(np.asarray(out.layers[0]["acc"]), ref, rtol=1e-5, atol=1e-7)
    # the lse path (what a fused kernel feeds) gives the same scores as the probabilities
    cfg = ld.config
    x = np.asarray(jit_apply(ld.module, ld.params, batch, output_hidden_states=True).hidden_states[0])
    p0 = ld.params["transformer"]["layer_0"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * p0["ln_1"]["scale"] + p0["ln_1"]["bias"]
    qkv = np.einsum("btd,dqnh->btqnh", h, p0["qkv"]["kernel"]) + p0["qkv"]["bias"]
    q, k = jnp.asarray(qkv[:, :, 0]), jnp.asarray(qkv[:, :, 1])
    m = jnp.asarray(batch["attention_mask"].astype(bool))
    _, lse = attention.fused_attention(q, k, k, m, scale=cfg.head_dim ** -0.5, causal=True,
                                       implementation="xla", return_lse=True)
    from_lse = acc.acc_scores_from_lse(q, k, lse, m, scale=cfg.head_dim ** -0.5, causal=True)
    ref_plain = _np_causal_acc(probs, batch["attention_mask"].astype(bool))
    finite = np.isfinite(ref_plain)
    np.testing.assert_allclose(np.asarray(from_lse)[finite], ref_plain[finite], rtol=1e-4, atol=1e-6)


def test_fused_causal_kernel_prefill_keeps_what_probabilities_keep(tiny):
    """The path GPUs take up to ``acc.FUSED_MAX_KEYS_CAUSAL`` prompt rows (attention and causal
    column sums in one Pallas kernel, run in the interpreter) scores, keeps and caches what
    ACC from the materialised probabilities does, through three eliminations."""
    ld, _ = tiny
    batch = padded_batch(np.random.default_rng(4), [16, 11, 5], 16, 97)
    runs = {}
    for how in ("probs", "fused_interpret"):
        module = gpt2.GPT2LMHeadModel(ld.config.replace(acc_impl=how))
        runs[how] = jit_apply(module, ld.params, batch, method="prefill", max_new_tokens=2, schedule=(12, 6, 3))
    _assert_same_prefill(runs["probs"], runs["fused_interpret"])


def test_second_pass_sums_go_unfinished_to_the_selection_kernel(tiny, monkeypatch):
    """The second ACC pass (the Pallas kernel beside flash attention, interpreted) hands its
    per-head column sums unfinished (``acc.ColumnSums``) to ``eliminate``: with the selection
    kernel allowed on large layers (``keep_rows.LARGE_MIN_ROWS``, its threshold search, made
    small here) the kernel finishes them itself (a sum over the heads, each divided by the heads
    times the queries that see it, the last token protected through the mask); without it XLA
    finishes them. Both keep, score and cache what ACC from the probabilities does."""
    from accjax.kernels import keep_rows

    ld, _ = tiny
    batch = padded_batch(np.random.default_rng(6), [16, 12, 7], 16, 97)
    selections = []
    real_select = keep_rows.select_and_gather
    monkeypatch.setattr(keep_rows, "select_and_gather",
                        lambda *a: selections.append((a[0].shape, a[2], a[7])) or real_select(*a))
    monkeypatch.setattr(keep_rows, "KERNEL", "interpret")
    monkeypatch.setattr(acc, "SELECT_METHOD", "kernel")
    monkeypatch.setattr(keep_rows, "MAX_ROWS", 4)  # (no layer ranks: 16, 12, 6 rows enter)
    monkeypatch.setattr(keep_rows, "THRESHOLD_ROWS", 8)  # the threshold search from 9 rows
    runs = {}
    for how, large in (("probs", None), ("pallas_interpret", None), ("pallas_interpret", 9)):
        monkeypatch.setattr(keep_rows, "LARGE_MIN_ROWS", large)
        module = gpt2.GPT2LMHeadModel(ld.config.replace(acc_impl=how))
        runs[how, large] = jit_apply(module, ld.params, batch, method="prefill", max_new_tokens=2,
                                     schedule=(12, 6, 3))
    n = ld.config.num_heads
    # only the layers of at least 9 rows (16 and 12), from the heads' sums [B, N, T]
    assert selections == [((3, n, 16), 12, n), ((3, n, 12), 6, n)]
    for key in (("pallas_interpret", None), ("pallas_interpret", 9)):
        _assert_same_prefill(runs["probs", None], runs[key], str(key))
    # the unfinished sums finish to the very array the finished path returns
    rng = np.random.default_rng(7)
    q, k = (jnp.asarray(rng.normal(size=(2, 10, 2, 16)), jnp.float32) for _ in range(2))
    m = jnp.asarray(np.arange(10)[None] < np.array([[10], [6]]))
    last = jnp.asarray(np.arange(10)[None] == np.array([[9], [5]]))
    for causal in (True, False):
        kw = dict(scale=0.25, causal=causal, protect=last, interpret=True)
        cs = acc.acc_scores_fused(q, k, m, unfinished=True, **kw)
        assert isinstance(cs, acc.ColumnSums) and cs.causal_heads == (2 if causal else 0)
        np.testing.assert_array_equal(np.asarray(cs.finished()), np.asarray(acc.acc_scores_fused(q, k, m, **kw)))
    with pytest.raises(ValueError, match="self-attention"):
        acc.acc_scores_fused(q, k, m, m, scale=0.25, causal=True, interpret=True, unfinished=True)


def _assert_same_prefill(want, got, msg: str = "") -> None:
    """Two prefills' (logits, cache, output) agree: every eliminating layer's kept rows exactly,
    ACC where finite (and finite in the same places), logits and KV cache to 1e-5."""
    (l1, c1, o1), (l2, c2, o2) = want, got
    for a, b in zip(o1.layers, o2.layers):
        assert ("keep_idx" in a) == ("keep_idx" in b), msg
        if "keep_idx" not in a:
            continue
        np.testing.assert_array_equal(np.asarray(b["keep_idx"]), np.asarray(a["keep_idx"]), err_msg=msg)
        fin = np.isfinite(np.asarray(a["acc"]))
        assert (np.isfinite(np.asarray(b["acc"])) == fin).all(), msg
        np.testing.assert_allclose(np.asarray(b["acc"])[fin], np.asarray(a["acc"])[fin], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), rtol=1e-5, atol=1e-5)
    for a, b in zip(c1.keys + c1.values, c2.keys + c2.values):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_the_fused_kernel_reads_the_packed_projection(tmp_path, monkeypatch):
    """With heads of 16 (the packed kernel's smallest), the fused attention + ACC kernel
    (interpreted) reads the q/k/v projection's output itself in every eliminating layer (no
    copies of the q, k and v slices): keeps, ACC, logits and KV cache as ACC from the
    probabilities gives them. Then with the selection kernel (interpreted) as well, which
    finishes the causal column sums itself (each divided by the heads times the queries that
    see it, the last token protected through the mask): the same again."""
    from accjax.kernels import acc_pallas, keep_rows

    folder, _ = make_hf_gpt2(tmp_path, n_layer=3, n_head=2, initializer_range=0.3)
    ld = convert.load(folder, "lm")
    assert ld.config.head_dim == 16
    calls, selections = [], []
    real = acc_pallas.self_attention_with_column_sums_packed
    monkeypatch.setattr(acc_pallas, "self_attention_with_column_sums_packed",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    real_select = keep_rows.select_and_gather
    monkeypatch.setattr(keep_rows, "select_and_gather",
                        lambda *a: selections.append((a[0].shape, a[2], a[7])) or real_select(*a))
    batch = padded_batch(np.random.default_rng(4), [16, 11, 5], 16, 97)
    runs = {}
    for how in ("probs", "fused_interpret", "kernel"):
        if how == "kernel":
            monkeypatch.setattr(keep_rows, "KERNEL", "interpret")
            monkeypatch.setattr(acc, "SELECT_METHOD", "kernel")
        module = gpt2.GPT2LMHeadModel(ld.config.replace(acc_impl="probs" if how == "probs" else "fused_interpret"))
        runs[how] = jit_apply(module, ld.params, batch, method="prefill", max_new_tokens=2, schedule=(12, 6, 3))
    assert calls == [(3, 16, 3, 2, 16), (3, 12, 3, 2, 16), (3, 6, 3, 2, 16)] * 2  # [B, T, 3, N, H] per layer
    # the unreduced sums [B, P, Tp] of each layer, its keep and the heads that divide them
    assert [(s[:2], k, n) for s, k, n in selections] == [((3, 2), 12, 2), ((3, 2), 6, 2), ((3, 2), 3, 2)]
    for how in ("fused_interpret", "kernel"):
        _assert_same_prefill(runs["probs"], runs[how], how)


def test_prefill_with_qkv_gemms_apart_caches_the_same_keys(tiny, monkeypatch):
    """``gpt2.SEPARATE_QKV_BACKENDS`` (here the CPU, from ``common.QKV_APART_MIN_ROWS`` rows):
    q, k and v from three GEMMs kept apart give the prefill's logits, kept rows and KV cache of
    the one projection's slices. Only layers that do not eliminate take them (the fused
    kernel's layers read the one projection, which the cache then takes too); a decoding step
    never does."""
    ld, _ = tiny
    batch = padded_batch(np.random.default_rng(5), [16, 11, 5], 16, 97)
    ids = jnp.asarray(np.random.default_rng(6).integers(1, 97, (3, 1)), jnp.int32)

    def barriers(module, method, inputs: dict, **kw):
        text = jax.jit(lambda p, a: module.apply({"params": p}, **a, method=method, **kw)).lower(
            ld.params, inputs).as_text()
        return text.count("optimization_barrier")

    runs = {}
    for backends, min_rows in (((), 0), (("cpu",), 0), (("cpu",), 49)):  # (3 x 16 rows)
        monkeypatch.setattr(gpt2, "SEPARATE_QKV_BACKENDS", backends)
        monkeypatch.setattr(common, "QKV_APART_MIN_ROWS", min_rows)
        module = gpt2.GPT2LMHeadModel(ld.config)
        for schedule in ((16, 16, 16), (16, 6, 3)):  # dense; the first layer alone keeps every row
            apart = (3 if schedule[1] == 16 else 1) if backends and min_rows <= 48 else 0
            assert barriers(module, "prefill", batch, max_new_tokens=2, schedule=schedule) == apart
            run = jit_apply(module, ld.params, batch, method="prefill", max_new_tokens=2, schedule=schedule)
            runs.setdefault(schedule, []).append(run)
        assert barriers(module, "extend", {"input_ids": ids, "cache": run[1]}) == 0
    for same in runs.values():
        _assert_same_prefill(same[0], same[1])


# --------------------------------------------------------------- elimination + cache
def test_speedup_one_is_the_dense_path(tiny):
    ld, _ = tiny
    cfg = ld.config
    cost = gpt2_family.cost_model(cfg, "lm")
    assert S.schedule_for_speedup(cost, 16, 1.0) == (16, 16, 16)
    batch = padded_batch(np.random.default_rng(1), [16, 11, 3], 16, 97)
    dense = jit_apply(ld.module, ld.params, batch)
    same = jit_apply(ld.module, ld.params, batch, schedule=(16, 16, 16))
    np.testing.assert_array_equal(np.asarray(same.logits), np.asarray(dense.logits))
    assert all("keep_idx" not in layer for layer in same.layers)  # no gather happened


def test_cache_sizes_follow_the_schedule_and_the_last_token_survives(tiny):
    ld, _ = tiny
    lengths = np.array([16, 13, 7, 2, 1])
    batch = padded_batch(np.random.default_rng(2), lengths, 16, 97)
    last = lengths - 1
    for protect_first, sch in ((False, (8, 3, 1)), (False, (12, 12, 4)), (True, (6, 2, 1))):
        module = gpt2.GPT2LMHeadModel(ld.config.replace(protect_first=protect_first))
        logits, cache, out = jit_apply(module, ld.params, batch, method="prefill", max_new_tokens=5,
                                       schedule=sch)
        assert logits.shape == (5, ld.config.vocab_size)
        assert cache.prompt_slots == sch
        n_in = 16
        for l, keep in enumerate(sch):
            assert cache.keys[l].shape == (5, keep + 5, 4, 8)
            assert cache.values[l].shape == (5, keep + 5, 4, 8)
            pos, m = np.asarray(cache.positions[l]), np.asarray(cache.mask[l])
            assert not m[:, keep:].any() and np.all(pos[:, keep:] == -1)  # decode slots empty
            # padding goes first: real rows kept = min(real rows, keep)
            np.testing.assert_array_equal(m.sum(1), np.minimum(lengths, keep))
            # the last real token is in every layer's cache, at its original position
            assert all(last[e] in pos[e, :keep] for e in range(5)), (l, pos)
            if protect_first and keep >= 2:
                assert np.all(pos[:, 0] == 0)  # the attention sink survives too (not over the last)
            if keep < n_in:
                kept = np.asarray(out.layers[l]["positions"])
                assert np.all(np.diff(kept, axis=1) > 0)  # original order
            n_in = keep
        np.testing.assert_array_equal(np.asarray(cache.next_position), lengths)


def test_every_ranking_runs_and_recent_keeps_the_latest_rows(tiny):
    ld, _ = tiny
    batch = padded_batch(np.random.default_rng(8), [16, 10], 16, 97)
    for variant in gpt2.RANKINGS:
        out = jit_apply(ld.module, ld.params, batch, schedule=(8, 4, 2), acc_variant=variant)
        assert out.logits.shape == (2, 2, 97) and np.all(np.isfinite(np.asarray(out.logits))), variant
        # the last real token is the one row every variant keeps to the end
        np.testing.assert_array_equal(np.asarray(out.rows.positions)[:, -1], [15, 9])
    # 'recent' is a sliding window: the last `keep` real rows
    np.testing.assert_array_equal(np.asarray(out.layers[0]["positions"]),
                                  [list(range(8, 16)), list(range(2, 10))])
    with pytest.raises(ValueError, match="'prefix' would drop the last token"):
        jit_apply(ld.module, ld.params, batch, schedule=(8, 4, 2), acc_variant="prefix")


def _np_reference(p, cfg, ids, n, schedule, t_pad, feed):
    """Numpy GPT-2 of ONE prompt (its n real tokens): causal-ACC pruned prefill, then the
    tokens ``feed`` decoded one by one on per-layer caches holding each layer's kept rows.

    Returns (first logits [V], logits after each fed token [len(feed), V]).
    """
    t = p["transformer"]
    eps, nh, hd = cfg.layer_norm_eps, cfg.num_heads, cfg.head_dim

    def ln(x, g):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * g["scale"] + g["bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    def qkv(lp, x):
        y = np.einsum("sd,dqnh->sqnh", ln(x, lp["ln_1"]), lp["qkv"]["kernel"]) + lp["qkv"]["bias"]
        return y[:, 0], y[:, 1], y[:, 2]  # [s, N, H]

    def rest(lp, x, ctx):
        x = x + np.einsum("snh,nhd->sd", ctx, lp["attn_out"]["kernel"]) + lp["attn_out"]["bias"]
        h = gelu(ln(x, lp["ln_2"]) @ lp["mlp_in"]["kernel"] + lp["mlp_in"]["bias"])
        return x + h @ lp["mlp_out"]["kernel"] + lp["mlp_out"]["bias"]

    wte = t["wte"]["embedding"]
    x = wte[ids[:n]] + t["wpe"]["embedding"][np.arange(n)]
    pos, rows_in, caches = np.arange(n), t_pad, []
    for l in range(cfg.num_layers):
        lp = t[f"layer_{l}"]
        q, k, v = qkv(lp, x)
        s = len(x)
        logits = np.einsum("inh,jnh->nij", q, k) / np.sqrt(hd)
        logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = np.einsum("nij,jnh->inh", pr, v)
        keep = schedule[l]
        if keep < rows_in:  # the padded batch's layer eliminates; padding goes first
            score = pr.sum((0, 1)) / (nh * (s - np.arange(s)))
            score[-1] = np.inf  # the last real token
            idx = np.sort(np.argsort(-score, kind="stable")[:min(keep, s)])
            x, ctx, k, v, pos = x[idx], ctx[idx], k[idx], v[idx], pos[idx]
        rows_in = keep
        caches.append([k, v])
        x = rest(lp, x, ctx)
    first = ln(x[-1], t["ln_f"]) @ wte.T
    steps = []
    for i, tok in enumerate(feed):
        x = wte[tok] + t["wpe"]["embedding"][n + i]
        for l in range(cfg.num_layers):
            lp = t[f"layer_{l}"]
            q, k, v = qkv(lp, x[None])
            caches[l][0] = np.concatenate([caches[l][0], k])
            caches[l][1] = np.concatenate([caches[l][1], v])
            logits = np.einsum("nh,snh->ns", q[0], caches[l][0]) / np.sqrt(hd)
            pr = np.exp(logits - logits.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            ctx = np.einsum("ns,snh->nh", pr, caches[l][1])
            x = rest(lp, x[None], ctx[None])[0]
        steps.append(ln(x, t["ln_f"]) @ wte.T)
    return first, np.stack(steps)


def test_pruned_prefill_and_decoding_match_numpy_reference(tiny):
    ld, _ = tiny
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), ld.params)
    lengths = [16, 12, 5]
    batch = padded_batch(np.random.default_rng(3), lengths, 16, 97)
    feed = np.array([[5, 17, 33], [40, 2, 8], [60, 61, 62]], np.int32)
    for sch in ((10, 5, 2), (16, 8, 8), (4, 4, 1)):
        first, cache, _ = jit_apply(ld.module, ld.params, batch, method="prefill", max_new_tokens=4,
                                    schedule=sch)
        steps, _ = jax.jit(lambda par, f, c: ld.module.apply({"params": par}, f, c, method="extend"))(
            ld.params, feed, cache)
        for e, n in enumerate(lengths):
            ref_first, ref_steps = _np_reference(p, ld.config, batch["input_ids"][e], n, sch, 16, feed[e])
            np.testing.assert_allclose(np.asarray(first[e]), ref_first, atol=1e-4, err_msg=f"{sch} {e}")
            np.testing.assert_allclose(np.asarray(steps[e]), ref_steps, atol=1e-4, err_msg=f"{sch} {e}")


def test_greedy_generation_matches_hf_at_speedup_one(tiny):
    ld, hf = tiny
    lengths = [12, 5, 9, 1]
    batch = padded_batch(np.random.default_rng(4), lengths, 12, 97)
    gen = generate.Generator.from_loaded(ld)
    out = gen.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10, speedup=1.0)
    assert out.tokens.shape == (4, 10)
    varied = 0
    for e, n in enumerate(lengths):
        ids = torch.tensor(batch["input_ids"][e:e + 1, :n])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                              do_sample=False, pad_token_id=0)[0, n:].numpy()
        # HF stops a lone sequence at eos (id 0); accjax pads the rest of the row with it.
        np.testing.assert_array_equal(out.tokens[e, :len(ref)], ref, err_msg=f"row {e}")
        assert np.all(out.tokens[e, len(ref):] == 0) and out.lengths[e] == len(ref)
        varied += len(set(ref.tolist())) > 2
    assert varied >= 2  # the comparison is not between two constant sequences


def test_generation_at_a_speedup_uses_the_pruned_cache(tiny):
    ld, _ = tiny
    check_generation_uses_the_pruned_cache(ld, padded_batch(np.random.default_rng(5), [16, 10], 16, 97))


def test_sampling_top_k_and_seeds(tiny):
    ld, _ = tiny
    batch = padded_batch(np.random.default_rng(6), [8, 8], 8, 97)
    gen = generate.Generator.from_loaded(ld)
    kw = dict(max_new_tokens=5, eos_token_id=None)
    greedy = gen.generate(batch["input_ids"], batch["attention_mask"], **kw).tokens
    a = gen.generate(batch["input_ids"], batch["attention_mask"], temperature=1.5, top_k=3, seed=7, **kw)
    b = gen.generate(batch["input_ids"], batch["attention_mask"], temperature=1.5, top_k=3, seed=7, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # a seed fixes the sample
    # the first sampled token is among the prefill's 3 most likely
    top3 = np.argsort(-a.first_logits, axis=-1)[:, :3]
    assert all(a.tokens[e, 0] in top3[e] for e in range(2))
    draws = {tuple(gen.generate(batch["input_ids"], batch["attention_mask"], temperature=1.5,
                                top_k=3, seed=s, **kw).tokens.ravel()) for s in range(4)}
    assert len(draws) > 1  # sampling samples
    np.testing.assert_array_equal(
        gen.generate(batch["input_ids"], batch["attention_mask"], temperature=0.7, top_k=1, **kw).tokens,
        greedy)  # top_k=1 is greedy
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        gen.generate(batch["input_ids"], max_new_tokens=60)


def test_classifier_through_the_predictor(tmp_path):
    folder, _ = make_hf_gpt2(tmp_path / "c", head="sequence_classification", n_layer=2,
                             pad_token_id=0)
    ld = convert.load(folder, "sequence_classification")
    batch = padded_batch(np.random.default_rng(7), [30, 12, 5], 30, 97)
    pred = inference.Predictor.from_loaded(ld, batch_size=4, length_buckets=(32,))
    assert pred.input_names == ("input_ids", "attention_mask")
    direct = np.asarray(jit_apply(ld.module, ld.params, batch).logits)
    np.testing.assert_allclose(pred.predict(batch, speedup=1.0), direct, atol=1e-5)
    sch = pred.schedule(32, 2.0)
    assert S.analytic_speedup(models.cost_model(ld.config), 32, sch) > 1.5 and sch[-1] < 32
    padded = {k: np.pad(v, ((0, 0), (0, 2))) for k, v in batch.items()}
    out = jit_apply(ld.module, ld.params, padded, schedule=sch)
    np.testing.assert_allclose(pred.predict(batch, speedup=2.0), np.asarray(out.logits), atol=1e-5)
    # the pooled (last real) token is protected in every layer
    for layer in out.layers:
        pos = np.asarray(layer["positions"])
        assert all(n - 1 in pos[e] for e, n in enumerate([30, 12, 5]))


def test_gpt2_presets_have_hf_parameter_counts():
    import math

    import flax.linen as nn

    from accjax import models

    fam = models.get_family("gpt2")
    for name, want in (("gpt2", 124_439_808), ("gpt2-medium", 354_823_168)):
        cfg = models.preset(name)
        module = fam.module(cfg, "lm")
        abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **fam.dummy_inputs(cfg, 1, 8)))
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(abstract["params"])))
        assert n == want, name  # HF GPT2Model / GPT2LMHeadModel (tied head adds nothing)
