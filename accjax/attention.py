"""Scaled dot-product attention cores shared by the model families.

Letters: B batch, T query rows, S key rows, N heads, H head size.

Masks are boolean, True = may attend. ``key_mask`` [B, S] masks padding keys; ``causal``
adds ``i >= j`` (queries see themselves and earlier keys; with T < S the queries are the
LAST T positions, as in KV-cache decoding). Example for T = S = 3, key_mask [T T F]::

    causal=False      causal=True
    [[1 1 0]          [[1 0 0]
     [1 1 0]           [1 1 0]
     [1 1 0]]          [1 1 0]]

Masked logits are set to the most negative float32 rather than -inf, so a row with no
visible key (a padding row of an all-padding example) softmaxes to uniform, never NaN.

Two paths:
  * ``attention_with_probs`` (``softmax_attention`` under any visibility mask): logits and
    probabilities materialised; needed for ACC scoring from probabilities, attention dropout
    and returning attention maps. Softmax in float32; XLA's ``fused_attention`` is the same.
  * ``fused_attention``: ``jax.nn.dot_product_attention``; on GPU with bf16/fp16 inputs it
    uses cuDNN flash attention (no [B, N, T, S] tensor in memory), elsewhere XLA.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

NEG_INF = float(jnp.finfo(jnp.float32).min)


def visibility(key_mask: Array, t: int, causal: bool) -> Array:
    """[B, 1, T, S] bool: which keys each query may attend to."""
    s = key_mask.shape[1]
    vis = key_mask[:, None, None, :]
    if causal:
        vis = vis & jnp.tril(jnp.ones((t, s), bool), s - t)[None, None]
    return vis


def masked_logits(q: Array, k: Array, vis: Array, *, scale: float, bias: Array | None = None) -> Array:
    """float32 logits ``scale * q.k (+ bias)`` [B, N, T, S], NEG_INF where ``vis`` is False.

    q: [B, T, N, H]; k: [B, S, N, H]; vis: bool broadcastable to [B, N, T, S]
    (``visibility``); bias broadcastable to [B, N, T, S], added in float32.
    """
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return jnp.where(vis, logits, NEG_INF)


def softmax_attention(q: Array, k: Array, v: Array, vis: Array, *, scale: float, bias: Array | None = None,
                      probs_dropout: Callable[[Array], Array] | None = None) -> tuple[Array, Array, Array]:
    """Attention under any visibility mask (args as ``masked_logits``; v [B, S, N, H]).

    Returns (context [B, T, N, H] in v.dtype, probs [B, N, T, S] float32 before
    ``probs_dropout``, log-sum-exp [B, N, T] float32); under jit unused outputs cost nothing.
    """
    logits = masked_logits(q, k, vis, scale=scale, bias=bias)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, N, T, S]
    p = probs if probs_dropout is None else probs_dropout(probs)
    ctx = jnp.einsum("BNTS,BSNH->BTNH", p.astype(v.dtype), v)
    return ctx, probs, jax.nn.logsumexp(logits, axis=-1)


def attention_with_probs(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array,
    *,
    scale: float,
    causal: bool = False,
    bias: Array | None = None,
    probs_dropout: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array]:
    """Attention that also returns its probabilities.

    Args:
      q: [B, T, N, H]; k, v: [B, S, N, H]; key_mask: [B, S] bool.
      scale: logit scale (1/sqrt(H) for BERT/GPT-2, 1.0 for T5).
      bias: optional additive logits bias broadcastable to [B, N, T, S] (T5 positions).
      probs_dropout: applied to the probabilities before the context matmul (training).
    Returns:
      (context [B, T, N, H] in q.dtype, probs [B, N, T, S] float32, before dropout).
    """
    ctx, probs, _ = softmax_attention(q, k, v, visibility(key_mask, q.shape[1], causal), scale=scale,
                                      bias=bias, probs_dropout=probs_dropout)
    return ctx, probs


def fused_attention(q: Array, k: Array, v: Array, key_mask: Array, *, scale: float, causal: bool = False,
                    bias: Array | None = None, implementation: str | None = None,
                    return_lse: bool = False) -> Array | tuple[Array, Array]:
    """Attention without materialised probabilities where the backend allows it.

    Args as ``attention_with_probs``; ``implementation`` is 'xla', 'cudnn' or None/'auto'
    (cuDNN flash attention on GPU for bf16/fp16 inputs, XLA elsewhere).
    Returns:
      context [B, T, N, H] in q.dtype; with ``return_lse`` also the log-sum-exp of each
      query's masked logits, [B, N, T] float32 (what ``acc.acc_scores_from_lse`` needs).
    """
    implementation = resolve_implementation(implementation, q.dtype)
    if implementation == "xla":
        ctx, _, lse = softmax_attention(q, k, v, visibility(key_mask, q.shape[1], causal),
                                        scale=scale, bias=bias)
        return (ctx, lse) if return_lse else ctx
    return _cudnn_attention(q, k, v, key_mask, scale=scale, causal=causal, bias=bias,
                            return_lse=return_lse)


def _cudnn_attention(q, k, v, key_mask, *, scale, causal, bias, return_lse):
    """cuDNN flash attention with the padding given as key lengths.

    The key mask is taken to be a prefix (real tokens first, then padding): accjax's
    tokenizer right-pads and elimination keeps kept rows in order with padding last, so
    this holds through every layer. A length mask lets cuDNN skip padded keys instead of
    reading a materialised [B, 1, T, S] bias.
    """
    b, t = q.shape[:2]
    bias = None if bias is None else bias.astype(q.dtype)  # cuDNN takes it in the input dtype
    kv_len = key_mask.sum(axis=-1).astype(jnp.int32)  # [B]
    q_len = jnp.full((b,), t, jnp.int32)
    if return_lse:
        # The public wrapper casts the log-sum-exp to the input dtype (bf16: ~0.03 absolute
        # error, a few percent on every probability); the underlying call returns float32.
        try:
            from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

            mask_type = cudnn_fa.MaskType.PADDING_CAUSAL if causal else cudnn_fa.MaskType.PADDING
            ctx, lse = cudnn_fa.dot_product_attention(
                q, k, v, bias=bias, q_seqlen=q_len, kv_seqlen=kv_len, scale=scale,
                mask_type=mask_type, qkv_layout="BTNH", return_residual=True)
            return ctx, lse.astype(jnp.float32)  # lse [B, N, T]
        except (ImportError, AttributeError, TypeError):
            pass
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, scale=scale, is_causal=causal, query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len, implementation="cudnn", return_residual=return_lse)
    if not return_lse:
        return out
    ctx, lse = out  # the public API returns the residual as [B, T, N]
    return ctx, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)


def resolve_implementation(implementation: str | None, dtype) -> str:
    if implementation in (None, "auto"):  # cuDNN flash attention on GPU for half-precision inputs
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if jax.default_backend() == "gpu" and half else "xla"
    if implementation not in ("xla", "cudnn"):
        raise ValueError(f"attention implementation must be 'auto', 'xla' or 'cudnn', got {implementation!r}")
    return implementation
