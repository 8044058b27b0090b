"""Probe (issues 15 and 17): a generation program's GEMMs on cuBLAS or on XLA's Triton GEMMs.

``programs.compiler_options`` turns XLA's Triton GEMMs off unless a program's GEMMs average at
most ``TRITON_GEMM_MAX_ROWS`` rows; ``generate.decoding_rows`` is what a Generator program
reports. This builds GPT-2 (preset, random weights, bf16) generation programs both ways in one
process and times them interleaved (median of synchronised calls), at several (batch, prompt,
tokens), and says which the rule picks. ``--profile B,T,M``: kernels of one program, by name.

    PYTHONPATH=. python docs/probes/gen_rows_ab.py --out $OUT/gen_rows.json
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from accjax import generate, models, programs


_dot_general = jax.lax.dot_general


def two_row_dot_general(lhs, rhs, dimension_numbers, *args, **kw):  # noqa: D401
    """lax.dot_general, but a product whose lhs has one row (every free axis of size 1, no batch
    axes) runs on that row twice behind an optimization barrier and keeps the first: XLA then
    sees a matrix, not a vector it would rewrite as a multiply-reduce."""
    (lc, rc), (lb, rb) = dimension_numbers
    free = [d for d in range(lhs.ndim) if d not in lc]
    if lb or rb or not free or any(lhs.shape[d] != 1 for d in free) or rhs.size < 2 ** 16:
        return _dot_general(lhs, rhs, dimension_numbers, *args, **kw)
    two = jax.lax.optimization_barrier(jnp.concatenate([lhs, lhs], axis=free[0]))
    out = jax.lax.optimization_barrier(_dot_general(two, rhs, dimension_numbers, *args, **kw))
    return jax.lax.slice_in_dim(out, 0, 1, axis=0)  # (the barrier keeps XLA from slicing the lhs instead)


def patch_two_rows(on: bool):
    import jax._src.lax.lax as lax_impl

    f = two_row_dot_general if on else _dot_general
    jax.lax.dot_general = f
    lax_impl.dot_general = f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x128x33,8x128x33,1x512x33,8x512x33,32x128x33,16x128x65")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--profile", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--variants", default="",
                    help="compare compile-option sets instead: comma list of cublas, triton, cublas_nosr, "
                         "triton_nosr (nosr: xla_gpu_enable_dot_strength_reduction off)")
    a = ap.parse_args()
    cfg = models.preset("gpt2", dtype="bfloat16")
    module = models.get_family(cfg.family).module(cfg, "lm")
    gen = generate.Generator(module, models.init_params(cfg, "lm", 0), cfg, param_dtype="bfloat16")
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "threshold": programs.TRITON_GEMM_MAX_ROWS, "rows": []}
    rng = np.random.default_rng(0)

    def build(b, t, m, rows):
        plan = gen.plan(t, 1.0)
        fn = generate.generate_fn(module, schedule=plan.schedule, max_new_tokens=m, greedy=True,
                                  eos_token_id=None, pad_token_id=0)
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
        args = (gen.params, ids, jnp.ones_like(ids), jax.random.PRNGKey(0), jnp.float32(1.0))
        low = jax.jit(fn).lower(*args)
        return programs.compile_lowered(low, rows), args, plan

    if a.variants:
        sets = {"cublas": {"xla_gpu_enable_triton_gemm": False}, "triton": {},
                "cublas_nosr": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_dot_strength_reduction": False},
                "triton_nosr": {"xla_gpu_enable_dot_strength_reduction": False},
                "cublas_2row": {"xla_gpu_enable_triton_gemm": False}, "triton_2row": {}}
        names = a.variants.split(",")
        for case in a.cases.split(","):
            b, t, m = (int(x) for x in case.split("x"))
            plan = gen.plan(t, 1.0)
            fn = generate.generate_fn(module, schedule=plan.schedule, max_new_tokens=m, greedy=True,
                                      eos_token_id=None, pad_token_id=0)
            ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
            args = (gen.params, ids, jnp.ones_like(ids), jax.random.PRNGKey(0), jnp.float32(1.0))
            progs = {}
            for n in names:
                patch_two_rows(n.endswith("_2row"))
                progs[n] = jax.jit(fn).lower(*args).compile(sets[n] or None)
                patch_two_rows(False)
            times = {n: [] for n in names}
            for p in progs.values():
                jax.block_until_ready(p(*args))
            for _ in range(a.rounds):
                for n, p in progs.items():
                    for _ in range(a.calls):
                        t0 = time.perf_counter()
                        jax.block_until_ready(p(*args))
                        times[n].append((time.perf_counter() - t0) * 1e3)
            toks = {n: np.asarray(p(*args)["tokens"]) for n, p in progs.items()}
            row = {"case": case, **{f"{n}_ms": float(np.median(v)) for n, v in times.items()},
                   "same_tokens_as_first": {n: bool((toks[n] == toks[names[0]]).all()) for n in names}}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            if a.out:
                json.dump(res, open(a.out, "w"), indent=1)
        return
    for case in a.cases.split(","):
        b, t, m = (int(x) for x in case.split("x"))
        cub, args, plan = build(b, t, m, None)
        tri, _, _ = build(b, t, m, 1.0)
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
        same = bool((np.asarray(cub(*args)["tokens"]) == np.asarray(tri(*args)["tokens"])).all())
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
        for name, rows in (("cublas", None), ("triton", 1.0)):
            p, args, _ = build(b, t, m, rows)
            r = profile_call(lambda: p(*args), iters=3)
            res[f"profile_{name}"] = {k: r[k] for k in ("wall_ms", "busy_ms", "gap_ms", "kernels_per_call",
                                                        "by_kind_ms", "top")}
            print(name, json.dumps(res[f"profile_{name}"])[:3000], flush=True)
            if a.out:
                json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
