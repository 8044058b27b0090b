"""Probe: where a pipelined call's wall clock goes between its kernels, for one XLA setting.
BERT-base (random weights) programs as ``eval.profile`` builds them, timed and traced by
``eval.profile.profile_call`` (``--iters`` calls in flight); prints and writes its
``call_gaps``: for every position in a call's kernel sequence the GPU's idle time before
that kernel, averaged over the calls, with its neighbour's name and both HLO ops. Run it once
per XLA_FLAGS value (they are read once per process); ``--label`` defaults to XLA_FLAGS.

    PYTHONPATH=. python docs/probes/gaps.py --shapes 32x512 --speedups 1,4.8 --prune_every 8 \\
        --floor 48 --out $OUT/gaps.json
    XLA_FLAGS=--xla_gpu_enable_command_buffer= PYTHONPATH=. python docs/probes/gaps.py ...  # no CUDA graphs
"""
import argparse
import json
import os

from accjax import benchmark, inference, models
from eval import bench, profile


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
            r = profile.profile_call(lambda: prog(pred.params, *inputs), a.iters)
            if r["gaps"] is None:
                raise SystemExit("no kernel sequence a call in the trace: this probe needs a GPU")
            row = {"shape": f"{b}x{n}", "speedup": s, "keep": list(plan.keep), "label": a.label,
                   "wall_us": r["wall_ms"] * 1e3, "busy_us": r["busy_ms"] * 1e3,
                   "kernels": r["kernels_per_call"], **r["gaps"]}
            rows.append(row)
            print(f"== {row['shape']} {s:g}x ({a.label}): wall {row['wall_us']:.0f} us, busy {row['busy_us']:.0f}, "
                  f"{row['kernels']:.0f} kernels; overlap {row['overlap_us']:.1f} us")
            profile.print_gaps(r["gaps"], largest=15)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"machine": benchmark.machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
