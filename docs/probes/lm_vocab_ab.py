"""Probe (issues 15 and 17): GPT-2's LM head table padded once by serving (``generate.VOCAB_MULTIPLE``)
or as stored (0), which XLA then pads inside every program for cuBLAS (50257 rows: not a multiple
of 8). Builds GPT-2 (preset, random weights, bf16) prefill programs (``lm.LMEvaluator``, B x T at
each speedup, as ``eval.lm --bench``) and generation programs (``generate.Generator``, B x T prompts,
M tokens, no end token) both ways in one process and times them interleaved: synchronised medians,
and for prefills two pipelined sets (20 calls in flight); with the largest logit difference.

    PYTHONPATH=. python docs/probes/lm_vocab_ab.py --out $OUT/lm_vocab.json
"""
import argparse
import functools
import json

import jax
import numpy as np

from accjax import generate, lm, models, programs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--multiples", default="0,128")
    ap.add_argument("--prefill", default="8x1024", help="B x T of the prefill programs")
    ap.add_argument("--speedups", default="1,2,3.72")
    ap.add_argument("--generate", default="1x128x1,1x128x33,8x128x1,8x128x33", help="B x T x M cases")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cfg = models.preset("gpt2", dtype="bfloat16")
    module = models.get_family(cfg.family).module(cfg, "lm")
    params = models.init_params(cfg, "lm", 0)
    rng = np.random.default_rng(0)
    b, t = (int(x) for x in a.prefill.split("x"))
    ids = jax.device_put(rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32))
    prefills, gens, firsts = {}, {}, {}
    for mult in (int(x) for x in a.multiples.split(",")):
        generate.VOCAB_MULTIPLE = mult
        ev = lm.LMEvaluator(module, params, cfg, batch_size=b, context=t, continuation=0, param_dtype="bfloat16")
        for s in (float(x) for x in a.speedups.split(",")):
            prefills[(mult, s)] = functools.partial(ev.prefill_program(ev.schedule(s)), ev.params, ids)
        gen = generate.Generator(module, params, cfg, param_dtype="bfloat16")
        for case in a.generate.split(","):
            gb, gt, m = (int(x) for x in case.split("x"))
            prog = gen.program(gb, gen.plan(gt, 1.0), m, True, 0, None, 0)
            x = jax.device_put(rng.integers(0, cfg.vocab_size, (gb, gt)).astype(np.int32))
            gens[(mult, case)] = functools.partial(prog, gen.params, x, jax.numpy.ones_like(x), jax.random.PRNGKey(0),
                                                   jax.numpy.float32(1.0))
    for k, call in prefills.items():
        firsts[k] = np.asarray(call()[0], np.float32)
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": []}
    sync = programs.time_interleaved(prefills, rounds=a.iters)
    pipe = [programs.time_interleaved(prefills, rounds=max(3, a.iters // 4), depth=20) for _ in range(2)]
    first_mult = next(iter(prefills))[0]
    for (mult, s) in prefills:
        row = {"program": f"prefill {a.prefill}", "vocab_multiple": mult, "speedup": s,
               "sync_ms": float(np.median(sync[(mult, s)])),
               "pipelined_ms": [float(np.median(p[(mult, s)])) for p in pipe],
               "max_abs_logit_diff_vs_first": float(np.abs(firsts[(mult, s)] - firsts[(first_mult, s)]).max())}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    gsync = programs.time_interleaved(gens, rounds=max(5, a.iters // 3))
    for (mult, case) in gens:
        row = {"program": f"generate {case}", "vocab_multiple": mult, "sync_ms": float(np.median(gsync[(mult, case)]))}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
