"""Llama-family decoders (Llama 2/3, SmolLM2, ...) in Flax linen, with ACC word-vector
elimination during prompt prefill and pruned, grouped-query KV caches for decoding.

Numerically matches Hugging Face ``LlamaModel`` / ``LlamaForCausalLM`` at fp32: token
embeddings, pre-norm blocks with RMSNorm, rotary position embeddings (RoPE, default or
``llama3`` frequency scaling), grouped-query attention (N query heads share N_kv key/value
heads, N_kv dividing N), a SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``, a final
RMSNorm and an LM head that is tied to the embedding or not.

Elimination is GPT-2's (``accjax.models.gpt2``): causal ACC after attention, the last real
token protected, kept rows gathered with their ORIGINAL positions; the output projection and
the feed-forward run on the kept rows only. What Llama adds is where positions enter: not as
an embedding added once at the input, but as a rotation of q and k in EVERY layer. Each layer
rotates by ``rows.positions``, the original position of each row that entered it, so a kept
row keeps its rotation and the relative offset between any two kept rows stays what it was
in the prompt. Recomputing positions as 0..K-1 after a gather would silently change every
later layer's attention (``tests/test_llama_elimination.py`` fails if that happens)::

    prompt rows 0..5, layer 0 keeps rows [0, 2, 5]
    layer 1 rotates them by positions [0, 2, 5]   (never [0, 1, 2])

Grouped-query attention: K/V are expanded to the N query heads (``repeat_kv``, as HF does)
just before the attention/ACC dispatch; ACC is the mean over the N query heads. The KV cache
(``gpt2.KVCache``, one cache type for every decoder) keeps the N_kv heads only, keys already
rotated by their original positions.

Einsum letters: B batch, T query rows, S key rows / cache slots, K kept rows, D hidden size,
N query heads, G key/value heads, H head size, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from accjax import acc as acc_lib
from accjax import attention as attn_lib
from accjax.models import common
from accjax.models.gpt2 import KVCache, attend_and_eliminate, decoder_rows, extend_blocks, prefill
from accjax.models.gpt2 import GPT2Output as LlamaOutput  # one output type for every decoder
from accjax.models.gpt2 import repeat_kv, run_blocks, write_cache

Array = jax.Array

ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(common.Runtime):
    vocab_size: int = 49152  # V (SmolLM2's vocabulary)
    hidden_size: int = 576  # D
    num_layers: int = 30  # L decoder blocks (HF num_hidden_layers)
    num_heads: int = 9  # N query heads (HF num_attention_heads)
    num_kv_heads: int = 3  # G key/value heads; N % G == 0 (HF num_key_value_heads)
    head_dim: int = 64  # H (HF head_dim; D / N unless the checkpoint says otherwise)
    intermediate_size: int = 1536  # F, SwiGLU width
    max_position_embeddings: int = 8192  # longest prompt + generation the model accepts
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0  # RoPE base
    rope_type: str = "default"  # 'default' or 'llama3' (Llama 3.1+ frequency scaling)
    rope_factor: float = 1.0  # llama3 scaling: factor
    rope_low_freq_factor: float = 1.0  # llama3 scaling: low_freq_factor
    rope_high_freq_factor: float = 4.0  # llama3 scaling: high_freq_factor
    rope_original_max_position: int = 8192  # llama3 scaling: original_max_position_embeddings
    tie_word_embeddings: bool = True  # LM head = embedding^T (no lm_head weight)
    initializer_range: float = 0.02  # std of N(0, std) weight init
    bos_token_id: int | None = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    protect_first: bool = False  # never drop position 0 (attention sink) during elimination
    xla_attention_below: int = 0  # layers with fewer input rows use XLA attention on GPU
    family: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; accjax implements "
                             f"{ROPE_TYPES}")
        self.check_runtime()

    # -- Hugging Face config.json <-> LlamaConfig -----------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides) -> "LlamaConfig":
        bad = [f"{k}={d[k]!r}" for k, want in
               (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"))
               if k in d and d[k] != want]
        if (d.get("pretraining_tp") or 1) != 1:
            bad.append(f"pretraining_tp={d['pretraining_tp']!r}")
        if bad:
            raise ValueError(f"Llama options not supported by accjax: {', '.join(bad)}")
        # transformers 5 writes rope_parameters; older config.json files rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        n, dm = d["num_attention_heads"], d["hidden_size"]
        eos = d.get("eos_token_id", 2)
        kw = dict(
            vocab_size=d["vocab_size"], hidden_size=dm, num_layers=d["num_hidden_layers"],
            num_heads=n, num_kv_heads=d.get("num_key_value_heads") or n,
            head_dim=d.get("head_dim") or dm // n, intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_type=rope_type,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            # Llama 3 instruct lists several stop ids; the first is the end of text.
            eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 2),
            pad_token_id=d.get("pad_token_id"),
        )
        if rope_type == "llama3":
            kw.update(rope_factor=float(rope["factor"]),
                      rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_position=int(rope["original_max_position_embeddings"]))
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "llama3":
            rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position)
        same = ("vocab_size", "hidden_size", "head_dim", "intermediate_size", "max_position_embeddings",
                "rms_norm_eps", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
                "pad_token_id")
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                **{k: getattr(self, k) for k in same}, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "rope_parameters": rope, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


PRESETS: dict[str, LlamaConfig] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the real weights accjax ships (``smollm2-135m``).
    "smollm2-135m": LlamaConfig(),
    # meta-llama/Llama-3.2-1B shapes (benchmarks with random weights).
    "llama-3.2-1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, intermediate_size=8192, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=8192, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001),
    # meta-llama/Meta-Llama-3-8B shapes.
    "llama-3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001),
}


# ------------------------------------------------------------------------------ rotary
def inverse_frequencies(cfg: LlamaConfig) -> Array:
    """[H/2] float32 rotary inverse frequencies (HF ``ROPE_INIT_FUNCTIONS``: default, llama3)."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_type == "llama3":
        old, lo, hi, f = (cfg.rope_original_max_position, cfg.rope_low_freq_factor,
                          cfg.rope_high_freq_factor, cfg.rope_factor)
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / f, inv)  # long waves slowed by the factor
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = jnp.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled)
    return inv


def rotate(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Applies RoPE by each row's own position (HF ``rotate_half`` layout).

    x: [B, T, heads, H]; positions: [B, T] int ORIGINAL positions; inv_freq: [H/2].
    Angles in float32 as HF computes them; the result is in x's dtype.
    """
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # rotate_half
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


# ------------------------------------------------------------------------------ modules
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, normalised in float32 (HF ``LlamaRMSNorm``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param("scale", common.ones_init(("embed",)), (x.shape[-1],),
                           common.to_dtype(cfg.param_dtype))
        xf = x.astype(jnp.float32)
        xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        return scale.astype(common.to_dtype(cfg.dtype)) * xf.astype(common.to_dtype(cfg.dtype))


class LlamaBlock(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)). ``__call__`` runs a prompt (with optional
    elimination after attention); ``extend`` runs new tokens against this layer's cache."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        d, n, g, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        self.input_norm = RMSNorm(cfg, name="input_norm")
        self.q_proj = common.Einsum(cfg, "BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "kv"), name="q_proj")
        self.k_proj = common.Einsum(cfg, "BTD,DGH->BTGH", (d, g, h), ("embed", "kv_heads", "kv"), name="k_proj")
        self.v_proj = common.Einsum(cfg, "BTD,DGH->BTGH", (d, g, h), ("embed", "kv_heads", "kv"), name="v_proj")
        self.o_proj = common.Einsum(cfg, "BTNH,NHD->BTD", (n, h, d), ("heads", "kv", "embed"), name="o_proj")
        self.post_norm = RMSNorm(cfg, name="post_norm")
        self.gate_proj = common.Einsum(cfg, "BTD,DF->BTF", (d, f), ("embed", "mlp"), name="gate_proj")
        self.up_proj = common.Einsum(cfg, "BTD,DF->BTF", (d, f), ("embed", "mlp"), name="up_proj")
        self.down_proj = common.Einsum(cfg, "BTF,FD->BTD", (f, d), ("mlp", "embed"), name="down_proj")

    def _project(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """q [B, T, N, H], k and v [B, T, G, H]; q and k rotated by ``positions``."""
        hn = self.input_norm(x)
        inv = inverse_frequencies(self.config)
        q = rotate(self.q_proj(hn), positions, inv)
        k = rotate(self.k_proj(hn), positions, inv)
        return q, k, self.v_proj(hn)

    def _finish(self, x: Array, ctx: Array) -> Array:
        x = x + self.o_proj(ctx)  # [B, K, D]
        h = self.post_norm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))  # [B, K, D]

    @property
    def groups(self) -> int:
        return self.config.num_heads // self.config.num_kv_heads

    def __call__(self, x: Array, rows: acc_lib.Rows, protect_pos: Array, *, keep: int | None = None,
                 acc_variant: str = "plain", output_attentions: bool = False,
                 return_kv: bool = False) -> tuple[Array, acc_lib.Rows, dict[str, Any]]:
        """As ``GPT2Block.__call__``; the K/V it returns have G heads."""
        x, ctx, rows, out = attend_and_eliminate(
            self.config, "Llama", x, rows, protect_pos, *self._project(x, rows.positions), keep=keep,
            acc_variant=acc_variant, output_attentions=output_attentions, return_kv=return_kv,
            out_proj=self.o_proj, groups=self.groups)  # rotated by the rows' original positions
        return self._finish(x, ctx), rows, out

    def extend(self, x: Array, layer_cache, positions: Array, start: Array):
        """T new tokens against this layer's cache of G key/value heads (as ``GPT2Block.extend``)."""
        q, k, v = self._project(x, positions)
        layer_cache, vis = write_cache(layer_cache, k, v, positions, start)
        keys, values = (repeat_kv(a, self.groups) for a in layer_cache[:2])  # [B, S, N, H]
        ctx, _, _ = attn_lib.softmax_attention(q, keys, values, vis,
                                               scale=common.attention_scale(self.config.head_dim))
        return self._finish(x, ctx), layer_cache


class LlamaModel(nn.Module):
    """Embeddings, L decoder blocks and the final RMSNorm (HF ``LlamaModel``)."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = common.embed(cfg, cfg.vocab_size, ("vocab", "embed"), "embed_tokens")
        self.blocks = [LlamaBlock(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg, name="norm")

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 position_ids: Array | None = None, *, schedule: tuple[int, ...] | None = None,
                 acc_variant: str = "plain", deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False,
                 return_kv: bool = False, protect_positions: Array | None = None) -> LlamaOutput:
        """Same arguments and outputs as ``GPT2Model.__call__`` (Llama has no dropout)."""
        del deterministic
        cfg = self.config
        schedule = common.check_schedule(schedule, cfg.num_layers)
        rows, protect_positions = decoder_rows(input_ids, attention_mask, position_ids, protect_positions)
        x = self.embed_tokens(input_ids)  # [B, T, D]
        return run_blocks(self.blocks, self.norm, x, rows, protect_positions, schedule,
                          output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                          acc_variant=acc_variant, return_kv=return_kv)

    def extend(self, input_ids: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """New tokens [B, T] against the cache -> (hidden [B, T, D] after the norm, cache)."""
        return extend_blocks(self.blocks, self.norm, lambda ids, _: self.embed_tokens(ids), input_ids, cache)


class LlamaForCausalLM(nn.Module):
    """Llama with its LM head (HF ``LlamaForCausalLM``); ``prefill`` and ``extend`` are the
    two halves of generation (``accjax.generate``), as for GPT-2."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.model = LlamaModel(cfg, name="model")
        if not cfg.tie_word_embeddings:
            self.lm_head = common.Einsum(cfg, "BTD,DV->BTV", (cfg.hidden_size, cfg.vocab_size),
                                         ("embed", "vocab"), name="lm_head")

    def logits(self, h: Array) -> Array:
        """[B, T, D] -> [B, T, V] float32."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, **kw) -> LlamaOutput:
        out = self.model(input_ids, attention_mask, position_ids, **kw)
        return out.replace(logits=self.logits(out.last_hidden_state))  # [B, K_L, V]

    def prefill(self, input_ids: Array, attention_mask: Array | None = None, *,
                max_new_tokens: int, schedule: tuple[int, ...] | None = None,
                acc_variant: str = "plain") -> tuple[Array, KVCache, LlamaOutput]:
        """As ``GPT2LMHeadModel.prefill``."""
        h, cache, out = prefill(self.model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                schedule=schedule, acc_variant=acc_variant)
        return self.logits(h[:, None])[:, 0], cache, out

    def extend(self, input_ids: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """New tokens [B, T] against the cache -> (logits [B, T, V] float32, cache)."""
        h, cache = self.model.extend(input_ids, cache)
        return self.logits(h), cache
