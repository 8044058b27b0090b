"""LayerNorm in one Pallas (Triton) kernel: one read of the rows, one write.

XLA emits a LayerNorm over the hidden size as two kernels on a GPU: a reduction for the
statistics, then the normalisation, which reads the rows again. This kernel loads a block of
rows once, keeps them in registers, and writes the normalised rows: per row

    mean = sum(x) / D,   var = sum((x - mean)^2) / D      (float32)
    y    = (x - mean) * rsqrt(var + eps) * scale + bias    (rounded to the output dtype)

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


def _ln_kernel(x_ref, g_ref, b_ref, o_ref, *, d: int, r: int, block_r: int, eps: float):
    # x [BR, DP] (rows past R and columns past D masked), g/b [DP]; o [BR, DP]
    dp = x_ref.shape[-1]
    rows = pl.program_id(0) * block_r + jnp.arange(block_r, dtype=jnp.int32)
    col_ok = jnp.arange(dp, dtype=jnp.int32) < d
    ok = (rows < r)[:, None] & col_ok[None, :]  # [BR, DP]
    x = _masked_load(x_ref, ok if (d != dp or r % block_r) else None).astype(jnp.float32)
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
                    blocks: tuple[int, int, int] | None = None):
    """LayerNorm of the last axis of ``x`` [..., D] with ``scale`` and ``bias`` [D], statistics
    in float32, output in ``out_dtype`` (default x's). ``blocks``: (rows a program, num_warps,
    num_stages), None: ``LN_BLOCKS``."""
    shape, d = x.shape, x.shape[-1]
    x2 = x.reshape(-1, d)
    r = x2.shape[0]
    block_r, num_warps, num_stages = blocks or LN_BLOCKS
    dp = _pow2(d)
    block_r = min(block_r, _pow2(r, 1), max(1, 8192 // dp))  # at most 8192 floats a program
    kernel = functools.partial(_ln_kernel, d=d, r=r, block_r=block_r, eps=eps)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((r, d), out_dtype or x.dtype),
        grid=(pl.cdiv(r, block_r),),
        in_specs=[pl.BlockSpec((block_r, dp), lambda i: (i, 0)),
                  pl.BlockSpec((dp,), lambda i: (0,)), pl.BlockSpec((dp,), lambda i: (0,))],
        out_specs=pl.BlockSpec((block_r, dp), lambda i: (i, 0)),
        interpret=interpret,
        **_triton_params(interpret, num_warps, num_stages),
    )(x2, scale, bias)
    return out.reshape(shape)


def reference(x, scale, bias, eps: float, out_dtype=None):
    """The same LayerNorm in XLA (float32 statistics): the backward pass and the tests' reference."""
    x32 = x.astype(jnp.float32)
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
