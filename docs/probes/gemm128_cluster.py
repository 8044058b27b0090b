"""Probe (issue 15): BERT-base's four projections at 128 rows, XLA's cuBLAS against JAX's Hopper
Mosaic GPU matmul example (``hopper_matmul_mgpu``), with and without a cluster of two CTAs that
share one operand's tiles by TMA multicast. The twenty-eighth session found each 128-row GEMM
to move 12-28 MB through L2 (every CTA re-reads its rows' activation over the whole depth); a
cluster along N halves the activation's reads. Device time per GEMM from a ``jax.profiler``
trace: 12 independent products (distinct activations and weights) in one program. Measured
(H100, docs/benchmarks.md, twenty-eighth session): the clusters made each product 0.1-0.5 us slower at the same tiles,
and the example's tiles are slower than cuBLAS's at 128 and 1024 rows.

    PYTHONPATH=. python docs/probes/gemm128_cluster.py --out $OUT/gemm128.json
"""
import argparse
import functools
import json
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from accjax import programs
from eval import profile

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (K, N): q/k/v, attention out, FFN in, FFN out


def configs(hm):
    D = hm.MatmulDimension
    out = []
    # the example's smallest CTA tiles are 64 x 128 (warpgroups along N) and 128 x 64 (along M):
    # its B operand's swizzle needs 64 columns. A cluster along N shares the activation's tiles,
    # along M the weight's.
    for tm, tn, wg, cl, steps in [
        (64, 64, D.N, None, 4), (64, 64, D.N, D.N, 4), (64, 64, D.N, D.M, 4),
        (64, 64, D.M, None, 4), (64, 64, D.M, D.N, 4), (64, 64, D.M, D.N, 6),
        (64, 128, D.M, None, 3), (64, 128, D.M, D.N, 3),
    ]:
        out.append((f"{tm}x{tn}_wg{wg}_cl{cl}_s{steps}",
                    hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=steps,
                                    epi_tile_m=64, epi_tile_n=min(64, tn), wg_dimension=wg,
                                    cluster_dimension=cl)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    rng = np.random.default_rng(0)
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": a.rows, "results": []}
    for k, n in SHAPES:
        xs = [jnp.asarray(rng.standard_normal((a.rows, k)), jnp.bfloat16) for _ in range(12)]
        ws = [jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16) for _ in range(12)]
        ref = np.asarray(xs[0].astype(jnp.float32) @ ws[0].astype(jnp.float32))
        variants = {"xla": lambda x, w: x @ w}
        for name, cfg in configs(hm):
            variants[name] = functools.partial(lambda x, w, cfg: hm.matmul(x, w, None, cfg), cfg=cfg)
        for name, mm in variants.items():
            try:
                fn = jax.jit(lambda xs_, ws_, mm=mm: [mm(x, w) for x, w in zip(xs_, ws_)])
                comp = programs.compile_lowered(fn.lower(xs, ws), a.rows)
                out = comp(xs, ws)
                err = float(np.abs(np.asarray(out[0], np.float32) - ref).max())
                prof = profile.profile_call(functools.partial(comp, xs, ws), iters=10)
                row = {"k": k, "n": n, "variant": name, "device_us_per_gemm": prof["busy_ms"] * 1000 / 12,
                       "kernels_per_gemm": prof["kernels_per_call"] / 12, "max_abs_err": err,
                       "top": [(t["name"][:50], round(t["ms"] * 1000 / 12, 2)) for t in prof["top"][:3]]}
            except Exception as e:  # a tiling this shape or jax does not take
                row = {"k": k, "n": n, "variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                if name == "xla":
                    traceback.print_exc()
            res["results"].append(row)
            print(json.dumps(row), flush=True)
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
