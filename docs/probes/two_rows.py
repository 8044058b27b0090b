"""Probe (not a test, asserts nothing): single-sequence decoding on a GPU with one row
(XLA's one-row products) against two identical rows (``generate.TWO_ROW_BACKENDS``), in one
process, interleaved. Flan-T5-base 1 x 512 -> 32 tokens (1x and 4x) and its first token (4x);
GPT-2 1 x 512 -> 32 tokens (1x and 3.72x) and one token (1x); bf16, random weights, EOS never
matched so every program runs all its steps. Also counts the tokens the two agree on.

    PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false OUT=/tmp python docs/probes/two_rows.py [t5] [gpt2]
    SMOKE=1 ROUNDS=2 PYTHONPATH=. python docs/probes/two_rows.py   # CPU, tiny lengths, rows forced

Writes ``$OUT/tworow.json`` (machine, median/min/max ms a call per program and row count,
two sets) after each model.
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from accjax import benchmark, generate, programs, seq2seq
from eval import cli

OUT = os.environ.get("OUT", "/tmp")
ROUNDS = int(os.environ.get("ROUNDS", "15"))
T0 = time.time()
res = {"machine": benchmark.machine(), "rounds": ROUNDS, "rows": []}
ON = ("cpu",) if os.environ.get("SMOKE") else ("gpu", "cuda", "rocm")  # the backends "two" names
LEN, M = (32, 4) if os.environ.get("SMOKE") else (512, 32)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    with open(os.path.join(OUT, "tworow.json"), "w") as f:
        json.dump(res, f, indent=1, default=benchmark.json_default)


def summary(k, ts):
    return {"median_ms": float(np.median(ts)), "min_ms": float(np.min(ts)), "max_ms": float(np.max(ts))}


def t5_part(length=LEN, m=M):
    cfg, params = cli.model("flan-t5-base", "lm", seed=0, dtype="bfloat16", eos_token_id=-7)
    from accjax import models
    module = models.get_family("t5").module(cfg, "lm")
    log("t5 built", jax.devices()[0].device_kind)
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (1, length)).astype(np.int32)
    ids, mask = jax.device_put(ids), jax.device_put(np.ones_like(ids))
    calls, toks = {}, {}
    for rows, backends in (("one", ()), ("two", ON)):
        generate.TWO_ROW_BACKENDS = backends
        pred = seq2seq.Seq2SeqPredictor(module, params, cfg, batch_size=1, length_buckets=(length,),
                                        param_dtype="bfloat16")
        for s in (1.0, 4.0):
            plan = pred.plan(length, s)
            g = pred.generate_program(1, plan, max_new_tokens=m)
            key = jax.random.PRNGKey(0)
            calls[("t5", s, "gen32", rows)] = (lambda g=g, p=pred: g(p.params, ids, mask, key))
            if s > 1:
                f = pred.first_token_program(1, plan)
                calls[("t5", s, "first", rows)] = (lambda f=f, p=pred: f(p.params, ids, mask))
            toks[(s, rows)] = np.asarray(g(pred.params, ids, mask, key))
            log("t5 compiled", rows, s, plan.schedule)
    generate.TWO_ROW_BACKENDS = ON
    for s in (1.0, 4.0):
        res.setdefault("t5_same_tokens", {})[str(s)] = int((toks[(s, "one")] == toks[(s, "two")]).sum())
    return calls


def gpt2_part(length=LEN, m=M):
    cfg, params = cli.model("gpt2", "lm", seed=0, dtype="bfloat16")
    from accjax import models
    module = models.get_family("gpt2").module(cfg, "lm")
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, length)).astype(np.int32)
    ids, mask = jax.device_put(ids), jax.device_put(np.ones_like(ids))
    calls, toks = {}, {}
    for rows, backends in (("one", ()), ("two", ON)):
        generate.TWO_ROW_BACKENDS = backends
        gen = generate.Generator(module, params, cfg, param_dtype="bfloat16")
        for s in (1.0, 3.72):
            plan = gen.plan(length, s)
            for mm in ((1, m) if rows == "one" and s == 1.0 else (m,)):
                p = gen.program(1, plan, mm, True, 0, None, 0)
                calls[("gpt2", s, f"gen{mm}", rows)] = (lambda p=p, g=gen: p(g.params, ids, mask, jax.random.PRNGKey(0),
                                                                              jnp.float32(1.0))["tokens"])
            toks[(s, rows)] = np.asarray(calls[("gpt2", s, f"gen{m}", rows)]())
            log("gpt2 compiled", rows, s, plan.schedule)
    generate.TWO_ROW_BACKENDS = ON
    for s in (1.0, 3.72):
        res.setdefault("gpt2_same_tokens", {})[str(s)] = int((toks[(s, "one")] == toks[(s, "two")]).sum())
    return calls


def main():
    parts = sys.argv[1:] or ["t5", "gpt2"]
    for part in parts:
        calls = (t5_part if part == "t5" else gpt2_part)()
        for rep in range(2):
            times = programs.time_interleaved(calls, rounds=ROUNDS, warmup=2)
            for k, ts in times.items():
                row = {"model": k[0], "speedup": k[1], "program": k[2], "rows": k[3], "set": rep, **summary(k, ts)}
                res["rows"].append(row)
                log(row)
            save()
        res[part + "_same_tokens"] = res.get(part + "_same_tokens")
        save()
    log("done")


if __name__ == "__main__":
    main()
