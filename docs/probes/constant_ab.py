"""Probe: BERT-base programs (random weights, bf16) built under several settings of library module
constants, each traced afresh, timed interleaved (synchronised median and 20 calls in flight, two
pipelined sets), with the largest logit difference against the first setting. A setting is
``;``-separated ``NAME=literal`` assignments to constants of ``--module``; a name written
``cfg.FIELD`` replaces that field of the model's config instead (same parameters), and an
empty setting ``''`` is the code as it stands.

    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.kernels.layer_norm \
        --settings 'SPLIT=2' 'SPLIT=1' --shapes 1x128,8x128 --speedups 1,4.8 --out $OUT/ab.json
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.models.common \
        --settings 'ONE_ROW_PRODUCTS="off"' 'ONE_ROW_PRODUCTS="fused"' --shapes 1x128
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.kernels.ffn_block \
        --settings 'KERNEL="never"' 'KERNEL="auto";BLOCKS=(64,64,64,64,64,4,4,3)' --shapes 1x128,8x128
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.models.common \
        --settings '' 'cfg.hidden_act="gelu_new"' --shapes 1x128,8x128,128x128
"""
import argparse
import ast
import dataclasses
import functools
import importlib
import json

import jax
import numpy as np

from accjax import inference, models, programs
from eval import bench


def parse(setting: str) -> dict:
    out = {}
    for part in filter(None, setting.split(";")):
        name, value = part.split("=", 1)
        out[name.strip()] = ast.literal_eval(value.strip())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", required=True, help="e.g. accjax.models.common")
    ap.add_argument("--settings", nargs="+", required=True, help="each 'NAME=literal[;NAME=literal...]'")
    ap.add_argument("--model", default="bert-base-uncased")
    ap.add_argument("--shapes", default="1x128")
    ap.add_argument("--speedups", default="1,4.8")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    mod = importlib.import_module(a.module)
    settings = [parse(s) for s in a.settings]
    cfg, params = bench.build(a.model, "bfloat16", "auto")
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "module": a.module, "rows": []}
    for shape in a.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        calls, outs = {}, {}
        for label, setting in zip(a.settings, settings):
            fields = {k[4:]: v for k, v in setting.items() if k.startswith("cfg.")}
            consts = {k: v for k, v in setting.items() if not k.startswith("cfg.")}
            cfg_s = dataclasses.replace(cfg, **fields)
            module_s = models.get_family(cfg_s.family).module(cfg_s, "sequence_classification")
            saved = {k: getattr(mod, k) for k in consts}
            for k, v in consts.items():
                setattr(mod, k, v)
            jax.clear_caches()  # jitted helpers (kernels' wrappers) read constants when traced
            try:  # programs are compiled (traced) while the setting holds
                pred = inference.Predictor(module_s, params, cfg_s, batch_size=b, length_buckets=(n,),
                                           param_dtype="bfloat16")
                for s in (float(x) for x in a.speedups.split(",")):
                    prog, inputs = bench.program_inputs(pred, b, n, pred.plan(n, s), False)
                    calls[(label, s)] = functools.partial(prog, pred.params, *inputs)
            finally:
                for k, v in saved.items():
                    setattr(mod, k, v)
                jax.clear_caches()  # (so later programs, the float32 reference too, see the code as it stands)
        for k, c in calls.items():
            outs[k] = np.asarray(jax.tree_util.tree_leaves(c())[0], np.float32)
        ref = {}  # the code as it stands in float32: what 16-bit rounding moves the logits by
        cfg32 = dataclasses.replace(cfg, dtype="float32")
        pred32 = inference.Predictor(models.get_family(cfg.family).module(cfg32, "sequence_classification"),
                                     params, cfg32, batch_size=b, length_buckets=(n,), param_dtype="float32")
        for s in (float(x) for x in a.speedups.split(",")):
            prog, inputs = bench.program_inputs(pred32, b, n, pred32.plan(n, s), False)
            ref[s] = np.asarray(jax.tree_util.tree_leaves(prog(pred32.params, *inputs))[0], np.float32)
        sync = programs.time_interleaved(calls, rounds=a.iters)
        pipe = [programs.time_interleaved(calls, rounds=max(3, a.iters // 4), depth=20) for _ in range(2)]
        for (label, s) in calls:
            row = {"shape": shape, "setting": label, "speedup": s, "sync_ms": float(np.median(sync[(label, s)])),
                   "pipelined_ms": [float(np.median(p[(label, s)])) for p in pipe],
                   "max_abs_diff_vs_first": float(np.abs(outs[(label, s)] - outs[(a.settings[0], s)]).max()),
                   "max_abs_diff_vs_float32": float(np.abs(outs[(label, s)] - ref[s]).max())}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
