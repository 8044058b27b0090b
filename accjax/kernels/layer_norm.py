"""LayerNorm in one Pallas (Triton) kernel: one read of the rows, one write.

XLA emits a LayerNorm over the hidden size as two kernels on a GPU: a reduction for the
statistics, then the normalisation, which reads the rows again. This kernel loads a block of
rows once, keeps them in registers, and writes the normalised rows: per row

    mean = sum(x) / D,   var = sum((x - mean)^2) / D      (float32)
    y    = (x - mean) * rsqrt(var + eps) * scale + bias    (rounded to the output dtype)

With ``parts`` [S, ..., D] and ``parts_bias`` [D] it normalises ``x + sum(parts) + parts_bias``
instead (the sum in float32): the partial products of a projection split along its depth
(``Dense.depth_partials``), so the projection's split-K reduction, its bias and the residual
add happen in this one read of the rows (``depth_splits`` says when; ``add_layer_norm``).

Each program takes ``LN_BLOCKS[0]`` rows; the hidden size is padded to a power of two inside
the block (masked loads, Triton tiles are powers of two), never in memory. The backward pass
is XLA's LayerNorm gradient. ``KERNEL`` says where it runs: 'auto' on a GPU where it compiles
(probed once), 'never', or 'interpret' (Pallas' interpreter: how the tests run it on the CPU).
Models reach it through ``accjax.models.common.LayerNorm``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from accjax.kernels import runs_here
from accjax.kernels.acc_pallas import _masked_load, _pow2, _triton_params

KERNEL = "auto"
# (rows a program, num_warps, num_stages)
LN_BLOCKS = (8, 4, 1)
# A projection into the hidden size with at most SPLIT_ROWS rows runs as SPLIT partial
# products summed by the LayerNorm kernel (``depth_splits``); 0 turns it off. H200, BERT-base's
# FFN output (3072 deep) before its LayerNorm, 12 sublayers chained, bf16: 2.0-3.1 us a layer
# less at 128-1024 rows (cuBLAS's split-K reduction kernel gone), 2.7 us more at 2048;
# the attention output (768 deep) gained nothing; in whole programs 12-20 us off BERT-base's
# dense 1 x 128 and 8 x 128 (docs/benchmarks.md, nineteenth session).
SPLIT_ROWS = 1024
SPLIT = 2  # a power of two (the kernel loads the partials as one Triton block)


def _ln_kernel(x_ref, *refs, d: int, r: int, block_r: int, eps: float, parts: bool):
    # x [BR, DP] (rows past R and columns past D masked), with parts: p [S, BR, DP] and c [DP];
    # g/b [DP]; o [BR, DP]
    p_ref, c_ref, g_ref, b_ref, o_ref = refs if parts else (None, None, *refs)
    dp = x_ref.shape[-1]
    rows = pl.program_id(0) * block_r + jnp.arange(block_r, dtype=jnp.int32)
    col_ok = jnp.arange(dp, dtype=jnp.int32) < d
    ok = (rows < r)[:, None] & col_ok[None, :]  # [BR, DP]
    mask = ok if (d != dp or r % block_r) else None
    x = _masked_load(x_ref, mask).astype(jnp.float32)
    if parts:
        p_mask = None if mask is None else jnp.broadcast_to(mask[None], p_ref.shape)
        x = x + jnp.sum(_masked_load(p_ref, p_mask).astype(jnp.float32), axis=0)
        x = x + _masked_load(c_ref, col_ok if d != dp else None).astype(jnp.float32)[None, :]
    mean = jnp.sum(x, axis=1) / d
    xc = jnp.where(col_ok[None, :], x - mean[:, None], 0.0)
    inv = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1) / d + eps)
    g = _masked_load(g_ref, col_ok if d != dp else None).astype(jnp.float32)
    b = _masked_load(b_ref, col_ok if d != dp else None).astype(jnp.float32)
    y = (xc * inv[:, None] * g[None, :] + b[None, :]).astype(o_ref.dtype)
    if d == dp and r % block_r == 0:
        o_ref[...] = y
    else:
        from jax.experimental.pallas import triton as plgpu

        plgpu.store(o_ref, y, mask=ok)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "out_dtype", "blocks"))
def layer_norm_rows(x, scale, bias, *, eps: float, interpret: bool = False, out_dtype=None,
                    blocks: tuple[int, int, int] | None = None, parts=None, parts_bias=None):
    """LayerNorm of the last axis of ``x`` [..., D] with ``scale`` and ``bias`` [D], statistics
    in float32, output in ``out_dtype`` (default x's); with ``parts`` [S, ..., D] and
    ``parts_bias`` [D], of ``x + sum(parts) + parts_bias``. ``blocks``: (rows a program,
    num_warps, num_stages), None: ``LN_BLOCKS``."""
    shape, d = x.shape, x.shape[-1]
    x2 = x.reshape(-1, d)
    r = x2.shape[0]
    block_r, num_warps, num_stages = blocks or LN_BLOCKS
    dp = _pow2(d)
    block_r = min(block_r, _pow2(r, 1), max(1, 8192 // dp))  # at most 8192 floats a program
    kernel = functools.partial(_ln_kernel, d=d, r=r, block_r=block_r, eps=eps, parts=parts is not None)
    vec = pl.BlockSpec((dp,), lambda i: (0,))
    args, specs = [x2], [pl.BlockSpec((block_r, dp), lambda i: (i, 0))]
    if parts is not None:
        args += [parts.reshape(parts.shape[0], r, d), parts_bias]
        specs += [pl.BlockSpec((parts.shape[0], block_r, dp), lambda i: (0, i, 0)), vec]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((r, d), out_dtype or x.dtype),
        grid=(pl.cdiv(r, block_r),),
        in_specs=specs + [vec, vec],
        out_specs=pl.BlockSpec((block_r, dp), lambda i: (i, 0)),
        interpret=interpret,
        **_triton_params(interpret, num_warps, num_stages),
    )(*args, scale, bias)
    return out.reshape(shape)


def reference(x, scale, bias, eps: float, out_dtype=None, parts=None, parts_bias=None):
    """The same LayerNorm in XLA (float32 statistics; with ``parts``, of ``x + sum(parts) +
    parts_bias``): the backward pass and the tests' reference."""
    x32 = x.astype(jnp.float32)
    if parts is not None:
        x32 = x32 + parts.astype(jnp.float32).sum(0) + parts_bias.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    xc = x32 - mean
    y = xc * jax.lax.rsqrt((xc * xc).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(out_dtype or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def layer_norm(x, scale, bias, eps: float, out_dtype, interpret: bool):
    """``layer_norm_rows``, differentiable: the gradient is ``reference``'s; split along the
    batch axis under SPMD (``sharding.batch_partitioned``)."""
    from accjax import sharding

    return sharding.batch_partitioned(
        ("layer_norm", eps, out_dtype, interpret), lambda x_, s, b: layer_norm_rows(
            x_, s, b, eps=eps, interpret=interpret, out_dtype=out_dtype), (x, scale, bias), (1, 0, 0))


def _fwd(x, scale, bias, eps, out_dtype, interpret):
    return layer_norm(x, scale, bias, eps, out_dtype, interpret), (x, scale, bias)


def _bwd(eps, out_dtype, interpret, res, g):
    _, vjp = jax.vjp(lambda *a: reference(*a, eps, out_dtype), *res)
    return vjp(g)


layer_norm.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def add_layer_norm(x, parts, parts_bias, scale, bias, eps: float, out_dtype, interpret: bool):
    """``layer_norm_rows`` of ``x + sum(parts) + parts_bias``, differentiable (``reference``'s
    gradient); split along the batch axis (the partials' second) under SPMD."""
    from accjax import sharding

    return sharding.batch_partitioned(
        ("add_layer_norm", eps, out_dtype, interpret), lambda x_, p, c, s, b: layer_norm_rows(
            x_, s, b, eps=eps, interpret=interpret, out_dtype=out_dtype, parts=p, parts_bias=c),
        (x, parts, parts_bias, scale, bias), (1, 1, 0, 0, 0), axes=(0, 1, 0, 0, 0))


def _add_fwd(x, parts, parts_bias, scale, bias, eps, out_dtype, interpret):
    return (add_layer_norm(x, parts, parts_bias, scale, bias, eps, out_dtype, interpret),
            (x, parts, parts_bias, scale, bias))


def _add_bwd(eps, out_dtype, interpret, res, g):
    _, vjp = jax.vjp(lambda x_, p, c, s, b: reference(x_, s, b, eps, out_dtype, p, c), *res)
    return vjp(g)


add_layer_norm.defvjp(_add_fwd, _add_bwd)


def depth_splits(x, out_dtype) -> int:
    """How many partial products a projection of ``x`` [..., depth] into the hidden size
    should be split into for ``add_layer_norm`` to sum: ``SPLIT`` where the kernel runs
    (``applies``), the products are 16-bit, there are at most ``SPLIT_ROWS`` rows (few
    output tiles, where cuBLAS splits the depth and reduces in a kernel of its own) and the
    depth divides; else 1 (XLA's product, then the LayerNorm)."""
    rows = int(np.prod(x.shape[:-1]))
    ok = (SPLIT > 1 and SPLIT & (SPLIT - 1) == 0 and 0 < rows <= SPLIT_ROWS and x.shape[-1] % SPLIT == 0
          and jnp.dtype(out_dtype).itemsize == 2 and applies(x))
    return SPLIT if ok else 1


_AVAILABLE: dict[str, bool] = {}


def _probe() -> bool:
    """The kernel against numpy on 37 rows of 48 (bf16 in, float32 statistics)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 48)) * 3 + 1).astype(jnp.bfloat16)
    g, b = rng.standard_normal(48).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    got = np.asarray(layer_norm_rows.lower(x, g, b, eps=1e-5).compile()(x, g, b), np.float32)
    x32 = x.astype(np.float32)
    ref = (x32 - x32.mean(-1, keepdims=True)) / np.sqrt(x32.var(-1, keepdims=True) + 1e-5) * g + b
    return bool(np.allclose(got, ref, rtol=2e-2, atol=2e-2))


def applies(x) -> bool:
    """Whether a LayerNorm of ``x`` runs this kernel (``KERNEL``; 'auto': a GPU where the
    probe passes, hidden sizes up to 4096)."""
    return x.shape[-1] <= 4096 and runs_here(KERNEL, _AVAILABLE, _probe)
