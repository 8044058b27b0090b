"""Tiny training setups: a learnable sentiment CSV task and the tiny rt_minilm config."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
POS = "good great fine fun loved wonderful".split()
NEG = "bad awful boring dull hated terrible".split()
FILLER = "the movie film plot was is a and it this".split()


def sentiment_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """n (text, label) rows: label 'pos' iff the text holds more positive than negative words."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        k = int(rng.integers(1, 4))
        words = list(rng.choice(POS if label else NEG, k)) + list(rng.choice(FILLER, int(rng.integers(2, 8))))
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if label else "neg"))
    return rows


def write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows(rows)
    return path


def sentiment_task(folder: Path, n_train: int = 96, n_dev: int = 32, *, extra_train=()) -> str:
    """Writes train/dev/test CSVs; returns the task spec."""
    folder = Path(folder)
    train = write_csv(folder / "train.csv", sentiment_rows(n_train, 0) + list(extra_train))
    dev = write_csv(folder / "dev.csv", sentiment_rows(n_dev, 1))
    test = write_csv(folder / "test.csv", sentiment_rows(n_dev, 2))
    return f"csv:train={train},dev={dev},test={test},text=sentence,label=label"


def load_config_file(name: str, arg: str | None = None):
    """``configs/<name>.py``'s ``get_config(arg)``."""
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def tiny_config(run_dir: Path, task: str, arg: str = "tiny", **overrides):
    """The tiny rt_minilm config on ``task``, one length bucket and one eval speedup by default."""
    c = load_config_file("rt_minilm", arg)
    c.task = task
    c.run_dir = str(run_dir)
    c.max_examples = 0
    c.length_buckets = (32,)
    c.max_length = 32
    c.eval.speedups = (1.0,)
    c.eval.select_speedup = 1.0
    c.eval.select_mean = False
    c.progress = False
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def flags_for(overrides: dict) -> list[str]:
    """--config.key=value flags for a subprocess."""
    out = []
    for k, v in overrides.items():
        if isinstance(v, (tuple, list)):
            v = "(" + ",".join(repr(x) for x in v) + ("," if len(v) == 1 else "") + ")"
        out.append(f"--config.{k}={v}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def xla_flags(devices: int) -> str:
    """Test processes: ``devices`` fake CPU devices, XLA's backend (LLVM) optimisation off and
    its older loop emitters for fusions. The tests are dominated by compiling tiny programs,
    which O0 does 2-3x faster, and the loop emitters 1.5-3x faster again than the MLIR fusion
    emitters (a tiny train step 1.8 -> 0.7 s, an eager op 32 -> 15 ms, 2026-12-08). XLA's graph
    passes still run; fp32 dots may sum in another order, so a bound that measures the default
    code's rounding compiles at level 3 with the fusion emitters itself (test_llama_real's logits
    parity, through its compile options)."""
    return (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
            " --xla_cpu_use_fusion_emitters=false")


@contextlib.contextmanager
def compile_cache_in(folder: Path):
    """JAX's persistent compilation cache on in ``folder`` (a run's own
    ``compile_cache.enable()`` keeps that folder), then off again and its switch as it was."""
    from accjax import compile_cache

    old = os.environ.get(compile_cache.ENV_SWITCH)
    os.environ[compile_cache.ENV_SWITCH] = "1"
    try:
        yield compile_cache.enable(folder)
    finally:
        compile_cache.enable(enabled=False)
        if old is None:
            os.environ.pop(compile_cache.ENV_SWITCH, None)
        else:
            os.environ[compile_cache.ENV_SWITCH] = old


def subprocess_env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["ACCJAX_COMPILE_CACHE"] = "0"  # even under shared_compile_cache: a run's default folder is the user's
    env.update({k: str(v) for k, v in extra.items()})
    return env


def finetune_cmd(config_arg: str, overrides: dict) -> list[str]:
    return [sys.executable, "-m", "train.finetune", f"--config={REPO / 'configs' / 'rt_minilm.py'}:{config_arg}",
            *flags_for(overrides)]


def run_finetune(config_arg: str, overrides: dict, *, devices: int = 1, timeout: int = 300, **env):
    return subprocess.run(finetune_cmd(config_arg, overrides), cwd=REPO, env=subprocess_env(devices, **env),
                          capture_output=True, text=True, timeout=timeout)
