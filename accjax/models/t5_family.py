"""The T5 family's registration: presets, heads, the HF key map and the cost model.

HF layout (``T5ForConditionalGeneration``; ``T5EncoderModel`` is the first two lines)::

    shared.weight                                                  [V, D]
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight         Linear [N*H, D]
    encoder.block.{i}.layer.0.SelfAttention.o.weight               Linear [D, N*H]
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   [buckets, N]
    encoder.block.{i}.layer.0.layer_norm.weight, .layer.1.layer_norm.weight, final_layer_norm
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight (gated) / {wi,wo} (relu)
    decoder.block.{i}.layer.0.SelfAttention.*  (block 0 holds the causal bias table)
    decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight, .layer.1.layer_norm.weight
    decoder.block.{i}.layer.2.DenseReluDense.*, .layer.2.layer_norm.weight, final_layer_norm
    lm_head.weight                                                 [V, D] (untied heads only)

accjax fuses q/k/v into one kernel [D, 3, N, H], the cross-attention k/v into [D, 2, N, H]
and the gated wi_0/wi_1 into [D, 2, F] (one GEMM each); all exact reshapes and transposes.
``encoder.embed_tokens`` / ``decoder.embed_tokens`` (copies of ``shared`` in older files)
are ignored, as HF ties them to ``shared`` unconditionally.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from accjax import convert as cv
from accjax import schedule as sched_lib
from accjax.models import Family
from accjax.models import t5


def _attention(r, p, hf, names, *, top: bool):
    """Rules of one attention sub-block: self-attention's fused q/k/v and output (``names``:
    their modules), or cross-attention's q, fused k/v and output (``names`` None)."""
    if names is None:
        r.append(cv.linear(p("cross_q", "kernel"), f"{hf}.q.weight", top=top))
        r.append(cv.stacked_linear(p("cross_kv", "kernel"), [f"{hf}.k.weight", f"{hf}.v.weight"],
                                   axis=1, top=top))
        names = (None, "cross_out")
    else:
        r.append(cv.stacked_linear(p(names[0], "kernel"), [f"{hf}.{n}.weight" for n in "qkv"],
                                   axis=1, top=top))
    r.append(cv.linear(p(names[1], "kernel"), f"{hf}.o.weight", in_axes=2, top=top))


def _ffn(r, p, hf, config: t5.T5Config, top: bool):
    if config.is_gated_act:
        r.append(cv.stacked_linear(p("mlp", "wi", "kernel"), [f"{hf}.wi_0.weight", f"{hf}.wi_1.weight"],
                                   axis=1, top=top))
    else:
        r.append(cv.linear(p("mlp", "wi", "kernel"), f"{hf}.wi.weight", top=top))
    r.append(cv.linear(p("mlp", "wo", "kernel"), f"{hf}.wo.weight", top=top))


def _prefix(base: tuple):
    return lambda *path: base + path


def rules(config: t5.T5Config, head: str) -> list[cv.Rule]:
    """One ``convert.Rule`` per Flax parameter of ``head`` ('base' or 'lm').

    Decoder and LM-head rules are marked ``top`` so that loading the encoder alone from a
    full checkpoint lists them as another head's keys instead of failing.
    """
    r: list[cv.Rule] = [cv.copy(("shared", "embedding"), "shared.weight")]
    r.append(cv.copy(("encoder", "relative_attention_bias", "embedding"),
                     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
    for i in range(config.num_layers):
        hf = f"encoder.block.{i}"
        p = _prefix(("encoder", f"layer_{i}"))
        _attention(r, p, f"{hf}.layer.0.SelfAttention", ("qkv", "attn_out"), top=False)
        r.append(cv.copy(p("attn_norm", "scale"), f"{hf}.layer.0.layer_norm.weight"))
        _ffn(r, p, f"{hf}.layer.1.DenseReluDense", config, top=False)
        r.append(cv.copy(p("mlp_norm", "scale"), f"{hf}.layer.1.layer_norm.weight"))
    r.append(cv.copy(("encoder", "final_norm", "scale"), "encoder.final_layer_norm.weight"))
    if head == "base":
        return r
    if head != "lm":
        raise ValueError(f"T5 has heads 'base' and 'lm', not {head!r}")
    r.append(cv.copy(("decoder", "relative_attention_bias", "embedding"),
                     "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", top=True))
    for i in range(config.num_decoder_layers):
        hf = f"decoder.block.{i}"
        p = _prefix(("decoder", f"layer_{i}"))
        _attention(r, p, f"{hf}.layer.0.SelfAttention", ("self_qkv", "self_out"), top=True)
        r.append(cv.copy(p("self_norm", "scale"), f"{hf}.layer.0.layer_norm.weight", top=True))
        _attention(r, p, f"{hf}.layer.1.EncDecAttention", None, top=True)
        r.append(cv.copy(p("cross_norm", "scale"), f"{hf}.layer.1.layer_norm.weight", top=True))
        _ffn(r, p, f"{hf}.layer.2.DenseReluDense", config, top=True)
        r.append(cv.copy(p("mlp_norm", "scale"), f"{hf}.layer.2.layer_norm.weight", top=True))
    r.append(cv.copy(("decoder", "final_norm", "scale"), "decoder.final_layer_norm.weight", top=True))
    if not config.tie_word_embeddings:
        r.append(cv.linear(("lm_head", "kernel"), "lm_head.weight", top=True))
    return r


def adapt_checkpoint(config: t5.T5Config, sd: dict) -> tuple[t5.T5Config, dict]:
    """Decides tied vs untied LM head from the weights, as transformers 5 does.

    transformers 5 writes ``tie_word_embeddings: true`` into every T5 config.json and ties
    ``lm_head`` to ``shared`` unless the checkpoint holds an ``lm_head.weight`` that differs
    from ``shared.weight``. So: a distinct ``lm_head.weight`` -> untied; an equal copy is
    dropped -> tied; none -> tied. Output scaling (``scale_decoder_outputs``) is the config's.
    """
    head = sd.get("lm_head.weight")
    shared = sd.get("shared.weight")
    if head is None:
        return config.replace(tie_word_embeddings=True), sd
    if shared is not None and np.shape(head) == np.shape(shared) and np.array_equal(
            np.asarray(head), np.asarray(shared)):
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        return config.replace(tie_word_embeddings=True), sd
    return config.replace(tie_word_embeddings=False), sd


def dummy_inputs(config: t5.T5Config, b: int, t: int) -> dict:
    return {"input_ids": jnp.zeros((b, t), jnp.int32), "attention_mask": jnp.ones((b, t), jnp.int32)}


def cost_model(config: t5.T5Config, head: str = "lm") -> sched_lib.CostModel:
    """Matmul FLOPs of "encoder + first token": the schedule covers the encoder layers.

    Per sequence, fixed (``head``): the first decoder step for one query, every decoder
    layer's self-attention (q/k/v, one score, out), cross-attention q and out, feed-forward,
    and the LM head 2 D V. Per kept encoder row (``tail_per_row``): every decoder layer
    projects it to cross-attention k and v (4 D a) and scores/reads it once (4 a).
    """
    d, a, f, v = config.d_model, config.inner_dim, config.d_ff, config.vocab_size
    m = 3 if config.is_gated_act else 2
    dec_layer = 6 * d * a + 4 * a + 2 * a * d + 2 * d * a + 2 * a * d + 2 * m * d * f
    return sched_lib.CostModel(
        num_layers=config.num_layers, d=d, f=f, a=a, ffn_mats=m,
        head=config.num_decoder_layers * dec_layer + 2 * d * v,
        embed_per_token=0.0,  # a table lookup and RMS norms: no matmul
        tail_per_row=config.num_decoder_layers * (4 * d * a + 4 * a),
    )


@functools.cache
def family() -> Family:
    return Family(
        name="t5",
        config_cls=t5.T5Config,
        hf_model_types=("t5",),
        presets=t5.PRESETS,
        modules={"base": t5.T5EncoderModel, "lm": t5.T5ForConditionalGeneration},
        rules=rules,
        hf_prefix="",
        hf_ignore=(r"(encoder|decoder)\.embed_tokens\.weight",
                   r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"),
        dummy_inputs=dummy_inputs,
        cost_model=cost_model,
        adapt_checkpoint=adapt_checkpoint,
    )
