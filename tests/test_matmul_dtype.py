"""``matmul_dtype``: the projections' products in bfloat16 with float32 accumulation, forward
and backward (``models.common.project``), in every family; attention stays in the compute dtype."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accjax import models
from accjax.models import common

TINY = {
    "minilm-l6-h384": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
    "gpt2": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
    "smollm2-135m": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         intermediate_size=48),
    "flan-t5-small": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4),
}


def _round(x, dtype=jnp.bfloat16):
    return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)


def _dots(jaxpr) -> list[tuple[str, str]]:
    """(lhs dtype, rhs dtype) of every dot_general in a closed jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out += _dots(inner if hasattr(inner, "eqns") else inner.jaxpr)
    return out


@dataclasses.dataclass(frozen=True)
class _Cfg(common.Runtime):
    pass


@dataclasses.dataclass(frozen=True)
class _DenseCfg(common.Runtime):
    initializer_range: float = 0.02


def test_project_is_bf16_inputs_with_float32_accumulation_forward_and_backward():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 5, 16))
    w = jax.random.normal(k[1], (16, 3, 4))
    g = jax.random.normal(k[2], (2, 5, 3, 4))
    spec = "BTD,DNH->BTNH"
    low = _Cfg(matmul_dtype="bfloat16")
    y = common.project(spec, x, w, low)
    assert y.dtype == jnp.float32
    # the product of the rounded inputs, accumulated without further rounding
    want = np.einsum(spec, _round(x), _round(w))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(common.project(spec, x, w, _Cfg())) - want)) > 1e-3  # float32 differs

    loss = lambda x, w: jnp.sum(common.project(spec, x, w, low) * g)  # noqa: E731
    dx, dw = jax.grad(loss, (0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dx), np.einsum("BTNH,DNH->BTD", _round(g), _round(w)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("BTD,BTNH->DNH", _round(x), _round(g)), rtol=1e-5, atol=1e-5)
    # all three products take bf16 operands
    assert _dots(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w).jaxpr) == [("bfloat16", "bfloat16")] * 3
    # the same dtype as the compute dtype is the plain product
    assert _dots(jax.make_jaxpr(lambda x, w: common.project(spec, x, w, _Cfg(matmul_dtype="float32")))(x, w).jaxpr) \
        == [("float32", "float32")]


@pytest.mark.parametrize("matmul_dtype", ["", "bfloat16"])
def test_dense_into_several_axes_is_dense_general_with_a_vector_bias(matmul_dtype):
    """``common.dense`` into several output axes with a bias (GPT-2's q/k/v, [D] -> [3, N, H])
    takes ``nn.DenseGeneral``'s parameters and gives its values and gradients, but runs one
    [D, 3 N H] product and adds the bias as a vector, which XLA can fold into cuBLAS's epilogue."""
    import flax.linen as nn

    cfg = _DenseCfg(matmul_dtype=matmul_dtype)
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (2, 5, 16))
    proj = common.dense(cfg, (3, 4, 8), ("embed", "qkv", "heads", "kv"), "qkv")
    params = proj.init(k[1], x)
    params = jax.tree_util.tree_map(lambda a: a + jax.random.normal(k[2], a.shape), params)  # a bias not 0
    ref = nn.DenseGeneral((3, 4, 8), dot_general=common._projection_dot_general(cfg))
    y, want = proj.apply(params, x), ref.apply(params, x)
    assert y.shape == (2, 5, 3, 4, 8)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda p: jnp.sum(proj.apply(p, x) ** 2))(params)
    g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # one product with a [16, 96] kernel, and the bias added as a [96] vector before the reshape
    eqns = jax.make_jaxpr(lambda p: proj.apply(p, x))(params).jaxpr.eqns
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    if not dots:  # the bf16 product is a custom_vjp call, whose operands are the product's
        dots = [e for e in eqns if "jvp" in e.primitive.name or "vjp" in e.primitive.name]
    assert len(dots) == 1 and dots[0].invars[1].aval.shape == (16, 96)
    adds = [e for e in eqns if e.primitive.name == "add"]
    assert [e.outvars[0].aval.shape for e in adds] == [(2, 5, 96)]


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_family_projects_in_bf16_and_keeps_attention_in_float32(name):
    cfg = models.preset(name, vocab_size=97, **TINY[name])
    fam = models.get_family(cfg.family)
    head = "sequence_classification" if cfg.family in ("bert", "gpt2") else "lm"
    params = models.init_params(cfg, head, seed=1)
    batch = fam.dummy_inputs(cfg, 2, 8)
    batch = {k: (jnp.asarray(np.random.default_rng(0).integers(1, 90, v.shape), v.dtype)
                 if k in ("input_ids", "decoder_input_ids") else v) for k, v in batch.items()}
    if cfg.family == "t5":  # three decoder tokens: one alone would attend as its value, no products
        batch["decoder_input_ids"] = jnp.asarray(np.random.default_rng(1).integers(1, 90, (2, 3)), jnp.int32)

    def run(c):
        module = fam.module(c, head)
        f = lambda p: module.apply({"params": p}, **batch)  # noqa: E731
        out = f(params)
        logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)
        return np.asarray(logits, np.float32), _dots(jax.make_jaxpr(f)(params).jaxpr)

    ref, dots32 = run(cfg)
    got, dots16 = run(dataclasses.replace(cfg, matmul_dtype="bfloat16"))
    assert set(dots32) == {("float32", "float32")}
    low = [d for d in dots16 if d == ("bfloat16", "bfloat16")]
    rest = [d for d in dots16 if d != ("bfloat16", "bfloat16")]
    # attention's two products per attention layer (scores, context; T5: encoder self, decoder
    # self and cross) and a tied LM head (the embedding's ``attend``) stay float32; every other
    # product is a projection in bf16
    attn = cfg.num_layers + (2 * cfg.num_decoder_layers if cfg.family == "t5" else 0)
    tied = int(head == "lm" and bool(getattr(cfg, "tie_word_embeddings", False)))
    assert rest == [("float32", "float32")] * (2 * attn + tied)
    assert len(low) == len(dots32) - len(rest) and len(low) >= 4 * cfg.num_layers
    # close to float32, but not the same program
    scale = float(np.max(np.abs(ref)))
    assert 0 < float(np.max(np.abs(got - ref))) < 0.05 * max(scale, 1.0)


def test_config_matmul_dtype_changes_the_training_step_only(tmp_path):
    """``config.matmul_dtype``: the loss (and so its gradients) takes bf16 products; the
    evaluation's forward and the model a run exports keep the compute dtype's."""
    from accjax import experiment
    from tests.train_helpers import sentiment_task, tiny_config

    spec = sentiment_task(tmp_path / "data", n_train=32, n_dev=16)
    exp = experiment.build(tiny_config(tmp_path / "run", spec, matmul_dtype="bfloat16"))
    assert exp.train_module.config.matmul_dtype == "bfloat16" and exp.model_config.matmul_dtype == ""
    batch = {k: jnp.asarray(v) for k, v in exp.train.batch(0, 0).items()}
    loss = lambda p: exp.loss_fn(p, batch, None, None)[0]  # noqa: E731
    grad_dots = _dots(jax.make_jaxpr(jax.grad(loss))(exp.params).jaxpr)
    fwd_dots = _dots(jax.make_jaxpr(lambda p: exp.forward(p, batch, None))(exp.params).jaxpr)
    assert ("bfloat16", "bfloat16") in grad_dots and ("bfloat16", "bfloat16") not in fwd_dots
    dense = experiment.build(tiny_config(tmp_path / "run2", spec))
    assert dense.train_module is dense.module
    assert ("bfloat16", "bfloat16") not in _dots(jax.make_jaxpr(lambda p: dense.loss_fn(p, batch, None, None)[0])(
        dense.params).jaxpr)


@pytest.mark.parametrize("backend, features, want", [
    ("cpu", {"avx2", "fma", "avx512f"}, ""),  # AVX-512 without its bf16 instructions
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ("cpu", {"avx2", "amx_tile", "amx_bf16"}, "bfloat16"),
    ("cpu", {"fp", "asimd", "bf16"}, "bfloat16"),  # Arm's 'Features'
    ("cpu", set(), ""),  # no /proc/cpuinfo
    ("tpu", set(), "bfloat16"),
])
def test_auto_matmul_dtype_is_bfloat16_only_where_the_device_has_bf16_instructions(backend, features, want):
    assert common.resolve_matmul_dtype("auto", backend=backend, features=frozenset(features)) == want
    for name in common.MATMUL_DTYPES:  # an explicit choice is kept, whatever the machine
        assert common.resolve_matmul_dtype(name, backend=backend, features=frozenset(features)) == name


def test_config_auto_matmul_dtype_trains_as_this_machine_resolves_it(tmp_path, monkeypatch):
    """``matmul_dtype='auto'``: the training module takes the dtype this machine resolves
    (both ways, by faking the CPU's flags), and the run's description says which."""
    from accjax import experiment
    from tests.train_helpers import sentiment_task, tiny_config

    spec = sentiment_task(tmp_path / "data", n_train=32, n_dev=16)
    for flags, want in ((frozenset({"avx2"}), ""), (frozenset({"avx2", "avx512_bf16"}), "bfloat16")):
        monkeypatch.setattr(common, "cpu_features", lambda flags=flags: flags)
        exp = experiment.build(tiny_config(tmp_path / f"run{want}", spec, matmul_dtype="auto"))
        assert exp.train_module.config.matmul_dtype == want and exp.model_config.matmul_dtype == ""
        assert (exp.train_module is exp.module) == (want == "")
        assert f"train products {want or 'float32'} (auto)" in exp.describe(1, 1, _mesh(), experiment.sampler(exp.config), 1)


def _mesh():
    from accjax import sharding

    return sharding.make_mesh(-1, 1)


# --------------------------------------------------------------------------------------------
# One-row products (``common.ONE_ROW_PRODUCTS``): on a GPU, a projection of one row runs on two


@pytest.fixture
def one_row_here(monkeypatch):
    """The one-row rule on this CPU (it applies on GPUs only), for weights of 64 entries up."""
    monkeypatch.setattr(common, "ONE_ROW_BACKENDS", ("gpu", "cpu"))
    monkeypatch.setattr(common, "ONE_ROW_MIN_WEIGHTS", 64)


def _barriers(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count("optimization_barrier")


@pytest.mark.parametrize("spec,xs,ws", [
    ("bk,kn->bn", (1, 24), (24, 16)),
    ("BTD,DNH->BTNH", (1, 1, 24), (24, 4, 8)),        # Llama's and T5's q/k/v
    ("BTNH,NHD->BTD", (1, 1, 4, 8), (4, 8, 24)),       # an attention output projection
])
def test_a_one_row_projection_runs_on_two_rows_with_the_same_values(one_row_here, spec, xs, ws, monkeypatch):
    cfg = _Cfg(dtype="bfloat16")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=xs), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=ws), jnp.bfloat16)
    fn = lambda x, w: common.project(spec, x, w, cfg)  # noqa: E731
    text = jax.jit(fn).lower(x, w).as_text()
    assert text.count("optimization_barrier") == 1 and "tensor<2x" in text.split("dot_general")[1].split("\n")[0]
    two = np.asarray(jax.jit(fn)(x, w), np.float32)
    monkeypatch.setattr(common, "ONE_ROW_PRODUCTS", "off")
    plain = lambda x, w: common.project(spec, x, w, cfg)  # noqa: E731  (a new trace)
    assert _barriers(plain, x, w) == 0
    one = np.asarray(jax.jit(plain)(x, w), np.float32)
    assert two.shape == one.shape == tuple(np.einsum(spec, np.zeros(xs), np.zeros(ws)).shape)
    np.testing.assert_allclose(two, one, rtol=1e-2, atol=1e-2)  # bf16 outputs: the same row's sums


def test_the_one_row_rule_leaves_every_other_product_alone(one_row_here, monkeypatch):
    cfg16, cfg32 = _Cfg(dtype="bfloat16"), _Cfg(dtype="float32")
    w = jnp.ones((24, 16), jnp.bfloat16)
    one, rows2 = jnp.ones((1, 24), jnp.bfloat16), jnp.ones((2, 24), jnp.bfloat16)
    assert _barriers(lambda x, w: common.project("bk,kn->bn", x, w, cfg16), one, w) == 1
    assert _barriers(lambda x, w: common.project("bk,kn->bn", x, w, cfg16), rows2, w) == 0  # two rows
    assert _barriers(lambda x, w: common.project("bk,kn->bn", x, w, cfg32), one, w) == 0  # float32
    assert _barriers(lambda x, w: common.project("bk,kn->bn", x, w, cfg16), one[:, :2], w[:2]) == 0  # 32 weights
    assert _barriers(lambda x, w: common.product_dot_general(x, w, (((2,), (1,)), ((0,), (0,)))),  # batch axes
                     jnp.ones((3, 1, 8), jnp.bfloat16), jnp.ones((3, 8, 64), jnp.bfloat16)) == 0
    monkeypatch.setattr(common, "ONE_ROW_BACKENDS", ("gpu",))  # this CPU, as shipped
    assert _barriers(lambda x, w: common.project("bk,kn->bn", x, w, cfg16), one, w) == 0


def test_a_decoding_step_at_batch_one_runs_its_projections_on_two_rows(one_row_here, monkeypatch):
    """GPT-2 (bf16): every Dense of the batch-1 decoding step over the threshold runs on two rows
    (q/k/v, the MLP's two; the 32 x 32 attention output stays below it), none at batch 2, and
    the step's logits are those of the step without the rule."""
    monkeypatch.setattr(common, "ONE_ROW_MIN_WEIGHTS", 2048)
    cfg = models.preset("gpt2", dtype="bfloat16", vocab_size=64, max_position_embeddings=64, **TINY["gpt2"])
    module = models.get_family(cfg.family).module(cfg, "lm")
    v = {"params": jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), models.init_params(cfg, "lm", 0))}
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)

    def step():  # a new function each time: jax would reuse a trace made under another rule
        def run(v, ids):
            _, cache, _ = module.apply(v, ids, jnp.ones_like(ids), max_new_tokens=2, schedule=None,
                                       method="prefill")
            return module.apply(v, ids[:, -1:], cache, method="extend")[0]
        return run

    assert _barriers(step(), v, ids[:1]) == 3 * cfg.num_layers
    assert _barriers(step(), v, ids) == 0
    two = np.asarray(jax.jit(step())(v, ids[:1]), np.float32)
    monkeypatch.setattr(common, "ONE_ROW_PRODUCTS", "off")
    assert _barriers(step(), v, ids[:1]) == 0
    np.testing.assert_allclose(two, np.asarray(jax.jit(step())(v, ids[:1]), np.float32), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("preset,module_name", [("minilm-l6-h384", "bert"), ("gpt2", "gpt2"),
                                                ("flan-t5-small", "t5")])
def test_qkv_gemms_kept_apart_where_asked(preset, module_name, monkeypatch):
    """``SEPARATE_QKV_BACKENDS`` (the GPU, as shipped): there (here the CPU, added) and from
    ``common.QKV_APART_MIN_ROWS`` rows, k's and v's GEMMs take their input through an
    optimization barrier, so XLA's dot merger cannot join the three into one GEMM whose output
    three copies slice; every layer's q/k/v products stay apart, and the logits and gradients
    are those of the one projection. As shipped the CPU's program has none, nor has one of
    fewer rows."""
    import importlib

    family_module = importlib.import_module(f"accjax.models.{module_name}")
    cfg = models.preset(preset, **TINY[preset])
    fam = models.get_family(cfg.family)
    head = "lm" if cfg.family == "t5" else "sequence_classification"
    module = fam.module(cfg, head)
    params = models.init_params(cfg, head, 0)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (2, 12)), jnp.int32)
    extra = {"decoder_input_ids": ids[:, :3]} if cfg.family == "t5" else {}

    def loss(p):
        out = module.apply({"params": p}, ids, jnp.ones_like(ids), **extra)
        return (out["logits"] if isinstance(out, dict) else out.logits).sum()

    runs = {}
    for backends, min_rows in ((("gpu",), 0), (("gpu", "cpu"), 25), (("gpu", "cpu"), 24)):
        monkeypatch.setattr(family_module, "SEPARATE_QKV_BACKENDS", backends)
        monkeypatch.setattr(common, "QKV_APART_MIN_ROWS", min_rows)  # (2 x 12 rows)
        f = lambda p: loss(p)  # noqa: E731  (a new trace each time)
        assert _barriers(f, params) == (cfg.num_layers if "cpu" in backends and min_rows <= 24 else 0)
        runs[(backends, min_rows)] = (np.asarray(jax.jit(f)(params)), jax.jit(jax.grad(f))(params))
    runs.pop((("gpu", "cpu"), 25))
    (l1, g1), (l2, g2) = runs.values()
    np.testing.assert_allclose(l2, l1, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):  # (T5's sum over
        a, b = np.asarray(a), np.asarray(b)  # 32k logits: gradients in the hundreds, so atol scales)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(a).max()))
