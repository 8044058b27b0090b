"""The persistent feed-forward kernel (``accjax.kernels.ffn_block``), interpreted: its value,
barriers, counters and gradient, and where BERT runs it."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accjax import convert
from accjax.models import common
from accjax.kernels import ffn_block as fb
from tests.conftest import make_hf_bert, random_batch

# tiles small enough for the interpreter: (BM, BN1, BK1, BN2, BK2, S, warps, stages)
SMALL = (16, 32, 32, 32, 32, 2, 4, 1)


def _arrays(rng, r, d, f, dtype=np.float32):
    shapes = (((r, d), 1.0), ((d, f), d ** -0.5), ((f,), 0.1), ((f, d), f ** -0.5), ((d,), 0.1), ((d,), 1.0),
              ((d,), 0.1))
    return [jnp.asarray(rng.standard_normal(sh) * sc, dtype) for sh, sc in shapes]


@pytest.mark.parametrize("blocks,barriers", [(SMALL, [1, 1, 0]), ((16, 32, 16, 32, 32, 2, 4, 1, 3), [1, 1, 1])])
def test_kernel_matches_the_float32_sublayer_and_its_barriers_count_one_program(blocks, barriers):
    """37 rows (padded to the row tile), hidden size 96 (padded to 128 inside phase 3's
    blocks), depth 256 in two slices (and phase 1 over three slices of the hidden size, with
    its third barrier): the kernel's output is the float32 sublayer's to 1e-5; each barrier's
    counter ends at the one program; in bf16 within two bf16 steps."""
    arrs = _arrays(np.random.default_rng(0), 37, 96, 256)
    out, cnt, nxt = fb.ffn_block(*arrs, eps=1e-12, programs=1, blocks=blocks, interpret=True)
    ref = fb.reference(*arrs, eps=1e-12)
    assert out.shape == (37, 96)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert np.asarray(cnt).tolist() == barriers + [0] * 5
    assert np.asarray(nxt).tolist() == [0] * 8
    bf = [a.astype(jnp.bfloat16) for a in arrs]
    got = fb.ffn_block(*bf, eps=1e-12, programs=1, blocks=blocks, interpret=True)[0]
    want = fb.reference(*(a.astype(jnp.float32) for a in bf), eps=1e-12)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2 ** -7, atol=0.05)


def test_each_launch_hands_the_next_zeroed_counters():
    """Three launches chained through their third result: each one's counters end at [1, 1]
    (they started at zero: no copy of a constant needed), and the output is three sublayers'."""
    arrs = _arrays(np.random.default_rng(1), 32, 64, 128)

    def chain(x):
        cnt, seen = None, []
        for _ in range(3):
            x, c, cnt = fb.ffn_block(x, *arrs[1:], eps=1e-12, programs=1, blocks=SMALL, interpret=True,
                                     counters=cnt)
            seen.append(c)
        return x, seen

    x, seen = jax.jit(chain)(arrs[0])
    assert [np.asarray(c).tolist()[:3] for c in seen] == [[1, 1, 0]] * 3
    ref = arrs[0]
    for _ in range(3):
        ref = fb.reference(ref, *arrs[1:], eps=1e-12)
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_gradient_is_the_reference_sublayers(monkeypatch):
    monkeypatch.setattr(fb, "KERNEL", "interpret")
    monkeypatch.setattr(fb, "BLOCKS", SMALL)
    rng = np.random.default_rng(2)
    arrs = _arrays(rng, 16, 64, 128)
    g = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    mine = jax.jit(jax.grad(lambda *a: (fb.feed_forward(*a, 1e-12) * g).sum(), range(7)))(*arrs)
    theirs = jax.jit(jax.grad(lambda *a: (fb.reference(*a, 1e-12) * g).sum(), range(7)))(*arrs)
    for a, b in zip(mine, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_probe_runs_inside_a_trace(monkeypatch):
    """``applies`` is asked while a program is traced: the probe compiles and calls the kernel
    ahead (a call inside the trace would hand it tracers and fail it on every GPU)."""
    monkeypatch.setattr(fb, "programs_here", lambda interpret: 1)
    monkeypatch.setattr(fb, "ffn_block", jax.jit(functools.partial(fb.ffn_block.__wrapped__, interpret=True),
                                                 static_argnames=("eps", "programs", "blocks")))
    seen = []
    jax.jit(lambda x: seen.append(fb._probe()) or x)(1.0)
    assert seen == [True]


def test_bert_runs_each_feed_forward_sublayer_in_the_kernel(tmp_path, monkeypatch):
    """A bfloat16 eliminating BERT (hidden 64, depth 256) with the kernel on (interpreted):
    every layer's feed-forward sublayer is one kernel call on its kept rows, the last hidden
    states as XLA's four kernels give them (bf16 rounding); none while dropout drops, above
    ``MAX_ROWS`` rows, in float32, with the switch off, or where 16-bit programs run the GELU's
    tanh form (``common.GELU_16BIT``, the default: the kernel computes the exact form)."""
    folder, _ = make_hf_bert(tmp_path, num_hidden_layers=3, hidden_size=64, intermediate_size=256,
                             max_position_embeddings=64)
    ld = convert.load(folder, "sequence_classification")
    batch = random_batch(np.random.default_rng(3), 3, 24, 99)
    monkeypatch.setattr(fb, "BLOCKS", SMALL)
    monkeypatch.setattr(common, "GELU_16BIT", "erf")
    calls, kernel = [], fb.ffn_block
    monkeypatch.setattr(fb, "ffn_block", lambda x, *a, **k: calls.append(x.shape) or kernel(x, *a, **k))

    def hidden(switch, dtype="bfloat16", train=False, max_rows=1024):
        monkeypatch.setattr(fb, "KERNEL", switch)
        monkeypatch.setattr(fb, "MAX_ROWS", max_rows)
        calls.clear()
        module = ld.module.clone(config=dataclasses.replace(ld.config, dtype=dtype))
        rngs = {"dropout": jax.random.PRNGKey(0)} if train else None
        out = jax.jit(lambda p: module.apply({"params": p}, **batch, schedule=(16, 8, 4), deterministic=not train,
                                             rngs=rngs).last_hidden_state)(ld.params)
        return np.asarray(out, np.float32), list(calls)

    xla, none = hidden("never")
    assert none == []
    fused, rows = hidden("interpret")
    # one call a layer on its kept rows (under the tests' 8 fake devices the SPMD wrapper traces its
    # first call twice)
    assert list(dict.fromkeys(rows)) == [(3, 16, 64), (3, 8, 64), (3, 4, 64)]
    np.testing.assert_allclose(fused, xla, rtol=0.05, atol=0.05)
    assert np.abs(xla).max() > 1
    assert hidden("interpret", train=True)[1] == []
    assert hidden("interpret", dtype="float32")[1] == []
    assert list(dict.fromkeys(hidden("interpret", max_rows=40)[1])) == [(3, 8, 64), (3, 4, 64)]
    monkeypatch.setattr(common, "GELU_16BIT", "tanh")
    assert hidden("interpret")[1] == []
    assert not fb.fits(48, 64, 250, SMALL)  # the depth does not divide the tiles


def test_kernel_lowers_to_triton_at_bert_base_shapes():
    bf = jnp.bfloat16
    args = [jnp.zeros(s, bf) for s in ((128, 768), (768, 3072), (3072,), (3072, 768), (768,), (768,), (768,))]
    text = jax.jit(lambda *a: fb.ffn_block(*a, eps=1e-12, programs=132)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton_kernel_call" in text or "__gpu$xla.gpu.triton" in text
