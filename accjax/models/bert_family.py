"""The BERT family's registration: presets, heads and the HF key map.

HF layout (``BertModel``; task models prefix it with ``bert.``)::

    embeddings.{word,position,token_type}_embeddings.weight, embeddings.LayerNorm.{weight,bias}
    encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}   Linear [out, in]
    encoder.layer.{i}.attention.output.dense.{weight,bias}, .attention.output.LayerNorm.*
    encoder.layer.{i}.intermediate.dense.*, .output.dense.*, .output.LayerNorm.*
    pooler.dense.{weight,bias}                  classifier.{weight,bias} (task head)

accjax fuses query/key/value into one kernel [D, 3, N, H] (one GEMM instead of three) and
stores the attention output as [N, H, D]; both are exact reshapes and transposes.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from accjax import convert as cv
from accjax import schedule as sched_lib
from accjax.models import Family
from accjax.models import bert


def rules(config: bert.BertConfig, head: str) -> list[cv.Rule]:
    base = ("bert",) if head == "sequence_classification" else ()
    r: list[cv.Rule] = []

    def p(*path):
        return base + path

    e = "embeddings"
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        r.append(cv.copy(p(e, name, "embedding"), f"{e}.{name}.weight"))
    r += cv.norm(p(e, "LayerNorm"), f"{e}.LayerNorm")
    for i in range(config.num_layers):
        hf, fx = f"encoder.layer.{i}", f"layer_{i}"
        qkv = [f"{hf}.attention.self.{n}" for n in ("query", "key", "value")]
        r.append(cv.stacked_linear(p(fx, "qkv", "kernel"), [f"{k}.weight" for k in qkv], axis=1))
        r.append(cv.stacked_bias(p(fx, "qkv", "bias"), [f"{k}.bias" for k in qkv], axis=0))
        r += cv.with_bias(cv.linear, p(fx, "attn_out"), f"{hf}.attention.output.dense", in_axes=2)
        r += cv.norm(p(fx, "attn_norm"), f"{hf}.attention.output.LayerNorm")
        r += cv.with_bias(cv.linear, p(fx, "mlp_in"), f"{hf}.intermediate.dense")
        r += cv.with_bias(cv.linear, p(fx, "mlp_out"), f"{hf}.output.dense")
        r += cv.norm(p(fx, "mlp_norm"), f"{hf}.output.LayerNorm")
    r += cv.with_bias(cv.linear, p("pooler"), "pooler.dense", head=True)
    if head == "sequence_classification":
        r += cv.with_bias(cv.linear, ("classifier",), "classifier", head=True, top=True)
    return r


def dummy_inputs(config: bert.BertConfig, b: int, t: int) -> dict:
    return {"input_ids": jnp.zeros((b, t), jnp.int32), "attention_mask": jnp.ones((b, t), jnp.int32),
            "token_type_ids": jnp.zeros((b, t), jnp.int32)}


def cost_model(config: bert.BertConfig, head: str = "sequence_classification") -> sched_lib.CostModel:
    """Matmul FLOPs of a BERT forward pass (``accjax.schedule``), any head: the pooler and
    classifier (2 D^2 + 2 D C); about 8 D FLOPs a token for the embedding sum and LayerNorm."""
    d = config.hidden_size
    return sched_lib.CostModel(
        num_layers=config.num_layers, d=d, f=config.intermediate_size,
        head=2 * d * d + 2 * d * max(1, config.num_labels), embed_per_token=8 * d)


@functools.cache
def family() -> Family:
    return Family(
        name="bert",
        config_cls=bert.BertConfig,
        hf_model_types=("bert",),
        presets=bert.PRESETS,
        modules={"base": bert.BertModel, "sequence_classification": bert.BertForSequenceClassification},
        rules=rules,
        hf_prefix="bert.",
        # position_ids: a buffer; cls.*: BERT's pre-training (MLM / NSP) heads.
        hf_ignore=(r"(bert\.)?embeddings\.position_ids", r"cls\..*"),
        dummy_inputs=dummy_inputs,
        cost_model=cost_model,
    )
