"""The fit loop: fine-tunes as a training config says, resumably, and the embedded default.

``fit(config)`` builds the experiment (``accjax.experiment``), then runs the compiled steps of
``accjax.train.Trainer`` epoch by epoch: the speedup of each step from the config's
elimination mode (``train.SpeedupSampler``), dev evaluation at every epoch end
(``evaluation.score_splits`` through the experiment), the best model exported into the run
folder, orbax checkpoints for exact resume, ``metrics.jsonl`` / TensorBoard records and a
``summary.json`` at the end.

The embedded default (``ensure_default_run``): MiniLM-L6 fine-tuned on ``rt_polarity`` with
elastic elimination over speedups [1, 4.8] after one dense epoch (``DEFAULT_CONFIG``), kept in
``$ACCJAX_CACHE/runs/`` and trained on first use (resumes if interrupted).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from accjax import checkpoint as ckpt_lib
from accjax import compile_cache, convert, evaluation, guards, hub, runfolder
from accjax import experiment as exp_lib
from accjax import schedule as sched_lib
from accjax import sharding as shard_lib
from accjax import train as train_lib
from accjax.benchmark import json_default
from accjax.models.common import resolve_matmul_dtype
from accjax.runfolder import read_jsonl, rewrite_jsonl

log = logging.getLogger(__name__)

DEFAULT_RUN_NAME = "minilm-l6_rt_polarity_warm1_1-4.8_e3"
DEFAULT_CONFIG = "rt_minilm.py:elastic,sandwich,hidden,warm"
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


# ------------------------------------------------------------------------------- feedback
class MetricsLog:
    """metrics.jsonl and TensorBoard event files in the run folder (process 0 only).

    On resume from step s, records after s (written by the interrupted run and about to be
    repeated) are dropped from metrics.jsonl, and TensorBoard purges them (``purge_step``).
    """

    def __init__(self, run_dir: Path, *, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if start_step and self.path.exists():  # a torn last line (killed mid-write) is dropped
            rewrite_jsonl(self.path, [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step])
        elif not start_step and self.path.exists():
            self.path.unlink()  # a fresh run
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step or None)
        except ImportError:  # TensorBoard files are optional; the JSONL is the record
            log.warning("tensorboardX is not installed: no TensorBoard event files")

    def write(self, record: dict[str, Any], scalars: dict[str, float] | None = None, prefix: str = ""):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=json_default) + "\n")
        if self._tb is not None and scalars:
            for k, v in scalars.items():
                if v is not None and np.isfinite(v):
                    self._tb.add_scalar(f"{prefix}{k}", float(v), int(record.get("step", 0)))

    def flush(self):
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ---------------------------------------------------------------------------------- fit
# Config keys that may change between an interrupted run and its restart.
RESUME_MAY_CHANGE = ("debug", "checkpoint.every_steps", "checkpoint.keep", "log_every_steps",
                     "progress", "run_dir", "compile_cache", "eval.epochs")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_dict(config) -> dict[str, Any]:
    """An ml_collections config (or a dict) as plain JSON data."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=json_default))


def check_resume_config(saved: dict, current: dict) -> None:
    """A restart must train the same thing: differing keys (outside RESUME_MAY_CHANGE) raise."""
    # keys added after the run started: the values that train as that run did
    a = {"elimination.prune_every": 1, "distill.hidden_weight": 0.0, "distill.hidden_layers": "last",
         "train_pad_multiple": 0, "matmul_dtype": "", "optim.average": 0.0,
         "optim.layer_decay": 1.0, "warm_start.epochs": 0, "warm_start.lr": 5e-5, "elimination.fuse": "",
         **_flat(saved)}
    b = _flat(current)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                  and not any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE))
    if diff:
        details = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff)
        raise ValueError(f"the run folder holds a run with another config ({details}); use a new "
                         "run_dir, or delete the old run to start over")


@dataclasses.dataclass
class FitResult:
    run_dir: Path
    steps: int
    resumed_from: int | None
    best: dict[str, Any] | None
    final_eval: list[dict[str, Any]]
    seconds_per_epoch: list[float]


def step_static(exp, el, speeds, batch):
    """A step's static train-program argument: the schedule of its one pass (None = dense),
    or ``train.Passes`` of its several (sandwich), planned at the batch's length bucket and
    capped at its rows (a batch padded tighter than its bucket keeps what it has: padding
    goes first, so the kept real rows are those the bucket's program would keep)."""
    rows = int(batch["input_ids"].shape[1])

    def planned(speedup):
        keep = None if speedup is None else sched_lib.plan(
            exp.cost, exp.schedule_length(batch), speedup, **exp_lib.plan_kw(el)).schedule
        return None if keep is None else tuple(min(k, rows) for k in keep)

    scheds = tuple(planned(s) for s in speeds)
    if len(scheds) == 1:
        return scheds[0]
    d = exp.config.distill
    return train_lib.Passes(scheds, float(d.weight), float(d.temperature), float(d.hidden_weight),
                            str(d.hidden_layers))


def step_programs(exp, sampler, el, start: int, total: int) -> list[tuple[dict, Any]]:
    """(a batch of every shape the run's steps will see, static argument) for each distinct
    train program: the batch shapes of one epoch x the sampler's level combinations."""
    shapes = {}
    first, _ = exp.train.position(start)
    n = 1 if exp.objective == "seq2seq" else len(exp.train)  # text-to-text batches have one shape
    for i in range(n) if start < total else ():
        b = exp.train.batch(first, i)
        shapes.setdefault(tuple(sorted((k, v.shape) for k, v in b.items())), b)
    work = {(key, s): (b, s) for key, b in shapes.items()
            for s in (step_static(exp, el, speeds, b) for speeds in sampler.combinations())}
    return list(work.values())


def fit(config) -> FitResult:
    """Fine-tunes as ``config`` says (see ``configs/``); resumes from ``config.run_dir``.

    Writes into the run folder: ``checkpoints/`` (orbax, for resume), the best model by dev
    metric as an accjax model folder (``accjax.json``, ``params.safetensors``, tokenizer
    files; task and training config inside), ``train_config.json``, ``metrics.jsonl``,
    ``tb/`` (TensorBoard) and ``summary.json`` (final dev/test rows of the best model).

    With ``warm_start.epochs`` > 0 the run first fine-tunes densely into ``RUN_DIR/dense``
    (``experiment.warm_start_config``; resumable, skipped once finished) and starts from that
    model: the run's recorded ``model`` is that folder.

    Returns:
      FitResult: steps run, step resumed from (None: fresh), the best dev record, the final
      evaluation rows and the measured seconds per epoch.
    """
    exp_lib.validate_config(config)
    if int(config.get("warm_start", {}).get("epochs", 0)) > 0:
        dense = exp_lib.warm_start_config(config)
        if shard_lib.is_primary():
            print(f"warm start: a dense fine-tune of {dense.epochs} epoch(s) at peak lr "
                  f"{dense.optim.lr:g} first, in {Path(dense.run_dir).absolute()}", flush=True)
        config = copy.deepcopy(config)
        config.model = str(fit(dense).run_dir)
    compile_cache.enable(enabled=None if config.get("compile_cache", True) else False)
    t_start, compiled_before = time.perf_counter(), compile_cache.counts()
    primary = shard_lib.is_primary()
    run_dir = Path(config.run_dir).absolute()
    cfg_json = config_dict(config)
    saved = run_dir / "train_config.json"
    if primary:
        runfolder.lock(run_dir)  # one writer per run folder; released at the end (or exit)
    runfolder.check_resume(run_dir, cfg_json, check_resume_config)  # every process checks
    mesh = shard_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = shard_lib.normalize_rules(config.logical_axis_rules)
    shard_lib.check_batch_size(int(config.batch_size), mesh, rules, "batch_size")
    shard_lib.check_batch_size(int(config.eval_batch_size), mesh, rules, "eval_batch_size")

    exp = exp_lib.build(config)
    nb = exp.train.num_batches
    schedule_steps = int(config.epochs) * nb  # the learning-rate schedule always spans the full run
    total = min(schedule_steps, max(int(config.debug.max_steps), 0) or schedule_steps)  # this call stops here
    tx, lr = train_lib.make_optimizer(config.optim, schedule_steps)
    trainer = train_lib.Trainer(exp.loss_fn, tx, lr, mesh, rules, exp.param_specs, seed=int(config.seed),
                      dropout=bool(config.dropout), forward=exp.forward)
    el = config.elimination
    sampler = exp_lib.sampler(config)

    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(cfg_json, indent=2) + "\n")
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", keep=int(config.checkpoint.keep))

    params_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), exp.params)
    restored = ckpt.restore_latest(trainer.abstract_state(params_shape))  # skips a corrupt newest
    if restored is not None:
        latest, state, meta = restored
        best, resumed_from = meta.get("best"), int(latest)
        log.info("resuming from the checkpoint at step %d of %d (%s)", latest, total, run_dir)
        if primary:
            print(f"resumed from step {latest} (checkpoint in {run_dir / 'checkpoints'})", flush=True)
    else:
        state, best, resumed_from = trainer.init_state(exp.params), None, None
    start = int(jax.device_get(state.step))
    done = runfolder.finished(run_dir, total) if start >= total else None
    if done is not None:  # a finished run: report it, rewrite nothing
        if primary:
            print(f"{run_dir} already finished ({total} steps); its results are in "
                  f"{run_dir / 'summary.json'}", flush=True)
            runfolder.unlock(run_dir)
        ckpt.close()
        return FitResult(run_dir, start, done.get("resumed_from"), done.get("best"),
                         done.get("final", []), done.get("train_seconds_per_epoch", []))
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(exp.params))
    exp.params = None  # the host copy is no longer needed

    mlog = MetricsLog(run_dir, start_step=start, enabled=primary)
    if resumed_from is None:
        mlog.write({"step": 0, "event": "data", **exp.data_report})  # (a no-op off process 0)
    if primary:
        print(exp.describe(total, nb, mesh, sampler, n_params), flush=True)

    from tqdm import tqdm

    # Every train program of the run is known before the first step (length buckets x
    # speedup levels): compile them all now, in parallel, and say so; the step bar below then
    # starts after compilation, so its ETA never counts compile time.
    t_compile = time.perf_counter()
    work = step_programs(exp, sampler, el, start, total)
    with tqdm(total=len(work), desc=f"compiling {len(work)} train programs", unit="program",
              disable=not (primary and config.progress), dynamic_ncols=True) as cbar:
        built = trainer.precompile(state, work, progress=lambda i, n: cbar.update(1))
    compile_seconds = time.perf_counter() - t_compile
    compiled_ahead = trainer.programs.compiles
    if primary:
        print(f"compiled {built} train programs in {compile_seconds:.1f} s", flush=True)
    first_step_at = None
    bar = tqdm(total=total, initial=start, disable=not (primary and config.progress), unit="step",
               dynamic_ncols=True, mininterval=1.0)
    every = int(config.checkpoint.every_steps)
    log_every = max(1, int(config.log_every_steps))
    pending: list[tuple[tuple, dict, float]] = []  # (the passes' speedups, device metrics, real examples)
    t_log, t_epoch, epoch_times = time.perf_counter(), time.perf_counter(), []
    cpu_epoch, epoch_cpu = time.process_time(), []  # process CPU seconds (all threads)
    delay = float(config.debug.step_delay_s)
    eval_epochs = {int(e) for e in config.eval.get("epochs", ())}  # empty: every epoch
    best_now = None  # (dev rows, host params) of the best model, when this call exported it

    def meta_now(step):
        epoch, index = exp.train.position(step)
        return {"step": step, "epoch": epoch, "index": index, "seed": int(config.seed), "best": best,
                "total_steps": schedule_steps, "config": cfg_json}  # resume checks this config

    def flush_metrics(step):
        nonlocal t_log
        if not pending:
            return
        host = jax.device_get([m for _, m, _ in pending])
        guards.check_finite_metrics(host, step - len(host) + 1)
        n_ex = sum(n for _, _, n in pending)
        dt, t_log = time.perf_counter() - t_log, time.perf_counter()
        mean = {k: float(np.mean([h[k] for h in host])) for k in host[-1]}
        rec = {"step": step, "epoch": round(step / nb, 4), **mean,
               "examples_per_s": n_ex / dt if dt > 0 else None}
        speeds = [s for ss, _, _ in pending for s in ss if s is not None]
        if speeds:
            rec["train_speedup_mean"] = float(np.mean(speeds))
        mlog.write(rec, {k: v for k, v in rec.items() if k not in ("step", "epoch")}, prefix="train/")
        bar.set_postfix(loss=f"{mean['loss']:.4f}", lr=f"{mean['lr']:.2e}",
                        ex_s=f"{rec['examples_per_s'] or 0:.1f}", refresh=False)
        pending.clear()

    step = start
    while step < total:
        epoch, index = exp.train.position(step)
        batch = exp.train.batch(epoch, index)
        speeds = sampler.speedups(step)
        state, metrics = trainer.step(state, batch, step_static(exp, el, speeds, batch))
        pending.append((speeds, metrics, float(np.sum(batch["weights"]))))  # both experiments weigh rows
        step += 1
        if first_step_at is None:
            jax.block_until_ready(metrics)
            first_step_at = time.perf_counter() - t_start
        bar.update(1)
        if delay:
            jax.block_until_ready(metrics)
            time.sleep(delay)
        if step % log_every == 0:
            flush_metrics(step)
        if epoch_end := index == nb - 1 or step == total:
            flush_metrics(step)
            weights = trainer.weights(state)  # the weight average when optim.average > 0
            guards.check_finite_params(weights, step)  # never evaluate or export NaN weights
            jax.block_until_ready((state, weights))
            epoch_times.append(time.perf_counter() - t_epoch)
            epoch_cpu.append(time.process_time() - cpu_epoch)
            # skipping an evaluation leaves training as it is (data order and dropout keys
            # follow the step alone); the last epoch always scores, so a model is exported
            score_now = step == total or not eval_epochs or epoch + 1 in eval_epochs
            rows = exp.evaluate(trainer, weights, list(config.eval.speedups)) if score_now else []
            for r in rows:
                rec = {"step": step, "epoch": epoch + 1, "event": "eval", **r}
                mlog.write(rec, {k: v for k, v in r.items() if isinstance(v, (int, float))
                                 and k not in ("speedup",)},
                           prefix=f"{r['split']}/{r['speedup']:g}x/")
            score = exp.selection_score(rows) if rows else None
            if primary:
                bar.write(f"epoch {epoch + 1} (step {step}): "
                          + (", ".join(f"{r['split']}@{r['speedup']:g}x {r['primary']:.2f}" for r in rows
                                       if r["split"] == exp.dev_split)
                             or f"dev not scored (eval.epochs {tuple(config.eval.epochs)})")
                          + f"  [train {epoch_times[-1]:.0f} s]")
                mlog.write({"step": step, "epoch": epoch + 1, "event": "epoch",
                            "train_seconds": epoch_times[-1], "train_cpu_seconds": epoch_cpu[-1],
                            "selection_score": score})
            if rows and (best is None or score > best["score"]):
                best = {"score": score, "step": step, "epoch": epoch + 1,
                        "rows": [r for r in rows if r["split"] == exp.dev_split]}
                host_params = shard_lib.to_host(weights)
                best_now = (rows, host_params)  # the exported model's dev rows, for the final table
                if primary:
                    exp.export(host_params, run_dir, {"train_config": cfg_json, "eval": best})
                    bar.write(f"  new best {exp.select_label} = {score:.2f}: exported to {run_dir}")
            mlog.flush()
            sys.stdout.flush()  # the epoch's lines now, also when stdout is a file or a pipe
            t_epoch = t_log = time.perf_counter()  # evaluation time counts in neither
            cpu_epoch = time.process_time()
        if (every > 0 and step % every == 0) or epoch_end or step == total:  # the last step saves
            guards.check_finite_params(state.params, step)  # a resume point must be finite
            ckpt.save(step, state, meta_now(step))
    bar.close()
    ckpt.close()

    # The best model as exported, on every labelled dev and test split.
    final = exp.final_eval(trainer, run_dir, list(config.eval.speedups), best_now)
    for r in final:
        mlog.write({"step": step, "event": "final", **r})
    mlog.close()
    if primary:
        summary = {"run_dir": str(run_dir), "steps": step, "resumed_from": resumed_from, "best": best,
                   "final": final, "train_seconds_per_epoch": epoch_times,
                   "train_cpu_seconds_per_epoch": epoch_cpu,
                   "train_programs": trainer.num_programs, "compile_seconds": compile_seconds,
                   "time_to_first_step": first_step_at,
                   # train programs the step loop had to compile itself (0: the bar's ETA saw none)
                   "train_programs_compiled_during_steps": trainer.programs.compiles - compiled_ahead,
                   "compilation": {
                       k: v - compiled_before[k] for k, v in compile_cache.counts().items()},
                   "data": exp.data_report,
                   "devices": jax.device_count(), "processes": jax.process_count(),
                   "mesh": dict(mesh.shape)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n")
        print(f"the best model (exported to {run_dir}) on every labelled split:\n"
              + evaluation.format_table(final), flush=True)
        runfolder.unlock(run_dir)
    return FitResult(run_dir, step, resumed_from, best, final, epoch_times)


def fit_seeds(config, seeds: Sequence[int]) -> dict:
    """``fit`` once per seed, into ``run_dir/seed{N}``, then the final rows' mean and sample
    standard deviation over the seeds per (split, speedup), written to ``run_dir/seeds.json``
    and ``seeds.md``. Runs that differ only in the seed share their compiled programs."""
    base, runs = Path(config.run_dir), []
    for seed in seeds:
        c = copy.deepcopy(config)  # existing keys: a locked config takes them
        c.seed, c.run_dir = int(seed), str(base / f"seed{int(seed)}")
        runs.append(fit(c))
    groups: dict[tuple, list[dict]] = {}
    for res in runs:
        for r in res.final_eval:
            groups.setdefault((r["split"], r["speedup"]), []).append(r)
    rows = [{"split": split, "speedup": speedup, "seeds": len(rs),
             "mean": float(np.mean([r["primary"] for r in rs])),
             "std": float(np.std([r["primary"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
             "values": [r["primary"] for r in rs],
             "analytic_speedup": float(np.mean([r["analytic_speedup"] for r in rs]))}
            for (split, speedup), rs in groups.items()]
    out = {"config": config_dict(config), "seeds": [int(x) for x in seeds], "rows": rows,
           "train_seconds": [sum(r.seconds_per_epoch) for r in runs]}
    if shard_lib.is_primary():
        (base / "seeds.json").write_text(json.dumps(out, indent=2, default=json_default) + "\n")
        lines = [f"| split | speedup | analytic | mean +- std over seeds {list(out['seeds'])} | values |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['split']} | {r['speedup']:g} | {r['analytic_speedup']:.2f} | {r['mean']:.2f} +- "
                  f"{r['std']:.2f} | {', '.join(f'{v:.2f}' for v in r['values'])} |" for r in rows]
        (base / "seeds.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    return out


# ------------------------------------------------------------------------ default model
def load_config_file(spec: str):
    """``'file.py:arg'`` (relative to ``configs/`` or a path) -> its ml_collections config."""
    path_s, _, arg = spec.partition(":")
    path = Path(path_s)
    if not path.is_absolute() and not path.exists():
        path = CONFIGS_DIR / path
    if not path.exists():
        raise evaluation.EvalError(f"config file {path} not found; run from a source checkout of accjax "
                        "(pip install -e .) or pass --checkpoint RUN_DIR")
    mod_spec = importlib.util.spec_from_file_location(f"accjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def ensure_default_run() -> Path:
    """The default run folder; fine-tuned (once, resumably) when it is not there yet.

    ``ACCJAX_DEFAULT_CONFIG`` names another config (e.g. ``rt_minilm.py:elastic,tiny``, used by
    the tests) and ``ACCJAX_DEFAULT_RUN`` another folder.
    """
    run = Path(os.environ.get("ACCJAX_DEFAULT_RUN") or hub.cache_dir() / "runs" / DEFAULT_RUN_NAME)
    if (run / convert.ACCJAX_META).exists() and (run / "summary.json").exists():
        return run
    recipe = spec = os.environ.get("ACCJAX_DEFAULT_CONFIG", DEFAULT_CONFIG)
    config = load_config_file(spec)
    if "ACCJAX_DEFAULT_CONFIG" not in os.environ:
        # The README's job asks for 4.8x: the recipe's top level is 4.8x, trained every step, and
        # it chooses the epoch by the mean dev accuracy up to 4.8x. On a CPU,
        # training batches padded to a multiple of 16 (the same function, 1.24x faster steps, 4
        # programs to compile; 8 is 1.31x but compiles 8: docs/results.md "Time").
        if jax.default_backend() == "cpu":
            config.train_pad_multiple = 16
        lo, hi = config.elimination.speedup_range
        warm = int(config.warm_start.epochs)
        # measured from fresh clones (README): 787 s on 2 cores with AVX512-BF16 (bf16 products),
        # 1300 s on 2 with AVX2 alone (float32 products: 'auto')
        bf16 = resolve_matmul_dtype(config.matmul_dtype, backend="cpu") == "bfloat16"
        recipe = (f"{spec}: {warm} dense epoch(s), then over speedups {lo:g}-{hi:g}, {config.epochs} "
                  f"epochs: each step trains 1x and {hi:g}x, the {hi:g}x pass distilled from the 1x "
                  "one; about " + ("13-15 minutes on 2 quiet CPU cores" if bf16 else
                                   "21-23 minutes on 2 quiet CPU cores without bfloat16 instructions"))
    print(f"accjax: no default checkpoint in {run} yet: fine-tuning MiniLM-L6 on rt_polarity with "
          f"elastic elimination ({recipe}; once: an interrupted run resumes). Pass "
          "--checkpoint RUN_DIR to use your own.", file=sys.stderr, flush=True)
    config.run_dir = str(run)
    fit(config)
    return run
