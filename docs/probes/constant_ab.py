"""Probe: BERT-base programs (random weights, bf16) built under several settings of library module
constants, each traced afresh, timed interleaved (synchronised median and 20 calls in flight, two
pipelined sets), with the largest logit difference against the first setting. A setting is
``;``-separated ``NAME=literal`` assignments to constants of ``--module``; a name written
``cfg.FIELD`` replaces that field of the model's config instead (same parameters), one written
``env.NAME`` sets that environment variable while the setting's programs compile (a string, e.g.
``env.ACCJAX_TRITON_GEMM="1"``: XLA's Triton GEMMs everywhere), one written ``xla.NAME`` adds
that XLA option to every compilation of the setting's programs (``programs.compiler_options``,
e.g. ``xla.xla_gpu_enable_cublaslt=True``), one written ``swap.MODULE.NAME`` replaces that
attribute of MODULE with the one of the same name in the Python file it names, loaded as a
module of its own (a function as an earlier commit had it: the file from ``git show``, which
travels to the device as an untracked file), and an empty setting ``''`` is the code as it
stands.

    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.kernels.layer_norm \
        --settings 'SPLIT=2' 'SPLIT=1' --shapes 1x128,8x128 --speedups 1,4.8 --out $OUT/ab.json
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.models.common \
        --settings 'ONE_ROW_PRODUCTS="off"' 'ONE_ROW_PRODUCTS="fused"' --shapes 1x128
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.kernels.ffn_block \
        --settings 'KERNEL="never"' 'KERNEL="auto";BLOCKS=(64,64,64,64,64,4,4,3)' --shapes 1x128,8x128
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.models.common \
        --settings '' 'cfg.hidden_act="gelu_new"' --shapes 1x128,8x128,128x128
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.models.gpt2 --model gpt2 --task lm \
        --settings '' 'SEPARATE_QKV_BACKENDS=("gpu",)' --shapes 8x1024 --speedups 1,2,3.72
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.kernels.acc_pallas --no_float32 \
        --settings 'ALONE_KEY_TILES=False' 'ALONE_KEY_TILES=True' --shapes 32x512 --speedups 1,3,4.8 \
        --prune_every 8 --floor 32
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.programs --model gpt2 --task lm \
        --settings '' 'env.ACCJAX_TRITON_GEMM="1"' --shapes 8x1024 --speedups 1,3.72
    git show f2c2f59^:accjax/kernels/acc_pallas.py > old_acc_pallas.py  # (then, on the device:)
    PYTHONPATH=. python docs/probes/constant_ab.py --module accjax.kernels.acc_pallas --model gpt2 --task lm \
        --settings 'swap.accjax.kernels.acc_pallas.column_sums_from_lse="old_acc_pallas.py"' '' \
        --shapes 8x1024 --speedups 2,3.72

``--task lm`` times a decoder's LM prefill programs (next-token logits and KV cache, as
``eval.lm --bench`` builds them), ``--task t5`` a T5's encoder + first token (``eval.bench``'s;
compared: its token ids) instead of an encoder classifier.
"""
import argparse
import ast
import dataclasses
import functools
import importlib
import json
import os

import jax
import numpy as np

from accjax import inference, lm, models, programs, seq2seq
from eval import bench


def parse(setting: str) -> dict:
    out = {}
    for part in filter(None, setting.split(";")):
        name, value = part.split("=", 1)
        out[name.strip()] = ast.literal_eval(value.strip())
    return out


HEADS = {"classify": "sequence_classification", "lm": "lm", "t5": "lm"}


def calls_for(task: str, cfg, params, b: int, n: int, speedups, dtype: str, prune_every: int = 1,
              floor: int = 1) -> dict:
    """{speedup: call} of ``task``'s programs at B x N (random full batch, seed 0): an encoder
    classifier's forward pass, a decoder's LM prefill (``eval.lm --bench``'s) or a T5's encoder
    + first token (``eval.bench``'s); the levels planned with ``prune_every`` and ``floor``
    (encoders only)."""
    module = models.get_family(cfg.family).module(cfg, HEADS[task])
    if task == "lm":
        ev = lm.LMEvaluator(module, params, cfg, batch_size=b, context=n, continuation=0, param_dtype=dtype)
        ids = jax.device_put(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, n)).astype(np.int32))
        return {s: functools.partial(ev.prefill_program(ev.schedule(s)), ev.params, ids) for s in speedups}
    pred = (seq2seq.Seq2SeqPredictor if task == "t5" else inference.Predictor)(
        module, params, cfg, batch_size=b, length_buckets=(n,), param_dtype=dtype)
    out = {}
    for s in speedups:
        prog, inputs = bench.program_inputs(pred, b, n, pred.plan(n, s, prune_every=prune_every, floor=floor),
                                            task == "t5")
        out[s] = functools.partial(prog, pred.params, *inputs)
    return out


def swapped(spec: dict) -> dict:
    """{(module, name): value} for a setting's ``swap.MODULE.NAME="file.py"`` entries: NAME as
    the file defines it, the file loaded as a module of its own (once per file)."""
    import importlib.util

    out = {}
    for key, path in spec.items():
        module, name = key.rsplit(".", 1)
        if path not in swapped.loaded:
            spec_ = importlib.util.spec_from_file_location(f"swapped_{len(swapped.loaded)}", path)
            swapped.loaded[path] = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(swapped.loaded[path])
        out[importlib.import_module(module), name] = getattr(swapped.loaded[path], name)
    return out


swapped.loaded = {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", required=True, help="e.g. accjax.models.common")
    ap.add_argument("--settings", nargs="+", required=True, help="each 'NAME=literal[;NAME=literal...]'")
    ap.add_argument("--model", default="bert-base-uncased")
    ap.add_argument("--shapes", default="1x128")
    ap.add_argument("--speedups", default="1,4.8")
    ap.add_argument("--task", default="classify", choices=sorted(HEADS))
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--no_float32", action="store_true", help="skip the float32 reference (fewer compiles)")
    ap.add_argument("--prune_every", type=int, default=1, help="the levels' stride (classify and t5)")
    ap.add_argument("--floor", type=int, default=1, help="the levels' smallest keep-length (classify and t5)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.task == "lm" and (a.prune_every, a.floor) != (1, 1):
        ap.error("--prune_every and --floor plan encoder programs (--task classify or t5)")
    mod = importlib.import_module(a.module)
    settings = [parse(s) for s in a.settings]
    speedups = [float(x) for x in a.speedups.split(",")]
    if a.task == "classify":
        cfg, params = bench.build(a.model, "bfloat16", "auto")
    else:
        cfg = models.preset(a.model, dtype="bfloat16")
        params = models.init_params(cfg, "lm", 0)
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "module": a.module, "rows": []}
    for shape in a.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        calls, outs = {}, {}
        for label, setting in zip(a.settings, settings):
            fields = {k[4:]: v for k, v in setting.items() if k.startswith("cfg.")}
            env = {k[4:]: str(v) for k, v in setting.items() if k.startswith("env.")}
            xla = {k[4:]: v for k, v in setting.items() if k.startswith("xla.")}
            swaps = swapped({k[5:]: v for k, v in setting.items() if k.startswith("swap.")})
            consts = {k: v for k, v in setting.items() if not k.startswith(("cfg.", "env.", "xla.", "swap."))}
            consts = {(mod, k): v for k, v in consts.items()} | swaps
            cfg_s = dataclasses.replace(cfg, **fields)
            saved = {k: getattr(*k) for k in consts}
            saved_env = {k: os.environ.get(k) for k in env}
            for (m, k), v in consts.items():
                setattr(m, k, v)
            os.environ.update(env)
            options = programs.compiler_options
            if xla:
                programs.compiler_options = lambda rows=None: {**options(rows), **xla}
            jax.clear_caches()  # jitted helpers (kernels' wrappers) read constants when traced
            try:  # programs are compiled (traced) while the setting holds
                for s, call in calls_for(a.task, cfg_s, params, b, n, speedups, "bfloat16",
                                         a.prune_every, a.floor).items():
                    calls[(label, s)] = call
            finally:
                programs.compiler_options = options
                for (m, k), v in saved.items():
                    setattr(m, k, v)
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                jax.clear_caches()  # (so later programs, the float32 reference too, see the code as it stands)
        for k, c in calls.items():
            outs[k] = np.asarray(jax.tree_util.tree_leaves(c())[0], np.float32)
        ref = {} if a.no_float32 else {  # the code as it stands in float32: 16-bit rounding's share
            s: np.asarray(jax.tree_util.tree_leaves(call())[0], np.float32)
            for s, call in calls_for(a.task, dataclasses.replace(cfg, dtype="float32"), params, b, n,
                                     speedups, "float32", a.prune_every, a.floor).items()}
        sync = programs.time_interleaved(calls, rounds=a.iters)
        pipe = [programs.time_interleaved(calls, rounds=max(3, a.iters // 4), depth=20) for _ in range(2)]
        for (label, s) in calls:
            row = {"shape": shape, "setting": label, "speedup": s, "prune_every": a.prune_every, "floor": a.floor,
                   "sync_ms": float(np.median(sync[(label, s)])),
                   "pipelined_ms": [float(np.median(p[(label, s)])) for p in pipe],
                   "max_abs_diff_vs_first": float(np.abs(outs[(label, s)] - outs[(a.settings[0], s)]).max()),
                   "max_abs_diff_vs_float32": float(np.abs(outs[(label, s)] - ref[s]).max()) if ref else None}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
