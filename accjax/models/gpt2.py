"""GPT-2 in Flax linen, with ACC word-vector elimination during prompt prefill and a pruned
KV cache for decoding.

Numerically matches Hugging Face ``GPT2Model`` / ``GPT2LMHeadModel`` /
``GPT2ForSequenceClassification`` at fp32: token + learned position embeddings, pre-LN blocks,
causal attention, a final LayerNorm, an LM head tied to the token embedding, and a
classification head reading the last real token.

Inputs are RIGHT-padded (real tokens first), as accjax's tokenizer pads; GPT-2 has no pad
token, so the mask says what is real and the pad id (usually eos, 50256) is never read.
Position ids default to 0..T-1, which is right for right-padded rows.

Elimination (BERT's placement, see ``accjax.acc``): a layer given a static ``keep`` below its
input rows T scores them by causal ACC (each column divided by the number of real queries
that can see it) and keeps the ``keep`` best in original order; the output projection, the
residual adds and the MLP run on the kept rows only. The last real token (it predicts the
next token, or the classifier pools it) is never dropped; with ``protect_first`` neither is
the first position (an "attention sink"), ranked just below it (``eliminate_prompt_rows``).

KV cache (decoding after a pruned prefill). Layer l computes K/V for the rows that ENTER it,
then keeps ``keep_l`` of them; its cache holds the K/V of exactly those kept rows (the rows
that also enter layer l+1), with their original position ids, plus ``max_new_tokens`` empty
slots. A decoded token at layer l therefore attends to the kept rows of layer l and to the
tokens decoded before it; position ids continue from the number of real prompt tokens. With
nothing dropped this is the ordinary dense KV cache, token for token::

    prompt rows 0..7, keep = (6, 3):   layer 0 cache: K/V_0 of the 6 rows layer 0 kept
                                       layer 1 cache: K/V_1 of the 3 rows layer 1 kept
    new token (position 8) at layer 1 attends to those 3 rows and to itself.

Einsum letters: B batch, T query rows, S key rows / cache slots, K kept rows, D hidden size,
N heads, H head size (D = N * H), F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from accjax import acc as acc_lib
from accjax import attention as attn_lib
from accjax.models import common

Array = jax.Array

# Row rankings a GPT-2 layer accepts: the ACC forms, and 'recent' (keep the most recent rows:
# a sliding window; with protect_first it is the attention-sink + window baseline). The
# encoder baseline 'prefix' keeps the FIRST rows and would drop the last token, so it is
# refused here.
RANKINGS = acc_lib.VARIANTS + ("recent",)

# Where q, k and v come from three GEMMs kept apart (``common.qkv_apart``) rather than copied
# out of the one projection for cuDNN, in a layer that does not eliminate (a dense program's),
# from ``common.QKV_APART_MIN_ROWS`` rows. H100, 8 x 1024, same process: the dense classifier
# 4.6% faster, the dense LM prefill 3.3%. Not in an eliminating layer: the weight and bias
# slices and three GEMMs are four to seven kernels more a layer, which in GPT-2's 3.72x prefill
# cost more than the 12 us they saved in its first layer (the LM prefill 2.7% slower, the
# classifier 0.2-0.6% faster); the fused kernel's layers read the one projection anyway, and
# a decoding step's one row a sequence takes it too (docs/benchmarks.md, thirty-second session).
SEPARATE_QKV_BACKENDS: tuple[str, ...] = ("gpu",)

# Rank of the attention-sink row: above every ACC score, below the +inf of the last token.
_SINK_SCORE = float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class GPT2Config(common.ModelConfig):
    vocab_size: int = 50257  # byte-level BPE vocabulary (HF vocab_size)
    hidden_size: int = 768  # D (HF n_embd)
    num_layers: int = 12  # L decoder blocks (HF n_layer)
    num_heads: int = 12  # N; head size H = D / N (HF n_head)
    intermediate_size: int = 3072  # F, MLP width (HF n_inner; None there means 4 * D)
    max_position_embeddings: int = 1024  # longest prompt + generation (HF n_positions)
    layer_norm_eps: float = 1e-5  # HF layer_norm_epsilon
    activation: str = "gelu_new"  # HF activation_function; gelu_new is the tanh form
    embd_dropout: float = 0.1  # after the embedding sum (HF embd_pdrop)
    resid_dropout: float = 0.1  # on both residual branches (HF resid_pdrop)
    attention_dropout: float = 0.1  # on attention probabilities (HF attn_pdrop)
    initializer_range: float = 0.02  # std of N(0, std) weight init
    num_labels: int = 2  # classification head width; 1 = regression
    pad_token_id: int | None = None  # None as in HF gpt2; the classifier then pools by mask
    bos_token_id: int = 50256
    eos_token_id: int = 50256  # '<|endoftext|>'; also the pad id accjax uses for GPT-2
    protect_first: bool = False  # never drop position 0 (attention sink) during elimination
    xla_attention_below: int = 0  # layers with fewer input rows use XLA attention on GPU
    # rows of the token table wte when it holds more than the vocabulary (0: vocab_size): serving
    # pads it once (``pad_vocab``) so the tied LM head's GEMM is not padded by XLA in every call;
    # logits past vocab_size are dropped
    vocab_rows: int = 0
    family: str = "gpt2"
    activation_field = "activation"  # (a class attribute, not a field)
    hf_keys = {**{f: f for f in ("vocab_size", "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id")},
               "hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
               "intermediate_size": "n_inner", "max_position_embeddings": "n_positions",
               "layer_norm_eps": "layer_norm_epsilon", "activation": "activation_function",
               "embd_dropout": "embd_pdrop", "resid_dropout": "resid_pdrop", "attention_dropout": "attn_pdrop"}

    # -- Hugging Face config.json <-> GPT2Config ------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides) -> "GPT2Config":
        supported = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                     "add_cross_attention": False, "tie_word_embeddings": True}  # absent keys count as these
        bad = [f"{k}={d[k]!r}" for k, want in supported.items() if bool(d.get(k, want)) != want]
        if bad:
            raise ValueError(f"GPT-2 options not supported by accjax: {', '.join(bad)}")
        kw = cls.hf_fields(d)
        kw.setdefault("intermediate_size", 4 * kw["hidden_size"])  # n_inner null: 4 D
        for k in ("bos_token_id", "eos_token_id"):  # some files hold a list: keep 50256
            if not isinstance(kw.get(k, 0), int):
                del kw[k]
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **self.hf_values(),
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "tie_word_embeddings": True}


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),  # 124M
    "gpt2-medium": GPT2Config(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


# ------------------------------------------------------------------------------ outputs
@struct.dataclass
class GPT2Output:
    """What a forward pass returns; unused fields cost nothing under ``jax.jit``.

    Attributes:
      last_hidden_state: [B, K_L, D] after the final LayerNorm, the rows that survived.
      rows: ``acc.Rows`` of the surviving rows (mask, original positions).
      layers: per layer a dict; eliminating layers hold ``acc`` [B, T] (scores of the rows
        that entered), ``keep_idx`` [B, K] (indices into that layer's input, sorted) and
        ``positions`` [B, K] (original positions of the kept rows). With ``return_kv`` every
        layer also holds ``k``, ``v`` [B, K, N, H] and ``rows`` (its kept rows).
      hidden_states: (embeddings, block 1, ..., block L-1, final LayerNorm output), as HF.
      attentions: per layer [B, N, T, T] float32 probabilities, if asked for.
      logits: [B, K_L, V] (LM head) or [B, C] (classifier), float32; None for the base model.
    """

    last_hidden_state: Array
    rows: acc_lib.Rows
    layers: tuple[dict[str, Any], ...]
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    logits: Array | None = None


@struct.dataclass
class KVCache:
    """Per-layer key/value cache of static size, possibly pruned by elimination.

    Layer l has ``S_l = prompt_slots[l] + max_new_tokens`` slots: the first
    ``prompt_slots[l]`` (= that layer's keep-length, the prompt length when dense) hold the
    K/V of the prompt rows layer l kept, in original order; decoded tokens are written from
    slot ``prompt_slots[l] + step`` on.

    Attributes:
      keys, values: per layer [B, S_l, N, H] in the compute dtype.
      mask: per layer [B, S_l] bool, True where a slot holds a real token.
      positions: per layer [B, S_l] int32 original position id of each slot (-1: empty).
      next_position: [B] int32 position id the next token gets (real prompt length + step).
      step: [] int32, tokens appended since the prefill.
      prompt_slots: per layer the number of prompt slots (static Python ints).
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    mask: tuple[Array, ...]
    positions: tuple[Array, ...]
    next_position: Array
    step: Array
    prompt_slots: tuple[int, ...] = struct.field(pytree_node=False)

    def nbytes(self, prompt_only: bool = False) -> int:
        """Bytes of the K and V buffers (all slots, or only the prompt slots)."""
        return int(sum(2 * k.shape[0] * (p if prompt_only else k.shape[1]) * k.shape[2] * k.shape[3]
                       * jnp.dtype(k.dtype).itemsize for k, p in zip(self.keys, self.prompt_slots)))


# ------------------------------------------------------------------------------ helpers
def last_real_position(mask: Array) -> Array:
    """[B] index of the last real token of right-padded rows (0 for an all-padding row)."""
    return jnp.maximum(mask.astype(jnp.int32).sum(axis=1) - 1, 0)


def decoder_rows(input_ids: Array, attention_mask: Array | None, position_ids: Array | None,
                 protect_positions: Array | None) -> tuple[acc_lib.Rows, Array]:
    """A decoder call's rows (all real when no mask is given) and the [B] position never
    dropped (default: the last real token)."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    rows = acc_lib.Rows.create(attention_mask, position_ids)
    return rows, last_real_position(rows.mask) if protect_positions is None else protect_positions


def pool_positions(input_ids: Array, mask: Array, pad_token_id: int | None) -> Array:
    """[B] the token the classifier reads, as HF ``GPT2ForSequenceClassification`` picks it.

    HF takes the rightmost token whose id is not ``pad_token_id`` (or the last column when
    no pad id is set, which it allows only for batch 1). accjax takes the rightmost token that
    is real by the mask and, when a pad id is set, not a pad id; if no such token exists, the
    last real one. The two agree whenever padding slots hold the pad id (accjax's tokenizer
    pads with it), and accjax's rule also works for batches without a pad id.
    """
    real = mask.astype(bool)
    if pad_token_id is None:
        return last_real_position(real)
    ok = real & (input_ids != pad_token_id)  # [B, T]
    by_id = jnp.max(jnp.where(ok, jnp.arange(real.shape[1], dtype=jnp.int32), -1), axis=1)
    return jnp.where(ok.any(axis=1), by_id, last_real_position(real)).astype(jnp.int32)


def run_blocks(blocks, final_norm, x: Array, rows, protect_positions: Array, schedule, **kw
               ) -> GPT2Output:
    """A decoder's blocks in turn (``common.run_layers``), then the final norm: as HF, the last
    hidden state is after it (GPT-2 and Llama)."""
    x, rows, layers, hidden, attentions = common.run_layers(
        blocks, x, rows, schedule, protect_positions, final_norm=final_norm, **kw)
    return GPT2Output(last_hidden_state=x, rows=rows, layers=layers, hidden_states=hidden,
                      attentions=attentions)


def extend_blocks(blocks, final_norm, embed, input_ids: Array, cache):
    """New tokens [B, T], embedded by ``embed(ids, positions)`` (positions counting on from the
    cache's), through every block against its KV cache (GPT-2 and Llama) -> (the final norm of
    their hidden states [B, T, D], the updated cache)."""
    positions = cache.next_position[:, None] + jnp.arange(input_ids.shape[1], dtype=jnp.int32)  # [B, T]
    x = embed(input_ids, positions)  # [B, T, D]
    layers = []
    for l, block in enumerate(blocks):
        x, layer = block.extend(x, (cache.keys[l], cache.values[l], cache.mask[l], cache.positions[l]),
                                positions, cache.prompt_slots[l] + cache.step)
        layers.append(layer)
    ks, vs, ms, ps = zip(*layers)
    t = positions.shape[1]
    cache = cache.replace(keys=ks, values=vs, mask=ms, positions=ps, next_position=cache.next_position + t,
                          step=cache.step + t)
    return final_norm(x), cache


def write_cache(layer_cache, k: Array, v: Array, positions: Array, start: Array):
    """Writes new tokens (k, v [B, T, G, H], positions [B, T]) into one layer's cache (keys,
    values [B, S, G, H], slot mask and positions [B, S]) from slot ``start`` on. Returns the
    cache and what each new token sees [B, 1, T, S]: every filled slot up to its own."""
    keys, values, slot_mask, slot_positions = layer_cache
    keys = lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, start, 0, 0))
    values = lax.dynamic_update_slice(values, v.astype(values.dtype), (0, start, 0, 0))
    slot_mask = lax.dynamic_update_slice(slot_mask, jnp.ones(positions.shape, bool), (0, start))
    slot_positions = lax.dynamic_update_slice(slot_positions, positions.astype(jnp.int32), (0, start))
    upto = start + jnp.arange(k.shape[1])[:, None] >= jnp.arange(keys.shape[1])[None, :]  # [T, S]
    return (keys, values, slot_mask, slot_positions), slot_mask[:, None, None, :] & upto[None, None]


def row_at(out, pos: Array) -> Array:
    """The hidden state [B, D] of the surviving row at original position ``pos`` [B] (a
    protected row, so exactly one survives)."""
    j = jnp.argmax(out.rows.positions == pos[:, None], axis=1)  # [B]
    return jnp.take_along_axis(out.last_hidden_state, j[:, None, None], axis=1)[:, 0]


def prefill(model, input_ids: Array, attention_mask: Array | None, *, max_new_tokens: int,
            schedule, acc_variant: str):
    """A decoder's pruned prefill of a right-padded prompt (GPT-2 and Llama) -> (hidden state
    [B, D] of the last real token, the KV cache with ``max_new_tokens`` free slots a layer,
    ``model``'s output), the last real token protected."""
    mask = (jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask).astype(bool)
    last = last_real_position(mask)  # [B]
    out = model(input_ids, mask, schedule=schedule, acc_variant=acc_variant, return_kv=True,
                protect_positions=last)
    return row_at(out, last), build_cache(out, mask.sum(axis=1), max_new_tokens), out


def repeat_kv(x: Array, groups: int) -> Array:
    """[B, S, G, H] -> [B, S, G * groups, H]: query head n reads key/value head n // groups."""
    return x if groups == 1 else jnp.repeat(x, groups, axis=2)


def attend_and_eliminate(cfg, family: str, x: Array, rows, protect_pos: Array, q: Array, k: Array, v: Array,
                         *, keep: int | None, acc_variant: str, output_attentions: bool, return_kv: bool,
                         out_proj, groups: int = 1, probs_dropout=None, packed=None):
    """A decoder layer's attention half (GPT-2 and Llama): causal attention of q [B, T, N, H]
    over k, v [B, T, G, H] (each key/value head serves ``groups`` query heads), then, when
    ``keep`` < T, elimination of rows (``eliminate_prompt_rows``; the row at ``protect_pos``
    [B] never goes). ``packed``: (qkv [B, T, 3, N, H], None) that q, k and v are slices of
    (GPT-2; no groups), which the fused attention + ACC kernel reads instead of the slices'
    copies. Returns (x [B, K, D], ctx [B, K, N, H], rows, out dict); with ``return_kv`` out
    also holds k, v [B, K, G, H] and the kept rows."""
    if acc_variant not in RANKINGS:
        raise ValueError(f"unknown ACC variant {acc_variant!r} for {family}; choose one of {RANKINGS} "
                         "('prefix' would drop the last token of a causal prompt)")
    eliminate = keep is not None and keep < x.shape[1]
    recent = acc_variant == "recent"
    out: dict[str, Any] = {}
    last = rows.positions == protect_pos[:, None]  # [B, T]
    k_all, v_all = repeat_kv(k, groups), repeat_kv(v, groups)  # [B, T, N, H]
    ctx, scores, probs = acc_lib.attend_and_score(
        q, k_all, v_all, rows.mask, scale=common.attention_scale(cfg.head_dim), causal=True,
        score=eliminate and not recent, variant=acc_variant, protect=last, packed=packed,
        attention_impl=cfg.attention_impl, acc_impl=cfg.acc_impl, xla_attention_below=cfg.xla_attention_below,
        output_attentions=output_attentions, probs_dropout=probs_dropout,
        value_norms=lambda: out_proj.value_norms(v_all),
    )  # ctx [B, T, N, H], scores [B, T], probs [B, N, T, T]
    if output_attentions:
        out["attentions"] = probs
    if eliminate:  # ctx [B, K, N, H]; x [B, K, D]; k, v [B, K, G, H]; original positions kept
        rows, (ctx, x, k, v) = eliminate_prompt_rows(scores, keep, rows, last, out, ctx, x, k, v,
                                                     recent=recent, protect_first=cfg.protect_first)
    if return_kv:
        out.update(k=k, v=v, rows=rows)
    return x, ctx, rows, out


def eliminate_prompt_rows(scores, keep: int, rows, last, out: dict, *tensors, recent: bool,
                          protect_first: bool):
    """A causal decoder's elimination after attention (GPT-2 and Llama): the last token always
    kept (``last``), the first as an attention sink when ``protect_first``; ``recent`` ranks by
    position instead of ACC. Records acc / keep_idx / positions in ``out``; returns (rows,
    tensors gathered to the kept rows)."""
    if recent:
        scores = jnp.where(rows.mask, rows.positions.astype(jnp.float32), -jnp.inf)
        scores = jnp.where(last & rows.mask, jnp.inf, scores)
    if protect_first:
        sink = (rows.positions == 0) & rows.mask & ~last
        scores = jnp.where(sink, _SINK_SCORE, acc_lib.finished(scores))
    return acc_lib.drop_rows(scores, keep, rows, out, *tensors)


# ------------------------------------------------------------------------------ modules
class GPT2Block(nn.Module):
    """One pre-LN decoder block: x + attn(ln_1(x)), then + mlp(ln_2(.)).

    ``__call__`` runs a whole prompt (with optional elimination after attention);
    ``extend`` runs new tokens against this layer's KV cache.
    """

    config: GPT2Config

    def setup(self):
        cfg = self.config
        self.ln_1 = common.layer_norm(cfg, "ln_1")
        self.qkv = common.dense(cfg, (3, cfg.num_heads, cfg.head_dim), ("embed", "qkv", "heads", "kv"), "qkv")
        self.attn_out = common.HeadsOut(cfg, name="attn_out")
        self.ln_2 = common.layer_norm(cfg, "ln_2")
        self.mlp_in = common.dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "mlp_in", activation=cfg.activation)
        self.mlp_out = common.dense(cfg, cfg.hidden_size, ("mlp", "embed"), "mlp_out")
        self.attn_drop = common.Dropout(cfg.attention_dropout)
        self.resid_drop = common.Dropout(cfg.resid_dropout)

    def _project(self, x: Array, apart: bool = False) -> tuple[Array, Array, Array, Array]:
        """q, k, v [B, T, N, H], slices of the one q/k/v projection, and that projection
        [B, T, 3, N, H] (bias added in the GEMM's epilogue), which the fused attention + ACC
        kernel reads itself (no copies of the slices). With ``apart`` where
        ``SEPARATE_QKV_BACKENDS`` says (``common.qkv_apart_here``), q, k and v come from three
        GEMMs kept apart instead (``common.qkv_apart``); each consumer uses one form and XLA
        drops the other, but k and v also feed the KV cache (so a layer that eliminates, whose
        fused kernel reads the one projection, takes none)."""
        h = self.ln_1(x)
        qkv = self.qkv(h)  # [B, T, 3, N, H]
        if apart and common.qkv_apart_here(SEPARATE_QKV_BACKENDS, x) and self.qkv.has_variable("params", "kernel"):
            params = self.qkv.variables["params"]
            dtype = common.to_dtype(self.config.dtype)
            q, k, v = common.qkv_apart(h, nn.meta.unbox(params["kernel"]).astype(dtype),
                                       nn.meta.unbox(params["bias"]).astype(dtype), self.config)
            return q, k, v, qkv
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], qkv

    def _finish(self, x: Array, ctx: Array, deterministic: bool) -> Array:
        x = x + self.resid_drop(self.attn_out(ctx), deterministic=deterministic)  # [B, K, D]
        h = self.mlp_out(self.mlp_in(self.ln_2(x)))  # [B, K, F] activated, then [B, K, D]
        return x + self.resid_drop(h, deterministic=deterministic)

    def __call__(
        self,
        x: Array,
        rows: acc_lib.Rows,
        protect_pos: Array,
        *,
        keep: int | None = None,
        acc_variant: str = "plain",
        deterministic: bool = True,
        output_attentions: bool = False,
        return_kv: bool = False,
    ) -> tuple[Array, acc_lib.Rows, dict[str, Any]]:
        """
        Args:
          x: [B, T, D] rows entering the layer; rows: their ``acc.Rows``.
          protect_pos: [B] original position of the row that must survive (+inf).
          keep: static Python int; rows kept after attention (None or >= T: keep all).
          acc_variant: one of ``RANKINGS``.
          return_kv: also return this layer's K/V of the kept rows (for the KV cache).
        Returns:
          (x [B, K, D], rows of the K kept rows, out dict of named intermediates).
        """
        train_dropout = not deterministic and self.config.attention_dropout > 0
        q, k, v, qkv = self._project(x, apart=keep is None or keep >= x.shape[1])  # (not eliminating)
        x, ctx, rows, out = attend_and_eliminate(
            self.config, "GPT-2", x, rows, protect_pos, q, k, v, packed=(qkv, None), keep=keep,
            acc_variant=acc_variant,
            output_attentions=output_attentions, return_kv=return_kv, out_proj=self.attn_out,
            probs_dropout=(lambda p: self.attn_drop(p, deterministic=False)) if train_dropout else None)
        return self._finish(x, ctx, deterministic), rows, out

    def extend(self, x: Array, layer_cache, positions: Array, start: Array):
        """Runs T new tokens against this layer's cache.

        Args:
          x: [B, T, D] the new tokens' rows entering the layer.
          layer_cache: (keys, values [B, S, N, H], slot_mask [B, S], slot_positions [B, S]).
          positions: [B, T] position ids of the new tokens.
          start: [] int32 first cache slot the new tokens are written to.
        Returns:
          (x [B, T, D], layer_cache with the tokens written).
        """
        q, k, v, _ = self._project(x)  # each [B, T, N, H]
        layer_cache, vis = write_cache(layer_cache, k, v, positions, start)
        ctx, _, _ = attn_lib.softmax_attention(q, *layer_cache[:2], vis,
                                               scale=common.attention_scale(self.config.head_dim))
        return self._finish(x, ctx, True), layer_cache


class GPT2Model(nn.Module):
    """Embeddings, L decoder blocks and the final LayerNorm (HF ``GPT2Model``)."""

    config: GPT2Config

    def setup(self):
        cfg = self.config
        self.wte = common.embed(cfg, cfg.vocab_rows or cfg.vocab_size, ("vocab", "embed"), "wte")
        self.wpe = common.embed(cfg, cfg.max_position_embeddings, ("positions", "embed"), "wpe")
        self.embd_drop = common.Dropout(cfg.embd_dropout)
        self.blocks = [GPT2Block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.ln_f = common.layer_norm(cfg, "ln_f")

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        *,
        schedule: tuple[int, ...] | None = None,
        acc_variant: str = "plain",
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_kv: bool = False,
        protect_positions: Array | None = None,
    ) -> GPT2Output:
        """As ``BertModel.__call__`` for right-padded [B, T] inputs (rows ranked by one of
        ``RANKINGS``); ``return_kv``: each layer's out dict also holds the K/V of its kept rows;
        ``protect_positions`` [B]: the original position never dropped (default: the last
        real token)."""
        cfg = self.config
        schedule = common.check_schedule(schedule, cfg.num_layers)
        rows, protect_positions = decoder_rows(input_ids, attention_mask, position_ids, protect_positions)

        x = self.wte(input_ids) + self.wpe(rows.positions)  # [B, T, D]
        x = self.embd_drop(x, deterministic=deterministic)
        return run_blocks(self.blocks, self.ln_f, x, rows, protect_positions, schedule,
                          output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                          acc_variant=acc_variant, deterministic=deterministic, return_kv=return_kv)

    def attend(self, x: Array) -> Array:
        """Tied LM head: [..., D] -> [..., V] float32 logits (x @ wte^T; rows past V dropped)."""
        return self.wte.attend(x)[..., :self.config.vocab_size].astype(jnp.float32)

    def extend(self, input_ids: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """Runs new tokens [B, T] against the cache -> (hidden [B, T, D] after ln_f, cache)."""
        embed = lambda ids, pos: self.wte(ids) + self.wpe(pos)  # noqa: E731
        return extend_blocks(self.blocks, self.ln_f, embed, input_ids, cache)


def pad_vocab(config: GPT2Config, params, multiple: int) -> tuple[GPT2Config, Any]:
    """(config, LM-head model params) with the token table's rows padded with zeros to a
    multiple of ``multiple`` (``vocab_rows``). XLA pads a 16-bit cuBLAS GEMM operand whose
    dimensions are not multiples of 8 inside the program, so the tied LM head on GPT-2's
    50257 x 768 table copied 77 MB in every prefill (a 52 us fusion on an H100, 1.2-2.3% of
    GPT-2 8 x 1024's prefill; docs/benchmarks.md). Padded once here, it is not. (Decoding steps
    run their head on XLA's Triton GEMMs, which are not padded: unchanged.) Unchanged when the
    table already has a multiple of rows."""
    v = config.vocab_size
    rows = -(-v // multiple) * multiple if multiple > 0 else v
    if rows == (config.vocab_rows or v):
        return config, params
    table = params["transformer"]["wte"]["embedding"][:v]  # [V, D]
    padded = jnp.concatenate([table, jnp.zeros((rows - v, table.shape[1]), table.dtype)])  # [rows, D]
    params = {**params, "transformer": {**params["transformer"], "wte": {"embedding": padded}}}
    return dataclasses.replace(config, vocab_rows=rows), params


def build_cache(out: GPT2Output, real_lengths: Array, max_new_tokens: int) -> KVCache:
    """The KV cache of a prefill run with ``return_kv``: kept rows + ``max_new_tokens`` slots.

    Args:
      out: the prefill's ``GPT2Output``; layer l's out dict holds k, v [B, K_l, N, H] and rows.
      real_lengths: [B] number of real prompt tokens (the next position id).
      max_new_tokens: static number of empty slots appended to every layer.
    """
    keys, values, mask, positions, slots = [], [], [], [], []
    for layer in out.layers:
        k, v, rows = layer["k"], layer["v"], layer["rows"]
        pad = ((0, 0), (0, max_new_tokens), (0, 0), (0, 0))
        keys.append(jnp.pad(k, pad))  # [B, K_l + M, N, H]
        values.append(jnp.pad(v, pad))
        mask.append(jnp.pad(rows.mask, ((0, 0), (0, max_new_tokens))))  # [B, K_l + M]
        pos = jnp.where(rows.mask, rows.positions, -1)
        positions.append(jnp.pad(pos, ((0, 0), (0, max_new_tokens)), constant_values=-1))
        slots.append(int(k.shape[1]))
    return KVCache(keys=tuple(keys), values=tuple(values), mask=tuple(mask),
                   positions=tuple(positions), next_position=real_lengths.astype(jnp.int32),
                   step=jnp.zeros((), jnp.int32), prompt_slots=tuple(slots))


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with the LM head tied to the token embedding (HF ``GPT2LMHeadModel``).

    ``__call__`` returns logits for every surviving row (parity, training); ``prefill`` and
    ``extend`` are the two halves of generation (``accjax.generate``).
    """

    config: GPT2Config

    def setup(self):
        self.transformer = GPT2Model(self.config, name="transformer")

    def __call__(self, input_ids, attention_mask=None, position_ids=None, **kw) -> GPT2Output:
        out = self.transformer(input_ids, attention_mask, position_ids, **kw)
        return out.replace(logits=self.transformer.attend(out.last_hidden_state))  # [B, K_L, V]

    def prefill(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        max_new_tokens: int,
        schedule: tuple[int, ...] | None = None,
        acc_variant: str = "plain",
    ) -> tuple[Array, KVCache, GPT2Output]:
        """Runs a right-padded prompt, pruning it by ``schedule``.

        Returns:
          (logits [B, V] float32 of the token after the last real one, the KV cache with
          ``max_new_tokens`` free slots per layer, the prefill's ``GPT2Output``).
        """
        h, cache, out = prefill(self.transformer, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                schedule=schedule, acc_variant=acc_variant)
        return self.transformer.attend(h), cache, out

    def extend(self, input_ids: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """New tokens [B, T] against the cache -> (logits [B, T, V] float32, cache)."""
        h, cache = self.transformer.extend(input_ids, cache)
        return self.transformer.attend(h), cache


class GPT2ForSequenceClassification(nn.Module):
    """GPT-2 + a linear head (no bias) on the last real token, as HF's class does."""

    config: GPT2Config

    def setup(self):
        cfg = self.config
        self.transformer = GPT2Model(cfg, name="transformer")
        self.score = common.dense(cfg, cfg.num_labels, ("embed", "classes"), "score", use_bias=False)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *,
                 deterministic: bool = True, **kw) -> GPT2Output:
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        pool = pool_positions(input_ids, attention_mask, self.config.pad_token_id)  # [B]
        out = self.transformer(input_ids, attention_mask, position_ids, deterministic=deterministic,
                               protect_positions=pool, **kw)
        return out.replace(logits=self.score(row_at(out, pool)).astype(jnp.float32))  # [B, C]
