"""Optimizer, losses, elimination while training, elastic sampling, compiled-step cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accjax import schedule as sched_lib
from accjax import models, sharding, train
from tests.test_sharding import make_trainer, optim, random_batch, tiny_setup


def test_lr_schedule_matches_hugging_face():
    import torch
    from transformers import get_linear_schedule_with_warmup

    total, ratio, lr = 957, 0.1, 5e-5  # rt_polarity: 3 epochs x 319 steps
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    hf = get_linear_schedule_with_warmup(opt, train.warmup_steps(total, ratio), total)
    ours = train.lr_schedule(lr, total, ratio)
    assert train.warmup_steps(total, ratio) == 96
    for step in range(total):
        # HF: the update of step t runs at the lr set after t scheduler steps
        np.testing.assert_allclose(float(ours(step)), opt.param_groups[0]["lr"], rtol=1e-5, atol=1e-12)
        opt.step()
        hf.step()
    assert float(ours(0)) == 0.0 and float(ours(96)) == pytest.approx(lr)


def test_weight_decay_skips_biases_and_norm_scales():
    _, _, params, _ = tiny_setup()
    mask = train.decay_mask(params)
    flat = {"/".join(getattr(k, "key", str(k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["bert/layer_0/mlp_in/kernel"] and flat["bert/embeddings/word_embeddings/embedding"]
    assert not flat["bert/layer_0/mlp_in/bias"] and not flat["bert/layer_0/attn_norm/scale"]
    assert not flat["bert/embeddings/LayerNorm/scale"] and flat["classifier/kernel"]


def test_adamw_step_matches_torch():
    """One clipped AdamW step on a toy tensor: optax chain == torch.optim.AdamW + clip."""
    import torch

    w0 = np.array([[0.5, -1.0], [2.0, 0.1]], np.float32)
    g = np.array([[3.0, -4.0], [0.5, 12.0]], np.float32)  # norm > 1: clipped
    tx, _ = train.make_optimizer(optim(lr=0.1, warmup_ratio=0.0), total_steps=10)
    params = {"kernel": jnp.asarray(w0)}
    upd, _ = tx.update({"kernel": jnp.asarray(g)}, tx.init(params), params)
    ours = np.asarray(params["kernel"] + upd["kernel"])
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    p.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_(p, 1.0)
    opt.step()
    # optax forms Adam's bias correction 1 - 0.999**t in float32 (torch: in float64), a
    # 1.3e-5 relative difference in v_hat: 6e-7 absolute on a 0.1 step.
    np.testing.assert_allclose(ours, p.detach().numpy(), rtol=0, atol=1e-6)
    assert abs(float(ours[0, 0]) - 0.3995) < 1e-6  # decayed by lr*wd, moved by lr (Adam's first step)
    del sched


def test_weight_average_is_the_debiased_decayed_mean_of_the_weights_after_each_update():
    d = 0.6
    tx, _ = train.make_optimizer(optim(lr=0.1, warmup_ratio=0.0, average=d), total_steps=10)
    params = {"kernel": jnp.asarray([[0.5, -1.0], [2.0, 0.1]]), "bias": jnp.asarray([0.3, -0.2])}
    state = tx.init(params)
    np.testing.assert_array_equal(train.averaged_weights(params, state)["kernel"], params["kernel"])  # no update yet
    seen = []
    for t in range(5):
        grads = jax.tree.map(lambda p: jnp.sin(3.0 * p + t), params)
        upd, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, upd)
        seen.append(jax.tree.map(np.asarray, params))
    w = np.array([d ** (len(seen) - 1 - s) * (1 - d) for s in range(len(seen))])
    avg = train.averaged_weights(params, state)
    for k in params:
        want = sum(wi * p[k] for wi, p in zip(w, seen)) / w.sum()  # w.sum() == 1 - d**5
        np.testing.assert_allclose(np.asarray(avg[k]), want, rtol=1e-6, atol=1e-7)
        assert not np.allclose(want, seen[-1][k], atol=1e-3)  # the average is not the last weights
    # the updates themselves are AdamW's: the same weights with and without the average
    plain, _ = train.make_optimizer(optim(lr=0.1, warmup_ratio=0.0), total_steps=10)
    p0 = {"kernel": jnp.asarray([[0.5, -1.0], [2.0, 0.1]]), "bias": jnp.asarray([0.3, -0.2])}
    g = jax.tree.map(jnp.cos, p0)
    a, _ = tx.update(g, tx.init(p0), p0)
    b, _ = plain.update(g, plain.init(p0), p0)
    np.testing.assert_array_equal(a["kernel"], b["kernel"])
    assert train.averaged_weights(p0, plain.init(p0)) is p0  # no average kept: the weights


def test_layer_decay_scales_each_layers_step_by_its_depth():
    _, _, params, _ = tiny_setup()  # 2 layers
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
    steps = {}
    for decay in (1.0, 0.5, 1.5):
        tx, _ = train.make_optimizer(optim(lr=0.1, warmup_ratio=0.0, layer_decay=decay), total_steps=10)
        upd, _ = tx.update(grads, tx.init(params), params)
        steps[decay] = {"/".join(getattr(k, "key", str(k)) for k in path): np.asarray(v)
                        for path, v in jax.tree_util.tree_flatten_with_path(upd)[0]}
    want = {"classifier/kernel": 0, "bert/pooler/kernel": 0, "bert/layer_1/mlp_in/kernel": 1,
            "bert/layer_0/qkv/bias": 2, "bert/embeddings/word_embeddings/embedding": 3,
            "bert/embeddings/LayerNorm/scale": 3}  # depth below the head: decay ** depth
    for decay in (0.5, 1.5):
        for name, depth in want.items():
            np.testing.assert_allclose(steps[decay][name], steps[1.0][name] * decay ** depth, rtol=1e-6)
    assert np.abs(steps[1.0]["bert/layer_0/qkv/bias"]).min() > 0  # a real step to scale


def test_layer_decay_finds_every_familys_embeddings():
    """GPT-2's ``wte`` / ``wpe`` and T5's ``shared`` are nn.Embed tables without 'embed' in
    their module name: they sit below the layers all the same."""
    tree = {"wte": {"embedding": 1.0}, "wpe": {"embedding": 1.0}, "shared": {"embedding": 1.0},
            "layer_0": {"mlp": {"kernel": 1.0}}, "layer_1": {"mlp": {"kernel": 1.0}},
            "final_norm": {"scale": 1.0}, "relative_attention_bias": {"kernel": 1.0}}
    f = train.layer_scales(tree, 0.5)
    assert f["wte"]["embedding"] == f["wpe"]["embedding"] == f["shared"]["embedding"] == 0.5 ** 3
    assert (f["layer_0"]["mlp"]["kernel"], f["layer_1"]["mlp"]["kernel"]) == (0.25, 0.5)
    assert f["final_norm"]["scale"] == f["relative_attention_bias"]["kernel"] == 1.0


def test_classification_loss_weights_and_regression():
    cfg, module, params, _ = tiny_setup()
    batch = random_batch(fillers=4)
    loss_fn = jax.jit(train.classification_loss, static_argnums=(0, 4), static_argnames="num_labels")
    apply = jax.jit(lambda m, p, b: m.apply({"params": p}, b["input_ids"], b["attention_mask"]).logits,
                    static_argnums=0)
    loss, m = loss_fn(module, params, batch, None, None, num_labels=2)
    logits = np.asarray(apply(module, params, batch))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    real = batch["weights"] > 0
    ce = -logp[np.arange(16), batch["labels"]][real].mean()
    np.testing.assert_allclose(float(loss), ce, rtol=1e-5)
    # filler rows (weight 0) do not count, whatever they hold
    other = dict(batch, labels=np.where(real, batch["labels"], 1 - batch["labels"]))
    assert float(loss_fn(module, params, other, None, None, num_labels=2)[0]) == float(loss)
    # regression: one output, weighted mean squared error
    cfg1, module1, params1, _ = tiny_setup(num_labels=1)
    rb = dict(batch, labels=np.linspace(0, 5, 16).astype(np.float32))
    loss1, m1 = loss_fn(module1, params1, rb, None, None, num_labels=1)
    pred = np.asarray(apply(module1, params1, rb))[:, 0]
    np.testing.assert_allclose(float(loss1), ((pred - rb["labels"]) ** 2)[real].mean(), rtol=1e-5)
    assert "mse" in m1


def test_training_with_elimination_reduces_the_loss_and_compiles_once():
    cfg, module, params, specs = tiny_setup()
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    tr = make_trainer(mesh, sharding.DP_RULES, module, specs, dropout=False, total=40, lr=3e-3)
    batch = random_batch(fillers=0)
    p = sched_lib.plan(models.cost_model(cfg), 16, 3.0)
    sched, s = p.schedule, p.analytic
    assert sched is not None and sched[-1] < 16 and s > 2  # rows really are dropped
    state = tr.init_state(params)
    losses = []
    for _ in range(30):
        state, m = tr.step(state, batch, sched)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses  # the tiny model fits the batch through the elimination
    assert tr.num_programs == 1 and tr.traces == 1  # 30 steps, one trace, one compile
    state, _ = tr.step(state, batch, None)  # dense: a second program
    assert tr.num_programs == 2 and tr.traces == 2


def test_bfloat16_compute_keeps_float32_state():
    cfg, module, params, specs = tiny_setup(dtype="bfloat16")
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    tr = make_trainer(mesh, sharding.DP_RULES, module, specs)
    state, m = tr.step(tr.init_state(params), random_batch(), None)
    assert np.isfinite(float(m["loss"]))
    dtypes = {x.dtype for x in jax.tree.leaves(state.params)} | \
             {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim > 0}
    assert dtypes == {jnp.dtype("float32")}


def test_elastic_levels_are_a_function_of_seed_and_step():
    a = train.SpeedupSampler("elastic", speedup_range=(1.0, 4.0), levels=7, seed=0)
    assert a.levels == (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    draws = [a.speedup(t) for t in range(700)]
    # a resumed run (a fresh sampler starting at step 350) draws what the first run drew
    b = train.SpeedupSampler("elastic", speedup_range=(1.0, 4.0), levels=7, seed=0)
    assert [b.speedup(t) for t in range(350, 700)] == draws[350:]
    counts = np.bincount([a.level(t) for t in range(700)], minlength=7)
    assert counts.min() > 60  # every level is drawn, roughly uniformly (100 expected)
    c = train.SpeedupSampler("elastic", speedup_range=(1.0, 4.0), levels=7, seed=1)
    assert [c.speedup(t) for t in range(50)] != draws[:50]
    assert train.SpeedupSampler("fixed", speedup=2.5).speedup(123) == 2.5
    assert train.SpeedupSampler("dense").speedup(5) is None
    with pytest.raises(ValueError, match="speedup_range"):
        train.SpeedupSampler("elastic", speedup_range=(0.5, 2), levels=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        train.SpeedupSampler("sometimes")


def test_speedups_beyond_a_length_run_at_its_maximum():
    cfg, _, _, _ = tiny_setup()
    cm = models.cost_model(cfg)
    top = sched_lib.max_speedup(cm, 16)
    p = sched_lib.plan(cm, 16, top * 3)
    sched, s = p.schedule, p.analytic
    assert s == pytest.approx(top) and sched == (1, 1)
    assert (sched_lib.plan(cm, 16, 1.0).schedule, sched_lib.plan(cm, 16, 1.0).analytic) == (None, 1.0)
    sched2 = sched_lib.plan(cm, 16, 1.5).schedule
    assert sched2 == sched_lib.schedule_for_speedup(cm, 16, 1.5)  # what the Predictor runs


# ------------------------------------------------------- the sandwich rule and distillation
def test_sandwich_steps_run_the_full_model_and_the_top_level_every_step():
    s = train.SpeedupSampler("elastic", speedup_range=(1.0, 5.0), levels=9, seed=3, sandwich=True, samples=2)
    assert s.pool == (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)  # drawn only from strictly between
    steps = [s.speedups(t) for t in range(400)]
    assert all(p[:2] == (1.0, 5.0) and len(p) == 4 and p[2] < p[3] and set(p[2:]) <= set(s.pool)
               for p in steps)
    assert set(steps) == set(s.combinations()) and len(s.combinations()) == 21  # C(7, 2) programs
    again = train.SpeedupSampler("elastic", speedup_range=(1.0, 5.0), levels=9, seed=3, sandwich=True, samples=2)
    assert [again.speedups(t) for t in range(200, 400)] == steps[200:]  # a resumed run draws the same
    two = train.SpeedupSampler("elastic", speedup_range=(1.0, 5.0), levels=9, sandwich=True, samples=0)
    assert {two.speedups(t) for t in range(50)} == {(1.0, 5.0)} and two.combinations() == [(1.0, 5.0)]
    # without the sandwich and one sample per step: today's draw, unchanged
    plain = train.SpeedupSampler("elastic", speedup_range=(1.0, 4.0), levels=7, seed=0)
    assert [plain.speedups(t) for t in range(30)] == [(plain.speedup(t),) for t in range(30)]
    with pytest.raises(ValueError, match="samples must be in"):
        train.SpeedupSampler("elastic", speedup_range=(1.0, 5.0), levels=3, sandwich=True, samples=2)


def test_distillation_is_zero_when_student_and_teacher_agree_and_never_moves_the_teacher():
    rng = np.random.default_rng(0)
    batch = {"weights": np.array([1, 1, 1, 0], np.float32)}
    t = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    assert abs(float(train.distill_loss(t, t, batch, 3, 2.0))) < 1e-6
    s = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    assert float(train.distill_loss(s, t, batch, 3, 2.0)) > 1e-3  # it does see a difference
    g_teacher = jax.grad(lambda x: train.distill_loss(s, x, batch, 3, 2.0))(t)
    assert float(jnp.abs(g_teacher).max()) == 0.0
    g_student = jax.grad(lambda x: train.distill_loss(x, t, batch, 3, 2.0))(s)
    assert float(jnp.abs(g_student[:3]).max()) > 0 and float(jnp.abs(g_student[3]).max()) == 0  # filler row
    # regression: the squared difference of the predictions
    np.testing.assert_allclose(float(train.distill_loss(s[:, :1], t[:, :1], batch, 1)),
                               float(((s[:3, 0] - t[:3, 0]) ** 2).mean()), rtol=1e-6)


def test_hidden_state_distillation_compares_kept_rows_at_their_positions():
    """The eliminated pass's last-layer rows against the full pass's rows at the same original
    positions: zero for the full pass against itself, the hand-computed mean otherwise; added
    to the pass's loss with its weight; no gradient reaches the teacher."""
    cfg, module, params, _ = tiny_setup()
    batch = random_batch(fillers=3)
    top = sched_lib.plan(models.cost_model(cfg), 16, 3.0).schedule
    out_of = jax.jit(train._apply, static_argnums=(0, 4, 5))
    full, st = (out_of(module, params, batch, None, s, "plain") for s in (None, top))
    assert st.last_hidden_state.shape[1] < full.last_hidden_state.shape[1]
    assert abs(float(train.hidden_distill_loss(full, full, batch))) < 1e-9
    h = float(train.hidden_distill_loss(st, full, batch))
    t, s = np.asarray(full.last_hidden_state), np.asarray(st.last_hidden_state)
    pos, mask, w = (np.asarray(x) for x in (st.rows.positions, st.rows.mask, batch["weights"]))
    per = (((s - np.take_along_axis(t, pos[..., None], 1)) ** 2).mean(-1) * mask).sum(1) / np.maximum(mask.sum(1), 1)
    assert h > 1e-6
    np.testing.assert_allclose(h, (per * w).sum() / w.sum(), rtol=1e-4)
    loss = jax.jit(train.classification_loss, static_argnums=(0, 4), static_argnames="num_labels")
    task = [float(loss(module, params, batch, None, s, num_labels=2)[0]) for s in (None, top)]
    got, m = loss(module, params, batch, None, train.Passes((None, top), hidden_weight=0.5), num_labels=2)
    np.testing.assert_allclose(float(got), sum(task) + 0.5 * h, rtol=1e-4)
    np.testing.assert_allclose(float(m["distill_hidden"]), h, rtol=1e-3)
    g = jax.grad(lambda x: train.hidden_distill_loss(st, full.replace(last_hidden_state=x), batch))(
        full.last_hidden_state)
    assert float(jnp.abs(g).max()) == 0.0


def test_hidden_state_distillation_over_all_layers_follows_each_layers_kept_rows():
    """'all': each layer's output rows against the full pass's rows of that layer at the
    same original positions (those the layer kept, padding excluded), the mean over layers;
    zero for the full pass against itself; no gradient reaches the teacher. 'both' adds the
    last layer's term ('last', the same as the last layer's term of 'all') to that mean."""
    cfg, module, params, _ = tiny_setup()
    batch = random_batch(fillers=3)
    top = sched_lib.plan(models.cost_model(cfg), 16, 3.0).schedule
    out_of = jax.jit(train._apply, static_argnums=(0, 4, 5, 6))
    full, st = (out_of(module, params, batch, None, s, "plain", True) for s in (None, top))
    assert abs(float(train.hidden_distill_loss(full, full, batch, "all"))) < 1e-9
    h = float(train.hidden_distill_loss(st, full, batch, "all"))
    am, w = np.asarray(batch["attention_mask"], np.float64), np.asarray(batch["weights"], np.float64)
    pos, want = np.broadcast_to(np.arange(am.shape[1]), am.shape), []
    for i in range(cfg.num_layers):
        if "positions" in st.layers[i]:
            pos = np.asarray(st.layers[i]["positions"])
        s, t = np.asarray(st.hidden_states[i + 1]), np.asarray(full.hidden_states[i + 1])
        assert s.shape[1] == pos.shape[1]
        mask = np.take_along_axis(am, pos, 1)
        per = (((s - np.take_along_axis(t, pos[..., None], 1)) ** 2).mean(-1) * mask).sum(1) / np.maximum(mask.sum(1), 1)
        want.append((per * w).sum() / w.sum())
    assert h > 1e-6 and want[-1] > 0 and not np.isclose(h, want[-1])
    np.testing.assert_allclose(h, np.mean(want), rtol=1e-4)
    hs = list(full.hidden_states)
    g = jax.grad(lambda x: train.hidden_distill_loss(
        st, full.replace(hidden_states=tuple(hs[:2] + [x] + hs[3:])), batch, "all"))(hs[2])
    assert float(jnp.abs(g).max()) == 0.0
    loss = jax.jit(train.classification_loss, static_argnums=(0, 4), static_argnames="num_labels")
    task = [float(loss(module, params, batch, None, s, num_labels=2)[0]) for s in (None, top)]
    got, _ = loss(module, params, batch, None, train.Passes((None, top), hidden_weight=0.5, hidden_layers="all"),
                  num_labels=2)
    np.testing.assert_allclose(float(got), sum(task) + 0.5 * h, rtol=1e-4)
    # 'both': the mean over layers plus the last layer's term ('last') once more
    last = float(train.hidden_distill_loss(st, full, batch, "last"))
    np.testing.assert_allclose(last, want[-1], rtol=1e-4)
    np.testing.assert_allclose(float(train.hidden_distill_loss(st, full, batch, "both")), np.mean(want) + want[-1],
                               rtol=1e-4)
    assert abs(float(train.hidden_distill_loss(full, full, batch, "both"))) < 1e-9
    with pytest.raises(ValueError, match="must be one of"):
        train.hidden_distill_loss(st, full, batch, "first")


def test_fused_rows_stand_for_no_position_so_hidden_distillation_leaves_them_out():
    """With ``fuse_dropped`` every eliminating layer keeps one row fewer and appends the fused
    row (position -1): the kept rows are those the same layer keeps without fusion at one row
    less, and hidden-state distillation compares only those (the fused row has no teacher)."""
    cfg, module, params, _ = tiny_setup()
    _, fmodule, _, _ = tiny_setup(fuse_dropped="acc")
    batch = random_batch(fillers=3)
    top = sched_lib.plan(models.cost_model(cfg), 16, 3.0).schedule
    out_of = jax.jit(train._apply, static_argnums=(0, 4, 5, 6))
    full = out_of(module, params, batch, None, None, "plain", True)
    st = out_of(fmodule, params, batch, None, top, "plain", True)
    first = top[0]  # layer 1 drops rows: it keeps first - 1 of them, then the fused row
    plain = out_of(module, params, batch, None, (first - 1,) + top[1:], "plain", True)
    pos = np.asarray(st.layers[0]["positions"])
    assert pos.shape[1] == first and (pos[:, -1] == -1).all() and (pos[:, :-1] >= 0).all()
    np.testing.assert_array_equal(pos[:, :-1], np.asarray(plain.layers[0]["positions"]))
    real = np.asarray(st.rows.mask)
    assert np.asarray(st.layers[0]["keep_idx"]).shape[1] == first - 1
    # the kept rows leave layer 1 as without fusion (attention ran before the drop)
    np.testing.assert_allclose(np.asarray(st.hidden_states[1])[:, :-1], np.asarray(plain.hidden_states[1]),
                               rtol=1e-5, atol=1e-5)
    h = float(train.hidden_distill_loss(st, full, batch, "all"))
    am, w = np.asarray(batch["attention_mask"], np.float64), np.asarray(batch["weights"], np.float64)
    want, pos = [], np.broadcast_to(np.arange(am.shape[1]), am.shape)
    for i in range(cfg.num_layers):
        if "positions" in st.layers[i]:
            pos = np.asarray(st.layers[i]["positions"])
        s, t = np.asarray(st.hidden_states[i + 1]), np.asarray(full.hidden_states[i + 1])
        mask = np.take_along_axis(am, np.maximum(pos, 0), 1) * (pos >= 0)
        d = s - np.take_along_axis(t, np.maximum(pos, 0)[..., None], 1)
        per = ((d ** 2).mean(-1) * mask).sum(1) / np.maximum(mask.sum(1), 1)
        want.append((per * w).sum() / w.sum())
    np.testing.assert_allclose(h, np.mean(want), rtol=1e-4)
    assert real.shape[1] == top[-1]


def test_passes_loss_sums_every_pass_and_distills_from_the_full_pass():
    cfg, module, params, _ = tiny_setup()
    # a random classifier's logits are ~1e-2: a scaled head and a high temperature make the
    # passes' soft predictions differ visibly
    params = {**params, "classifier": jax.tree.map(lambda x: x * 3000.0, params["classifier"])}
    batch = random_batch(fillers=3)
    top = sched_lib.plan(models.cost_model(cfg), 16, 3.0).schedule
    mid = sched_lib.plan(models.cost_model(cfg), 16, 1.6).schedule
    assert top is not None and mid is not None and top != mid
    loss = jax.jit(train.classification_loss, static_argnums=(0, 4), static_argnames="num_labels")
    one = {s: loss(module, params, batch, None, s, num_labels=2)[0] for s in (None, top, mid)}
    summed, m = loss(module, params, batch, None, train.Passes((None, top, mid)), num_labels=2)
    np.testing.assert_allclose(float(summed), float(sum(one.values())), rtol=1e-5)  # three passes ran
    logits_of = jax.jit(train._logits, static_argnums=(0, 4, 5))
    logits = {s: logits_of(module, params, batch, None, s, "plain") for s in (None, top, mid)}
    w = 0.7
    want = float(one[None]) + sum(
        (1 - w) * float(one[s]) + w * float(train.distill_loss(logits[s], logits[None], batch, 2, 20.0))
        for s in (top, mid))
    got, m = loss(module, params, batch, None, train.Passes((None, top, mid), w, 20.0), num_labels=2)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    kd = [float(train.distill_loss(logits[s], logits[None], batch, 2, 20.0)) for s in (top, mid)]
    assert min(kd) > 1e-5  # the students really depart from the teacher (float32 noise: ~1e-8)
    np.testing.assert_allclose(float(m["distill"]), np.mean(kd), rtol=0.05)  # jit fuses differently
    # the teacher's gradient comes from its own task loss only: distillation does not reach it
    def with_teacher(p, teacher_logits):
        st = train._logits(module, p, batch, None, top, "plain")
        return (train.task_loss(train._logits(module, p, batch, None, None, "plain"), batch, 2)[0]
                + (1 - w) * train.task_loss(st, batch, 2)[0] + w * train.distill_loss(st, teacher_logits, batch, 2, 20.0))
    passes = train.Passes((None, top), w, 20.0)
    g = jax.jit(jax.grad(lambda p: train.classification_loss(module, p, batch, None, passes, num_labels=2)[0]))(params)
    g_const = jax.jit(jax.grad(with_teacher))(params, logits[None])  # the teacher as a constant
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_const)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5 * float(np.abs(b).max()))


def test_a_sandwich_step_is_one_program_and_the_seed_is_not_compiled_in():
    cfg, module, params, specs = tiny_setup()
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    top = sched_lib.plan(models.cost_model(cfg), 16, 3.0).schedule
    passes = train.Passes((None, top), 1.0, 1.0)
    tr = make_trainer(mesh, sharding.DP_RULES, module, specs, dropout=True, total=10, lr=3e-3)
    state = tr.init_state(params)
    for _ in range(3):
        state, m = tr.step(state, random_batch(), passes)
    assert tr.num_programs == 1 and tr.traces == 1 and np.isfinite(float(m["distill"]))
    # every layer's hidden states and the last layer's once more: one more program, a term > 0
    state, m = tr.step(state, random_batch(), dataclasses.replace(passes, hidden_weight=0.5, hidden_layers="both"))
    assert tr.num_programs == 2 and float(m["distill_hidden"]) > 0
    # two trainers that differ only in the seed lower to the same program (one cache entry)
    texts = [t._lower_train(t.init_state(params), random_batch(), passes).as_text()
             for t in (make_trainer(mesh, sharding.DP_RULES, module, specs, seed=s) for s in (0, 7))]
    assert texts[0] == texts[1]


def test_a_batch_padded_below_its_bucket_trains_the_function_the_bucket_would():
    """``train_pad_multiple``: a batch padded to 24 rows with the 32-bucket's schedules capped
    at 24 gives the loss and gradients of the same batch padded to 32 (padding is dropped
    first, and padded rows never reach a real one)."""
    import types

    import ml_collections

    from accjax import data
    from accjax.loop import step_static

    cfg, module, params, _ = tiny_setup()
    tight = random_batch(t=24, seed=5)
    tight["attention_mask"][:, 20:] = 0  # every row at most 20 tokens: 24 is the next multiple of 8
    tight["input_ids"] = np.where(tight["attention_mask"] == 1, tight["input_ids"], 0)
    assert tight["attention_mask"].sum(1).max() > 16  # layer 2 of 1.5x (16 rows) drops real tokens
    full = {k: (np.pad(v, ((0, 0), (0, 8))) if v.ndim == 2 else v) for k, v in tight.items()}
    exp = types.SimpleNamespace(
        cost=models.cost_model(cfg), schedule_length=lambda b: data.bucket_for((32,), b["input_ids"].shape[1]),
        config=ml_collections.ConfigDict({"distill": dict(weight=0.5, temperature=2.0, hidden_weight=1.0,
                                                          hidden_layers="all")}))
    el = ml_collections.ConfigDict(dict(bucket=8, floor=1, prune_every=1))
    grad = jax.jit(jax.value_and_grad(lambda p, b, s: train.classification_loss(module, p, b, None, s, num_labels=2)[0]),
                   static_argnums=2)
    for speeds in [(1.5,), (2.0,), (None, 2.0)]:
        s_full, s_tight = step_static(exp, el, speeds, full), step_static(exp, el, speeds, tight)
        if speeds == (1.5,):
            assert s_full == (24, 16) and s_tight == (24, 16)
        if speeds == (2.0,):
            assert s_full == (16, 2) and s_tight == (16, 2)
        (l_full, g_full), (l_tight, g_tight) = grad(params, full, s_full), grad(params, tight, s_tight)
        np.testing.assert_allclose(float(l_tight), float(l_full), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g_tight), jax.tree.leaves(g_full)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    # a schedule longer than the rows present is capped, never handed on as it is
    short = {k: (v[:, :8] if v.ndim == 2 else v) for k, v in tight.items()}
    assert step_static(exp, el, (1.5,), short) == (8, 8)
    assert step_static(exp, el, (1.0,), short) is None  # the dense level stays dense


def test_dropout_drops_the_rate_with_independent_draws_that_sharding_does_not_change():
    """``common.Dropout`` (a hash of each element's position and the key): the fraction
    dropped is the rate, neighbours along every axis are dropped independently, kept elements
    are scaled to keep the mean, another key draws another mask, the mask of an array sharded
    over 8 devices is the unsharded one, a 0-d input is dropped at the rate too, and off
    (deterministic) it is the identity."""
    from accjax.models import common

    x = jnp.ones((64, 125, 129), jnp.float32)
    drop = common.Dropout(0.1)

    def apply(x, key):
        return drop.apply({}, x, deterministic=False, rngs={"dropout": key})

    y = np.asarray(apply(x, jax.random.PRNGKey(0)))
    dropped = y == 0
    assert y.shape == x.shape
    assert abs(dropped.mean() - 0.1) < 2e-3  # n ~ 1e6: one standard deviation is 3e-4
    np.testing.assert_allclose(y[~dropped], 1 / (1 - round(0.1 * 2 ** 32) / 2 ** 32), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 3e-3
    # independent pairs agree with probability 0.9**2 + 0.1**2 = 0.82; a hash that ignored an
    # axis (or repeated its words along it) would agree on every pair (1.0): neighbours, and
    # the two halves of each axis
    both = 0.9 ** 2 + 0.1 ** 2
    for axis in range(3):
        n = x.shape[axis]
        near = np.take(dropped, np.arange(1, n), axis=axis) == np.take(dropped, np.arange(n - 1), axis=axis)
        halves = np.take(dropped, np.arange(n // 2), axis=axis) == np.take(dropped, np.arange(n // 2, 2 * (n // 2)), axis=axis)
        assert abs(near.mean() - both) < 5e-3 and abs(halves.mean() - both) < 5e-3, axis
    # and one step along an axis against one step back along the next (a flat index that
    # summed the axes without their strides would give both the same word)
    assert abs((dropped[1:, :-1] == dropped[:-1, 1:]).mean() - both) < 5e-3
    assert abs((dropped[:, 1:, :-1] == dropped[:, :-1, 1:]).mean() - both) < 5e-3
    other = np.asarray(apply(x, jax.random.PRNGKey(1))) == 0
    assert abs((other == dropped).mean() - both) < 5e-3  # another key, another mask
    typed = np.asarray(apply(x, jax.random.key(0))) == 0  # a typed key works (its data hashed)
    assert abs(typed.mean() - 0.1) < 2e-3

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", None, "b"))
    z = jnp.asarray(np.random.default_rng(0).normal(size=(64, 125, 128)), jnp.float32)
    sharded = jax.jit(apply, in_shardings=(spec, None), out_shardings=spec)(
        jax.device_put(z, spec), jax.random.PRNGKey(0))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.jit(apply)(z, jax.random.PRNGKey(0))))
    np.testing.assert_array_equal(np.asarray(drop.apply({}, x, deterministic=True)), np.asarray(x))
    scalars = [float(apply(jnp.ones(()), jax.random.PRNGKey(k))) for k in range(200)]  # a 0-d input
    assert set(scalars) == {0.0, np.float32(1 / (1 - round(0.1 * 2 ** 32) / 2 ** 32))} and 5 < scalars.count(0.0) < 40
