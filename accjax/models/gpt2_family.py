"""The GPT-2 family's registration: presets, heads, the HF key map and the cost model.

HF layout (``GPT2Model``; ``GPT2LMHeadModel`` and ``GPT2ForSequenceClassification`` prefix it
with ``transformer.``)::

    wte.weight [V, D], wpe.weight [P, D]
    h.{i}.ln_1.{weight,bias}, h.{i}.ln_2.{weight,bias}
    h.{i}.attn.c_attn.{weight [D, 3D], bias [3D]}     Conv1D
    h.{i}.attn.c_proj.{weight [D, D], bias [D]}       Conv1D
    h.{i}.mlp.c_fc.{weight [D, F], bias [F]}          Conv1D
    h.{i}.mlp.c_proj.{weight [F, D], bias [D]}        Conv1D
    ln_f.{weight,bias}
    lm_head.weight [V, D]   tied to wte: not stored by save_pretrained, ignored when present
    score.weight [C, D]     classifier, nn.Linear without bias (top level)

HF's ``Conv1D`` stores its weight as [in, out], already the Flax kernel order, so it converts
by a reshape only (``convert.conv1d``): c_attn's [D, 3D] becomes the fused kernel
[D, 3, N, H] (columns q | k | v, each head-major), c_proj's [D, D] becomes [N, H, D].
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from accjax import convert as cv
from accjax import schedule as sched_lib
from accjax.models import Family
from accjax.models import gpt2


def rules(config: gpt2.GPT2Config, head: str) -> list[cv.Rule]:
    base = () if head == "base" else ("transformer",)
    r: list[cv.Rule] = []

    def p(*path):
        return base + path

    r.append(cv.copy(p("wte", "embedding"), "wte.weight"))
    r.append(cv.copy(p("wpe", "embedding"), "wpe.weight"))
    for i in range(config.num_layers):
        hf, fx = f"h.{i}", f"layer_{i}"
        r += cv.norm(p(fx, "ln_1"), f"{hf}.ln_1") + cv.norm(p(fx, "ln_2"), f"{hf}.ln_2")
        r += cv.with_bias(cv.conv1d, p(fx, "qkv"), f"{hf}.attn.c_attn")  # [D, 3D] -> [D, 3, N, H]
        r += cv.with_bias(cv.conv1d, p(fx, "attn_out"), f"{hf}.attn.c_proj", in_axes=2)
        r += cv.with_bias(cv.conv1d, p(fx, "mlp_in"), f"{hf}.mlp.c_fc")
        r += cv.with_bias(cv.conv1d, p(fx, "mlp_out"), f"{hf}.mlp.c_proj")
    r += cv.norm(p("ln_f"), "ln_f")
    if head == "sequence_classification":
        r.append(cv.linear(("score", "kernel"), "score.weight", head=True, top=True))
    return r


def dummy_inputs(config, b: int, t: int) -> dict:
    # Only what the modules take: decoders (GPT-2, Llama) have no token types.
    return {"input_ids": jnp.zeros((b, t), jnp.int32), "attention_mask": jnp.ones((b, t), jnp.int32)}


def cost_model(config: gpt2.GPT2Config, head: str = "sequence_classification") -> sched_lib.CostModel:
    """Matmul FLOPs of a GPT-2 forward pass (``accjax.schedule``), causal attention.

    ``head='sequence_classification'``: the classifier on the pooled row (2 D C), what
    ``schedule.cost_model`` and the predictor use. ``head='lm'``: a prompt prefill, which
    needs the LM head on the last row only (2 D V); the prompt rows' logits are never
    computed. Embeddings are a lookup and an add (D a token); the final LayerNorm is ignored.
    """
    d = config.hidden_size
    heads = {"lm": 2 * d * config.vocab_size, "base": 0,
             "sequence_classification": 2 * d * max(1, config.num_labels)}
    if head not in heads:
        raise ValueError(f"no cost model for GPT-2 head {head!r}")
    return sched_lib.CostModel(num_layers=config.num_layers, d=d, f=config.intermediate_size,
                               head=heads[head], embed_per_token=d, causal=True)


@functools.cache
def family() -> Family:
    return Family(
        name="gpt2",
        config_cls=gpt2.GPT2Config,
        hf_model_types=("gpt2",),
        presets=gpt2.PRESETS,
        modules={"base": gpt2.GPT2Model, "lm": gpt2.GPT2LMHeadModel,
                 "sequence_classification": gpt2.GPT2ForSequenceClassification},
        rules=rules,
        hf_prefix="transformer.",
        # Causal-mask buffers of old checkpoints; the LM head, tied to wte (from_hf refuses
        # configs with tie_word_embeddings=False, so an ignored lm_head is always a copy).
        hf_ignore=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
        dummy_inputs=dummy_inputs,
        cost_model=cost_model,
        pad_vocab=gpt2.pad_vocab,
    )
