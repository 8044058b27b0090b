"""Meshes, logical rules and sharded training steps on 8 fake CPU devices."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from accjax import models, sharding, train

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=99,
            max_position_embeddings=32, num_labels=2)


@functools.lru_cache(maxsize=None)
def _tiny_setup(overrides: tuple):
    cfg_overrides = dict(overrides)
    cfg = models.preset("minilm-l6-h384", **{**TINY, **cfg_overrides})
    fam = models.get_family("bert")
    module = fam.module(cfg, "sequence_classification")
    inputs = fam.dummy_inputs(cfg, 1, 8)
    params = jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), **inputs)["params"]))
    specs = sharding.logical_specs(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **inputs)))["params"]
    return cfg, module, params, specs


def tiny_setup(**cfg_overrides):
    """(config, module, numpy params, logical specs) of a 2-layer, 32-wide random BERT; cached."""
    return _tiny_setup(tuple(sorted(cfg_overrides.items())))


def optim(**kw):
    base = dict(lr=1e-3, weight_decay=0.01, warmup_ratio=0.0, clip=1.0, b1=0.9, b2=0.999, eps=1e-8)
    return ml_collections.ConfigDict({**base, **kw})


def random_batch(b=16, t=16, vocab=99, seed=0, fillers=3):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, vocab, (b, t)), 0).astype(np.int32)
    weights = np.ones(b, np.float32)
    weights[b - fillers:] = 0.0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, 2, b).astype(np.int32), "weights": weights}


def make_trainer(mesh, rules, module, specs, *, num_labels=2, dropout=True, total=10, seed=3, **opt):
    tx, lr = train.make_optimizer(optim(**opt), total)
    return train.Trainer(train.make_classification_loss(module, num_labels), tx, lr, mesh, rules, specs,
                         seed=seed, dropout=dropout)


def test_one_step_agrees_on_three_meshes():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    cfg, module, params, specs = tiny_setup()
    batch = random_batch()
    meshes = {
        "1 device": (sharding.make_mesh(1, 1, jax.devices()[:1]), sharding.DP_RULES),
        "8 data": (sharding.make_mesh(-1, 1), sharding.DP_RULES),
        "4 data x 2 fsdp": (sharding.make_mesh(4, 2), sharding.FSDP_RULES),
    }
    results = {}
    for name, (mesh, rules) in meshes.items():
        tr = make_trainer(mesh, rules, module, specs)
        state = tr.init_state(params)
        # Elimination on (a static schedule) and dropout on: both must be mesh-independent.
        state, m = tr.step(state, batch, (8, 4))
        results[name] = (float(m["loss"]), sharding.to_host(state.params), state)
    ref_loss, ref_params, _ = results["1 device"]
    assert np.isfinite(ref_loss)
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)))
    assert moved > 1e-4  # the step changed the parameters (lr 1e-3, no warmup)
    for name, (loss, p, state) in results.items():
        assert abs(loss - ref_loss) < 1e-5, name
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params)))
        assert diff < 1e-5, (name, diff)
        print(name, abs(loss - ref_loss), diff)
    # FSDP really shards: a kernel with an 'embed' axis and its Adam moments live in halves.
    _, _, fsdp_state = results["4 data x 2 fsdp"]
    k = fsdp_state.params["bert"]["layer_0"]["mlp_in"]["kernel"]  # [D, F] = ('embed', 'mlp')
    assert k.sharding.spec == P("fsdp", None)
    assert k.addressable_shards[0].data.shape == (16, 64)
    mu = fsdp_state.opt_state[1][0].mu["bert"]["layer_0"]["mlp_in"]["kernel"]
    assert mu.sharding.spec == P("fsdp", None)
    _, _, dp_state = results["8 data"]
    assert dp_state.params["bert"]["layer_0"]["mlp_in"]["kernel"].sharding.spec == P(None, None)


def test_batch_rows_split_over_both_axes():
    mesh = sharding.make_mesh(4, 2)
    sh = sharding.batch_sharding(mesh, sharding.FSDP_RULES, 2)
    assert sh.spec == P(("data", "fsdp"), None)
    assert sharding.process_rows(sh, (16, 8)) == (0, 16)  # one process holds every row
    x = sharding.to_global({"a": np.arange(32).reshape(16, 2)}, {"a": sh})["a"]
    assert {s.data.shape for s in x.addressable_shards} == {(2, 2)}
    np.testing.assert_array_equal(np.asarray(x), np.arange(32).reshape(16, 2))


def test_mesh_and_rule_errors():
    assert dict(sharding.make_mesh(-1, 2).shape) == {"data": 4, "fsdp": 2}
    assert dict(sharding.make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="does not use the 8 devices"):
        sharding.make_mesh(3, 1)
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        sharding.normalize_rules([("batch", "data"), ("embed", "model")])
    with pytest.raises(ValueError, match="must map 'batch'"):
        sharding.normalize_rules([("embed", "fsdp")])
    with pytest.raises(ValueError, match="batch_size 12 does not split over 8 devices"):
        sharding.check_batch_size(12, sharding.make_mesh(-1, 1), sharding.DP_RULES)
    # lists (as a config or JSON holds them) are accepted
    assert sharding.normalize_rules([["batch", ["data", "fsdp"]]]) == (("batch", ("data", "fsdp")),)


def test_no_distributed_start_without_a_coordinator(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append(1))
    assert sharding.maybe_initialize_distributed() is False and not called
