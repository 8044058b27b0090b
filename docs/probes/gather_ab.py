"""Probe (issue 17): the row gather after a layer's selection, [B, T, D] -> [B, K, D] for the
two tensors every eliminating layer gathers (the residual x and attention's context), written
several ways, each program doing ``--reps`` gathers of different index sets (so the device
time dominates), timed interleaved; with a contiguous slice copy of the same bytes as the
bandwidth reference. A GPU profile of GPT-2 8 x 1024 at 3.72x showed XLA's gather fusion at
24 us for 2 x 8 x 784 x 768 bf16 rows (38.5 MB read and written: 1.6 TB/s).

    PYTHONPATH=. python docs/probes/gather_ab.py --out $OUT/gather.json
"""
import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from accjax import acc, programs
from accjax.kernels.acc_pallas import _pow2, _triton_params


def as_words(x):  # [B, T, D] bf16 -> [B, T, D // 2] uint32 (two values a word)
    b, t, d = x.shape
    return jax.lax.bitcast_convert_type(x.reshape(b, t, d // 2, 2), jnp.uint32)


def from_words(w, dtype):
    b, k, d2 = w.shape
    return jax.lax.bitcast_convert_type(w, dtype).reshape(b, k, d2 * 2)


def flat_take(x, idx):  # rows of x [B*T, ...] at idx + b * T
    b, t = x.shape[:2]
    flat = (idx + jnp.arange(b, dtype=idx.dtype)[:, None] * t).reshape(-1)
    return jnp.take(x.reshape((b * t,) + x.shape[2:]), flat, axis=0, mode="clip").reshape(
        (b, idx.shape[1]) + x.shape[2:])


def pallas_take(x, idx, rows: int = 32, cols: int = 256, warps: int = 4):
    """A Pallas (Triton) kernel: each (example, kept-row block, column chunk) program loads its
    indices and copies those rows' chunk (``x_ref[idx, :]``, as ``keep_rows`` gathers)."""
    b, t, d = x.shape
    k = idx.shape[1]
    kp = pl.cdiv(k, rows) * rows  # whole blocks (a partial one's loads and stores are not masked)
    interpret = jax.default_backend() != "gpu"

    def kernel(i_ref, x_ref, o_ref):
        o_ref[...] = x_ref[i_ref[...], :]

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, kp, d), x.dtype), grid=(b, kp // rows, d // cols),
        in_specs=[pl.BlockSpec((None, rows), lambda e, r, c: (e, r)),
                  pl.BlockSpec((None, _pow2(t), cols), lambda e, r, c: (e, 0, c))],
        out_specs=pl.BlockSpec((None, rows, cols), lambda e, r, c: (e, r, c)),
        interpret=interpret, **_triton_params(interpret, warps, 1))(jnp.pad(idx, ((0, 0), (0, kp - k))), x)[:, :k]


VARIANTS = {
    "take_along_axis": lambda x, i: acc.take_rows(x, i),
    "take_along_axis_u32": lambda x, i: from_words(acc.take_rows(as_words(x), i), x.dtype),
    "flat_take": flat_take,
    "flat_take_u32": lambda x, i: from_words(flat_take(as_words(x), i), x.dtype),
    "pallas_32x256": pallas_take,
    "pallas_16x256": functools.partial(pallas_take, rows=16),
    "pallas_64x128": functools.partial(pallas_take, rows=64, cols=128),
    "slice_copy (reference)": lambda x, i: x[:, :i.shape[1]] + 0,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="8x1024x768x784,32x512x768x360,8x1024x768x152,32x512x768x56",
                    help="B x T x D x K list")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": []}
    rng = np.random.default_rng(0)
    for case in a.cases.split(","):
        b, t, d, k = (int(v) for v in case.split("x"))
        xs = [jax.device_put(rng.standard_normal((b, t, d)).astype(jnp.bfloat16)) for _ in range(2)]
        idx = jax.device_put(np.stack([np.stack([np.sort(rng.choice(t, k, replace=False)) for _ in range(b)])
                                       for _ in range(a.reps)]).astype(np.int32))  # [reps, B, K]
        calls, outs = {}, {}
        for name, fn in VARIANTS.items():
            prog = jax.jit(lambda xs, idx, fn=fn: [[fn(x, idx[r]) for x in xs] for r in range(idx.shape[0])])
            calls[name] = functools.partial(prog, xs, idx)
            outs[name] = np.asarray(calls[name]()[0][0], np.float32)
        times = programs.time_interleaved(calls, rounds=a.iters)
        moved = 2 * 2 * b * k * d * 2 * a.reps  # bytes read and written, both tensors, every rep
        for name in VARIANTS:
            ms = float(np.median(times[name]))
            row = {"case": case, "variant": name, "ms_per_call": ms, "us_per_gather_pair": ms * 1e3 / a.reps,
                   "TB_per_s": moved / (ms * 1e-3) / 1e12,
                   "same_as_take_along_axis": bool(np.array_equal(outs[name], outs["take_along_axis"]))}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
