"""Elimination inside the BERT encoder and the compiled-once predictor."""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from accjax import convert, inference, models
from accjax import schedule as S
from tests.conftest import make_hf_bert, random_batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, _ = make_hf_bert(tmp_path_factory.mktemp("tiny"), num_hidden_layers=3,
                             max_position_embeddings=64)
    return convert.load(folder, "sequence_classification")


@functools.partial(jax.jit, static_argnums=0, static_argnames=("schedule", "acc_variant", "output_hidden_states"))
def _forward(module, params, batch, **kw):
    return module.apply({"params": params}, **batch, **kw)


def _apply(ld, batch, **kw):
    # jitted: run eagerly, every ACC op compiles on its own (about 4x the time of one program)
    return _forward(ld.module, ld.params, batch, **kw)


def test_speedup_one_reproduces_dense(tiny):
    batch = random_batch(np.random.default_rng(0), 4, 16, 99)
    dense = _apply(tiny, batch)
    sch = S.schedule_for_speedup(models.cost_model(tiny.config), 16, 1.0)
    assert sch == (16, 16, 16)
    same = _apply(tiny, batch, schedule=sch)
    assert np.abs(np.asarray(same.logits) - np.asarray(dense.logits)).max() <= 1e-6
    # the gather path itself is exact: keeping every row through acc.eliminate changes nothing
    from accjax import acc
    rows = acc.Rows.create(jnp.asarray(batch["attention_mask"]))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 8)), jnp.float32)
    _, r2, (x2,) = acc.eliminate(jnp.zeros((4, 16)), 16, rows, x)
    np.testing.assert_array_equal(x2, x)


def _np_layer(p, x, mask, keep, n_heads, eps):
    """Numpy transcription of one post-LN BERT layer with ACC elimination (plain)."""
    def ln(h, g):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + eps) * g["scale"] + g["bias"]
    b, t, d = x.shape
    hd = d // n_heads
    qkv = np.einsum("btd,dqnh->btqnh", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(hd)
    logits = np.where(mask[:, None, None, :], logits, -1e30)
    pr = np.exp(logits - logits.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    ctx = np.einsum("bnts,bsnh->btnh", pr, v)
    if keep < t:
        col = (pr * mask[:, None, :, None]).sum((1, 2)) / (n_heads * mask.sum(1, keepdims=True))
        col = np.where(mask, col, -np.inf)
        col[:, 0] = np.inf
        idx = np.sort(np.argsort(-col, axis=1, kind="stable")[:, :keep], axis=1)
        ctx = np.take_along_axis(ctx, idx[:, :, None, None], 1)
        x = np.take_along_axis(x, idx[:, :, None], 1)
        mask = np.take_along_axis(mask, idx, 1)
    else:
        idx = None
    h = np.einsum("btnh,nhd->btd", ctx, p["attn_out"]["kernel"]) + p["attn_out"]["bias"]
    x = ln(x + h, p["attn_norm"])
    h = x @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    h = h @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]
    return ln(x + h, p["mlp_norm"]), mask, idx


def test_eliminating_encoder_matches_numpy_reference(tiny):
    cfg = tiny.config
    batch = random_batch(np.random.default_rng(3), 5, 16, 99)
    schedule = (12, 6, 1)  # the last layer keeps only CLS: taken without ranking, same rows
    out = _apply(tiny, batch, schedule=schedule, output_hidden_states=True)
    assert "acc" in out.layers[1] and "acc" not in out.layers[2]
    p = tiny.params["bert"]
    x = np.asarray(out.hidden_states[0], np.float64)  # embeddings are covered by parity tests
    mask = batch["attention_mask"].astype(bool)
    for l, keep in enumerate(schedule):
        x, mask, idx = _np_layer(p[f"layer_{l}"], x, mask, keep, cfg.num_heads, cfg.layer_norm_eps)
        np.testing.assert_allclose(np.asarray(out.hidden_states[l + 1]), x, atol=2e-5,
                                   err_msg=f"layer {l}")
        np.testing.assert_array_equal(np.asarray(out.layers[l]["keep_idx"]), idx)
    assert out.last_hidden_state.shape == (5, 1, cfg.hidden_size)


def test_intermediates_follow_the_schedule(tiny):
    batch = random_batch(np.random.default_rng(4), 6, 16, 99)
    schedule = (12, 8, 4)
    out = _apply(tiny, batch, schedule=schedule)
    n_in = 16
    lengths = batch["attention_mask"].sum(1)
    for l, keep in enumerate(schedule):
        layer = out.layers[l]
        assert layer["acc"].shape == (6, n_in) and layer["keep_idx"].shape == (6, keep)
        pos = np.asarray(layer["positions"])
        assert np.all(pos[:, 0] == 0)  # CLS survives every layer
        assert np.all(np.diff(pos, axis=1) > 0)  # original order
        real = (pos < lengths[:, None]).sum(1)
        assert np.all(real == np.minimum(lengths, keep))  # padding dropped first
        n_in = keep


def test_value_norm_and_minus_diagonal_variants_run(tiny):
    batch = random_batch(np.random.default_rng(5), 3, 16, 99)
    outs = {v: _apply(tiny, batch, schedule=(8, 4, 2), acc_variant=v)
            for v in ("plain", "minus_diagonal", "value_norm")}
    for v, o in outs.items():
        assert o.logits.shape == (3, 2) and np.all(np.isfinite(np.asarray(o.logits))), v
    with pytest.raises(ValueError, match="unknown ACC variant"):
        _apply(tiny, batch, schedule=(8, 4, 2), acc_variant="nope")


def test_bad_schedule_is_refused(tiny):
    batch = random_batch(np.random.default_rng(6), 2, 8, 99)
    with pytest.raises(ValueError, match="3 positive Python ints"):
        _apply(tiny, batch, schedule=(4, 2))


class _CompileCounter:
    def __init__(self):
        self.n = 0

    def __call__(self, event, duration, **kw):
        if "backend_compile" in event:
            self.n += 1


def test_compile_discipline(tiny):
    pred = inference.Predictor.from_loaded(tiny, batch_size=4, length_buckets=(16, 32))
    counter = _CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        rng = np.random.default_rng(7)
        batch = random_batch(rng, 3, 16, 99)
        s2, s3 = S.schedule_for_speedup(models.cost_model(tiny.config), 16, 2.0), S.schedule_for_speedup(models.cost_model(tiny.config), 16, 3.0)
        assert s2 != s3
        pred.predict(batch, speedup=2.0)
        first = (pred.traces, counter.n, pred.num_programs)
        assert first[0] == 1 and first[1] >= 1 and first[2] == 1
        for _ in range(3):  # same speedup, same shapes, new data
            pred.predict(random_batch(rng, 3, 16, 99), speedup=2.0)
        assert (pred.traces, counter.n, pred.num_programs) == first
        pred.predict(batch, speedup=3.0)  # a new level: exactly one more program
        assert pred.traces == 2 and pred.num_programs == 2
        assert counter.n == first[1] * 2
        pred.predict(random_batch(rng, 7, 16, 99), speedup=3.0)  # 2 chunks, last padded
        assert pred.traces == 2 and counter.n == first[1] * 2
    finally:  # its own listener only: accjax.compile_cache.counts() keeps one for the process
        jax.monitoring.unregister_event_duration_listener(counter)


def test_predict_pads_and_chunks_like_direct_apply(tiny):
    rng = np.random.default_rng(8)
    batch = random_batch(rng, 7, 13, 99)  # 13 tokens -> bucket 16; 7 rows -> 4 + 3 (padded)
    pred = inference.Predictor.from_loaded(tiny, batch_size=4, length_buckets=(16, 32))
    got = pred.predict(batch, speedup=1.0)
    ref = np.asarray(_apply(tiny, batch).logits)
    assert got.shape == (7, 2)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    sch = pred.schedule(16, 2.0)
    padded = {k: np.pad(v, ((0, 0), (0, 3))) for k, v in batch.items()}
    np.testing.assert_allclose(pred.predict(batch, speedup=2.0),
                               np.asarray(_apply(tiny, padded, schedule=sch).logits), atol=1e-5)


def test_warmup_compiles_ahead(tiny):
    pred = inference.Predictor.from_loaded(tiny, batch_size=2, length_buckets=(16, 32))
    made = pred.warmup([1.0, 2.0], lengths=[16, 32])
    assert made == 4 and pred.traces == 4
    pred.predict(random_batch(np.random.default_rng(9), 2, 30, 99), speedup=2.0)
    assert pred.traces == 4  # served by a warmed program


def test_too_long_input_is_refused(tiny):
    pred = inference.Predictor.from_loaded(tiny, batch_size=2, length_buckets=(16, 32))
    with pytest.raises(ValueError, match="longer than the largest length bucket 32"):
        pred.predict(random_batch(np.random.default_rng(10), 2, 40, 99))


def test_fused_rows_travel_with_the_model(tiny, tmp_path):
    """``fuse_dropped`` is part of what the model computes: the accjax folder and the HF
    config.json keep it (an HF config without the key loads as plain dropping), a wrong value
    is refused, and with it an eliminating model computes another CLS row at the same schedule
    (and the same one dense)."""
    import dataclasses

    fused = dataclasses.replace(tiny, config=tiny.config.replace(fuse_dropped="acc"))
    batch = random_batch(np.random.default_rng(3), 4, 24, 99)
    sched = S.plan(models.cost_model(tiny.config), 24, 3.0).schedule
    a = np.asarray(_apply(tiny, batch, schedule=sched).last_hidden_state[:, 0])  # CLS
    b = np.asarray(_apply(fused, batch, schedule=sched).last_hidden_state[:, 0])
    assert np.abs(a - b).max() > 1e-3  # 0 if the setting were ignored
    np.testing.assert_allclose(np.asarray(_apply(fused, batch).logits), np.asarray(_apply(tiny, batch).logits),
                               rtol=1e-6, atol=1e-6)  # dense: nothing is dropped, nothing fused
    assert convert.load(convert.save_accjax(fused, out_dir=tmp_path / "ax"), "sequence_classification"
                        ).config.fuse_dropped == "acc"
    hf = fused.config.to_hf()
    assert hf["accjax_fuse_dropped"] == "acc" and "accjax_fuse_dropped" not in tiny.config.to_hf()
    assert type(tiny.config).from_hf(hf).fuse_dropped == "acc"
    with pytest.raises(ValueError, match="fuse_dropped must be one of"):
        tiny.config.replace(fuse_dropped="sum")
