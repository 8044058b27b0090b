"""Probe (issues 15 and 17): what a decoded token costs at batch 1, by loop form.

``generate.generate_fn`` decodes in a ``lax.while_loop`` whose condition (steps left and a row
not done) is data-dependent. On a GPU, XLA's while thunk copies that predicate to the host
after every step and waits for it, so the host launches each step's kernels only after the
previous step has finished. This probe times whole generation programs (GPT-2 preset, random
weights, bf16) at two lengths and reports the cost of one more token:

  while    the loop as committed;
  fixed    a ``lax.fori_loop`` over the steps (a known trip count: no predicate to copy);
  chunkK   the while loop over chunks of K steps, each chunk a ``fori_loop``.

With no EOS (``eos_token_id=None``) all three compute the same tokens (checked). Run it once
per XLA_FLAGS setting to compare command-buffer options::

    PYTHONPATH=. python docs/probes/decode_loop.py --out $OUT/decode_default.json
    XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE \
        PYTHONPATH=. python docs/probes/decode_loop.py --out $OUT/decode_while_cmd.json
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from accjax import generate, models, programs


class _Loop:
    """Stands in for ``jax.lax`` inside ``generate``: its ``while_loop`` runs ``form``."""

    def __init__(self, form: str):
        self.form = form

    def __getattr__(self, name):
        return getattr(lax, name)

    def while_loop(self, cond, body, state):
        m = cond.m
        if self.form == "fixed":
            return lax.fori_loop(1, m, lambda _, s: body(s), state)
        k = int(self.form[len("chunk"):])
        assert (m - 1) % k == 0, (m, k)

        def chunk(s):
            return lax.fori_loop(0, k, lambda _, t: body(t), s)
        return lax.while_loop(cond, chunk, state)


_decoding = generate.decoding


def decoding(m):
    f = _decoding(m)
    f.m = m
    return f


def timed(fn, args, iters: int) -> list[float]:
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", default="33,161")
    ap.add_argument("--forms", default="while,fixed,chunk8,chunk32")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="")
    ap.add_argument("--options", default="xla", choices=("xla", "project"),
                    help="xla: XLA's defaults; project: programs.compile_lowered, as Generator compiles")
    ap.add_argument("--profile", action="store_true",
                    help="also trace the longer program of each form: kernels per call, busy ms, top kernels")
    a = ap.parse_args()
    cfg = models.preset(a.model, dtype=a.dtype)
    module = models.get_family(cfg.family).module(cfg, "lm")
    params = models.init_params(cfg, "lm", 0)
    gen = generate.Generator(module, params, cfg, param_dtype=a.dtype)
    generate.decoding = decoding
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": []}
    toks = [int(x) for x in a.tokens.split(",")]
    rng = np.random.default_rng(0)
    for b in [int(x) for x in a.batches.split(",")]:
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, a.prompt)), jnp.int32)
        mask = jnp.ones_like(ids)
        plan = gen.plan(a.prompt, 1.0)
        ref = {}
        for form in a.forms.split(","):
            generate.lax = lax if form == "while" else _Loop(form)
            row = {"batch": b, "form": form}
            for m in toks:
                fn = generate.generate_fn(module, schedule=plan.schedule, max_new_tokens=m, greedy=True,
                                          eos_token_id=None, pad_token_id=0)
                t0 = time.perf_counter()
                lowered = jax.jit(fn).lower(gen.params, ids, mask, jax.random.PRNGKey(0), jnp.float32(1.0))
                prog = programs.compile_lowered(lowered) if a.options == "project" else lowered.compile()
                row[f"compile_s_{m}"] = round(time.perf_counter() - t0, 2)
                args = (gen.params, ids, mask, jax.random.PRNGKey(0), jnp.float32(1.0))
                ts = timed(prog, args, a.iters)
                row[f"ms_{m}"] = float(np.median(ts))
                row[f"ms_{m}_minmax"] = [float(min(ts)), float(max(ts))]
                tokens = np.asarray(prog(*args)["tokens"])
                if m in ref:
                    row[f"same_tokens_{m}"] = bool((tokens == ref[m]).all())
                else:
                    ref[m] = tokens
            row["ms_per_token"] = (row[f"ms_{toks[1]}"] - row[f"ms_{toks[0]}"]) / (toks[1] - toks[0])
            row["options"] = a.options
            if a.profile:
                from eval.profile import profile_call

                r = profile_call(lambda: prog(*args), iters=3)
                row["profile"] = {k: r[k] for k in ("wall_ms", "busy_ms", "gap_ms", "kernels_per_call",
                                                    "by_kind_ms", "top")}
            generate.lax = lax
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
