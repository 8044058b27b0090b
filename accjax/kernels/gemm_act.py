"""A projection with its bias and activation in the epilogue, ``act(x @ w + b)``, as one
Mosaic GPU kernel (Hopper: TMA loads, wgmma, a warp-specialised pipeline).

XLA runs a feed-forward block's input projection as a cuBLAS GEMM (bias in its epilogue)
and then the activation as a kernel of its own: at BERT-base 128 x 128 that kernel reads and
writes the [16384, 3072] bf16 activations once more (200 MB, about 80 us of a layer's 570:
docs/benchmarks.md), and cuBLAS's epilogue knows only the tanh GELU. Here each output tile's
float32 accumulator gets the bias and the activation before its one write.

Layout of the work: the output is cut into blocks of ``tiles.m`` rows x ``2 * tiles.n``
columns; a block is one CTA's, its two compute warpgroups own ``tiles.n`` columns each and a
third warpgroup streams the [m, k] and [k, 2n] operand tiles through shared memory
(``tiles.stages`` in flight). The grid is persistent: one CTA per SM walks the blocks, the
columns of a row of blocks first by default (the [k, n] weights stay in L2; other orders
measured the same). The bias slice of a warpgroup's columns is fetched by TMA while its main
loop runs.

``KERNEL`` says where it runs: 'never' (the default), 'auto' on a GPU where it compiles and
agrees with XLA (probed once: Hopper), or 'interpret' (Mosaic GPU's interpreter: how the tests
run it on the CPU). It is opt-in because on the H200 it measured 7-9% faster than cuBLAS + the
GELU kernel alone, but within the spread in whole BERT-base and GPT-2 programs
(docs/benchmarks.md, eleventh session): its epilogue runs on the warpgroups that do the main
loop, so it is not hidden behind the next tile's products.

Rows, depth and width must be whole tiles and the rows at least ``MIN_ROWS`` (below, cuBLAS
plus the activation is as fast), else the XLA path runs. Under differentiation the XLA path
runs (its pre-activation is what the backward pass needs), so the kernel serves inference.
Models reach it through ``accjax.models.common.DenseActivation``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from accjax.kernels import probed_once

KERNEL = "never"
# rows of a projection below which the XLA path runs (cuBLAS + the activation's own kernel):
# on the H200 the kernel alone is 7-9% faster from 8192 rows up, as fast at 4096, slower at 2048
MIN_ROWS = 8192


@dataclasses.dataclass(frozen=True)
class Tiles:
    m: int = 128  # rows of a block (and of each compute warpgroup's tile)
    n: int = 128  # columns of one compute warpgroup's tile (a block has two)
    k: int = 64  # depth of one pipeline step
    stages: int = 4  # pipeline steps in flight
    epi_m: int = 64  # the output leaves through shared memory in tiles of epi_m x epi_n
    epi_n: int = 64
    # order of the blocks: 0 row-major (a row of blocks at a time); w > 0 the snake of
    # ``plgpu.planar_snake`` over strips of w blocks along the dimension ``minor`` (0 rows, 1 columns)
    width: int = 0
    minor: int = 1


TILES = Tiles()


def _erf(z):
    """erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7; 5e-7 in float32): Mosaic GPU's
    warpgroup lowering has no layout rule for ``math.erf``; this is exp, abs, sign and
    arithmetic. Pallas' Triton lowering has no erf either (``ffn_block`` uses this one)."""
    a = jnp.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return jnp.sign(z) * (1.0 - poly * jnp.exp(-a * a))


def _gelu_erf(y):
    return 0.5 * y * (1.0 + _erf(y * (1.0 / math.sqrt(2.0))))


def _gelu_tanh(y):
    return 0.5 * y * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * (y * y * y))))


# the activations the epilogue can apply, by the names of ``common.ACTIVATIONS``
EPILOGUES = {"gelu": _gelu_erf, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
             "gelu_fast": _gelu_tanh}


def _kernel(x_gmem, w_gmem, b_gmem, o_gmem, *, tiles: Tiles, activation: str):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_gmem.shape
    n = w_gmem.shape[1]
    tm, tn, tk = tiles.m, tiles.n, tiles.k
    block_n = 2 * tn
    n_blocks = n // block_n
    epi_m, epi_n = min(tiles.epi_m, tm), min(tiles.epi_n, tn)
    act = EPILOGUES[activation]

    def transforms(cols: int, dtype):
        swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
        return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k // tk,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=tiles.stages, compute_context=context,
            in_specs=[plgpu.BlockSpec((tm, tk), lambda s: (0, s), transforms=transforms(tk, x_gmem.dtype),
                                      memory_space=plgpu.SMEM),
                      plgpu.BlockSpec((tk, block_n), lambda s: (s, 0),
                                      transforms=transforms(tk, w_gmem.dtype), memory_space=plgpu.SMEM)])

    def ignored(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(ignored, ignored).get_allocations(x_gmem, w_gmem),
        out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), o_gmem.dtype, transforms=transforms(epi_n, o_gmem.dtype)),
        bias_smem=plgpu.SMEM((2, tn), jnp.float32),
        bias_barrier=plgpu.Barrier(num_barriers=2),
        collective_axes="wg",
    )
    def _scope(allocations, out_smem, bias_smem, bias_barrier):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop(((m // tm) * n_blocks,), collective_axes="sm")
        def _blocks(info):
            (i,) = info.index
            if tiles.width:
                mi, ni = plgpu.planar_snake(i, (m // tm, n_blocks), tiles.minor, tiles.width)
            else:
                mi, ni = i // n_blocks, i % n_blocks
            rows = pl.ds(mi * tm, tm)
            cols = pl.ds(ni * block_n, block_n)
            my_cols = pl.ds(wg * tn, tn)

            def context(run_pipeline):
                plgpu.copy_gmem_to_smem(b_gmem.at[cols].at[my_cols], bias_smem.at[wg], bias_barrier.at[wg])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                def _epilogue(acc_ref):
                    run_pipeline(acc_ref)
                    plgpu.barrier_wait(bias_barrier.at[wg])
                    bias = bias_smem[wg]  # [tn] float32
                    y = act(acc_ref[...] + lax.broadcast_in_dim(bias, (tm, tn), [1])).astype(o_gmem.dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for a in range(tm // epi_m):
                        for b in range(tn // epi_n):
                            slot = (a * (tn // epi_n) + b) % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            out_smem[wg, slot] = y[a * epi_m:(a + 1) * epi_m, b * epi_n:(b + 1) * epi_n]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                o_gmem.at[rows, cols].at[:, my_cols]
                                .at[pl.ds(a * epi_m, epi_m), pl.ds(b * epi_n, epi_n)])

            def step(_, x_smem, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, x_smem, w_smem.at[:, my_cols])
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(step, context)(x_gmem.at[rows, :], w_gmem.at[:, cols], allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def fits(m: int, k: int, n: int, tiles: Tiles | None = None) -> bool:
    """Whether an [m, k] x [k, n] projection is whole tiles of ``tiles`` (default ``TILES``)."""
    t = tiles or TILES
    return m % t.m == 0 and k % t.k == 0 and n % (2 * t.n) == 0 and t.m % min(t.epi_m, t.m) == 0


@functools.partial(jax.jit, static_argnames=("activation", "tiles", "interpret", "sms"))
def gemm_act_rows(x, w, b, *, activation: str = "gelu", tiles: Tiles | None = None,
                  interpret: bool = False, sms: int | None = None):
    """``act(x @ w + b)`` for x [M, K], w [K, N] (bf16 or fp16, one dtype), b [N]: float32
    accumulation, the bias (rounded to x's dtype, as XLA's bias add is) and the activation
    in float32, one rounding to x's dtype. Shapes must satisfy ``fits``. ``sms``: CTAs of
    the persistent grid (default: the device's SM count)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    tiles = tiles or TILES
    (m, k), n = x.shape, w.shape[1]
    if not fits(m, k, n, tiles):
        raise ValueError(f"[{m}, {k}] x [{k}, {n}] is not whole tiles of {tiles}")
    params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        params = InterpretGPUParams()
    sms = sms or (4 if interpret else jax.devices()[0].core_count)
    blocks = (m // tiles.m) * (n // (2 * tiles.n))
    call = plgpu.kernel(
        functools.partial(_kernel, tiles=tiles, activation=activation),
        out_type=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(min(sms, blocks),), grid_names=("sm",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=params)
    return call(x, w.astype(x.dtype), b.astype(x.dtype).astype(jnp.float32))


def reference(x, w, b, activation: str):
    """The XLA path, as ``nn.DenseGeneral`` and the model's activation compute it: the
    product and the bias add in x's dtype, then the activation (``common.ACTIVATIONS``)."""
    from accjax.models import common

    return common.activation(activation)(_linear(x, w, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gemm_act(x, w, b, activation: str, interpret: bool):
    """``act(x @ w + b)`` for x [..., K]: the kernel on the rows where they are whole tiles
    (per device under SPMD: ``sharding.batch_partitioned``; interpreted, on the whole array),
    else ``reference``; differentiated, ``reference`` forward and backward."""
    from accjax import sharding

    def rows(x_, w_, b_):
        x2 = x_.reshape(-1, x_.shape[-1])
        if not fits(x2.shape[0], x2.shape[1], w_.shape[1]):
            return reference(x_, w_, b_, activation)
        out = gemm_act_rows(x2, w_, b_, activation=activation, tiles=TILES, interpret=interpret)
        return out.reshape(*x_.shape[:-1], w_.shape[1])

    if interpret:  # the interpreter's host callbacks cannot be partitioned: whole arrays
        return rows(x, w, b)
    return sharding.batch_partitioned(("gemm_act", activation), rows, (x, w, b), (1, 0, 0))


def _linear(x, w, b):
    return jnp.einsum("...k,kn->...n", x, w.astype(x.dtype)) + b.astype(x.dtype)


def _fwd(x, w, b, activation, interpret):
    # Under differentiation the forward pass is XLA's, keeping the pre-activation for the
    # backward pass (as autodiff of ``reference`` does): the kernel's output alone would make
    # the backward pass recompute the product.
    from accjax.models import common

    pre = _linear(x, w, b)
    return common.activation(activation)(pre), (x, w, b, pre)


def _bwd(activation, interpret, res, g):
    from accjax.models import common

    x, w, b, pre = res
    (g_pre,) = jax.vjp(common.activation(activation), pre)[1](g)
    return jax.vjp(_linear, x, w, b)[1](g_pre)


gemm_act.defvjp(_fwd, _bwd)


_AVAILABLE: dict[str, bool] = {}


def _probe() -> bool:
    """The kernel against float32 numpy on 2 x 2 blocks of ``TILES`` (bf16). It runs even
    when the first ``applies`` is asked while a model is being traced (the usual case)."""
    rng = np.random.default_rng(0)
    t = TILES
    m, k, n = 2 * t.m, 2 * t.k, 2 * (2 * t.n)
    x = rng.standard_normal((m, k)).astype(jnp.bfloat16)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
    b = rng.standard_normal(n).astype(jnp.bfloat16)
    # compiled ahead of time and called on numpy arrays: a concrete result even inside a trace
    got = np.asarray(gemm_act_rows.lower(x, w, b).compile()(x, w, b), np.float32)
    y = x.astype(np.float32) @ w.astype(np.float32) + b.astype(np.float32)
    ref = 0.5 * y * (1.0 + np.vectorize(math.erf)(y / math.sqrt(2.0)))  # numpy: no jax op to stage
    return bool(np.allclose(got, ref, rtol=2e-2, atol=2e-2))


def applies(x, n: int, activation: str) -> bool:
    """Whether ``act(x @ w + b)`` with ``n`` outputs runs this kernel (``KERNEL``; 'auto': a
    Hopper GPU where the probe passes, bf16/fp16 rows, at least ``MIN_ROWS`` of them, whole
    tiles)."""
    if KERNEL == "never" or activation not in EPILOGUES or x.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    m = math.prod(x.shape[:-1])
    if not fits(m, x.shape[-1], n):
        return False
    if KERNEL == "interpret":
        return True
    if jax.default_backend() != "gpu" or m < MIN_ROWS:
        return False
    key = str(getattr(jax.devices()[0], "compute_capability", ""))
    if not key.startswith("9"):  # wgmma: Hopper only
        return False
    return probed_once(_AVAILABLE, key, _probe)
