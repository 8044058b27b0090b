"""The fused attention + ACC kernel (Pallas, interpreted on the CPU) and selection without a
sort, each against its reference: ACC from materialised probabilities, ``lax.top_k``."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accjax import acc, attention, convert
from accjax.kernels import acc_pallas
from accjax.kernels import gemm_act
from accjax.kernels import keep_rows
from accjax.kernels import layer_norm as ln_kernel
from accjax.kernels import step_proj
from tests.conftest import make_hf_bert, random_batch


def _qkv(rng, b, t, n, h):
    return (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(3))


def _two_passes_above_256(request, monkeypatch):
    """``ONE_PASS_MAX_KEYS`` lowered to 256: from 257 keys the kernel loops twice over tiles of
    128 (row statistics, then the sweep), the path of more than 512 keys at the default, at
    sizes the interpreter runs quickly."""
    jax.clear_caches()  # the jitted kernels read the bound when traced
    request.addfinalizer(jax.clear_caches)
    monkeypatch.setattr(acc_pallas, "ONE_PASS_MAX_KEYS", 256)


@pytest.mark.parametrize("causal", [False, True])
# 24: one key tile, query tile 32 with padding; 260 (the one-pass bound lowered to 256): tiles
# of 128 keys, two passes, padding in both; head size 24 is padded to 32 inside; 72 and 200:
# one pass over two key tiles (64 + 16, 128 + 128)
@pytest.mark.parametrize("t,h", [(24, 16), (260, 16), (40, 24), (72, 16), (200, 16)])
def test_fused_kernel_matches_probabilities(causal, t, h, request, monkeypatch):
    if t > 256:
        _two_passes_above_256(request, monkeypatch)
        assert acc_pallas.attention_blocks(t, t) == (64, (128,), 320, 384)
    _fused_against_probabilities(causal, t, h)


@pytest.mark.parametrize("causal", [False, True])
def test_one_pass_over_more_than_256_keys(causal, request, monkeypatch):
    """Up to ``ONE_PASS_MAX_KEYS`` (512) keys in one pass: 290 over key tiles 128 + 128 + 64,
    the query tile halved to 32 rows to hold at most ``ONE_PASS_LOGITS`` logits; the context
    and the column sums are the probabilities'. Above the bound the keys loop twice over
    tiles of 128."""
    assert acc_pallas.attention_blocks(290, 290) == (32, (128, 128, 64), 320, 320)
    assert acc_pallas.attention_blocks(512, 512) == (32, (128,) * 4, 512, 512)
    assert acc_pallas.attention_blocks(513, 513) == (64, (128,), 576, 640)
    assert acc_pallas.attention_blocks(200, 200) == (64, (128, 128), 256, 256)  # as up to 256
    _fused_against_probabilities(causal, 290, 16)
    _two_passes_above_256(request, monkeypatch)
    assert acc_pallas.attention_blocks(290, 290) == (64, (128,), 320, 384)


def _fused_against_probabilities(causal, t, h):
    rng = np.random.default_rng(t + h + causal)
    q, k, v = _qkv(rng, 2, t, 3, h)
    mask = jnp.asarray(np.arange(t)[None] < np.array([[t], [t // 3 + 1]]))
    ref_ctx, probs = attention.attention_with_probs(q, k, v, mask, scale=0.3, causal=causal)
    ctx = jnp.full_like(ref_ctx, jnp.nan)  # poison: every element must be written
    ctx, col = acc_pallas.attention_with_column_sums(q, k, v, mask, mask, scale=0.3,
                                                     causal=causal, interpret=True)
    m = np.asarray(mask)
    ref_col = (np.asarray(probs, np.float64) * m[:, None, :, None]).sum(axis=2)  # [B, N, S]
    assert ctx.shape == q.shape and col.shape == (2, 3, t)
    assert np.isfinite(np.asarray(ctx)).all()
    np.testing.assert_allclose(np.asarray(ctx)[m], np.asarray(ref_ctx)[m], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(col), ref_col, rtol=1e-5, atol=1e-6)
    # padding keys receive nothing; each valid query row sums to one over its keys
    assert np.all(np.asarray(col)[~m[:, None, :].repeat(3, 1)] == 0)
    np.testing.assert_allclose(np.asarray(col).sum(-1), m.sum(1)[:, None].repeat(3, 1), rtol=1e-5)


def _packed_case(seed: int, b: int, t: int, n: int, h: int, valid: int, causal: bool = False):
    """(qkv [B, T, 3, N, H] before its bias, bias [3, N, H], mask [B, T] with the second row's
    first ``valid`` real, float64 context [B, T, N, H] and column sums [B, N, T]) of the packed
    kernel's self-attention at scale 0.3."""
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.normal(size=(b, t, 3, n, h)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(3, n, h)), jnp.float32)
    m = np.arange(t)[None] < np.array([[t]] + [[valid]] * (b - 1))
    x = np.asarray(qkv, np.float64) + np.asarray(bias, np.float64)
    lg = np.einsum("btnh,bsnh->bnts", x[:, :, 0], x[:, :, 1]) * 0.3
    vis = m[:, None, None, :] & (np.tril(np.ones((t, t), bool)) if causal else True)
    p = np.exp(np.where(vis, lg, -np.inf) - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return qkv, bias, m, np.einsum("bnts,bsnh->btnh", p, x[:, :, 2]), (p * m[:, None, :, None]).sum(2)


# 40 rows: one key tile of 64 (24 past the end), query tiles of 64 past the end; 150: key
# tiles of 128 and 32 in one pass (the second 10 past the end); 300, causal (the one-pass
# bound lowered to 256): the loop over three tiles of 128, each query tile's loops stopping
# at the tile holding its last row (the loop without causal:
# test_fused_kernel_matches_probabilities at 260)
@pytest.mark.parametrize("causal,t", [(False, 40), (False, 150), (True, 40), (True, 150), (True, 300)])
def test_packed_kernel_reads_the_projection_output(causal, t, request, monkeypatch):
    """The fused kernel on the q/k/v projection's [B, T, 3, N, H] output with the bias added
    in the kernel, rows not padded (blocks overhang and are masked): context and column sums
    against float64; its gradient in the projection and the bias is plain attention's."""
    if t > 256:
        _two_passes_above_256(request, monkeypatch)
    b, n, h = 2, 3, 16
    qkv, bias, m, ref_ctx, ref_col = _packed_case(t + causal, b, t, n, h, t // 3 + 1, causal)
    rng = np.random.default_rng(t + causal + 1)
    ctx, col = acc_pallas.packed_attention_with_column_sums(qkv, bias, jnp.asarray(m), scale=0.3,
                                                            causal=causal, interpret=True)
    assert ctx.shape == (b, t, n, h) and col.shape == (b, n, t)
    # unreduced: one partial sum per (head, query tile), columns past T zero; they add up
    _, parts = acc_pallas.packed_attention_with_column_sums(qkv, bias, jnp.asarray(m), scale=0.3, causal=causal,
                                                            interpret=True, parts=True)
    assert parts.shape[:2] == (b, n * -(-t // acc_pallas.attention_blocks(t, t)[0])) and parts.shape[2] >= t
    assert not np.asarray(parts)[:, :, t:].any()
    np.testing.assert_allclose(np.asarray(parts).sum(1)[:, :t], np.asarray(col).sum(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ctx)[m], ref_ctx[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(col), ref_col, rtol=1e-5, atol=1e-6)

    w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * m[:, :, None, None]
    mf = jnp.asarray(m, jnp.float32)
    kernel = jax.jit(jax.grad(lambda a, c: (acc_pallas.self_attention_with_column_sums_packed(
        a, c, mf, 0.3, causal, True)[0] * w).sum(), (0, 1)))(qkv, bias)
    plain = jax.jit(jax.grad(lambda a, c: (attention.attention_with_probs(
        *acc_pallas._unpack(a, c), jnp.asarray(m), scale=0.3, causal=causal)[0] * w).sum(), (0, 1)))(qkv, bias)
    for g, r in zip(kernel, plain):
        assert float(jnp.abs(r).max()) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)

    # attention alone (a layer that does not eliminate): one online-softmax pass over the
    # key tiles, same context; its gradient is plain attention's too
    alone = acc_pallas.packed_attention_with_column_sums(qkv, bias, jnp.asarray(m), scale=0.3,
                                                         causal=causal, interpret=True, columns=False)
    assert alone.shape == (b, t, n, h)
    np.testing.assert_allclose(np.asarray(alone)[m], ref_ctx[m], rtol=1e-5, atol=1e-5)
    kernel = jax.jit(jax.grad(lambda a, c: (acc_pallas.self_attention_packed(
        a, c, mf, 0.3, causal, True) * w).sum(), (0, 1)))(qkv, bias)
    for g, r in zip(kernel, plain):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


# 40 rows: one key tile of 64, query tiles overhanging; 150: key tiles of 128 + 32, one pass;
# 300: one pass over 128 + 128 + 64 with 32-row query tiles, and (the one-pass bound lowered
# to 256) three tiles of 128 in two passes (row statistics, then the sweep)
@pytest.mark.parametrize("t,two_passes", [(40, False), (150, False), (300, False), (300, True)])
def test_packed_kernel_reads_the_bias_by_distance(t, two_passes, request, monkeypatch):
    """T5's eliminated layers: the fused kernel on the packed projection adds the bias by key -
    query distance at each example's ORIGINAL positions (gathered from a [N, 2P - 1] vector in
    the kernel): context, column sums and attention alone against float64, padding keys
    excluded; its gradient in the projection and the bias vector is plain attention's."""
    if two_passes:
        _two_passes_above_256(request, monkeypatch)
    rng = np.random.default_rng(t)
    b, n, h, p_len = 2, 3, 16, 2 * t
    qkv = jnp.asarray(rng.normal(size=(b, t, 3, n, h)), jnp.float32)
    m = np.arange(t)[None] < np.array([[t], [t // 3 + 1]])
    pos = np.stack([np.sort(rng.choice(p_len, t, replace=False)) for _ in range(b)]).astype(np.int32)
    rb = jnp.asarray(rng.normal(0.0, 2.0, size=(n, 2 * p_len - 1)), jnp.float32)
    bias = np.asarray(rb, np.float64)[:, pos[:, None, :] - pos[:, :, None] + p_len - 1].transpose(1, 0, 2, 3)
    x = np.asarray(qkv, np.float64)
    lg = np.einsum("btnh,bsnh->bnts", x[:, :, 0], x[:, :, 1]) * 0.3 + bias
    lg = np.where(m[:, None, None, :], lg, -np.inf)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref_ctx = np.einsum("bnts,bsnh->btnh", p, x[:, :, 2])
    ref_col = (p * m[:, None, :, None]).sum(2)  # [B, N, S]
    kw = dict(scale=0.3, interpret=True, rel_bias=rb, positions=jnp.asarray(pos))
    ctx, col = acc_pallas.packed_attention_with_column_sums(qkv, None, jnp.asarray(m), **kw)
    np.testing.assert_allclose(np.asarray(ctx)[m], ref_ctx[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(col), ref_col, rtol=1e-5, atol=1e-6)
    alone = acc_pallas.packed_attention_with_column_sums(qkv, None, jnp.asarray(m), columns=False, **kw)
    np.testing.assert_allclose(np.asarray(alone)[m], ref_ctx[m], rtol=1e-5, atol=1e-5)
    # without the bias the context moves far beyond the tolerance (the test sees the bias)
    plain_ctx = acc_pallas.packed_attention_with_column_sums(qkv, None, jnp.asarray(m), scale=0.3, interpret=True)[0]
    assert np.abs(np.asarray(plain_ctx)[m] - ref_ctx[m]).max() > 1e-2

    mf, posj = jnp.asarray(m, jnp.float32), jnp.asarray(pos)
    w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * m[:, :, None, None]
    plain = jax.jit(jax.grad(lambda a, r: (attention.attention_with_probs(
        *acc_pallas._unpack(a, None), jnp.asarray(m), scale=0.3,
        bias=acc_pallas._distance_bias(r, posj))[0] * w).sum(), (0, 1)))(qkv, rb)
    for columns in (True, False):
        def out(a, r, columns=columns):
            o = acc_pallas.self_attention_by_distance_packed(a, mf, r, posj, 0.3, True, columns, columns)
            return o[0] if columns else o
        for g, r in zip(jax.jit(jax.grad(lambda a, r: (out(a, r) * w).sum(), (0, 1)))(qkv, rb), plain):
            assert float(jnp.abs(r).max()) > 0
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
    _, parts = acc_pallas.self_attention_by_distance_packed(qkv, mf, rb, posj, 0.3, True, True, True)
    np.testing.assert_allclose(np.asarray(parts).sum(1)[:, :t], np.asarray(col).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
# query tiles smaller, equal and larger than key tiles; 40 rows fill no tile exactly
@pytest.mark.parametrize("blocks", [(16, 32, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2)])
def test_second_pass_tiles_match_probabilities(causal, with_bias, blocks):
    """The log-sum-exp second pass at every tile shape: its causal walk starts inside the key
    tile's first query tile, padding queries add nothing, padding keys get 0."""
    rng = np.random.default_rng(11)
    b, t, n, h, p_len = 2, 40, 3, 16, 50
    q, k, _ = _qkv(rng, b, t, n, h)
    m = np.arange(t)[None] < np.array([[t], [17]])
    pos = np.stack([np.sort(rng.choice(p_len, t, replace=False)) for _ in range(b)])  # [B, T]
    by_distance = rng.normal(0.0, 2.0, size=(n, 2 * p_len - 1))
    logits = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64)) * 0.3
    if with_bias:
        logits = logits + by_distance[:, pos[:, None, :] - pos[:, :, None] + p_len - 1].transpose(1, 0, 2, 3)
    vis = m[:, None, None, :] & (np.tril(np.ones((t, t), bool)) if causal else True)
    logits = np.where(vis, logits, -np.inf)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)  # [B, N, T]
    ref = (np.exp(logits - lse[..., None]) * m[:, None, :, None]).sum(axis=2)  # [B, N, S]
    kw = dict(rel_bias=jnp.asarray(by_distance, jnp.float32), positions=jnp.asarray(pos)) if with_bias else {}
    mask = jnp.asarray(m)
    got = np.asarray(acc_pallas.column_sums_from_lse(
        q, k, jnp.asarray(lse, jnp.float32), mask, mask, scale=0.3, causal=causal, interpret=True,
        blocks=blocks, **kw))
    assert got.shape == (b, n, t)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    assert np.all(got[~m[:, None, :].repeat(n, 1)] == 0)


def test_key_tiles_cover_the_keys_with_powers_of_two():
    """One pass covers s <= 256 keys with one power-of-two tile of 16-128, or two: up to 128
    keys where the second is at most a quarter of the first (65-80 keys: 64 + 16), above 128
    always (128 + a power of two); attention alone, and more than ``ONE_PASS_MAX_KEYS`` keys,
    keep one tile size (more than 128 in a loop)."""
    for s in range(1, 257):
        tiles = acc_pallas.key_tiles(s)
        assert sum(tiles) >= s and all(16 <= x <= 128 and x & (x - 1) == 0 for x in tiles), s
        assert sum(tiles) <= max(16, 1 << (s - 1).bit_length()), s
        assert len(tiles) == (2 if 65 <= s <= 80 or s > 128 else 1), (s, tiles)
        block_q, one_pass, tp, sp = acc_pallas.attention_blocks(s, s)
        assert one_pass == tiles and sp == sum(tiles) and tp % block_q == 0 and tp >= s
    assert acc_pallas.key_tiles(72) == (64, 16) and acc_pallas.key_tiles(150) == (128, 32)
    assert acc_pallas.attention_blocks(72, 72, columns=False) == (64, (128,), 128, 128)
    # attention alone above 128 keys: one pass of key_tiles as well (ALONE_KEY_TILES, on)
    assert acc_pallas.attention_blocks(150, 150, columns=False) == (64, (128, 32), 192, 160)
    assert acc_pallas.attention_blocks(170, 170) == (64, (128, 64), 192, 192)
    assert acc_pallas.attention_blocks(600, 600) == (64, (128,), 640, 640)  # a loop of 128


@pytest.mark.parametrize("causal", [False, True])
def test_attend_and_score_fused_equals_probs_path(causal):
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, 3, 20, 2, 16)
    mask = jnp.asarray(np.arange(20)[None] < np.array([[20], [9], [14]]))
    protect = jnp.asarray(np.arange(20)[None] == 0).repeat(3, 0)
    outs = {how: acc.attend_and_score(q, k, v, mask, scale=0.25, causal=causal, score=True,
                                      protect=protect, acc_impl=how, attention_impl="xla")
            for how in ("probs", "fused_interpret")}
    (c1, s1, _), (c2, s2, p2) = outs["probs"], outs["fused_interpret"]
    assert p2 is None  # the fused path never materialises probabilities
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(c2)[m], np.asarray(c1)[m], rtol=1e-5, atol=1e-6)
    s1, s2 = np.asarray(s1), np.asarray(s2)
    np.testing.assert_array_equal(np.isinf(s1), np.isinf(s2))  # CLS +inf, padding -inf
    np.testing.assert_allclose(s2[np.isfinite(s1)], s1[np.isfinite(s1)], rtol=1e-5)


def test_fused_kernel_launch_orders_agree(monkeypatch):
    """The fused kernel launched (example, head, block) or (block, head, example), the default:
    the same context and the same unreduced column sums, each (head, query block) part in its
    place (150 rows: three query tiles, the last past T; keys in tiles of 128 and 32), so the
    index maps follow the grid."""
    rng = np.random.default_rng(3)
    b, t, n, h = 2, 150, 2, 16
    qkv = jnp.asarray(rng.normal(size=(b, t, 3, n, h)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(3, n, h)), jnp.float32)
    m = jnp.asarray(np.arange(t)[None] < np.array([[t], [70]]))
    assert acc_pallas._grid(b, n, 3, "block")[0] == (3, n, b)
    outs = {}
    for order in ("example", "block"):
        monkeypatch.setattr(acc_pallas, "GRID_ORDER", order)
        acc_pallas.packed_attention_with_column_sums.clear_cache()  # the order is read when traced
        outs[order] = [np.asarray(x) for x in acc_pallas.packed_attention_with_column_sums(
            qkv, bias, m, scale=0.3, interpret=True, parts=True)]
    (ctx_e, parts_e), (ctx_b, parts_b) = outs["example"], outs["block"]
    assert parts_b.shape == (b, n * 3, 160) and np.abs(parts_b).sum(axis=(0, 2)).min() > 0  # every part written
    np.testing.assert_array_equal(ctx_b, ctx_e)
    np.testing.assert_array_equal(parts_b, parts_e)


def test_attention_alone_in_one_pass_above_128_keys(monkeypatch):
    """``ALONE_KEY_TILES``: attention alone over 136 keys runs one pass of 128 + 16 keys
    instead of a loop over two tiles of 128 (256 keys), with the same context as float64
    attention; at 128 keys or fewer nothing changes."""
    qkv, bias, m, ref, _ = _packed_case(136, 2, 136, 2, 16, 70)
    real, seen = acc_pallas.attention_blocks, []
    monkeypatch.setattr(acc_pallas, "attention_blocks", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    for one_pass, tiles in ((False, (128,)), (True, (128, 16))):
        monkeypatch.setattr(acc_pallas, "ALONE_KEY_TILES", one_pass)
        acc_pallas.packed_attention_with_column_sums.clear_cache()  # the setting is read when traced
        seen.clear()
        alone = acc_pallas.packed_attention_with_column_sums(qkv, bias, jnp.asarray(m), scale=0.3,
                                                             interpret=True, columns=False)
        assert [blocks[1] for blocks in seen] == [tiles]
        np.testing.assert_allclose(np.asarray(alone)[m], ref[m], rtol=1e-5, atol=1e-5)
        assert real(72, 72, columns=False) == (64, (128,), 128, 128)  # up to 128 keys: one tile
    assert real(150, 150, columns=False) == (64, (128, 32), 192, 160)


@pytest.mark.parametrize("causal", [False, True])
def test_queries_past_the_last_full_tile(causal):
    """136 queries run as three tiles of 64 (192 padded rows), with and without the column
    sums: context, column sums and their per-tile parts as float64 attention gives them; 232
    rows pad to 256."""
    b, t, n = 2, 136, 2
    qkv, bias, m, ref_ctx, ref_col = _packed_case(137 + causal, b, t, n, 16, 100, causal)
    block_q = 64
    assert acc_pallas.attention_blocks(t, t)[:3:2] == (block_q, 192)
    assert acc_pallas.attention_blocks(232, 232, columns=False)[:3:2] == (64, 256)
    run = functools.partial(acc_pallas.packed_attention_with_column_sums, qkv, bias, jnp.asarray(m),
                            scale=0.3, causal=causal, interpret=True)
    ctx, col = run()
    _, parts = run(parts=True)
    alone = run(columns=False)
    assert parts.shape[:2] == (b, n * -(-t // block_q))  # one partial sum per (head, query tile)
    np.testing.assert_allclose(np.asarray(ctx)[m], ref_ctx[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(alone)[m], ref_ctx[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(col), ref_col, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(parts).sum(1)[:, :t], ref_col.sum(1), rtol=1e-5, atol=1e-6)  # heads and tiles


def test_fused_path_gradient_is_plain_attention():
    """Training through an eliminating layer: d(context)/d(q, k, v) as with XLA attention."""
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, 2, 12, 2, 16)
    mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [7]]))
    w = jnp.asarray(rng.normal(size=(2, 12, 2, 16)), jnp.float32) * mask[:, :, None, None]

    def loss(how, q, k, v):
        ctx, _, _ = acc.attend_and_score(q, k, v, mask, scale=0.25, score=True, acc_impl=how,
                                         attention_impl="xla")
        return (ctx * w).sum()

    g_ref = jax.jit(jax.grad(lambda *a: loss("probs", *a), argnums=(0, 1, 2)))(q, k, v)
    g_fused = jax.jit(jax.grad(lambda *a: loss("fused_interpret", *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_fused, g_ref):
        assert float(jnp.abs(b).max()) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_fused_kernel_rejects_a_logits_bias():
    """A bias the kernel cannot read by distance (any [B, N, T, S] array), or T5's by distance
    with causal attention, is refused with what to use instead."""
    q, k, v = _qkv(np.random.default_rng(0), 1, 8, 1, 16)
    for kw in ({}, {"causal": True, "bias_by_distance": jnp.zeros((1, 15)), "positions": jnp.zeros((1, 8), int)}):
        with pytest.raises(ValueError, match="only as bias_by_distance, bidirectional; use acc_impl='lse'"):
            acc.attend_and_score(q, k, v, jnp.ones((1, 8), bool), scale=0.25, score=True,
                                 acc_impl="fused_interpret", attention_impl="xla",
                                 bias=jnp.zeros((1, 1, 8, 8)), **kw)


def test_fused_probe():
    acc_pallas._AVAILABLE.clear()
    assert acc_pallas.available(interpret=True, fused=True) is True
    if jax.default_backend() == "cpu":
        assert acc_pallas.available(fused=True) is False  # no Triton: auto keeps other paths
        assert acc.resolve_acc_impl("auto", "xla", keys=16) == ("probs", False)


@pytest.mark.parametrize("heads,packed_calls,alone_calls", [(4, 0, 0), (2, 2, 2)])
def test_bert_with_fused_kernel_keeps_the_same_rows(tmp_path, monkeypatch, heads, packed_calls,
                                                    alone_calls):
    """A whole eliminating BERT: same kept rows and logits as ACC from probabilities. Head
    size 8 takes the split q, k, v; head size 16 the packed projection: the fused kernel in
    each layer that ranks (24 -> 16, 16 -> 8), attention alone from the same projection in
    the layer that keeps every row (8 -> 8) and in the one that keeps only CLS (8 -> 1, no
    ranking needed)."""
    folder, _ = make_hf_bert(tmp_path, num_hidden_layers=4, max_position_embeddings=64,
                             num_attention_heads=heads)
    ld = convert.load(folder, "sequence_classification")
    batch = random_batch(np.random.default_rng(2), 3, 24, 99)
    calls, alone = [], []
    packed, attn = acc_pallas.self_attention_with_column_sums_packed, acc_pallas.self_attention_packed
    monkeypatch.setattr(acc_pallas, "self_attention_with_column_sums_packed",
                        lambda *a: calls.append(a[0].shape) or packed(*a))
    monkeypatch.setattr(acc_pallas, "self_attention_packed", lambda *a: alone.append(a[0].shape) or attn(*a))
    norms, norm = [], ln_kernel.layer_norm
    monkeypatch.setattr(ln_kernel, "layer_norm", lambda *a: norms.append(a[0].shape) or norm(*a))
    outs = {}
    for how in ("probs", "fused_interpret"):  # the kernels' run also normalises in the LayerNorm kernel
        monkeypatch.setattr(acc, "PACKED_ATTENTION", "interpret" if how != "probs" else "never")
        monkeypatch.setattr(ln_kernel, "KERNEL", "interpret" if how != "probs" else "never")
        module = ld.module.clone(config=dataclasses.replace(ld.config, acc_impl=how))
        # jitted: eagerly, every ACC op (and the interpreted kernel's) compiles on its own
        outs[how] = jax.jit(lambda p, m=module: m.apply({"params": p}, **batch, schedule=(16, 8, 8, 1)))(ld.params)
    assert len(calls) == packed_calls and len(alone) == alone_calls
    assert len(norms) == 1 + 2 * 4  # embeddings, then two a layer (kernels' run only)
    a, b = outs["probs"], outs["fused_interpret"]
    assert ["keep_idx" in la for la in a.layers] == [True, True, False, True]
    for la, lb in zip(a.layers, b.layers):
        assert la.keys() == lb.keys()
        if "keep_idx" in la:
            np.testing.assert_array_equal(np.asarray(la["keep_idx"]), np.asarray(lb["keep_idx"]))
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d,dtype", [(48, jnp.float32), (64, jnp.bfloat16)])
def test_layer_norm_kernel_matches_flax(d, dtype):
    """One-pass LayerNorm kernel: 39 rows (the last block of 8 overhangs), hidden size 48
    (padded to 64 inside the block) or 64, against Flax's LayerNorm; its gradient is Flax's."""
    import flax.linen as nn

    rng = np.random.default_rng(d)
    x = jnp.asarray(rng.normal(size=(3, 13, d)) * 2 + 0.5, dtype)
    g, b = (jnp.asarray(rng.normal(size=d), jnp.float32) for _ in range(2))
    flax_ln = nn.LayerNorm(epsilon=1e-6, dtype=dtype)
    params = {"params": {"scale": g, "bias": b}}
    got = ln_kernel.layer_norm(x, g, b, 1e-6, dtype, True)
    ref = flax_ln.apply(params, x)
    assert got.dtype == ref.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    mine = jax.jit(jax.grad(lambda *a: (ln_kernel.layer_norm(*a, 1e-6, jnp.float32, True) * w).sum(),
                    (0, 1, 2)))(x.astype(jnp.float32), g, b)
    theirs = jax.jit(jax.grad(lambda x_, g_, b_: (nn.LayerNorm(epsilon=1e-6).apply(
        {"params": {"scale": g_, "bias": b_}}, x_) * w).sum(), (0, 1, 2)))(x.astype(jnp.float32), g, b)
    for a, r in zip(mine, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_kernel_sums_partial_products(dtype):
    """With partial products, the kernel normalises x + their sum + a bias: 39 rows (the last
    block overhangs), hidden size 48 (padded inside), three partials in ``dtype``; value and
    gradient (every input) against Flax's LayerNorm of that sum in float32."""
    import flax.linen as nn

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(3, 13, 48)) * 2 + 0.5, dtype)
    parts = jnp.asarray(rng.normal(size=(3, 3, 13, 48)), dtype)
    c = jnp.asarray(rng.normal(size=48), dtype)
    g, b = (jnp.asarray(rng.normal(size=48), jnp.float32) for _ in range(2))

    def flax_ln(x_, p_, c_, g_, b_):
        y = x_.astype(jnp.float32) + p_.astype(jnp.float32).sum(0) + c_.astype(jnp.float32)
        return nn.LayerNorm(epsilon=1e-6).apply({"params": {"scale": g_, "bias": b_}}, y)

    got = ln_kernel.add_layer_norm(x, parts, c, g, b, 1e-6, dtype, True)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    want = flax_ln(x, parts, c, g, b)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=tol, atol=tol)
    assert np.abs(np.asarray(want) - np.asarray(flax_ln(x, parts[:2], c, g, b))).max() > 0.1  # every partial counts
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    f32 = [a.astype(jnp.float32) for a in (x, parts, c)]
    mine = jax.jit(jax.grad(lambda *a: (ln_kernel.add_layer_norm(*a, 1e-6, jnp.float32, True) * w).sum(),
                    range(5)))(*f32, g, b)
    theirs = jax.jit(jax.grad(lambda *a: (flax_ln(*a) * w).sum(), range(5)))(*f32, g, b)
    for a, r in zip(mine, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_bert_feed_forward_output_split_into_partials_the_layer_norm_sums(tmp_path, monkeypatch):
    """A bfloat16 eliminating BERT with the LayerNorm kernel (interpreted): each layer with at
    most ``SPLIT_ROWS`` rows runs its feed-forward output as two partial products the kernel
    sums with the residual and the bias, the others as before; the last hidden states as
    without the split (bf16 rounding). Not in float32, not while dropout drops, not above ``SPLIT_ROWS``."""
    folder, _ = make_hf_bert(tmp_path, num_hidden_layers=4, max_position_embeddings=64)
    ld = convert.load(folder, "sequence_classification")
    batch = random_batch(np.random.default_rng(3), 3, 24, 99)
    rng = np.random.default_rng(4)
    params = jax.tree_util.tree_map_with_path(  # the output projection's share of each row made large
        lambda k, v: v * 40 + rng.normal(size=v.shape) if "mlp_out" in jax.tree_util.keystr(k) else v, ld.params)
    monkeypatch.setattr(ln_kernel, "KERNEL", "interpret")
    calls, add_ln = [], ln_kernel.add_layer_norm
    monkeypatch.setattr(ln_kernel, "add_layer_norm", lambda *a: calls.append(a[1].shape) or add_ln(*a))

    def hidden(dtype, split_rows, train=False):
        monkeypatch.setattr(ln_kernel, "SPLIT_ROWS", split_rows)
        calls.clear()
        module = ld.module.clone(config=dataclasses.replace(ld.config, dtype=dtype))
        rngs = {"dropout": jax.random.PRNGKey(0)} if train else None
        out = jax.jit(lambda p: module.apply({"params": p}, **batch, schedule=(16, 8, 8, 4),
                                             deterministic=not train, rngs=rngs).last_hidden_state)(params)
        return np.asarray(out, np.float32), list(calls)

    plain, none = hidden("bfloat16", 0)
    assert none == []
    split, parts = hidden("bfloat16", 24)  # rows a layer: 3 x 16 (not split), 3 x 8, 3 x 8, 3 x 4
    assert parts == [(2, 3, k, 32) for k in (8, 8, 4)]
    np.testing.assert_allclose(split, plain, rtol=0.05, atol=0.05)
    assert np.abs(plain).max() > 1
    assert hidden("bfloat16", 1024, train=True)[1] == []
    h = jnp.zeros((3, 8, 64))
    assert ln_kernel.depth_splits(h.astype(jnp.bfloat16), jnp.bfloat16) == 2
    assert ln_kernel.depth_splits(h, jnp.float32) == 1
    assert ln_kernel.depth_splits(jnp.zeros((3, 8, 63), jnp.bfloat16), jnp.bfloat16) == 1  # depth not divisible


@pytest.mark.parametrize("seed", range(4))
def test_rank_selection_equals_top_k(seed):
    rng = np.random.default_rng(seed)
    b, t = 5, 37
    s = rng.integers(0, 6, (b, t)).astype(np.float32)  # many ties
    s[:, 0] = np.inf  # protected
    s[rng.random((b, t)) < 0.3] = -np.inf  # padding, tied among themselves
    s = jnp.asarray(s)
    for keep in (1, 2, 9, 20, t):
        ref = np.asarray(acc.select_rows(s, keep, method="top_k"))
        got = np.asarray(acc.select_rows(s, keep, method="rank"))
        np.testing.assert_array_equal(got, ref)
        assert np.all(np.diff(got, axis=1) > 0)  # original order, no repeats


def test_rank_selection_docstring_example():
    s = jnp.asarray([[0.2, 0.9, -np.inf, 0.5]])
    assert acc.select_rows(s, 2, method="rank").tolist() == [[1, 3]]
    assert acc.select_rows(s, 3, method="rank").tolist() == [[0, 1, 3]]
    with pytest.raises(ValueError, match="select method"):
        acc.select_rows(s, 2, method="sort")


def _tied_scores(rng, b, t):
    s = rng.integers(0, 6, (b, t)).astype(np.float32)  # many ties
    s[:, 0] = np.inf  # protected
    s[rng.random((b, t)) < 0.3] = -np.inf  # padding, tied among themselves
    return jnp.asarray(s)


# 150 rows (padded to 256) rank in two chunks; 700 (above ``MAX_ROWS``, allowed here) take the threshold
# path (eight row tiles, each scattering its kept rows)
@pytest.mark.parametrize("t", [37, 64, 150, 700])
def test_keep_rows_kernel_selects_and_gathers_as_xla(t, monkeypatch):
    """Selection and gather in one kernel (interpreted): the indices of ``lax.top_k`` + sort
    (ties to the lower index, original order) at every keep from 1 to all rows, and each
    tensor's rows bit for bit (a [B, T, D] hidden state and a [B, T, N, H] context, bf16 and
    float32), with rows and kept rows that are no power of two."""
    monkeypatch.setattr(keep_rows, "MAX_ROWS", 1024)
    rng = np.random.default_rng(t)
    b = 3
    s = _tied_scores(rng, b, t)
    x = jnp.asarray(rng.normal(size=(b, t, 48)), jnp.bfloat16)
    ctx = jnp.asarray(rng.normal(size=(b, t, 3, 16)), jnp.float32)
    for keep in sorted({1, 2, 13, t // 2 + 1, t} if t <= 256 else {13, t // 2 + 1}):  # (a compile each)
        ref = acc.select_rows(s, keep, method="top_k")
        idx, (gx, gc) = keep_rows.select_and_gather_rows(s, [x, ctx], keep=keep, interpret=True)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref), err_msg=str(keep))
        np.testing.assert_array_equal(np.asarray(gx), np.asarray(acc.take_rows(x, ref)))
        np.testing.assert_array_equal(np.asarray(gc), np.asarray(acc.take_rows(ctx, ref)))
    idx, rows = keep_rows.select_and_gather_rows(s, [], keep=5, interpret=True)  # selection alone
    assert rows == [] and np.array_equal(np.asarray(idx), np.asarray(acc.select_rows(s, 5, method="top_k")))
    with pytest.raises(ValueError, match="cannot select"):
        keep_rows.select_and_gather_rows(s, [x[..., :40]], keep=5, interpret=True)  # 40 columns: no chunk


def _pallas_grids(jaxpr):
    """The grids of every ``pallas_call`` in a jaxpr (nested jaxprs included)."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            out.append(tuple(e.params["grid_mapping"].grid))
        inner = e.params.get("jaxpr")
        if inner is not None:
            out += _pallas_grids(getattr(inner, "jaxpr", inner))
    return out


# 40 rows rank in one program per (example, chunk); 300 take the threshold path (4 row tiles)
@pytest.mark.parametrize("t", [40, 300])
def test_keep_rows_column_chunks_follow_the_batch(t, monkeypatch):
    """With few examples the copy runs in narrower column chunks, so more programs share it
    (``MIN_PROGRAMS`` 48): 2 examples of 128 columns take 8 chunks of 16 instead of one of 128,
    with the same indices and rows bit for bit as XLA's, and as the one-chunk grid; kept rows
    stored at their places or gathered by them alike."""
    monkeypatch.setattr(keep_rows, "MAX_ROWS", 1024)
    monkeypatch.setattr(keep_rows, "MIN_PROGRAMS", 48)
    assert [keep_rows._col_chunk(768, p) for p in (1, 4, 8, 16, 128)] == [16, 64, 128, 256, 256]
    assert keep_rows._col_chunk(40, 1) == 0  # no power of two >= 16 divides 40
    rng = np.random.default_rng(t)
    b, keep = 2, t // 3
    s = _tied_scores(rng, b, t)
    x = jnp.asarray(rng.normal(size=(b, t, 128)), jnp.bfloat16)
    ctx = jnp.asarray(rng.normal(size=(b, t, 8, 16)), jnp.float32)
    ref = acc.select_rows(s, keep, method="top_k")
    tp = keep_rows._pow2(t)
    tiles = tp // keep_rows.ROW_TILE if tp > keep_rows.THRESHOLD_ROWS else None
    paths, kernel = [], keep_rows._keep_rows_kernel
    monkeypatch.setattr(keep_rows, "_keep_rows_kernel", lambda *a, **kw: paths.append(kw["scatter"]) or kernel(*a, **kw))
    # the last pass: every row gathered by its place (``SCATTER_MAX_PROGRAMS`` 0), not scattered
    for min_programs, chunks, scatter in ((48, 8, 128), (0, 1, 128), (48, 8, 0)):
        monkeypatch.setattr(keep_rows, "MIN_PROGRAMS", min_programs)
        monkeypatch.setattr(keep_rows, "SCATTER_MAX_PROGRAMS", scatter)
        jax.clear_caches()  # (the constant is read when the jitted function is traced)
        fn = functools.partial(keep_rows.select_and_gather_rows, keep=keep, interpret=True)
        grids = _pallas_grids(jax.make_jaxpr(fn)(s, [x, ctx]).jaxpr)
        assert grids == [(b, tiles, chunks) if tiles else (b, chunks)]
        idx, (gx, gc) = fn(s, [x, ctx])
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref))
        np.testing.assert_array_equal(np.asarray(gx), np.asarray(acc.take_rows(x, ref)))
        np.testing.assert_array_equal(np.asarray(gc), np.asarray(acc.take_rows(ctx, ref)))
    if not tiles:  # (the threshold path scatters its row tile's kept rows in every case)
        assert set(paths) == {True, False} and paths[-1] is False


def test_keep_rows_threshold_orders_every_float_as_top_k(monkeypatch):
    """Above ``THRESHOLD_ROWS`` the kernel searches the keep-th highest score over its float32
    bits: negative scores of every magnitude, subnormals, -0.0 (below 0.0, as ``lax.top_k``
    orders them), ties and infinities select what ``lax.top_k`` selects, at every keep tried."""
    monkeypatch.setattr(keep_rows, "MAX_ROWS", 1024)
    rng = np.random.default_rng(5)
    t = 300
    assert keep_rows._pow2(t) > keep_rows.THRESHOLD_ROWS
    vals = np.array([-np.inf, -3e38, -1.0, -1.5e-45, -0.0, 0.0, 1.5e-45, 1e-38, 1.0, 2.0, 3e38, np.inf], np.float32)
    s = np.concatenate([rng.choice(vals, (2, t)), -rng.exponential(1e3, (1, t)).astype(np.float32)])
    s = jnp.asarray(s)
    for keep in (1, 77, 150, 299, 300):
        ref = jax.lax.top_k(s, keep)[1]
        idx, _ = keep_rows.select_and_gather_rows(s, [], keep=keep, interpret=True)
        np.testing.assert_array_equal(np.asarray(idx), np.sort(np.asarray(ref), axis=1), err_msg=str(keep))


@pytest.mark.parametrize("t,n_parts", [(37, 6), (64, 24), (150, 5), (600, 3)])
def test_keep_rows_kernel_ranks_by_column_sums_as_acc(t, n_parts, monkeypatch):
    """Given the fused kernel's column sums unreduced (``acc.ColumnSums``), the kernel keeps
    the rows XLA keeps by the finished ACC (summed, normalised, padding -inf, row 0 +inf):
    integer parts, so every sum is exact in any order and many rows tie; padded columns past
    T hold garbage the kernel must not read as rows; each keep from 1 to all rows; [B, T]
    fields (the mask, positions) come back gathered."""
    monkeypatch.setattr(keep_rows, "MAX_ROWS", 1024)  # (600 rows: above 'auto''s bound)
    rng = np.random.default_rng(t + n_parts)
    b, tp = 3, acc_pallas._pow2(t)
    parts = rng.integers(0, 3, (b, n_parts, tp)).astype(np.float32)
    parts[:, :, t:] = 1e9  # past T: never a row
    mask = (np.arange(t)[None] < np.array([[t], [t // 2 + 1], [3]])).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(b, t, 3, 16)), jnp.bfloat16)
    pos = jnp.asarray(rng.permutation(10000)[: b * t].reshape(b, t), jnp.int32)
    for protect in (None, acc.FIRST_ROW):
        cs = acc.ColumnSums(jnp.asarray(parts), jnp.asarray(mask), jnp.asarray(mask.sum(1, keepdims=True) * 4),
                            protect)
        scores = cs.finished()
        assert np.isneginf(np.asarray(scores)[mask == 0]).all()
        assert (protect is None) != np.isposinf(np.asarray(scores)[:, 0]).all()
        # (a compile each: the unprotected rows at the ends and the middle, the protected first
        # row with one and two more rows)
        keeps = ({1, t // 2 + 1, t} if protect is None else {2, 5}) if t <= 256 else {t // 2 + 1}
        for keep in sorted(keeps):
            ref = acc.select_rows(scores, keep, method="top_k")
            idx, (gx, gm, gp) = keep_rows.select_and_gather_rows(
                cs.parts, [x], keep=keep, interpret=True, mask=cs.mask, protect_first=protect is not None,
                fields=(cs.mask, pos))  # the rows' mask and positions gathered too
            np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref), err_msg=f"{protect} {keep}")
            np.testing.assert_array_equal(np.asarray(gx), np.asarray(acc.take_rows(x, ref)))
            np.testing.assert_array_equal(np.asarray(gm), np.take_along_axis(mask, np.asarray(ref), 1))
            np.testing.assert_array_equal(np.asarray(gp), np.take_along_axis(np.asarray(pos), np.asarray(ref), 1))
    with pytest.raises(ValueError, match="32-bit"):
        keep_rows.select_and_gather_rows(cs.parts, [x], keep=2, interpret=True, mask=cs.mask,
                                         fields=(cs.mask > 0.5,))
    with pytest.raises(ValueError, match="do not cover"):
        keep_rows.select_and_gather_rows(cs.parts[:, :, : t - 1], [x], keep=2, interpret=True, mask=cs.mask)


# 37 rows: the suffix count over the whole example; 150 (padded to 256): two rank chunks, each
# counting against every row; 600: the threshold path's row tiles
@pytest.mark.parametrize("t", [37, 150, 600])
def test_keep_rows_kernel_finishes_causal_column_sums_as_acc(t, monkeypatch):
    """A decoder's column sums (``causal_heads``): the kernel divides each by the heads times
    the real rows at or after it, as ``acc._denominator`` does, ranks rows marked
    ``PROTECTED`` first, and keeps the rows XLA keeps by the finished ACC. Integer parts
    over small counts give many equal quotients from different sums (2/3 and 4/6), which
    must tie as exactly as XLA's divisions make them."""
    monkeypatch.setattr(keep_rows, "MAX_ROWS", 1024)
    rng = np.random.default_rng(t)
    b, n, n_parts, tp = 3, 4, 5, acc_pallas._pow2(t)
    parts = rng.integers(0, 3, (b, n_parts, tp)).astype(np.float32)
    parts[:, :, t:] = 1e9  # past T: never a row
    real = np.arange(t)[None] < np.array([[t], [t // 2 + 1], [3]])
    real[0, 1::7] = False  # padding inside the rows too (rows dropped before: kept in order)
    last = np.array([t - 1, t // 2, 2])
    mask = real.astype(np.float32)
    mask[np.arange(b), last] = acc.PROTECTED
    denom = acc._denominator(jnp.asarray(real), jnp.asarray(real), n, True)  # [B, S]
    cs = acc.ColumnSums(jnp.asarray(parts), jnp.asarray(mask), denom, None, n)
    scores = np.asarray(cs.finished())
    seen = np.cumsum(real[:, ::-1], axis=1)[:, ::-1]
    want = np.where(real, parts[:, :, :t].sum(1) / (n * np.maximum(seen, 1)), -np.inf)
    want[np.arange(b), last] = np.inf
    np.testing.assert_array_equal(scores, want.astype(np.float32))
    col = parts[:, :, :t].sum(1)
    fin = np.isfinite(scores)
    same = (scores[:, :, None] == scores[:, None, :]) & fin[:, :, None] & fin[:, None, :]
    assert (same & (col[:, :, None] != col[:, None, :])).any()  # equal quotients of other sums
    for keep in sorted({1, 3, t // 2 + 1} if t <= 256 else {t // 3}):
        ref = acc.select_rows(jnp.asarray(scores), keep, method="top_k")
        idx, (gm,) = keep_rows.select_and_gather_rows(cs.parts, [], keep=keep, interpret=True, mask=cs.mask,
                                                     fields=(cs.mask,), causal_heads=n)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref), err_msg=str(keep))
        assert (np.asarray(gm) == acc.PROTECTED).sum() == b  # every example's last row, kept
    # without the normaliser the sums alone rank other rows: the division is what decides
    idx, _ = keep_rows.select_and_gather_rows(cs.parts, [], keep=t // 3, interpret=True, mask=cs.mask)
    assert not np.array_equal(np.asarray(idx), np.asarray(acc.select_rows(jnp.asarray(scores), t // 3)))
    with pytest.raises(ValueError, match="column sums"):
        keep_rows.select_and_gather_rows(jnp.asarray(scores), [], keep=2, interpret=True, causal_heads=n)


def test_keep_rows_kernel_gradient_is_the_gathers(monkeypatch):
    """Through ``acc.eliminate`` with the kernel, the tensors' gradient is what XLA's gather
    gives (a scatter-add: rows kept get theirs, the others zero), and the scores get none."""
    rng = np.random.default_rng(1)
    s = _tied_scores(rng, 2, 24)
    x = jnp.asarray(rng.normal(size=(2, 24, 32)), jnp.float32)
    rows = acc.Rows.create(jnp.ones((2, 24), bool))
    w = jnp.asarray(rng.normal(size=(2, 9, 32)), jnp.float32)

    def loss(s_, x_):
        return (acc.eliminate(s_, 9, rows, x_)[2][0] * w).sum()

    ref = jax.jit(jax.grad(lambda x_: loss(jax.lax.stop_gradient(s), x_)))(x)  # top_k: no derivative
    monkeypatch.setattr(keep_rows, "KERNEL", "interpret")
    monkeypatch.setattr(acc, "SELECT_METHOD", "kernel")
    calls, real = [], keep_rows.select_and_gather
    monkeypatch.setattr(keep_rows, "select_and_gather", lambda *a: calls.append(a[2]) or real(*a))
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(s, x)
    assert calls == [9]
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref))
    assert np.asarray(ref).any() and not np.asarray(got[0]).any()
    # from column sums (the fused kernel's): the same rows and gradient, none to the sums
    cs = acc.ColumnSums(jnp.stack([jnp.where(jnp.isfinite(s), s, 0.0)] * 3, 1), (s > -jnp.inf).astype(jnp.float32),
                        jnp.ones((2, 1)), acc.FIRST_ROW)
    got = jax.jit(jax.grad(lambda c, x_: (acc.eliminate(c, 9, rows, x_)[2][0] * w).sum(), argnums=(0, 1)))(cs, x)
    assert calls == [9, 9]
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref))
    assert not np.asarray(got[0].parts).any()


def test_bert_with_the_keep_rows_kernel_keeps_the_same_rows(tmp_path, monkeypatch):
    """A whole eliminating BERT with the selection-and-gather kernel (interpreted) in each
    layer that ranks: the kept rows and logits of XLA's selection and gathers, whether the
    kernel is given ACC (from probabilities) or, behind the fused attention kernel on the
    packed projection, its column sums unreduced; asked for on the CPU without the
    interpreter, the XLA paths run."""
    folder, _ = make_hf_bert(tmp_path, num_hidden_layers=4, max_position_embeddings=64,
                             num_attention_heads=2)
    ld = convert.load(folder, "sequence_classification")
    batch = random_batch(np.random.default_rng(4), 3, 24, 99)
    calls, real = [], keep_rows.select_and_gather
    monkeypatch.setattr(keep_rows, "select_and_gather",
                        lambda *a: calls.append((a[2], len(a) > 4 and a[4] is not None)) or real(*a))

    def run(acc_impl="auto"):
        module = ld.module.clone(config=dataclasses.replace(ld.config, acc_impl=acc_impl))
        return jax.jit(lambda p: module.apply({"params": p}, **batch, schedule=(16, 8, 8, 2)))(ld.params)

    ref = run()
    monkeypatch.setattr(acc, "SELECT_METHOD", "kernel")
    assert acc._select_method(None, 24) == "top_k" and not calls  # the CPU: no kernel unless interpreted
    monkeypatch.setattr(keep_rows, "KERNEL", "interpret")
    got = run()
    assert calls == [(16, False), (8, False), (2, False)]  # the layer that keeps its 8 rows does not rank
    calls.clear()
    monkeypatch.setattr(acc, "PACKED_ATTENTION", "interpret")
    fused = run("fused_interpret")
    assert calls == [(16, True), (8, True), (2, True)]  # the column sums, unreduced
    for out in (got, fused):
        for la, lb in zip(ref.layers, out.layers):
            if "keep_idx" in la:
                np.testing.assert_array_equal(np.asarray(lb["keep_idx"]), np.asarray(la["keep_idx"]))
                np.testing.assert_array_equal(np.asarray(lb["positions"]), np.asarray(la["positions"]))
                np.testing.assert_allclose(np.asarray(lb["acc"]), np.asarray(la["acc"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), rtol=1e-5, atol=1e-5)


def test_keep_rows_probe():
    assert keep_rows._probe(interpret=True)


def test_kernels_lower_for_the_gpu_at_uneven_rows(monkeypatch):
    """Every Pallas kernel lowers to Triton (CUDA) at row counts that are no power of two, as
    eliminated layers have (T5 at 4x keeps 400, 304, 232, ... rows). Interpret mode does not enforce
    Triton's rules, e.g. that a loaded array's size is a power of two; a kernel that broke one
    would fail only on a GPU, at a shape the availability probe never compiles (400 rows are
    416 or 448 once padded to whole tiles)."""
    rng = np.random.default_rng(0)
    b, t, n, h, p_len = 2, 400, 2, 64, 512
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.bfloat16) for _ in range(3))
    m = jnp.asarray(np.arange(t)[None] < np.array([[t], [101]]))
    lse = jnp.zeros((b, n, t), jnp.float32)
    pos = jnp.asarray(np.stack([np.sort(rng.choice(p_len, t, replace=False)) for _ in range(b)]), jnp.int32)
    rb = jnp.zeros((n, 2 * p_len - 1), jnp.float32)
    kernels = {
        "column_sums_from_lse (T5)": lambda: acc_pallas.column_sums_from_lse(
            q, k, lse, m, m, scale=0.1, rel_bias=rb, positions=pos),
        "attention_with_column_sums (causal)": lambda: acc_pallas.attention_with_column_sums(
            q, k, v, m, m, scale=0.1, causal=True),
        "packed_attention_with_column_sums (88 rows)": lambda: acc_pallas.packed_attention_with_column_sums(
            jnp.stack([q, k, v], axis=2)[:, :88], None, m[:, :88], scale=0.1),
        "packed_attention_with_column_sums (72 rows: key tiles of 64 and 16)": lambda: (
            acc_pallas.packed_attention_with_column_sums(jnp.stack([q, k, v], axis=2)[:, :72], None, m[:, :72],
                                                         scale=0.1, parts=True)),
        "packed_attention_with_column_sums (150 rows: key tiles of 128 and 32)": lambda: (
            acc_pallas.packed_attention_with_column_sums(jnp.stack([q, k, v], axis=2)[:, :150], None, m[:, :150],
                                                         scale=0.1, parts=True)),
        "packed_attention_with_column_sums (12 rows: a 16-row tile on one warp)": lambda: (
            acc_pallas.packed_attention_with_column_sums(jnp.stack([q, k, v], axis=2)[:, :12], None, m[:, :12],
                                                         scale=0.1, parts=True)),
        "packed attention alone (200 rows, online softmax)": lambda: acc_pallas.packed_attention_with_column_sums(
            jnp.stack([q, k, v], axis=2)[:, :200], None, m[:, :200], scale=0.1, columns=False),
        "packed_attention_with_column_sums (T5's bias by distance, 400 rows)": lambda: (
            acc_pallas.packed_attention_with_column_sums(jnp.stack([q, k, v], axis=2), None, m, scale=0.1,
                                                         parts=True, rel_bias=rb, positions=pos)),
        "packed attention alone (T5's bias by distance, 400 rows)": lambda: (
            acc_pallas.packed_attention_with_column_sums(jnp.stack([q, k, v], axis=2), None, m, scale=0.1,
                                                         columns=False, rel_bias=rb, positions=pos)),
        "packed_attention_with_column_sums (causal, 400 rows: tiles skipped past the diagonal)": lambda: (
            acc_pallas.packed_attention_with_column_sums(jnp.stack([q, k, v], axis=2), None, m, scale=0.1,
                                                         causal=True, parts=True)),
        "layer_norm_rows (74 rows of 128)": lambda: ln_kernel.layer_norm_rows(
            q[:, :37].reshape(2, 37, 128), rb[0, :128], rb[1, :128], eps=1e-12),
        "layer_norm_rows (176 rows of 96)": lambda: ln_kernel.layer_norm_rows(
            q[:, :88, :, :48].reshape(2, 88, 96), rb[0, :96], rb[1, :96], eps=1e-12),
        "layer_norm_rows with two partial products (74 rows of 128)": lambda: ln_kernel.layer_norm_rows(
            q[:, :37].reshape(2, 37, 128), rb[0, :128], rb[1, :128], eps=1e-12,
            parts=jnp.stack([q[:, :37], k[:, :37]]).reshape(2, 2, 37, 128), parts_bias=rb[2, :128]),
        "column_sums_from_lse (causal)": lambda: acc_pallas.column_sums_from_lse(
            q, k, lse, m, m, scale=0.1, causal=True),
        "column_sums (120 keys)": lambda: acc_pallas.column_sums(
            q[:, :120], k[:, :120], m[:, :120], m[:, :120], scale=0.1),
        "select_and_gather_rows (keep 88 of 200)": lambda: keep_rows.select_and_gather_rows(
            lse[:, 0, :200], [q[:, :200].reshape(2, 200, 128)], keep=88),
        "select_and_gather_rows from 24 column sums (keep 88 of 200)": lambda: keep_rows.select_and_gather_rows(
            jnp.zeros((2, 24, 256)), [q[:, :200].reshape(2, 200, 128)], keep=88, mask=m[:, :200],
            protect_first=True, fields=(m[:, :200].astype(jnp.float32), pos[:, :200])),
        "select_and_gather_rows from causal column sums (keep 88 of 200: chunks count the suffix)": lambda: (
            keep_rows.select_and_gather_rows(jnp.zeros((2, 24, 256)), [q[:, :200].reshape(2, 200, 128)], keep=88,
                                             mask=m[:, :200].astype(jnp.float32), causal_heads=2)),
        "select_and_gather_rows from causal column sums (keep 20 of 56)": lambda: (
            keep_rows.select_and_gather_rows(jnp.zeros((2, 24, 64)), [q[:, :56].reshape(2, 56, 128)], keep=20,
                                             mask=m[:, :56].astype(jnp.float32), causal_heads=2)),
        "select_and_gather_rows from column sums (keep 310 of 400: the threshold path)": lambda: (
            keep_rows.select_and_gather_rows(jnp.zeros((2, 4, 512)), [q.reshape(2, 400, 128)], keep=310, mask=m,
                                             fields=(m.astype(jnp.float32), pos))),
        "step_proj_rows (5 rows: RMS norm, gated activation)": lambda: step_proj.step_proj_rows(
            q[0, :5].reshape(5, 128), jnp.stack([q[1, :128, 0], k[1, :128, 0]], 1), scale=rb[0, :128],
            act=jax.nn.gelu),
        "step_proj_rows (5 rows: 256 deep, residual)": lambda: step_proj.step_proj_rows(
            q[0, :10].reshape(5, 256), q[1, :256].reshape(256, 128), residual=k[0, :5].reshape(5, 128)),
    }
    monkeypatch.setattr(keep_rows, "MAX_ROWS", 1024)  # the kernel above 'auto''s bound
    for name, fn in kernels.items():
        text = jax.jit(fn).trace().lower(lowering_platforms=("cuda",)).as_text()
        assert "triton_kernel_call" in text or "__gpu$xla.gpu.triton" in text, name


def test_kernels_split_along_the_batch_under_spmd(tmp_path, monkeypatch):
    """On 4 of the 8 fake devices, a data-parallel BERT forward whose attention, ACC and
    LayerNorm run the Pallas kernels (interpreted) keeps every kernel, and the selection by
    ``lax.top_k`` too, on its own device's examples: no all-gather in the compiled program (an
    opaque custom call would gather the whole batch onto every device), outputs split as the
    inputs are, logits equal to one device's. In bfloat16 too, where the LayerNorm kernel sums
    the feed-forward output's partial products."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    folder, _ = make_hf_bert(tmp_path, num_hidden_layers=3, max_position_embeddings=64,
                             num_attention_heads=2)
    ld = convert.load(folder, "sequence_classification")
    batch = random_batch(np.random.default_rng(5), 8, 24, 99)
    monkeypatch.setattr(acc, "PACKED_ATTENTION", "interpret")
    monkeypatch.setattr(ln_kernel, "KERNEL", "interpret")
    module = ld.module.clone(config=dataclasses.replace(ld.config, acc_impl="fused_interpret"))
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
    params = jax.device_put(ld.params, NamedSharding(mesh, P()))
    for select in ("rank", "top_k"):  # the GPU's selection, and XLA's TopK call (the CPU's)
        monkeypatch.setattr(acc, "SELECT_METHOD", select)
        fwd = jax.jit(lambda p, b: module.apply({"params": p}, **b, schedule=(16, 16, 1)).logits)
        text = fwd.lower(params, sharded).compile().as_text()
        assert "all-gather" not in text, select
        got = fwd(params, sharded)
        assert got.sharding.spec == P("data")
        np.testing.assert_allclose(np.asarray(got), np.asarray(fwd(ld.params, batch)), rtol=1e-5, atol=1e-6)
    # bfloat16: the feed-forward output as partial products the LayerNorm kernel sums, split
    # along their second axis
    calls, add_ln = [], ln_kernel.add_layer_norm
    monkeypatch.setattr(ln_kernel, "add_layer_norm", lambda *a: calls.append(a[1].shape) or add_ln(*a))
    module = module.clone(config=dataclasses.replace(module.config, dtype="bfloat16"))
    fwd = jax.jit(lambda p, b: module.apply({"params": p}, **b, schedule=(16, 16, 1)).logits)
    assert "all-gather" not in fwd.lower(params, sharded).compile().as_text()
    assert calls == [(2, 8, 16, 32), (2, 8, 16, 32), (2, 8, 1, 32)]
    got = fwd(params, sharded)
    assert got.sharding.spec == P("data")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(fwd(ld.params, batch), np.float32),
                               rtol=2e-2, atol=2e-2)


# tiles of the GEMM kernel small enough for the interpreter (the GPU's are 128 x 2 x 128)
SMALL_TILES = gemm_act.Tiles(m=64, n=64, k=64, stages=2)


def _gelu_float64(y, activation):
    import math

    if activation == "gelu":
        return 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
    return 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))


@pytest.mark.parametrize("activation,order", [("gelu", {}), ("gelu_new", {"width": 2, "minor": 0})])
def test_gemm_act_kernel_matches_float64(activation, order):
    """act(x @ w + b) in one Mosaic GPU kernel (interpreted): 3 x 2 output blocks of 64 x 128,
    three pipeline steps over the depth, 4 CTAs walking 6 blocks (row-major, or the snake of
    strips 2 blocks wide). Within one bf16 rounding of
    float64 (the bias rounded to bf16 as the parameter is), no further from it than XLA's path
    (a bf16 product and bias add, then the activation); whatever is not whole tiles is refused."""
    rng = np.random.default_rng(3)
    m, k, n = 192, 192, 256
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=n), jnp.bfloat16)
    tiles = dataclasses.replace(SMALL_TILES, **order)
    got = np.asarray(gemm_act.gemm_act_rows(x, w, b, activation=activation, tiles=tiles,
                                            interpret=True, sms=4), np.float64)
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    ref = _gelu_float64(y, activation)
    err = np.abs(got - ref)
    assert (err <= 2.0 ** -8 * np.abs(ref) + 1e-4).all(), err.max()
    xla = np.asarray(gemm_act.reference(x, w, b, activation), np.float64)
    assert err.max() <= np.abs(xla - ref).max()
    assert gemm_act.fits(m, k, n, SMALL_TILES) and not gemm_act.fits(m - 8, k, n, SMALL_TILES)
    with pytest.raises(ValueError, match="whole tiles"):
        gemm_act.gemm_act_rows(x[:100], w, b, tiles=SMALL_TILES, interpret=True)


def test_gemm_act_gradient_is_the_xla_paths():
    """The kernel's gradient in x, w and b is the XLA path's at the same inputs."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 64, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(64, 128)) / 8, jnp.float32)
    b = jnp.asarray(rng.normal(size=128), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 64, 128)), jnp.float32)
    mine = jax.jit(jax.grad(lambda *a: (gemm_act.gemm_act(*a, "gelu", True) * g).sum(), (0, 1, 2)))(x, w, b)
    theirs = jax.jit(jax.grad(lambda *a: (gemm_act.reference(*a, "gelu") * g).sum(), (0, 1, 2)))(x, w, b)
    for a, r in zip(mine, theirs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))


def test_bert_with_the_gemm_kernel_gives_the_xla_paths_logits(tmp_path, monkeypatch):
    """A bf16 BERT (hidden 64, FFN 256) whose FFN input projections run the kernel
    (interpreted) in both layers of the dense program (128 rows) and of an eliminating one (64
    rows after the first attention): logits within bf16 rounding of the XLA path's, the same kept rows; the same
    parameters either way."""
    folder, _ = make_hf_bert(tmp_path, hidden_size=64, intermediate_size=256, num_attention_heads=2)
    ld = convert.load(folder, "sequence_classification")
    module = ld.module.clone(config=dataclasses.replace(ld.config, dtype="bfloat16"))
    batch = random_batch(np.random.default_rng(6), 4, 32, 99)
    monkeypatch.setattr(gemm_act, "TILES", SMALL_TILES)
    calls, rows = [], gemm_act.gemm_act_rows
    monkeypatch.setattr(gemm_act, "gemm_act_rows", lambda x, *a, **kw: calls.append(x.shape) or rows(x, *a, **kw))
    for schedule in (None, (16, 16)):
        outs = {}
        for how in ("never", "interpret"):
            monkeypatch.setattr(gemm_act, "KERNEL", how)
            outs[how] = jax.jit(lambda p: module.apply({"params": p}, **batch, schedule=schedule))(ld.params)
        a, b = outs["never"], outs["interpret"]
        np.testing.assert_allclose(np.asarray(b.logits, np.float32), np.asarray(a.logits, np.float32),
                                   rtol=0.05, atol=0.05)
        for la, lb in zip(a.layers, b.layers):
            if "keep_idx" in la:
                np.testing.assert_array_equal(np.asarray(la["keep_idx"]), np.asarray(lb["keep_idx"]))
    assert calls == [(128, 64), (128, 64), (64, 64), (64, 64)]  # 4 x 32 rows, then 4 x 16


def test_gemm_act_probe_runs_inside_a_trace(monkeypatch):
    """The availability probe is first asked while a model is traced: its check must run on
    concrete arrays there, not be staged into the trace and fail on tracers (checked with an
    XLA stand-in for the kernel: the interpreter cannot run inside a trace)."""
    stand_in = jax.jit(lambda x, w, b, interpret=False: gemm_act.reference(x, w, b, "gelu"),
                       static_argnames="interpret")
    monkeypatch.setattr(gemm_act, "gemm_act_rows", stand_in)
    seen = []
    jax.jit(lambda x: seen.append(gemm_act._probe()) or x)(jnp.ones(3))
    assert seen == [True]


def test_shared_bias_layer_can_score_with_cudnn_and_the_second_pass(monkeypatch):
    """Where the kernels compile (faked here), a T5 layer scoring under one shared [1, N, T, T]
    bias at ``SHARED_BIAS_CUDNN_MIN_KEYS`` keys or more runs cuDNN attention on that bias + the
    second pass by distance; with the bound off, or per-example biases, or fewer keys, the
    fused kernel."""
    monkeypatch.setattr(acc_pallas, "available", lambda *a, **kw: True)
    kw = dict(bias=True, by_distance=True)
    monkeypatch.setattr(acc, "SHARED_BIAS_CUDNN_MIN_KEYS", None)
    assert acc.resolve_acc_impl("auto", "cudnn", keys=512, shared_bias=True, **kw) == ("fused", False)
    monkeypatch.setattr(acc, "SHARED_BIAS_CUDNN_MIN_KEYS", 512)
    assert acc.resolve_acc_impl("auto", "cudnn", keys=512, shared_bias=True, **kw) == ("pallas_lse", False)
    assert acc.resolve_acc_impl("auto", "cudnn", keys=511, shared_bias=True, **kw) == ("fused", False)
    assert acc.resolve_acc_impl("auto", "cudnn", keys=512, shared_bias=False, **kw) == ("fused", False)
    assert acc.resolve_acc_impl("auto", "xla", keys=512, shared_bias=True, **kw) == ("probs", False)


@pytest.mark.parametrize("rows", [5, 16])
def test_step_projection_kernel_matches_xla(rows):
    """``step_proj`` (interpreted) against XLA's kernels in sequence (``step_proj.reference``):
    the RMS norm before the product, the gated or plain activation and the residual after it,
    at a row count that is not a power of two and at 16; depth 384 in chunks of 128, so the
    norm's sum and the product both cross chunks. float32 to 1e-5; bfloat16 within one
    rounding, as both round at the same points. Shapes off the tiling are refused."""
    rng = np.random.default_rng(rows)
    d, n = 384, 64
    act = jax.nn.gelu  # the tanh form, T5's gated-gelu
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        x = jnp.asarray(rng.standard_normal((rows, d)) * 2 + 0.5, dtype)
        g = jnp.asarray(1 + 0.3 * rng.standard_normal(d), jnp.float32)
        w = jnp.asarray(rng.standard_normal((d, n)) / 20, jnp.float32)
        wg = jnp.asarray(rng.standard_normal((d, 2, n)) / 20, jnp.float32)
        r = jnp.asarray(rng.standard_normal((rows, n)), dtype)
        cases = {"norm, residual": (w, dict(scale=g, residual=r)), "gated, norm": (wg, dict(scale=g, act=act)),
                 "activation": (w, dict(act=act)), "product alone": (w, {})}
        for name, (ww, kw) in cases.items():
            got = np.asarray(step_proj.step_proj(x, ww, interpret=True, **kw), np.float32)
            want = np.asarray(step_proj.reference(x, ww, **kw), np.float32)
            assert got.shape == (rows, n) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=f"{dtype} {name}")
    with pytest.raises(ValueError, match="whole chunks of 128"):
        step_proj.step_proj(x[:, :200], w[:200], interpret=True)
    with pytest.raises(ValueError, match="needs act"):
        step_proj.step_proj(x, wg, interpret=True)
    assert step_proj.fits(16, 768, 2048) and not step_proj.fits(65, 768, 768) and not step_proj.fits(4, 48, 64)
