"""The Llama family's registration: presets, heads, the HF key map and the cost model.

HF layout (``LlamaModel``; ``LlamaForCausalLM`` prefixes it with ``model.``)::

    embed_tokens.weight [V, D]
    layers.{i}.input_layernorm.weight [D], layers.{i}.post_attention_layernorm.weight [D]
    layers.{i}.self_attn.q_proj.weight [N*H, D]     nn.Linear, [out, in]
    layers.{i}.self_attn.{k,v}_proj.weight [G*H, D]
    layers.{i}.self_attn.o_proj.weight [D, N*H]
    layers.{i}.mlp.{gate,up}_proj.weight [F, D], layers.{i}.mlp.down_proj.weight [D, F]
    norm.weight [D]
    lm_head.weight [V, D]   (top level) only when the head is not tied to embed_tokens

Every projection is an ``nn.Linear`` without bias and is transposed into a Flax kernel
(q: [D, N, H], k/v: [D, G, H], o: [N, H, D]). A GGUF file is first renamed into this layout
(``accjax.gguf``), so both sources share these rules.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from accjax import convert as cv
from accjax import schedule as sched_lib
from accjax.models import Family
from accjax.models import gpt2_family, llama


def rules(config: llama.LlamaConfig, head: str) -> list[cv.Rule]:
    base = () if head == "base" else ("model",)
    r: list[cv.Rule] = []

    def p(*path):
        return base + path

    r.append(cv.copy(p("embed_tokens", "embedding"), "embed_tokens.weight"))
    for i in range(config.num_layers):
        hf, fx = f"layers.{i}", f"layer_{i}"
        r += cv.norm(p(fx, "input_norm"), f"{hf}.input_layernorm", bias=False)
        r += cv.norm(p(fx, "post_norm"), f"{hf}.post_attention_layernorm", bias=False)
        for name in ("q_proj", "k_proj", "v_proj"):  # [out, D] -> [D, heads, H]
            r.append(cv.linear(p(fx, name, "kernel"), f"{hf}.self_attn.{name}.weight"))
        r.append(cv.linear(p(fx, "o_proj", "kernel"), f"{hf}.self_attn.o_proj.weight", in_axes=2))
        for name in ("gate_proj", "up_proj", "down_proj"):
            r.append(cv.linear(p(fx, name, "kernel"), f"{hf}.mlp.{name}.weight"))
    r.append(cv.copy(p("norm", "scale"), "norm.weight"))
    if head == "lm" and not config.tie_word_embeddings:
        r.append(cv.linear(("lm_head", "kernel"), "lm_head.weight", top=True))
    return r


def adapt_checkpoint(config: llama.LlamaConfig, sd: dict) -> tuple[llama.LlamaConfig, dict]:
    """A tied checkpoint may still carry ``lm_head.weight`` (some exporters write the copy):
    it is dropped when it equals the embedding, and refused when it does not."""
    if config.tie_word_embeddings and "lm_head.weight" in sd:
        emb = sd.get("model.embed_tokens.weight", sd.get("embed_tokens.weight"))
        head = np.asarray(sd["lm_head.weight"])
        if emb is not None and head.shape == np.shape(emb) and np.array_equal(head, np.asarray(emb)):
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        else:
            raise cv.CheckpointError(
                "config says tie_word_embeddings=true but lm_head.weight differs from "
                "embed_tokens.weight: set tie_word_embeddings to false in config.json")
    return config, sd


@dataclasses.dataclass(frozen=True)
class GQACostModel(sched_lib.CostModel):
    """``schedule.CostModel`` with grouped-query attention: k and v project to ``kv`` = G*H
    columns, not ``a`` = N*H, so QKV costs 2 n_in d (a + 2 kv) instead of 6 n_in d a."""

    kv: int = 0

    def layer(self, n_in: int, n_out: int) -> float:
        a = self.a or self.d
        pairs = n_in * (n_in + 1) / 2 if self.causal else n_in * n_in
        return (2 * n_in * self.d * (a + 2 * self.kv) + 4 * pairs * a
                + 2 * n_out * a * self.d + 2 * self.ffn_mats * n_out * self.d * self.f)


def cost_model(config: llama.LlamaConfig, head: str = "lm") -> sched_lib.CostModel:
    """Matmul FLOPs of a Llama prefill: SwiGLU (3 matrices), GQA, causal attention; the LM
    head on the last row only (2 D V); embeddings are a lookup (D a token)."""
    d = config.hidden_size
    heads = {"lm": 2 * d * config.vocab_size, "base": 0}
    if head not in heads:
        raise ValueError(f"no cost model for Llama head {head!r}")
    return GQACostModel(num_layers=config.num_layers, d=d, f=config.intermediate_size,
                        a=config.num_heads * config.head_dim, ffn_mats=3, head=heads[head],
                        embed_per_token=d, causal=True,
                        kv=config.num_kv_heads * config.head_dim)


@functools.cache
def family() -> Family:
    return Family(
        name="llama",
        config_cls=llama.LlamaConfig,
        hf_model_types=("llama",),
        presets=llama.PRESETS,
        modules={"base": llama.LlamaModel, "lm": llama.LlamaForCausalLM},
        rules=rules,
        hf_prefix="model.",
        hf_ignore=(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
        dummy_inputs=gpt2_family.dummy_inputs,
        cost_model=cost_model,
        adapt_checkpoint=adapt_checkpoint,
    )
