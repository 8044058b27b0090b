"""A post-LN feed-forward sublayer in ONE persistent Pallas (Triton) kernel, for few rows.

    out = LayerNorm(x + gelu(x W1 + b1) W2 + b2)

XLA runs this as four kernels on a GPU (the input GEMM with its bias, the exact GELU, the
output GEMM as partial products, the LayerNorm kernel that sums them with the residual).
At a few hundred rows they take far longer than their bytes or FLOPs need
(docs/benchmarks.md: BERT-base's at 128 rows take 5.3 + 1.6 + 5.3 + 2.5 us for under 2 us
of weight reads). Here one launch of ``programs`` programs (at most one per SM, so all
are resident at once) runs three phases, separated by grid-wide barriers:

  1. h = gelu(x W1 + b1), tiles of ``BM x BN1`` of [R, F] (float32 accumulation, GELU on
     the accumulator, rounded once to x's dtype), written to a scratch output;
  2. parts[s] = h[:, slice s] W2[slice s], S slices of the depth F, tiles ``BM x BN2``
     (float32 partial products, a scratch output);
  3. per row: x + sum(parts) + b2, its LayerNorm (float32 statistics), the output.

What it showed (docs/benchmarks.md, twenty-eighth session): XLA's kernels follow each other
in its CUDA graph about 0.25 us apart, so one launch instead of four saves little; each
phase's main loop over the depth takes about as long as cuBLAS's GEMM; and the barriers cost
more than the small kernels they replace.

A barrier is the cooperative-groups one: every thread's stores, a CTA barrier, one atomic
increment (acquire-release, GPU scope) of a counter slot, spinning on the slot until every
program has arrived, a CTA barrier. The counters come in as zeros and go out as the
program count (aliased), which the tests check. Work items are spread round-robin over the
programs, so any program count is correct; only programs that cannot all be resident at
once could deadlock, hence ``programs <= SMs``. In Pallas' interpreter (the CPU tests) the
grid runs one program after another, so it runs with one program (barriers pass at once).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from accjax.kernels.acc_pallas import _pow2, _triton_params
from accjax.kernels.gemm_act import _gelu_erf as _gelu  # exp-based: Pallas' Triton lowering has no erf

# 'never' (XLA's four kernels), 'auto' (a GPU where the kernel compiles and runs right) or
# 'interpret' (Pallas' interpreter, one program: the CPU tests). Off: measured slower. H100,
# BERT-base at 128 rows, device time a sublayer: 17.1 us against XLA's 15.2 (its GEMMs 5.3 + 5.1,
# LayerNorm 3.3, GELU 1.6); without the two barriers (1.15 us each) 14.8; dense 1 x 128 whole
# program 0.427 against 0.410 ms, 8 x 128 1.11 against 0.67, at 1024 rows twice XLA's time
# (docs/benchmarks.md, twenty-eighth session).
KERNEL = "never"
# The kernel applies to at most this many rows (the wide layers are XLA's: cuBLAS's large
# tiles win there and the four kernels' latency is a small share).
MAX_ROWS = 1024
# (BM, BN1, BK1, BN2, BK2, S, num_warps, num_stages[, S1]): tiles of phase 1 and phase 2,
# slices of the depth F (phase 2), the Triton launch settings, and slices of the hidden size D
# in phase 1 (then partial products and a bias + GELU pass between two barriers).
BLOCKS = (64, 64, 64, 64, 64, 4, 4, 3)


def _sync(cnt_ref, slot: int, interpret: bool):
    """Grid-wide barrier on counter ``slot`` (see the module docstring)."""
    from jax.experimental.pallas import triton as plgpu

    i = jnp.int32(slot)
    if interpret:  # one program: nothing to wait for (the interpreter has no spin loop on refs)
        plgpu.atomic_add(cnt_ref, (i,), jnp.int32(1))
        return
    plgpu.debug_barrier()
    plgpu.atomic_add(cnt_ref, (i,), jnp.int32(1))
    n = pl.num_programs(0)
    seen = plgpu.atomic_add(cnt_ref, (i,), jnp.int32(0))
    jax.lax.while_loop(lambda v: v < n, lambda v: plgpu.atomic_add(cnt_ref, (i,), jnp.int32(0)), seen)
    plgpu.debug_barrier()


def _tile_product(item, a_ref, w_ref, *, bm: int, bn: int, bk: int, slices: int, depth: int):
    """Work item ``item`` of a product a [R, depth] @ w [depth, N] in tiles of ``bm x bn`` over
    ``slices`` slices of the depth, row blocks outermost, then slices, then column blocks:
    (slice, first row, first column, the tile's float32 product over its slice)."""
    n_cb = w_ref.shape[1] // bn
    rb, rest = item // (slices * n_cb), item % (slices * n_cb)
    t, cb = rest // n_cb, rest % n_cb
    r0, c0, k0 = rb * bm, cb * bn, t * (depth // slices)

    def step(k, acc):
        a = a_ref[pl.ds(r0, bm), pl.ds(k0 + k * bk, bk)]
        w = w_ref[pl.ds(k0 + k * bk, bk), pl.ds(c0, bn)]
        return acc + jnp.dot(a, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, depth // slices // bk, step, jnp.zeros((bm, bn), jnp.float32))
    return t, r0, c0, acc


def _kernel(x_ref, w1_ref, b1_ref, w2_ref, b2_ref, g_ref, beta_ref, cnt_in, o_ref, h_ref, p_ref, cnt_ref,
            next_ref, *rest, r: int, d: int, f: int, bm: int, bn1: int, bk1: int, bn2: int, bk2: int, s: int,
            s1: int, br: int, eps: float, interpret: bool, phases: int = 3, barriers: bool = True):
    del cnt_in  # aliased to cnt_ref
    from jax.experimental.pallas import triton as plgpu

    pid, n_prog = pl.program_id(0), pl.num_programs(0)

    @pl.when(pid == 0)
    def _():  # zeroed counters for the next launch (it starts after this one ends)
        next_ref[...] = jnp.zeros(next_ref.shape, next_ref.dtype)

    f32 = jnp.float32
    n_rb = r // bm

    def mine(n_items):  # items pid, pid + P, ... below n_items
        return jnp.maximum(0, (n_items - pid + n_prog - 1) // n_prog)

    # phase 1: h = gelu(x W1 + b1); with s1 > 1 slices of the depth D, as float32 partial
    # products q[t] (fewer bytes a program: x's and W1's slices), then bias and GELU on their sum
    n_cb1 = f // bn1
    q_ref = rest[0] if s1 > 1 else None

    def item1(j, carry):
        t, r0, c0, acc = _tile_product(pid + j * n_prog, x_ref, w1_ref, bm=bm, bn=bn1, bk=bk1, slices=s1,
                                       depth=d)
        if s1 > 1:
            q_ref[t, pl.ds(r0, bm), pl.ds(c0, bn1)] = acc
        else:
            acc = acc + b1_ref[pl.ds(c0, bn1)].astype(f32)[None, :]
            h_ref[pl.ds(r0, bm), pl.ds(c0, bn1)] = _gelu(acc).astype(h_ref.dtype)
        return carry

    if phases >= 1:
        jax.lax.fori_loop(0, mine(n_rb * s1 * n_cb1), item1, 0)
    if s1 > 1:
        if barriers:
            _sync(cnt_ref, 2, interpret)
        bc = min(32, f)  # phase 1b: [BM, 32] tiles of h
        n_cb = f // bc

        def item1b(j, carry):
            item = pid + j * n_prog
            r0, c0 = (item // n_cb) * bm, (item % n_cb) * bc
            acc = b1_ref[pl.ds(c0, bc)].astype(f32)[None, :]
            for t in range(s1):
                acc = acc + q_ref[jnp.int32(t), pl.ds(r0, bm), pl.ds(c0, bc)]
            h_ref[pl.ds(r0, bm), pl.ds(c0, bc)] = _gelu(acc).astype(h_ref.dtype)
            return carry

        if phases >= 1:
            jax.lax.fori_loop(0, mine(n_rb * n_cb), item1b, 0)
    if barriers:
        _sync(cnt_ref, 0, interpret)

    # phase 2: parts[t] = h[:, slice t] W2[slice t]
    n_cb2 = d // bn2

    def item2(j, carry):
        t, r0, c0, acc = _tile_product(pid + j * n_prog, h_ref, w2_ref, bm=bm, bn=bn2, bk=bk2, slices=s, depth=f)
        p_ref[t, pl.ds(r0, bm), pl.ds(c0, bn2)] = acc
        return carry

    if phases >= 2:
        jax.lax.fori_loop(0, mine(n_rb * s * n_cb2), item2, 0)
    if barriers:
        _sync(cnt_ref, 1, interpret)

    # phase 3: LayerNorm(x + sum(parts) + b2), BR rows an item, the hidden size padded to a
    # power of two inside the block (masked)
    dp = _pow2(d)
    cols = jnp.arange(dp, dtype=jnp.int32)
    col_ok = cols < d
    masked = dp != d

    def vec(ref):
        v = plgpu.load(ref.at[pl.ds(0, dp)], mask=col_ok, other=0.0) if masked else ref[...]
        return v.astype(f32)

    def item3(j, carry):
        r0 = (pid + j * n_prog) * br
        m2 = jnp.broadcast_to(col_ok[None, :], (br, dp)) if masked else None

        def rows(ref, *lead):
            blk = ref.at[(*lead, pl.ds(r0, br), pl.ds(0, dp))]
            return (plgpu.load(blk, mask=m2, other=0.0) if masked else blk[...]).astype(f32)

        y = rows(x_ref) + vec(b2_ref)[None, :]
        for t in range(s):
            y = y + rows(p_ref, jnp.int32(t))
        mean = jnp.sum(y, axis=1) / d
        yc = jnp.where(col_ok[None, :], y - mean[:, None], 0.0)
        inv = jax.lax.rsqrt(jnp.sum(yc * yc, axis=1) / d + eps)
        out = (yc * inv[:, None] * vec(g_ref)[None, :] + vec(beta_ref)[None, :]).astype(o_ref.dtype)
        blk = o_ref.at[pl.ds(r0, br), pl.ds(0, dp)]
        if masked:
            plgpu.store(blk, out, mask=m2)
        else:
            blk[...] = out
        return carry

    if phases >= 3:
        jax.lax.fori_loop(0, mine(r // br), item3, 0)


@functools.partial(jax.jit, static_argnames=("eps", "programs", "blocks", "interpret", "rows_per_item", "phases",
                                             "barriers"))
def ffn_block(x, w1, b1, w2, b2, scale, bias, *, eps: float, programs: int,
              blocks: tuple | None = None, interpret: bool = False, rows_per_item: int = 2,
              phases: int = 3, barriers: bool = True, counters=None):
    """LayerNorm(x + gelu(x W1 + b1) W2 + b2) for x [..., D], W1 [D, F], W2 [F, D], in one
    kernel of ``programs`` programs (at most the GPU's SMs; 1 in the interpreter). Rows are
    padded to the row tile; D and F must divide by the tiles. ``counters``: int32 [8] zeros
    (None: a constant, which XLA copies into place every call), e.g. the previous launch's
    third result. Returns (output, the counters as left, zeroed counters for a next launch).
    ``phases`` < 3 or no ``barriers``: a timing probe's partial kernels (wrong results)."""
    bm, bn1, bk1, bn2, bk2, s, num_warps, num_stages, *more = blocks or BLOCKS
    s1 = more[0] if more else 1
    shape, d = x.shape, x.shape[-1]
    f = w1.shape[1]
    x2 = x.reshape(-1, d)
    r0 = x2.shape[0]
    bm = min(bm, _pow2(r0))
    r = -(-r0 // bm) * bm
    if r != r0:
        x2 = jnp.pad(x2, ((0, r - r0), (0, 0)))
    assert _tiles_divide(d, f, blocks), (d, f, blocks)
    br = min(rows_per_item, bm)
    kernel = functools.partial(_kernel, r=r, d=d, f=f, bm=bm, bn1=bn1, bk1=bk1, bn2=bn2, bk2=bk2, s=s, s1=s1,
                               br=br, eps=eps, interpret=interpret, phases=phases, barriers=barriers)
    out, _, _, cnt, nxt, *_ = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((r, d), x.dtype), jax.ShapeDtypeStruct((r, f), x.dtype),
                   jax.ShapeDtypeStruct((s, r, d), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.int32),
                   jax.ShapeDtypeStruct((8,), jnp.int32),
                   *([jax.ShapeDtypeStruct((s1, r, f), jnp.float32)] if s1 > 1 else [])],
        grid=(programs,),
        input_output_aliases={7: 3},
        interpret=interpret,
        **_triton_params(interpret, num_warps, num_stages),
    )(x2, w1, b1, w2, b2, scale, bias, jnp.zeros((8,), jnp.int32) if counters is None else counters)
    return out[:r0].reshape(shape), cnt, nxt


def reference(x, w1, b1, w2, b2, scale, bias, eps: float):
    """The same sublayer in XLA, float32 throughout (the tests' reference)."""
    x32 = x.astype(jnp.float32)
    h = x32 @ w1.astype(jnp.float32) + b1.astype(jnp.float32)
    h = 0.5 * h * (1.0 + jax.lax.erf(h * 0.7071067811865476))
    y = x32 + h @ w2.astype(jnp.float32) + b2.astype(jnp.float32)
    mean = y.mean(-1, keepdims=True)
    yc = y - mean
    out = yc * jax.lax.rsqrt((yc * yc).mean(-1, keepdims=True) + eps)
    return (out * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def programs_here(interpret: bool) -> int:
    """Programs of one launch: the GPU's SMs (each program must be resident while others
    wait at a barrier), 1 in the interpreter."""
    if interpret:
        return 1
    return int(getattr(jax.devices()[0], "core_count", 0) or 0)


def fits(rows: int, d: int, f: int, blocks: tuple | None = None) -> bool:
    """Whether a sublayer of ``rows`` rows, hidden size ``d`` and depth ``f`` has tiles here."""
    return 0 < rows <= MAX_ROWS and _tiles_divide(d, f, blocks)


def _tiles_divide(d: int, f: int, blocks: tuple | None) -> bool:
    bm, bn1, bk1, bn2, bk2, s, _, _, *more = blocks or BLOCKS
    s1 = more[0] if more else 1
    return (d % (s1 * bk1) == 0 and f % bn1 == 0 and d % bn2 == 0 and f % (s * bk2) == 0
            and f % min(32, f) == 0)


_AVAILABLE: dict[str, bool] = {}


def _probe() -> bool:
    """The kernel against ``reference`` on 40 rows of 128 (bf16), every counter at the program
    count: the barriers held."""
    import numpy as np

    rng = np.random.default_rng(0)
    d, f = 128, 512
    arrs = [rng.standard_normal(sh).astype(np.float32) * sc for sh, sc in
            (((40, d), 1.0), ((d, f), d ** -0.5), ((f,), 0.1), ((f, d), f ** -0.5), ((d,), 0.1), ((d,), 1.0),
             ((d,), 0.1))]
    arrs = [a.astype(jnp.bfloat16) for a in arrs]  # numpy (the probe may run inside a trace)
    n = programs_here(False)
    if n < 1:
        return False
    # compiled ahead and called: the probe may run while a program is being traced
    got, cnt, _ = ffn_block.lower(*arrs, eps=1e-12, programs=n).compile()(*arrs)
    ref = jax.jit(reference, static_argnames="eps").lower(*arrs, eps=1e-12).compile()(*arrs)
    ok = np.allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=0.1, rtol=0.05)
    return bool(ok and (np.asarray(cnt)[:2] == n).all())


def applies(x, d: int, f: int) -> bool:
    """Whether a feed-forward sublayer of ``x`` [..., d] with depth ``f`` runs this kernel:
    ``KERNEL``, 16-bit, at most ``MAX_ROWS`` rows, tiles that divide."""
    from accjax.kernels import runs_here

    rows = 1
    for n in x.shape[:-1]:
        rows *= n
    return jnp.dtype(x.dtype).itemsize == 2 and fits(rows, d, f) and runs_here(KERNEL, _AVAILABLE, _probe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def feed_forward(x, w1, b1, w2, b2, scale, bias, eps: float):
    """``ffn_block`` on this machine's programs, differentiable (``reference``'s gradient);
    split along the batch axis under SPMD."""
    from accjax import sharding

    interpret = KERNEL == "interpret"
    n = programs_here(interpret)
    return sharding.batch_partitioned(
        ("ffn_block", eps, n, BLOCKS, interpret),
        lambda *a: ffn_block(*a, eps=eps, programs=n, blocks=BLOCKS, interpret=interpret)[0],
        (x, w1, b1, w2, b2, scale, bias), (1, 0, 0, 0, 0, 0, 0))


def _fwd(x, w1, b1, w2, b2, scale, bias, eps):
    return feed_forward(x, w1, b1, w2, b2, scale, bias, eps), (x, w1, b1, w2, b2, scale, bias)


def _bwd(eps, res, g):
    _, vjp = jax.vjp(lambda *a: reference(*a, eps), *res)
    return vjp(g)


feed_forward.defvjp(_fwd, _bwd)
