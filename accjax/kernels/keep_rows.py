"""An eliminating layer's selection and gather in one Pallas (Triton) kernel.

After attention, an eliminating layer keeps the ``keep`` rows of each example with the
highest ACC (ties to the lower index, in their original order: ``acc.select_rows``) and
gathers them from the hidden state and the attention context. In XLA that is five or six
small fusions (the rank count, the kept mask, its running count, the kept indices) and a
gather fusion: on an H200 at BERT-base 128 x 128 and the 4.8x schedule, about 15 us of
small kernels in the first layer and 80 us over the program beside 55 us of gathers
(docs/benchmarks.md). Here one program per (example, column chunk) does it all in
registers:

    rank_j   = #{i : s_i > s_j, or s_i == s_j and i < j}       [T] (chunks of RANK_CHUNK rows i)
    kept_j   = rank_j < keep
    so_far_j = kept_0 + ... + kept_j
    idx_r    = #{j : so_far_j <= r}                            the r-th kept row (r < keep)
    out[r]   = x[idx_r]                                        each tensor's column chunk

The rank count is recomputed by each column chunk's program (it is a few thousand
comparisons; the rows are what cost). With no tensors it is a selection kernel alone
(``acc.select_rows(..., method='kernel')``). Differentiated, the gather's transpose (a
scatter-add) is XLA's; the scores get no gradient (ACC only ranks rows).

``KERNEL`` says where it runs: 'auto' on a GPU where it compiles and agrees with numpy
(probed once), 'never', or 'interpret' (Pallas' interpreter: how the tests run it on the CPU).
``acc.eliminate`` reaches it for layers of up to ``MAX_ROWS`` rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from accjax.kernels import runs_here
from accjax.kernels.acc_pallas import _pow2, _triton_params

KERNEL = "auto"
MAX_ROWS = 256  # rows of a layer ranked in registers; above, XLA's rank count or top_k runs
RANK_CHUNK = 32  # rows i compared with every row j at a time ([RANK_CHUNK, T] in registers)
OUT_CHUNK = 32  # kept rows r found and copied at a time
MAX_COLS = 256  # columns of each tensor a program copies (the largest power of two dividing D)
# (num_warps, num_stages)
BLOCKS = (4, 1)


def _kernel(s_ref, *refs, keep: int, t: int, n_tensors: int):
    # s_ref [Tp] one example's scores (past T: masked); refs: n_tensors inputs [Tp, DC] (rows
    # past T never read), idx [Kp], n_tensors outputs [Kp, DC] (rows past keep never written)
    from jax.experimental.pallas import triton as plgpu

    ins, (idx_ref, *outs) = refs[:n_tensors], refs[n_tensors:]
    tp = s_ref.shape[0]
    kp = idx_ref.shape[0]

    def scores(start, size):
        i = start + jnp.arange(size, dtype=jnp.int32)
        ref = s_ref.at[pl.ds(start, size)]
        s = ref[...] if t == tp else plgpu.load(ref, mask=i < t, other=-jnp.inf)
        return i, s

    j, s_j = scores(0, tp)
    rank = jnp.zeros((tp,), jnp.int32)
    for start in range(0, tp, min(RANK_CHUNK, tp)):
        i, s_i = scores(start, min(RANK_CHUNK, tp))
        beats = (s_i[:, None] > s_j[None, :]) | ((s_i[:, None] == s_j[None, :]) & (i[:, None] < j[None, :]))
        rank = rank + jnp.sum(beats.astype(jnp.int32), axis=0)
    # rows past T rank below every real row (-inf, higher index): never kept, as keep <= T
    so_far = jnp.cumsum((rank < keep).astype(jnp.int32))  # [Tp]
    first = pl.program_id(1) == 0
    for start in range(0, kp, min(OUT_CHUNK, kp)):
        size = min(OUT_CHUNK, kp)
        r = start + jnp.arange(size, dtype=jnp.int32)
        idx = jnp.sum((so_far[None, :] <= r[:, None]).astype(jnp.int32), axis=1)  # [size]
        live = r < keep
        idx = jnp.where(live, idx, 0)  # rows past keep: a valid row, never stored

        @pl.when(first)
        def _():
            plgpu.store(idx_ref.at[pl.ds(start, size)], idx, mask=live)

        for x_ref, o_ref in zip(ins, outs):
            plgpu.store(o_ref.at[pl.ds(start, size), :], x_ref[idx, :], mask=live[:, None])


def _col_chunk(d: int) -> int:
    """The largest power of two >= 16 and <= MAX_COLS dividing d (0: none)."""
    c = MAX_COLS
    while c >= 16 and d % c:
        c //= 2
    return c if c >= 16 else 0


def fits(t: int, tensors) -> bool:
    """Whether rows [B, t] and these [B, t, ...] tensors can run the kernel: at most
    ``MAX_ROWS`` rows, every tensor with the same number of columns (trailing dims
    flattened), a multiple of 16."""
    cols = {math.prod(x.shape[2:]) for x in tensors}
    return t <= MAX_ROWS and len(cols) <= 1 and all(_col_chunk(c) for c in cols)


@functools.partial(jax.jit, static_argnames=("keep", "interpret", "blocks"))
def select_and_gather_rows(scores, tensors, *, keep: int, interpret: bool = False,
                           blocks: tuple[int, int] | None = None):
    """(idx [B, keep] int32, [each tensor's rows idx]) for scores [B, T] and tensors
    [B, T, ...] (``fits``): ``acc.select_rows(scores, keep)`` and ``acc.take_rows``."""
    b, t = scores.shape
    if not 1 <= keep <= t or not fits(t, tensors):
        raise ValueError(f"cannot select {keep} of {t} rows from {[x.shape for x in tensors]} here")
    tp, kp = _pow2(t), _pow2(keep)
    flat = [x.reshape(b, t, -1) for x in tensors]
    d = flat[0].shape[2] if flat else 16
    dc = _col_chunk(d)
    num_warps, num_stages = blocks or BLOCKS
    kernel = functools.partial(_kernel, keep=keep, t=t, n_tensors=len(flat))
    out_shape = [jax.ShapeDtypeStruct((b, keep), jnp.int32)] + [
        jax.ShapeDtypeStruct((b, keep, d), x.dtype) for x in flat]
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(b, d // dc),
        in_specs=[pl.BlockSpec((None, tp), lambda i, c: (i, 0))]
        + [pl.BlockSpec((None, tp, dc), lambda i, c: (i, 0, c)) for _ in flat],
        out_specs=[pl.BlockSpec((None, kp), lambda i, c: (i, 0))]
        + [pl.BlockSpec((None, kp, dc), lambda i, c: (i, 0, c)) for _ in flat],
        interpret=interpret,
        **_triton_params(interpret, num_warps, num_stages),
    )(scores.astype(jnp.float32), *flat)
    idx, rows = out[0], out[1:]
    return idx, [r.reshape((b, keep) + x.shape[2:]) for r, x in zip(rows, tensors)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def select_and_gather(scores, tensors, keep: int, interpret: bool):
    """``select_and_gather_rows``, differentiable in the tensors (the transpose of the gather,
    a scatter-add; no gradient to the scores); split along the batch axis under SPMD."""
    return _partitioned(scores, tensors, keep, interpret)


def _partitioned(scores, tensors, keep: int, interpret: bool):
    from accjax import sharding

    def call(s, *xs):
        idx, rows = select_and_gather_rows(s, list(xs), keep=keep, interpret=interpret)
        return (idx, *rows)

    out = sharding.batch_partitioned(("keep_rows", keep, len(tensors), interpret), call,
                                     (scores, *tensors), (1,) * (len(tensors) + 1))
    return out[0], list(out[1:])


def _fwd(scores, tensors, keep, interpret):
    idx, rows = _partitioned(scores, tensors, keep, interpret)
    return (idx, rows), (idx, scores, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in tensors])


def _bwd(keep, interpret, res, g):
    idx, scores, shapes = res
    _, g_rows = g
    b = jnp.arange(idx.shape[0])[:, None]
    grads = [jnp.zeros(sd.shape, sd.dtype).at[b, idx].add(gr.astype(sd.dtype)) for sd, gr in zip(shapes, g_rows)]
    return jnp.zeros_like(scores), grads


select_and_gather.defvjp(_fwd, _bwd)


_AVAILABLE: dict[str, bool] = {}


def _probe(interpret: bool = False) -> bool:
    """The kernel against numpy on 3 examples of 40 rows with ties and -inf (bf16 rows);
    compiled ahead and checked with numpy, so it runs inside a trace too."""
    rng = np.random.default_rng(0)
    s = np.round(rng.standard_normal((3, 40)), 1).astype(np.float32)  # ties
    s[:, 30:] = -np.inf
    x = rng.standard_normal((3, 40, 48)).astype(jnp.bfloat16)
    keep = 13
    idx, (got,) = select_and_gather_rows.lower(s, [x], keep=keep, interpret=interpret).compile()(s, [x])
    order = np.argsort(-s, axis=1, kind="stable")[:, :keep]  # ties: the lower index first
    ref_idx = np.sort(order, axis=1)
    ref = np.take_along_axis(x.astype(np.float32), ref_idx[:, :, None], axis=1)
    return bool(np.array_equal(np.asarray(idx), ref_idx)
                and np.array_equal(np.asarray(got, np.float32), ref))


def applies(t: int, tensors=()) -> bool:
    """Whether selecting among ``t`` rows (and gathering ``tensors``) runs this kernel
    (``KERNEL``; 'auto': a GPU where the probe passes; ``fits``)."""
    return fits(t, tensors) and runs_here(KERNEL, _AVAILABLE, _probe)
