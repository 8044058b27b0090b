"""Probe (issue 17): one process's BERT-base programs timed with and without settling.

``eval.bench --interleave`` times dense and each level in turn, 20 calls of each in flight.
A GPU that reaches its power cap under the dense program lowers its clocks, and the next
program's round starts at those clocks. ``programs.SETTLE_MS`` runs each program untimed that
long before each of its timed rounds, so each round is that program's steady state (what a
server running one speedup sees). This compiles the programs once and times them under each
``--settle`` value in turn, twice over (a b a b), so the settings meet the same machine.

    python docs/probes/settle_ab.py --shape 128x128 --levels 4:6:8,4.8:6:8 --settle 0,200

``--levels`` is speedup:prune_every:floor. Writes ``$OUT/settle_ab.json``. Not part of the package;
the forty-third session's call 11 (docs/benchmarks.md). ``eval.bench --interleave --settle_ms
0,100`` times planned levels under each value in one pass (no repeat).
"""
import argparse
import json
import os

import jax

from accjax import inference, models
from eval import bench, cli


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="128x128")
    ap.add_argument("--levels", required=True, help="comma list of speedup:prune_every:floor")
    ap.add_argument("--settle", default="0,200", help="SETTLE_MS values, comma list")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "settle_ab.json"))
    args = ap.parse_args()
    b, n = (int(v) for v in args.shape.split("x"))
    levels = [(1.0, 1, 1)] + [tuple(t(v) for t, v in zip((float, int, int), lv.split(":")))
                              for lv in args.levels.split(",")]
    cfg, params = bench.build("bert-base-uncased", args.dtype, "auto")
    module = models.get_family(cfg.family).module(cfg, "sequence_classification")
    pred = inference.Predictor(module, params, cfg, batch_size=b, length_buckets=(n,), param_dtype=args.dtype)
    plans = {lv: pred.plan(n, lv[0], prune_every=lv[1], floor=lv[2]) for lv in levels}
    rows = []
    for rep in range(2):
        for settle in (float(v) for v in args.settle.split(",")):
            with cli.settled(settle):
                timed = bench.time_interleaved(pred, b, n, plans, iters=args.iters)
            dense = timed[levels[0]]["pipelined_ms"]
            for lv, plan in plans.items():
                t = timed[lv]["pipelined_ms"]
                rows.append({"shape": args.shape, "rep": rep, "settle_ms": settle, "speedup": lv[0],
                             "prune_every": lv[1], "floor": lv[2], "analytic": plan.analytic,
                             "keep": list(plan.keep), "pipelined_ms": t, "sync_ms": timed[lv]["median_ms"],
                             "pipelined_over_analytic": dense / t / plan.analytic})
                print(f"rep {rep} settle {settle:>5.0f} ms  {lv[0]:>4}x k={lv[1]} F={lv[2]}: "
                      f"pipelined {t:.3f} ms, sync {timed[lv]['median_ms']:.3f} ms, "
                      f"measured/analytic {rows[-1]['pipelined_over_analytic']:.3f}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
