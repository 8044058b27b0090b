"""Probe (issues 15 and 17): a generation program's GEMMs on cuBLAS or on XLA's Triton GEMMs.

``programs.compiler_options`` turns XLA's Triton GEMMs off unless a program's GEMMs average at
most ``TRITON_GEMM_MAX_ROWS`` rows; ``generate.decoding_rows`` is what a Generator program
reports. This builds GPT-2 (preset, random weights, bf16) generation programs both ways in one
process and times them interleaved (median of synchronised calls), at several (batch, prompt,
tokens), and says which the rule picks. ``--profile BxTxM``: kernels of one program, by name
(Triton GEMMs, one-row products as XLA rewrites them and on two rows, ``common.ONE_ROW_PRODUCTS``).
``--variants triton,triton_fused,...``: programs by GEMM back end and one-row mode, interleaved.
``--model flan-t5-base``: a T5's generation programs (``seq2seq.generate_tokens``, encoder at
``--speedup``) instead.

    PYTHONPATH=. python docs/probes/gen_rows_ab.py --out $OUT/gen_rows.json
    PYTHONPATH=. python docs/probes/gen_rows_ab.py --model flan-t5-base --speedup 4 --cases 16x512x33
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from accjax import generate, models, programs, seq2seq
from accjax.models import common


_MIN_WEIGHTS = common.ONE_ROW_MIN_WEIGHTS


def one_row(mode: str):
    """``common.ONE_ROW_PRODUCTS`` (MODE, or MODE:N to set ``ONE_ROW_MIN_WEIGHTS`` to N) for the
    programs traced next (each variant is traced afresh: jax's trace cache would otherwise hand a
    second variant the first one's program)."""
    mode, _, n = mode.partition(":")
    if mode not in ("off", "fused", "barrier"):
        raise SystemExit(f"unknown one-row mode {mode!r}: off, fused or barrier (e.g. triton_fused:1048576)")
    common.ONE_ROW_PRODUCTS, common.ONE_ROW_MIN_WEIGHTS = mode, int(n) if n else _MIN_WEIGHTS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x128x33,8x128x33,1x512x33,8x512x33,32x128x33,16x128x65")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--profile", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--model", default="gpt2", help="gpt2 (a decoder) or a T5 preset (flan-t5-base)")
    ap.add_argument("--speedup", type=float, default=1.0, help="the prefill's (T5: the encoder's) plan")
    ap.add_argument("--variants", default="",
                    help="compare variants instead: comma list of BACKEND[_MODE[:N]], BACKEND cublas or "
                         "triton, MODE a common.ONE_ROW_PRODUCTS value (default off), N its minimum weights")
    a = ap.parse_args()
    cfg = models.preset(a.model, dtype="bfloat16")
    t5 = cfg.family == "t5"
    module = models.get_family(cfg.family).module(cfg, "lm")
    gen = (seq2seq.Seq2SeqPredictor if t5 else generate.Generator)(
        module, models.init_params(cfg, "lm", 0), cfg, param_dtype="bfloat16")
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "model": a.model,
           "speedup": a.speedup, "threshold": programs.TRITON_GEMM_MAX_ROWS, "rows": []}
    rng = np.random.default_rng(0)
    default_mode = common.ONE_ROW_PRODUCTS

    def program_fn(plan, m):
        if t5:
            return lambda p, ids, mask, rng_, temp: seq2seq.generate_tokens(
                module, p, ids, mask, rng_, schedule=plan.schedule, max_new_tokens=m)
        return generate.generate_fn(module, schedule=plan.schedule, max_new_tokens=m, greedy=True,
                                    eos_token_id=None, pad_token_id=0)

    def tokens(out):
        return np.asarray(out if t5 else out["tokens"])

    def build(b, t, m, rows, mode="off"):
        plan = gen.plan(t, a.speedup)
        fn = program_fn(plan, m)
        ids = jnp.asarray(rng.integers(2, cfg.vocab_size, (b, t)), jnp.int32)
        args = (gen.params, ids, jnp.ones_like(ids), jax.random.PRNGKey(0), jnp.float32(1.0))
        one_row(mode)
        try:
            low = jax.jit(fn).lower(*args)
        finally:
            one_row(default_mode)
        return programs.compile_lowered(low, rows), args, plan

    if a.variants:
        # NAME[_MODE]: cublas or triton GEMMs; MODE a common.ONE_ROW_PRODUCTS value (default off)
        names = a.variants.split(",")
        for case in a.cases.split(","):
            b, t, m = (int(x) for x in case.split("x"))
            plan = gen.plan(t, a.speedup)
            ids = jnp.asarray(rng.integers(2, cfg.vocab_size, (b, t)), jnp.int32)
            args = (gen.params, ids, jnp.ones_like(ids), jax.random.PRNGKey(0), jnp.float32(1.0))
            progs, refused = {}, {}
            for n in names:
                back, _, mode = n.partition("_")
                one_row(mode or "off")
                try:
                    low = jax.jit(program_fn(plan, m)).lower(*args)
                    progs[n] = low.compile({"xla_gpu_enable_triton_gemm": False} if back == "cublas" else None)
                except Exception as e:  # an option this jaxlib does not know
                    refused[n] = f"{type(e).__name__}: {str(e)[:200]}"
                finally:
                    one_row(default_mode)
            names = [n for n in names if n in progs]
            times = {n: [] for n in names}
            for p in progs.values():
                jax.block_until_ready(p(*args))
            for _ in range(a.rounds):
                for n, p in progs.items():
                    for _ in range(a.calls):
                        t0 = time.perf_counter()
                        jax.block_until_ready(p(*args))
                        times[n].append((time.perf_counter() - t0) * 1e3)
            toks = {n: tokens(p(*args)) for n, p in progs.items()}
            row = {"case": case, "refused": refused, **{f"{n}_ms": float(np.median(v)) for n, v in times.items()},
                   "same_tokens_as_first": {n: bool((toks[n] == toks[names[0]]).all()) for n in names},
                   "first_differing_token": {n: int(np.argmax((toks[n] != toks[names[0]]).any(0)))
                                             if (toks[n] != toks[names[0]]).any() else None for n in names}}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            if a.out:
                json.dump(res, open(a.out, "w"), indent=1)
        return
    for case in a.cases.split(","):
        b, t, m = (int(x) for x in case.split("x"))
        cub, args, plan = build(b, t, m, None, default_mode)
        tri, _, _ = build(b, t, m, 1.0, default_mode)
        want = generate.decoding_rows(b, plan, m)
        times = {"cublas": [], "triton": []}
        for p in (cub, tri):
            jax.block_until_ready(p(*args))
        for _ in range(a.rounds):
            for name, p in (("cublas", cub), ("triton", tri)):
                for _ in range(a.calls):
                    t0 = time.perf_counter()
                    jax.block_until_ready(p(*args))
                    times[name].append((time.perf_counter() - t0) * 1e3)
        same = bool((tokens(cub(*args)) == tokens(tri(*args))).all())
        row = {"case": case, "rows": want, "rule": "triton" if want <= programs.TRITON_GEMM_MAX_ROWS else "cublas",
               "cublas_ms": float(np.median(times["cublas"])), "triton_ms": float(np.median(times["triton"])),
               "cublas_minmax": [min(times["cublas"]), max(times["cublas"])],
               "triton_minmax": [min(times["triton"]), max(times["triton"])], "same_tokens": same}
        row["triton_over_cublas"] = row["triton_ms"] / row["cublas_ms"]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)
    if a.profile:
        from eval.profile import profile_call

        b, t, m = (int(x) for x in a.profile.split("x"))
        for name, rows, mode in (("triton", 1.0, "off"), ("triton_fused", 1.0, "fused"),
                                 ("triton_barrier", 1.0, "barrier")):
            p, args, _ = build(b, t, m, rows, mode)
            r = profile_call(lambda: p(*args), iters=3)
            res[f"profile_{name}"] = {k: r[k] for k in ("wall_ms", "busy_ms", "gap_ms", "kernels_per_call",
                                                        "by_kind_ms", "top")}
            print(name, json.dumps(res[f"profile_{name}"])[:3000], flush=True)
            if a.out:
                json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
