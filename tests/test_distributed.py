"""Two local processes through jax.distributed (CPU collectives over gloo) vs one process."""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
import pytest

from accjax import checkpoint
from tests.train_helpers import REPO, finetune_cmd, free_port, run_finetune, sentiment_task, subprocess_env


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    if "jax_cpu_collectives_implementation" not in jax.config.values:
        pytest.skip(f"jax {jax.__version__} has no CPU cross-process collectives (jax_cpu_collectives_implementation)")
    task = sentiment_task(tmp_path / "data", n_train=64, n_dev=32)
    base = {"task": task, "max_examples": 0, "length_buckets": (32,), "max_length": 32, "eval.speedups": (1.0,),
            "epochs": 2, "checkpoint.every_steps": 3, "checkpoint.keep": 10, "progress": False}
    port = free_port()
    dist_dir = tmp_path / "two"
    procs = [subprocess.Popen(
        finetune_cmd("tiny", {**base, "run_dir": dist_dir}), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=subprocess_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                           JAX_PROCESS_ID=i)) for i in range(2)]  # 2 processes x 2 CPU devices
    single = run_finetune("tiny", {**base, "run_dir": tmp_path / "one"}, devices=1)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert single.returncode == 0, single.stderr[-4000:]

    summary = json.loads((dist_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["mesh"] == {"data": 4, "fsdp": 1}
    assert "epoch 1" in outs[0][0] and "epoch 1" not in outs[1][0]  # only process 0 reports
    got, meta = checkpoint.restore_params(dist_dir)
    want, meta1 = checkpoint.restore_params(tmp_path / "one")
    assert meta["step"] == meta1["step"] == 8
    got, want = _flat(got), _flat(want)
    moved = _flat(checkpoint.restore_params(tmp_path / "one", step=3)[0])
    assert max(float(np.abs(want[k] - moved[k]).max()) for k in want) > 1e-4  # training moved them
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)
    # the same dev predictions, so the same recorded dev accuracy
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert [r["accuracy"] for r in summary["final"]] == [r["accuracy"] for r in one["final"]]
