"""T5 latency: encoder + first token, dense vs encoder elimination at several speedups.

    PYTHONPATH=. python -m eval.bench_t5 --model flan-t5-base --batch 16 --length 512 \
        --dtype bfloat16 --speedups 1.5,2,3,4 --attention_impl auto,xla --vs-torch --json t5_bench.json
    python -m eval.bench_t5 --tiny --iters 3          # a seconds-long CPU smoke run

What is timed is one compiled program: the encoder (with elimination at the schedule for the
speedup), the cross-attention keys/values of the kept rows for every decoder layer, and the
first decoder step with the LM head and argmax: the time to the first generated token.
``analytic`` is the cost model's speedup (``t5_family.cost_model``: encoder layers plus the
fixed first decoder step plus the per-kept-row cross-attention projections); ``measured`` is
dense median / eliminated median. ``--model`` is a preset (random weights, nothing to
download) or a local T5 folder. A program, not a test; never imports ``datasets``.
"""

from __future__ import annotations

import argparse
import sys

from eval import cli

from accjax import benchmark, models, seq2seq

TINY = dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3,
            num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=32)


def build(model: str, dtype: str, attention_impl: str, *, tiny: bool = False, seed: int = 0,
          acc_impl: str = "auto"):
    """(config, params) for a preset (random init) or a local checkpoint folder."""
    kw = dict(dtype=dtype, attention_impl=attention_impl, acc_impl=acc_impl)
    if tiny:
        from accjax.models import t5

        cfg = t5.T5Config(**TINY, **kw)
        return cfg, models.init_params(cfg, "lm", seed)
    return cli.model(model, "lm", seed=seed, **kw)


def run(args) -> dict:
    speedups = cli.speedups(args.speedups, "--speedups") if args.speedups.strip() else []
    info = benchmark.machine()
    b, n = args.batch, args.length
    name = "tiny" if args.tiny else args.model
    from accjax.kernels import acc_pallas

    kernel = acc_pallas.available(rel_bias=True)
    print(f"# {info['device']} ({info['backend']}), jax {info['jax']}, {name}, {args.dtype}, "
          f"batch {b} x input {n}, encoder + first token, acc_impl {args.acc_impl} "
          f"(Pallas kernel with bias {'available' if kernel else 'UNAVAILABLE'})")
    rows, errors = [], []
    for impl in args.attention_impl.split(","):
        try:
            cfg, params = build(args.model, args.dtype, impl, tiny=args.tiny, acc_impl=args.acc_impl)
            module = models.get_family("t5").module(cfg, "lm")
            pred = seq2seq.Seq2SeqPredictor(module, params, cfg, batch_size=b, length_buckets=(n,),
                                            param_dtype=args.dtype, acc_variant=args.acc_variant,
                                            bucket=args.bucket, floor=args.floor)
            dense = pred.time_first_token(b, n, 1.0, iters=args.iters)
            for s in [1.0] + [x for x in speedups if x != 1.0]:
                plan = pred.plan(n, s)
                if plan.clamped_from:
                    print(f"  speedup {s:g} exceeds the maximum at length {n}: runs at {plan.analytic:.2f}")
                t = dense if s == 1.0 else pred.time_first_token(b, n, s, iters=args.iters)
                sch, analytic = plan.keep, plan.analytic
                measured = dense["median_ms"] / t["median_ms"]
                rows.append({"impl": impl, "batch": b, "length": n, "speedup": s, "analytic": analytic,
                             "schedule": list(sch), "median_ms": t["median_ms"], "min_ms": t["min_ms"],
                             "measured": measured, "measured_over_analytic": measured / analytic})
                # each program takes a while to compile on a GPU: show progress as it comes
                print(f"  {impl} speedup {s:g}: analytic {analytic:.2f}, {t['median_ms']:.3f} ms, "
                      f"measured {measured:.2f}", flush=True)
        except Exception as e:  # e.g. a cuDNN path this GPU/jax lacks: keep the other impls
            errors.append({"impl": impl, "error": f"{type(e).__name__}: {e}"})
            print(f"  impl {impl}: failed ({type(e).__name__}: {str(e)[:200]})")
    torch_rows = []
    if args.vs_torch and rows:
        cfg, params = build(args.model, "float32", "xla", tiny=args.tiny)
        for compile_ in ([False, True] if args.torch_compile else [False]):
            label = "torch+compile" if compile_ else "torch eager"
            try:
                t = benchmark.time_torch_t5_first_token(cfg, params, batch_size=b, length=n, dtype=args.dtype,
                                                        iters=args.iters, compile=compile_)
                torch_rows.append({"impl": label, **t})
                print(f"  {label}: {t['median_ms']:.3f} ms", flush=True)
            except Exception as e:  # torch.compile unavailable on this machine, etc.
                torch_rows.append({"impl": label, "error": f"{type(e).__name__}: {e}"})
                print(f"  {label}: failed ({type(e).__name__}: {str(e)[:200]})")
    print_table(rows, torch_rows)
    if not rows:
        raise RuntimeError("every attention implementation failed: " + "; ".join(e["error"] for e in errors))
    return {"machine": info, "model": name, "dtype": args.dtype, "batch": b, "length": n,
            "acc_impl": args.acc_impl, "acc_kernel_with_bias": kernel,
            "iters": args.iters, "measures": "encoder + cross-attention K/V + first decoder step",
            "rows": rows, "torch": torch_rows, "errors": errors}


def print_table(rows, torch_rows=()):
    hdr = f"{'impl':>6} {'asked':>6} {'analytic':>8} {'ms':>9} {'measured':>8} {'meas/an':>7}  keep"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['impl']:>6} {r['speedup']:>6.2f} {r['analytic']:>8.2f} {r['median_ms']:>9.3f} "
              f"{r['measured']:>8.2f} {r['measured_over_analytic']:>7.2f}  {','.join(map(str, r['schedule']))}")
    for r in torch_rows:  # HF PyTorch, same shapes and weights, dense
        shown = f"{r['median_ms']:>9.3f}" if "median_ms" in r else "   failed"
        print(f"{r['impl']:>14} (HF, dense) {shown} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_t5", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flan-t5-base", help="preset (random weights) or T5 folder")
    ap.add_argument("--tiny", action="store_true", help="a tiny random config (CPU smoke run)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=512, help="input tokens (all real)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--speedups", default="1.5,2,3,4")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--attention_impl", default="auto", help="auto, xla, cudnn; a comma list compares them")
    ap.add_argument("--acc_variant", default="plain", help="plain, minus_diagonal, value_norm, prefix")
    ap.add_argument("--acc_impl", default="auto",
                    help="ACC beside flash attention: auto (Pallas kernel where it compiles), lse, pallas")
    ap.add_argument("--bucket", type=int, default=8)
    ap.add_argument("--floor", type=int, default=1)
    ap.add_argument("--vs-torch", dest="vs_torch", action="store_true",
                    help="also time HF PyTorch T5ForConditionalGeneration (eager and torch.compile)")
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    ap.add_argument("--json", default=None, help="write all rows and the machine here")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), json_path=args.json, errors=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
