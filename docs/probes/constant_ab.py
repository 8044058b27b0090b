"""Probe: BERT-base programs (random weights, bf16) built with a library module constant at each
of several values, each traced afresh, timed interleaved (synchronised median and 20 calls in
flight, two pipelined sets), with the largest logit difference against the first value.

    PYTHONPATH=. python docs/probes/constant_ab.py --constant accjax.kernels.layer_norm.SPLIT \
        --values 2,1 --shapes 1x128,8x128 --speedups 1,4.8 --out $OUT/ab.json
"""
import argparse
import ast
import functools
import importlib
import json

import jax
import numpy as np

from accjax import inference, models, programs
from eval import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--constant", required=True, help="module.path.NAME")
    ap.add_argument("--values", required=True, help="comma list of Python literals")
    ap.add_argument("--model", default="bert-base-uncased")
    ap.add_argument("--shapes", default="1x128")
    ap.add_argument("--speedups", default="1,4.8")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    mod_name, name = a.constant.rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    values = [ast.literal_eval(v) for v in a.values.split(",")]
    default = getattr(mod, name)
    cfg, params = bench.build(a.model, "bfloat16", "auto")
    module = models.get_family(cfg.family).module(cfg, "sequence_classification")
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "constant": a.constant, "rows": []}
    for shape in a.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        calls, outs = {}, {}
        for v in values:
            setattr(mod, name, v)
            try:  # programs are compiled (traced) while the value is set
                pred = inference.Predictor(module, params, cfg, batch_size=b, length_buckets=(n,),
                                           param_dtype="bfloat16")
                for s in (float(x) for x in a.speedups.split(",")):
                    prog, inputs = bench.program_inputs(pred, b, n, pred.plan(n, s), False)
                    calls[(repr(v), s)] = functools.partial(prog, pred.params, *inputs)
            finally:
                setattr(mod, name, default)
        for k, c in calls.items():
            outs[k] = np.asarray(jax.tree_util.tree_leaves(c())[0], np.float32)
        sync = programs.time_interleaved(calls, rounds=a.iters)
        pipe = [programs.time_interleaved(calls, rounds=max(3, a.iters // 4), depth=20) for _ in range(2)]
        for (v, s) in calls:
            row = {"shape": shape, "value": v, "speedup": s, "sync_ms": float(np.median(sync[(v, s)])),
                   "pipelined_ms": [float(np.median(p[(v, s)])) for p in pipe],
                   "max_abs_diff_vs_first": float(np.abs(outs[(v, s)] - outs[(repr(values[0]), s)]).max())}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
