"""Scores a classification run folder at several speedups, from the folder alone.

    python -m train.evaluate runs/rt_minilm_dense
    python -m train.evaluate runs/rt_minilm_elastic --speedups 1,1.5,2,3,4 --splits validation,test

A thin entry over ``accjax.evaluation.evaluate_folder`` (the evaluation ``eval.glue`` and
training use): model, tokenizer, task and data settings come from the run folder; prints a
table and writes ``eval.json`` into the folder (or ``--out``).
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import argparse
import json
import sys
from pathlib import Path

from eval import cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a run folder written by train.finetune")
    ap.add_argument("--speedups", default=None, help="comma-separated speedups (default: the run's eval.speedups)")
    ap.add_argument("--splits", default=None, help="comma-separated splits (default: labelled dev and test)")
    ap.add_argument("--batch_size", type=int, default=None, help="default: the run's eval_batch_size")
    ap.add_argument("--data_dir", default=None, help="task files, if not where training read them")
    ap.add_argument("--out", default=None, help="JSON output (default RUN_DIR/eval.json)")
    args = ap.parse_args(argv)

    from accjax import evaluation, guards

    def run():
        out = Path(args.out) if args.out else Path(args.run_dir) / "eval.json"
        if args.batch_size is not None:
            cli.batch_size(args.batch_size)
        if Path(args.run_dir).is_dir():  # written after the work: checked before it
            guards.writable_file(out, "--out" if args.out else "eval.json in the run folder")
        rows = evaluation.evaluate_folder(
            args.run_dir, splits=cli.words(args.splits),
            speedups=cli.speedups(args.speedups, "--speedups") if args.speedups else None,
            batch_size=args.batch_size, data_dir=args.data_dir)
        print(evaluation.format_table(rows))
        out.write_text(json.dumps({"run_dir": str(args.run_dir), "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")

    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
