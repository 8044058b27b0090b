"""Latency benchmark: dense vs ACC elimination at several speedups, optionally vs HF PyTorch.

    python -m eval.bench --model bert-base-uncased --shapes 32x128 --dtype float32 \
        --speedups 1.5,2,3,4,4.8 --vs-torch --json bench.json

``--model`` is a preset (random weights) or any model spec / accjax run folder. Prints one
table per shape and writes every row, plus the machine, as JSON. A program, not a test:
it asserts nothing about time. Never imports ``datasets``.
"""

from __future__ import annotations

import argparse
import sys


from accjax import acc as acc_lib
import jax
import numpy as np

from accjax import benchmark, inference, models, programs
from eval import cli


def parse_shapes(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        try:
            b, n = part.lower().split("x")
            out.append((int(b), int(n)))
        except ValueError:
            raise SystemExit(f"error: bad shape {part!r}; write BATCHxLENGTH, e.g. 32x128") from None
    return out


def parse_sets(items) -> dict:
    """['xla_attention_below=64', 'fused_qkv=false'] -> typed config overrides."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"error: --set takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
        else:
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    return out


def build(model: str, dtype: str, attention_impl: str, seed: int = 0, overrides: dict | None = None):
    """(config, params) for a preset (random init) or a checkpoint spec."""
    return cli.model(model, "sequence_classification", seed=seed, dtype=dtype,
                     attention_impl=attention_impl, **(overrides or {}))


def run(args) -> dict:
    shapes = parse_shapes(args.shapes)
    speedups = cli.speedups(args.speedups, "--speedups")
    impls = args.attention_impl.split(",")
    rows, torch_rows = [], []
    info = benchmark.machine()
    acc_lib.SELECT_METHOD = args.select
    print(f"# {info['device']} ({info['backend']}), jax {info['jax']}, {args.model}, {args.dtype}"
          + (f", ACC kernel {'pallas' if info.get('acc_pallas_kernel') else 'UNAVAILABLE (XLA lse path)'}"
             f", fused attention+ACC kernel {'yes' if info.get('acc_fused_kernel') else 'UNAVAILABLE'}"
             if info["backend"] == "gpu" else "") + f", select {args.select}")
    params_f32 = None
    for impl in impls:
        cfg, params = build(args.model, args.dtype, impl, overrides=parse_sets(args.set))
        params_f32 = params
        module = models.get_family(cfg.family).module(cfg, "sequence_classification")
        for b, n in shapes:
            pred = inference.Predictor(module, params, cfg, batch_size=b, length_buckets=(n,),
                                       param_dtype=args.dtype, acc_variant=args.acc_variant,
                                       bucket=args.bucket, floor=args.floor)
            levels = [1.0] + [x for x in speedups if x != 1.0]
            plans = {s: pred.plan(n, s) for s in levels}
            for s, plan in plans.items():
                if plan.clamped_from:
                    print(f"  {b}x{n}: speedup {s:g} exceeds the maximum: runs at {plan.analytic:.2f}")
            if args.interleave:
                timed = time_interleaved(pred, b, n, plans, iters=args.iters)
            dense = timed[1.0] if args.interleave else pred.time_program(b, n, 1.0, iters=args.iters)
            for s in levels:
                if args.interleave:
                    t = timed[s]
                else:
                    t = dense if s == 1.0 else pred.time_program(b, n, s, iters=args.iters)
                sch, analytic = plans[s].keep, plans[s].analytic
                measured = dense["median_ms"] / t["median_ms"]
                rows.append({
                    "shape": f"{b}x{n}", "batch": b, "length": n, "impl": impl,
                    "acc_variant": args.acc_variant, "speedup": s, "analytic": analytic,
                    "schedule": list(sch), "median_ms": t["median_ms"], "min_ms": t["min_ms"],
                    "measured": measured, "measured_over_analytic": measured / analytic,
                    "tokens_per_s": b * n / (t["median_ms"] / 1e3),
                    "label": args.label, "overrides": parse_sets(args.set), "select": args.select,
                })
                print(row_line(rows[-1]), flush=True)  # as measured: a cut-off run keeps its rows
    if args.vs_torch:
        for b, n in shapes:
            for compile_ in ([False, True] if args.torch_compile else [False]):
                name = "torch+compile" if compile_ else "torch eager (SDPA)"
                try:
                    t = benchmark.time_torch(cfg, params_f32, batch_size=b, length=n, dtype=args.dtype,
                                             iters=args.iters, compile=compile_)
                    torch_rows.append({"shape": f"{b}x{n}", "impl": name, **t,
                                       "tokens_per_s": b * n / (t["median_ms"] / 1e3)})
                    print(f"{b}x{n} {name}: {t['median_ms']:.3f} ms", flush=True)
                except Exception as e:  # torch.compile unavailable on this machine, etc.
                    torch_rows.append({"shape": f"{b}x{n}", "impl": name, "error": f"{type(e).__name__}: {e}"})
    print()
    print_table(rows, torch_rows)
    return {"machine": info, "model": args.model, "dtype": args.dtype, "iters": args.iters,
            "config": {k: v for k, v in vars(cfg).items()} if rows else None,
            "rows": rows, "torch": torch_rows}


def time_interleaved(pred, b: int, n: int, plans: dict, *, iters: int) -> dict:
    """{speedup: timing} with the levels' programs called in rounds (dense, 1.5, 2, ...,
    dense, ...): on a shared or throttling machine every level meets the same conditions, so
    the ratios hold where level-after-level timing drifts. Same inputs for every program."""
    ids = programs.random_batches(np.random.default_rng(0), (b, n), getattr(pred.config, "vocab_size", 1000),
                                  count=1)[0]
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    batch = jax.device_put({k: full[k] for k in pred.input_names})
    progs = {s: pred.program(b, p) for s, p in plans.items()}
    ms = programs.time_interleaved({s: (lambda p=p: p(pred.params, batch)) for s, p in progs.items()},
                                   rounds=iters)
    return {s: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v)), "schedule": plans[s].keep}
            for s, v in ms.items()}


def row_line(r) -> str:
    return (f"{r['shape']:>8} {r['impl']:>6} {r['speedup']:>6.2f} {r['analytic']:>8.2f} "
            f"{r['median_ms']:>9.3f} {r['measured']:>8.2f} {r['measured_over_analytic']:>7.2f} "
            f"{r['tokens_per_s']:>10.0f}  {','.join(map(str, r['schedule']))}")


def print_table(rows, torch_rows):
    hdr = f"{'shape':>8} {'impl':>6} {'asked':>6} {'analytic':>8} {'ms':>9} {'measured':>8} {'meas/an':>7} {'tok/s':>10}  keep"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(row_line(r))
    for r in torch_rows:
        if "error" in r:
            print(f"{r['shape']:>8} {r['impl']}: n/a ({r['error'][:100]})")
        else:
            print(f"{r['shape']:>8} {r['impl']}: {r['median_ms']:.3f} ms, {r['tokens_per_s']:.0f} tok/s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base-uncased", help="preset or checkpoint")
    ap.add_argument("--shapes", default="32x128", help="BATCHxLENGTH list, e.g. 128x128,32x512")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--speedups", default="1.5,2,3,4,4.8")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--attention_impl", default="auto",
                    help="auto, xla, cudnn; a comma list compares them")
    ap.add_argument("--acc_variant", default="plain",
                    help="plain, minus_diagonal, value_norm, or prefix (no scoring: a lower bound)")
    ap.add_argument("--bucket", type=int, default=8)
    ap.add_argument("--floor", type=int, default=1)
    ap.add_argument("--vs-torch", dest="vs_torch", action="store_true",
                    help="also time HF PyTorch (eager SDPA and torch.compile)")
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set xla_attention_below=64 (repeatable)")
    ap.add_argument("--select", default="auto", choices=acc_lib.SELECT_METHODS,
                    help="how kept rows are chosen (acc.select_rows): rank counting or top_k + sort")
    ap.add_argument("--interleave", action="store_true",
                    help="time the levels in rounds (dense, 1.5, ..., dense, ...) instead of one "
                         "after another: for shared or busy machines")
    ap.add_argument("--label", default="", help="a name for this variant in the JSON rows")
    ap.add_argument("--json", default=None, help="write all rows and the machine here")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
