"""Pieces every model family shares: dtypes, activations, initialisers with logical axes.

Parameters carry *logical* axis names (``'embed'``, ``'mlp'``, ``'heads'``, ...) through
``nn.with_logical_partitioning``. Only a training config maps them to mesh axes
(``accjax.sharding``); outside such a mapping they are plain arrays and cost nothing.

Logical axis names used by the models:

  vocab     vocabulary rows of an embedding table
  embed     the model (hidden) dimension D
  embed_out a second D-sized axis of a square kernel (pooler), kept distinct from ``embed``
            so one mesh axis is never used twice in a spec
  qkv       the stacked query/key/value axis (size 3) of a fused projection
  heads     attention heads N
  kv        per-head size H
  mlp       feed-forward width F
  classes   output classes C of a classification head
  positions position-embedding rows
  types     token-type rows
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

def gelu_erf(x: Array) -> Array:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), evaluated in float32 (as torch does).

    ``jax.nn.gelu(approximate=False)`` goes through ``erfc`` with both of its branches and
    scales by 1/sqrt(2) in the input dtype, a slow elementwise pass on a GPU (measured in
    docs/benchmarks.md); ``erf`` is one rational polynomial.
    """
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * 0.7071067811865476))).astype(x.dtype)


# HF activation names -> JAX functions. "gelu" in HF is the exact (erf) form.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}"
        ) from None


# How 16-bit programs evaluate the exact GELU ("gelu", BERT's): "tanh" runs its tanh form, which
# XLA folds into cuBLAS's GEMM epilogue (cuBLAS has no erf epilogue), so the GELU's own pass over
# the [rows, 3072] activation goes (BERT-base on an H100: dense 13% faster at 128 x 128, 8% at
# 8 x 128). The forms differ by at most 4.7e-4 (at x = -2.70), a tenth of the 16-bit rounding
# of the activation's larger entries; on the main job's model dev and test accuracy moved by
# at most 3 of 1307 examples at 1-4.8x, as much as bf16 itself moves them (docs/benchmarks.md,
# "twenty-ninth session"). "erf" keeps the exact form; float32 always does (HF parity).
GELU_16BIT = "tanh"


def activation_name(name: str, dtype) -> str:
    """The activation a layer computing in ``dtype`` runs for the config's ``name``
    (``GELU_16BIT``): 'gelu' -> 'gelu_new' in 16-bit, else ``name``."""
    if name == "gelu" and GELU_16BIT == "tanh" and jnp.dtype(dtype).itemsize == 2:
        return "gelu_new"
    return name


def to_dtype(name: str | Any) -> jnp.dtype:
    """'float32' / 'bfloat16' / a dtype -> a numpy dtype object."""
    return jnp.dtype(name)


def normal_init(std, axes: tuple[str | None, ...], split_axis: int = 1):
    """N(0, std) initialiser (HF's ``initializer_range``) annotated with logical axes; a
    sequence of stds draws each slice of ``split_axis`` with its own (T5's fused q/k/v: HF
    initialises q with a smaller std than k and v)."""
    if isinstance(std, (int, float)):
        return nn.with_logical_partitioning(nn.initializers.normal(stddev=float(std)), axes)

    def init(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, len(std))
        part = shape[:split_axis] + shape[split_axis + 1:]
        return jnp.stack([jax.random.normal(k, part, dtype) * s for k, s in zip(keys, std)],
                         axis=split_axis)

    return nn.with_logical_partitioning(init, axes)


def zeros_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _low_dtype(cfg):
    """The products' dtype ``cfg.matmul_dtype`` asks for, or None when that is the compute
    dtype (or unset)."""
    low = getattr(cfg, "matmul_dtype", "")
    return None if not low or to_dtype(low) == to_dtype(cfg.dtype) else to_dtype(low)


def project(spec: str, x: Array, kernel: Array, cfg) -> Array:
    """``einsum(spec, x, kernel)`` for a projection (activations times a weight) in the
    config's compute dtype; with ``cfg.matmul_dtype`` set (and not the compute dtype), the
    product takes inputs rounded to it and accumulates in float32, forward and backward
    (``_low_einsum``), and returns the compute dtype. Every family's projections go through
    here or ``dense``; attention's own products and a tied LM head stay in the compute dtype."""
    dtype = to_dtype(cfg.dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    low = _low_dtype(cfg)
    return (jnp.einsum(spec, x, kernel, _dot_general=_einsum_products(one_row_settings())) if low is None
            else _low_einsum(spec, low, x, kernel))


# A projection of ONE row (a decoding step at batch 1) by a weight of under 10 M entries may be
# rewritten by XLA's GPU simplifier as a multiply and a reduction, which takes about twice a
# GEMM's time (GPT-2, one sequence, an H100: 9 us for a 3072 x 768 reduction against 4.6 us
# for the same product on two rows; docs/benchmarks.md, twenty-seventh session). On a GPU, in
# 16 bits, such a product runs on the row and a copy of it: a [2, K] GEMM; an optimization
# barrier on its output keeps XLA from slicing the copy away. GPT-2's generation is 13-15%
# faster; Llama-3.2-1B's and Flan-T5's (products into heads, which XLA seems to leave as
# GEMMs) time the same. "fused": the copy is made where XLA fuses it (into the producer);
# "barrier": also behind a barrier of its own (a concatenation kernel); "off": as XLA makes it.
ONE_ROW_PRODUCTS = "fused"
ONE_ROW_MIN_WEIGHTS = 1 << 20  # smaller weights measured no faster (GPT-2's 768 x 768, BERT's pooler)
ONE_ROW_BACKENDS = ("gpu",)  # where XLA rewrites them (tests add "cpu" to run the rule here)


def one_row_settings() -> tuple:
    """(``ONE_ROW_PRODUCTS``, ``ONE_ROW_MIN_WEIGHTS``, ``ONE_ROW_BACKENDS``) as they are now."""
    return ONE_ROW_PRODUCTS, ONE_ROW_MIN_WEIGHTS, tuple(ONE_ROW_BACKENDS)


def one_row_doubled(lhs: Array, rhs: Array, dimension_numbers, settings: tuple | None = None) -> int | None:
    """The axis of ``lhs`` to double the one row along, when ``product_dot_general`` does (under
    ``settings``, default ``one_row_settings()``): the rule on, a program for one of its backends,
    16-bit operands, no batch axes, every free axis of ``lhs`` of size 1 (its first one is
    returned), a weight of at least the minimum entries; else None."""
    mode, min_weights, backends = settings or one_row_settings()
    (lc, _), (lb, rb) = dimension_numbers
    free = [d for d in range(lhs.ndim) if d not in set(lc)]
    if (mode == "off" or lb or rb or not free or any(lhs.shape[d] != 1 for d in free)
            or rhs.size < min_weights or jnp.dtype(lhs.dtype).itemsize != 2
            or jax.default_backend() not in backends):
        return None
    return free[0]


def product_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                        preferred_element_type=None, settings: tuple | None = None, **kw) -> Array:
    """``lax.dot_general`` for a projection (activations, weight), one row on a GPU computed
    as two (``ONE_ROW_PRODUCTS``): the same values (the first of two identical rows)."""
    settings = settings or one_row_settings()
    axis = one_row_doubled(lhs, rhs, dimension_numbers, settings)
    if axis is None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kw)
    two = jnp.concatenate([lhs, lhs], axis=axis)
    if settings[0] == "barrier":
        two = jax.lax.optimization_barrier(two)
    out = jax.lax.optimization_barrier(jax.lax.dot_general(
        two, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **kw))
    # the lhs's free axes lead the output, in order: the doubled one is at its rank among them
    at = sum(1 for d in range(axis) if d not in set(dimension_numbers[0][0]))
    return jax.lax.slice_in_dim(out, 0, 1, axis=at)


@functools.lru_cache(maxsize=None)
def _einsum_products(settings: tuple) -> Callable:
    """``product_dot_general`` bound to ``settings``, one object per setting: ``jnp.einsum``
    keeps its traces by this argument, so a trace made under one setting is never reused under
    another (a test's or probe's, within one process)."""
    return functools.partial(product_dot_general, settings=settings)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_einsum(spec: str, low, x: Array, w: Array) -> Array:
    """x, w and the result share one dtype (``project`` casts them)."""
    return jnp.einsum(spec, x.astype(low), w.astype(low), preferred_element_type=jnp.float32).astype(x.dtype)


def _low_einsum_fwd(spec, low, x, w):
    xl, wl = x.astype(low), w.astype(low)  # the residuals are kept in the low dtype (half the bytes)
    return jnp.einsum(spec, xl, wl, preferred_element_type=jnp.float32).astype(x.dtype), (xl, wl)


def _low_einsum_bwd(spec, low, res, g):
    # a projection's spec names every index of x in the output or w, and of w in x or the
    # output, so each gradient is one more einsum of two low-dtype operands
    xl, wl = res
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    gl = g.astype(low)
    dx = jnp.einsum(f"{out},{ws}->{xs}", gl, wl, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{xs},{out}->{ws}", xl, gl, preferred_element_type=jnp.float32)
    return dx.astype(g.dtype), dw.astype(g.dtype)


_low_einsum.defvjp(_low_einsum_fwd, _low_einsum_bwd)


def _projection_dot_general(cfg):
    """``nn.DenseGeneral``'s ``dot_general`` as ``project`` (contracting the input's trailing
    axes with the kernel's leading ones; no batch axes), or ``product_dot_general`` when the
    config asks for no low-precision products."""
    if _low_dtype(cfg) is None:
        return product_dot_general

    def dot_general(x, kernel, dimension_numbers, precision=None):
        (xc, kc), (xb, kb) = dimension_numbers
        if xb or kb or tuple(kc) != tuple(range(len(kc))):
            raise NotImplementedError("matmul_dtype products support a kernel contracted on its leading axes")
        letters = "abcdefghijklmnopqrstuvwxyz"
        xs = letters[:x.ndim]
        ws = "".join(xs[i] for i in xc) + letters[x.ndim:x.ndim + kernel.ndim - len(kc)]
        free = "".join(c for i, c in enumerate(xs) if i not in set(xc))
        return project(f"{xs},{ws}->{free}{ws[len(kc):]}", x, kernel, cfg)

    return dot_general


class Einsum(nn.Module):
    """A bias-free projection: ``project(spec, x, kernel)`` with a kernel of ``shape`` on logical
    ``axes``, N(0, ``std``) at init (default the config's ``initializer_range``; a sequence:
    one std per slice of the kernel's second axis). Llama's and T5's projections."""

    config: Any
    spec: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    std: Any = None

    def setup(self):
        cfg = self.config
        std = cfg.initializer_range if self.std is None else self.std
        self.kernel = self.param("kernel", normal_init(std, self.axes), self.shape, to_dtype(cfg.param_dtype))

    def __call__(self, x: Array) -> Array:
        return project(self.spec, x, self.kernel, self.config)

    def value_norms(self, v: Array) -> Array:
        """(an output projection [N, H, D]) ``value_norms`` of ``v`` through its kernel."""
        return value_norms(v, self.kernel, self.config.dtype)


class HeadsOut(nn.Module):
    """Attention output projection [B, T, N, H] -> [B, T, D], and the per-head value norms
    the ``value_norm`` ACC variant uses. ``config`` needs num_heads, head_dim, hidden_size,
    dtype, param_dtype and (unless ``std`` is given) initializer_range."""

    config: Any
    std: float | None = None  # init std of the kernel; None: config.initializer_range
    use_bias: bool = True  # T5 has none

    def setup(self):
        cfg = self.config
        pdt = to_dtype(cfg.param_dtype)
        self.kernel = self.param(
            "kernel", normal_init(cfg.initializer_range if self.std is None else self.std,
                                  ("heads", "kv", "embed")),
            (cfg.num_heads, cfg.head_dim, cfg.hidden_size), pdt)
        self.bias = self.param("bias", zeros_init(("embed",)), (cfg.hidden_size,), pdt) if self.use_bias else None

    def __call__(self, ctx: Array) -> Array:
        y = project("BTNH,NHD->BTD", ctx, self.kernel, self.config)
        return y if self.bias is None else y + self.bias.astype(y.dtype)

    def value_norms(self, v: Array) -> Array:
        return value_norms(v, self.kernel, self.config.dtype)


def value_norms(v: Array, kernel: Array, dtype) -> Array:
    """||v[n, j] W_O[n]|| for every head and row: v [B, S, N, H], W_O [N, H, D] -> [B, N, S]
    float32 (the ``value_norm`` ACC variant)."""
    dtype = to_dtype(dtype)
    moved = jnp.einsum("BSNH,NHD->BNSD", v.astype(dtype), kernel.astype(dtype))
    return jnp.linalg.norm(moved.astype(jnp.float32), axis=-1)


# Rows (batch x length) from which a family's ``SEPARATE_QKV_BACKENDS`` take q, k and v from
# three GEMMs kept apart (``qkv_apart``). It was measured faster only at 8192 rows and more
# (H100: BERT-base 32 x 512, GPT-2 and Flan-T5-base's dense programs at 8 x 1024 and 16 x 512);
# it adds kernels (the weight and bias slices, two GEMMs), which small batches feel most.
QKV_APART_MIN_ROWS = 8192


def qkv_apart_here(backends: tuple[str, ...], x: Array) -> bool:
    """Whether q, k, v of x [B, T, D] come from ``qkv_apart``: on ``backends`` (a family's
    ``SEPARATE_QKV_BACKENDS``) from ``QKV_APART_MIN_ROWS`` rows."""
    return jax.default_backend() in backends and x.shape[0] * x.shape[1] >= QKV_APART_MIN_ROWS


def qkv_apart(x: Array, kernel: Array, bias: Array | None, cfg) -> tuple[Array, Array, Array]:
    """q, k, v [B, T, N, H] of x [B, T, D] by three GEMMs kept apart, for flash attention
    (cuDNN), which needs each contiguous: ``kernel`` [D, 3, N, H], ``bias`` [3, N, H] or None
    (the fused projection's parameters). XLA's dot merger joins GEMMs that share their input into
    one GEMM on the concatenated weights and slices its output (a bias-add copy per slice), so
    k's and v's GEMMs take x through an optimization barrier; each bias is an [N * H] vector on
    a [B, T, N * H] product, which cuBLAS adds in its epilogue (an [N, H] one is broadcast to
    the whole output first and added as a matrix). Measured: BERT-base 32 x 512 on an H100,
    three 32 us GEMMs a layer against a weight concatenation, one 84 us GEMM and three 20 us
    copies (docs/benchmarks.md, thirty-first session)."""
    xs = (x, *jax.lax.optimization_barrier((x, x)))
    d, nh = kernel.shape[0], kernel.shape[2] * kernel.shape[3]
    w = kernel.reshape(d, 3, nh)  # [D, 3, N * H]
    b = (None,) * 3 if bias is None else bias.reshape(3, nh)  # [3, N * H]
    return tuple((project("BTD,DK->BTK", xs[j], w[:, j], cfg) + (0 if b[j] is None else b[j]))
                 .reshape(x.shape[:2] + kernel.shape[2:]) for j in range(3))  # each [B, T, N, H]


def embed(cfg, n: int, axes: tuple[str, str], name: str) -> nn.Embed:
    """An [n, hidden_size] table in the config's dtypes, N(0, initializer_range) on ``axes``."""
    return nn.Embed(n, cfg.hidden_size, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
                    embedding_init=normal_init(cfg.initializer_range, axes), name=name)


def plain_projection(module: nn.DenseGeneral, x: Array) -> bool:
    """Whether ``module`` applied to ``x`` is a projection a kernel may replace: the last axis
    of ``x`` into one output axis, with a bias, plain ``dot_general`` products
    (``product_dot_general``, not a config's low-precision ones or a custom class), its
    parameters existing (not while they are initialised)."""
    return (isinstance(module.features, int) and module.use_bias and module.axis in (-1, x.ndim - 1)
            and module.dot_general in (None, product_dot_general) and module.dot_general_cls is None
            and module.has_variable("params", "kernel"))


def dense(cfg, features, axes: tuple[str, ...], name: str, axis=-1, use_bias=True,
          activation: str | None = None) -> nn.DenseGeneral:
    """A projection in the config's dtypes, N(0, initializer_range) kernel on logical ``axes``;
    with ``activation`` (a name of ``ACTIVATIONS``) followed by it (``DenseActivation``, the
    same parameters)."""
    n_out = len(features) if isinstance(features, tuple) else 1
    kw = dict(axis=axis, use_bias=use_bias, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
              kernel_init=normal_init(cfg.initializer_range, axes), bias_init=zeros_init(axes[-n_out:]),
              dot_general=_projection_dot_general(cfg), name=name)
    if activation is None:
        return Dense(features, **kw)
    return DenseActivation(features, activation=activation, **kw)


class Dense(nn.DenseGeneral):
    """``nn.DenseGeneral``, the same parameters and values. Into several output axes with a
    bias (GPT-2's q/k/v, [D] -> [3, N, H]), once the parameters exist, it runs as one
    [D, prod(features)] product plus the bias as a vector, reshaped: XLA folds a bias into
    cuBLAS's epilogue only along the product's minor dimension; shaped [3, N, H] it is first
    written over the whole output (a broadcast kernel) for cuBLAS to accumulate onto (GPT-2
    8 x 1024 on an H200: 24 us a layer, 8% of the dense prefill; docs/benchmarks.md)."""

    def __call__(self, x):
        flat = (isinstance(self.features, tuple) and len(self.features) > 1 and self.use_bias
                and self.axis in (-1, x.ndim - 1) and not self.batch_dims and self.dot_general_cls is None
                and self.has_variable("params", "kernel"))
        if not flat:
            return super().__call__(x)
        p = self.variables["params"]
        x, kernel, bias = self.promote_dtype(x, nn.meta.unbox(p["kernel"]), nn.meta.unbox(p["bias"]),
                                             dtype=self.dtype)
        y = (self.dot_general or jax.lax.dot_general)(
            x, kernel.reshape(kernel.shape[0], -1), (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return (y + bias.reshape(-1)).reshape(*x.shape[:-1], *self.features)

    def depth_partials(self, x, splits: int):
        """(partials [splits, ..., features] in the compute dtype, bias [features]): the
        product (one output axis, parameters existing) split into ``splits`` slices of its
        depth, without the bias, for ``LayerNorm.add_partials`` to sum."""
        p = self.variables["params"]
        x, kernel, bias = self.promote_dtype(x, nn.meta.unbox(p["kernel"]), nn.meta.unbox(p["bias"]),
                                             dtype=self.dtype)
        d = x.shape[-1]
        parts = jnp.einsum("...sk,skf->s...f", x.reshape(*x.shape[:-1], splits, d // splits),
                           kernel.reshape(splits, d // splits, -1))
        return parts, bias


def dense_add_norm(proj: Dense, norm: "LayerNorm", h: Array, x: Array, dropout: Callable[[Array], Array],
                   *, dropping: bool) -> Array:
    """``norm(x + dropout(proj(h)))``, a post-LN block's residual (``dropping``: whether
    ``dropout`` drops anything). Where ``layer_norm.depth_splits`` says so (the LayerNorm
    kernel on a GPU, 16-bit products, few rows), nothing is dropped and ``proj`` is a plain
    projection, the product runs as partial products over slices of its depth, which the
    LayerNorm kernel sums with ``x`` and the bias: cuBLAS's own split-K reduction kernel, the
    bias and the residual add are folded into the LayerNorm's one read (the same sum, in
    float32, of partials rounded to the compute dtype)."""
    from accjax.kernels import layer_norm as ln

    ready = not dropping and plain_projection(proj, h) and norm.has_variable("params", "scale")
    splits = ln.depth_splits(h, proj.dtype or h.dtype) if ready else 1
    if splits == 1:
        return norm(x + dropout(proj(h)))
    parts, bias = proj.depth_partials(h, splits)
    return norm.add_partials(x, parts, bias)


def feed_forward_add_norm(mlp_in: "DenseActivation", mlp_out: Dense, norm: "LayerNorm", x: Array,
                          dropout: Callable[[Array], Array], *, dropping: bool) -> Array:
    """``norm(x + dropout(mlp_out(mlp_in(x))))``, a post-LN block's feed-forward sublayer.
    Where ``accjax.kernels.ffn_block`` applies (switched on, a GPU, 16-bit, few rows, the
    exact GELU kept in 16-bit by ``GELU_16BIT`` 'erf', nothing dropped, plain projections), one
    persistent kernel runs the whole sublayer; else ``mlp_in`` then ``dense_add_norm``."""
    from accjax.kernels import ffn_block as fb

    dtype = mlp_in.dtype or x.dtype
    if (not dropping and isinstance(mlp_in, DenseActivation) and activation_name(mlp_in.activation, dtype) == "gelu"
            and plain_projection(mlp_in, x) and plain_projection(mlp_out, x)  # (the hidden has x's rank)
            and norm.use_scale and norm.use_bias and norm.has_variable("params", "scale")
            and (norm.dtype or dtype) == dtype and fb.applies(x.astype(dtype), x.shape[-1], mlp_in.features)):
        k1, b1, k2, b2 = [nn.meta.unbox(m.variables["params"][k]).astype(dtype)
                          for m in (mlp_in, mlp_out) for k in ("kernel", "bias")]
        pn = norm.variables["params"]
        return fb.feed_forward(x.astype(dtype), k1, b1, k2, b2, nn.meta.unbox(pn["scale"]),
                               nn.meta.unbox(pn["bias"]), norm.epsilon)
    return dense_add_norm(mlp_out, norm, mlp_in(x), x, dropout, dropping=dropping)


class DenseActivation(nn.DenseGeneral):
    """``activation(DenseGeneral(x))``, the same parameters; BERT's exact GELU in 16-bit as
    ``activation_name`` says (its tanh form, into cuBLAS's epilogue). Once they exist, where
    ``accjax.kernels.gemm_act`` applies (opted in, a Hopper GPU, bf16 or fp16, enough rows),
    one kernel with the bias and the activation in its epilogue instead of XLA's GEMM and the
    activation's own pass over the output."""

    activation: str = "gelu"

    def __call__(self, x):
        from accjax.kernels import gemm_act as ga

        dtype = self.dtype or x.dtype
        act = activation_name(self.activation, dtype)
        if plain_projection(self, x) and ga.applies(x.astype(dtype), self.features, act):
            p = self.variables["params"]
            kernel, bias = (nn.meta.unbox(p[k]).astype(dtype) for k in ("kernel", "bias"))
            return ga.gemm_act(x.astype(dtype), kernel, bias, act, ga.KERNEL == "interpret")
        return activation(act)(super().__call__(x))


class LayerNorm(nn.LayerNorm):
    """Flax's LayerNorm (same parameters and numerics); once its parameters exist, on a GPU
    where the kernel compiles, one Pallas kernel (``accjax.kernels.layer_norm``) instead of
    XLA's two."""

    def __call__(self, x, *args, **kwargs):
        from accjax.kernels import layer_norm as ln

        if not args and not kwargs and self.has_variable("params", "scale") and ln.applies(x):
            p = self.variables["params"]
            return ln.layer_norm(x, nn.meta.unbox(p["scale"]), nn.meta.unbox(p["bias"]),
                                 self.epsilon, self.dtype or x.dtype, ln.KERNEL == "interpret")
        return super().__call__(x, *args, **kwargs)

    def add_partials(self, x, parts, parts_bias):
        """This LayerNorm of ``x + sum(parts) + parts_bias`` in the kernel (``dense_add_norm``)."""
        from accjax.kernels import layer_norm as ln

        p = self.variables["params"]
        return ln.add_layer_norm(x, parts, parts_bias, nn.meta.unbox(p["scale"]), nn.meta.unbox(p["bias"]),
                                 self.epsilon, self.dtype or x.dtype, ln.KERNEL == "interpret")


def _mix32(x: Array) -> Array:
    """A bijective 32-bit integer mixer (the "lowbias32" constants of Chris Wellons' hash
    search): each input bit flips each output bit with probability close to 1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def position_hash(shape: tuple[int, ...], key: Array) -> Array:
    """uint32 [*shape]: a pseudo-random word for every element, a function of ``key`` (two or
    more uint32 words) and of the element's position alone, so it is the same whether the array
    is sharded or not (XLA partitions the iotas it is built from). Worked example: for shape
    (2, 3) the element [1, 2] hashes row 1 (the flat index over all axes but the last) with
    ``key[0]``, adds column 2 times an odd constant, and hashes that with ``key[1]``."""
    row = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 2, -1, -1):  # row = flat index over the leading axes (mod 2**32)
        row = row + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2 ** 32)
        stride *= shape[axis]
    col = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    return _mix32((_mix32(row ^ key[0]) + col * jnp.uint32(0x9E3779B9)) ^ key[1])


class Dropout(nn.Dropout):
    """Flax's Dropout (same ``rate``, ``deterministic`` and ``rng_collection``) whose draws are
    a hash of each element's position and the call's key (``position_hash``), computed where
    the mask is applied: an element is dropped when its 32-bit word is below
    ``round(rate * 2**32)``; kept elements are scaled by the exact inverse keep probability.
    Flax draws ``jax.random`` bits for the whole array: on the CPU each draw is a threefry
    loop (XLA builds it as a while loop of its own) and the bits are written out and read back;
    here the draws fuse into the multiply. On 2 CPU cores the main job's train program
    compiles in 12 s instead of 20 (docs/results.md "Time"). The key comes from
    ``make_rng`` as before, so every call site and step still has its own mask."""

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic or inputs.size == 0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        if self.broadcast_dims:
            return super().__call__(inputs, deterministic, rng)
        rng = self.make_rng(self.rng_collection) if rng is None else rng
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        words = position_hash(inputs.shape or (1,), rng.reshape(-1).astype(jnp.uint32)).reshape(inputs.shape)
        threshold = min(int(round(self.rate * 2 ** 32)), 2 ** 32 - 1)
        scale = 2 ** 32 / (2 ** 32 - threshold)
        return jnp.where(words >= jnp.uint32(threshold), inputs * jnp.asarray(scale, inputs.dtype),
                         jnp.zeros((), inputs.dtype))


def layer_norm(cfg, name: str) -> nn.LayerNorm:
    """LayerNorm over the hidden size with ``cfg.layer_norm_eps`` (BERT, GPT-2)."""
    return LayerNorm(epsilon=cfg.layer_norm_eps, dtype=to_dtype(cfg.dtype),
                     param_dtype=to_dtype(cfg.param_dtype), scale_init=ones_init(("embed",)),
                     bias_init=zeros_init(("embed",)), name=name)


MATMUL_DTYPES = ("", "float32", "bfloat16", "float16")
# CPU feature flags (Linux /proc/cpuinfo) of instructions that multiply bfloat16 natively:
# x86 AVX512-BF16 and AMX-BF16, Arm's BF16 extension
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_features() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (x86 'flags', Arm 'Features'); empty
    where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def resolve_matmul_dtype(name: str, *, backend: str | None = None,
                         features: frozenset[str] | None = None) -> str:
    """A config's ``matmul_dtype`` as the products will run: ``'auto'`` is ``'bfloat16'``
    where the device multiplies bfloat16 natively (TPUs, GPUs from compute capability 8,
    CPUs with one of ``BF16_CPU_FLAGS``) and ``''`` (the compute dtype) elsewhere: an AVX2
    CPU has no bfloat16 products and ran the main job's train steps 1.3-1.4x slower with
    them (docs/results.md "Time"). Any other name is returned as it is.

    >>> resolve_matmul_dtype("auto", backend="cpu", features=frozenset({"avx2", "fma"}))
    ''
    >>> resolve_matmul_dtype("auto", backend="cpu", features=frozenset({"avx512f", "avx512_bf16"}))
    'bfloat16'
    """
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "bfloat16"
    if backend == "gpu":
        cc = str(getattr(jax.devices()[0], "compute_capability", "8.0"))
        return "bfloat16" if int(cc.split(".")[0]) >= 8 else ""
    if backend == "cpu":
        return "bfloat16" if BF16_CPU_FLAGS & (cpu_features() if features is None else features) else ""
    return ""


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a model runs, not what it computes: the fields every family's config has (a family
    whose layers can switch to XLA attention below some row count adds
    ``xla_attention_below`` with its own default). ``check_runtime`` validates them; every
    family's ``__post_init__`` calls it."""

    dtype: str = "float32"  # compute dtype (activations, matmul inputs)
    param_dtype: str = "float32"  # parameter storage dtype
    # the projections' products (``project``): '' = in ``dtype``; 'bfloat16' = bf16 inputs with
    # float32 accumulation, forward and backward, the rest in ``dtype`` (a CPU with AMX runs
    # them 3-6x faster than float32 products, one with AVX2 alone slower: docs/results.md
    # "Time"; a training config's 'auto' is resolved by ``resolve_matmul_dtype`` before here)
    matmul_dtype: str = ""
    attention_impl: str = "auto"  # 'auto' (cuDNN flash on GPU in bf16/fp16), 'xla', 'cudnn'
    # ACC source, one of acc.ACC_IMPLS: 'auto' picks per attention path and device (acc.py:
    # beside flash attention the Pallas kernel where it compiles, else 'lse'; probabilities
    # with XLA attention), 'probs', 'lse' (flash log-sum-exp), the 'pallas*' kernels
    acc_impl: str = "auto"

    def check_runtime(self) -> None:
        from accjax import acc

        if self.acc_impl not in acc.ACC_IMPLS:
            raise ValueError(f"acc_impl must be one of {acc.ACC_IMPLS}, got {self.acc_impl!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {self.matmul_dtype!r}")

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


class ModelConfig(Runtime):
    """What the BERT, GPT-2 and T5 frozen config dataclasses share beyond ``Runtime``:
    ``head_dim`` and the checks of width / heads and activation name at construction (a family
    names its activation field in ``activation_field``)."""

    activation_field = "hidden_act"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        activation(getattr(self, self.activation_field))  # fail early on an unknown activation
        self.check_runtime()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    # field -> config.json key, read by ``hf_fields`` and written by ``hf_values``
    hf_keys: ClassVar[dict[str, str]] = {}
    hf_required: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_layers", "num_heads")

    @classmethod
    def hf_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The ``hf_keys`` fields a config.json sets (absent or null keys keep the field's
        default; ``hf_required`` ones must be there) and ``num_labels`` from its label map."""
        missing = [cls.hf_keys[f] for f in cls.hf_required if d.get(cls.hf_keys[f]) is None]
        if missing:
            raise KeyError(missing[0])
        kw = {f: d[k] for f, k in cls.hf_keys.items() if d.get(k) is not None}
        return {**kw, "num_labels": d.get("num_labels") or len(d.get("id2label") or {}) or 2}

    def hf_values(self) -> dict[str, Any]:
        """``hf_keys`` written back, with transformers' label maps for ``num_labels``."""
        n = self.num_labels
        return {**{k: getattr(self, f) for f, k in self.hf_keys.items()}, "num_labels": n,
                "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
                "label2id": {f"LABEL_{i}": i for i in range(n)}}


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def check_schedule(schedule, num_layers: int, *, layers: str = "layer") -> tuple[int, ...] | None:
    """A model's ``schedule`` argument: None (dense) or ``num_layers`` positive Python ints,
    one keep-length per (``layers``) layer; static, so each distinct one is its own program."""
    if schedule is None:
        return None
    schedule = tuple(schedule)
    if len(schedule) != num_layers or not all(isinstance(k, int) and k >= 1 for k in schedule):
        raise ValueError(
            f"schedule must be {num_layers} positive Python ints (one keep-length per {layers}), "
            f"got {schedule!r}")
    return schedule


def run_layers(layers, x: Array, rows, schedule, *args, output_hidden_states: bool = False,
               output_attentions: bool = False, final_norm=None, **kw):
    """Layer i called as ``layer(x, rows, *args, keep=schedule[i], **kw)`` (every family), then
    ``final_norm``. Returns (x, rows, per-layer out dicts, hidden states (the input, then each
    layer's output, the last after the norm) or None, attentions [B, N, T, T] each or None)."""
    hidden_states = [x] if output_hidden_states else None
    attentions = [] if output_attentions else None
    outs = []
    for i, layer in enumerate(layers):
        x, rows, out = layer(x, rows, *args, keep=None if schedule is None else schedule[i],
                             output_attentions=output_attentions, **kw)
        if output_attentions:
            attentions.append(out.pop("attentions"))
        if output_hidden_states:
            hidden_states.append(x)
        outs.append(out)
    if final_norm is not None:
        x = final_norm(x)  # [B, K_L, D]
        if hidden_states:
            hidden_states[-1] = x
    return (x, rows, tuple(outs), None if hidden_states is None else tuple(hidden_states),
            None if attentions is None else tuple(attentions))
