"""Probe (issue 17): is a pipelined call bound by the host's dispatch or by the device?

For GPT-2's 8 x 1024 prefill (random weights, bf16) at dense and at 3.72x (k = 3, F = 32):
the wall time to enqueue 20 calls (no sync) against the time until the last is done. If the
enqueue takes about as long as the whole, the device waits on the host, and the pipelined
figure is the host's cost per call, not the program's.

    python docs/probes/host_enqueue.py --json out.json

Prepared in the thirty-ninth session (GPT-2's 3.72x profile: 10% of the pipelined wall idle,
against 3% dense); run in the fortieth (docs/benchmarks.md): the host finishes first, so the
pipelined figures are the device's.
"""
import argparse
import time

import jax
import numpy as np

from accjax import benchmark, lm, models


def enqueue_times(prog, params, x, depth: int, reps: int = 7) -> tuple[float, float]:
    """Median over ``reps`` of (host ms a call to enqueue ``depth`` calls, ms a call until the
    last is done)."""
    enq, tot = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(depth):
            out = prog(params, x)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        enq.append((t1 - t0) * 1e3 / depth)
        tot.append((t2 - t0) * 1e3 / depth)
    return float(np.median(enq)), float(np.median(tot))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--depth", type=int, default=20)
    args = ap.parse_args()
    cfg = models.preset("gpt2", dtype="bfloat16")
    module = models.get_family(cfg.family).module(cfg, "lm")
    ev = lm.LMEvaluator(module, models.init_params(cfg, "lm", 0), cfg, batch_size=8, context=1024,
                        continuation=0, param_dtype="bfloat16")
    x = jax.device_put(np.random.default_rng(0).integers(2, cfg.vocab_size, (8, 1024)).astype(np.int32))
    rows = []
    for name, s, k, f in (("dense", 1.0, 1, 1), ("3.72x k3 F32", 3.72, 3, 32), ("3.72x k1 F1", 3.72, 1, 1)):
        prog = ev.prefill_program(ev.plan(s, k, f).keep)
        for _ in range(3):
            jax.block_until_ready(prog(ev.params, x))
        enq, tot = enqueue_times(prog, ev.params, x, args.depth)
        r = {"program": name, "enqueue_ms_per_call": enq, "total_ms_per_call": tot}
        rows.append(r)
        print(f"{name:>14}: enqueue {r['enqueue_ms_per_call']:.3f} ms/call, "
              f"done {r['total_ms_per_call']:.3f} ms/call")
    if args.json:
        benchmark.write_json(args.json, {"machine": benchmark.machine(), "rows": rows})


if __name__ == "__main__":
    main()
