"""Offline-tuning: sweep speedups on the dev set (no training) and record metric and latency.

    python -m eval.offline_tune --checkpoint runs/rt_minilm_elastic
    python -m eval.offline_tune --checkpoint runs/sst2 --speedups 1,1.5,2,3,4 --data_dir /data/glue

One training-free pass per speedup level on the dev split, latency measured on this machine
(compilation excluded). Writes, beside the checkpoint (or into ``--out``): the table
``offline_tune.json`` / ``offline_tune.md`` (speedup, keep-lengths, metric, drop vs dense,
measured and analytic speedup, ms per batch) and ``offline_tune.png`` (metric against the
analytic and the measured speedup). ``python -m eval.glue --max_drop X`` then runs the
fastest level whose dev drop is at most X. Without ``--checkpoint``: the embedded default.
"""

from __future__ import annotations

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
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    from accjax import evaluation, guards, loop

    def run():
        speedups = cli.speedups(args.speedups, "--speedups") if args.speedups else None
        cli.batch_size(args.batch_size)
        if args.out or args.checkpoint:  # the table is written after the sweep: check first
            guards.writable_dir(args.out or args.checkpoint, "--out" if args.out else "--checkpoint")
        ckpt = Path(args.checkpoint) if args.checkpoint else loop.ensure_default_run()
        table = evaluation.offline_tune(evaluation.RunModel.load(ckpt), speedups=speedups,
                                        batch_size=args.batch_size, data_dir=args.data_dir,
                                        split=args.split, progress=args.progress, out_dir=args.out,
                                        repeats=args.repeats)
        print(evaluation.tune_markdown(table))
        print(f"wrote {Path(args.out) if args.out else ckpt}/{evaluation.TUNE_FILE}.json, .md and .png")

    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
