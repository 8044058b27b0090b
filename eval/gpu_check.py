"""Do the attention paths agree on this device? (cuDNN flash vs XLA, ACC from lse vs probs.)

    python -m eval.gpu_check [--json out.json]

Prints relative errors; a program for a new machine, not a test. Never imports ``datasets``.
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from accjax import acc, attention, inference, models
from eval import cli


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_attention(dtype, impl, b=8, t=128, n=12, h=64, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), dtype) for _ in range(3))
    lengths = rng.integers(t // 4, t + 1, size=b)
    mask = jnp.asarray(np.arange(t)[None] < lengths[:, None])
    scale = h ** -0.5
    ref_ctx, ref_probs = attention.attention_with_probs(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, scale=scale)
    ctx, lse = jax.jit(lambda q, k, v, m: attention.fused_attention(
        q, k, v, m, scale=scale, implementation=impl, return_lse=True))(q, k, v, mask)
    ref_lse = jax.nn.logsumexp(jnp.where(mask[:, None, None, :], jnp.einsum(
        "BTNH,BSNH->BNTS", q.astype(jnp.float32), k.astype(jnp.float32)) * scale, -1e30), -1)
    a_ref = acc.acc_scores(ref_probs, mask)
    a_lse = jax.jit(lambda q, k, l, m: acc.acc_scores_from_lse(q, k, l, m, scale=scale))(q, k, lse, mask)
    m = np.asarray(mask)
    kernel = {}
    if jax.default_backend() == "gpu" and impl == "cudnn":
        for name, fn in (("v1", lambda: acc.acc_scores_fused(q, k, mask, scale=scale)),
                         ("v2_lse", lambda: acc.acc_scores_fused(q, k, mask, scale=scale, lse=lse))):
            try:
                got = jax.jit(fn)()
                kernel[f"pallas_{name}_rel_err"] = rel(np.where(m, got, 0), np.where(m, a_ref, 0))
            except Exception as e:
                kernel[f"pallas_{name}_error"] = f"{type(e).__name__}: {e}"[:200]
    keep = t // 2
    top_ref = np.asarray(acc.select_rows(a_ref, keep))
    top_lse = np.asarray(acc.select_rows(a_lse, keep))
    overlap = np.mean([len(set(x) & set(y)) / keep for x, y in zip(top_ref, top_lse)])
    valid_q = m[:, :, None, None]
    return {
        "dtype": str(jnp.dtype(dtype)), "impl": impl,
        "ctx_rel_err": rel(np.where(valid_q, ctx, 0), np.where(valid_q, ref_ctx, 0)),
        "lse_max_abs_err": float(np.abs(np.where(m[:, None, :], np.asarray(lse) - np.asarray(ref_lse), 0)).max()),
        "lse_dtype": str(lse.dtype),
        "acc_rel_err": rel(np.where(m, a_lse, 0), np.where(m, a_ref, 0)),
        "topk_overlap": float(overlap),
        **kernel,
    }


def check_model(dtype) -> dict:
    out = {}
    cfg0 = models.preset("bert-base-uncased", dtype=dtype)
    fam = models.get_family("bert")
    params = models.init_params(cfg0, "sequence_classification")
    rng = np.random.default_rng(1)
    ids = rng.integers(1, cfg0.vocab_size, (16, 128)).astype(np.int32)
    mask = (np.arange(128)[None] < rng.integers(40, 129, (16, 1))).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    res = {}
    for impl in ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",):
        cfg = cfg0.replace(attention_impl=impl)
        pred = inference.Predictor(fam.module(cfg, "sequence_classification"), params, cfg,
                                   batch_size=16, length_buckets=(128,), param_dtype=dtype)
        res[impl] = {s: pred.predict(batch, speedup=s) for s in (1.0, 3.0)}
    if "cudnn" in res:
        for s in (1.0, 3.0):
            out[f"logits_rel_err_cudnn_vs_xla_s{s:g}"] = rel(res["cudnn"][s], res["xla"][s])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.gpu_check")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    return cli.run(check, json_path=args.json)  # the --json path is checked before any work


def check() -> dict:
    """Every attention path on this device, then a whole model."""
    rows = []
    impls = ["xla", "cudnn"] if jax.default_backend() == "gpu" else ["xla"]
    for dtype in (jnp.bfloat16, jnp.float32):
        for impl in impls:
            if impl == "cudnn" and dtype == jnp.float32:
                continue  # cuDNN flash attention takes half precision only
            try:
                rows.append(check_attention(dtype, impl))
            except Exception as e:
                rows.append({"dtype": str(jnp.dtype(dtype)), "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})
    for r in rows:
        print(r)
    model = check_model("bfloat16")
    print(model)
    return {"attention": rows, "model": model}


if __name__ == "__main__":
    sys.exit(main())
