"""Probe (issues 15 and 17): what a GPT-2 prefill call costs the host, with and without its KV cache.

The fortieth session's `host_enqueue.py --depth 2` took 1.1-2.5 ms of host time to enqueue one
8 x 1024 prefill (dense and 3.72x), more than the 3.72x program's device time (1.5 ms); a
BERT-base call takes about 0.3 ms. The prefill returns the KV cache (12 layers x keys, values,
mask, positions: about 50 outputs, 288 MiB dense). Here the same prefill is compiled twice,
returning (logits, cache) and logits alone, and each is timed three ways: host time to enqueue
2 and 20 calls (per call), and a synchronised call (enqueue + run + wait).

    python docs/probes/host_outputs.py --json out.json
"""
import argparse
import time

import jax
import numpy as np

from accjax import benchmark, lm, models
from host_enqueue import enqueue_times  # this folder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    cfg = models.preset("gpt2", dtype="bfloat16")
    module = models.get_family(cfg.family).module(cfg, "lm")
    ev = lm.LMEvaluator(module, models.init_params(cfg, "lm", 0), cfg, batch_size=args.batch, context=args.context,
                        continuation=0, param_dtype="bfloat16")
    x = jax.device_put(np.random.default_rng(0).integers(2, cfg.vocab_size, (args.batch, args.context)).astype(np.int32))
    rows = []
    for name, s, k, f in (("dense", 1.0, 1, 1), ("3.72x k3 F32", 3.72, 3, 32)):
        run = ev._prefill_fn(ev.plan(s, k, f).keep)
        for outputs, fn in (("logits+cache", run), ("logits", lambda p, i, run=run: run(p, i)[0])):
            prog = jax.jit(fn).lower(ev.params, x).compile()
            for _ in range(5):
                jax.block_until_ready(prog(ev.params, x))
            e2, t2 = enqueue_times(prog, ev.params, x, 2)
            e20, t20 = enqueue_times(prog, ev.params, x, 20)
            sync = []
            for _ in range(20):
                t0 = time.perf_counter()
                jax.block_until_ready(prog(ev.params, x))
                sync.append((time.perf_counter() - t0) * 1e3)
            r = {"program": name, "outputs": outputs, "n_outputs": len(jax.tree_util.tree_leaves(prog(ev.params, x))),
                 "enqueue2_ms": e2, "done2_ms": t2, "enqueue20_ms": e20, "done20_ms": t20,
                 "sync_ms": float(np.median(sync))}
            rows.append(r)
            print(f"{name:>13} {outputs:>12} ({r['n_outputs']:2d} outputs): enqueue 2: {e2:.3f} "
                  f"(done {t2:.3f}), 20: {e20:.3f} (done {t20:.3f}), synchronised {r['sync_ms']:.3f} ms/call")
    if args.json:
        benchmark.write_json(args.json, {"machine": benchmark.machine(), "rows": rows})


if __name__ == "__main__":
    main()
