"""T5 v1.1 / Flan-T5 encoder-decoder in Flax linen, with ACC elimination in the encoder.

Numerically matches Hugging Face ``T5ForConditionalGeneration`` / ``T5EncoderModel``
(transformers 5.x) at fp32:

  * pre-norm blocks with RMS layer norm (no mean subtraction, no bias, variance in fp32);
  * no 1/sqrt(H) scaling of attention logits; an additive relative position bias instead,
    from a [buckets, N] table owned by the FIRST layer of each stack and shared by all its
    layers (bidirectional buckets in the encoder, causal buckets in the decoder; cross
    attention has no position bias);
  * gated-GELU feed-forward ``wo(gelu_new(wi_0 h) * wi_1 h)`` for v1.1 / Flan (``relu``
    without the gate for the original T5);
  * an untied LM head for v1.1 / Flan; a head tied to the shared embedding otherwise, whose
    input is scaled by ``d_model ** -0.5`` when ``scale_decoder_outputs`` (original T5);
  * ``decoder_start_token_id`` = pad = 0, EOS = 1; fp16 activations clamped as HF does.

Elimination (encoder only, see ``accjax.acc``): a layer given a static ``keep`` < its input
rows T runs self-attention over all T rows, ranks them by ACC and keeps the ``keep`` best
(padding goes first). Nothing is protected by default: T5 has no CLS row that a head reads,
the decoder cross-attends to whatever survives, and the final EOS, an attention sink, ranks
high on its own; ``protect_last=True`` keeps each example's last real token (its EOS) for
experiments. Pre-norm T5 carries two things past attention, the residual stream ``x`` and the
attention context ``ctx``; both are gathered with the same indices, and the output
projection, residual add and feed-forward then run on the kept rows only. ``rows.positions``
carries each kept row's ORIGINAL position, and the position bias for later layers is looked up
there: ``table[bucket(pos[j] - pos[i])]``, exactly the rows and columns of the entering bias
(``take_bias`` gathers them; tested equal), never recomputed from compacted indices. The
lookup writes the [B, N, K, K] bias in one fusion, cheaper than gathering it from the larger
entering bias (docs/benchmarks.md, Flan-T5); on GPUs the attention of those layers reads the
bias by distance itself (``acc.DISTANCE_ATTENTION``), and the unused lookup is compiled away.
Worked example, T = 4 rows at positions [0 1 2 3], layer keeps rows [0, 3]::

    bias before: B[i, j] = tab[bucket(j - i)]     after: [[B[0,0] B[0,3]]   = tab[bucket(  0)] tab[bucket(3)]
                                                         [B[3,0] B[3,3]]]   tab[bucket(-3)] tab[bucket(0)]
    (recomputing from compacted positions [0 1] would wrongly give bucket(1) and bucket(-1))

The ACC source (the Pallas kernel reads the bias by key - query distance at the rows' original
positions) is chosen by ``acc.attend_and_score``, as for BERT and GPT-2.

The decoder cross-attends to the final kept encoder rows under their gathered mask.

Einsum letters: B batch, T rows entering a layer / decoder length, S key rows, K kept rows,
D model width (d_model), N heads, H head size (d_kv; N*H need not equal D), F feed-forward
width (d_ff), G the 2 gated input projections, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from accjax import acc as acc_lib
from accjax.kernels import step_proj
from accjax.models import common

Array = jax.Array

# True: a decoding step (one row a sequence, at most ``step_proj.MAX_ROWS`` sequences) runs
# each projection with the RMSNorm before it and the activation or residual after it as one
# kernel (``accjax.kernels.step_proj``, where its ``KERNEL`` runs) instead of XLA's kernels at
# their latency: 8 kernels a decoder layer instead of about 12. Off: timed on an H100 at 16
# sequences it is slower (+0.16 ms a 4x first-token call, +90 us a generated token; the Pallas
# product at 16 rows loses about 1 us a projection to cuBLAS and the kernel's boundaries stop
# XLA's fusions around it; docs/benchmarks.md, twenty-fourth session): opt-in.
STEP_KERNEL = False

# Where an encoder layer's q, k and v come from three GEMMs kept apart (``common.qkv_apart``,
# from ``common.QKV_APART_MIN_ROWS`` rows) rather than copied out of the one projection for
# cuDNN. Earlier, three GEMMs on kernel slices were no faster, but XLA's dot merger had joined
# them again (as it did BERT's). Only layers that run cuDNN read them: a dense program's, as
# the eliminating programs' layers all run the fused kernel on the one projection. H100,
# Flan-T5-base 16 x 512, same process: dense 4.0% faster pipelined, 1.9% synchronised; 2x
# even (-0.6% / +1.4%, the same kernels) (docs/benchmarks.md, thirty-second session).
SEPARATE_QKV_BACKENDS: tuple[str, ...] = ("gpu",)


@dataclasses.dataclass(frozen=True)
class T5Config(common.ModelConfig):
    vocab_size: int = 32128  # SentencePiece vocabulary (+ padding rows in the table)
    d_model: int = 768  # D
    d_kv: int = 64  # H, per-head size
    d_ff: int = 2048  # F, feed-forward width
    num_layers: int = 12  # encoder blocks (the layers a schedule covers)
    num_decoder_layers: int = 12  # decoder blocks
    num_heads: int = 12  # N
    relative_attention_num_buckets: int = 32  # rows of the position-bias table
    relative_attention_max_distance: int = 128  # distances beyond share the last bucket
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"  # HF name; "gated-gelu" means gelu_new (tanh form)
    is_gated_act: bool = True  # v1.1 / Flan: wo(act(wi_0 h) * wi_1 h)
    tie_word_embeddings: bool = False  # True: the LM head is the shared embedding
    scale_decoder_outputs: bool | None = None  # LM-head input * d_model**-0.5; None: = tied
    dropout: float = 0.1  # HF dropout_rate: embeddings, attention probs, residual branches
    initializer_factor: float = 1.0  # HF's init scale (1.0 for real models)
    pad_token_id: int = 0
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token
    eos_token_id: int = 1
    max_position_embeddings: int = 512  # T5 has no absolute limit: the longest length bucket
    family: str = "t5"

    def __post_init__(self):
        common.activation(self.dense_act_fn)  # fail early on an unknown activation
        if self.scale_decoder_outputs is None:
            # HF: the original T5 (tied head) scales, v1.1 / Flan (untied) does not.
            object.__setattr__(self, "scale_decoder_outputs", bool(self.tie_word_embeddings))
        self.check_runtime()
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be at least 4")

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def intermediate_size(self) -> int:
        return self.d_ff

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def inner_dim(self) -> int:
        """Attention width N*H (the ``a`` of ``schedule.CostModel``)."""
        return self.num_heads * self.d_kv

    @property
    def feed_forward_proj(self) -> str:
        act = "gelu" if self.is_gated_act and self.dense_act_fn == "gelu_new" else self.dense_act_fn
        return f"gated-{act}" if self.is_gated_act else act

    # -- Hugging Face config.json <-> T5Config --------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides) -> "T5Config":
        """Reads an HF T5 config.json (transformers 4.x or 5.x).

        transformers 5 writes ``tie_word_embeddings: true`` for every T5 and records the
        v1.1 behaviour as ``scale_decoder_outputs: false``; whether the head is really tied
        then depends on the checkpoint (``t5_family.adapt_checkpoint`` settles it).
        """
        proj = d.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        tie = d.get("tie_word_embeddings", True) is not False
        scale = d.get("scale_decoder_outputs", tie)
        eos = d.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0]
        pad = d.get("pad_token_id", 0)
        kw = dict(
            {k: d[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")},
            **{k: d[k] for k in ("relative_attention_num_buckets", "relative_attention_max_distance",
                                 "layer_norm_epsilon", "initializer_factor") if k in d},  # else the defaults
            num_decoder_layers=d.get("num_decoder_layers") or d["num_layers"],
            dense_act_fn=act,
            is_gated_act=parts[0] == "gated" and len(parts) == 2,
            tie_word_embeddings=tie,
            scale_decoder_outputs=bool(scale),
            dropout=d.get("dropout_rate", 0.1),
            pad_token_id=0 if pad is None else pad,
            decoder_start_token_id=d.get("decoder_start_token_id", 0 if pad is None else pad),
            eos_token_id=1 if eos is None else eos,
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        if self.is_gated_act and self.dense_act_fn == "gelu":
            raise ValueError("HF T5 has no gated exact-GELU ('gated-gelu' means gelu_new)")
        # HF's names in HF's order; transformers 5 reads scale_decoder_outputs in preference
        # to tie_word_embeddings.
        hf = {"dropout_rate" if k == "dropout" else k: getattr(self, k) for k in _HF_FIELDS}
        return {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], **hf,
                "is_encoder_decoder": True}


_HF_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
              "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
              "feed_forward_proj", "tie_word_embeddings", "scale_decoder_outputs", "dropout",
              "initializer_factor", "pad_token_id", "decoder_start_token_id", "eos_token_id")


PRESETS: dict[str, T5Config] = {
    # google/flan-t5-small: 8 encoder + 8 decoder layers, D 512, 6 heads of 64 (N*H = 384).
    "flan-t5-small": T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                              num_heads=6),
    # google/flan-t5-base: 12 + 12 layers, D 768, 12 heads of 64, F 2048.
    "flan-t5-base": T5Config(),
}


# --------------------------------------------------------------------------- positions
def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucket of ``relative_position`` = key position - query position (int array).

    Half of the buckets (of each sign, when bidirectional) hold exact distances 0..max_exact-1,
    the rest logarithmically wider bins up to ``max_distance``; farther distances share the
    last bucket. Causal (decoder) buckets map every positive distance (a future key) to 0.
    Example, 8 bidirectional buckets, max_distance 16: -1 -> 1, 0 -> 0, 1 -> 5, 2 -> 6,
    5 -> 7, 100 -> 7.
    """
    rel = relative_position.astype(jnp.int32)
    ret = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (rel > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(rel)
    else:
        n = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 throughout, as the reference: log(n / max_exact) / log(max_distance / max_exact).
    safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


def take_bias(bias: Array, idx: Array) -> Array:
    """Rows and columns ``idx`` [B, K] of a bias [B or 1, N, T, T] -> [B, N, K, K].

    ``out[b, n, i, j] = bias[b, n, idx[b, i], idx[b, j]]``: the kept rows keep the bias of
    their original positions.
    """
    rows = jnp.take_along_axis(bias, idx[:, None, :, None], axis=2)  # [B, N, K, T]
    return jnp.take_along_axis(rows, idx[:, None, None, :], axis=3)  # [B, N, K, K]


class RelativeBias(nn.Module):
    """The [buckets, N] table and its lookup -> an additive logits bias [B, N, T, S]."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_pos: Array, k_pos: Array) -> Array:
        """q_pos [B, T], k_pos [B, S] int positions (B may be 1) -> [B, N, T, S] in dtype."""
        cfg = self.config
        buckets = relative_position_bucket(
            k_pos[:, None, :] - q_pos[:, :, None], bidirectional=self.bidirectional,
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance)  # [B, T, S]
        table = self.param(
            "embedding", common.normal_init(cfg.initializer_factor * cfg.d_model ** -0.5, (None, "heads")),
            (cfg.relative_attention_num_buckets, cfg.num_heads), common.to_dtype(cfg.param_dtype))
        # [N, buckets] indexed by (head, bucket): written straight in [B, N, T, S] order (one
        # fusion; a take over the bucket axis then a transpose is a gather plus a copy).
        tab = jnp.asarray(table, common.to_dtype(cfg.dtype)).T  # [N, buckets]
        heads = jnp.arange(cfg.num_heads, dtype=jnp.int32)[None, :, None, None]
        return tab[heads, buckets[:, None]]  # [B, N, T, S]


# ----------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale; statistics in float32, no bias."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param("scale", common.ones_init(("embed",)), (cfg.d_model,),
                           common.to_dtype(cfg.param_dtype))
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + cfg.layer_norm_epsilon)
        return (scale.astype(jnp.float32) * y).astype(common.to_dtype(cfg.dtype))


def _qkv(cfg: T5Config, name: str, parts: int = 3) -> common.Einsum:
    """Fused projections [D, parts, N, H]: q/k/v (3) or cross-attention k/v (2)."""
    f, d = cfg.initializer_factor, cfg.d_model
    stds = ((f * (d * cfg.d_kv) ** -0.5, f * d ** -0.5, f * d ** -0.5) if parts == 3
            else (f * d ** -0.5, f * d ** -0.5))
    return common.Einsum(cfg, "BTD,DQNH->BTQNH", (d, parts, cfg.num_heads, cfg.d_kv),
                         ("embed", "qkv", "heads", "kv"), stds, name=name)


def _out(cfg: T5Config, name: str | None = None) -> common.HeadsOut:
    """Attention output projection [B, T, N, H] -> [B, T, D] (no bias), and value norms."""
    return common.HeadsOut(cfg, std=cfg.initializer_factor * cfg.inner_dim ** -0.5, use_bias=False,
                           name=name)


class FeedForward(nn.Module):
    """Gated: wo(act(wi_0 h) * wi_1 h) with wi_0/wi_1 fused into one [D, 2, F] kernel;
    plain: wo(act(wi h))."""

    config: T5Config

    @nn.compact
    def __call__(self, h: Array, deterministic: bool) -> Array:
        cfg = self.config
        f, d = cfg.initializer_factor, cfg.d_model
        act = common.activation(cfg.dense_act_fn)
        if cfg.is_gated_act:
            g = common.Einsum(cfg, "BTD,DGF->BTGF", (d, 2, cfg.d_ff), ("embed", None, "mlp"),
                              (f * d ** -0.5, f * d ** -0.5), name="wi")(h)  # [B, T, 2, F]
            h = act(g[:, :, 0]) * g[:, :, 1]  # [B, T, F]
        else:
            h = act(common.Einsum(cfg, "BTD,DF->BTF", (d, cfg.d_ff), ("embed", "mlp"), f * d ** -0.5,
                                  name="wi")(h))
        h = common.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return common.Einsum(cfg, "BTF,FD->BTD", (cfg.d_ff, d), ("mlp", "embed"), f * cfg.d_ff ** -0.5,
                             name="wo")(h)


def _step_kernel(x: Array, cfg: T5Config) -> bool:
    """Whether a decoding step of ``x`` [B, 1, D] runs its projections through ``step_proj``:
    ``STEP_KERNEL`` on, 16-bit brain float or float32 rows in the compute dtype (float16 keeps
    XLA's path and its clamps), no separate products' dtype, and ``step_proj.applies``."""
    return (STEP_KERNEL and x.dtype in (jnp.bfloat16, jnp.float32) and x.dtype == common.to_dtype(cfg.dtype)
            and common._low_dtype(cfg) is None and step_proj.applies(x, (
                (cfg.d_model, cfg.inner_dim), (cfg.inner_dim, cfg.d_model), (cfg.d_model, cfg.d_ff),
                (cfg.d_ff, cfg.d_model))))


def clamp_fp16(x: Array) -> Array:
    """HF clamps float16 activations after every sub-block so inf never propagates."""
    if x.dtype != jnp.float16:
        return x
    big = jnp.finfo(jnp.float16).max
    limit = jnp.where(jnp.isinf(x).any(), big - 1000, big).astype(x.dtype)
    return jnp.clip(x, -limit, limit)


# ---------------------------------------------------------------------------- encoder
class EncoderLayer(nn.Module):
    """One pre-norm T5 encoder block with optional elimination after self-attention."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        x: Array,
        rows: acc_lib.Rows,
        bias: Array,
        *,
        keep: int | None = None,
        acc_variant: str = "plain",
        protect: Array | None = None,
        deterministic: bool = True,
        output_attentions: bool = False,
        bias_by_distance: Array | None = None,
    ) -> tuple[Array, acc_lib.Rows, dict[str, Array]]:
        """
        Args:
          x: [B, T, D] rows entering the layer; rows: their ``acc.Rows``.
          bias: [B or 1, N, T, T] position bias of these rows (from original positions).
          keep: static Python int; rows kept after attention (None or >= T: keep all).
          protect: [B, T] bool, rows that must never be dropped (None: none).
          bias_by_distance: [N, 2P - 1] the same bias by key - query position (P = input
            length), which the Pallas ACC kernel reads at ``rows.positions``.
        Returns:
          (x [B, K, D], rows of the kept rows (``rows.positions``: their ORIGINAL positions,
          from which the encoder looks up the next layer's bias), out dict).
        """
        cfg = self.config
        t = x.shape[1]
        eliminate = keep is not None and keep < t
        out: dict[str, Array] = {}

        h = RMSNorm(cfg, name="attn_norm")(x)
        # One fused GEMM, whose slices the fused kernel reads; where ``SEPARATE_QKV_BACKENDS``
        # says, q, k and v for the other attention paths come from three GEMMs kept apart
        # (each consumer uses one form and XLA drops the other).
        qkv_proj = _qkv(cfg, "qkv")
        qkv = qkv_proj(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, N, H]
        if common.qkv_apart_here(SEPARATE_QKV_BACKENDS, h) and qkv_proj.has_variable("params", "kernel"):
            q, k, v = common.qkv_apart(h, nn.meta.unbox(qkv_proj.variables["params"]["kernel"]), None, cfg)
        heads_out = _out(cfg, "attn_out")
        train_dropout = not deterministic and cfg.dropout > 0
        drop = common.Dropout(cfg.dropout) if train_dropout else None
        prefix = acc_variant in acc_lib.BASELINES
        ctx, scores, probs = acc_lib.attend_and_score(
            q, k, v, rows.mask, scale=1.0, bias=bias, bias_by_distance=bias_by_distance,
            positions=rows.positions, score=eliminate and not prefix, variant=acc_variant,
            protect=protect, attention_impl=cfg.attention_impl, acc_impl=cfg.acc_impl,
            output_attentions=output_attentions,
            probs_dropout=(lambda p: drop(p, deterministic=False)) if train_dropout else None,
            value_norms=lambda: heads_out.value_norms(v),
            packed=(qkv, None),  # the fused kernel reads q, k, v from it (no split copies)
        )  # ctx [B, T, N, H], scores [B, T], probs [B, N, T, T]
        if output_attentions:
            out["attentions"] = probs
        if eliminate:  # ctx [B, K, N, H], x [B, K, D]
            rows, (ctx, x) = acc_lib.drop_rows(scores, keep, rows, out, ctx, x, prefix=prefix)

        h = heads_out(ctx)  # [B, K, D]
        x = clamp_fp16(x + common.Dropout(cfg.dropout)(h, deterministic=deterministic))
        h = FeedForward(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x), deterministic)  # [B, K, D]
        x = clamp_fp16(x + common.Dropout(cfg.dropout)(h, deterministic=deterministic))
        return x, rows, out


@struct.dataclass
class T5EncoderOutput:
    """What the encoder returns; unused fields cost nothing under ``jax.jit``.

    Attributes:
      last_hidden_state: [B, K_L, D], the rows that survived the last layer, after the final
        RMS norm: what the decoder cross-attends to.
      rows: ``acc.Rows`` of those rows (mask = the cross-attention mask, original positions).
      layers: per layer a dict; eliminating layers hold ``acc`` [B, T] (ACC of the rows that
        entered), ``keep_idx`` [B, K] (indices into that layer's input, sorted) and
        ``positions`` [B, K] (original positions of the kept rows).
      hidden_states: (embeddings, layer 1, ..., layer L) outputs before the final norm.
      attentions: per layer [B, N, T, T] float32 probabilities, if asked for.
    """

    last_hidden_state: Array
    rows: acc_lib.Rows
    layers: tuple[dict[str, Array], ...]
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None


class T5Encoder(nn.Module):
    """The encoder stack: dropout, L blocks sharing the first block's position bias, norm."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        x: Array,
        attention_mask: Array,
        *,
        schedule: tuple[int, ...] | None = None,
        acc_variant: str = "plain",
        protect_last: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> T5EncoderOutput:
        """
        Args:
          x: [B, T, D] embedded input rows; attention_mask: [B, T] bool.
          schedule: per-layer keep-lengths (static Python ints), None = dense.
          protect_last: never drop each example's last real token (its EOS).
        """
        cfg = self.config
        schedule = common.check_schedule(schedule, cfg.num_layers, layers="encoder layer")
        b, t = attention_mask.shape
        rows = acc_lib.Rows.create(attention_mask)  # positions [B, T] = arange (as HF)
        last = attention_mask.astype(jnp.int32).sum(axis=1) - 1  # [B] last real position
        pos0 = jnp.arange(t, dtype=jnp.int32)[None]  # [1, T]: one bias for the whole batch
        rel_bias = RelativeBias(cfg, bidirectional=True, name="relative_attention_bias")
        bias = rel_bias(pos0, pos0)  # [1, N, T, T]
        by_distance = None
        if schedule is not None:  # for the Pallas ACC kernel; unused (so not computed) elsewhere
            # the bias as a function of key - query position, -(T-1)..T-1: [N, 2T - 1]
            dist = jnp.arange(-(t - 1), t, dtype=jnp.int32)[None]
            by_distance = rel_bias(jnp.zeros((1, 1), jnp.int32), dist)[0, :, 0, :]

        x = common.Dropout(cfg.dropout)(x, deterministic=deterministic)
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        layers = []
        for i in range(cfg.num_layers):
            protect = (rows.positions == last[:, None]) if protect_last else None
            n_in = x.shape[1]
            x, rows, out = EncoderLayer(cfg, name=f"layer_{i}")(
                x, rows, bias, keep=None if schedule is None else schedule[i],
                acc_variant=acc_variant, protect=protect, deterministic=deterministic,
                output_attentions=output_attentions, bias_by_distance=by_distance)
            if x.shape[1] < n_in:  # the kept rows' bias from their ORIGINAL positions (module docstring)
                bias = rel_bias(rows.positions, rows.positions)  # [B, N, K, K]
            if output_attentions:
                attentions.append(out.pop("attentions"))
            if output_hidden_states:
                hidden_states.append(x)
            layers.append(out)
        x = RMSNorm(cfg, name="final_norm")(x)
        x = common.Dropout(cfg.dropout)(x, deterministic=deterministic)
        return T5EncoderOutput(
            last_hidden_state=x, rows=rows, layers=tuple(layers),
            hidden_states=None if hidden_states is None else tuple(hidden_states),
            attentions=None if attentions is None else tuple(attentions))


# ---------------------------------------------------------------------------- decoder
class DecoderLayer(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention, feed-forward."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.self_norm = RMSNorm(cfg)
        self.self_qkv = _qkv(cfg, None)
        self.self_out = _out(cfg)
        self.cross_norm = RMSNorm(cfg)
        d, f = cfg.d_model, cfg.initializer_factor
        self.cross_q = common.Einsum(cfg, "BTD,DNH->BTNH", (d, cfg.num_heads, cfg.d_kv),
                                     ("embed", "heads", "kv"), f * (d * cfg.d_kv) ** -0.5)
        self.cross_kv = _qkv(cfg, None, parts=2)
        self.cross_out = _out(cfg)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = FeedForward(cfg)
        self.drop = common.Dropout(cfg.dropout)

    def encoder_kv(self, enc: Array) -> tuple[Array, Array]:
        """Cross-attention keys and values of the encoder rows: [B, S, D] -> 2 x [B, S, N, H]."""
        kv = self.cross_kv(enc)  # [B, S, 2, N, H]
        return kv[:, :, 0], kv[:, :, 1]

    def __call__(
        self,
        x: Array,
        self_mask: Array,
        self_bias: Array,
        enc_kv: tuple[Array, Array],
        enc_mask: Array,
        *,
        cache: tuple[Array, Array] | None = None,
        index: Array | None = None,
        deterministic: bool = True,
        self_vo: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """
        Args:
          x: [B, T, D] decoder rows (T = 1 with a cache).
          self_mask: [B, T] padding mask of the decoder rows; [B, M] visible cache slots
            when decoding with a cache.
          self_bias: [1, N, T, T] causal position bias ([1, N, 1, M] with a cache).
          enc_kv: cross-attention (k, v), each [B, S, N, H]; enc_mask: [B, S] bool.
          cache: (k, v) of earlier steps, each [B, M, N, H]; index: the scalar step.
          self_vo: [D, D] this layer's value and output projections multiplied
            (``pack_self_vo``), for a step whose self-attention has ONE key (a cache of one
            slot): its softmax weight is 1, so the sub-block is ``h @ W_V W_O``.
        Returns:
          (x [B, T, D], updated cache or None).
        """
        cfg = self.config
        train_dropout = not deterministic and cfg.dropout > 0
        h = self.self_norm(x)
        qkv = self.self_qkv(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, N, H]
        if cache is not None:
            k, v = cache = tuple(jax.lax.dynamic_update_slice_in_dim(c, a.astype(c.dtype), index, axis=1)
                                 for c, a in zip(cache, (k, v)))  # [B, M, N, H] each; self_mask: visible
        # One query a step against the cache: XLA is right at this size whatever the backend.
        impl = "xla" if cache is not None else None
        if cache is not None and not train_dropout and _step_kernel(x, cfg):
            return self._step_fused(x, q, k, v, self_mask, self_bias, enc_kv, enc_mask, self_vo), cache
        if self_vo is not None:  # (the cache's k and v above are still written)
            sa = common.project("BTD,DE->BTE", h, self_vo, cfg)
        else:
            sa = self.self_out(self._attend(q, k, v, self_mask, self_bias, causal=cache is None,
                                            train_dropout=train_dropout, impl=impl))
        x = clamp_fp16(x + self.drop(sa, deterministic=deterministic))

        h = self.cross_norm(x)
        q = self.cross_q(h)  # [B, T, N, H]
        ctx = self._attend(q, enc_kv[0], enc_kv[1], enc_mask, None, causal=False,
                           train_dropout=train_dropout, impl=impl)
        x = clamp_fp16(x + self.drop(self.cross_out(ctx), deterministic=deterministic))

        h = self.mlp(self.mlp_norm(x), deterministic)
        x = clamp_fp16(x + self.drop(h, deterministic=deterministic))
        return x, cache

    def _step_fused(self, x, q, k, v, self_mask, self_bias, enc_kv, enc_mask, self_vo):
        """The rest of a decoding step (no dropout) with each projection and the norm before
        it, its activation or the residual after it in one kernel (``step_proj``): the same
        values as the sub-blocks above, rounded at the same points."""
        cfg = self.config
        p = self.variables["params"]
        b, t, d = x.shape
        nh = cfg.inner_dim
        interpret = step_proj.KERNEL == "interpret"

        def proj(a, w, **kw):
            return step_proj.step_proj(a.reshape(b * t, -1), w, eps=cfg.layer_norm_epsilon,
                                       interpret=interpret, **kw)

        x2 = x.reshape(b * t, d)
        if self_vo is not None:
            x2 = proj(x, self_vo, scale=p["self_norm"]["scale"], residual=x2)
        else:
            ctx = self._attend(q, k, v, self_mask, self_bias, causal=False, train_dropout=False, impl="xla")
            x2 = proj(ctx, p["self_out"]["kernel"].reshape(nh, d), residual=x2)
        q = proj(x2, p["cross_q"]["kernel"].reshape(d, nh), scale=p["cross_norm"]["scale"])
        ctx = self._attend(q.reshape(b, t, cfg.num_heads, cfg.d_kv), enc_kv[0], enc_kv[1], enc_mask, None,
                           causal=False, train_dropout=False, impl="xla")
        x2 = proj(ctx, p["cross_out"]["kernel"].reshape(nh, d), residual=x2)
        wi, act = p["mlp"]["wi"]["kernel"], common.activation(cfg.dense_act_fn)
        f = proj(x2, wi, scale=p["mlp_norm"]["scale"], act=act)
        return proj(f, p["mlp"]["wo"]["kernel"], residual=x2).reshape(b, t, d)

    def _attend(self, q, k, v, key_mask, bias, *, causal, train_dropout, impl=None):
        ctx, _, _ = acc_lib.attend_and_score(
            q, k, v, key_mask, scale=1.0, causal=causal, bias=bias,
            attention_impl=impl or self.config.attention_impl,
            probs_dropout=(lambda p: self.drop(p, deterministic=False)) if train_dropout else None)
        return ctx


class T5Decoder(nn.Module):
    """The decoder stack; the first block's causal position bias is shared by all blocks."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.relative_attention_bias = RelativeBias(cfg, bidirectional=False)
        self.layer = [DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers)]  # layer_0, ...
        self.final_norm = RMSNorm(cfg)
        self.drop = common.Dropout(cfg.dropout)

    def cross_kv(self, enc: Array) -> tuple[tuple[Array, Array], ...]:
        """Per layer the cross-attention (k, v) [B, S, N, H] of the (kept) encoder rows."""
        return tuple(layer.encoder_kv(enc) for layer in self.layer)

    def __call__(self, x: Array, mask: Array, enc_kv, enc_mask: Array, *,
                 deterministic: bool = True) -> Array:
        """Teacher-forced decoding: x [B, T, D] embedded decoder inputs, mask [B, T] bool ->
        [B, T, D] after the final norm."""
        t = x.shape[1]
        pos = jnp.arange(t, dtype=jnp.int32)[None]  # [1, T]
        bias = self.relative_attention_bias(pos, pos)  # [1, N, T, T]
        x = self.drop(x, deterministic=deterministic)
        for layer, kv in zip(self.layer, enc_kv):
            x, _ = layer(x, mask, bias, kv, enc_mask, deterministic=deterministic)
        return self.drop(self.final_norm(x), deterministic=deterministic)

    def step(self, x: Array, index: Array, cache, enc_kv, enc_mask: Array, self_vo: Array | None = None):
        """One cached decoding step: x [B, 1, D] at position ``index`` (a traced scalar);
        cache: per layer (k, v) [B, M, N, H]; ``self_vo``: [L, D, D] (``pack_self_vo``),
        only with a cache of one slot (the first step). Returns ([B, 1, D], updated cache)."""
        m = cache[0][0].shape[1]
        if self_vo is not None and m != 1:
            raise ValueError(f"the folded self-attention projections (self_vo) hold for one key, "
                             f"a cache of one slot; this cache has {m}: pass self_vo=None")
        b = x.shape[0]
        q_pos = jnp.reshape(index, (1, 1)).astype(jnp.int32)  # [1, 1]
        k_pos = jnp.arange(m, dtype=jnp.int32)[None]  # [1, M]
        bias = self.relative_attention_bias(q_pos, k_pos)  # [1, N, 1, M]
        visible = jnp.broadcast_to(k_pos <= index, (b, m))  # [B, M] slots written so far
        new_cache = []
        for i, (layer, kv, c) in enumerate(zip(self.layer, enc_kv, cache)):
            x, c = layer(x, visible, bias, kv, enc_mask, cache=c, index=index,
                         self_vo=None if self_vo is None else self_vo[i])
            new_cache.append(c)
        return self.final_norm(x), tuple(new_cache)


# ----------------------------------------------------------------------------- models
@struct.dataclass
class Seq2SeqOutput:
    """Attributes:
      logits: [B, T_dec, V] float32.
      encoder: the ``T5EncoderOutput`` (kept rows, their mask and positions, per-layer ACC).
    """

    logits: Array
    encoder: T5EncoderOutput


def _shared(cfg: T5Config, **kw) -> nn.Embed:
    return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=common.to_dtype(cfg.dtype),
                    param_dtype=common.to_dtype(cfg.param_dtype),
                    embedding_init=common.normal_init(cfg.initializer_factor * 1.0, ("vocab", "embed")), **kw)


class T5EncoderModel(nn.Module):
    """The shared embedding and the encoder stack (HF ``T5EncoderModel``)."""

    config: T5Config

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 deterministic: bool = True, **kw) -> T5EncoderOutput:
        """input_ids, attention_mask: [B, T]; kw: see ``T5Encoder`` (schedule, acc_variant, ...)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        x = _shared(self.config, name="shared")(input_ids)  # [B, T, D]
        return T5Encoder(self.config, name="encoder")(
            x, attention_mask.astype(bool), deterministic=deterministic, **kw)


class T5ForConditionalGeneration(nn.Module):
    """Encoder-decoder with the LM head (HF ``T5ForConditionalGeneration``).

    Entry points (``module.apply(variables, ..., method=...)``):
      ``__call__``     inputs + decoder inputs -> ``Seq2SeqOutput`` (teacher forcing)
      ``encode``       inputs -> ``T5EncoderOutput`` (elimination happens here)
      ``cross_kv``     kept encoder rows -> per decoder layer (k, v), computed once
      ``decode``       decoder inputs + encoder rows/mask -> logits [B, T, V]
      ``decode_step``  one token per row + cache -> (logits [B, V], cache)
    """

    config: T5Config

    def setup(self):
        cfg = self.config
        self.shared = _shared(cfg)
        self.encoder = T5Encoder(cfg)
        self.decoder = T5Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = common.Einsum(cfg, "BTD,DV->BTV", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                         cfg.initializer_factor * 1.0)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        decoder_input_ids: Array | None = None,
        decoder_attention_mask: Array | None = None,
        *,
        deterministic: bool = True,
        **kw,
    ) -> Seq2SeqOutput:
        """
        Args:
          input_ids, attention_mask: [B, T] encoder inputs (mask 1/True = real).
          decoder_input_ids: [B, T_dec] (already shifted right: start token first);
            default: the start token alone.
          decoder_attention_mask: [B, T_dec] (default all real; causal masking always).
          kw: encoder options (schedule, acc_variant, protect_last, output_*).
        """
        enc = self.encode(input_ids, attention_mask, deterministic=deterministic, **kw)
        if decoder_input_ids is None:
            decoder_input_ids = jnp.full((input_ids.shape[0], 1), self.config.decoder_start_token_id,
                                         jnp.int32)
        logits = self.decode(decoder_input_ids, enc.last_hidden_state, enc.rows.mask,
                             decoder_attention_mask, deterministic=deterministic)
        return Seq2SeqOutput(logits=logits, encoder=enc)

    def encode(self, input_ids: Array, attention_mask: Array | None = None, *,
               deterministic: bool = True, **kw) -> T5EncoderOutput:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        x = self.shared(input_ids)  # [B, T, D]
        return self.encoder(x, attention_mask.astype(bool), deterministic=deterministic, **kw)

    def cross_kv(self, encoder_hidden: Array):
        return self.decoder.cross_kv(encoder_hidden)

    def decode(self, decoder_input_ids: Array, encoder_hidden: Array, encoder_mask: Array,
               decoder_attention_mask: Array | None = None, *, deterministic: bool = True) -> Array:
        """[B, T_dec] decoder inputs, encoder rows [B, S, D] with mask [B, S] -> [B, T_dec, V]."""
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones(decoder_input_ids.shape, bool)
        x = self.shared(decoder_input_ids)  # [B, T_dec, D]
        kv = self.decoder.cross_kv(encoder_hidden)
        h = self.decoder(x, decoder_attention_mask.astype(bool), kv, encoder_mask.astype(bool),
                         deterministic=deterministic)
        return self.logits(h)

    def decode_step(self, tokens: Array, index: Array, cache, enc_kv, encoder_mask: Array,
                    self_vo: Array | None = None):
        """tokens [B] at step ``index`` -> (logits [B, V] float32, updated cache); ``self_vo``
        as ``T5Decoder.step`` (the first step only)."""
        x = self.shared(tokens[:, None])  # [B, 1, D]
        h, cache = self.decoder.step(x, index, cache, enc_kv, encoder_mask.astype(bool), self_vo)
        return self.logits(h)[:, 0], cache

    def logits(self, h: Array) -> Array:
        """Final decoder rows [B, T, D] -> [B, T, V] float32."""
        cfg = self.config
        if cfg.scale_decoder_outputs:
            h = h * (cfg.d_model ** -0.5)
        out = self.shared.attend(h) if cfg.tie_word_embeddings else self.lm_head(h)
        return out.astype(jnp.float32)


def init_cache(config: T5Config, batch_size: int, max_len: int, dtype=None):
    """Zeroed decoder self-attention cache: per layer (k, v), each [B, M, N, H]."""
    dtype = common.to_dtype(dtype or config.dtype)
    shape = (batch_size, max_len, config.num_heads, config.d_kv)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(config.num_decoder_layers))


# A serving layout of the params (``seq2seq.Seq2SeqPredictor``): every decoder layer's
# cross-attention K/V kernel stacked once into one [D, L, 2, N, H] array beside the model's
# params, so one product gives every layer's keys and values. With the kernels apart, XLA:GPU
# (its dot merger: the L products share the encoder rows) copies them into one such array on
# every call: 68 us of a 2.34 ms flan-t5-base first-token call at 16 x 512 on an H100, 28 MB
# copied before one 21 us product (docs/benchmarks.md, twenty-first session).
PACKED_CROSS_KV = "cross_kv_packed"


def _decoder_layers(params: dict) -> list[dict]:
    """The decoder layers' params, in order."""
    dec = params["decoder"]
    return [dec[f"layer_{i}"] for i in range(sum(1 for k in dec if k.startswith("layer_")))]


def pack_cross_kv(params: dict) -> dict:
    """``params`` with ``PACKED_CROSS_KV``: the decoder layers' cross-attention K/V kernels
    [D, 2, N, H] stacked along a new axis 1 (re-stacked where ``params`` already has one)."""
    packed = jnp.stack([layer["cross_kv"]["kernel"] for layer in _decoder_layers(params)], axis=1)
    return {**params, PACKED_CROSS_KV: packed}


def cross_kv(module: "T5ForConditionalGeneration", params: dict, enc: Array) -> tuple[tuple[Array, Array], ...]:
    """Per decoder layer the cross-attention (k, v) [B, S, N, H] of the encoder rows [B, S, D]:
    one product where ``params`` carry ``PACKED_CROSS_KV`` (``pack_cross_kv``), else the
    module's per-layer projections (``method="cross_kv"``). The same values either way."""
    packed = params.get(PACKED_CROSS_KV)
    if packed is None:
        return module.apply({"params": params}, enc, method="cross_kv")
    kv = common.project("BSD,DLQNH->LBSQNH", enc, packed, module.config)  # [L, B, S, 2, N, H]
    return tuple((kv[i, :, :, 0], kv[i, :, :, 1]) for i in range(kv.shape[0]))


# The same serving layout's fold for the FIRST decoder step, whose self-attention has one key
# (its own): the context is the value, so the sub-block is h W_V W_O, one [D, D] product per
# layer instead of the [D, 3, N, H] projection, a slice and the output projection (two GEMMs
# and a copy of XLA's per layer: 12 x ~4.7 us of a 2.13 ms flan-t5-base 4x call at 16 x 512
# on an H100, docs/benchmarks.md, twenty-second session). L x D x D more weights.
PACKED_SELF_VO = "self_vo_packed"


def pack_self_vo(params: dict) -> dict:
    """``params`` with ``PACKED_SELF_VO``: per decoder layer W_V [D, N*H] times W_O [N*H, D],
    multiplied in float32 and stored in the kernels' dtype, stacked [L, D, D]."""
    folded = []
    for layer in _decoder_layers(params):
        wv = layer["self_qkv"]["kernel"][:, 2]  # [D, N, H]
        wo = layer["self_out"]["kernel"]  # [N, H, D]
        f = jnp.einsum("DNH,NHE->DE", wv.astype(jnp.float32), wo.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
        folded.append(f.astype(wo.dtype))
    return {**params, PACKED_SELF_VO: jnp.stack(folded)}


def shift_right(labels: Array, start_token_id: int, pad_token_id: int) -> Array:
    """Decoder inputs from targets: [start, y_0, ..., y_{T-2}]; ignored labels (< 0) -> pad."""
    labels = jnp.asarray(labels)
    shifted = jnp.concatenate(
        [jnp.full(labels.shape[:-1] + (1,), start_token_id, labels.dtype), labels[..., :-1]], axis=-1)
    return jnp.where(shifted < 0, pad_token_id, shifted)
