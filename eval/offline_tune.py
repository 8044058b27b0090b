"""Offline-tuning: sweep speedups on the dev set (no training) and record metric and latency.

    python -m eval.offline_tune --checkpoint runs/rt_minilm_elastic
    python -m eval.offline_tune --checkpoint runs/sst2 --speedups 1,1.5,2,3,4 --data_dir /data/glue
    python -m eval.offline_tune --checkpoint runs/rt --speedups 1,2,3,4.8 --search --json tune.json

Writes ``offline_tune.json`` / ``.md`` / ``.png`` beside the checkpoint (or into ``--out``);
``python -m eval.glue --max_drop X`` then runs the fastest level whose dev drop is at most X.
Without ``--checkpoint``: the embedded default. ``--search`` first searches keep-length
schedules per level and length bucket on the dev split (``accjax.search``; the test split is
never read), ``--batch_sizes 1,8,64`` also times every level's program per batch size and
length (``accjax.evaluation.offline_tune`` says what is measured and how it is picked).
``--prune_every K`` plans every level with rows dropped only in layers 1, 1 + K, ... (default:
the run's own, as trained); a list (``--prune_every 1,2,3``) scores and times every level at
each stride, so ``eval.glue --max_drop`` runs the fastest (level, stride) within the drop.
The table stores them; ``--search``'s schedules run at K = 1, which it needs among them.
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import argparse
import sys
from pathlib import Path

from eval import cli


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.offline_tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="run folder (default: the embedded default)")
    ap.add_argument("--speedups", default=None, help="comma list (default 1, 1.5, ... up to the maximum)")
    ap.add_argument("--split", default=None, help="default: the task's dev split")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--out", default=None, help="folder for the table and plot (default: the checkpoint)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per level, interleaved")
    ap.add_argument("--search", action="store_true", help="search schedules per level on dev first")
    ap.add_argument("--candidates", type=int, default=4,
                    help="schedules scored per level and length bucket by --search (the decay included)")
    ap.add_argument("--batch_sizes", default=None,
                    help="also time every level's program per batch size and length, e.g. 1,8,64")
    ap.add_argument("--prune_every", default=None,
                    help="k > 1: only layers 1, 1 + k, ... drop rows; a comma list, e.g. 1,2,3, "
                         "tunes every level at each (default: the run's, as trained)")
    ap.add_argument("--floor", default=None,
                    help="the smallest keep-length a layer may have; a comma list, e.g. 1,16, tunes every "
                         "level and stride at each (default: the run's, as trained; GPUs run layers with "
                         "few rows at a fixed cost per kernel, docs/benchmarks.md)")
    cli.add_settle(ap)
    ap.add_argument("--json", default=None, help="also write the table (with the machine) here")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    from accjax import evaluation, guards, loop

    def run():
        speedups = cli.speedups(args.speedups, "--speedups") if args.speedups else None
        cli.batch_size(args.batch_size)
        guards.positive_int(args.candidates, "--candidates")
        sizes = [cli.batch_size(b, "--batch_sizes") for b in cli.ints(args.batch_sizes, "--batch_sizes", low=1)
                 ] if args.batch_sizes else []
        guards.positive_int(args.repeats, "--repeats")
        settle = cli.settles(args.settle_ms)[0]
        every = cli.ints(args.prune_every, "--prune_every", low=1) if args.prune_every is not None else None
        floor = cli.ints(args.floor, "--floor", low=1) if args.floor is not None else None
        if args.out or args.checkpoint:  # the table is written after the sweep: check first
            guards.writable_dir(args.out or args.checkpoint, "--out" if args.out else "--checkpoint")
        ckpt = Path(args.checkpoint) if args.checkpoint else loop.ensure_default_run()
        with cli.settled(settle):
            table = evaluation.offline_tune(evaluation.RunModel.load(ckpt), speedups=speedups,
                                            batch_size=args.batch_size, data_dir=args.data_dir,
                                            split=args.split, progress=args.progress, out_dir=args.out,
                                            repeats=args.repeats, search=args.candidates if args.search else 0,
                                            batch_sizes=sizes, prune_every=every, floor=floor)
        print(evaluation.tune_markdown(table))
        print(f"wrote {Path(args.out) if args.out else ckpt}/{evaluation.TUNE_FILE}.json, .md and .png")
        return table

    return cli.run(run, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
