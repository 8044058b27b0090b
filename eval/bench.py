"""Latency benchmark: dense vs ACC elimination at several speedups, optionally vs HF PyTorch.

    python -m eval.bench --model bert-base-uncased --shapes 32x128 --dtype float32 \
        --speedups 1.5,2,3,4,4.8 --vs-torch --json bench.json
    PYTHONPATH=. python -m eval.bench --model flan-t5-base --shapes 16x512 --dtype bfloat16 \
        --speedups 1.5,2,3,4 --attention_impl auto,xla --vs-torch --json t5_bench.json
    python -m eval.bench --tiny --iters 3          # a tiny random T5: a seconds-long CPU smoke run
    python -m eval.bench --shapes 128x128 --dtype bfloat16 --speedups 2,4.8 --prune_every 1,2,3 --interleave
    python -m eval.bench --shapes 128x128 --dtype bfloat16 --speedups 4.8 --floor 1,8,16 --interleave
    python -m eval.bench --shapes 128x128 --dtype bfloat16 --speedups 4,4.8 --prune_every 6 --floor 8 \
        --interleave --settle_ms 0,100   # each program's rounds also after 100 ms of its own calls

An encoder classifier (BERT family) is timed as one forward pass. A T5 (a T5 preset,
``--family t5`` for a T5 folder, ``--tiny``; ``python -m eval.bench_t5`` is this with T5
defaults) is timed to its first generated token: the encoder (with elimination), the
cross-attention keys/values of the kept rows and the first decoder step, as one program
(``analytic``: ``t5_family.cost_model``'s). ``measured`` is dense median / eliminated median.
On a GPU at its power cap the program timed after dense starts at the clocks dense left:
``--settle_ms`` times each program's rounds after that long of its own calls (its steady
state, as a server at one speedup runs it; by default 100 ms on a GPU with ``--interleave``,
``cli.SETTLE_GPU_MS``), and the run prints its seconds at the cap.
Prints one table and writes every row, plus the machine, as JSON. A program, not a test: it
asserts nothing about time. Never imports ``datasets``.
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import argparse
import contextlib
import functools
import sys
import time

import jax
import numpy as np

from accjax import acc as acc_lib
from accjax import benchmark, guards, inference, models, programs, seq2seq
from accjax import schedule as sched_lib
from accjax.kernels import acc_pallas
from eval import cli

TINY_T5 = dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3,
               num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=32)
COLUMNS = [("shape", "shape", ""), ("impl", "impl", ""), ("prune_every", "k", ""), ("floor", "floor", ""),
           ("settle_ms", "settle", ""),
           ("speedup", "asked", ".2f"),
           ("analytic", "analytic", ".2f"), ("median_ms", "ms", ".3f"), ("measured", "measured", ".2f"),
           ("measured_over_analytic", "meas/an", ".2f"), ("pipelined_ms", "pipe ms", ".3f"),
           ("pipelined_over_analytic", "pipe meas/an", ".2f"),
           ("pipelined_over_analytic_range", "(rounds)",
            lambda r: "{:.2f}-{:.2f}".format(*r["pipelined_over_analytic_range"]) if "pipelined_over_analytic_range" in r else "-"),
           ("tokens_per_s", "tok/s", ".0f"),
           ("schedule", "keep", benchmark.joined)]


def parse_shapes(s: str) -> list[tuple[int, int]]:
    """'128x128,32x512' -> [(128, 128), (32, 512)]; anything else is a UserError (exit 2)."""
    out = []
    for part in s.split(","):
        try:
            b, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise guards.UserError(f"bad shape {part!r}; write BATCHxLENGTH, e.g. 32x128") from None
        if b < 1 or n < 1:
            raise guards.UserError(f"bad shape {part!r}: batch and length must be >= 1, e.g. 32x128")
        out.append((b, n))
    return out


def parse_sets(items) -> dict:
    """['xla_attention_below=64', 'fused_qkv=false'] -> typed config overrides."""
    out = {}
    for item in items or []:
        k, eq, v = item.partition("=")
        if not eq:
            raise guards.UserError(f"--set takes key=value, got {item!r}")
        out[k] = {"true": True, "false": False}.get(v.lower(), v)
        for cast in (int, float):  # the first that reads it
            with contextlib.suppress(ValueError):
                out[k] = cast(v) if isinstance(out[k], str) else out[k]
    return out


def is_t5(model: str, family: str | None = None, tiny: bool = False) -> bool:
    """T5 (timed to the first token) or an encoder classifier: --tiny, --family, else the preset's."""
    if tiny or family:
        return tiny or family == "t5"
    return model in models.all_presets() and models.preset(model).family == "t5"


def build(model: str, dtype: str, attention_impl: str, seed: int = 0, overrides: dict | None = None, *,
          t5: bool = False, tiny: bool = False):
    """(config, params) for a preset (random init), a checkpoint spec or (``tiny``) a small T5."""
    kw = dict(dtype=dtype, attention_impl=attention_impl, **(overrides or {}))
    if tiny:
        from accjax.models import t5 as t5_lib

        cfg = t5_lib.T5Config(**TINY_T5, **kw)
        return cfg, models.init_params(cfg, "lm", seed)
    return cli.model(model, "lm" if t5 else "sequence_classification", seed=seed, **kw)


def run(args) -> dict:
    strides = sched_lib.check_strides(cli.ints(args.prune_every, "--prune_every", low=1))
    floors = sched_lib.check_floors(cli.ints(args.floor, "--floor", low=1))
    guards.positive_int(args.iters, "--iters")
    settles = cli.settles(args.settle_ms, many=True, rounds=args.interleave)
    if settles != [0] and not args.interleave:
        raise cli.UsageError("--settle_ms settles interleaved rounds: add --interleave")
    t5 = is_t5(args.model, args.family, args.tiny)
    shapes = parse_shapes(args.shapes)
    for flag in ("batch", "length"):
        if getattr(args, flag) is not None:
            guards.positive_int(getattr(args, flag), f"--{flag}")
    if args.batch or args.length:
        shapes = [(args.batch or shapes[0][0], args.length or shapes[0][1])]
    speedups = cli.speedups(args.speedups, "--speedups") if args.speedups.strip() else []
    # (speedup, stride, floor): dense once, then every level at every stride and floor, all
    # timed together
    levels = [(1.0, 1, floors[0])] + [(x, k, f) for k in strides for f in floors for x in speedups if x != 1.0]
    overrides = {"acc_impl": args.acc_impl, **parse_sets(args.set)}
    info = benchmark.machine()
    capped = (benchmark.power_capped_us() if info["backend"] == "gpu" else None, time.perf_counter())
    acc_lib.SELECT_METHOD = args.select
    name = "tiny" if args.tiny else args.model
    head = "lm" if t5 else "sequence_classification"
    kernel = acc_pallas.available(rel_bias=True) if t5 else None
    note = (f", encoder + first token, acc_impl {args.acc_impl} (Pallas kernel with bias "
            f"{'available' if kernel else 'UNAVAILABLE'})" if t5 else
            f", ACC kernel {'pallas' if info.get('acc_pallas_kernel') else 'UNAVAILABLE (XLA lse path)'}"
            f", fused attention+ACC kernel {'yes' if info.get('acc_fused_kernel') else 'UNAVAILABLE'}"
            if info["backend"] == "gpu" else "")
    print(f"# {info['device']} ({info['backend']}), jax {info['jax']}, {name}, {args.dtype}{note}, "
          f"select {args.select}")
    rows, errors = [], []
    for impl in args.attention_impl.split(","):
        try:
            cfg, params = build(args.model, args.dtype, impl, overrides=overrides, t5=t5, tiny=args.tiny)
            module = models.get_family(cfg.family).module(cfg, head)
            for b, n in shapes:
                pred = (seq2seq.Seq2SeqPredictor if t5 else inference.Predictor)(
                    module, params, cfg, batch_size=b, length_buckets=(n,), param_dtype=args.dtype,
                    acc_variant=args.acc_variant, bucket=args.bucket, floor=floors[0],
                    prune_every=strides[0])
                plans = {}
                for s, k, f in levels:
                    plan = pred.plan(n, s, prune_every=k, floor=f)
                    if f > floors[0] and plan.keep == plans[s, k, floors[0]].keep:
                        continue  # the floor changes nothing at this level: not timed twice
                    plans[s, k, f] = plan
                    if plan.clamped_from:
                        print(f"  {b}x{n}: speedup {s:g}{_at(k, f)} exceeds the maximum: runs at {plan.analytic:.2f}")
                for settle in settles:  # the same programs timed under each settle
                    with cli.settled(settle):
                        timed = time_interleaved(pred, b, n, plans, iters=args.iters, t5=t5) if args.interleave else {}
                    dense = levels[0]
                    for (s, k, f), plan in plans.items():  # dense first
                        if (s, k, f) not in timed:
                            timed[s, k, f] = (pred.time_first_token if t5 else pred.time_program)(
                                b, n, s, iters=args.iters, prune_every=k, floor=f)
                        t, measured = timed[s, k, f], timed[dense]["median_ms"] / timed[s, k, f]["median_ms"]
                        pipe = {}
                        if "pipelined_ms" in t:  # --interleave: also with 20 calls in flight
                            m_pipe = timed[dense]["pipelined_ms"] / t["pipelined_ms"]
                            passes = programs.paired_ratios(timed[dense]["pipelined_rounds_ms"], t["pipelined_rounds_ms"])
                            pipe = {"pipelined_ms": t["pipelined_ms"], "measured_pipelined": m_pipe,
                                    "pipelined_over_analytic": m_pipe / plan.analytic,
                                    "pipelined_over_analytic_range": [passes.min() / plan.analytic, passes.max() / plan.analytic]}
                        rows.append({
                            "shape": f"{b}x{n}", "batch": b, "length": n, "impl": impl,
                            "acc_variant": args.acc_variant, "speedup": s, "prune_every": k, "floor": f,
                            "bucket": args.bucket, "analytic": plan.analytic,
                            "schedule": list(plan.keep), "median_ms": t["median_ms"], "min_ms": t["min_ms"],
                            "measured": measured, "measured_over_analytic": measured / plan.analytic,
                            "tokens_per_s": b * n / (t["median_ms"] / 1e3),
                            "label": args.label, "overrides": parse_sets(args.set), "select": args.select,
                            "settle_ms": settle,
                            **pipe,
                        })
                        # each program takes a while to compile on a GPU: show progress as it comes
                        print(f"  {b}x{n} {impl} speedup {s:g}{_at(k, f)}{f' settle={settle}' if settle else ''}: "
                              f"analytic {plan.analytic:.2f}, "
                              f"{t['median_ms']:.3f} ms, measured {measured:.2f}", flush=True)
                if args.json:  # after every shape: a run cut short (a timeout, a fault) keeps the shapes it timed
                    benchmark.write_json(args.json, {"machine": info, "model": name, "dtype": args.dtype,
                                                     "iters": args.iters, "partial": True, "rows": rows})
        except Exception as e:  # e.g. a cuDNN path this GPU/jax lacks: keep the other impls
            errors.append({"impl": impl, "error": f"{type(e).__name__}: {e}"})
            print(f"  impl {impl}: failed ({type(e).__name__}: {str(e)[:200]})")
    if capped[0] is not None and (now := benchmark.power_capped_us()) is not None:
        info["power_capped_s"] = (now - capped[0]) / 1e6  # this run's time at the GPU's power cap
        info["power_capped_of_s"] = time.perf_counter() - capped[1]
        print(f"# the GPU ran at its software power cap for {info['power_capped_s']:.1f} s of this run's "
              f"{info['power_capped_of_s']:.0f} s (nvidia-smi){'' if settles != [0] else ': --settle_ms 0,100 shows what that costs a level'}")
    torch_rows = time_torch(args, shapes, t5) if args.vs_torch and rows else []
    print()
    print(benchmark.table(rows, COLUMNS))
    for r in torch_rows:  # HF PyTorch, same shapes and weights, dense
        print(f"{r['shape']:>8} {r['impl']} (HF, dense): "
              + (f"{r['median_ms']:.3f} ms ({r['pipelined_ms']:.3f} pipelined), "
                 f"{r['tokens_per_s']:.0f} tok/s" if "error" not in r else f"n/a ({r['error'][:100]})"))
    if not rows:
        raise RuntimeError("every attention implementation failed: " + "; ".join(e["error"] for e in errors))
    return {"machine": info, "model": name, "dtype": args.dtype, "iters": args.iters,
            "measures": "encoder + cross-attention K/V + first decoder step" if t5 else "forward pass",
            "acc_impl": args.acc_impl, "acc_kernel_with_bias": kernel, "config": dict(vars(cfg)),
            "rows": rows, "torch": torch_rows, "errors": errors}


def _at(k: int, floor: int = 1) -> str:
    return (f" k={k}" if k > 1 else "") + (f" floor={floor}" if floor > 1 else "")


def time_torch(args, shapes, t5: bool) -> list[dict]:
    """HF PyTorch with the same config and float32 weights: eager (BERT: SDPA) and torch.compile."""
    cfg, params = build(args.model, "float32", "xla", overrides=parse_sets(args.set), t5=t5, tiny=args.tiny)
    timer = benchmark.time_torch_t5_first_token if t5 else benchmark.time_torch
    out = []
    for b, n in shapes:
        for compile_ in ([False, True] if args.torch_compile else [False]):
            row = {"shape": f"{b}x{n}", "impl": "torch+compile" if compile_ else "torch eager" + ("" if t5 else " (SDPA)")}
            try:
                t = timer(cfg, params, batch_size=b, length=n, dtype=args.dtype, iters=args.iters, compile=compile_)
                out.append({**row, **t, "tokens_per_s": b * n / (t["median_ms"] / 1e3)})
                print(f"  {b}x{n} {row['impl']}: {t['median_ms']:.3f} ms", flush=True)
            except Exception as e:  # torch.compile unavailable on this machine, etc.
                out.append({**row, "error": f"{type(e).__name__}: {e}"})
                print(f"  {row['impl']}: failed ({type(e).__name__}: {str(e)[:200]})")
    return out


def time_interleaved(pred, b: int, n: int, plans: dict, *, iters: int, t5: bool = False) -> dict:
    """{level: timing} with the levels' programs (``plans``: level -> plan) called in rounds
    (dense, 1.5, 2, ..., dense, ...): on a shared or throttling machine every level meets the same conditions, so
    the ratios hold where level-after-level timing drifts. Same inputs for every program.
    Each call synchronised (``median_ms``: one request at a time), then with 20 calls in flight
    (``pipelined_ms``: a server with queued requests)."""
    progs = {s: program_inputs(pred, b, n, plan, t5) for s, plan in plans.items()}
    calls = {s: functools.partial(prog, pred.params, *inputs) for s, (prog, inputs) in progs.items()}
    return {s: {**t, "schedule": plans[s].keep} for s, t in programs.time_levels(calls, iters=iters).items()}


def program_inputs(pred, b: int, n: int, plan, t5: bool) -> tuple:
    """(compiled program, its device inputs after the parameters) of an encoder classifier or
    (``t5``) a T5's encoder + first token at ``plan``, on a random full [b, n] batch (seed 0)."""
    vocab = getattr(pred.config, "vocab_size", 1000)
    ids = programs.random_batches(np.random.default_rng(0), (b, n), vocab, low=2, count=1)[0]
    if t5:
        return pred.first_token_program(b, plan), jax.device_put((ids, np.ones_like(ids)))
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return pred.program(b, plan), (jax.device_put({k: full[k] for k in pred.input_names}),)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base-uncased", help="preset (random weights) or checkpoint")
    ap.add_argument("--family", default=None, choices=["bert", "t5"],
                    help="what to time (default: the preset's family; bert for a folder)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random T5 config (CPU smoke run)")
    ap.add_argument("--shapes", default="32x128", help="BATCHxLENGTH list, e.g. 128x128,32x512")
    ap.add_argument("--batch", type=int, default=None, help="with --length: one shape instead of --shapes")
    ap.add_argument("--length", type=int, default=None, help="input tokens (all real)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--speedups", default="1.5,2,3,4,4.8", help="comma list; dense (1) always runs")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--attention_impl", default="auto",
                    help="auto, xla, cudnn; a comma list compares them")
    ap.add_argument("--acc_variant", default="plain",
                    help="plain, minus_diagonal, value_norm, or prefix (no scoring: a lower bound)")
    ap.add_argument("--acc_impl", default="auto",
                    help="ACC beside flash attention: auto (Pallas kernel where it compiles), lse, pallas")
    ap.add_argument("--bucket", type=int, default=8)
    ap.add_argument("--floor", default="1",
                    help="smallest keep-length a layer may have; a comma list times each level at each "
                         "(a floor that leaves a level's keep-lengths as the smallest floor's is not timed again)")
    ap.add_argument("--prune_every", default="1",
                    help="k > 1: only layers 1, 1 + k, ... drop rows, at the same analytic cost; a "
                         "comma list (1,2,3) times every level at each stride against one dense program")
    ap.add_argument("--vs-torch", dest="vs_torch", action="store_true",
                    help="also time HF PyTorch (eager and torch.compile)")
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set xla_attention_below=64 (repeatable)")
    ap.add_argument("--select", default="auto", choices=acc_lib.SELECT_METHODS,
                    help="how kept rows are chosen (acc.select_rows): rank counting or top_k + sort")
    ap.add_argument("--interleave", action="store_true",
                    help="time the levels in rounds (dense, 1.5, ..., dense, ...) instead of one "
                         "after another: for shared or busy machines")
    cli.add_settle(ap, many=True)  # with --interleave
    ap.add_argument("--label", default="", help="a name for this variant in the JSON rows")
    ap.add_argument("--json", default=None, help="write all rows and the machine here")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), json_path=args.json, errors=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
