"""Probe (issue 17): a BERT-base layer's four GEMMs against the rows they multiply.

A schedule's kept rows per sequence times the batch is the M of every GEMM in the layer. On a
GPU a GEMM runs in tiles over M and N, a wave of tiles per pass over the SMs, so its time is a
staircase in M, not a line: a few rows past a wave boundary cost a whole wave. This prints,
for each M in ``--rows`` (start:stop:step), the time of the four projections of a BERT-base
layer (768 -> 2304, 768 -> 768, 768 -> 3072, 3072 -> 768; bf16, XLA's GEMMs, as in the
models) per call and per thousand rows, and writes them to ``$OUT/gemm_waves.json`` (or
``--json``).

    python docs/probes/gemm_waves.py --rows 1024:8193:128

Each GEMM is timed as ``--chain`` back-to-back products in one program (launch overhead
shared), ``--iters`` runs, median. Not part of the package.
"""
import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

SHAPES = {"qkv": (768, 2304), "out": (768, 768), "ffn_in": (768, 3072), "ffn_out": (3072, 768)}


def time_gemm(m: int, k: int, n: int, chain: int, iters: int) -> float:
    """Median microseconds of one [m, k] x [k, n] product (``chain`` of them in a program)."""
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (chain, m, k), jnp.bfloat16)
    w = jax.random.normal(key, (chain, k, n), jnp.bfloat16)

    @jax.jit
    def f(x, w):
        return [x[i] @ w[i] for i in range(chain)]  # independent products: no fusion between them

    jax.block_until_ready(f(x, w))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times.append((time.perf_counter() - t) * 1e6 / chain)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1024:8193:128", help="start:stop:step of M")
    ap.add_argument("--chain", type=int, default=16)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gemm_waves.json"))
    args = ap.parse_args()
    start, stop, step = (int(v) for v in args.rows.split(":"))
    rows = []
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; us per GEMM (us per 1000 rows)")
    print(f"{'M':>6} " + " ".join(f"{name:>18}" for name in SHAPES) + f" {'layer':>18}")
    for m in range(start, stop, step):
        t = {name: time_gemm(m, k, n, args.chain, args.iters) for name, (k, n) in SHAPES.items()}
        layer = sum(t.values())
        rows.append({"m": m, **t, "layer": layer})
        print(f"{m:>6} " + " ".join(f"{v:9.2f} ({1e3 * v / m:6.2f})" for v in (*t.values(), layer)), flush=True)
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
