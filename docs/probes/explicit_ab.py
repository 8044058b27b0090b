"""Probe (issue 17): BERT-base programs at keep-lengths given by hand, timed with dense.

``eval.bench`` times what ``schedule.plan`` makes of a speedup, stride and floor. To ask
whether a schedule's time follows its rows or the GEMMs' tile waves (docs/benchmarks.md,
forty-second session: 136 rows a sequence at 32 x 512 cost 13% more than 128 in eight layers),
this times explicit schedules, ``48x6,8x6`` meaning 48 rows in six layers then 8 in six,
interleaved with the dense program in one process (``eval.bench.time_interleaved``), and
prints each one's analytic speedup and pipelined measured / analytic.

    python docs/probes/explicit_ab.py --shape 32x512 --schedules "128x8,48x4;136x8,32x4"

Not part of the package.
"""
import argparse
import json
import os

from accjax import inference, models, schedule
from eval import bench


def parse(spec: str) -> tuple[int, ...]:
    """``"48x6,8x6"`` -> (48,) * 6 + (8,) * 6."""
    keep = []
    for part in spec.split(","):
        rows, times = part.split("x")
        keep += [int(rows)] * int(times)
    return tuple(keep)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="128x128")
    ap.add_argument("--schedules", required=True, help="';'-separated, each like 48x6,8x6")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "explicit_ab.json"))
    args = ap.parse_args()
    b, n = (int(v) for v in args.shape.split("x"))
    cfg, params = bench.build("bert-base-uncased", args.dtype, "auto")
    module = models.get_family(cfg.family).module(cfg, "sequence_classification")
    pred = inference.Predictor(module, params, cfg, batch_size=b, length_buckets=(n,), param_dtype=args.dtype)
    cm = models.cost_model(cfg)
    plans = {"dense": pred.plan(n, 1.0)}
    for spec in args.schedules.split(";"):
        plans[spec] = schedule.explicit(cm, n, parse(spec))
    timed = bench.time_interleaved(pred, b, n, plans, iters=args.iters)
    rows = []
    for spec, plan in plans.items():
        t = timed[spec]
        m = timed["dense"]["pipelined_ms"] / t["pipelined_ms"]
        rows.append({"schedule": spec, "keep": list(plan.keep), "analytic": plan.analytic,
                     "pipelined_ms": t["pipelined_ms"], "median_ms": t["median_ms"],
                     "measured_pipelined": m, "pipelined_over_analytic": m / plan.analytic})
        print(f"{args.shape} {spec:>22}: analytic {plan.analytic:5.2f}, {t['pipelined_ms']:.3f} ms pipelined, "
              f"measured {m:.2f}, of analytic {m / plan.analytic:.3f}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"shape": args.shape, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
