"""Probe (issue 16): does ACC spend the last layers' few kept rows on [SEP]?

For a trained classifier run folder, scores dev and test at several speedups twice: with
ACC as it is, and with each example's [SEP] (its last real token) ranked below every other
real row, so it is dropped before any word. Also counts, per eliminating layer, how often
[SEP] survives under plain ACC. No retraining; CPU is enough.

    python docs/probes/sep_rank.py RUN_DIR [--speedups 2,3,4.8]
"""
import argparse
import collections
import functools
import json
import sys

import jax
import jax.numpy as jnp

from accjax import acc as acc_lib
from accjax import evaluation

_LEN = []  # the traced [B] lengths of the batch being traced (set by Rows.create)
KEPT = collections.Counter()  # (rows in, keep) -> [SEP] kept in how many examples
SEEN = collections.Counter()

_create = acc_lib.Rows.create
_eliminate = acc_lib.eliminate


def create(mask, positions=None, token_types=None):
    rows = _create(mask, positions, token_types)
    _LEN[:] = [rows.mask.sum(axis=1)]
    return rows


def _count(rows_in, keep, kept):
    KEPT[(rows_in, keep)] += int(kept.sum())
    SEEN[(rows_in, keep)] += int(kept.shape[0])


def eliminate_factory(sep_last: bool):
    def eliminate(scores, keep, rows, *tensors):
        s = acc_lib.finished(scores)
        sep = (rows.positions == (_LEN[0] - 1)[:, None]) & rows.mask & (_LEN[0] > 1)[:, None]
        if sep_last:
            s = jnp.where(sep, -1e30, s)
        idx, new_rows, out = _eliminate(s, keep, rows, *tensors)
        kept = jnp.any(new_rows.positions == (_LEN[0] - 1)[:, None], axis=1)
        jax.debug.callback(functools.partial(_count, rows.mask.shape[1], keep), kept)
        return idx, new_rows, out
    return eliminate


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--speedups", default="2,3,4.8")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    speedups = [float(x) for x in a.speedups.split(",")]
    acc_lib.Rows.create = staticmethod(create)
    result = {}
    for name, sep_last in (("plain", False), ("sep_last", True)):
        KEPT.clear(), SEEN.clear()
        acc_lib.eliminate = eliminate_factory(sep_last)
        run = evaluation.RunModel.load(a.run)
        rows = evaluation.evaluate(run, speedups=speedups, include_test=True, repeats=1, progress=False,
                                   schedules={})
        result[name] = {"rows": [{k: r[k] for k in r if isinstance(r[k], (int, float, str))} for r in rows],
                        "sep_kept": {f"{t}->{k}": KEPT[(t, k)] / max(SEEN[(t, k)], 1) for (t, k) in sorted(SEEN)}}
        print(name, json.dumps(result[name], indent=1), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
