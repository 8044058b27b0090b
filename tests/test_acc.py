"""ACC: the documented worked example, every variant against a numpy reference, selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accjax import acc, attention

# The 4-row, 2-head example of accjax/acc.py's docstring (row 3 is padding).
P = np.zeros((1, 2, 4, 4), np.float32)
P[0, 0, :3, :3] = [[.50, .25, .25], [.50, .50, .00], [.25, .25, .50]]
P[0, 1, :3, :3] = [[.50, .00, .50], [.25, .50, .25], [.00, .25, .75]]
P[0, :, 3, :3] = 1 / 3  # the padding query: must be ignored
MASK = np.array([[True, True, True, False]])


def test_worked_example_plain():
    s = np.asarray(acc.acc_scores(jnp.asarray(P), jnp.asarray(MASK)))
    np.testing.assert_allclose(s[0, :3], [2.00 / 6, 1.75 / 6, 2.25 / 6], rtol=1e-6)
    assert s[0, 3] == -np.inf
    protected = np.asarray(acc.acc_scores(jnp.asarray(P), jnp.asarray(MASK),
                                          protect=jnp.asarray([[True, False, False, False]])))
    assert protected[0, 0] == np.inf
    np.testing.assert_allclose(protected[0, 1:3], [1.75 / 6, 2.25 / 6], rtol=1e-6)
    # k = 2 keeps [0, 2]; k = 3: top-k [0, 2, 1] re-sorted to [0, 1, 2]
    assert acc.select_rows(jnp.asarray(protected), 2).tolist() == [[0, 2]]
    assert acc.select_rows(jnp.asarray(protected), 3).tolist() == [[0, 1, 2]]


def test_worked_example_minus_diagonal():
    s = np.asarray(acc.acc_scores(jnp.asarray(P), jnp.asarray(MASK), variant="minus_diagonal"))
    # diagonals: head 0 [.5 .5 .5], head 1 [.5 .5 .75] -> [2 - 1, 1.75 - 1, 2.25 - 1.25] / 6
    np.testing.assert_allclose(s[0, :3], [1.0 / 6, 0.75 / 6, 1.0 / 6], rtol=1e-6)


def _ref_acc(p, mask, variant="plain", causal=False, vn=None):
    """Loop-by-loop numpy transcription of the docstring formulas."""
    b, n, t, s = p.shape
    out = np.full((b, s), -np.inf)
    for bi in range(b):
        valid = np.where(mask[bi])[0]
        for j in valid:
            tot = 0.0
            for h in range(n):
                for i in valid:
                    if variant == "minus_diagonal" and i == j:
                        continue
                    w = vn[bi, h, j] if variant == "value_norm" else 1.0
                    tot += p[bi, h, i, j] * w
            denom = n * (sum(1 for i in valid if i >= j) if causal else len(valid))
            out[bi, j] = tot / denom
    return out


@pytest.mark.parametrize("variant,causal", [("plain", False), ("minus_diagonal", False),
                                            ("value_norm", False), ("plain", True)])
def test_variants_match_reference(variant, causal):
    rng = np.random.default_rng(0)
    b, n, t = 3, 2, 6
    mask = np.ones((b, t), bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    logits = rng.normal(size=(b, n, t, t))
    vis = np.asarray(attention.visibility(jnp.asarray(mask), t, causal))
    logits = np.where(vis, logits, -1e30)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    vn = rng.uniform(0.5, 2.0, size=(b, n, t))
    got = np.asarray(acc.acc_scores(jnp.asarray(p, jnp.float32), jnp.asarray(mask), variant=variant,
                                    causal=causal, value_norms=jnp.asarray(vn, jnp.float32)))
    ref = _ref_acc(p, mask, variant, causal, vn)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    if variant == "plain" and not causal:  # plain ACC is a distribution over valid rows
        np.testing.assert_allclose(np.where(mask, got, 0).sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_lse_path_equals_probs_path(causal):
    rng = np.random.default_rng(1)
    b, t, n, h = 2, 7, 3, 4
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(t)[None] < np.array([[7], [4]]))
    ctx_p, probs = attention.attention_with_probs(q, k, v, mask, scale=0.5, causal=causal)
    ctx_f, lse = attention.fused_attention(q, k, v, mask, scale=0.5, causal=causal,
                                           implementation="xla", return_lse=True)
    np.testing.assert_allclose(ctx_p, ctx_f, atol=1e-6)
    a = acc.acc_scores(probs, mask, causal=causal)
    b_ = acc.acc_scores_from_lse(q, k, lse, mask, scale=0.5, causal=causal)
    np.testing.assert_allclose(np.where(mask, a, 0), np.where(mask, b_, 0), rtol=1e-5, atol=1e-7)
    assert np.all(np.isneginf(np.asarray(b_)[~np.asarray(mask)]))


def test_padding_goes_before_any_real_row_and_cls_stays():
    rng = np.random.default_rng(2)
    b, t = 16, 12
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None] < lengths[:, None]
    scores = rng.normal(size=(b, t)).astype(np.float32)
    scores[:, 0] = -5.0  # CLS would lose on its score alone
    s = acc._finish(jnp.asarray(scores), jnp.asarray(mask), 1.0, jnp.asarray(np.arange(t)[None] == 0))
    for keep in range(1, t + 1):
        idx = np.asarray(acc.select_rows(s, keep))
        assert np.all(np.diff(idx, axis=1) > 0)  # original order, no duplicates
        assert np.all(idx[:, 0] == 0)  # CLS kept
        for r in range(b):
            kept_real = mask[r, idx[r]].sum()
            assert kept_real == min(keep, lengths[r])  # padding only once real rows run out


def test_rows_gather_together():
    rows = acc.Rows.create(jnp.asarray([[1, 1, 1, 0]]), token_types=jnp.asarray([[0, 0, 1, 1]]))
    x = jnp.arange(4 * 3, dtype=jnp.float32).reshape(1, 4, 3)
    idx, r2, (x2,) = acc.eliminate(jnp.asarray([[np.inf, 0.1, 0.5, -np.inf]]), 2, rows, x)
    assert idx.tolist() == [[0, 2]]
    assert r2.positions.tolist() == [[0, 2]] and r2.token_types.tolist() == [[0, 1]]
    assert r2.mask.tolist() == [[True, True]]
    np.testing.assert_array_equal(x2[0], x[0, [0, 2]])


def test_fused_row_is_the_weighted_mean_of_the_dropped_real_rows():
    # rows: CLS, three real tokens, one padding row; keep 3 = CLS, the best token, fused row
    rows = acc.Rows.create(jnp.asarray([[1, 1, 1, 1, 0]]), token_types=jnp.asarray([[0, 0, 1, 1, 1]]))
    x = jnp.arange(5 * 2, dtype=jnp.float32).reshape(1, 5, 2)
    scores = jnp.asarray([[np.inf, 0.1, 0.6, 0.3, -np.inf]])
    out = {}
    r2, (x2,) = acc.drop_rows(scores, 3, rows, out, x, fuse="acc")
    assert out["keep_idx"].tolist() == [[0, 2]]
    assert r2.positions.tolist() == [[0, 2, acc.FUSED_POSITION]] == out["positions"].tolist()
    assert r2.mask.tolist() == [[True, True, True]] and r2.token_types.tolist() == [[0, 1, 0]]
    np.testing.assert_allclose(x2[0, :2], x[0, [0, 2]])
    # dropped real rows 1 and 3, weights 0.1 and 0.3 (the padding row weighs nothing)
    np.testing.assert_allclose(x2[0, 2], (0.1 * x[0, 1] + 0.3 * x[0, 3]) / 0.4, rtol=1e-5)
    r3, (x3,) = acc.drop_rows(scores, 3, rows, {}, x, fuse="mean")
    np.testing.assert_allclose(x3[0, 2], (x[0, 1] + x[0, 3]) / 2, rtol=1e-6)
    # nothing real dropped: the fused row is padding; keep 1 keeps CLS alone, as without fusion
    short = acc.Rows.create(jnp.asarray([[1, 1, 0, 0, 0]]))
    r4, _ = acc.drop_rows(jnp.asarray([[np.inf, 0.1, -np.inf, -np.inf, -np.inf]]), 3, short, {}, x, fuse="acc")
    assert r4.mask.tolist() == [[True, True, False]]
    r5, (x5,) = acc.drop_rows(scores, 1, rows, {}, x, fuse="acc")
    assert r5.positions.tolist() == [[0]] and x5.shape == (1, 1, 2)
    with pytest.raises(ValueError, match="fuse must be one of"):
        acc.drop_rows(scores, 3, rows, {}, x, fuse="sum")


def test_select_rows_rejects_bad_keep():
    with pytest.raises(ValueError, match="positive Python int"):
        acc.select_rows(jnp.zeros((1, 4)), 0)
    with pytest.raises(ValueError, match="cannot keep 5 of 4"):
        acc.select_rows(jnp.zeros((1, 4)), 5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [24, 130])  # one block; several blocks with padding to 256
def test_pallas_kernels_match_probs(causal, t):
    """Both Pallas ACC kernels (interpreted on the CPU) equal ACC from materialised probs."""
    rng = np.random.default_rng(3)
    b, n, h = 2, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(t)[None] < np.array([[t], [t // 3]]))
    _, probs = attention.attention_with_probs(q, k, v, mask, scale=0.25, causal=causal)
    _, lse = attention.fused_attention(q, k, v, mask, scale=0.25, causal=causal,
                                       implementation="xla", return_lse=True)
    ref = np.asarray(acc.acc_scores(probs, mask, causal=causal))
    m = np.asarray(mask)
    for lse_arg in (None, lse):
        got = np.asarray(acc.acc_scores_fused(q, k, mask, scale=0.25, causal=causal,
                                              lse=lse_arg, interpret=True))
        np.testing.assert_allclose(np.where(m, got, 0), np.where(m, ref, 0), rtol=1e-5, atol=1e-7)
        assert np.all(np.isneginf(got[~m]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attend_and_score_every_cpu_path(causal, with_bias):
    """Every (attention_impl, acc_impl) pair the CPU runs gives the dense context and the ACC
    of the probabilities; 'lse' with XLA attention once crashed (no log-sum-exp). The bias is
    T5's kind: a vector by key - query distance read at the rows' ORIGINAL positions."""
    rng = np.random.default_rng(4)
    b, t, n, h, p_len = 2, 12, 2, 8, 20
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(3))
    mask = np.arange(t)[None] < np.array([[t], [7]])
    pos = np.stack([np.sort(rng.choice(p_len, t, replace=False)) for _ in range(b)])  # [B, T]
    by_distance = rng.normal(0.0, 2.0, size=(n, 2 * p_len - 1))  # [N, 2P - 1]
    bias = by_distance[:, pos[:, None, :] - pos[:, :, None] + p_len - 1].transpose(1, 0, 2, 3)
    # numpy float64 dense attention: logits [B, N, T, S], masked keys (and the future) -inf
    logits = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64)) * 0.3
    logits = logits + (bias if with_bias else 0.0)
    vis = mask[:, None, None, :] & (np.tril(np.ones((t, t), bool)) if causal else True)
    logits = np.where(vis, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref_ctx = np.einsum("bnts,bsnh->btnh", probs, np.asarray(v, np.float64))
    ref = np.asarray(acc.acc_scores(jnp.asarray(probs, jnp.float32), jnp.asarray(mask), causal=causal))
    kw = dict(bias=jnp.asarray(bias, jnp.float32), bias_by_distance=jnp.asarray(by_distance, jnp.float32),
              positions=jnp.asarray(pos, jnp.int32)) if with_bias else {}
    for attention_impl in ("xla", "auto"):
        fused = () if causal and with_bias else ("fused_interpret",)  # (T5's bias: bidirectional)
        for acc_impl in ("auto", "probs", "lse", "pallas_interpret", *fused):
            ctx, scores, _ = acc.attend_and_score(
                q, k, v, jnp.asarray(mask), scale=0.3, causal=causal, score=True,
                attention_impl=attention_impl, acc_impl=acc_impl, **kw)
            what = f"attention {attention_impl}, acc {acc_impl}"
            np.testing.assert_allclose(np.asarray(ctx), ref_ctx, rtol=1e-5, atol=1e-5, err_msg=what)
            scores = np.asarray(acc.finished(scores))  # (T5's fused kernel leaves ColumnSums)
            np.testing.assert_allclose(np.where(mask, scores, 0), np.where(mask, ref, 0), rtol=1e-5,
                                       atol=1e-7, err_msg=what)
            assert np.all(np.isneginf(scores[~mask])), what
    if with_bias:  # the bias moves the scores far beyond the tolerance: a path ignoring it fails
        plain = np.asarray(acc.attend_and_score(q, k, v, jnp.asarray(mask), scale=0.3, causal=causal,
                                                score=True)[1])
        assert np.abs(np.where(mask, plain, 0) - np.where(mask, ref, 0)).max() > 1e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_key_is_its_value(dtype):
    """Attention over one key (a decoder's first step, a layer entered by one row) returns the
    value for every query, bit for bit what materialised attention computes, whatever the
    logit, the bias and the mask (a masked key's finite logit still weighs 1); scoring or
    asking for the probabilities takes the full path."""
    rng = np.random.default_rng(9)
    b, t, n, h = 3, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, n, h)) * 5, dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, 1, n, h)) * 5, dtype) for _ in range(2))
    mask = jnp.asarray([[True], [False], [True]])
    bias = jnp.asarray(rng.normal(size=(1, n, t, 1)) * 3, jnp.float32)
    for causal in (False, True):
        for kw in ({}, {"bias": bias}):
            ref, probs = attention.attention_with_probs(q, k, v, mask, scale=0.3, causal=causal, **kw)
            ctx, scores, none = acc.attend_and_score(q, k, v, mask, scale=0.3, causal=causal, **kw)
            assert ctx.shape == q.shape and ctx.dtype == q.dtype and scores is None and none is None
            np.testing.assert_array_equal(np.asarray(ctx, np.float32), np.asarray(ref, np.float32))
            np.testing.assert_array_equal(np.asarray(ctx[:, 1:]), np.asarray(jnp.broadcast_to(v, q.shape)[:, 1:]))
            assert np.all(np.asarray(probs) == 1.0)
    # the probabilities asked for: the full path returns them
    _, _, p = acc.attend_and_score(q, k, v, mask, scale=0.3, output_attentions=True)
    assert p is not None and p.shape == (b, n, t, 1)
    # no scores, bias, softmax or products are traced for one key
    jaxpr = jax.make_jaxpr(lambda q, k, v: acc.attend_and_score(q, k, v, mask, scale=0.3, bias=bias)[0])(q, k, v)
    prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert not prims & {"dot_general", "exp", "reduce_max"}, prims
    two = jnp.concatenate([k, k], axis=1), jnp.concatenate([v, v], axis=1)
    jaxpr2 = jax.make_jaxpr(lambda q, k, v: acc.attend_and_score(q, k, v, jnp.ones((b, 2), bool), scale=0.3)[0])(q, *two)
    assert {"dot_general", "exp"} <= {e.primitive.name for e in jaxpr2.jaxpr.eqns}


def test_kernel_probe_works_inside_a_trace():
    """The availability probe is first asked while a model is traced; it must still run."""
    from accjax.kernels import acc_pallas

    acc_pallas._AVAILABLE.clear()
    seen = []

    @jax.jit
    def traced(x):
        seen.append(acc_pallas.available(interpret=True))
        seen.append(acc_pallas.available(interpret=True, rel_bias=True))  # T5's variant
        seen.append(acc_pallas.available(interpret=True, distance=True))  # T5's attention
        return x + 1

    traced(jnp.zeros(2))
    assert seen == [True, True, True]
    if jax.default_backend() != "gpu":
        assert acc_pallas.available() is False  # no Triton here: callers fall back
        assert acc_pallas.available(distance=True) is False
