"""Attention Context Contribution (ACC) and static-shape word-vector elimination.

ACC measures how much of a layer's attention context is drawn from each word-vector (row of
the hidden state). For layer l with N heads, probabilities ``P[n, i, j]`` (query i, key j)
over the T rows entering the layer, and ``valid`` the padding mask (True = real token):

    plain (default)
        ACC[j] = 1 / (N * n_valid) * sum_n sum_{i valid} P[n, i, j]            (valid j)
    minus_diagonal (PoWER-BERT: a row's attention to itself is not context for others)
        ACC[j] = 1 / (N * n_valid) * sum_n sum_{i valid, i != j} P[n, i, j]
    value_norm (weight each probability by the size of what it moves)
        ACC[j] = 1 / (N * n_valid) * sum_n sum_{i valid} P[n, i, j] * ||v[n, j] W_O[n]||
    causal=True (decoders): each column is divided by the number of valid queries that can
        see it, c_j = #{i valid : i >= j}, instead of by n_valid; otherwise early tokens win
        by construction because more queries attend to them.

    ACC[j] = -inf for padding j; ACC[j] = +inf for protected j (CLS in encoders, the last
    real token in decoders). The plain form sums to 1 over the valid rows of a sequence.

Worked example (the one ``tests/test_acc.py`` checks): 4 rows, row 3 is padding, 2 heads.
Rows of P are queries, columns keys; the padding query (row 3) is ignored::

    head 0: q0 [.50 .25 .25 0]   head 1: q0 [.50 .00 .50 0]
            q1 [.50 .50 .00 0]           q1 [.25 .50 .25 0]
            q2 [.25 .25 .50 0]           q2 [.00 .25 .75 0]
    column sums over valid queries: head 0 [1.25 1.00 0.75], head 1 [0.75 0.75 1.50]
    plain ACC = [2.00 1.75 2.25] / (2 heads * 3 valid) = [.3333 .2917 .3750 -inf]
    with CLS protected:                                  [+inf  .2917 .3750 -inf]

Selection with a static keep-length k (a Python int): the k highest ACC rows (ties to the
lower index, as ``lax.top_k``), in their original order (``select_rows``: on a GPU by counting
ranks, no sort, up to 1024 rows, and up to ``keep_rows.MAX_ROWS`` in one Pallas kernel that
also does the gathers, ``accjax.kernels.keep_rows``; else ``lax.top_k`` and a sort of the kept
indices), then every per-row array is gathered with the same indices. On the example, k=2
keeps rows [0, 2]; k=3 keeps the best [0, 2, 1] as [0, 1, 2]; padding is always dropped
before any real row.

    hidden  [B, 4, D] --take rows [0, 2]--> [B, 2, D]
    mask    [[T T T F]] -> [[T T]]     positions [[0 1 2 3]] -> [[0 2]]

Letters: B batch, T query rows, S key rows, N heads, H head size, D model size, K kept rows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from accjax import attention as attn_lib

Array = jax.Array

VARIANTS = ("plain", "minus_diagonal", "value_norm")
# Not ACC: keep the first k rows (CLS and the leftmost tokens). A baseline for accuracy
# (static truncation inside the network) and, for timing, a lower bound with no scoring.
BASELINES = ("prefix",)


@struct.dataclass
class Rows:
    """Per-row bookkeeping that travels with the hidden state through elimination.

    Attributes:
      mask: [B, T] bool, True for a real token.
      positions: [B, T] int32, each row's ORIGINAL position in the input (position ids).
      token_types: [B, T] int32 segment ids, or None for models without them.
    """

    mask: Array
    positions: Array
    token_types: Array | None = None

    def take(self, idx: Array) -> "Rows":
        """Gathers every field with row indices ``idx`` [B, K] (sorted, original order)."""
        return jax.tree.map(lambda a: jnp.take_along_axis(a, idx, axis=1), self)

    @staticmethod
    def create(mask: Array, positions: Array | None = None, token_types: Array | None = None) -> "Rows":
        mask = mask.astype(bool)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
        return Rows(mask=mask, positions=positions.astype(jnp.int32),
                    token_types=None if token_types is None else token_types.astype(jnp.int32))


# ``protect`` given as this: row 0 of every example (BERT's CLS, which elimination keeps in
# place: it ranks first and kept rows keep their order). Unlike an array it is known when the
# program is traced, so the selection kernel applies it with no XLA op (an array is marked in
# ``ColumnSums.mask`` first).
FIRST_ROW = "first_row"


def _protected(protect: Array | str | None, key_mask: Array) -> Array | None:
    """``protect`` as a [B, S] (or broadcastable) bool array, or None."""
    if isinstance(protect, str):
        if protect != FIRST_ROW:
            raise ValueError(f"protect must be a bool array, None or acc.FIRST_ROW, got {protect!r}")
        return (jnp.arange(key_mask.shape[1]) == 0)[None, :]
    return protect


def _finish(col: Array, key_mask: Array, denom: Array, protect: Array | str | None) -> Array:
    """col [B, S] summed contributions -> ACC with padding -inf and protected rows +inf."""
    scores = col / denom
    scores = jnp.where(key_mask, scores, -jnp.inf)
    protect = _protected(protect, key_mask)
    if protect is not None:
        scores = jnp.where(protect & key_mask, jnp.inf, scores)
    return scores


# ``ColumnSums.mask`` of a real row that must never be dropped (a decoder's last token)
PROTECTED = 2.0


@struct.dataclass
class ColumnSums:
    """ACC before it is finished, as the fused attention kernel or the second pass
    (``acc_scores_fused(unfinished=True)``) leaves it: each key row's column sums in ``parts``
    [B, P, Sp] partial sums (one per head, or per head and query tile; columns past S are
    zero), the key mask ``mask`` [B, S] float (0 padding, 1.0 a real row,
    ``PROTECTED`` a real row never dropped), the normaliser ``denom`` ([B, 1], or [B, S] when
    causal), ``protect`` (None or ``FIRST_ROW``) and ``causal_heads`` (0, or the heads N of a
    causal attention: ``denom`` is then N x the real rows at or after each row). ``finished()``
    is the ACC array; ``eliminate`` hands the parts to the selection kernel instead, which
    finishes them itself (XLA's sum, normaliser, division and masking are not made: one or
    two kernels fewer per eliminating layer). Bidirectional, the normaliser is one positive
    number per example, so the kernel ranks by the sums alone; causal, it divides as
    ``_denominator`` does."""

    parts: Array
    mask: Array
    denom: Array
    protect: str | None = struct.field(pytree_node=False, default=None)
    causal_heads: int = struct.field(pytree_node=False, default=0)

    def finished(self) -> Array:
        s = self.mask.shape[1]
        scores = _finish(self.parts.sum(axis=1)[:, :s], self.mask > 0.5, self.denom, self.protect)
        return jnp.where(protected_rows(self.mask), jnp.inf, scores)


def protected_rows(mask: Array) -> Array:
    """Where a ``ColumnSums.mask`` marks a row ``PROTECTED`` (bool, the mask's shape)."""
    return mask > 0.5 * (1.0 + PROTECTED)


def _column_sums(parts: Array, mf: Array, denom: Array, protect: Array | str | None, causal_heads: int
                 ) -> ColumnSums:
    """The fused kernel's parts as ``ColumnSums``; a ``protect`` array marked in the mask."""
    if protect is None or isinstance(protect, str):
        return ColumnSums(parts, mf, denom, protect, causal_heads)
    return ColumnSums(parts, jnp.where(protect & (mf > 0.5), PROTECTED, mf), denom, None, causal_heads)


def finished(scores: Array | ColumnSums | None) -> Array | None:
    """ACC [B, S] from what ``attend_and_score`` returned."""
    return scores.finished() if isinstance(scores, ColumnSums) else scores


def _denominator(key_mask: Array, query_mask: Array, num_heads: int, causal: bool) -> Array:
    """[B, 1] (or [B, S] when causal) normaliser of the column sums, never zero."""
    qm = query_mask.astype(jnp.float32)
    if causal:
        # c_j = number of valid queries i >= j: a reverse cumulative sum of the query mask.
        seen = jnp.flip(jnp.cumsum(jnp.flip(qm, axis=1), axis=1), axis=1)  # [B, S]
        return num_heads * jnp.maximum(seen, 1.0)
    return num_heads * jnp.maximum(qm.sum(axis=1, keepdims=True), 1.0)


def acc_scores(
    probs: Array,
    key_mask: Array,
    query_mask: Array | None = None,
    *,
    variant: str = "plain",
    causal: bool = False,
    protect: Array | None = None,
    value_norms: Array | None = None,
) -> Array:
    """ACC of each key row from materialised attention probabilities.

    Args:
      probs: [B, N, T, S] attention probabilities (any float dtype; summed in float32).
      key_mask: [B, S] bool, True for real tokens.
      query_mask: [B, T] bool; defaults to ``key_mask`` (self-attention).
      variant: one of ``VARIANTS``.
      causal: normalise each column by the number of valid queries that can see it.
      protect: [B, S] bool, rows that must never be dropped (+inf); or ``FIRST_ROW``.
      value_norms: [B, N, S] = ||v[n, j] W_O[n]||, required by ``value_norm``.
    Returns:
      [B, S] float32 scores.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ACC variant {variant!r}; choose one of {VARIANTS}")
    if query_mask is None:
        query_mask = key_mask
    num_heads = probs.shape[1]
    p = probs.astype(jnp.float32) * query_mask[:, None, :, None]  # [B, N, T, S] valid queries
    if variant == "minus_diagonal":
        t, s = p.shape[-2:]
        p = p * (1.0 - jnp.eye(t, s, dtype=jnp.float32))
    col = p.sum(axis=2)  # [B, N, S]
    if variant == "value_norm":
        if value_norms is None:
            raise ValueError("ACC variant 'value_norm' needs value_norms [B, N, S]")
        col = col * value_norms.astype(jnp.float32)
    col = col.sum(axis=1)  # [B, S]
    return _finish(col, key_mask, _denominator(key_mask, query_mask, num_heads, causal), protect)


def acc_scores_from_lse(
    q: Array,
    k: Array,
    lse: Array,
    key_mask: Array,
    query_mask: Array | None = None,
    *,
    scale: float,
    causal: bool = False,
    protect: Array | None = None,
    bias: Array | None = None,
) -> Array:
    """Plain ACC without the probabilities of the attention pass.

    A fused (flash) attention kernel returns the output and the per-row log-sum-exp of the
    logits; ``P[n, i, j] = exp(scale * q_i . k_j - lse[n, i])`` is then recomputed inside one
    reduction, so the [B, N, T, S] probabilities are written once (as logits) and read once,
    instead of passing through softmax, dropout and the context matmul.

    Args:
      q: [B, T, N, H]; k: [B, S, N, H]; lse: [B, N, T] log-sum-exp of the masked logits.
      bias: the additive logits bias the attention pass used, broadcastable to
        [B, N, T, S] (T5's relative position bias); None for none.
    Returns:
      [B, S] float32 scores, equal to ``acc_scores(probs, ..., variant='plain')``.
    """
    if query_mask is None:
        query_mask = key_mask
    vis = attn_lib.visibility(key_mask, q.shape[1], causal) & query_mask[:, None, :, None]
    logits = attn_lib.masked_logits(q, k, vis, scale=scale, bias=bias)  # [B, N, T, S]
    # masked again after exp: a padding query's lse is NEG_INF too, and exp(0) would count
    p = jnp.where(vis, jnp.exp(logits - lse.astype(jnp.float32)[..., None]), 0.0)
    col = p.sum(axis=(1, 2))  # [B, S]
    return _finish(col, key_mask, _denominator(key_mask, query_mask, q.shape[2], causal), protect)


def acc_scores_fused(
    q: Array,
    k: Array,
    key_mask: Array,
    query_mask: Array | None = None,
    *,
    scale: float,
    causal: bool = False,
    protect: Array | None = None,
    lse: Array | None = None,
    interpret: bool = False,
    rel_bias: Array | None = None,
    positions: Array | None = None,
    unfinished: bool = False,
) -> Array | ColumnSums:
    """Plain ACC from q and k by the Pallas kernels of ``accjax.kernels.acc_pallas``: the
    probabilities are recomputed in registers (float32) and never stored.

    Args:
      q: [B, T, N, H]; k: [B, S, N, H]; masks [B, T] / [B, S] bool.
      lse: [B, N, T] float32 log-sum-exp from the attention pass (flash attention returns
        it); None: the kernel computes each row's softmax itself.
      interpret: run the kernel in Pallas' interpreter (CPU tests).
      rel_bias, positions: a logits bias by relative position (T5), [N, 2P - 1], and the
        rows' original positions [B, T]; needs ``lse`` (see ``column_sums_from_lse``).
      unfinished: return the per-head column sums as ``ColumnSums`` (the selection kernel
        finishes them; ``finished`` gives the array). Self-attention only when causal: the
        kernel counts each row's queries from the key mask.
    Returns:
      [B, S] float32, equal to ``acc_scores(probs, ..., variant='plain')``; with
      ``unfinished``, ``ColumnSums`` whose ``finished()`` is that array.
    """
    from accjax import sharding
    from accjax.kernels import acc_pallas

    if unfinished and causal and query_mask is not None:
        raise ValueError("unfinished causal column sums are for self-attention (no query_mask)")
    if query_mask is None:
        query_mask = key_mask
    if lse is None:
        if rel_bias is not None:
            raise ValueError("a relative bias needs the log-sum-exp of the attention pass")
        col = sharding.batch_partitioned(
            ("column_sums", scale, causal, interpret), lambda q_, k_, qm, km: acc_pallas.column_sums(
                q_, k_, qm, km, scale=scale, causal=causal, interpret=interpret),
            (q, k, query_mask, key_mask), (1, 1, 1, 1))
    else:
        col = sharding.batch_partitioned(
            ("column_sums_from_lse", scale, causal, interpret),
            lambda q_, k_, lse_, qm, km, rb, pos: acc_pallas.column_sums_from_lse(
                q_, k_, lse_, qm, km, scale=scale, causal=causal, interpret=interpret, rel_bias=rb,
                positions=pos),
            (q, k, lse, query_mask, key_mask, rel_bias, positions), (1, 1, 1, 1, 1, 0, 1))
    denom = _denominator(key_mask, query_mask, q.shape[2], causal)
    if unfinished:  # col [B, N, S]: one part per head
        return _column_sums(col, key_mask.astype(jnp.float32), denom, protect, q.shape[2] if causal else 0)
    return _finish(col.sum(axis=1), key_mask, denom, protect)  # [B, S]


# ACC sources: probs (materialised probabilities); lse (XLA, from the attention's log-sum-exp,
# any bias); pallas_softmax (second-pass kernel doing its own softmax, one program holds all
# <= 128 keys, no bias); pallas_lse (second-pass kernel from the log-sum-exp, tiled over key
# blocks; T5's bias by distance); pallas (either, by key count and bias); fused (ONE Pallas
# kernel computes the attention and the column sums: no second pass; bidirectional, no bias);
# *_interpret: the same kernels in Pallas' interpreter (CPU tests).
# A new source: a name here, a branch in resolve_acc_impl and one in attend_and_score.
ACC_IMPLS = ("auto", "probs", "lse", "pallas", "pallas_softmax", "pallas_lse", "pallas_interpret",
             "fused", "fused_interpret")
FUSED = ("fused", "fused_interpret")
# 'auto' fuses attention and ACC up to this many keys. Up to 128 every key fits one tile and
# the kernel is one pass; at 129-256 it made two passes over two key tiles (row statistics,
# then the sweep; one pass since ``acc_pallas.key_tiles``) and, reading the packed q/k/v,
# measured as fast as cuDNN + the second-pass kernel on the device and 1-4% faster per
# synchronised call (fewer kernels); at 512 keys 2-12% slower (docs/benchmarks.md, issue 17,
# sixth session), and 7-14% slower pipelined at BERT-base 32 x 512 on an H100 in one pass
# (``acc_pallas.ONE_PASS_MAX_KEYS``) or two (twentieth session).
FUSED_MAX_KEYS = 256
# The same for causal attention (decoders' prompts), whose kernel skips the key tiles past
# each query tile's last row; above it cuDNN's causal attention + the second pass. GPT-2
# 8 x 1024 prefill on an H200, same process, pipelined ms at 2x / 3x / 3.72x: 0 (cuDNN
# everywhere) 3.03 / 2.55 / 2.46; 256: 2.94 / 2.25 / 2.09; 1024: 3.24 / 2.45 / 2.12
# (docs/benchmarks.md, sixteenth session).
FUSED_MAX_KEYS_CAUSAL = 256


def resolve_acc_impl(acc_impl: str, attention_impl: str, *, keys: int, causal: bool = False,
                     bias: bool = False, by_distance: bool = False,
                     shared_bias: bool = False) -> tuple[str, bool]:
    """One layer's (ACC source, run the kernel interpreted?). 'auto' -> beside cuDNN attention
    the fused attention + ACC kernel where it compiles (bidirectional, no bias, at most
    ``FUSED_MAX_KEYS`` keys; causal, ``FUSED_MAX_KEYS_CAUSAL``; T5's bias by distance at any
    row count, ``_distance_attention``), else the second-pass Pallas kernel (given a logits
    ``bias`` only ``by_distance``), else 'lse'; with XLA attention the probabilities it
    materialises anyway; ``shared_bias`` (one [1, N, T, T] bias for the batch) at
    ``SHARED_BIAS_CUDNN_MIN_KEYS`` keys or more: cuDNN + the second pass. Explicit choices
    stay."""
    if acc_impl not in ACC_IMPLS:
        raise ValueError(f"acc_impl must be one of {ACC_IMPLS}, got {acc_impl!r}")
    if acc_impl == "auto":
        if attention_impl != "cudnn":
            return "probs", False
        from accjax.kernels import acc_pallas

        max_keys = FUSED_MAX_KEYS_CAUSAL if causal else FUSED_MAX_KEYS
        if keys <= max_keys and not bias and acc_pallas.available(fused=True):
            return "fused", False
        cudnn_first = (shared_bias and SHARED_BIAS_CUDNN_MIN_KEYS is not None
                       and keys >= SHARED_BIAS_CUDNN_MIN_KEYS)
        if _distance_attention(attention_impl, by_distance, causal, shared_bias=cudnn_first):
            return "fused", DISTANCE_ATTENTION == "interpret"
        kernel = (by_distance or not bias) and acc_pallas.available(rel_bias=bias)
        acc_impl = "pallas" if kernel else "lse"
    interpret = acc_impl in ("pallas_interpret", "fused_interpret")
    if acc_impl in FUSED:
        if bias and (causal or not by_distance):
            raise ValueError("the fused attention + ACC kernel takes a logits bias only as "
                             "bias_by_distance, bidirectional; use acc_impl='lse'")
        return "fused", interpret
    if acc_impl in ("pallas", "pallas_interpret"):
        acc_impl = "pallas_softmax" if keys <= 128 and not bias else "pallas_lse"
    if bias and (acc_impl == "pallas_softmax" or (acc_impl == "pallas_lse" and not by_distance)):
        raise ValueError("the Pallas ACC kernels take a logits bias only as bias_by_distance "
                         "(with the log-sum-exp); use acc_impl='lse'")
    return acc_impl, interpret


# T5's bias by distance (``bias_by_distance``) in a program that eliminates: 'auto' reads it
# inside the fused attention kernel (``acc_pallas.self_attention_by_distance_packed``, on a
# GPU where it compiles), which in an eliminating layer also returns the ACC column sums
# (every eliminating layer, the first included), and in a layer that does not eliminate runs
# attention alone once the rows' positions differ per example, instead of writing the
# [B, N, T, T] bias out for cuDNN in every layer (a layer sharing one [1, N, T, T] bias keeps
# cuDNN); 'never' keeps cuDNN + the second ACC pass; 'interpret' runs the kernel in Pallas'
# interpreter (tests on the CPU).
DISTANCE_ATTENTION = "auto"

# A scoring T5 layer whose rows still share one [1, N, T, T] bias (layer 0: nothing eliminated
# yet) with at least this many keys runs cuDNN attention on that bias + the second ACC pass
# (``column_sums_from_lse`` by distance) instead of the fused one-pass kernel, whose query
# tiles shrink to 32 rows at 512 keys. None: the fused kernel at every row count. H100, same
# process, Flan-T5 16 x 512 pipelined ms (two sets): 2x 3.671, 3.673 against 3.695, 3.681;
# 4x 2.193, 2.195 against 2.208, 2.210; scores within 2e-9 of float32 probabilities' (the
# fused kernel 1.3e-5, scale 7.5e-3; docs/benchmarks.md, twenty-second session).
SHARED_BIAS_CUDNN_MIN_KEYS: int | None = 512

# The fused kernel reads q, k and v from the q/k/v projection's output when the model hands
# it over (``attend_and_score(packed=...)``, BERT family): no split, bias or padding copies.
PACKED_QKV = True
# A layer that does not score, given the packed projection, runs attention alone in the same
# kernel (``acc_pallas.self_attention_packed``) instead of the split copies + cuDNN, up to
# this many keys: 'auto' on a GPU where it compiles, 'never', or 'interpret' (tests on the CPU).
PACKED_ATTENTION = "auto"
PACKED_ATTENTION_MAX_KEYS = 256


def _packed_attention(impl: str, packed, keys: int, head_dim: int, bias, causal: bool) -> bool:
    if (packed is None or not PACKED_QKV or PACKED_ATTENTION == "never" or bias is not None
            or causal or keys > PACKED_ATTENTION_MAX_KEYS):
        return False
    from accjax.kernels import acc_pallas

    if not acc_pallas.packed_heads_ok(head_dim):
        return False
    if PACKED_ATTENTION == "interpret":
        return True
    return impl == "cudnn" and acc_pallas.available(fused=True)


def _distance_attention(impl: str, by_distance, causal: bool, shared_bias: bool = False) -> bool:
    """Whether a T5 layer's attention reads its bias by distance in the fused kernel
    (``DISTANCE_ATTENTION``): bidirectional, given the bias by distance, cuDNN otherwise;
    ``shared_bias`` (one [1, N, T, T] bias for the batch: no row eliminated yet) keeps cuDNN
    for attention alone."""
    if not by_distance or causal or DISTANCE_ATTENTION == "never":  # the kernel is bidirectional
        return False
    if DISTANCE_ATTENTION == "interpret":
        return True
    if impl != "cudnn" or shared_bias:
        return False
    from accjax.kernels import acc_pallas

    return acc_pallas.available(distance=True)


def _attention_by_distance(q, k, v, packed, mf, by_distance, positions, scale, interpret, *, columns):
    """``acc_pallas.self_attention_by_distance_packed`` on the packed projection (``packed``:
    (qkv, None), T5's) where the kernel can read it, else on q, k, v stacked (head size
    padded to a power of two: zeros change no logit). Returns the context [B, T, N, H] and,
    with ``columns``, the unreduced column sums."""
    from accjax.kernels import acc_pallas

    h = q.shape[-1]
    if packed is not None and packed[1] is None and acc_pallas.packed_heads_ok(h):
        qkv = packed[0]
    else:
        hp = acc_pallas._pow2(h)
        qkv = jnp.pad(jnp.stack([q, k, v], axis=2), ((0, 0),) * 4 + ((0, hp - h),))
    out = acc_pallas.self_attention_by_distance_packed(qkv, mf, by_distance, positions, scale,
                                                       interpret, columns, columns)
    if columns:
        return out[0][..., :h], out[1]
    return out[..., :h]


def attend_and_score(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    *,
    scale: float,
    causal: bool = False,
    bias: Array | None = None,
    bias_by_distance: Array | None = None,
    positions: Array | None = None,
    score: bool = False,
    variant: str = "plain",
    protect: Array | None = None,
    attention_impl: str = "auto",
    acc_impl: str = "auto",
    xla_attention_below: int = 0,
    output_attentions: bool = False,
    probs_dropout=None,
    value_norms=None,
    packed: tuple[Array, Array | None] | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Attention and, when ``score``, the ACC of every key row: the one dispatch of all
    model families (BERT, GPT-2, Llama, T5 encoder and decoder), so each path is chosen here.

    Paths (first that applies):
      * one key, no ACC and no probabilities asked for: the context is the value (a
        decoder's first step);
      * probabilities materialised (``attention.attention_with_probs``): returning attention
        maps, attention dropout in training, ACC variants other than plain, or ACC source
        'probs' (the 'auto' choice with XLA attention: the CPU, or a GPU layer with fewer
        than ``xla_attention_below`` rows, where a flash kernel's tiles are mostly empty);
      * ACC source 'fused': one Pallas kernel returns the context and the column sums
        (``acc_pallas.self_attention_with_column_sums``) at any row count (its tiles shrink
        with the rows, so it also replaces XLA attention in tail layers); T5's reads
        ``bias_by_distance`` at ``positions`` from the packed projection;
      * a layer that does not score, given the ``packed`` projection: attention alone in the
        same kernel (``PACKED_ATTENTION``, up to ``PACKED_ATTENTION_MAX_KEYS`` keys, any row
        count), which reads q, k, v and their bias from the one GEMM output;
      * a T5 layer that does not score, once its rows' positions differ per example
        (``DISTANCE_ATTENTION``): attention alone in the same kernel, reading
        ``bias_by_distance`` at ``positions``;
      * ``fused_attention`` (cuDNN flash or XLA), with its log-sum-exp where the ACC source
        reads it, then ``acc_scores_fused`` (Pallas) or ``acc_scores_from_lse`` (XLA).
    The logits ``bias`` goes to the attention as given (cuDNN casts it to the input dtype,
    XLA adds it to float32 logits) and to ``acc_scores_from_lse``; the Pallas kernel reads
    ``bias_by_distance`` at ``positions`` instead. Named scopes ('attention', 'attention_acc',
    'acc_score') let ``eval.profile`` attribute kernels.

    Args:
      q: [B, T, N, H]; k, v: [B, S, N, H]; mask: [B, S] bool key mask (= query mask when
        scoring, which is self-attention).
      bias: additive logits bias broadcastable to [B, N, T, S] (T5's position bias), or None.
      bias_by_distance: [N, 2P - 1] the same bias by key - query position (P = input length),
        with positions [B, T] the rows' ORIGINAL positions; lets the Pallas kernel score.
      score: compute ACC (the layer eliminates).
      value_norms: () -> [B, N, S], called only for the ``value_norm`` variant.
      packed: (qkv [B, T, 3, N, H] before its bias, bias [3, N, H] or None), the fused
        projection q, k and v were split from: the fused kernel reads it directly
        (``PACKED_QKV``), so the split copies are never made (unused, XLA drops them).
    Returns:
      (context [B, T, N, H], ACC [B, S] or None, probabilities [B, N, T, S] or None). From
      the fused kernel on the packed projection (or T5's by distance) and from the Pallas
      second pass the ACC comes unfinished, as ``ColumnSums``: ``eliminate`` ranks by them,
      ``finished`` makes the array.
    """
    impl = attn_lib.resolve_implementation(attention_impl, q.dtype)
    how, interpret = "probs", False
    if score and variant == "plain":
        how, interpret = resolve_acc_impl(acc_impl, impl, keys=k.shape[1], causal=causal,
                                          bias=bias is not None, by_distance=bias_by_distance is not None,
                                          shared_bias=bias is not None and bias.shape[0] == 1)
    need_probs = output_attentions or probs_dropout is not None
    if k.shape[1] == 1 and not score and not need_probs:
        # One key: its softmax weight is exactly 1 whatever its logit, bias or mask (a masked
        # logit is finite, NEG_INF), so every query's context is its value, as XLA's path
        # computes it. A decoder's first step (T5's first token) skips the scores, bias and
        # softmax of its self-attention in every layer.
        with jax.named_scope("attention"):
            return jnp.broadcast_to(v, q.shape[:3] + v.shape[3:]), None, None
    sg = jax.lax.stop_gradient  # ACC only ranks rows (top-k is not differentiable): no gradient
    if score and how == "fused" and not need_probs:
        from accjax.kernels import acc_pallas

        mf = mask.astype(jnp.float32)
        denom = _denominator(mask, mask, q.shape[2], causal)
        with jax.named_scope("attention_acc"):
            # the parts are finished by the selection kernel, or by XLA where that does not run
            heads = q.shape[2] if causal else 0
            if bias_by_distance is not None:  # T5: bias by distance, no projection bias
                ctx, parts = _attention_by_distance(q, k, v, packed, mf, bias_by_distance, positions,
                                                    scale, interpret, columns=True)
                return ctx.astype(q.dtype), _column_sums(sg(parts), mf, denom, protect, heads), None
            if PACKED_QKV and packed is not None and acc_pallas.packed_heads_ok(q.shape[-1]):
                ctx, parts = acc_pallas.self_attention_with_column_sums_packed(
                    *packed, mf, scale, causal, interpret, True)
                return ctx.astype(q.dtype), _column_sums(sg(parts), mf, denom, protect, heads), None
            ctx, col = acc_pallas.self_attention_with_column_sums(
                q, k, v, mf, scale, causal, interpret)  # [B, T, N, H], [B, N, S]
        with jax.named_scope("acc_score"):
            scores = _finish(sg(col).sum(axis=1), mask, denom, protect)
        return ctx.astype(q.dtype), scores, None
    # attention alone from the packed projection at any row count (tiles shrink with the rows)
    packed_attention = not score and not need_probs and _packed_attention(
        impl, packed, k.shape[1], q.shape[-1], bias, causal)
    if impl == "cudnn" and q.shape[1] < xla_attention_below:
        impl = "xla"
        if score and acc_impl == "auto" and variant == "plain":
            how, interpret = "probs", False  # XLA attention materialises the probabilities anyway
    probs = scores = lse = None
    with jax.named_scope("attention"):
        if need_probs or (score and how == "probs"):
            ctx, probs = attn_lib.attention_with_probs(q, k, v, mask, scale=scale, causal=causal,
                                                       bias=bias, probs_dropout=probs_dropout)
        elif packed_attention:
            from accjax.kernels import acc_pallas

            ctx = acc_pallas.self_attention_packed(*packed, mask.astype(jnp.float32), scale, causal,
                                                   PACKED_ATTENTION == "interpret").astype(q.dtype)
        elif not score and _distance_attention(impl, bias_by_distance is not None, causal,
                                               shared_bias=bias is not None and bias.shape[0] == 1):
            # (a scoring layer took the fused path above, or needs the log-sum-exp below)
            ctx = _attention_by_distance(q, k, v, packed, mask.astype(jnp.float32), bias_by_distance,
                                         positions, scale, DISTANCE_ATTENTION == "interpret", columns=False)
        else:
            want_lse = score and how in ("lse", "pallas_lse")
            out = attn_lib.fused_attention(q, k, v, mask, scale=scale, causal=causal, bias=bias,
                                           implementation=impl, return_lse=want_lse)
            ctx, lse = out if want_lse else (out, None)
    if score:
        if impl == "cudnn" and lse is not None:
            # cuDNN's log-sum-exp counts the bias rounded to the inputs' dtype (as it takes it):
            # the second pass recomputes the probabilities with the same rounding
            bias, bias_by_distance = (None if x is None else x.astype(q.dtype) for x in (bias, bias_by_distance))
        with jax.named_scope("acc_score"):
            if probs is not None:
                vn = sg(value_norms()) if variant == "value_norm" else None
                scores = acc_scores(sg(probs), mask, variant=variant, causal=causal, protect=protect,
                                    value_norms=vn)
            elif how == "lse":
                scores = acc_scores_from_lse(sg(q), sg(k), sg(lse), mask, scale=scale, causal=causal,
                                             protect=protect, bias=sg(bias))
            else:
                # unfinished: the selection kernel sums the heads' parts where it runs (up to
                # ``keep_rows.MAX_ROWS`` rows, or from ``LARGE_MIN_ROWS``), XLA elsewhere
                scores = acc_scores_fused(sg(q), sg(k), mask, scale=scale, causal=causal,
                                          protect=protect, interpret=interpret, lse=sg(lse),
                                          rel_bias=sg(bias_by_distance), positions=positions,
                                          unfinished=True)
    return ctx, scores, probs


# On a GPU, up to this many rows, select by counting ranks ([B, T, T] comparisons, a few
# small fusions) instead of lax.top_k + sort (sort kernels); both give the same indices.
# Not on the CPU, where the comparisons cost more than the sort (docs/benchmarks.md, "CPU
# check" of issue 17).
RANK_SELECT_MAX_ROWS = 1024
SELECT_METHODS = ("auto", "top_k", "rank", "kernel")
SELECT_METHOD = "auto"  # what ``select_rows`` uses when not told (benchmarks A/B it)


def _select_method(method: str | None, t: int, tensors=()) -> str:
    """The selection ``select_rows`` / ``eliminate`` run among ``t`` rows: ``method`` (None:
    ``SELECT_METHOD``); 'auto' is the one kernel of ``accjax.kernels.keep_rows`` (selection
    and gather) where it applies, else rank counting on a GPU up to ``RANK_SELECT_MAX_ROWS``
    rows, else top_k."""
    from accjax.kernels import keep_rows

    method = SELECT_METHOD if method is None else method
    if method not in SELECT_METHODS:
        raise ValueError(f"select method must be one of {SELECT_METHODS}, got {method!r}")
    if method == "kernel" and not keep_rows.applies(t, tensors):
        method = "auto"  # asked for where it cannot run (the CPU, too many rows): the XLA paths
    if method == "auto":
        gpu = jax.default_backend() == "gpu"
        if gpu and keep_rows.applies(t, tensors):
            return "kernel"
        return "rank" if gpu and t <= RANK_SELECT_MAX_ROWS else "top_k"
    return method


def select_rows(scores: Array, keep: int, method: str | None = None) -> Array:
    """Indices [B, keep] of the ``keep`` highest-scoring rows, in original order.

    ``keep`` is a static Python int: it fixes the output shape under ``jax.jit``. Ties go to
    the lower index (as ``lax.top_k``). ``method``: 'top_k' (``lax.top_k``, then a sort of
    the kept indices), 'rank' (no sort: a row is kept when fewer than ``keep`` rows beat it,
    and the i-th kept row is found by counting), 'kernel' (the same counting in one Pallas
    kernel, ``accjax.kernels.keep_rows``), 'auto' (``_select_method``); None:
    ``SELECT_METHOD``.
    Worked example, scores [0.2, 0.9, -inf, 0.5], keep 2::

        beaten by   [2, 0, 3, 1]  -> kept [F, T, F, T]
        kept so far [0, 1, 1, 2]  -> index r = #(kept so far <= r): r=0 -> 1, r=1 -> 3
    """
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive Python int, got {keep!r}")
    if keep > scores.shape[1]:
        raise ValueError(f"cannot keep {keep} of {scores.shape[1]} rows")
    t = scores.shape[1]
    method = _select_method(method, t)
    if method == "kernel":
        from accjax.kernels import keep_rows

        return keep_rows.select_and_gather(scores, [], keep, keep_rows.KERNEL == "interpret")[0]
    if method == "top_k":
        from accjax import sharding

        # lax.top_k is a custom call on the CPU: split along the batch, not gathered, under SPMD
        idx = sharding.batch_partitioned(("top_k", keep), lambda s: lax.top_k(s, keep)[1], (scores,), (1,))
        return jnp.sort(idx, axis=1).astype(jnp.int32)  # [B, K] (best first -> original order)
    i = jnp.arange(t, dtype=jnp.int32)
    a, b = scores[:, :, None], scores[:, None, :]  # [B, I, 1], [B, 1, J]
    beats = (a > b) | ((a == b) & (i[:, None] < i[None, :]))  # [B, I, J]: row i ranks above j
    kept = beats.sum(axis=1, dtype=jnp.int32) < keep  # [B, J]
    so_far = jnp.cumsum(kept, axis=1, dtype=jnp.int32)  # [B, J] kept rows among 0..j
    r = jnp.arange(keep, dtype=jnp.int32)
    return (so_far[:, None, :] <= r[None, :, None]).sum(axis=2, dtype=jnp.int32)  # [B, K]


def take_rows(x: Array, idx: Array) -> Array:
    """Gathers rows ``idx`` [B, K] along axis 1 of ``x`` [B, T, ...] -> [B, K, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def take_prefix(keep: int, rows: Rows, *tensors: Array) -> tuple[Array, Rows, tuple[Any, ...]]:
    """The ``prefix`` baseline: keeps rows [0, keep) (right-padded inputs: real rows first)."""
    b = rows.mask.shape[0]
    idx = jnp.broadcast_to(jnp.arange(keep, dtype=jnp.int32), (b, keep))
    return idx, jax.tree.map(lambda a: a[:, :keep], rows), tuple(t[:, :keep] for t in tensors)


def eliminate(scores: Array | ColumnSums, keep: int, rows: Rows, *tensors: Array
              ) -> tuple[Array, Rows, tuple[Any, ...]]:
    """Keeps the ``keep`` best rows of ``rows`` and of every tensor [B, T, ...] given, by ACC
    [B, T] or by the fused kernel's ``ColumnSums``.

    Returns:
      (idx [B, K], rows gathered, tensors gathered), all in original row order.
    """
    t = rows.mask.shape[1]
    if _select_method(None, t, tensors) == "kernel":
        from accjax.kernels import keep_rows

        if not isinstance(keep, int) or not 1 <= keep <= t:
            select_rows(finished(scores), keep)  # its error
        raw = isinstance(scores, ColumnSums)
        # the row mask (as the fused kernel reads it, float) and positions are gathered in
        # the kernel too; token types (read by nothing after the embeddings) by XLA
        mask = scores.mask if raw else rows.mask.astype(jnp.float32)
        with jax.named_scope("select_gather"):
            idx, kept, (kept_mask, kept_pos) = keep_rows.select_and_gather(
                scores.parts if raw else scores, list(tensors), keep, keep_rows.KERNEL == "interpret",
                scores.mask if raw else None, raw and scores.protect == FIRST_ROW, [mask, rows.positions],
                scores.causal_heads if raw else 0)
        with jax.named_scope("gather_rows"):
            types = None if rows.token_types is None else jnp.take_along_axis(rows.token_types, idx, axis=1)
            return idx, Rows(mask=kept_mask > 0.5, positions=kept_pos, token_types=types), tuple(kept)
    scores = finished(scores)
    with jax.named_scope("select"):
        idx = select_rows(scores, keep)
    with jax.named_scope("gather_rows"):
        return idx, rows.take(idx), tuple(take_rows(t, idx) for t in tensors)


# ``fuse`` of ``drop_rows``: '' drops the rows; 'acc' / 'mean' keeps ``keep - 1`` rows and
# replaces the others by one row, their ACC-weighted / plain mean
FUSE_MODES = ("", "acc", "mean")
FUSED_POSITION = -1  # ``Rows.positions`` of a fused row: it stands for no single input token


def fuse_dropped(scores: Array | ColumnSums, keep: int, rows: Rows, *tensors: Array, weights: str = "acc"
                 ) -> tuple[Array, Rows, tuple[Any, ...]]:
    """Keeps the ``keep - 1`` best rows and appends one row that stands for all the others:
    each tensor's mean over the dropped real rows, weighted by their ACC (``weights='acc'``;
    no gradient flows through the weights) or not ('mean'). The token-fusion variant of
    elimination (EViT, Liang et al. 2022): what the dropped rows carried stays in the
    sequence as one row, at the cost of one kept row. The fused row's position is
    ``FUSED_POSITION``; it is real when any dropped row was. Returns (idx [B, K-1] of the
    kept rows, rows [B, K], tensors [B, K, ...])."""
    if keep < 2:
        raise ValueError(f"a fused row needs keep >= 2 (one kept row and the fused one), got {keep}")
    scores = finished(scores)
    idx, kept_rows, kept = eliminate(scores, keep - 1, rows, *tensors)
    with jax.named_scope("fuse_rows"):
        b, t = rows.mask.shape
        kept_any = (idx[:, :, None] == jnp.arange(t, dtype=idx.dtype)).any(1)  # [B, T] (no scatter)
        dropped = ~kept_any & rows.mask  # [B, T]
        if weights == "acc":
            w = jnp.where(dropped, jnp.maximum(lax.stop_gradient(scores).astype(jnp.float32), 0.0), 0.0)
            w = w + 1e-6 * dropped  # rows with zero ACC still count when all weights are zero
        elif weights == "mean":
            w = dropped.astype(jnp.float32)
        else:
            raise ValueError(f"fuse weights must be 'acc' or 'mean', got {weights!r}")
        w = w / jnp.maximum(w.sum(1, keepdims=True), 1e-30)  # [B, T], 0 where nothing is dropped

        def with_fused(full: Array, part: Array) -> Array:  # [B, T, ...], [B, K-1, ...]
            fused = jnp.einsum("bt,bt...->b...", w.astype(full.dtype), full,
                               preferred_element_type=jnp.float32).astype(full.dtype)
            return jnp.concatenate([part, fused[:, None]], axis=1)

        fused_rows = Rows(
            mask=jnp.concatenate([kept_rows.mask, dropped.any(1, keepdims=True)], 1),
            positions=jnp.concatenate([kept_rows.positions, jnp.full((b, 1), FUSED_POSITION, jnp.int32)], 1),
            token_types=None if rows.token_types is None else jnp.concatenate(
                [kept_rows.token_types, jnp.zeros((b, 1), jnp.int32)], 1))
        return idx, fused_rows, tuple(with_fused(f, p) for f, p in zip(tensors, kept))


def drop_rows(scores: Array | ColumnSums | None, keep: int, rows: Rows, out: dict, *tensors: Array,
              prefix: bool = False, fuse: str = "") -> tuple[Rows, tuple[Any, ...]]:
    """A layer's elimination after attention, as every family records it: the ``keep`` best
    rows by ``scores`` (``eliminate``), or rows [0, keep) when ``prefix`` (``take_prefix``,
    no scores), or with ``fuse`` (``FUSE_MODES``) and keep >= 2 the ``keep - 1`` best and
    one fused row (``fuse_dropped``). Writes ``keep_idx`` (indices of the kept input rows),
    ``positions`` [B, K] (``FUSED_POSITION`` for a fused row) and ``acc``, the scores
    ranked, into the layer's ``out``; returns (rows, tensors) gathered to the kept rows."""
    if fuse not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
    if prefix:
        idx, rows, tensors = take_prefix(keep, rows, *tensors)
    elif fuse and keep >= 2:
        idx, rows, tensors = fuse_dropped(scores, keep, rows, *tensors, weights=fuse)
        out["acc"] = finished(scores)
    else:
        idx, rows, tensors = eliminate(scores, keep, rows, *tensors)
        out["acc"] = finished(scores)  # XLA drops it where nothing reads it
    out.update(keep_idx=idx, positions=rows.positions)
    return rows, tensors
