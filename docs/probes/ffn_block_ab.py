"""Probe (issues 15 and 17): a post-LN feed-forward sublayer as XLA's four kernels or as one
persistent kernel (``accjax.kernels.ffn_block``).

``--part micro``: 12 BERT-base feed-forward sublayers with distinct weights (113 MB, more than
L2) chained in one program, built through ``common.feed_forward_add_norm`` with the kernel
off and on (several tilings), each traced afresh; timed interleaved (20 calls in flight),
with the largest difference from a float32 chain and the kernel's barrier counters.

Whole BERT-base programs with the kernel off and on: ``constant_ab.py`` (its docstring has the
command; each tiling is a ``BLOCKS=...`` setting).

    PYTHONPATH=. python docs/probes/ffn_block_ab.py --part micro --rows 128,1024 --out $OUT/micro.json
    PYTHONPATH=. python docs/probes/ffn_block_ab.py --part phases --rows 128 --tilings a,k3 --out $OUT/phases.json
"""
import argparse
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from accjax import programs
from accjax.kernels import ffn_block as fb
from accjax.models import common
from eval import bench

TILINGS = {
    "a": (64, 64, 64, 64, 64, 4, 4, 3),
    "b": (64, 32, 64, 64, 64, 4, 4, 3),
    "c": (64, 64, 64, 64, 64, 8, 4, 3),
    "d": (32, 64, 64, 64, 64, 4, 4, 3),
    "e": (64, 128, 64, 128, 64, 2, 8, 3),
    "f": (128, 64, 64, 128, 64, 4, 8, 3),
    "g": (64, 64, 64, 64, 64, 4, 4, 1),
    "h": (64, 64, 128, 64, 128, 4, 4, 2),
    "i": (64, 64, 256, 64, 256, 4, 8, 2),
    # phase 1 over slices of the hidden size (partials, then bias + GELU), 96 items a phase
    "k1": (128, 128, 64, 128, 64, 16, 8, 3, 4),
    "k2": (128, 128, 64, 64, 64, 8, 8, 3, 4),
    "k3": (64, 128, 64, 128, 64, 8, 4, 3, 2),
    "k4": (128, 64, 64, 128, 64, 16, 8, 3, 2),
}


class Stack(nn.Module):
    config: object
    layers: int = 12

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        for i in range(self.layers):
            x = common.feed_forward_add_norm(
                common.dense(cfg, cfg.intermediate_size, ("embed", "mlp"), f"in{i}", activation="gelu"),
                common.dense(cfg, cfg.hidden_size, ("mlp", "embed"), f"out{i}"), common.layer_norm(cfg, f"norm{i}"),
                x, lambda y: y, dropping=False)
        return x


def micro(a, cfg, res):
    rng = np.random.default_rng(0)
    stack = Stack(cfg)
    fb.KERNEL = "never"
    x0 = jnp.zeros((8, cfg.hidden_size), jnp.bfloat16)
    params = nn.meta.unbox(stack.init(jax.random.PRNGKey(0), x0)["params"])
    params = jax.tree_util.tree_map(  # biases and norms not trivial
        lambda v: jnp.asarray(np.asarray(v, np.float32) + (0.02 * rng.standard_normal(v.shape) if v.ndim == 1 else 0),
                              jnp.bfloat16), params)
    n_prog = fb.programs_here(a.interpret)
    res["programs"] = n_prog
    for rows in (int(r) for r in a.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((rows, cfg.hidden_size)), jnp.bfloat16)
        ref = x.astype(jnp.float32)
        for i in range(12):
            p = params
            ref = fb.reference(ref, *(p[f"in{i}"][k].astype(jnp.float32) for k in ("kernel", "bias")),
                               *(p[f"out{i}"][k].astype(jnp.float32) for k in ("kernel", "bias")),
                               p[f"norm{i}"]["scale"], p[f"norm{i}"]["bias"], cfg.layer_norm_eps)
        calls, outs = {}, {}
        for name in ["xla", *a.tilings.split(",")]:
            fb.KERNEL = "never" if name == "xla" else ("interpret" if a.interpret else "auto")
            if name != "xla":
                fb.BLOCKS = TILINGS[name]
                t0 = time.time()
                _, cnt, _ = fb.ffn_block(x, *(params["in0"][k] for k in ("kernel", "bias")),
                                      *(params["out0"][k] for k in ("kernel", "bias")),
                                      params["norm0"]["scale"], params["norm0"]["bias"], eps=1e-12,
                                      programs=n_prog, blocks=TILINGS[name], interpret=a.interpret)
                print(name, rows, "counters", np.asarray(cnt).tolist(), f"{time.time() - t0:.1f}s", flush=True)
            fn = jax.jit(lambda p, x_, _n=name: stack.apply({"params": p}, x_))
            calls[name] = functools.partial(programs.compile_lowered(fn.lower(params, x), rows), params, x)
            fb.KERNEL, fb.BLOCKS = "never", TILINGS["a"]
        print("kernel available:", fb._AVAILABLE, flush=True)
        for k, c in calls.items():
            outs[k] = np.asarray(c(), np.float32)
        pipe = programs.time_interleaved(calls, rounds=a.iters, depth=20)
        for k in calls:
            row = {"rows": rows, "variant": k, "blocks": TILINGS.get(k), "pipelined_ms": float(np.median(pipe[k])),
                   "all_ms": [float(v) for v in pipe[k]],
                   "max_abs_vs_f32": float(np.abs(outs[k] - np.asarray(ref)).max()),
                   "max_abs_vs_xla": float(np.abs(outs[k] - outs["xla"]).max())}
            res["micro"].append(row)
            print(json.dumps({k2: v for k2, v in row.items() if k2 != "all_ms"}), flush=True)
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)


def phases(a, cfg, res):
    """The kernel's parts timed: 12 chained calls of ``ffn_block`` (distinct weights) with
    only its barriers, phase 1, phases 1-2, all three, all three without barriers."""
    rng = np.random.default_rng(0)
    d, f = cfg.hidden_size, cfg.intermediate_size
    n_prog = fb.programs_here(False)
    ws = [[jnp.asarray(rng.standard_normal(sh) * sc, jnp.bfloat16) for sh, sc in
           (((d, f), d ** -0.5), ((f,), 0.02), ((f, d), f ** -0.5), ((d,), 0.02), ((d,), 1.0), ((d,), 0.02))]
          for _ in range(12)]
    variants = {"barriers": (0, True, False), "p1": (1, True, False), "p12": (2, True, False),
                "p123": (3, True, False), "p123_nobar": (3, False, False), "p1_nobar": (1, False, False),
                "p123_thread": (3, True, True), "barriers_thread": (0, True, True), "empty_thread": (0, False, True)}
    variants = {k: variants[k] for k in a.variants.split(",")}
    for rows in (int(r) for r in a.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((rows, d)), jnp.bfloat16)
        calls = {}
        xla = Stack(cfg)
        fb.KERNEL = "never"
        params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.bfloat16),
                                        nn.meta.unbox(xla.init(jax.random.PRNGKey(0), x)["params"]))
        fn = jax.jit(lambda p, x_: xla.apply({"params": p}, x_))
        calls[("-", "xla")] = functools.partial(programs.compile_lowered(fn.lower(params, x), rows), params, x)
        for tiling in a.tilings.split(","):
            for name, (ph, bar, thread) in variants.items():
                def chain(ws_, x_, ph=ph, bar=bar, thread=thread, blocks=TILINGS[tiling]):
                    cnt = None
                    for w in ws_:
                        x_, _, nxt = fb.ffn_block(x_, *w, eps=1e-12, programs=n_prog, blocks=blocks, phases=ph,
                                                  barriers=bar, counters=cnt)
                        cnt = nxt if thread else None
                    return x_
                calls[(tiling, name)] = functools.partial(jax.jit(chain).lower(ws, x).compile(), ws, x)
        for c in calls.values():
            c().block_until_ready()
        pipe = programs.time_interleaved(calls, rounds=a.iters, depth=20)
        from eval import profile
        for (tiling, name), c in calls.items():
            prof = profile.profile_call(c, iters=10)
            row = {"rows": rows, "tiling": tiling, "variant": name, "pipelined_ms": float(np.median(pipe[(tiling, name)])),
                   "us_per_sublayer": float(np.median(pipe[(tiling, name)])) * 1000 / 12,
                   "device_us_per_sublayer": prof["busy_ms"] * 1000 / 12,
                   "kernels_per_sublayer": prof["kernels_per_call"] / 12,
                   "top": [(t["name"][:40], round(t["ms"] * 1000 / 12, 2)) for t in prof["top"][:4]]}
            res["phases"].append(row)
            print(json.dumps(row), flush=True)
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="micro", choices=["micro", "phases"])
    ap.add_argument("--rows", default="128,256,1024")
    ap.add_argument("--tilings", default="a,b")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variants", default="barriers,p1,p12,p123,p123_nobar,p123_thread",
                    help="--part phases: which partial kernels")
    ap.add_argument("--out", default="")
    ap.add_argument("--interpret", action="store_true", help="the kernel interpreted (a CPU dry run)")
    a = ap.parse_args()
    cfg, _ = bench.build("bert-base-uncased", "bfloat16", "auto")
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "micro": [], "phases": []}
    if a.part == "micro":
        micro(a, cfg, res)
    else:
        phases(a, cfg, res)


if __name__ == "__main__":
    main()
