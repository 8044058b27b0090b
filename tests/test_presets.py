"""Every preset initialises abstractly (no real allocation) with the parameter count the
architecture formula gives."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import pytest

from accjax import models


def bert_param_count(c) -> int:
    d, f, l = c.hidden_size, c.intermediate_size, c.num_layers
    emb = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * d + 2 * d
    layer = (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d
    return emb + l * layer + d * d + d  # + pooler


@pytest.mark.parametrize("name", sorted(models.all_presets()))
def test_preset_eval_shape(name):
    cfg = models.preset(name)
    fam = models.get_family(cfg.family)
    module = fam.module(cfg, "base")
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **fam.dummy_inputs(cfg, 2, 8)))
    params = nn.meta.unbox(abstract["params"])
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    if cfg.family == "bert":
        assert n == bert_param_count(cfg)
    assert n > 1_000_000
    # every parameter carries logical axis names, one per dimension
    boxed = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for b in boxed:
        assert isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim


def test_bert_base_counts():
    # BERT-base with pooler has 109,482,240 parameters (HF BertModel), large 335,141,888.
    assert bert_param_count(models.preset("bert-base-uncased")) == 109_482_240
    assert bert_param_count(models.preset("bert-large-uncased")) == 335_141_888
