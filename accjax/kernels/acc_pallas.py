"""ACC column sums in Pallas (Triton) kernels: softmax probabilities never reach memory.

``column_sums_from_lse`` (used on GPUs): flash attention already computed each query's
float32 log-sum-exp; one kernel per (batch, head, key block) recomputes
``exp(scale q_i.k_j - lse_i)`` tile by tile and sums it over valid queries. T5's relative
position bias enters as a vector by distance, ``rel_bias[n, pos_j - pos_i + P - 1]`` over the
rows' original positions, gathered per tile (no [T, S] bias in memory).

``attention_by_distance``: flash attention (forward) reading that same bias vector, with the
log-sum-exp the second pass needs; T5's eliminated layers run it instead of cuDNN, which would
need the bias written out per example as [B, N, T, T].

``column_sums`` (below): a self-contained variant that computes the softmax itself, one
program per (batch, head) holding all keys; simpler, but its [BQ, S] tile spills registers
for S >= 256 on an H100 (measured slower than the log-sum-exp path there), so it is kept for
short sequences and as the reference the tests compare against.

For each (batch b, head n) one program holds K [S, H] and walks over blocks of BQ queries:

    s   = scale * q_blk K^T                      [BQ, S] float32, in registers
    s   = where(key valid (and j <= i if causal), s, -1e30)
    p   = exp(s - rowmax) / rowsum               exact float32 softmax of each query row
    col += sum over valid queries of p           [S]

and writes ``col`` [S]. Summed over heads and normalised (``accjax.acc``), that is plain ACC,
equal to ``acc_scores(probs, ...)`` up to float32 rounding. Costs 2*T*S*H FLOPs a head (one
QK^T) and reads q and k once; the XLA alternatives write [B, N, T, S] logits (or
probabilities) to memory and read them back, which dominates at T = S = 512.

Shapes are padded to powers of two (>= 16, Triton's dot minimum) outside the kernel; padded
rows are masked. On machines without a GPU the same kernel runs in Pallas' interpreter
(``interpret=True``), which is how the tests check it on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

NEG = -1e30
LOG2E = 1.4426950408889634  # the second pass works in base 2: exp(x) = exp2(x * log2(e))


def _triton_params(interpret: bool, num_warps: int, num_stages: int) -> dict:
    """``pallas_call`` keyword arguments of a Triton kernel (none for the interpreter)."""
    if interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu

    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


# Launch order of the fused attention kernel's (example, head, query block) grid. CUDA starts
# a grid's programs x-first and Pallas maps the grid's first axis to x. "example": the grid is
# (example, head, block), so programs launched together read different examples, and the
# query blocks of one (example, head) run a whole batch of programs apart, each fetching the
# same keys and values from memory. "block": the grid is (block, head, example): the query
# blocks of one (example, head) run side by side (keys and values read once, then from L2),
# then the heads of one example, whose rows are adjacent in memory.
GRID_ORDER = "block"


def _grid(b: int, n: int, c: int, order: str):
    """(grid, ``at``, the grid axis of the block) of an (example, head, block) grid launched
    in ``order``; ``at(specs)`` turns BlockSpecs whose index maps take (example, head, block)
    into ones that take the grid's own order."""
    if order == "example":
        return (b, n, c), (lambda specs: specs), 2
    if order != "block":
        raise ValueError(f"grid order must be 'example' or 'block', got {order!r}")

    def at(specs):
        return [dataclasses.replace(x, index_map=lambda cc, j, i, f=x.index_map: f(i, j, cc))
                for x in specs]

    return (c, n, b), at, 0


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (int(n) - 1).bit_length())


def _per_example(key, fn, args, batched):
    """``fn(*args)`` split along the batch axis under SPMD (``sharding.batch_partitioned``):
    every kernel here is independent per example."""
    from accjax import sharding

    return sharding.batch_partitioned(key, fn, args, batched)


def _kernel(qm_ref, km_ref, q_ref, k_ref, o_ref, *, scale: float, block_q: int, causal: bool):
    # refs (batch and head squeezed): qm [Tp], km [Sp], q [Tp, H], k [Sp, H], o [Sp]
    t_pad = q_ref.shape[0]
    s_pad = k_ref.shape[0]
    k = k_ref[...]  # [Sp, H]
    key_ok = km_ref[...] != 0  # [Sp]
    cols = jnp.arange(s_pad, dtype=jnp.int32)

    def body(i, acc):
        start = i * block_q
        q = q_ref[pl.ds(start, block_q), :]  # [BQ, H]
        q_ok = qm_ref[pl.ds(start, block_q)] != 0  # [BQ]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale  # [BQ, Sp]
        ok = key_ok[None, :]
        if causal:
            rows = start + jnp.arange(block_q, dtype=jnp.int32)
            ok = ok & (cols[None, :] <= rows[:, None])
        s = jnp.where(ok, s, NEG)
        m = jnp.max(s, axis=1)
        p = jnp.exp(s - m[:, None])
        p = p / jnp.sum(p, axis=1)[:, None]  # [BQ, Sp] softmax rows
        p = jnp.where(q_ok[:, None] & ok, p, 0.0)
        return acc + jnp.sum(p, axis=0)

    acc = jax.lax.fori_loop(0, t_pad // block_q, body, jnp.zeros((s_pad,), jnp.float32))
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("scale", "causal", "interpret", "block_q"))
def column_sums(q, k, query_mask, key_mask, *, scale: float, causal: bool = False,
                interpret: bool = False, block_q: int | None = None):
    """Per-head softmax column sums over valid queries.

    Args:
      q: [B, T, N, H]; k: [B, S, N, H]; query_mask [B, T], key_mask [B, S] bool.
      causal: key j visible to query i only if j <= i (requires T == S).
    Returns:
      [B, N, S] float32: sum over valid queries i of P[b, n, i, j].
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    if causal and t != s:
        raise ValueError("causal column sums need T == S")
    tp, sp = _pow2(t), _pow2(s)
    hp = max(16, -(-h // 16) * 16)
    if block_q is None:
        # keep the [BQ, Sp] float32 tile at <= 32K elements (registers of 4-8 warps)
        block_q = max(16, min(tp, 32768 // sp))
    qt = jnp.pad(jnp.swapaxes(q, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, hp - h)))  # [B, N, Tp, Hp]
    kt = jnp.pad(jnp.swapaxes(k, 1, 2), ((0, 0), (0, 0), (0, sp - s), (0, hp - h)))  # [B, N, Sp, Hp]
    qm = jnp.pad(query_mask.astype(jnp.int32), ((0, 0), (0, tp - t)))  # [B, Tp]
    km = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, sp - s)))  # [B, Sp]
    kernel = functools.partial(_kernel, scale=scale, block_q=block_q, causal=causal)
    params = _triton_params(interpret, 4 if sp <= 128 else 8, 1)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, n, sp), jnp.float32),
        grid=(b, n),
        in_specs=[
            pl.BlockSpec((None, tp), lambda i, j: (i, 0)),
            pl.BlockSpec((None, sp), lambda i, j: (i, 0)),
            pl.BlockSpec((None, None, tp, hp), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, sp, hp), lambda i, j: (i, j, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, sp), lambda i, j: (i, j, 0)),
        interpret=interpret,
        **params,
    )(qm, km, qt, kt)
    return out[:, :, :s]


def _lse_kernel(lse_ref, q_ref, k_ref, *rest, scale: float, block_q: int, causal: bool,
                block_k: int, rel_offset: int | None, t: int, s: int):
    # refs (batch, head squeezed): lse [Tp] (log2 units; +inf-like for padding queries),
    # q [Tp, H], k [BK, H] (this program's key block), then with a relative bias: q positions
    # [Tp], k positions [BK], bias by distance [R]; o [BK]. q and k are not padded: their
    # blocks overhang T and S, and rows past the end are masked on load (q past T then meets
    # a padding query's huge log-sum-exp; keys past S are zeroed by the caller).
    if rel_offset is None:
        (o_ref,) = rest
    else:
        qp_ref, kp_ref, rb_ref, o_ref = rest
    t_pad = q_ref.shape[0]
    kb = pl.program_id(2)
    cols = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
    k = _masked_load(k_ref, cols < s if s % block_k else None)  # [BK, H]
    k_pos = None if rel_offset is None else kp_ref[...]  # [BK] original positions

    def body(i, acc):
        start = i * block_q
        rows = start + jnp.arange(block_q, dtype=jnp.int32)
        q = _masked_load(q_ref.at[pl.ds(start, block_q), :], rows < t if t % block_q else None)  # [BQ, H]
        lse = lse_ref[pl.ds(start, block_q)]  # [BQ] float32, already times log2(e)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * (scale * LOG2E)  # [BQ, BK]
        if rel_offset is not None:
            # T5's bias depends only on key position - query position: one gathered load
            # from a [R] vector per head (L1-resident), never a [T, S] bias in memory.
            q_pos = qp_ref[pl.ds(start, block_q)]  # [BQ]
            s = s + rb_ref[k_pos[None, :] - q_pos[:, None] + rel_offset]  # (times log2(e))
        p = jnp.exp2(s - lse[:, None])  # softmax probabilities; 0 for padding queries
        if causal:
            p = jnp.where(cols[None, :] <= rows[:, None], p, 0.0)
        return acc + p

    # Accumulate the [BQ, BK] tile in registers and reduce over queries once at the end: a
    # column sum inside the loop is a cross-warp reduction through shared memory per block.
    # Padding keys are zeroed by the caller. Causal: query blocks that end before this key
    # block's first column see none of it, so the walk starts at the block holding row kb * BK.
    first = (kb * block_k) // block_q if causal else 0
    acc = jax.lax.fori_loop(first, t_pad // block_q, body, jnp.zeros((block_q, block_k), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=0)


# (block_q, block_k, num_warps, num_stages) of the second pass: the fastest of eight tilings
# summed over GPT-2, T5 and BERT shapes on an H200 (docs/benchmarks.md, issue 17).
LSE_BLOCKS = (64, 64, 4, 2)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "interpret", "blocks"))
def column_sums_from_lse(q, k, lse, query_mask, key_mask, *, scale: float, causal: bool = False,
                         interpret: bool = False, rel_bias=None, positions=None,
                         blocks: tuple[int, int, int, int] | None = None):
    """Per-head softmax column sums given each query's log-sum-exp (from flash attention).

    Grid (batch, head, key block): each program keeps its [BK, H] keys and walks the query
    blocks, accumulating the [BQ, BK] float32 probabilities in registers (the loop structure
    of flash attention's dK pass, without dV). q and k are read in their [B, T, N, H] layout
    (no transposes) and not padded: blocks overhang T and S and are masked on load.

    Args:
      q: [B, T, N, H]; k: [B, S, N, H]; lse: [B, N, T] float32 log-sum-exp of the masked,
        scaled (and biased) logits; masks [B, T] / [B, S] bool.
      rel_bias: optional [N, 2P - 1] logits bias by relative position (T5): entry
        ``r + P - 1`` is added for key position - query position = r. Needs ``positions``
        [B, T] int (self-attention, T == S): each row's ORIGINAL position in [0, P).
      blocks: (block_q, block_k, num_warps, num_stages); None: ``LSE_BLOCKS``.
    Returns:
      [B, N, S] float32: sum over valid queries i of exp(scale q_i.k_j (+ bias) - lse_i).
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    if causal and t != s:
        raise ValueError("causal column sums need T == S")
    if (rel_bias is None) != (positions is None) or (rel_bias is not None and t != s):
        raise ValueError("a relative bias needs positions, and self-attention (T == S)")
    block_q, block_k, num_warps, num_stages = blocks or LSE_BLOCKS
    block_q, block_k = min(block_q, _pow2(t)), min(block_k, _pow2(s))
    tp, sp, hp = _round_up(t, block_q), _round_up(s, block_k), max(16, _round_up(h, 16))
    if hp != h:  # head sizes Triton cannot tile are padded (copies); rows are not: their
        # blocks overhang and are masked in the kernel (a pad of q and k cost ~10 us an
        # eliminating GPT-2 layer at 8 x 784 on an H200)
        q, k = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, hp - h))) for x in (q, k))
    # padding queries get a huge log-sum-exp, so their probabilities are exactly 0 in-kernel
    lse = jnp.where(query_mask[:, None, :], lse.astype(jnp.float32) * LOG2E, 1e30)
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, tp - t)), constant_values=1e30)  # [B, N, Tp]
    args = [lse, q, k]
    in_specs = [
        pl.BlockSpec((None, None, tp), lambda i, j, c: (i, j, 0)),
        pl.BlockSpec((None, tp, None, hp), lambda i, j, c: (i, 0, j, 0)),
        pl.BlockSpec((None, block_k, None, hp), lambda i, j, c: (i, c, j, 0)),
    ]
    rel_offset = None
    if rel_bias is not None:
        r = rel_bias.shape[1]
        rel_offset = (r - 1) // 2
        rp = _pow2(r)
        # padded rows get position 0: their distances stay inside the vector (and are masked)
        pos = jnp.pad(positions.astype(jnp.int32), ((0, 0), (0, max(tp, sp) - t)))  # [B, max]
        bias = jnp.pad(rel_bias.astype(jnp.float32) * LOG2E, ((0, 0), (0, rp - r)))  # [N, Rp]
        args += [pos[:, :tp], pos[:, :sp], bias]
        in_specs += [
            pl.BlockSpec((None, tp), lambda i, j, c: (i, 0)),
            pl.BlockSpec((None, block_k), lambda i, j, c: (i, c)),
            pl.BlockSpec((None, rp), lambda i, j, c: (j, 0)),
        ]
    kernel = functools.partial(_lse_kernel, scale=scale, block_q=block_q, causal=causal,
                               block_k=block_k, rel_offset=rel_offset, t=t, s=s)
    params = _triton_params(interpret, num_warps, num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, n, sp), jnp.float32),
        grid=(b, n, sp // block_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, block_k), lambda i, j, c: (i, j, c)),
        interpret=interpret,
        **params,
    )(*args)
    return jnp.where(key_mask[:, None, :], out[:, :, :s], 0.0)


def _masked_load(ref, mask):
    """``ref[...]``, or where ``mask`` (broadcast over trailing dims) is False, zero: the
    block overhangs its array (rows not a whole number of tiles), and Triton must not read
    past the end."""
    if mask is None:
        return ref[...]
    from jax.experimental.pallas import triton as plgpu

    return plgpu.load(ref, mask=mask.reshape(mask.shape + (1,) * (len(ref.shape) - mask.ndim)), other=0)


def _attn_kernel(qm_ref, km_ref, q_ref, k_ref, v_ref, *rest, scale: float, causal: bool,
                 block_q: int, key_tiles: tuple[int, ...], n_kb: int, t: int, s: int, biased: bool,
                 columns: bool, block_axis: int):
    # refs (batch, head squeezed; this program's query block): qm [BQ], km [Sp] (int masks),
    # q [BQ, H], k [Sp, H], v [Sp, H]; with ``biased`` the q/k/v biases [H] each; outputs
    # o [BQ, H] (context) and, with ``columns``, col [Sp] (this block's column sums). Blocks
    # may overhang T and S (rows are not padded outside): overhanging rows are masked on load
    # and store. Keys: ``n_kb`` == 1: every key in one pass, over the static tiles
    # ``key_tiles`` (powers of two, largest first: 72 keys are 64 + 16, not 128); n_kb > 1:
    # n_kb tiles of ``key_tiles[0]`` keys in a loop.
    bq_ref = bk_ref = bv_ref = col_ref = None
    if biased:
        bq_ref, bk_ref, bv_ref, *rest = rest
    o_ref, *rest = rest
    if columns:
        (col_ref,) = rest
    qb = pl.program_id(block_axis)
    rows = qb * block_q + jnp.arange(block_q, dtype=jnp.int32)
    row_in = rows < t if t % block_q else None
    q = _masked_load(q_ref, row_in)  # [BQ, H]
    q_ok = _masked_load(qm_ref, row_in) != 0  # [BQ]
    if biased:
        q = (q.astype(jnp.float32) + bq_ref[...].astype(jnp.float32)[None, :]).astype(q.dtype)

    block_k = key_tiles[0]

    def past_s(start, size):
        """Whether keys [start, start + size) may reach past S (static where start is)."""
        return start + size > s if isinstance(start, int) else s % size != 0

    def tile(ref, start, size, bias_ref):
        """Rows [start, start + size) of k or v, masked past S, plus the bias (in float32,
        rounded to the input dtype as XLA's bias add of the unfused layer rounds)."""
        cols = start + jnp.arange(size, dtype=jnp.int32)
        x = _masked_load(ref.at[pl.ds(start, size), :], cols < s if past_s(start, size) else None)
        if biased:
            x = (x.astype(jnp.float32) + bias_ref[...].astype(jnp.float32)[None, :]).astype(x.dtype)
        return x

    def logits(start, size):
        k = tile(k_ref, start, size, bk_ref)  # [BK, H]
        s_ = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # [BQ, BK]
        cols = start + jnp.arange(size, dtype=jnp.int32)
        km = _masked_load(km_ref.at[pl.ds(start, size)], cols < s if past_s(start, size) else None)
        ok = (km != 0)[None, :]  # [1, BK] (0 past S)
        if causal:
            ok = ok & (cols[None, :] <= rows[:, None])  # [BQ, BK]
        return jnp.where(ok, s_, NEG), ok

    def context_and_columns(start, size, p, ok):
        # p [BQ, BK]: final softmax probabilities of this key block (or, without columns,
        # the online softmax's unnormalised ones)
        v = tile(v_ref, start, size, bv_ref)  # [BK, H]
        if columns:
            col_ref[pl.ds(start, size)] = jnp.sum(jnp.where(q_ok[:, None] & ok, p, 0.0), axis=0)
        return jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)  # [BQ, H]

    def store(acc):
        if row_in is None:
            o_ref[...] = acc.astype(o_ref.dtype)
        else:
            from jax.experimental.pallas import triton as plgpu

            plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=row_in[:, None])

    if n_kb == 1:
        # every key in registers: the exact softmax in one pass, over one or two tiles
        starts = [sum(key_tiles[:i]) for i in range(len(key_tiles))]
        tiles = [logits(start, size) for start, size in zip(starts, key_tiles)]
        m = functools.reduce(jnp.maximum, [jnp.max(s_, axis=1) for s_, _ in tiles])
        es = [jnp.exp(s_ - m[:, None]) for s_, _ in tiles]  # 0 at masked keys
        # normalised once per row, not per probability: the column sums weigh each row's
        # exponentials by its 1 / l (0 for padding queries), the context is scaled at the end
        inv_l = 1.0 / functools.reduce(jnp.add, [jnp.sum(e, axis=1) for e in es])
        w = jnp.where(q_ok, inv_l, 0.0)[:, None]  # [BQ, 1]
        acc = None
        for start, size, e, (_, ok) in zip(starts, key_tiles, es, tiles):
            v = tile(v_ref, start, size, bv_ref)  # [BK, H]
            if columns:  # (a row with every key masked has e = 1 there: kept out)
                col_ref[pl.ds(start, size)] = jnp.sum(jnp.where(ok, e, 0.0) * w, axis=0)
            part = jax.lax.dot_general(e.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)  # [BQ, H]
            acc = part if acc is None else acc + part
        store(acc * inv_l[:, None])
        return

    if not columns:
        # attention alone: flash attention's online softmax, one pass over the key tiles
        def online(kb, carry):
            m, l, acc = carry
            s_, ok = logits(kb * block_k, block_k)
            m_new = jnp.maximum(m, jnp.max(s_, axis=1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s_ - m_new[:, None])
            return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + context_and_columns(
                kb * block_k, block_k, p, ok)

        _, l, acc = jax.lax.fori_loop(0, n_kb, online, (
            jnp.full((block_q,), NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, q.shape[1]), jnp.float32)))
        store(acc / l[:, None])
        return

    # Several key tiles. A column sum needs each row's FINAL normaliser, which online softmax
    # only knows after the last tile, so: pass 1 the row statistics (max, sum), pass 2 the
    # probabilities once, feeding both the context and the column sums (the structure of flash
    # attention's backward dK sweep, with the forward's output added to it).
    def stats(kb, carry):
        m, l = carry
        s_, _ = logits(kb * block_k, block_k)
        m_new = jnp.maximum(m, jnp.max(s_, axis=1))
        l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s_ - m_new[:, None]), axis=1)
        return m_new, l

    m, l = jax.lax.fori_loop(0, n_kb, stats, (jnp.full((block_q,), NEG, jnp.float32),
                                             jnp.zeros((block_q,), jnp.float32)))
    inv_l = 1.0 / l

    def sweep(kb, acc):
        s_, ok = logits(kb * block_k, block_k)
        p = jnp.exp(s_ - m[:, None]) * inv_l[:, None]
        return acc + context_and_columns(kb * block_k, block_k, p, ok)

    store(jax.lax.fori_loop(0, n_kb, sweep, jnp.zeros((block_q, q.shape[1]), jnp.float32)))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# (largest query tile, num_warps, num_stages) of the fused attention kernel, with or without
# the column sums; a 16-row query tile (16 keys or fewer) runs on one warp. In the "block"
# grid order, the fastest of ten tilings or within 4% of it at every measured shape but one
# (H200, BERT-base heads, kernel alone: at B = 128, 128 keys with column sums 64.5 us, attention
# alone 51.8; 16 keys 4.8 us on one warp against 7.7 on four; at B = 32, 512 keys alone 154
# against 254 us for the former 128-row, 8-warp tiles of attention alone; docs/benchmarks.md).
FUSED_BLOCKS = (64, 4, 2)


def key_tiles(s: int) -> tuple[int, ...]:
    """The key tiles of one pass over ``s`` <= 256 keys with column sums (Triton tiles are
    powers of two of >= 16): up to 128 keys one tile, or two (a + b with b <= a / 4) where
    that covers far fewer padded keys (65-80 keys as 64 + 16 rather than 128); 129-256 keys
    as 128 + a power of two, one pass instead of two over tiles of 128. Measured on an H200
    (BERT-base heads): at B = 128, 72 keys 46 against 61 us, while a smaller saving does not
    pay for the second tile's products (88 keys as 64 + 32: 61 against 62.5 us; 40 as 32 +
    16: 15.5 against 15.0), nor does attention alone gain (72: 38 against 36 us); at B = 32,
    144 keys 40 against 69 us, 176 42 against 72, 248 86 against 90 (docs/benchmarks.md)."""
    if s > 128:
        return 128, _pow2(s - 128)
    one = _pow2(s)
    a = one // 2
    if a >= 16 and s > a and 4 * _pow2(s - a) <= a:
        return a, _pow2(s - a)
    return (one,)


def attention_blocks(t: int, s: int, max_block_q: int | None = None,
                     columns: bool = True) -> tuple[int, tuple[int, ...], int, int]:
    """(block_q, key tiles, padded T, padded S) of ``attention_with_column_sums``: the keys
    in one pass (up to 128 in one tile; with ``columns`` ``key_tiles``' one or two, up to
    256 keys), or more in a loop over tiles of 128; query tiles of up to ``max_block_q``
    rows (``FUSED_BLOCKS``). Triton needs power-of-two tiles of >= 16."""
    block_q = min(max_block_q or FUSED_BLOCKS[0], _pow2(t))
    tiles = key_tiles(s) if columns and s <= 256 else (_pow2(s),)
    if tiles[0] > 128:
        return block_q, (128,), _round_up(t, block_q), _round_up(s, 128)
    return block_q, tiles, _round_up(t, block_q), sum(tiles)


def _fused_call(q, k, v, qkv_specs, bias, query_mask, key_mask, *, shape, scale, causal,
                interpret, blocks=None, columns=True, parts=False):
    """The fused kernel over operands whose blocks ``qkv_specs(block_q, sp)`` select each
    (batch, head, query block)'s q and each (batch, head)'s k and v; ``bias`` None or
    [3, N, H]; ``shape`` (B, T, S, N, H) with H a power of two >= 16; ``key_mask`` None: the
    query mask (self-attention). Rows are not padded: overhanging blocks are masked.
    Returns (context, column sums [B, N, S]), or without ``columns`` the context alone (one
    online-softmax pass over the key tiles); with ``parts`` the column sums as the kernel
    leaves them, [B, N * query blocks, padded S]: one partial sum per (head, query block)."""
    b, t, s, n, h = shape
    max_block_q, num_warps, num_stages = blocks or FUSED_BLOCKS
    block_q, tiles, tp, sp = attention_blocks(t, s, max_block_q, columns)
    if blocks is None and block_q == 16:
        num_warps = 1
    qm = query_mask.astype(jnp.int32)  # [B, T] (blocks overhang T and S: masked loads)
    km = qm if key_mask is None else key_mask.astype(jnp.int32)  # [B, S]
    n_qb = tp // block_q
    in_specs = [pl.BlockSpec((None, block_q), lambda i, j, c: (i, c)),
                pl.BlockSpec((None, sp), lambda i, j, c: (i, 0)), *qkv_specs(block_q, sp)]
    args = [qm, km, q, k, v]
    if bias is not None:  # one [3, N, H] operand read as three [H] blocks (no slices made)
        for which in range(3):
            args.append(bias)
            in_specs.append(pl.BlockSpec((None, None, h), lambda i, j, c, w=which: (w, j, 0)))
    grid, at, block_axis = _grid(b, n, n_qb, GRID_ORDER)
    kernel = functools.partial(_attn_kernel, scale=scale, causal=causal, block_q=block_q,
                               key_tiles=tiles, n_kb=1 if sum(tiles) == sp else sp // tiles[0], t=t, s=s,
                               biased=bias is not None, columns=columns, block_axis=block_axis)
    params = _triton_params(interpret, num_warps, num_stages)
    out_shape = [jax.ShapeDtypeStruct((b, t, n, h), v.dtype)]
    out_specs = [pl.BlockSpec((None, block_q, None, h), lambda i, j, c: (i, c, j, 0))]
    if columns:
        out_shape.append(jax.ShapeDtypeStruct((b, n, n_qb, sp), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, sp), lambda i, j, c: (i, j, c, 0)))
    out = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=at(in_specs),
                         out_specs=at(out_specs), interpret=interpret, **params)(*args)
    if not columns:
        return out[0]  # [B, T, N, H]
    ctx, col = out
    if parts:
        return ctx, col.reshape(b, n * n_qb, sp)
    return ctx, col.sum(axis=2)[:, :, :s]  # [B, T, N, H], [B, N, S]


@functools.partial(jax.jit, static_argnames=("scale", "causal", "interpret"))
def attention_with_column_sums(q, k, v, query_mask, key_mask, *, scale: float,
                               causal: bool = False, interpret: bool = False):
    """Attention and the ACC column sums in ONE kernel: the softmax probabilities are made
    once, in registers, and feed both the context and the column sums.

    Grid (batch, head, query block); q, k, v are read in their [B, T, N, H] layout (no
    transposes, no padding of rows). Each program writes its query block's context and its
    own [S] column sums; the query blocks' partial sums are added outside (a small
    [B, N, T/BQ, S] array, no atomics).

    Args:
      q: [B, T, N, H]; k, v: [B, S, N, H]; query_mask [B, T], key_mask [B, S] bool (True =
        real token; padding keys get no probability, padding queries add nothing to a column).
      causal: key j visible to query i only if j <= i (requires T == S).
    Returns:
      (context [B, T, N, H] in v.dtype, column sums [B, N, S] float32: sum over valid queries
      i of P[b, n, i, j]).
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    if causal and t != s:
        raise ValueError("causal attention with column sums needs T == S")
    hp = _pow2(h)
    if hp != h:  # head sizes Triton cannot tile are padded (copies); BERT's 64 and 32 are not
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, hp - h))) for x in (q, k, v))

    def specs(block_q, sp):
        return [pl.BlockSpec((None, block_q, None, hp), lambda i, j, c: (i, c, j, 0)),
                pl.BlockSpec((None, sp, None, hp), lambda i, j, c: (i, 0, j, 0)),
                pl.BlockSpec((None, sp, None, hp), lambda i, j, c: (i, 0, j, 0))]

    ctx, col = _fused_call(q, k, v, specs, None, query_mask, key_mask, shape=(b, t, s, n, hp),
                           scale=scale, causal=causal, interpret=interpret)
    return ctx[..., :h], col


def packed_heads_ok(head_dim: int) -> bool:
    """Whether ``packed_attention_with_column_sums`` takes this head size (Triton tiles are
    powers of two >= 16; the packed operand cannot be padded without a copy)."""
    return head_dim >= 16 and head_dim == _pow2(head_dim)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "interpret", "blocks", "columns", "parts"))
def packed_attention_with_column_sums(qkv, bias, mask, *, scale: float, causal: bool = False,
                                      interpret: bool = False,
                                      blocks: tuple[int, int, int] | None = None,
                                      columns: bool = True, parts: bool = False):
    """``attention_with_column_sums`` for self-attention reading q, k and v straight from the
    fused projection's output, with its bias added in the kernel: no split, bias or padding
    copies between the GEMM and the attention (on an H200 those copies took ~50 us a BERT-base
    layer at 128 x 128, docs/benchmarks.md).

    Args:
      qkv: [B, T, 3, N, H] the q/k/v projection BEFORE its bias (H a power of two >= 16:
        ``packed_heads_ok``); bias: [3, N, H] or None; mask [B, T] bool (queries and keys).
      blocks: (largest query tile, num_warps, num_stages); None: ``FUSED_BLOCKS``.
      columns: False: attention alone (a layer that does not eliminate), one online-softmax
        pass over the key tiles, no column sums.
      parts: the column sums unreduced, [B, P, Tp] (P = N x query blocks, Tp >= T: columns
        past T are zero), for a consumer that adds them itself (``keep_rows``).
    Returns:
      (context [B, T, N, H] in qkv.dtype, column sums [B, N, T] float32); without
      ``columns`` the context alone.
    """
    b, t, three, n, h = qkv.shape
    if three != 3 or not packed_heads_ok(h):
        raise ValueError(f"packed q/k/v must be [B, T, 3, N, H] with H a power of two >= 16, got {qkv.shape}")

    def specs(block_q, sp):
        return [pl.BlockSpec((None, block_q, None, None, h), lambda i, j, c: (i, c, 0, j, 0)),
                pl.BlockSpec((None, sp, None, None, h), lambda i, j, c: (i, 0, 1, j, 0)),
                pl.BlockSpec((None, sp, None, None, h), lambda i, j, c: (i, 0, 2, j, 0))]

    bias = None if bias is None else bias.astype(qkv.dtype)
    return _fused_call(qkv, qkv, qkv, specs, bias, mask, None, shape=(b, t, t, n, h),
                       scale=scale, causal=causal, interpret=interpret, blocks=blocks,
                       columns=columns, parts=parts)


def _distance_kernel(km_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, rb_ref, o_ref, lse_ref, *,
                     scale: float, block_k: int, n_kb: int, rel_offset: int):
    # refs (batch, head squeezed; this program's query block): km [Sp], q [BQ, H], k / v
    # [Sp, H], positions qp [BQ] / kp [Sp], bias by distance rb [R] (times log2(e));
    # outputs o [BQ, H] (context), lse [BQ] (natural log)
    q = q_ref[...]
    q_pos = qp_ref[...]

    def step(kb, carry):
        m, l, acc = carry  # online softmax in base 2: running max, sum, unnormalised context
        start = kb * block_k
        k = k_ref[pl.ds(start, block_k), :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * (scale * LOG2E)  # [BQ, BK]
        s = s + rb_ref[kp_ref[pl.ds(start, block_k)][None, :] - q_pos[:, None] + rel_offset]
        s = jnp.where((km_ref[pl.ds(start, block_k)] != 0)[None, :], s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = v_ref[pl.ds(start, block_k), :]
        acc = acc * alpha[:, None] + jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    bq, hp = q.shape
    m, l, acc = jax.lax.fori_loop(0, n_kb, step, (jnp.full((bq,), NEG, jnp.float32),
                                                 jnp.zeros((bq,), jnp.float32),
                                                 jnp.zeros((bq, hp), jnp.float32)))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)) / LOG2E


# (block_q, block_k, num_warps, num_stages) of ``attention_by_distance``: the fastest of six
# tilings alone at Flan-T5's 16 x 400 and 16 x 232 rows on an H200 (docs/benchmarks.md)
DISTANCE_BLOCKS = (64, 32, 4, 2)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "blocks"))
def attention_by_distance(q, k, v, key_mask, rel_bias, positions, *, scale: float,
                          interpret: bool = False, blocks: tuple[int, int, int, int] | None = None):
    """Flash attention (forward) with T5's bias read by key - query distance, and the
    log-sum-exp the second ACC pass needs: once rows are eliminated their positions differ per
    example, and cuDNN would need the bias written out as [B, N, T, T] in every layer.

    Args:
      q, k, v: [B, T, N, H] self-attention rows; key_mask [B, T] bool (padding keys get no
        probability); rel_bias [N, 2P - 1], entry ``r + P - 1`` added for key position - query
        position = r; positions [B, T] int, each row's ORIGINAL position in [0, P).
    Returns:
      (context [B, T, N, H] in v.dtype, log-sum-exp [B, N, T] float32 of each query's biased,
      masked, scaled logits, as cuDNN returns it).
    """
    b, t, n, h = q.shape
    block_q, block_k, num_warps, num_stages = blocks or DISTANCE_BLOCKS
    block_q, block_k = min(block_q, _pow2(t)), min(block_k, _pow2(t))
    tq, tk, hp = _round_up(t, block_q), _round_up(t, block_k), max(16, _round_up(h, 16))
    q = jnp.pad(q, ((0, 0), (0, tq - t), (0, 0), (0, hp - h)))
    k, v = (jnp.pad(x, ((0, 0), (0, tk - t), (0, 0), (0, hp - h))) for x in (k, v))
    km = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, tk - t)))  # [B, Tk]
    r = rel_bias.shape[1]
    rp = _pow2(r)
    # padded rows get position 0: their distances stay inside the vector (keys are masked)
    pos = jnp.pad(positions.astype(jnp.int32), ((0, 0), (0, max(tq, tk) - t)))
    bias = jnp.pad(rel_bias.astype(jnp.float32) * LOG2E, ((0, 0), (0, rp - r)))  # [N, Rp]
    kernel = functools.partial(_distance_kernel, scale=scale, block_k=block_k, n_kb=tk // block_k,
                               rel_offset=(r - 1) // 2)
    params = _triton_params(interpret, num_warps, num_stages)
    ctx, lse = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, tq, n, hp), v.dtype),
                   jax.ShapeDtypeStruct((b, n, tq), jnp.float32)),
        grid=(b, n, tq // block_q),
        in_specs=[
            pl.BlockSpec((None, tk), lambda i, j, c: (i, 0)),
            pl.BlockSpec((None, block_q, None, hp), lambda i, j, c: (i, c, j, 0)),
            pl.BlockSpec((None, tk, None, hp), lambda i, j, c: (i, 0, j, 0)),
            pl.BlockSpec((None, tk, None, hp), lambda i, j, c: (i, 0, j, 0)),
            pl.BlockSpec((None, block_q), lambda i, j, c: (i, c)),
            pl.BlockSpec((None, tk), lambda i, j, c: (i, 0)),
            pl.BlockSpec((None, rp), lambda i, j, c: (j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, None, hp), lambda i, j, c: (i, c, j, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, j, c: (i, j, c)),
        ],
        interpret=interpret,
        **params,
    )(km, q, k, v, pos[:, :tq], pos[:, :tk], bias)
    return ctx[:, :t, :, :h], lse[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def self_attention_with_column_sums(q, k, v, mask, scale: float, causal: bool, interpret: bool):
    """``attention_with_column_sums`` for self-attention (one mask for queries and keys),
    differentiable in the context: training through an eliminating layer gets the gradient
    of plain attention (recomputed by XLA in the backward pass); the column sums only rank
    rows, so no gradient flows through them.

    Args: q, k, v [B, T, N, H]; mask [B, T] float (1.0 = real token). Returns as
    ``attention_with_column_sums``.
    """
    return _per_example(("fused", scale, causal, interpret), lambda q_, k_, v_, m_: attention_with_column_sums(
        q_, k_, v_, m_ > 0.5, m_ > 0.5, scale=scale, causal=causal, interpret=interpret), (q, k, v, mask), (1, 1, 1, 1))


def _self_fwd(q, k, v, mask, scale, causal, interpret):
    out = self_attention_with_column_sums(q, k, v, mask, scale, causal, interpret)
    return out, (q, k, v, mask)


def _self_bwd(scale, causal, interpret, res, g):
    from accjax import attention

    q, k, v, mask = res
    g_ctx, _ = g  # [B, T, N, H]; the column sums' cotangent is dropped (ranking only)
    _, vjp = jax.vjp(lambda q_, k_, v_: attention.fused_attention(
        q_, k_, v_, mask > 0.5, scale=scale, causal=causal, implementation="xla"), q, k, v)
    return (*vjp(g_ctx.astype(v.dtype)), jnp.zeros_like(mask))


self_attention_with_column_sums.defvjp(_self_fwd, _self_bwd)


def _unpack(qkv, bias):
    """[B, T, 3, N, H] (+ [3, N, H]) -> q, k, v [B, T, N, H] each (XLA's split and bias add)."""
    if bias is not None:
        qkv = qkv + bias.astype(qkv.dtype)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def self_attention_with_column_sums_packed(qkv, bias, mask, scale: float, causal: bool,
                                           interpret: bool, parts: bool = False):
    """``packed_attention_with_column_sums``, differentiable in qkv and the bias as
    ``self_attention_with_column_sums`` is in q, k, v. mask [B, T] float (1.0 = real token);
    ``parts``: the column sums unreduced (see there)."""
    return _per_example(("packed", scale, causal, interpret, parts), lambda x, b, m: packed_attention_with_column_sums(
        x, b, m > 0.5, scale=scale, causal=causal, interpret=interpret, parts=parts), (qkv, bias, mask), (1, 0, 1))


def _packed_fwd(qkv, bias, mask, scale, causal, interpret, parts):
    return (self_attention_with_column_sums_packed(qkv, bias, mask, scale, causal, interpret, parts),
            (qkv, bias, mask))


def _packed_bwd(scale, causal, interpret, parts, res, g):
    from accjax import attention

    qkv, bias, mask = res
    _, vjp = jax.vjp(lambda x, b_: attention.fused_attention(
        *_unpack(x, b_), mask > 0.5, scale=scale, causal=causal, implementation="xla"), qkv, bias)
    d_qkv, d_bias = vjp(g[0].astype(qkv.dtype))  # the column sums only rank rows: no cotangent
    return d_qkv, d_bias, jnp.zeros_like(mask)


self_attention_with_column_sums_packed.defvjp(_packed_fwd, _packed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def self_attention_packed(qkv, bias, mask, scale: float, causal: bool, interpret: bool):
    """Self-attention alone from the packed projection (``packed_attention_with_column_sums``
    without column sums): a layer that does not eliminate. The backward pass is cuDNN's
    (XLA's in the interpreter) on the split q, k, v. mask [B, T] float (1.0 = real token)."""
    return _per_example(("alone", scale, causal, interpret), lambda x, b, m: packed_attention_with_column_sums(
        x, b, m > 0.5, scale=scale, causal=causal, interpret=interpret, columns=False), (qkv, bias, mask), (1, 0, 1))


def _attn_fwd(qkv, bias, mask, scale, causal, interpret):
    return self_attention_packed(qkv, bias, mask, scale, causal, interpret), (qkv, bias, mask)


def _attn_bwd(scale, causal, interpret, res, g):
    from accjax import attention

    qkv, bias, mask = res
    impl = "xla" if interpret else "cudnn"
    _, vjp = jax.vjp(lambda x, b_: attention.fused_attention(
        *_unpack(x, b_), mask > 0.5, scale=scale, causal=causal, implementation=impl), qkv, bias)
    d_qkv, d_bias = vjp(g.astype(qkv.dtype))
    return d_qkv, d_bias, jnp.zeros_like(mask)


self_attention_packed.defvjp(_attn_fwd, _attn_bwd)


def _distance_bias(rel_bias, positions, xp=jnp):
    """[N, 2P - 1] by distance at [B, T] positions -> the [B, N, T, T] logits bias (``xp=np``
    in the probes, which must not be traced)."""
    r = (rel_bias.shape[1] - 1) // 2
    return xp.moveaxis(rel_bias[:, positions[:, None, :] - positions[:, :, None] + r], 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def self_attention_by_distance(q, k, v, mask, rel_bias, positions, scale: float, interpret: bool):
    """``attention_by_distance``, differentiable in q, k, v and the bias: the backward pass is
    plain attention's, recomputed by XLA with the bias written out (training only)."""
    return _per_example(("distance", scale, interpret), lambda q_, k_, v_, m, rb, pos: attention_by_distance(
        q_, k_, v_, m, rb, pos, scale=scale, interpret=interpret), (q, k, v, mask, rel_bias, positions),
        (1, 1, 1, 1, 0, 1))


def _distance_fwd(q, k, v, mask, rel_bias, positions, scale, interpret):
    out = self_attention_by_distance(q, k, v, mask, rel_bias, positions, scale, interpret)
    return out, (q, k, v, mask, rel_bias, positions)


def _distance_bwd(scale, interpret, res, g):
    from accjax import attention

    q, k, v, mask, rel_bias, positions = res
    _, vjp = jax.vjp(lambda q_, k_, v_, rb: attention.fused_attention(
        q_, k_, v_, mask, scale=scale, bias=_distance_bias(rb, positions), implementation="xla"),
        q, k, v, rel_bias)
    dq, dk, dv, drb = vjp(g[0].astype(v.dtype))  # the log-sum-exp only ranks rows: no cotangent
    return dq, dk, dv, None, drb, None


self_attention_by_distance.defvjp(_distance_fwd, _distance_bwd)


_AVAILABLE: dict[str, bool] = {}


def _numpy_column_sums(q, k, lse, qm, km, scale, bias=None):
    s = np.einsum("btnh,bsnh->bnts", q.astype(np.float32), k.astype(np.float32)) * scale
    if bias is not None:
        s = s + bias
    p = np.exp(s - lse[..., None]) * (qm[:, None, :, None] & km[:, None, None, :])
    return p.sum(axis=2)


def _probe_fused(interpret: bool) -> bool:
    """``attention_with_column_sums`` against numpy: one tile (24 keys) and two passes over
    tiles with padding (200 keys), bf16 inputs, head size 64 as in BERT/GPT-2."""
    rng = np.random.default_rng(1)
    for t in (24, 200):
        q, k, v = (rng.standard_normal((2, t, 2, 64)).astype(jnp.bfloat16) for _ in range(3))
        m = np.arange(t)[None] < np.array([[t], [t // 2 + 3]])
        prog = attention_with_column_sums.lower(q, k, v, m, m, scale=0.125,
                                                interpret=interpret).compile()
        ctx, col = (np.asarray(x, np.float32) for x in prog(q, k, v, m, m))
        lg = np.einsum("btnh,bsnh->bnts", q.astype(np.float32), k.astype(np.float32)) * 0.125
        lg = np.where(m[:, None, None, :], lg, -1e30)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)  # [B, N, T, S]
        ref_ctx = np.einsum("bnts,bsnh->btnh", p, v.astype(np.float32))
        ref_col = (p * m[:, None, :, None]).sum(axis=2)
        if not (np.allclose(ctx, ref_ctx, rtol=3e-2, atol=3e-2)
                and np.allclose(col, ref_col, rtol=2e-2, atol=1e-3)):
            return False
    return True


def _probe_distance(interpret: bool) -> bool:
    """``attention_by_distance`` against numpy on 40 rows in two key tiles, bf16, padding."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 40, 2, 64)).astype(jnp.bfloat16) for _ in range(3))
    pos = np.stack([np.sort(rng.choice(50, 40, replace=False)) for _ in range(2)]).astype(np.int32)
    rb = rng.standard_normal((2, 99)).astype(np.float32)
    m = np.arange(40)[None] < np.array([[40], [23]])
    prog = attention_by_distance.lower(q, k, v, m, rb, pos, scale=0.125, interpret=interpret,
                                       blocks=(32, 32, 4, 2)).compile()
    ctx, lse = (np.asarray(x, np.float32) for x in prog(q, k, v, m, rb, pos))
    lg = np.einsum("btnh,bsnh->bnts", q.astype(np.float32), k.astype(np.float32)) * 0.125
    lg = np.where(m[:, None, None, :], lg + _distance_bias(rb, pos, np), -1e30)
    ref_lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    ref_ctx = np.einsum("bnts,bsnh->btnh", np.exp(lg - ref_lse[..., None]), v.astype(np.float32))
    return bool(np.allclose(ctx, ref_ctx, rtol=3e-2, atol=3e-2) and np.allclose(lse, ref_lse, atol=2e-2))


def _probe_lse(interpret: bool, rel_bias: bool) -> bool:
    """``column_sums_from_lse`` against numpy on 24 rows with padding (with T5's bias)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 24, 2, 32)).astype(jnp.bfloat16)
    k = rng.standard_normal((2, 24, 2, 32)).astype(jnp.bfloat16)
    lse = rng.uniform(2.0, 4.0, (2, 2, 24)).astype(np.float32)
    m = np.arange(24)[None] < np.array([[24], [17]])
    kw, bias = {}, None
    if rel_bias:
        pos = np.stack([np.sort(rng.choice(40, 24, replace=False)) for _ in range(2)])
        pos = pos.astype(np.int32)  # the kept rows' original positions, P = 40
        rb = rng.standard_normal((2, 79)).astype(np.float32)  # [N, 2P - 1]
        kw = {"rel_bias": rb, "positions": pos}
        bias = _distance_bias(rb, pos, np)
    prog = column_sums_from_lse.lower(q, k, lse, m, m, scale=0.2, interpret=interpret, **kw).compile()
    got = np.asarray(prog(q, k, lse, m, m, **kw))
    return bool(np.allclose(got, _numpy_column_sums(q, k, lse, m, m, 0.2, bias), rtol=2e-2, atol=1e-3))


def available(interpret: bool = False, *, rel_bias: bool = False, fused: bool = False,
              distance: bool = False) -> bool:
    """Whether the Triton kernel compiles and agrees with numpy on this backend (probed once).

    Often first asked while a model is being traced: the probe lowers, compiles and runs its
    own executable on numpy inputs, which works the same inside or outside a trace
    (``ensure_compile_time_eval`` would not: Pallas' ``program_id`` has no eager rule).
    ``interpret=True`` runs the probe in Pallas' interpreter (how the tests exercise it).
    Which kernel: the second pass ``column_sums_from_lse`` by default, ``rel_bias=True`` with
    T5's relative-position bias; ``fused=True`` the attention kernel that returns the column
    sums (``attention_with_column_sums``); ``distance=True`` the attention with T5's bias by
    distance (``attention_by_distance``).
    """
    from accjax.kernels import probed_once

    backend = jax.default_backend()
    if backend != "gpu" and not interpret:
        return False
    probe = (_probe_distance if distance else _probe_fused if fused
             else functools.partial(_probe_lse, rel_bias=rel_bias))
    return probed_once(_AVAILABLE, f"{backend}:{interpret}:{rel_bias}:{fused}:{distance}",
                       lambda: probe(interpret))
