"""Where does the time go? Kernel-level breakdown of compiled predictor programs.

    python -m eval.profile --model bert-base-uncased --shapes 128x128 --dtype bfloat16 \
        --speedups 1,4.8 --json prof.json
    python -m eval.profile --model flan-t5-base --shapes 16x512 --speedups 1,2   # T5: encoder + first token

For each speedup: wall time per call, device-busy time per call (sum of kernel durations
from a ``jax.profiler`` trace, parsed with ``jax.profiler.ProfileData``), the idle gap
between them (launch/host overhead), kernels grouped by kind (GEMM, attention, gather,
top-k/sort, elementwise fusions, ...), the top kernels, and XLA's own FLOP and byte counts
from ``cost_analysis``. A program for performance work, not a test.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
import time

import jax
import numpy as np

from accjax import benchmark, inference, models
from eval.bench import build, parse_sets

KINDS = [
    ("attention(cudnn)", re.compile(r"cudnn|fmha|flash|sdpa|fprop", re.I)),
    ("gemm", re.compile(r"gemm|cublas|nvjet|sm90_xmma|cutlass|matmul|dot|triton_gemm", re.I)),
    ("topk/sort", re.compile(r"sort|topk|top_k|radix|cub", re.I)),
    ("gather", re.compile(r"gather|take|dynamic.slice", re.I)),
    ("reduce", re.compile(r"reduce|reduction", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("fusion", re.compile(r"fusion|loop|input_", re.I)),
]


def kind_of(name: str) -> str:
    for k, pat in KINDS:
        if pat.search(name):
            return k
    return "other"


def device_events(trace_dir: str):
    from jax.profiler import ProfileData

    files = glob.glob(trace_dir + "/**/*.xplane.pb", recursive=True)
    pd = ProfileData.from_file(files[0])
    events = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        if not device_events.shown:
            print("   trace lines:", [l.name for l in plane.lines])
            device_events.shown = True
        for line in plane.lines:
            # kernel executions live on stream lines; skip the derived "XLA Ops"/"Steps" lines
            if "stream" not in line.name.lower() or "memcpy" in line.name.lower():
                continue
            for e in line.events:
                events.append((e.name, e.duration_ns / 1e6))
    return events


device_events.shown = False


def profile_call(call, iters=20) -> dict:
    """Wall ms per call, device kernels per call (grouped), for a no-argument ``call``
    returning device arrays (a compiled program applied to inputs already on the device)."""
    for _ in range(3):
        jax.block_until_ready(call())
    t0 = time.perf_counter()
    for _ in range(iters):
        out = call()
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t0) * 1e3 / iters
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    for _ in range(iters):
        out = call()
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    ev = device_events(d)
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, ms in ev:
        by_name[name][0] += ms / iters
        by_name[name][1] += 1
    by_kind = collections.defaultdict(float)
    for name, (ms, _) in by_name.items():
        by_kind[kind_of(name)] += ms
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "wall_ms": wall, "busy_ms": busy, "gap_ms": wall - busy,
        "kernels_per_call": sum(c for _, c in by_name.values()) / iters,
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": [{"name": k[:120], "ms": v[0], "count": v[1] / iters} for k, v in top],
    }


def _xla_cost(prog) -> dict:
    cost = prog.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"xla_flops": float(cost.get("flops", 0)) if cost else 0.0,
            "xla_bytes": float(cost.get("bytes accessed", 0)) if cost else 0.0}


def profile_program(pred, b, n, s, iters=20):
    """A BERT-family ``inference.Predictor`` program at speedup ``s``."""
    plan = pred.plan(n, s)
    prog = pred.program(b, plan)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, pred.config.vocab_size, (b, n)).astype(np.int32)
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    batch = jax.device_put({k: full[k] for k in pred.input_names})
    r = profile_call(lambda: prog(pred.params, batch), iters)
    return {"speedup": s, "schedule": list(plan.keep), "analytic": plan.analytic, **r, **_xla_cost(prog)}


def profile_t5_first_token(pred, b, n, s, iters=20):
    """A ``seq2seq.Seq2SeqPredictor`` encoder + first-token program at speedup ``s``."""
    plan = pred.plan(n, s)
    prog = pred.first_token_program(b, plan)
    ids = np.random.default_rng(0).integers(2, pred.config.vocab_size, (b, n)).astype(np.int32)
    ids, mask = jax.device_put((ids, np.ones_like(ids)))
    r = profile_call(lambda: prog(pred.params, ids, mask), iters)
    return {"speedup": s, "schedule": list(plan.keep), "analytic": plan.analytic, **r, **_xla_cost(prog)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.profile")
    ap.add_argument("--model", default="bert-base-uncased")
    ap.add_argument("--shapes", default="128x128")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--speedups", default="1,4.8")
    ap.add_argument("--attention_impl", default="auto")
    ap.add_argument("--acc_variant", default="plain")
    ap.add_argument("--hidden_act", default=None, help="override the activation (timing only)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--dump_hlo", default=None, help="write each program's optimised HLO here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t5 = args.model.startswith("flan-t5") or args.model.startswith("t5")
    if t5:  # encoder + first token, as eval.bench_t5 times it
        from accjax import seq2seq
        from eval import bench_t5

        cfg, params = bench_t5.build(args.model, args.dtype, args.attention_impl,
                                     acc_impl=parse_sets(args.set).get("acc_impl", "auto"))
        module = models.get_family(cfg.family).module(cfg, "lm")
    else:
        cfg, params = build(args.model, args.dtype, args.attention_impl, overrides=parse_sets(args.set))
        if args.hidden_act:
            cfg = cfg.replace(hidden_act=args.hidden_act)
        module = models.get_family(cfg.family).module(cfg, "sequence_classification")
    results = []
    for shape in args.shapes.split(","):
        b, n = map(int, shape.split("x"))
        if t5:
            pred = seq2seq.Seq2SeqPredictor(module, params, cfg, batch_size=b, length_buckets=(n,),
                                            param_dtype=args.dtype, acc_variant=args.acc_variant)
        else:
            pred = inference.Predictor(module, params, cfg, batch_size=b, length_buckets=(n,),
                                       param_dtype=args.dtype, acc_variant=args.acc_variant)
        for s in [float(x) for x in args.speedups.split(",")]:
            r = (profile_t5_first_token if t5 else profile_program)(pred, b, n, s, args.iters)
            if args.dump_hlo:
                import os
                os.makedirs(args.dump_hlo, exist_ok=True)
                plan = pred.plan(n, s)
                prog = pred.first_token_program(b, plan) if t5 else pred.program(b, plan)
                with open(f"{args.dump_hlo}/{shape}_s{s:g}.hlo.txt", "w") as f:
                    f.write(prog.as_text())
            r["shape"] = shape
            results.append(r)
            print(f"\n== {shape} speedup {s:g} (analytic {r['analytic']:.2f}) {args.acc_variant} "
                  f"{args.attention_impl} act={getattr(cfg, 'hidden_act', '-')}: wall {r['wall_ms']:.3f} ms, "
                  f"busy {r['busy_ms']:.3f} ms, gap {r['gap_ms']:.3f} ms, "
                  f"{r['kernels_per_call']:.0f} kernels/call, XLA {r['xla_flops']/1e12:.3f} TFLOP "
                  f"{r['xla_bytes']/1e9:.2f} GB")
            print("   by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in r["by_kind_ms"].items()))
            for t in r["top"][:12]:
                print(f"   {t['ms']:8.3f} ms x{t['count']:<4.0f} {t['name']}")
    if args.json:
        benchmark.write_json(args.json, {"machine": benchmark.machine(), "args": vars(args),
                                         "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
