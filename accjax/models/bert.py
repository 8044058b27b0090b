"""BERT-family encoder (BERT, MiniLM, ...) in Flax linen, with ACC word-vector elimination.

Numerically matches Hugging Face ``BertModel`` / ``BertForSequenceClassification`` at fp32
(post-LN blocks, absolute positions, token types, tanh pooler over the CLS row).

Elimination (see ``accjax.acc``): a layer given a static ``keep`` < its input rows T runs
self-attention over all T rows, scores them by ACC, and keeps the ``keep`` best (CLS always,
padding first to go). The output projection, both residuals and the feed-forward block then
run on the kept rows only; dropped rows are gone for all later layers.

Einsum letters: B batch, T rows entering a layer, K rows kept, D hidden size, N heads,
H head size (D = N * H), F feed-forward width, Q the 3 fused projections (q, k, v).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from accjax import acc as acc_lib
from accjax.models import common

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertConfig(common.ModelConfig):
    vocab_size: int = 30522  # WordPiece vocabulary size
    hidden_size: int = 768  # D
    num_layers: int = 12  # L encoder blocks
    num_heads: int = 12  # N; head size H = D / N
    intermediate_size: int = 3072  # F, feed-forward width
    max_position_embeddings: int = 512  # longest input (absolute position table)
    type_vocab_size: int = 2  # segment ids (sentence A / B)
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # HF name; "gelu" is the exact erf form
    hidden_dropout: float = 0.1  # embeddings, residual branches
    attention_dropout: float = 0.1  # on attention probabilities
    classifier_dropout: float | None = None  # None: use hidden_dropout (as HF)
    initializer_range: float = 0.02  # std of N(0, std) weight init
    pad_token_id: int = 0
    num_labels: int = 2  # classification head width; 1 = regression
    # layers with fewer input rows use XLA attention on GPU: cuDNN's 64 x 128 tiles are mostly
    # padding for a few rows (measured: docs/benchmarks.md)
    xla_attention_below: int = 64
    # three [D, D] GEMMs (False) give contiguous q, k, v; one [D, 3D] GEMM (True) needs three
    # slice copies before flash attention (measured: docs/benchmarks.md)
    fused_qkv: bool = False
    # what an eliminating layer does with the rows it drops (acc.FUSE_MODES): '' drops them;
    # 'acc' / 'mean' keeps one row fewer and appends their ACC-weighted / plain mean
    # (acc.fuse_dropped); written to config.json as ``accjax_fuse_dropped``
    fuse_dropped: str = ""
    family: str = "bert"

    hf_keys = {**{f: f for f in ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings",
                                 "type_vocab_size", "layer_norm_eps", "hidden_act", "classifier_dropout",
                                 "initializer_range", "pad_token_id")},
               "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
               "hidden_dropout": "hidden_dropout_prob", "attention_dropout": "attention_probs_dropout_prob",
               "fuse_dropped": "accjax_fuse_dropped"}
    hf_required = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")

    # -- Hugging Face config.json <-> BertConfig ------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides) -> "BertConfig":
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type={d['position_embedding_type']!r} is not supported; "
                "accjax's BERT implements absolute positions only"
            )
        return cls(**{**cls.hf_fields(d), **overrides})

    def __post_init__(self):
        super().__post_init__()
        from accjax import acc

        if self.fuse_dropped not in acc.FUSE_MODES:
            raise ValueError(f"fuse_dropped must be one of {acc.FUSE_MODES}, got {self.fuse_dropped!r}")

    def to_hf(self) -> dict[str, Any]:
        d = {"model_type": "bert", "architectures": ["BertForSequenceClassification"],
             **self.hf_values(), "position_embedding_type": "absolute",
             "problem_type": "regression" if self.num_labels == 1 else "single_label_classification"}
        if not self.fuse_dropped:  # HF's own configs: no accjax key unless it matters
            del d["accjax_fuse_dropped"]
        return d


PRESETS: dict[str, BertConfig] = {
    "bert-base-uncased": BertConfig(),
    "bert-large-uncased": BertConfig(
        hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096
    ),
    "minilm-l6-h384": BertConfig(
        hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536
    ),
}


@struct.dataclass
class BertOutput:
    """What a forward pass returns; unused fields cost nothing under ``jax.jit``.

    Attributes:
      last_hidden_state: [B, K_L, D], the rows that survived the last layer.
      pooler_output: [B, D] tanh(W h_CLS + b), or None without a pooler.
      rows: ``acc.Rows`` of the surviving rows (mask, original positions, token types).
      layers: per layer a dict; eliminating layers hold ``acc`` [B, T] (ACC of the rows that
        entered), ``keep_idx`` [B, K] (kept rows, indices into that layer's input, sorted)
        and ``positions`` [B, K] (original positions of the kept rows).
      hidden_states: (embeddings, layer 1, ..., layer L) outputs, if asked for.
      attentions: per layer [B, N, T, T] float32 probabilities, if asked for.
      logits: [B, C] for the classification model, else None.
    """

    last_hidden_state: Array
    pooler_output: Array | None
    rows: acc_lib.Rows
    layers: tuple[dict[str, Array], ...]
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    logits: Array | None = None


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array, token_types: Array, deterministic: bool) -> Array:
        cfg = self.config
        x = common.embed(cfg, cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)  # [B, T, D]
        x += common.embed(cfg, cfg.max_position_embeddings, ("positions", "embed"), "position_embeddings")(
            positions)
        x += common.embed(cfg, cfg.type_vocab_size, ("types", "embed"), "token_type_embeddings")(token_types)
        x = common.layer_norm(cfg, "LayerNorm")(x)
        return common.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class BertLayer(nn.Module):
    """One post-LN encoder block with optional elimination after self-attention."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        rows: acc_lib.Rows,
        *,
        keep: int | None = None,
        acc_variant: str = "plain",
        deterministic: bool = True,
        output_attentions: bool = False,
    ) -> tuple[Array, acc_lib.Rows, dict[str, Array]]:
        """
        Args:
          x: [B, T, D] rows entering the layer; rows: their ``acc.Rows``.
          keep: static Python int; rows kept after attention (None or >= T: keep all).
        Returns:
          (x [B, K, D], rows of the K kept rows, out dict of named intermediates).
        """
        cfg = self.config
        t = x.shape[1]
        eliminate = keep is not None and keep < t
        scale = common.attention_scale(cfg.head_dim)
        out: dict[str, Array] = {}

        qkv_proj = common.dense(cfg, (3, cfg.num_heads, cfg.head_dim), ("embed", "qkv", "heads", "kv"), "qkv")
        if cfg.fused_qkv:
            qkv = qkv_proj(x)  # [B, T, 3, N, H]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, N, H]
            packed = (qkv, None)
        else:
            q, k, v, packed = _split_qkv(qkv_proj, x, cfg)  # each [B, T, N, H], contiguous

        heads_out = common.HeadsOut(cfg, name="attn_out")
        # Keeping one row keeps the protected CLS, always row 0 (order is preserved): no
        # ranking needed, the prefix of one row is the same selection.
        prefix = acc_variant in acc_lib.BASELINES or keep == 1
        drop = common.Dropout(cfg.attention_dropout)
        train_dropout = not deterministic and cfg.attention_dropout > 0
        ctx, scores, probs = acc_lib.attend_and_score(
            q, k, v, rows.mask, scale=scale, score=eliminate and not prefix, variant=acc_variant,
            protect=acc_lib.FIRST_ROW,  # CLS: row 0 (ranked first, so kept there by every layer)
            attention_impl=cfg.attention_impl, acc_impl=cfg.acc_impl,
            xla_attention_below=cfg.xla_attention_below, output_attentions=output_attentions,
            probs_dropout=(lambda p: drop(p, deterministic=False)) if train_dropout else None,
            value_norms=lambda: heads_out.value_norms(v),
            packed=packed,
        )  # ctx [B, T, N, H], scores [B, T], probs [B, N, T, T]
        if output_attentions:
            out["attentions"] = probs
        if eliminate:  # ctx [B, K, N, H], x [B, K, D]
            rows, (ctx, x) = acc_lib.drop_rows(scores, keep, rows, out, ctx, x, prefix=prefix,
                                               fuse=cfg.fuse_dropped)

        h = heads_out(ctx)  # [B, K, D]
        h = common.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
        x = common.layer_norm(cfg, "attn_norm")(x + h)
        x = common.feed_forward_add_norm(  # LN(x + dropout(act(x W1 + b1) W2 + b2)), [B, K, D]
            common.dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "mlp_in", activation=cfg.hidden_act),
            common.dense(cfg, cfg.hidden_size, ("mlp", "embed"), "mlp_out"), common.layer_norm(cfg, "mlp_norm"),
            x, functools.partial(common.Dropout(cfg.hidden_dropout), deterministic=deterministic),
            dropping=not deterministic and cfg.hidden_dropout > 0)
        return x, rows, out


# Where q, k and v are three GEMMs kept apart from XLA's dot merger (``common.qkv_apart``), not
# merged into one whose output three copies slice. H100, BERT-base 32 x 512, same process,
# pipelined, logits identical: dense 6.3% faster, 2x 0.7%, 4.8x 1.8% (docs/benchmarks.md,
# thirty-first session). Only where the copies were seen (the CPU's programs, and so its
# results, stay as they were; tests add "cpu"), from ``common.QKV_APART_MIN_ROWS`` rows.
SEPARATE_QKV_BACKENDS = ("gpu",)


def _split_qkv(proj: nn.DenseGeneral, x: Array, cfg: BertConfig):
    """q, k, v by three GEMMs on slices of the fused kernel: each output is contiguous, so a
    flash-attention call needs no copies (same parameters as the fused form;
    ``SEPARATE_QKV_BACKENDS``); and the packed form (one GEMM's [B, T, 3, N, H] output before the
    bias, the bias) for the fused attention + ACC kernel. Each consumer uses one form; XLA
    drops the other."""
    kernel = proj.variables["params"]["kernel"] if proj.has_variable("params", "kernel") else None
    if kernel is None:  # first call (init): create the parameters through the module
        qkv = proj(x)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], (qkv, None)
    dtype = common.to_dtype(cfg.dtype)
    kernel = nn.meta.unbox(kernel).astype(dtype)  # [D, 3, N, H]
    bias = nn.meta.unbox(proj.variables["params"]["bias"]).astype(dtype)  # [3, N, H]
    if common.qkv_apart_here(SEPARATE_QKV_BACKENDS, x):
        q, k, v = common.qkv_apart(x, kernel, bias, cfg)  # each [B, T, N, H]
    else:
        q, k, v = (common.project("BTD,DNH->BTNH", x, kernel[:, j], cfg) + bias[j] for j in range(3))
    return q, k, v, (common.project("BTD,DJNH->BTJNH", x, kernel, cfg), bias)


class BertModel(nn.Module):
    """Embeddings, L encoder blocks, and an optional pooler."""

    config: BertConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        *,
        schedule: tuple[int, ...] | None = None,
        acc_variant: str = "plain",
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BertOutput:
        """
        Args:
          input_ids: [B, T] int token ids.
          attention_mask: [B, T], 1/True for real tokens (default: all real).
          token_type_ids: [B, T] segment ids (default 0); position_ids: [B, T] (default arange).
          schedule: per-layer keep-lengths (static Python ints), None = dense.
          acc_variant: ACC form used to rank rows (``acc.VARIANTS``).
          deterministic: False enables dropout (needs a 'dropout' rng).
        """
        cfg = self.config
        schedule = common.check_schedule(schedule, cfg.num_layers)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        rows = acc_lib.Rows.create(attention_mask, position_ids, token_type_ids)

        x = Embeddings(cfg, name="embeddings")(input_ids, rows.positions, rows.token_types, deterministic)
        x, rows, layers, hidden_states, attentions = common.run_layers(
            [BertLayer(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)], x, rows, schedule,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            acc_variant=acc_variant, deterministic=deterministic)
        pooled = None
        if self.add_pooling_layer:
            # The CLS row is protected and order is preserved, so it is always row 0.
            pooled = common.dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "pooler")(x[:, 0])  # [B, D]
            pooled = jnp.tanh(pooled)
        return BertOutput(last_hidden_state=x, pooler_output=pooled, rows=rows, layers=layers,
                          hidden_states=hidden_states, attentions=attentions)


class BertForSequenceClassification(nn.Module):
    """BERT + pooler + dropout + linear head; ``num_labels == 1`` is regression."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 *, deterministic: bool = True, **kw) -> BertOutput:
        cfg = self.config
        out = BertModel(cfg, name="bert")(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic=deterministic, **kw)
        p = cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        h = common.Dropout(p)(out.pooler_output, deterministic=deterministic)
        logits = common.dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")(h)  # [B, C]
        return out.replace(logits=logits.astype(jnp.float32))
