"""Probe (issues 15 and 17): encoder programs with one-row products as XLA rewrites them or on two
rows (``common.ONE_ROW_PRODUCTS``). At batch 1 BERT's pooler, and the layers of an eliminating
program that keep one row, multiply one row by a weight; this builds BERT-base (random weights,
bf16) programs per mode and level, each traced afresh, and times them interleaved (synchronised
median, and 20 calls in flight), with the largest logit difference against the first mode.

    PYTHONPATH=. python docs/probes/one_row_ab.py --shapes 1x128 --speedups 1,4.8 --out $OUT/one_row.json
"""
import argparse
import functools
import json

import jax
import numpy as np

from accjax import inference, models, programs
from accjax.models import common
from eval import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert-base-uncased")
    ap.add_argument("--shapes", default="1x128")
    ap.add_argument("--speedups", default="1,4.8")
    ap.add_argument("--modes", default="off,fused")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cfg, params = bench.build(a.model, "bfloat16", "auto")
    module = models.get_family(cfg.family).module(cfg, "sequence_classification")
    default = common.ONE_ROW_PRODUCTS
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": []}
    for shape in a.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        calls, outs = {}, {}
        for mode in a.modes.split(","):
            common.ONE_ROW_PRODUCTS = mode
            try:
                pred = inference.Predictor(module, params, cfg, batch_size=b, length_buckets=(n,),
                                           param_dtype="bfloat16")
                for s in (float(x) for x in a.speedups.split(",")):
                    prog, inputs = bench.program_inputs(pred, b, n, pred.plan(n, s), False)
                    calls[(mode, s)] = functools.partial(prog, pred.params, *inputs)
            finally:
                common.ONE_ROW_PRODUCTS = default
        for k, c in calls.items():
            outs[k] = np.asarray(jax.tree_util.tree_leaves(c())[0], np.float32)
        sync = programs.time_interleaved(calls, rounds=a.iters)
        pipe = programs.time_interleaved(calls, rounds=max(3, a.iters // 4), depth=20)
        first = a.modes.split(",")[0]
        for (mode, s) in calls:
            row = {"shape": shape, "mode": mode, "speedup": s, "sync_ms": float(np.median(sync[(mode, s)])),
                   "pipelined_ms": float(np.median(pipe[(mode, s)])),
                   "max_abs_diff_vs_first": float(np.abs(outs[(mode, s)] - outs[(first, s)]).max())}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
