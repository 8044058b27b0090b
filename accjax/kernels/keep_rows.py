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
    out[so_far_j - 1] = x[j]  for kept j                       a few programs: one scattered store
    idx_r    = #{j : so_far_j <= r}, out[r] = x[idx_r]          many programs: only kept rows read

(each tensor's column chunk; the chunk narrows with few examples, ``MIN_PROGRAMS``, and
``SCATTER_MAX_PROGRAMS`` picks the store.)

The scores s may also come unfinished, as the fused attention kernel leaves them
(``acc.ColumnSums``): s_j is then the sum of row j's partial column sums (heads x query
tiles), -inf for padding and +inf for a protected row (row 0, or one its mask marks), and
for a decoder's causal attention divided by the heads times the real rows at or after it (the
queries that see it), which saves XLA's finishing fusions; and [B, T] fields (the rows' mask
and positions) are gathered with the indices, which saves XLA's gather of them: two kernels
fewer an eliminating layer.

The rank count is recomputed by each column chunk's program (it is a few thousand
comparisons; the rows are what cost). Above ``THRESHOLD_ROWS`` rows (GPT-2's and T5's
prompts) T^2 comparisons in one program are what cost, so the kept rows are found without
ranking them: each program of an (example, row tile, column chunk) grid finds the keep-th
highest score v by an exact search over its float32 bits (8 steps of 4 bits, each counting
the scores at or above 15 candidates), keeps the rows above v and the first of those equal to
it, and scatters its own row tile's kept rows to their places (running counts):

    v        = max{u : #{i : s_i >= u} >= keep}
    kept_j   = s_j > v, or s_j == v and #{i <= j : s_i == v} <= keep - #{i : s_i > v}
    out[so_far_j - 1] = x[j]  for kept j

With no tensors it is a selection kernel alone (``acc.select_rows(..., method='kernel')``).
Differentiated, the gather's transpose (a scatter-add) is XLA's; the scores get no gradient
(ACC only ranks rows).

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
# Rows of a layer this kernel selects among; above, XLA's rank count or top_k runs. The
# kernel takes any number of rows; above 256 it measured as fast as XLA's selection in
# GPT-2's 8 x 1024 programs on an H200, not faster (docs/benchmarks.md, seventeenth session);
# T5 16 x 512 at 4x even with it off (twenty-first). At 129-256 rows XLA's selection is a
# little faster. H100, same process, pipelined, bound 128 against 256: BERT-base 32 x 512 at
# 2x -1.7% and -1.0% in two calls, 1.5x / 3x / 4.8x even to -0.6%; GPT-2 8 x 1024 2x even,
# 3x -1.5 / -3.3%, 3.72x -1.7 / -1.1%; Flan-T5 16 x 512 2x -2.3%, 4x -1.6%; BERT 128 x 128
# (no layer above 128 rows) even (docs/benchmarks.md, twenty-second session). Again with GPT-2's
# causal sums finished here: 256 is 4.3-4.8% slower at 3x / 3.72x (thirty-first session).
MAX_ROWS = 128
# Layers of at least this many rows run the kernel too (its threshold search; None: XLA's
# finishing, selection and gather, as above MAX_ROWS). The second ACC pass hands its per-head
# sums unfinished (``acc.ColumnSums``), so there the kernel would replace XLA's finishing (sum
# over heads, normaliser, division, masks) as well. Measured slower all the same (H100, same
# process, pipelined, 257 against None): GPT-2 8 x 1024 prefill 2x +7.7%, 3x +7.4%, 3.72x +1.5%;
# BERT-base 32 x 512 4.8x +0.8%; Flan-T5 16 x 512 2x +1.8%, 4x +1.3%; identical outputs. The
# kernel takes 75-81 us a layer at 1024-712 rows (each of its 192 programs sums the 12 heads'
# parts and searches all 1024 scores again), where XLA's finishing, selection and gather took
# 46 us at layer 0; with 8 or 16 warps a program it is slower still (docs/benchmarks.md,
# thirty-third session).
LARGE_MIN_ROWS: int | None = None
RANK_CHUNK = 128  # rows i compared with every row j at a time ([RANK_CHUNK, T] in registers)
OUT_CHUNK = 32  # kept rows r found and copied at a time (the gather path)
# A call of at most this many programs stores each kept row at its place (one load of the
# chunk, one scattered store) instead of each place searching its row and gathering it: fewer
# dependent steps where the kernel waits on latency. H100, BERT-base, same process: batch 1 and 8
# (48 programs each) 1-4% faster at 2x and 4.8x with RANK_CHUNK 128 (32 before), GPT-2 8 x 1024 at
# 3.72x 0.7%; 128 examples (384 programs, bound by bytes: the scatter reads every row, the
# gather only the kept ones) 0.8% slower at 4.8x, so they keep the gather (docs/benchmarks.md,
# thirtieth session; the bound between 48 and 384 is not measured). 0: always the gather.
SCATTER_MAX_PROGRAMS = 128
MAX_COLS = 256  # columns of each tensor a program copies (the largest power of two dividing D)
# Programs a call aims for: with few examples (batch 1-8) 256-column chunks leave most SMs idle
# and each program copies its rows at one SM's share of the bandwidth, so the chunk halves (down
# to 16 columns) until examples x row tiles x chunks reaches MIN_PROGRAMS (0: always MAX_COLS).
# H100, BERT-base, same process: 1 x 128 at 2x / 4.8x 1-5% faster, 4 x 128 at 2x 2-3%; 8 x 128
# even at 48 and 1% slower at 2x with 256 (16-column chunks); 128 examples unchanged
# (docs/benchmarks.md, thirtieth session).
MIN_PROGRAMS = 48
# Above THRESHOLD_ROWS (padded) rows the kept rows are not ranked (T^2 comparisons in one
# program per example: at 1024 rows that made GPT-2's 1.5x program on an H200 twice as slow)
# but found by the keep-th highest score (eight passes over the scores) and scattered,
# ROW_TILE rows a program.
THRESHOLD_ROWS = 256
ROW_TILE = 128
# (num_warps, num_stages)
BLOCKS = (4, 1)


def _div_rn(a, b, interpret: bool):
    """a / b rounded as IEEE division (XLA's), where Triton's ``/`` on float32 is the
    approximate ``div.full.f32`` (up to 2 ulp): a score compared with XLA's must be its float."""
    if interpret:
        return a / b
    from jax.experimental.pallas import triton as plgpu

    return plgpu.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]


def _scores_fn(s_ref, m_ref, *, t: int, parts: int, protect_first: bool, causal_heads: int, interpret: bool):
    """``scores(start, size)`` -> (row indices, float32 scores) of rows [start, start + size):
    -inf past T; from the column sums unreduced (``parts`` > 0): their sum, -inf for padding
    (mask 0), +inf for rows marked protected (mask ``acc.PROTECTED``) and for row 0 when
    ``protect_first``; with ``causal_heads`` N > 0 (a decoder's causal attention) each sum
    divided by N x the number of real rows at or after it (the queries that see it), as
    ``acc._denominator`` does."""
    from jax.experimental.pallas import triton as plgpu

    from accjax.acc import protected_rows

    tp = s_ref.shape[-1]

    def load(ref, i, other):
        return ref[...] if t == tp else plgpu.load(ref, mask=i < t, other=other)

    def scores(start, size):
        i = start + jnp.arange(size, dtype=jnp.int32)
        if not parts:
            return i, load(s_ref.at[pl.ds(start, size)], i, -jnp.inf)
        # the partial sums added in one fixed order, so a row's score is the same float in
        # every chunk it is computed in (its rank compares it with itself)
        col = jax.lax.fori_loop(0, parts, lambda p, acc: acc + load(s_ref.at[p, pl.ds(start, size)], i, 0.0),
                                jnp.zeros((size,), jnp.float32))
        m = load(m_ref.at[pl.ds(start, size)], i, 0.0)
        real = m > 0.5
        if causal_heads:
            if size == tp:  # the whole example: a suffix count
                r = real.astype(jnp.int32)
                seen = jnp.sum(r) - jnp.cumsum(r) + r
            else:  # a chunk: counted against every row of the example
                k = jnp.arange(tp, dtype=jnp.int32)
                real_k = load(m_ref, k, 0.0) > 0.5
                seen = jnp.sum(((k[None, :] >= i[:, None]) & real_k[None, :]).astype(jnp.int32), axis=1)
            denom = causal_heads * jnp.maximum(seen, 1).astype(jnp.float32)
            col = _div_rn(col, denom, interpret)
        s = jnp.where(real, col, -jnp.inf)
        s = jnp.where(protected_rows(m), jnp.inf, s)
        if protect_first:
            s = jnp.where(real & (i == 0), jnp.inf, s)
        return i, s

    return scores


def _split_refs(refs, n_tensors: int, n_fields: int, parts: int):
    """(m_ref or None, tensor inputs, field inputs, idx output, tensor outputs, field outputs)."""
    m_ref = None
    if parts:
        m_ref, refs = refs[0], refs[1:]
    ins, fields, refs = refs[:n_tensors], refs[n_tensors:n_tensors + n_fields], refs[n_tensors + n_fields:]
    return m_ref, ins, fields, refs[0], refs[1:1 + n_tensors], refs[1 + n_tensors:]


def _keep_rows_kernel(s_ref, *refs, keep: int, t: int, n_tensors: int, n_fields: int, parts: int,
                      protect_first: bool, causal_heads: int, interpret: bool, scatter: bool):
    # s_ref [Tp] one example's scores (past T: masked), or with ``parts`` > 0 its column sums
    # unreduced [parts, Tp] followed by m_ref [Tp] (float, 1.0 = real row); refs: n_tensors
    # inputs [Tp, DC] (rows past T never read), n_fields inputs [Tp], idx [Kp], n_tensors
    # outputs [Kp, DC] and n_fields outputs [Kp] (rows past keep never written)
    from jax.experimental.pallas import triton as plgpu

    m_ref, ins, fields, idx_ref, outs, field_outs = _split_refs(refs, n_tensors, n_fields, parts)
    tp = s_ref.shape[-1]
    kp = idx_ref.shape[0]
    scores = _scores_fn(s_ref, m_ref, t=t, parts=parts, protect_first=protect_first, causal_heads=causal_heads,
                        interpret=interpret)

    j, s_j = scores(0, tp)
    rank = jnp.zeros((tp,), jnp.int32)
    chunk = min(RANK_CHUNK, tp)
    for start in range(0, tp, chunk):  # (tp <= THRESHOLD_ROWS: at most 256 / chunk chunks)
        i, s_i = (j, s_j) if chunk == tp else scores(start, chunk)
        beats = (s_i[:, None] > s_j[None, :]) | ((s_i[:, None] == s_j[None, :]) & (i[:, None] < j[None, :]))
        rank = rank + jnp.sum(beats.astype(jnp.int32), axis=0)
    # rows past T rank below every real row (-inf, higher index): never kept, as keep <= T
    kept = rank < keep
    so_far = jnp.cumsum(kept.astype(jnp.int32))  # [Tp]
    first = pl.program_id(1) == 0
    if scatter:
        # each kept row j goes to its place so_far_j - 1 (one load of the chunk, one scattered
        # store); rows not kept point past the output block and are never stored
        dest = jnp.where(kept, so_far - 1, kp)
        real = j < t

        @pl.when(first)
        def _():
            plgpu.store(idx_ref.at[dest], j, mask=kept)
            for f_ref, g_ref in zip(fields, field_outs):
                plgpu.store(g_ref.at[dest], plgpu.load(f_ref, mask=real), mask=kept)

        for x_ref, o_ref in zip(ins, outs):
            rows = plgpu.load(x_ref, mask=real[:, None])  # [Tp, DC]
            cols = jnp.arange(rows.shape[1], dtype=jnp.int32)
            plgpu.store(o_ref.at[dest[:, None], cols[None, :]], rows, mask=kept[:, None])
        return
    for start in range(0, kp, min(OUT_CHUNK, kp)):
        size = min(OUT_CHUNK, kp)
        r = start + jnp.arange(size, dtype=jnp.int32)
        idx = jnp.sum((so_far[None, :] <= r[:, None]).astype(jnp.int32), axis=1)  # [size]
        live = r < keep
        idx = jnp.where(live, idx, 0)  # rows past keep: a valid row, never stored

        @pl.when(first)
        def _():
            plgpu.store(idx_ref.at[pl.ds(start, size)], idx, mask=live)
            for f_ref, g_ref in zip(fields, field_outs):
                plgpu.store(g_ref.at[pl.ds(start, size)], f_ref[idx], mask=live)

        for x_ref, o_ref in zip(ins, outs):
            plgpu.store(o_ref.at[pl.ds(start, size), :], x_ref[idx, :], mask=live[:, None])


def _order_key(s):
    """float32 -> int32 in the same order (for scores without NaN; -0.0 below 0.0, as
    ``lax.top_k`` orders them)."""
    i = jax.lax.bitcast_convert_type(s, jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)  # negative floats: larger magnitude, smaller key


def _threshold_kernel(s_ref, *refs, keep: int, t: int, n_tensors: int, n_fields: int, parts: int,
                      protect_first: bool, causal_heads: int, interpret: bool, row_tile: int):
    # refs as ``_keep_rows_kernel``'s; the grid is (example, row tile, column chunk): a program
    # finds the example's kept rows without ranking them and scatters its own row tile's.
    from jax.experimental.pallas import triton as plgpu

    m_ref, ins, fields, idx_ref, outs, field_outs = _split_refs(refs, n_tensors, n_fields, parts)
    tp = s_ref.shape[-1]
    scores = _scores_fn(s_ref, m_ref, t=t, parts=parts, protect_first=protect_first, causal_heads=causal_heads,
                        interpret=interpret)
    j, s_j = scores(0, tp)
    key = _order_key(s_j)  # [Tp]; rows past T -inf: the lowest keys

    # v = the keep-th highest key, 4 bits a step from the top: after each step at least keep
    # keys are >= v, and fewer than keep are >= v + 2^b (b: the step's lowest bit). Every
    # candidate fits in int32 (v + 16 * 2^b <= 2^31 throughout).
    m = jnp.arange(16, dtype=jnp.int32)

    def digit(cands):  # the largest m whose candidate still has keep keys at or above it
        n_at_least = jnp.sum((key[None, :] >= cands[:, None]).astype(jnp.int32), axis=1)  # [16]
        return jnp.sum((n_at_least >= keep).astype(jnp.int32)) - 1

    v = (digit((m - 8) * (1 << 28)) - 8) * (1 << 28)  # bits 31-28: -2^31 + m * 2^28
    for b in range(24, -1, -4):
        v = v + digit(v + m * (1 << b)) * (1 << b)
    # kept: keys above v, and of the keys equal to v the first (keep - #above) by index
    need = keep - jnp.sum((key > v).astype(jnp.int32))
    tie = key == v
    kept = (key > v) | (tie & (jnp.cumsum(tie.astype(jnp.int32)) <= need))  # [Tp]

    # this program's rows [r0, r0 + row_tile): the same decision, and each kept row's place
    # among the kept rows of the example
    r0 = pl.program_id(1) * row_tile
    i, s_i = scores(r0, row_tile)
    key_i = _order_key(s_i)
    before = j < r0
    tie_i = key_i == v
    ties_before = jnp.sum((before & tie).astype(jnp.int32))
    kept_i = (key_i > v) | (tie_i & (ties_before + jnp.cumsum(tie_i.astype(jnp.int32)) <= need))
    dest = jnp.sum((before & kept).astype(jnp.int32)) + jnp.cumsum(kept_i.astype(jnp.int32)) - 1
    # rows not kept: past the output block, never stored (the interpreter drops such writes;
    # a place they shared with a kept row would race with it there)
    dest = jnp.where(kept_i, dest, idx_ref.shape[0])
    real = i < t

    @pl.when(pl.program_id(2) == 0)
    def _():
        plgpu.store(idx_ref.at[dest], i, mask=kept_i)
        for f_ref, g_ref in zip(fields, field_outs):
            plgpu.store(g_ref.at[dest], plgpu.load(f_ref.at[pl.ds(r0, row_tile)], mask=real), mask=kept_i)

    for x_ref, o_ref in zip(ins, outs):
        rows = plgpu.load(x_ref.at[pl.ds(r0, row_tile), :], mask=real[:, None])
        # indexed by arrays in both dimensions: the interpreter stores through no other mix
        cols = jnp.arange(rows.shape[1], dtype=jnp.int32)
        plgpu.store(o_ref.at[dest[:, None], cols[None, :]], rows, mask=kept_i[:, None])


def _col_chunk(d: int, programs: int = 0) -> int:
    """The largest power of two >= 16 and <= MAX_COLS dividing d (0: none), halved while
    ``programs`` (the grid's other axes: examples x row tiles) times d / chunk is below
    ``MIN_PROGRAMS``, down to 16. Examples (48): d = 768 -> 16 at 1 example, 64 at 4, 128 at
    8, 256 from 16 on."""
    c = MAX_COLS
    while c >= 16 and d % c:
        c //= 2
    if c < 16:
        return 0
    while c > 16 and programs * (d // c) < MIN_PROGRAMS:
        c //= 2  # (still divides d: c was a power of two dividing it)
    return c


def fits(t: int, tensors) -> bool:
    """Whether rows [B, t] and these [B, t, ...] tensors can run the kernel: at most
    ``MAX_ROWS`` rows or at least ``LARGE_MIN_ROWS`` (and above ``THRESHOLD_ROWS``), every
    tensor with the same number of columns (trailing dims flattened), a multiple of 16."""
    cols = {math.prod(x.shape[2:]) for x in tensors}
    rows_ok = t <= MAX_ROWS or (LARGE_MIN_ROWS is not None and t >= max(LARGE_MIN_ROWS, THRESHOLD_ROWS + 1))
    return rows_ok and len(cols) <= 1 and all(_col_chunk(c) for c in cols)


@functools.partial(jax.jit, static_argnames=("keep", "interpret", "blocks", "protect_first", "causal_heads"))
def select_and_gather_rows(scores, tensors, *, keep: int, interpret: bool = False,
                           blocks: tuple[int, int] | None = None, mask=None,
                           protect_first: bool = False, fields=(), causal_heads: int = 0):
    """(idx [B, keep] int32, [each tensor's rows idx]) for scores [B, T] and tensors
    [B, T, ...] (``fits``): ``acc.select_rows(scores, keep)`` and ``acc.take_rows``. Each of
    ``fields`` ([B, T], 32-bit: a mask, positions) is gathered too and its [B, keep] rows
    follow the tensors' in the list.

    With ``mask`` [B, T] (float: 0 padding, 1 a real row, ``acc.PROTECTED`` a real row never
    dropped) ``scores`` are the fused attention kernel's column sums unreduced, [B, P, >= T]
    (``acc_pallas.packed_attention_with_column_sums`` with ``parts``): a row's score is then
    the sum of its P parts, -inf where the mask is 0, and +inf where it is ``PROTECTED`` and
    for row 0 when ``protect_first`` (BERT's CLS). That is ACC up to its normaliser, one
    positive number per example (``acc.ColumnSums``), so the rows kept are ACC's. With
    ``causal_heads`` N > 0 (a decoder's causal attention, whose normaliser differs per row)
    the sum is divided by it, N x the real rows at or after the row: ACC itself. XLA's sum of
    the parts, its normaliser and its division are not made at all."""
    b, t = scores.shape[0], scores.shape[-1] if mask is None else mask.shape[1]
    if not 1 <= keep <= t or not fits(t, tensors):
        raise ValueError(f"cannot select {keep} of {t} rows from {[x.shape for x in tensors]} here")
    tp, kp = _pow2(t), _pow2(keep)
    flat = [x.reshape(b, t, -1) for x in tensors]
    d = flat[0].shape[2] if flat else 16
    rt = min(ROW_TILE, tp)
    dc = _col_chunk(d, b * (tp // rt if tp > THRESHOLD_ROWS else 1))
    num_warps, num_stages = blocks or BLOCKS
    n_parts = 0 if mask is None else scores.shape[1]
    if n_parts and scores.shape[2] < t:
        raise ValueError(f"column sums {scores.shape} do not cover the {t} rows")
    fields = list(fields)
    if any(f.shape != (b, t) or f.dtype.itemsize != 4 for f in fields):
        raise ValueError(f"fields must be [{b}, {t}] 32-bit arrays, got {[(f.shape, f.dtype) for f in fields]}")
    if causal_heads and not n_parts:
        raise ValueError("causal_heads divides column sums: give them with their mask")
    common = dict(keep=keep, t=t, n_tensors=len(flat), n_fields=len(fields), parts=n_parts,
                  protect_first=protect_first, causal_heads=causal_heads, interpret=interpret)
    if tp > THRESHOLD_ROWS:  # (example, row tile, column chunk)
        kernel = functools.partial(_threshold_kernel, row_tile=rt, **common)
        grid = (b, tp // rt, d // dc)

        def spec(shape, cols=False):
            return pl.BlockSpec((None,) + shape, lambda i, r, c: (i,) + (0,) * (len(shape) - cols) + ((c,) if cols else ()))
    else:  # (example, column chunk)
        kernel = functools.partial(_keep_rows_kernel, scatter=b * (d // dc) <= SCATTER_MAX_PROGRAMS, **common)
        grid = (b, d // dc)

        def spec(shape, cols=False):
            return pl.BlockSpec((None,) + shape, lambda i, c: (i,) + (0,) * (len(shape) - cols) + ((c,) if cols else ()))
    out_shape = [jax.ShapeDtypeStruct((b, keep), jnp.int32)] + [
        jax.ShapeDtypeStruct((b, keep, d), x.dtype) for x in flat] + [
        jax.ShapeDtypeStruct((b, keep), f.dtype) for f in fields]
    if n_parts:
        head = [spec((n_parts, tp)), spec((tp,))]
        head_args = [scores.astype(jnp.float32), mask.astype(jnp.float32)]
    else:
        head = [spec((tp,))]
        head_args = [scores.astype(jnp.float32)]
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=head + [spec((tp, dc), cols=True) for _ in flat] + [spec((tp,)) for _ in fields],
        out_specs=[spec((kp,))] + [spec((kp, dc), cols=True) for _ in flat] + [spec((kp,)) for _ in fields],
        interpret=interpret,
        **_triton_params(interpret, num_warps, num_stages),
    )(*head_args, *flat, *fields)
    idx, rows, gathered = out[0], out[1:1 + len(flat)], out[1 + len(flat):]
    return idx, [r.reshape((b, keep) + x.shape[2:]) for r, x in zip(rows, tensors)] + list(gathered)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 5, 7))
def select_and_gather(scores, tensors, keep: int, interpret: bool, mask=None, protect_first: bool = False,
                      fields=(), causal_heads: int = 0):
    """``select_and_gather_rows``, differentiable in the tensors (the transpose of the gather,
    a scatter-add; no gradient to the scores, the mask or the fields); split along the batch
    axis under SPMD. Returns (idx, [tensors' rows], [fields' rows])."""
    return _partitioned(scores, tensors, keep, interpret, mask, protect_first, fields, causal_heads)


def _partitioned(scores, tensors, keep: int, interpret: bool, mask, protect_first: bool, fields,
                 causal_heads: int):
    from accjax import sharding

    n, fields = len(tensors), list(fields)

    def call(s, m, *xs):
        idx, rows = select_and_gather_rows(s, list(xs[:n]), keep=keep, interpret=interpret, mask=m,
                                           protect_first=protect_first, fields=xs[n:], causal_heads=causal_heads)
        return (idx, *rows)

    out = sharding.batch_partitioned(("keep_rows", keep, n, len(fields), interpret, protect_first, causal_heads),
                                     call, (scores, mask, *tensors, *fields), (1,) * (n + len(fields) + 2))
    return out[0], list(out[1:1 + n]), list(out[1 + n:])


def _fwd(scores, tensors, keep, interpret, mask, protect_first, fields, causal_heads):
    idx, rows, gathered = _partitioned(scores, tensors, keep, interpret, mask, protect_first, fields, causal_heads)
    return (idx, rows, gathered), (idx, scores, mask, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in tensors],
                                   list(fields))


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _bwd(keep, interpret, protect_first, causal_heads, res, g):
    idx, scores, mask, shapes, fields = res
    _, g_rows, _ = g
    b = jnp.arange(idx.shape[0])[:, None]
    grads = [jnp.zeros(sd.shape, sd.dtype).at[b, idx].add(gr.astype(sd.dtype)) for sd, gr in zip(shapes, g_rows)]
    return (jnp.zeros_like(scores), grads, None if mask is None else jnp.zeros_like(mask),
            [_zero_cotangent(f) for f in fields])


select_and_gather.defvjp(_fwd, _bwd)


_AVAILABLE: dict[str, bool] = {}


def _probe(interpret: bool = False) -> bool:
    """The kernel against numpy on 3 examples of 40 rows with ties and -inf (bf16 rows), and
    on a decoder's causal column sums (a protected row marked in the mask, each sum divided
    by the heads times the real rows at or after it); compiled ahead and checked with numpy,
    so it runs inside a trace too."""
    rng = np.random.default_rng(0)
    s = np.round(rng.standard_normal((3, 40)), 1).astype(np.float32)  # ties
    s[:, 30:] = -np.inf
    x = rng.standard_normal((3, 40, 48)).astype(jnp.bfloat16)
    keep = 13

    def expected(scores):  # ties: the lower index first; kept rows in their order
        ref_idx = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :keep], axis=1)
        return ref_idx, np.take_along_axis(x.astype(np.float32), ref_idx[:, :, None], axis=1)

    def same(out, scores):
        (idx, (got,)), (ref_idx, ref) = out, expected(scores)
        return np.array_equal(np.asarray(idx), ref_idx) and np.array_equal(np.asarray(got, np.float32), ref)

    ok = same(select_and_gather_rows.lower(s, [x], keep=keep, interpret=interpret).compile()(s, [x]), s)
    heads = 4
    parts = rng.integers(0, 5, (3, 6, 64)).astype(np.float32)
    mask = (np.arange(40)[None] < np.array([[40], [30], [21]])).astype(np.float32)
    mask[np.arange(3), [39, 3, 20]] = 2.0  # (acc.PROTECTED)
    real = mask > 0.5
    seen = np.cumsum(real[:, ::-1], axis=1)[:, ::-1]
    acc = parts[:, :, :40].sum(1) / (heads * np.maximum(seen, 1)).astype(np.float32)
    acc = np.where(mask > 1.5, np.inf, np.where(real, acc, -np.inf)).astype(np.float32)
    causal = select_and_gather_rows.lower(parts, [x], keep=keep, interpret=interpret, mask=mask,
                                          causal_heads=heads).compile()(parts, [x], mask=mask)
    return bool(ok and same(causal, acc))


def applies(t: int, tensors=()) -> bool:
    """Whether selecting among ``t`` rows (and gathering ``tensors``) runs this kernel
    (``KERNEL``; 'auto': a GPU where the probe passes; ``fits``)."""
    return fits(t, tensors) and runs_here(KERNEL, _AVAILABLE, _probe)
