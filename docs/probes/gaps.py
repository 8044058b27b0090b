"""Probe: where a pipelined call's wall clock goes between its kernels. BERT-base (random
weights) programs as ``eval.profile`` builds them, ``--iters`` calls enqueued back to back and
traced; for every position in the call's kernel sequence, the idle time on the GPU before that
kernel (its start minus the previous kernel's end), averaged over the calls, with the two
kernels' names and HLO ops. The gap before a call's first kernel is the host's share (a call
not enqueued in time); the rest are the program's own launch gaps (CUDA-graph boundaries,
a kernel that waits on a host-side step).

    PYTHONPATH=. python docs/probes/gaps.py --shapes 32x512 --speedups 1,4.8 --prune_every 8 \\
        --floor 48 --out $OUT/gaps.json
    XLA_FLAGS=--xla_gpu_enable_command_buffer= PYTHONPATH=. python docs/probes/gaps.py ...  # no CUDA graphs

Prints per program: wall, busy, the summed gaps by size (under 0.5 us, 0.5-1, 1-2, 2-5, over
5), the call-boundary gap, and the largest gaps with their neighbours.
"""
import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from accjax import benchmark, inference, models
from eval import bench, profile

BINS = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 5.0), (5.0, float("inf")))


def traced_gaps(call, iters: int) -> dict:
    for _ in range(3):
        jax.block_until_ready(call())
    t0 = time.perf_counter()
    for _ in range(iters):
        out = call()
    jax.block_until_ready(out)
    wall_us = (time.perf_counter() - t0) * 1e6 / iters
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    for _ in range(iters):
        out = call()
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    ev = profile.device_events(d, with_start=True)  # [(start ns, name, ms, hlo op)]
    if not ev:
        raise RuntimeError("no GPU kernels in the trace: this probe needs a GPU")
    n = len(ev) // iters
    if n * iters != len(ev):
        raise RuntimeError(f"{len(ev)} kernels over {iters} calls: not one sequence a call")
    start = np.array([e[0] for e in ev], np.float64) / 1e3  # us
    end = start + np.array([e[2] for e in ev]) * 1e3
    gap = np.zeros(len(ev))
    gap[1:] = start[1:] - end[:-1]  # idle before each kernel (negative: streams overlap)
    per_pos = gap.reshape(iters, n)[1:]  # drop the first call (its first gap is the trace's start)
    mean = per_pos.mean(axis=0)
    clamp = np.maximum(mean, 0.0)
    names = [e[1][:60] for e in ev[:n]]
    ops = [e[3] for e in ev[:n]]
    top = sorted(range(n), key=lambda i: -clamp[i])[:25]
    return {
        "wall_us": wall_us,
        "busy_us": float(sum(e[2] for e in ev) * 1e3 / iters),
        "span_us": float((end[-1] - start[0]) / iters),
        "kernels": n,
        "boundary_gap_us": float(clamp[0]),
        "gaps_in_call_us": float(clamp[1:].sum()),
        "overlap_us": float(-np.minimum(mean, 0.0).sum()),
        "by_size": {f"{lo:g}-{hi:g}": {"count": int(((clamp[1:] >= lo) & (clamp[1:] < hi)).sum()),
                                       "us": float(clamp[1:][(clamp[1:] >= lo) & (clamp[1:] < hi)].sum())}
                    for lo, hi in BINS},
        "largest": [{"pos": i, "gap_us": round(float(mean[i]), 2), "spread_us": round(float(per_pos[:, i].std()), 2),
                     "before": names[i - 1] if i else "(previous call)", "kernel": names[i],
                     "op_before": ops[i - 1] if i else "", "op": ops[i],
                     "kernel_us": round(float(np.mean([ev[c * n + i][2] for c in range(iters)]) * 1e3), 2)}
                    for i in top],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert-base-uncased")
    ap.add_argument("--shapes", default="32x512")
    ap.add_argument("--speedups", default="1,4.8")
    ap.add_argument("--prune_every", type=int, default=1)
    ap.add_argument("--floor", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--label", default=os.environ.get("XLA_FLAGS", "default flags"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg, params = bench.build(a.model, a.dtype, "auto")
    module = models.get_family(cfg.family).module(cfg, "sequence_classification")
    rows = []
    for b, n in bench.parse_shapes(a.shapes):
        pred = inference.Predictor(module, params, cfg, batch_size=b, length_buckets=(n,), param_dtype=a.dtype,
                                   floor=a.floor, prune_every=a.prune_every)
        for s in [float(x) for x in a.speedups.split(",")]:
            plan = pred.plan(n, s)
            prog, inputs = bench.program_inputs(pred, b, n, plan, False)
            r = traced_gaps(lambda: prog(pred.params, *inputs), a.iters)
            r.update(shape=f"{b}x{n}", speedup=s, keep=list(plan.keep), label=a.label)
            rows.append(r)
            print(f"== {r['shape']} {s:g}x ({a.label}): wall {r['wall_us']:.0f} us, busy {r['busy_us']:.0f}, "
                  f"span {r['span_us']:.0f}, {r['kernels']} kernels; gaps in the call {r['gaps_in_call_us']:.0f} us, "
                  f"before the call {r['boundary_gap_us']:.1f}, overlap {r['overlap_us']:.1f}")
            print("   by size (us): " + ", ".join(f"{k}: {v['count']} / {v['us']:.0f}" for k, v in r["by_size"].items()))
            for g in r["largest"][:15]:
                print(f"   {g['gap_us']:6.2f} (+-{g['spread_us']:.2f}) before #{g['pos']:<3} {g['kernel'][:44]:<44} "
                      f"[{g['op'][:28]}] after {g['before'][:36]} [{g['op_before'][:28]}]")
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"machine": benchmark.machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
