"""ACC column sums in Pallas (Triton) kernels: softmax probabilities never reach memory.

``column_sums_from_lse`` (used on GPUs): flash attention already computed each query's
float32 log-sum-exp; one kernel per (batch, head, key block) recomputes
``exp(scale q_i.k_j - lse_i)`` tile by tile and sums it over valid queries. T5's relative
position bias enters as a vector by distance, ``rel_bias[n, pos_j - pos_i + P - 1]`` over the
rows' original positions, gathered per tile (no [T, S] bias in memory).

``attention_with_column_sums`` / ``packed_attention_with_column_sums``: attention and the
column sums in ONE kernel (BERT's eliminating layers; decoders' up to 256 prompt rows, the key
tiles past each query tile's last row skipped; T5's, reading that same bias vector by
distance, where cuDNN would need the bias written out per example as [B, N, T, T]).

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

    def body(i, acc, masked: bool):
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
        if masked:
            p = jnp.where(cols[None, :] <= rows[:, None], p, 0.0)
        return acc + p

    # Accumulate the [BQ, BK] tile in registers and reduce over queries once at the end: a
    # column sum inside the loop is a cross-warp reduction through shared memory per block.
    # Padding keys are zeroed by the caller. Causal: query blocks that end before this key
    # block's first column see none of it, so the walk starts at the block holding row kb * BK;
    # only the blocks up to its last column's row need the causal mask (one when BQ = BK), the
    # rest see every column (no compare and select for most tiles).
    n_q = t_pad // block_q
    acc = jnp.zeros((block_q, block_k), jnp.float32)
    if causal:
        first = (kb * block_k) // block_q
        plain = jnp.minimum(((kb + 1) * block_k + block_q - 1) // block_q, n_q)
        acc = jax.lax.fori_loop(first, plain, functools.partial(body, masked=True), acc)
        acc = jax.lax.fori_loop(plain, n_q, functools.partial(body, masked=False), acc)
    else:
        acc = jax.lax.fori_loop(0, n_q, functools.partial(body, masked=False), acc)
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
                 columns: bool, block_axis: int, rel_offset: int | None = None):
    # refs (batch, head squeezed; this program's query block): qm [BQ], km [Sp] (int masks),
    # q [BQ, H], k [Sp, H], v [Sp, H]; with ``biased`` the q/k/v biases [H] each; with
    # ``rel_offset`` (T5's bias by distance) the query positions qp [BQ], key positions kp
    # [Sp] and this head's bias by distance rb [Rp] (entry key - query position +
    # rel_offset); outputs o [BQ, H] (context) and, with ``columns``, col [Sp] (this block's
    # column sums). Blocks may overhang T and S (rows are not padded outside): overhanging
    # rows are masked on load and store. Keys: ``n_kb`` == 1: every key in one pass, over
    # the static tiles ``key_tiles`` (powers of two, largest first: 72 keys are 64 + 16, not
    # 128); n_kb > 1: n_kb tiles of ``key_tiles[0]`` keys in a loop (causal: only the tiles
    # up to this query block's last row).
    bq_ref = bk_ref = bv_ref = col_ref = qp_ref = kp_ref = rb_ref = None
    if biased:
        bq_ref, bk_ref, bv_ref, *rest = rest
    if rel_offset is not None:
        qp_ref, kp_ref, rb_ref, *rest = rest
    o_ref, *rest = rest
    if columns:
        (col_ref,) = rest
    qb = pl.program_id(block_axis)
    rows = qb * block_q + jnp.arange(block_q, dtype=jnp.int32)
    row_in = rows < t if t % block_q else None
    q = _masked_load(q_ref, row_in)  # [BQ, H]
    q_ok = _masked_load(qm_ref, row_in) != 0  # [BQ]
    q_pos = None if rel_offset is None else _masked_load(qp_ref, row_in)  # [BQ] (0 past T)
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
        key_in = cols < s if past_s(start, size) else None
        if rel_offset is not None:
            # T5's bias depends only on key position - query position: one gathered load from
            # this head's [R] vector (L1-resident), never a [T, S] bias in memory. Positions
            # past T or S load as 0, which keeps the index inside the vector (masked below).
            k_pos = _masked_load(kp_ref.at[pl.ds(start, size)], key_in)  # [BK]
            s_ = s_ + rb_ref[k_pos[None, :] - q_pos[:, None] + rel_offset]
        km = _masked_load(km_ref.at[pl.ds(start, size)], key_in)
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

    # causal: key tiles past this query block's last row are wholly masked, so the loops
    # stop before them (a dynamic bound: about half the tiles of a causal grid)
    n_loop = jnp.minimum(n_kb, ((qb + 1) * block_q + block_k - 1) // block_k) if causal else n_kb

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

        _, l, acc = jax.lax.fori_loop(0, n_loop, online, (
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

    m, l = jax.lax.fori_loop(0, n_loop, stats, (jnp.full((block_q,), NEG, jnp.float32),
                                               jnp.zeros((block_q,), jnp.float32)))
    inv_l = 1.0 / l

    def sweep(kb, acc):
        s_, ok = logits(kb * block_k, block_k)
        p = jnp.exp(s_ - m[:, None]) * inv_l[:, None]
        return acc + context_and_columns(kb * block_k, block_k, p, ok)

    if causal:  # the skipped tiles' column sums are 0 (col is not zeroed outside)
        def zero(kb, carry):
            col_ref[pl.ds(kb * block_k, block_k)] = jnp.zeros((block_k,), jnp.float32)
            return carry

        jax.lax.fori_loop(n_loop, n_kb, zero, 0)
    store(jax.lax.fori_loop(0, n_loop, sweep, jnp.zeros((block_q, q.shape[1]), jnp.float32)))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# (largest query tile, num_warps, num_stages) of the fused attention kernel, with or without
# the column sums; a 16-row query tile (16 keys or fewer) runs on one warp. In the "block"
# grid order, the fastest of ten tilings or within 4% of it at every measured shape but one
# (H200, BERT-base heads, kernel alone: at B = 128, 128 keys with column sums 64.5 us, attention
# alone 51.8; 16 keys 4.8 us on one warp against 7.7 on four; at B = 32, 512 keys alone 154
# against 254 us for the former 128-row, 8-warp tiles of attention alone; docs/benchmarks.md).
FUSED_BLOCKS = (64, 4, 2)


# Keys up to this many go through the kernel with column sums in ONE pass: every key tile's
# logits are held at once, so no second sweep recomputes q k^T (and T5's bias gathers) for
# the rows' final softmax normaliser; above it, two passes over tiles of 128. Above 256 keys
# the query tile shrinks so that a program holds at most ONE_PASS_LOGITS logits (64 x 256:
# the most a measured tiling held): at 512 keys 32 query rows over four tiles. H100, same
# process, pipelined ms against the bound at 256: Flan-T5 16 x 512 (its bias-by-distance
# kernel at every eliminating layer) 2x 3.75 against 3.94, 4x 2.35 against 2.44; BERT-base
# 32 x 512 fused at 512 keys (``acc.FUSED_MAX_KEYS``) one pass or two both lose to cuDNN +
# the second pass there (+7-14%), so BERT keeps 256 there (docs/benchmarks.md, twentieth
# session). Above 512 (T5 at 1024 keys: 16-row query tiles) not timed: two passes.
ONE_PASS_MAX_KEYS = 512
ONE_PASS_LOGITS = 64 * 256
# Attention alone (a layer that keeps its rows) over 129-256 keys: False, a loop over tiles of
# 128 (136 keys run as 256); True, one pass over ``key_tiles`` (128 + 16 = 144), as the
# column-sum kernel does. A strided schedule's non-cutting layers meet such counts: at 32 x
# 512, 4.8x with 136 rows a sequence in eight layers measured 0.66-0.77 of analytic against
# 0.81-0.86 with 128, and a fit of 204 programs' times (``docs/probes/wave_fit.py``) put it on
# the padded keys and predicted 6% off that program with one pass. H100, one process
# (``docs/probes/constant_ab.py``, docs/benchmarks.md), pipelined ms False / True: that program
# 1.93 / 1.81 (-6%); 3x with 232 rows 2.73 / 2.75 and dense 6.29 / 6.32 (within noise); at
# 192 rows (3x, F = 128) 2.69 / 2.69.
ALONE_KEY_TILES = True


def key_tiles(s: int) -> tuple[int, ...]:
    """The key tiles of one pass over ``s`` keys with column sums (Triton tiles are powers of
    two of >= 16): up to 128 keys one tile, or two (a + b with b <= a / 4) where that covers
    far fewer padded keys (65-80 keys as 64 + 16 rather than 128); above 128 keys tiles of
    128 and a last power of two for the rest (129-256 keys: one pass instead of two over
    tiles of 128). Measured on an H200 (BERT-base heads): at B = 128, 72 keys 46 against 61
    us, while a smaller saving does not pay for the second tile's products (88 keys as 64 +
    32: 61 against 62.5 us; 40 as 32 + 16: 15.5 against 15.0), nor does attention alone gain
    (72: 38 against 36 us); at B = 32, 144 keys 40 against 69 us, 176 42 against 72, 248 86
    against 90 (docs/benchmarks.md)."""
    if s > 128:
        return (128,) * (s // 128) + ((_pow2(s % 128),) if s % 128 else ())
    one = _pow2(s)
    a = one // 2
    if a >= 16 and s > a and 4 * _pow2(s - a) <= a:
        return a, _pow2(s - a)
    return (one,)


def attention_blocks(t: int, s: int, max_block_q: int | None = None,
                     columns: bool = True) -> tuple[int, tuple[int, ...], int, int]:
    """(block_q, key tiles, padded T, padded S) of ``attention_with_column_sums``: the keys
    in one pass (up to 128 in one tile; with ``columns``, or above 128 keys with
    ``ALONE_KEY_TILES``, ``key_tiles``, up to ``ONE_PASS_MAX_KEYS``), or more in a loop over
    tiles of 128; query tiles of up to
    ``max_block_q`` rows (``FUSED_BLOCKS``), fewer where one pass would hold more than
    ``ONE_PASS_LOGITS`` logits. Triton needs power-of-two tiles of >= 16. Tiles of half size
    where they pad fewer query rows (136 as 5 x 32 = 160 rather than 3 x 64 = 192) were timed
    on an H100 and lost: that 4.8x program (32 x 512, 136 rows in eight layers) 1.83 -> 1.91
    ms (docs/benchmarks.md, forty-fourth session)."""
    block_q = min(max_block_q or FUSED_BLOCKS[0], _pow2(t))
    one_pass = columns or (ALONE_KEY_TILES and s > 128)
    tiles = key_tiles(s) if one_pass and s <= ONE_PASS_MAX_KEYS else (_pow2(s),)
    if tiles[0] <= 128 and block_q * sum(tiles) > ONE_PASS_LOGITS:
        block_q = max(16, 1 << ((ONE_PASS_LOGITS // sum(tiles)).bit_length() - 1))
    if tiles[0] > 128:
        return block_q, (128,), _round_up(t, block_q), _round_up(s, 128)
    return block_q, tiles, _round_up(t, block_q), sum(tiles)


def _fused_call(q, k, v, qkv_specs, bias, query_mask, key_mask, *, shape, scale, causal,
                interpret, blocks=None, columns=True, parts=False, distance=None):
    """The fused kernel over operands whose blocks ``qkv_specs(block_q, sp)`` select each
    (batch, head, query block)'s q and each (batch, head)'s k and v; ``bias`` None or
    [3, N, H]; ``shape`` (B, T, S, N, H) with H a power of two >= 16; ``key_mask`` None: the
    query mask (self-attention); ``distance`` None or (rel_bias [N, 2P - 1], positions
    [B, T]): T5's logits bias by key - query position, self-attention only. Rows are not
    padded: overhanging blocks are masked.
    Returns (context, column sums [B, N, S]), or without ``columns`` the context alone (one
    online-softmax pass over the key tiles); with ``parts`` the column sums as the kernel
    leaves them, [B, N * query blocks, padded S]: one partial sum per (head, query block)."""
    b, t, s, n, h = shape
    max_block_q, num_warps, num_stages = blocks or FUSED_BLOCKS
    block_q, tiles, tp, sp = attention_blocks(t, s, max_block_q, columns)
    if blocks is None and t <= 16:  # a 16-row query tile because the rows are few
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
    rel_offset = None
    if distance is not None:  # query and key positions (blocks overhang: masked), the bias
        rel_bias, positions = distance
        r = rel_bias.shape[1]
        rel_offset, rp = (r - 1) // 2, _pow2(r)
        pos = positions.astype(jnp.int32)
        args += [pos, pos, jnp.pad(rel_bias.astype(jnp.float32), ((0, 0), (0, rp - r)))]
        in_specs += [pl.BlockSpec((None, block_q), lambda i, j, c: (i, c)),
                     pl.BlockSpec((None, sp), lambda i, j, c: (i, 0)),
                     pl.BlockSpec((None, rp), lambda i, j, c: (j, 0))]
    grid, at, block_axis = _grid(b, n, n_qb, GRID_ORDER)
    kernel = functools.partial(_attn_kernel, scale=scale, causal=causal, block_q=block_q,
                               key_tiles=tiles, n_kb=1 if sum(tiles) == sp else sp // tiles[0], t=t, s=s,
                               biased=bias is not None, columns=columns, block_axis=block_axis,
                               rel_offset=rel_offset)
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
                                      columns: bool = True, parts: bool = False,
                                      rel_bias=None, positions=None):
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
      rel_bias: optional [N, 2P - 1] logits bias by key - query position (T5, bidirectional):
        entry ``r + P - 1`` is added for key position - query position = r, read in the
        kernel at ``positions`` [B, T] (each row's ORIGINAL position in [0, P)).
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

    if (rel_bias is None) != (positions is None) or (rel_bias is not None and causal):
        raise ValueError("a bias by distance needs positions, and bidirectional attention")
    bias = None if bias is None else bias.astype(qkv.dtype)
    return _fused_call(qkv, qkv, qkv, specs, bias, mask, None, shape=(b, t, t, n, h),
                       scale=scale, causal=causal, interpret=interpret, blocks=blocks,
                       columns=columns, parts=parts,
                       distance=None if rel_bias is None else (rel_bias, positions))


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def self_attention_by_distance_packed(qkv, mask, rel_bias, positions, scale: float, interpret: bool,
                                      columns: bool, parts: bool):
    """``packed_attention_with_column_sums`` with T5's bias by distance (no projection bias):
    the context, with ``columns`` also the column sums (``parts``: unreduced), differentiable
    in qkv and the bias as ``self_attention_with_column_sums_packed`` (the backward pass is
    plain attention's, recomputed by XLA with the bias written out: training only).
    mask [B, T] float (1.0 = real token); rel_bias [N, 2P - 1]; positions [B, T] int."""
    return _per_example(("distance_packed", scale, interpret, columns, parts),
                        lambda x, m, rb, pos: packed_attention_with_column_sums(
                            x, None, m > 0.5, scale=scale, interpret=interpret, columns=columns,
                            parts=parts, rel_bias=rb, positions=pos),
                        (qkv, mask, rel_bias, positions), (1, 1, 0, 1))


def _dist_packed_fwd(qkv, mask, rel_bias, positions, scale, interpret, columns, parts):
    out = self_attention_by_distance_packed(qkv, mask, rel_bias, positions, scale, interpret, columns, parts)
    return out, (qkv, mask, rel_bias, positions)


def _dist_packed_bwd(scale, interpret, columns, parts, res, g):
    from accjax import attention

    qkv, mask, rel_bias, positions = res
    g_ctx = g[0] if columns else g  # the column sums only rank rows: no cotangent
    _, vjp = jax.vjp(lambda x, rb: attention.fused_attention(
        *_unpack(x, None), mask > 0.5, scale=scale, bias=_distance_bias(rb, positions),
        implementation="xla"), qkv, rel_bias)
    d_qkv, d_rb = vjp(g_ctx.astype(qkv.dtype))
    return d_qkv, jnp.zeros_like(mask), d_rb, None


self_attention_by_distance_packed.defvjp(_dist_packed_fwd, _dist_packed_bwd)


def _distance_bias(rel_bias, positions, xp=jnp):
    """[N, 2P - 1] by distance at [B, T] positions -> the [B, N, T, T] logits bias (``xp=np``
    in the probes, which must not be traced)."""
    r = (rel_bias.shape[1] - 1) // 2
    return xp.moveaxis(rel_bias[:, positions[:, None, :] - positions[:, :, None] + r], 0, 1)


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
    """``packed_attention_with_column_sums`` with T5's bias by distance against numpy: 40 rows
    (one key tile) and 200 (tiles of 128, two passes), bf16, padding, sorted positions."""
    rng = np.random.default_rng(2)
    for t in (40, 200):
        qkv = rng.standard_normal((2, t, 3, 2, 64)).astype(jnp.bfloat16)
        pos = np.stack([np.sort(rng.choice(2 * t, t, replace=False)) for _ in range(2)]).astype(np.int32)
        rb = rng.standard_normal((2, 4 * t - 1)).astype(np.float32)
        m = np.arange(t)[None] < np.array([[t], [t // 2 + 3]])
        prog = packed_attention_with_column_sums.lower(qkv, None, m, scale=0.125, interpret=interpret,
                                                       rel_bias=rb, positions=pos).compile()
        ctx, col = (np.asarray(x, np.float32) for x in prog(qkv, None, m, rel_bias=rb, positions=pos))
        x = qkv.astype(np.float32)
        lg = np.einsum("btnh,bsnh->bnts", x[:, :, 0], x[:, :, 1]) * 0.125 + _distance_bias(rb, pos, np)
        lg = np.where(m[:, None, None, :], lg, -1e30)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref_ctx = np.einsum("bnts,bsnh->btnh", p, x[:, :, 2])
        if not (np.allclose(ctx[m], ref_ctx[m], rtol=3e-2, atol=3e-2)
                and np.allclose(col, (p * m[:, None, :, None]).sum(2), rtol=2e-2, atol=1e-3)):
            return False
    return True


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
    sums (``attention_with_column_sums``); ``distance=True`` the same kernel reading T5's bias
    by distance (``packed_attention_with_column_sums(rel_bias=...)``).
    """
    from accjax.kernels import probed_once

    backend = jax.default_backend()
    if backend != "gpu" and not interpret:
        return False
    probe = (_probe_distance if distance else _probe_fused if fused
             else functools.partial(_probe_lse, rel_bias=rel_bias))
    return probed_once(_AVAILABLE, f"{backend}:{interpret}:{rel_bias}:{fused}:{distance}",
                       lambda: probe(interpret))
