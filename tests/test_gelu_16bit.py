"""``common.GELU_16BIT``: BERT's exact GELU runs as its tanh form in 16-bit programs (which XLA
folds into cuBLAS's GEMM epilogue on a GPU), as the exact form in float32 (HF parity) or when
switched to 'erf'; other activations are left alone."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from accjax import models
from accjax.models import common


def test_activation_name_maps_only_the_exact_gelu_in_16_bit(monkeypatch):
    assert common.activation_name("gelu", jnp.bfloat16) == "gelu_new"
    assert common.activation_name("gelu", "float16") == "gelu_new"
    assert common.activation_name("gelu", jnp.float32) == "gelu"
    for name in ("relu", "silu", "gelu_new"):
        assert common.activation_name(name, jnp.bfloat16) == name
    monkeypatch.setattr(common, "GELU_16BIT", "erf")
    assert common.activation_name("gelu", jnp.bfloat16) == "gelu"


def test_bf16_bert_runs_the_tanh_form_and_float32_the_exact(monkeypatch):
    """A tiny BERT's logits: in bf16 as a config asking for the tanh form (bit for bit) and not as
    the exact form; with 'erf' the other way round; float32 always the exact form. Both bf16 forms
    stay within bf16 rounding of float32 (the scale the tanh form is allowed to move them by)."""
    base = models.preset("minilm-l6-h384", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64)
    params = models.init_params(base, "sequence_classification", seed=3)
    params = jax.tree_util.tree_map(lambda a: a * 8 if a.ndim == 2 else a, params)  # GELU inputs of a few units
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 90, (3, 12)), jnp.int32)

    def logits(dtype, act="gelu"):
        cfg = dataclasses.replace(base, dtype=dtype, hidden_act=act)
        module = models.get_family(cfg.family).module(cfg, "sequence_classification")
        p = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
        f = jax.jit(lambda p: module.apply({"params": p}, input_ids=ids, attention_mask=jnp.ones_like(ids)).logits)
        return np.asarray(f(p), np.float32)

    tanh = logits("bfloat16", "gelu_new")
    monkeypatch.setattr(common, "GELU_16BIT", "erf")
    erf, exact32 = logits("bfloat16"), logits("float32")
    assert not np.array_equal(tanh, erf)
    monkeypatch.setattr(common, "GELU_16BIT", "tanh")
    np.testing.assert_array_equal(logits("bfloat16"), tanh)
    np.testing.assert_array_equal(logits("float32"), exact32)  # float32 keeps the exact form
    assert not np.allclose(exact32, logits("float32", "gelu_new"), rtol=0, atol=1e-6)
    bf16_noise = np.abs(erf - exact32).max()
    assert 0 < np.abs(tanh - exact32).max() < 4 * bf16_noise + 1e-3
