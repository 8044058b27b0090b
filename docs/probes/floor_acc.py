"""Probe (issue 17): what a smallest keep-length (``schedule.plan``'s ``floor``) costs in dev
accuracy on a trained classifier run folder, with no retraining.

Scores the dev split at 1, 2, 3, 4 and 4.8x with the run's floor replaced by 1, 2, 4 and 8
(``evaluation.evaluate`` with the decay, nothing timed) and writes every row as JSON.

    python docs/probes/floor_acc.py RUN_FOLDER out.json
"""
import dataclasses
import json
import sys
import time

from accjax import evaluation as E

run = E.RunModel.load(sys.argv[1])
print("buckets", run.buckets, "floor", run.floor, "prune_every", run.prune_every, flush=True)
out = []
for f in (1, 2, 4, 8):
    t = time.time()
    rows = E.evaluate(dataclasses.replace(run, floor=f), speedups=[1, 2, 3, 4, 4.8], repeats=0,
                      progress=False, schedules={})
    for row in rows:
        out.append({"floor": f, **{k: row[k] for k in ("split", "speedup", "analytic_speedup", "primary", "schedules")}})
        print(f, row["split"], row["speedup"], round(row["analytic_speedup"], 2), round(row["primary"], 2),
              row["schedules"], flush=True)
    print("took", round(time.time() - t), flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
