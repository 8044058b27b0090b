"""Probe: where the test suite's time goes, per test: its wall time, the XLA compiles it ran
(count and seconds) and the seconds JAX spent tracing and lowering, from ``jax.monitoring``'s
duration events. A pytest plugin; each xdist worker writes ``PREFIX.<worker>.json``; run as a
script it prints per-file and per-test tables from those files (two runs: the second's change).
Tests that start processes of their own count their wall time only.

    PYTHONPATH=docs/probes COMPILE_STATS=/tmp/cs python -m pytest -q -p compile_stats
    python docs/probes/compile_stats.py /tmp/cs                # per file, then the slowest tests
    python docs/probes/compile_stats.py /tmp/cs_before /tmp/cs  # and what changed, test by test
"""
import glob
import json
import os
import sys
import time

import pytest

EVENTS = {"/jax/core/compile/backend_compile_duration": "compile_s",
          "/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s"}
_now = {"compiles": 0, "compile_s": 0.0, "trace_s": 0.0, "lower_s": 0.0}
_rows: list[dict] = []


def _on_duration(event, duration, **kw):
    key = EVENTS.get(event)
    if key is not None:
        _now[key] += duration
        _now["compiles"] += key == "compile_s"


def _listen():
    """(Re-)registers the listener: a test may have cleared JAX's listeners."""
    import jax

    from jax._src import monitoring
    if _on_duration not in monitoring.get_event_duration_listeners():
        jax.monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001 (pytest's hook signature)
    """Around the test's setup, call and teardown (in the process that runs it: an xdist
    worker relays the log hooks to its controller)."""
    _listen()
    for k in _now:
        _now[k] = 0
    t0 = time.perf_counter()
    yield
    _rows.append({"id": item.nodeid, "wall_s": time.perf_counter() - t0, **_now})


def pytest_sessionfinish(session):  # noqa: ARG001
    prefix = os.environ.get("COMPILE_STATS", "compile_stats")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if _rows:
        with open(f"{prefix}.{worker}.json", "w") as f:
            json.dump(_rows, f)


def load(prefix: str) -> dict[str, dict]:
    rows = {}
    for path in sorted(glob.glob(f"{prefix}.*.json")):
        for r in json.load(open(path)):
            rows[r["id"]] = {**r, "worker": path.rsplit(".", 2)[-2]}
    return rows


def report(rows: dict[str, dict], top: int = 30) -> None:
    total = {k: sum(r[k] for r in rows.values()) for k in ("wall_s", "compile_s", "trace_s", "lower_s", "compiles")}
    workers = {}
    for r in rows.values():
        workers[r["worker"]] = workers.get(r["worker"], 0.0) + r["wall_s"]
    print(f"{len(rows)} tests, {total['wall_s']:.0f} s of test time ("
          + ", ".join(f"{w} {s:.0f}" for w, s in sorted(workers.items())) + f"); XLA compiles "
          f"{total['compiles']:.0f} in {total['compile_s']:.0f} s, tracing {total['trace_s']:.0f} s, "
          f"lowering {total['lower_s']:.0f} s")
    files: dict[str, list[float]] = {}
    for r in rows.values():
        f = files.setdefault(r["id"].split("::")[0], [0, 0.0, 0.0, 0])
        f[0] += 1
        f[1] += r["wall_s"]
        f[2] += r["compile_s"]
        f[3] += r["compiles"]
    print(f"\n{'file':44s} {'tests':>5s} {'wall s':>7s} {'compile s':>9s} {'compiles':>8s}")
    for name, (n, w, c, k) in sorted(files.items(), key=lambda x: -x[1][1])[:top]:
        print(f"{name:44s} {n:5d} {w:7.1f} {c:9.1f} {k:8d}")
    print(f"\n{'wall s':>7s} {'compile s':>9s} {'compiles':>8s}  test")
    for r in sorted(rows.values(), key=lambda r: -r["wall_s"])[:top]:
        print(f"{r['wall_s']:7.1f} {r['compile_s']:9.1f} {r['compiles']:8d}  {r['id']}")


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[-2].strip(), file=sys.stderr)
        return 2
    runs = [load(p) for p in argv]
    for prefix, rows in zip(argv, runs):
        if not rows:
            print(f"no {prefix}.*.json: run pytest with this plugin first (see the docstring)", file=sys.stderr)
            return 2
    report(runs[-1])
    if len(runs) == 2:
        before, after = runs
        diff = sorted((after[k]["wall_s"] - before[k]["wall_s"], k) for k in after if k in before)
        print(f"\nchanged most ({argv[0]} -> {argv[1]}), wall s:")
        for d, k in diff[:10] + diff[::-1][:10]:
            print(f"{d:+7.1f} {before[k]['wall_s']:7.1f} -> {after[k]['wall_s']:7.1f}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
