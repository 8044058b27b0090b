"""Sharded training step: the same result on every mesh, and how its throughput scales (issue 8).

    PYTHONPATH=. python -m eval.scaling --global_batch 256 --length 128 --dtype bfloat16 --json scaling.json
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        PYTHONPATH=. python -m eval.scaling --tiny --dtype float32 --json scaling_cpu.json

One call does all of it, with the fine-tuning pipeline's own step (``accjax.train.Trainer``,
optimizer values from ``configs/glue_bert_base.py`` but the learning rate and warmup), a
random-weight preset (``--model``; ``--tiny``: a 2-layer, 32-wide BERT for CPU tests), float32
parameters and ``--dtype`` compute, ``dense`` and ``fixed`` elimination at ``--speedup``,
dropout on as in fine-tuning. Meshes over the devices of this process:

  * ``1 device``             the reference;
  * ``n data``               all n devices data-parallel (``sharding.DP_RULES``);
  * ``n/2 data x 2 fsdp``    parameters and Adam moments split over 'fsdp'
                             (``sharding.FSDP_RULES``); skipped (and said so) when n < 2 or odd.

**Check.** On every mesh and mode: fresh state from the same host parameters, 3 steps on the
same 3 random batches (random tokens, row lengths and labels of 2 classes), compared with the
1-device run of that mode within ``TOLERANCES`` (float32 runs with float32 matmuls: recent
GPUs compute DEFAULT-precision float32 dots in TF32): the loss and gradient norm of each step,
the parameters and the updates after the 3 steps; the same 1-device run with float32 compute
shows how far low precision alone moves the result. The parameters must have moved (``compare``),
else agreement proves nothing.

**Measure.** Examples/s of each (mesh, mode, global batch): the median over ``--iters``
synchronised steps after ``--warmup`` more, on batches already on the devices (input copies
are not timed). Strong scaling: ``--global_batch`` fixed, efficiency = examples/s on n devices
/ (n x examples/s on 1 device). Weak scaling: ``--per_device_batch`` fixed, efficiency against
1 device at per_device rows.

Multi-GPU: NVLink multicast (NVLS) stays off (``NCCL_NVLS_ENABLE=0`` unless the environment
says otherwise, set before jax starts a backend). One process only: every mesh, the 1-device
reference included, is built from this process's devices. Never imports ``datasets`` (the
GPU image has none). A program, not a test: it asserts nothing about time; it exits 1 when
the check fails.
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before jax creates a backend (issue 8: NVLS off)

import argparse
import contextlib
import dataclasses
import sys
import time
from typing import Any

import jax
import numpy as np

from accjax import benchmark, models, programs, train
from accjax import schedule as sched_lib
from accjax import sharding as shard_lib
from eval import cli

MODES = ("dense", "elim")
CHECK_STEPS = 3

# Allowed disagreement of a mesh with the 1-device run, per compute dtype (None: reported,
# not checked): loss |loss_mesh - loss_1| and grad_norm |g_mesh - g_1| / g_1 at each of the
# 3 steps (grad_norm catches a gradient scaled by the device count, which Adam's
# scale-invariant first update would hide); param max |p_mesh - p_1| after the 3 updates;
# update ||dp_mesh - dp_1|| / ||dp_1||, dp = p_3 - p_0 over all parameters.
# float32: the CPU test's 1e-5 (reduction order alone: ~1e-7 relative).
# bfloat16 (unit roundoff u = 2^-8 = 3.9e-3): a device's rows go through the same
# computation on any mesh; what changes is how the weight gradients (f32-accumulated dots
# over B x T rows, rounded to bf16) are split and summed across devices: a few roundings of
# u per entry. loss ~ ln 2 = 0.69 (2 random classes), one bf16 ulp 0.0039: 1e-2 is ~2.5
# ulps; grad_norm 3e-2 is ~8 u. Adam turns a gradient's relative error into the same error
# of an update of about lr, and a sign flipped by rounding (partial sums cancelling below u)
# moves an entry up to 2 lr the other way: a max-abs parameter bound (2 lr x 3 steps) that
# ANY two Adam runs meet cannot fail, so only the update difference is checked. On 8 fake CPU
# devices mesh rounding moved the update by 0.02 - 0.07, a real fault (another dropout key, a
# gradient missing a shard or a reduction) by 1.1 - 1.2: 0.3 sits between (docs/benchmarks.md,
# issue 8; not calibrated on GPUs). The loss and grad-norm bounds are coarse; the update
# difference is the sharp test, and each run reports its own bf16-vs-f32 figure.
TOLERANCES = {
    "float32": {"loss": 1e-5, "grad_norm": 1e-5, "param": 1e-5, "update": None},
    "bfloat16": {"loss": 1e-2, "grad_norm": 3e-2, "param": None, "update": 0.3},
}
TOLERANCES["float16"] = TOLERANCES["bfloat16"]  # coarser than needed (fp16 has 11 bits): same

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=99,
            max_position_embeddings=64, num_labels=2)


# ------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Setup:
    config: Any
    module: Any
    params: Any  # numpy float32
    specs: Any  # logical PartitionSpecs
    input_names: tuple[str, ...]


def build(model: str, dtype: str, tiny: bool, seed: int = 0) -> Setup:
    """A random-weight preset with a 2-class head, computing in ``dtype`` (params float32)."""
    head = "sequence_classification"
    cfg = models.preset(model, **{**(TINY if tiny else {}), "num_labels": 2, "dtype": dtype})
    fam = models.get_family(cfg.family)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), models.init_params(cfg, head, seed))
    specs = shard_lib.logical_specs(models.abstract_variables(cfg, head))["params"]
    return Setup(cfg, fam.module(cfg, head), params, specs, tuple(fam.dummy_inputs(cfg, 1, 8)))


def random_batches(setup: Setup, batch: int, length: int, seed: int, count: int = 3) -> list[dict]:
    """``count`` GLOBAL host batches [batch, length]: random tokens, rows of random length in
    [length/2, length] (row 0 full), random labels in {0, 1}, every row weighted 1."""
    out = []
    vocab = int(setup.config.vocab_size)
    for i in range(count):
        rng = np.random.default_rng([seed, batch, length, i])
        lengths = rng.integers(max(1, length // 2), length + 1, batch)
        lengths[0] = length
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)  # [B, T]
        ids = np.where(mask == 1, rng.integers(1, vocab, (batch, length)), 0).astype(np.int32)
        full = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out.append({**{k: full[k] for k in setup.input_names}, "weights": np.ones(batch, np.float32),
                    "labels": rng.integers(0, 2, batch).astype(np.int32)})
    return out


def plan_meshes(devices: list) -> tuple[list[tuple[str, Any, tuple]], list[str]]:
    """[(name, mesh, rules)] with the 1-device reference first, and notes on skipped meshes."""
    n = len(devices)
    meshes = [("1 device", shard_lib.make_mesh(1, 1, devices[:1]), shard_lib.DP_RULES)]
    notes = []
    if n < 2:
        notes.append(f"only {n} device: no multi-device mesh to compare (the {n}-data mesh is the "
                     "reference itself, and a 2-way fsdp axis needs 2 devices)")
        return meshes, notes
    meshes.append((f"{n} data", shard_lib.make_mesh(n, 1, devices), shard_lib.DP_RULES))
    if n % 2:
        notes.append(f"{n} devices is odd: no (n/2 data x 2 fsdp) mesh")
    else:
        meshes.append((f"{n // 2} data x 2 fsdp", shard_lib.make_mesh(n // 2, 2, devices),
                       shard_lib.FSDP_RULES))
    return meshes, notes


def optim_config(lr: float):
    """The fine-tuning recipe's optimizer (configs/glue_bert_base.py), at ``lr``, no warmup."""
    from configs import glue_bert_base

    o = glue_bert_base.get_config("sst2").optim
    o.lr = float(lr)
    o.warmup_ratio = 0.0
    return o


def make_trainer(setup: Setup, mesh, rules, args) -> train.Trainer:
    # The lr decays linearly to 0 at total_steps; a long notional run keeps it ~constant here.
    tx, lr = train.make_optimizer(optim_config(args.lr), total_steps=100_000)
    return train.Trainer(train.make_classification_loss(setup.module, 2, args.acc_variant), tx, lr, mesh,
                         rules, setup.specs, seed=args.seed, dropout=args.dropout)


# ------------------------------------------------------------------------ check and time
def check_steps(trainer: train.Trainer, params0, batches, schedule):
    """3 steps exactly as ``loop.fit`` takes them (host batches through ``Trainer.step``)."""
    state = trainer.init_state(params0)
    losses, norms = [], []
    for t in range(CHECK_STEPS):
        state, m = trainer.step(state, batches[t], schedule)
        m = jax.device_get(m)
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    return state, {"loss": losses, "grad_norm": norms}


def compare(ref: dict, got: dict, params0, tol: dict[str, float | None], lr: float) -> dict[str, Any]:
    """One mesh's check result against the 1-device run (both: losses, grad norms, host params).

    ``ok['moved']``: the parameters moved, else agreeing parameters prove nothing: by more than
    10x the parameter tolerance where one is checked, else by at least ``lr`` (Adam moves
    about lr per step).
    """
    leaves_ref, leaves_got, leaves_0 = (jax.tree.leaves(t) for t in (ref["params"], got["params"], params0))
    param_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves_got, leaves_ref))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves_ref, leaves_0))
    du_num = sum(float(np.sum((np.asarray(g, np.float64) - r) ** 2)) for g, r in zip(leaves_got, leaves_ref))
    du_den = sum(float(np.sum((np.asarray(r, np.float64) - p) ** 2)) for r, p in zip(leaves_ref, leaves_0))
    loss_diff = max(abs(a - b) for a, b in zip(got["loss"], ref["loss"]))
    norm_rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(got["grad_norm"], ref["grad_norm"]))
    update_rel = (du_num / du_den) ** 0.5 if du_den > 0 else float("inf")
    finite = all(np.isfinite(got["loss"])) and all(np.isfinite(got["grad_norm"]))
    ok = {"finite": bool(finite), "loss": loss_diff <= tol["loss"], "grad_norm": norm_rel <= tol["grad_norm"],
          "moved": moved > (10 * tol["param"] if tol["param"] is not None else float(lr))}
    if tol["param"] is not None:
        ok["param"] = param_diff <= tol["param"]
    if tol["update"] is not None:
        ok["update"] = update_rel <= tol["update"]
    return {"loss": got["loss"], "grad_norm": got["grad_norm"], "max_abs_loss_diff": loss_diff,
            "max_rel_grad_norm_diff": norm_rel, "max_abs_param_diff": param_diff,
            "rel_update_diff": update_rel, "max_abs_param_update": moved, "ok": ok,
            "passed": all(ok.values())}


def time_steps(trainer: train.Trainer, state, batches, schedule, *, warmup: int, iters: int):
    """Median ms of the compiled step on device-resident batches, each call synchronised, and
    the parameter bytes one device holds (halved leaves under 2-way fsdp)."""
    pbytes = int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.params)))
    prog = trainer.train_program(state, batches[0], schedule)  # compiled by the steps before
    seed = np.uint32(trainer.seed)  # the dropout seed is a program input
    box = [state, None]  # (state, metrics), each step's state fed to the next

    def step(batch):
        box[:] = prog(box[0], batch, seed)
        return box

    t = programs.time_calls(step, [trainer.put_batch(b) for b in batches], iters=iters, warmup=warmup)
    return {**t, "iters": iters, "last_loss": float(jax.device_get(box[1]["loss"])),
            "param_bytes_per_device": pbytes}


# ---------------------------------------------------------------------------------- run
def resolve_args(args) -> None:
    """Fills the defaults that depend on --tiny and the device count; validates batch sizes."""
    gpu = dict(global_batch=256, length=128, iters=20, warmup=3)
    tiny = dict(global_batch=16, length=16, iters=3, warmup=1)
    for k, v in (tiny if args.tiny else gpu).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    n = jax.device_count()
    if args.global_batch % n:
        raise ValueError(f"--global_batch {args.global_batch} does not split over the {n} devices; "
                         f"use a multiple of {n}")
    if args.per_device_batch is None:
        args.per_device_batch = args.global_batch // n
    if args.per_device_batch < 1:
        raise ValueError("--per_device_batch must be >= 1")


def matmul_precision(args) -> str | None:
    """float32 checks need float32 matmuls: recent GPUs run DEFAULT-precision float32 dots in
    TF32 (10-bit significand), whose cross-mesh differences a 1e-5 tolerance would flag.
    Half-precision compute keeps jax's default, as ``loop.fit`` runs it."""
    if args.matmul_precision:
        return None if args.matmul_precision == "default" else args.matmul_precision
    return "highest" if args.dtype == "float32" else None


def run(args) -> dict[str, Any]:
    prec = matmul_precision(args)
    with jax.default_matmul_precision(prec) if prec else contextlib.nullcontext():
        return _run(args, prec)


def _run(args, precision: str | None) -> dict[str, Any]:
    if jax.process_count() > 1:
        raise ValueError("eval.scaling runs in one process (it builds every mesh, the 1-device "
                         "reference included, from this process's devices)")
    resolve_args(args)
    devices, info = jax.devices(), benchmark.machine()
    setup = build(args.model, args.dtype, args.tiny, args.seed)
    model_name = args.model + (" (tiny: " + ", ".join(f"{k}={v}" for k, v in TINY.items()) + ")"
                               if args.tiny else "")
    tol = dict(TOLERANCES[args.dtype])
    sampler = train.SpeedupSampler("fixed", speedup=args.speedup)
    plan = sched_lib.plan(models.cost_model(setup.config), args.length, sampler.speedup(0),
                          bucket=args.bucket, floor=args.floor)
    sched, analytic = plan.schedule, plan.analytic
    schedules, labels = {"dense": None, "elim": sched}, {"dense": "dense", "elim": f"elim@{args.speedup:g}"}
    meshes, notes = plan_meshes(devices)
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(setup.params))
    print(f"# {info['device']} x{len(devices)} ({info['backend']}), jax {info['jax']}, {model_name}, "
          f"{n_params:,} params (float32), compute {args.dtype}, matmul precision "
          f"{precision or 'default'}, length {args.length}, "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}", flush=True)
    print(f"# elim: fixed training speedup {args.speedup:g} -> analytic {analytic:.2f}, keep "
          f"{list(sched) if sched else 'all (dense)'}", flush=True)
    for note in notes:
        print(f"# note: {note}", flush=True)

    weak_gb = {name: args.per_device_batch * mesh.devices.size for name, mesh, _ in meshes}
    check_batches = random_batches(setup, args.global_batch, args.length, args.seed)
    measured: dict[tuple, dict] = {}  # (mesh, mode, global batch) -> timing
    checks: dict[str, dict] = {}  # mesh -> mode -> compare()
    refs: dict[str, dict] = {}  # mode -> 1-device result (host params)
    mesh_info = []
    for name, mesh, rules in meshes:
        d = mesh.devices.size
        shard_lib.check_batch_size(args.global_batch, mesh, rules, "--global_batch")
        trainer = make_trainer(setup, mesh, rules, args)
        checks[name] = {}
        for mode in MODES:
            t0 = time.perf_counter()
            state, res = check_steps(trainer, setup.params, check_batches, schedules[mode])
            first_s = time.perf_counter() - t0  # compile + 3 steps
            res["params"] = shard_lib.to_host(state.params)
            if name == meshes[0][0]:
                refs[mode] = res
            c = compare(refs[mode], res, setup.params, tol, args.lr)
            checks[name][mode] = c
            if name != meshes[0][0]:
                del res["params"]  # the reference's stay for the next meshes
            print(f"  check {name:>18} {labels[mode]:>8}: |dloss| {c['max_abs_loss_diff']:.2e}  "
                  f"|dparam| {c['max_abs_param_diff']:.2e} (moved {c['max_abs_param_update']:.2e})  "
                  f"rel update diff {c['rel_update_diff']:.2e}  "
                  f"{'PASS' if c['passed'] else 'FAIL ' + str([k for k, v in c['ok'].items() if not v])}",
                  flush=True)
            measured[(name, mode, args.global_batch)] = {"first_call_s": first_s, **time_steps(
                trainer, state, check_batches, schedules[mode], warmup=args.warmup, iters=args.iters)}
            del state
            gb = weak_gb[name]
            if (name, mode, gb) not in measured:
                shard_lib.check_batch_size(gb, mesh, rules, "per_device_batch x devices")
                batches = random_batches(setup, gb, args.length, args.seed + 1)
                state = trainer.init_state(setup.params)
                t0 = time.perf_counter()
                state, _ = trainer.step(state, batches[0], schedules[mode])  # compile
                jax.block_until_ready(state)
                measured[(name, mode, gb)] = {"first_call_s": time.perf_counter() - t0, **time_steps(
                    trainer, state, batches, schedules[mode], warmup=args.warmup, iters=args.iters)}
                del state
        mesh_info.append({"name": name, "shape": dict(mesh.shape), "devices": d,
                          "rules": [list(r) for r in rules], "programs": trainer.num_programs,
                          "traces": trainer.traces})
        del trainer

    rounding = {}
    if args.dtype != "float32" and args.f32_reference:
        # The whole effect of low-precision compute on the same 1-device run: the scale the
        # mesh differences above should stay well inside (reported, not checked).
        setup32 = build(args.model, "float32", args.tiny, args.seed)
        mesh, rules = meshes[0][1], meshes[0][2]
        trainer = make_trainer(setup32, mesh, rules, args)
        for mode in MODES:
            with jax.default_matmul_precision("highest"):  # float32 meaning float32 (not TF32)
                state, res = check_steps(trainer, setup32.params, check_batches, schedules[mode])
            res["params"] = shard_lib.to_host(state.params)
            del state
            c = compare(refs[mode], res, setup.params, tol, args.lr)
            rounding[mode] = {k: v for k, v in c.items() if k not in ("ok", "passed")}
            print(f"  {args.dtype} vs float32 compute, 1 device, {labels[mode]:>8}: |dloss| "
                  f"{c['max_abs_loss_diff']:.2e}  grad norm rel {c['max_rel_grad_norm_diff']:.2e}  "
                  f"|dparam| {c['max_abs_param_diff']:.2e}  rel update diff {c['rel_update_diff']:.2e}",
                  flush=True)
        del trainer

    ref_name = meshes[0][0]
    rows = []
    for scaling in ("strong", "weak"):
        for name, mesh, _ in meshes:
            d = mesh.devices.size
            gb = args.global_batch if scaling == "strong" else weak_gb[name]
            base_gb = args.global_batch if scaling == "strong" else args.per_device_batch
            for mode in MODES:
                m = measured[(name, mode, gb)]
                base = measured[(ref_name, mode, base_gb)]
                thr = gb / (m["median_ms"] / 1e3)
                thr1 = base_gb / (base["median_ms"] / 1e3)
                dense = measured[(name, "dense", gb)]
                rows.append({
                    "scaling": scaling, "mesh": name, "mesh_shape": dict(mesh.shape), "devices": d,
                    "mode": labels[mode], "schedule": list(schedules[mode]) if schedules[mode] else None,
                    "global_batch": gb, "per_device_batch": gb // d, "length": args.length,
                    "step_ms": m["median_ms"], "min_ms": m["min_ms"], "max_ms": m["max_ms"],
                    "examples_per_s": thr, "efficiency": thr / (d * thr1),
                    "vs_dense": dense["median_ms"] / m["median_ms"],
                    "first_call_s": m["first_call_s"], "param_bytes_per_device": m["param_bytes_per_device"],
                })
    passed = all(c["passed"] for per in checks.values() for c in per.values())
    print_tables(rows, checks, rounding, labels, tol, passed, args)
    return {
        "machine": info, "jax_version": jax.__version__, "model": model_name,
        "model_config": dict(vars(setup.config)), "params": n_params,
        "dtype": args.dtype, "param_dtype": "float32", "matmul_precision": precision or "default",
        "length": args.length,
        "global_batch": args.global_batch, "per_device_batch": args.per_device_batch,
        "speedup": args.speedup, "elim_schedule": list(sched) if sched else None,
        "elim_analytic_speedup": analytic, "lr": args.lr, "dropout": args.dropout, "seed": args.seed,
        "iters": args.iters, "warmup": args.warmup, "check_steps": CHECK_STEPS,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "meshes": mesh_info, "skipped": notes, "tolerances": tol,
        "check": checks, "check_passed": passed, "rounding_reference": rounding, "rows": rows,
    }


CHECK_COLUMNS = [("mesh", "mesh", ""), ("mode", "mode", ""), ("max_abs_loss_diff", "|dloss|", ".2e"),
                 ("max_rel_grad_norm_diff", "dgnorm rel", ".2e"), ("max_abs_param_diff", "|dparam|", ".2e"),
                 ("max_abs_param_update", "moved", ".2e"), ("rel_update_diff", "rel upd", ".2e"),
                 ("result", "result", "")]
SCALING_COLUMNS = [("mesh", "mesh", ""), ("mode", "mode", ""), ("global_batch", "global B", "d"),
                   ("per_device_batch", "per-dev B", "d"), ("step_ms", "step ms", ".2f"),
                   ("examples_per_s", "examples/s", ".1f"), ("efficiency", "efficiency", ".2f"),
                   ("vs_dense", "vs dense", ".2f")]


def print_tables(rows, checks, rounding, labels, tol, passed, args) -> None:
    print(f"\ncheck after {CHECK_STEPS} steps vs 1 device (tolerances: "
          + ", ".join(f"{k} {v:g}" for k, v in tol.items() if v is not None)
          + "; loss, |dparam|: max abs; grad norm, update: relative)")
    lines = [{**c, "mesh": name, "mode": labels[mode], "result": "PASS" if c["passed"] else "FAIL"}
             for name, per in checks.items() for mode, c in per.items()]
    lines += [{**c, "mesh": "1 dev, f32 compute", "mode": labels[mode], "result": "(rounding scale)"}
              for mode, c in rounding.items()]
    print(benchmark.table(lines, CHECK_COLUMNS))
    print(f"check: {'PASS' if passed else 'FAIL'}")
    for scaling in ("strong", "weak"):
        what = (f"global batch {args.global_batch} fixed" if scaling == "strong"
                else f"per-device batch {args.per_device_batch} fixed")
        print(f"\n{scaling} scaling ({what}; length {args.length}, {args.dtype})")
        print(benchmark.table([r for r in rows if r["scaling"] == scaling], SCALING_COLUMNS))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base-uncased", help="a BERT-family preset (random weights)")
    ap.add_argument("--tiny", action="store_true", help="2-layer, 32-wide model, small defaults (CPU tests)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCES), help="compute dtype")
    ap.add_argument("--global_batch", type=int, default=None, help="strong scaling batch (256; tiny 16)")
    ap.add_argument("--per_device_batch", type=int, default=None,
                    help="weak scaling rows per device (default global_batch / devices)")
    ap.add_argument("--length", type=int, default=None, help="tokens per example (128; tiny 16)")
    ap.add_argument("--speedup", type=float, default=3.0, help="fixed training speedup of the elim mode")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate (no warmup)")
    ap.add_argument("--no_dropout", dest="dropout", action="store_false", help="train without dropout")
    ap.add_argument("--matmul_precision", default=None, choices=["default", "high", "highest"],
                    help="jax_default_matmul_precision (default: highest for --dtype float32, else jax's)")
    ap.add_argument("--no_f32_reference", dest="f32_reference", action="store_false",
                    help="skip the 1-device float32-compute run that shows the size of rounding")
    ap.add_argument("--acc_variant", default="plain")
    ap.add_argument("--bucket", type=int, default=8, help="keep-length bucket (config.elimination.bucket)")
    ap.add_argument("--floor", type=int, default=1, help="smallest keep-length (config.elimination.floor)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per measurement (20; tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after the check (3; tiny 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the check, all rows and the machine here")
    args = ap.parse_args(argv)
    result = {}
    rc = cli.run(lambda: result.update(run(args)) or result, json_path=args.json)
    return rc or (0 if result["check_passed"] else 1)


if __name__ == "__main__":
    sys.exit(main())
