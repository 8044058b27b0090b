"""Evaluate a fine-tuned classifier at one or more speedups: the main job.

    python -m eval.glue --speedup 4.8                      # the embedded default (see below)
    python -m eval.glue --checkpoint runs/sst2 --task sst2 --data_dir /data/glue --speedup 1.5,2,3
    python -m eval.glue --checkpoint runs/glue --task all --speedup 2 --json glue.json
    python -m eval.glue --checkpoint runs/rt --max_drop 0.5    # fastest level within 0.5 dev points

For each task and speedup: the task's official metric(s) x100, the analytic speedup, the
measured speedup against the dense model timed in the same run on the same data, examples/s
and latency per batch (``accjax.evaluation.score_splits``); as a table and as JSON.

With no ``--checkpoint`` it uses the embedded default run (``accjax.loop.ensure_default_run``:
fine-tuned once on first use). ``--task all`` takes a folder holding one run folder per GLUE
task (``RUN/cola``, ``RUN/sst2``, ...). ``--max_drop X`` reads (or first makes) the
offline-tuning table beside the checkpoint (``python -m eval.offline_tune``) and runs the
fastest level whose dev drop is at most X points (of the levels whose measured speedup lies
within the fastest one's spread, the most accurate), at the stride (``prune_every``) and floor the table
measured it with (only ``--prune_every``'s and ``--floor``'s, when given). Otherwise
``--prune_every`` and ``--floor`` default to the run's (training's ``elimination``).
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import argparse
import sys
from pathlib import Path

from accjax.tasks import GLUE_TASKS
from eval import cli


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval.glue", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="run folder from train.finetune (default: the embedded default)")
    ap.add_argument("--task", default=None,
                    help="GLUE task, 'all', rt_polarity or a file spec (default: the checkpoint's task)")
    ap.add_argument("--speedup", default="1", help="one value or a comma list, e.g. 4.8 or 1.5,2,3")
    ap.add_argument("--split", default=None, help="split(s) to score, comma list (default: the dev split(s))")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--data_dir", default=None, help="GLUE TSV folder (standard layout)")
    ap.add_argument("--json", default=None, help="write the rows and the machine here")
    ap.add_argument("--max_drop", type=float, default=None,
                    help="pick the fastest offline-tuned level whose dev drop is at most this")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed passes per level, interleaved with dense (measured = their median)")
    ap.add_argument("--prune_every", type=int, default=None,
                    help="k > 1: only layers 1, 1 + k, ... drop rows, at the same analytic cost "
                         "(faster on GPUs; its accuracy cost: docs/results.md); default: the run's "
                         "(training's elimination.prune_every)")
    ap.add_argument("--floor", type=int, default=None,
                    help="smallest keep-length a layer may have (schedule.plan's floor); with "
                         "--max_drop, pick only among the levels measured at it; default: the run's")
    cli.add_settle(ap)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def run(args) -> dict:
    from accjax import evaluation, guards

    speedups = cli.speedups(args.speedup)
    cli.batch_size(args.batch_size)
    guards.positive_int(args.repeats, "--repeats")
    if args.max_drop is not None:  # before the default run's training, which takes minutes
        guards.finite_number(args.max_drop, "--max_drop (dev accuracy points)", minimum=0)
    if args.prune_every is not None:
        guards.positive_int(args.prune_every, "--prune_every")
    if args.floor is not None:
        guards.positive_int(args.floor, "--floor")
    splits = cli.words(args.split)
    from accjax import loop

    ckpt = Path(args.checkpoint) if args.checkpoint else loop.ensure_default_run()
    if args.task == "all":
        if (ckpt / "accjax.json").exists():
            raise evaluation.EvalError(
                f"--task all needs a folder holding one run folder per GLUE task ({ckpt}/cola, "
                f"{ckpt}/sst2, ...); {ckpt} is a single run folder")
        targets = [(t, ckpt / t) for t in GLUE_TASKS if (ckpt / t / "accjax.json").exists()]
        missing = [t for t in GLUE_TASKS if not (ckpt / t / "accjax.json").exists()]
        if not targets:
            raise evaluation.EvalError(f"{ckpt} holds no GLUE run folders (expected {', '.join(GLUE_TASKS)})")
        if missing:
            print(f"note: no run folder for {', '.join(missing)} in {ckpt}; skipped", file=sys.stderr)
    else:
        targets = [(args.task, ckpt)]

    rows, picked = [], []
    for task, folder in targets:
        model = evaluation.RunModel.load(folder)
        levels, every, floor = speedups, args.prune_every, args.floor
        if args.max_drop is not None:
            table = evaluation.read_tune(folder)
            if table is None:
                guards.writable_dir(folder, "the offline-tuning table beside the checkpoint")
                print(f"no offline-tuning table beside {folder}: sweeping the dev split first "
                      "(python -m eval.offline_tune)", file=sys.stderr)
                table = evaluation.offline_tune(model, batch_size=args.batch_size, data_dir=args.data_dir,
                                                progress=args.progress, repeats=args.repeats,
                                                prune_every=every, floor=floor)
            level = evaluation.pick_level(table, args.max_drop, prune_every=every, floor=floor)
            every = level.get("prune_every", 1)  # the stride the picked level was measured with
            if floor is None:  # and its floor (None in a table that predates floors: the run's)
                floor = level.get("floor")
            picked.append({"checkpoint": str(folder), "prune_every": every, "floor": floor, **{k: level[k] for k in (
                "speedup", "analytic_speedup", "measured_speedup", "drop")}})
            print(f"picked speedup {level['speedup']:g}" + (f" at prune_every {every}" if every > 1 else "")
                  + (f" at floor {floor}" if floor is not None and floor != model.floor else "")
                  + f" for {folder}: dev drop {level['drop']:.2f} "
                  f"<= {args.max_drop:g}, measured {level['measured_speedup']:.2f}x, analytic "
                  f"{level['analytic_speedup']:.2f}x (offline-tuning table {evaluation.TUNE_FILE}.json)")
            levels = [level["speedup"]]
        rows += evaluation.evaluate(model, task=task, splits=splits, speedups=levels,
                                    batch_size=args.batch_size, data_dir=args.data_dir,
                                    progress=args.progress, repeats=args.repeats,
                                    prune_every=every, floor=floor)
    print(evaluation.format_table(rows))
    return {"checkpoint": str(ckpt), "rows": rows, **({"picked": picked} if picked else {})}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def settled_run():
        settle = cli.settles(args.settle_ms)[0]  # (checked before anything long)
        with cli.settled(settle):
            out = run(args)
        return {**out, "settle_ms": settle} if settle else out

    return cli.run(settled_run, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
