"""A decoding step's projection with what surrounds it, in one Pallas (Triton) kernel:

    y = epilogue(prologue(x) @ W)

for the few rows of a decoding step (one per sequence: ``MAX_ROWS`` at most). XLA runs each
piece as a kernel of its own: T5's RMSNorm, the cuBLAS GEMM, the gated activation, the
residual add. At 16 rows every one of them runs at its fixed latency (2-5 us on an H100)
while the weights take under a microsecond to read (docs/benchmarks.md, twenty-second and
twenty-third sessions).
Here one program per ``BLOCK_N`` output columns

- (``norm``) sums the squares of its rows' x over the depth, then scales each depth chunk
  by ``rsqrt(mean + eps) * scale`` in float32 and rounds it to x's dtype, as ``t5.RMSNorm``
  does before its projection;
- streams W in chunks of ``BLOCK_K`` rows, float32 accumulation;
- rounds the product to x's dtype, as XLA's GEMM returns it, then applies ``act`` (with
  W [K, 2, N], gated: ``act(x W_0) * (x W_1)``) in float32, and (``residual``) adds the
  residual in float32; one rounding to x's dtype.

x stays in L2 across programs (16 rows x 2048 of bf16 is 64 KB). Rows are masked, never
padded in memory. ``KERNEL`` says where it runs: 'auto' on a GPU where it compiles (probed
once), 'never', or 'interpret' (the tests on the CPU). Inference only: no gradient. T5's
decoder layers reach it where ``t5.STEP_KERNEL`` is on (opt-in: on an H100 it is 0.6-1.3 us a
projection slower than XLA's kernels at 2-64 rows, 3-5 us faster at one row, where XLA's
single-row product is itself 1.7-2.1x slower than at two rows; docs/benchmarks.md,
twenty-fourth session).
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
MAX_ROWS = 64  # a step with more rows (sequences) runs XLA's kernels
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
BLOCKS = (32, 128, 4, 3)


def _kernel(x_ref, *refs, m: int, k: int, block_k: int, eps: float, norm: bool, gated: bool,
            residual: bool, act):
    # x [MP, K] (rows past m masked); g [K] (norm); w [K, BN] or [K, 2, BN] (gated);
    # r [MP, BN] (residual); o [MP, BN]
    refs = list(refs)
    g_ref = refs.pop(0) if norm else None
    w_ref = refs.pop(0)
    r_ref = refs.pop(0) if residual else None
    o_ref = refs.pop(0)
    mp = x_ref.shape[0]
    rows_ok = jnp.arange(mp, dtype=jnp.int32) < m
    mask = rows_ok if m != mp else None
    steps = k // block_k

    def chunk(i):
        return _masked_load(x_ref.at[:, pl.ds(i * block_k, block_k)], mask).astype(jnp.float32)

    inv = None
    if norm:
        def squares(i, acc):
            c = chunk(i)
            return acc + jnp.sum(c * c, axis=1)

        ss = jax.lax.fori_loop(0, steps, squares, jnp.zeros((mp,), jnp.float32))
        inv = jax.lax.rsqrt(ss / k + eps)

    n_out = o_ref.shape[-1]

    def body(i, accs):
        c = chunk(i)
        if norm:
            c = c * inv[:, None] * g_ref[pl.ds(i * block_k, block_k)].astype(jnp.float32)[None, :]
        c = c.astype(x_ref.dtype)
        if gated:
            w0 = w_ref[pl.ds(i * block_k, block_k), 0, :]
            w1 = w_ref[pl.ds(i * block_k, block_k), 1, :]
            return (accs[0] + jnp.dot(c, w0.astype(c.dtype), preferred_element_type=jnp.float32),
                    accs[1] + jnp.dot(c, w1.astype(c.dtype), preferred_element_type=jnp.float32))
        w = w_ref[pl.ds(i * block_k, block_k), :]
        return (accs[0] + jnp.dot(c, w.astype(c.dtype), preferred_element_type=jnp.float32),)

    zero = jnp.zeros((mp, n_out), jnp.float32)
    accs = jax.lax.fori_loop(0, steps, body, (zero, zero) if gated else (zero,))
    dt = o_ref.dtype
    y = accs[0].astype(dt).astype(jnp.float32)  # the product as XLA's GEMM returns it
    if gated:
        y = act(y) * accs[1].astype(dt).astype(jnp.float32)
    elif act is not None:
        y = act(y)
    if residual:
        y = y.astype(dt).astype(jnp.float32) + _masked_load(r_ref, mask).astype(jnp.float32)
    y = y.astype(dt)
    if mask is None:
        o_ref[...] = y
    else:
        from jax.experimental.pallas import triton as plgpu

        plgpu.store(o_ref, y, mask=mask[:, None])


def step_proj(x, w, *, scale=None, residual=None, eps: float = 1e-6, act=None, interpret: bool = False):
    """``step_proj_rows`` split along the rows (the sequences) under SPMD
    (``sharding.batch_partitioned``): each device runs its own sequences' rows."""
    from accjax import sharding

    return sharding.batch_partitioned(
        ("step_proj", eps, act, interpret), lambda x_, w_, s_, r_: step_proj_rows(
            x_, w_, scale=s_, residual=r_, eps=eps, act=act, interpret=interpret),
        (x, w, scale, residual), (1, 0, 0, 1))


@functools.partial(jax.jit, static_argnames=("eps", "act", "interpret", "blocks"))
def step_proj_rows(x, w, *, scale=None, residual=None, eps: float = 1e-6, act=None,
                   interpret: bool = False, blocks: tuple[int, int, int, int] | None = None):
    """``epilogue(prologue(x) @ w)`` for x [M, K] (M <= ``MAX_ROWS``): ``scale`` [K] given,
    x is RMS-normalised first (T5's RMSNorm, ``eps``); w [K, N], or [K, 2, N] with ``act``
    (gated: ``act(x w[:, 0]) * (x w[:, 1])``); ``residual`` [M, N] given, added last. Output
    in x's dtype; w is cast to it. ``act`` without a gate applies to the product."""
    m, k = x.shape
    gated = w.ndim == 3
    n = w.shape[-1]
    if gated and act is None:
        raise ValueError("a gated projection (w [K, 2, N]) needs act")
    block_n, block_k, num_warps, num_stages = blocks or BLOCKS
    block_k = min(block_k, k)
    block_n = min(block_n, n)
    if k % block_k or n % block_n:
        raise ValueError(f"[{m}, {k}] x [{k}, {n}]: the depth must be whole chunks of {block_k} "
                         f"and the width whole blocks of {block_n}")
    mp = _pow2(m)
    kernel = functools.partial(_kernel, m=m, k=k, block_k=block_k, eps=eps, norm=scale is not None,
                               gated=gated, residual=residual is not None, act=act)
    args, specs = [x], [pl.BlockSpec((mp, k), lambda j: (0, 0))]
    if scale is not None:
        args.append(scale)
        specs.append(pl.BlockSpec((k,), lambda j: (0,)))
    args.append(w)
    specs.append(pl.BlockSpec((k, 2, block_n), lambda j: (0, 0, j)) if gated
                 else pl.BlockSpec((k, block_n), lambda j: (0, j)))
    if residual is not None:
        args.append(residual)
        specs.append(pl.BlockSpec((mp, block_n), lambda j: (0, j)))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(n // block_n,),
        in_specs=specs,
        out_specs=pl.BlockSpec((mp, block_n), lambda j: (0, j)),
        interpret=interpret,
        **_triton_params(interpret, num_warps, num_stages),
    )(*args)


def reference(x, w, *, scale=None, residual=None, eps: float = 1e-6, act=None):
    """The same computation as XLA's kernels run it (``t5.RMSNorm``, ``common.project``, the
    activation, the residual add), each rounded to x's dtype: the tests' reference."""
    dt = x.dtype
    h = x
    if scale is not None:
        xf = x.astype(jnp.float32)
        h = (scale.astype(jnp.float32) * xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(dt)
    if w.ndim == 3:
        g = jnp.einsum("mk,kgn->mgn", h, w.astype(dt))
        y = (act(g[:, 0].astype(jnp.float32)) * g[:, 1].astype(jnp.float32)).astype(dt)
    else:
        y = jnp.einsum("mk,kn->mn", h, w.astype(dt))
        if act is not None:
            y = act(y.astype(jnp.float32)).astype(dt)
    if residual is not None:
        y = (y.astype(jnp.float32) + residual.astype(jnp.float32)).astype(dt)
    return y


def fits(m: int, k: int, n: int) -> bool:
    """Whether an [m, k] x [k, n] step projection runs the kernel's tiling (``BLOCKS``): at
    most ``MAX_ROWS`` rows, the depth whole chunks and the width whole blocks, each a power
    of two of at least 16 (Triton's loads)."""
    def whole(size: int, block: int) -> bool:
        b = min(block, size)
        return b >= 16 and b & (b - 1) == 0 and size % b == 0

    return 0 < m <= MAX_ROWS and whole(k, BLOCKS[1]) and whole(n, BLOCKS[0])


_AVAILABLE: dict[str, bool] = {}


def _probe() -> bool:
    """The kernel (norm, gated, residual) against numpy on 5 rows of 256 -> 2 x 64 (bf16)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 256)).astype(jnp.bfloat16)
    g = (1 + 0.1 * rng.standard_normal(256)).astype(np.float32)
    w = (rng.standard_normal((256, 2, 64)) / 16).astype(jnp.bfloat16)
    r = rng.standard_normal((5, 64)).astype(jnp.bfloat16)
    act = functools.partial(jax.nn.gelu, approximate=True)
    got = np.asarray(step_proj_rows.lower(x, w, scale=g, residual=r, act=act).compile()(x, w, scale=g, residual=r),
                     np.float32)
    x32 = x.astype(np.float32)
    h = x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + 1e-6) * g
    a, b = np.einsum("mk,kn->mn", h, w[:, 0].astype(np.float32)), np.einsum("mk,kn->mn", h, w[:, 1].astype(np.float32))
    ref = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3))) * b + r.astype(np.float32)
    return bool(np.allclose(got, ref, rtol=5e-2, atol=5e-2))


def applies(x, shapes) -> bool:
    """Whether step projections of ``x`` [..., K] of every (depth, width) in ``shapes`` run
    this kernel: ``KERNEL`` ('auto': a GPU where the probe passes) and ``fits``."""
    rows = int(np.prod(x.shape[:-1]))
    return all(fits(rows, k, n) for k, n in shapes) and runs_here(KERNEL, _AVAILABLE, _probe)
