"""eval.scaling on 8 fake CPU devices: the cross-mesh check passes, can fail, and the JSON holds the rows."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np

from accjax import sharding
from eval import scaling
from tests.train_helpers import REPO, subprocess_env

MESHES = ["1 device", "8 data", "4 data x 2 fsdp"]


def test_tiny_run_agrees_across_meshes_and_writes_rows(tmp_path):
    out = tmp_path / "scaling.json"
    # A fresh process on 8 fake devices, with `datasets` made unimportable (the GPU image has
    # none) and no NCCL_NVLS_ENABLE in the environment (the script must set it to 0 itself).
    code = ("import sys; sys.modules['datasets'] = None; from eval import scaling; "
            f"sys.exit(scaling.main(['--tiny', '--dtype', 'float32', '--iters', '2', '--warmup', '1', "
            f"'--json', {str(out)!r}]))")
    env = subprocess_env(8)
    env.pop("NCCL_NVLS_ENABLE", None)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "check: PASS" in p.stdout and "strong scaling" in p.stdout and "weak scaling" in p.stdout
    r = json.loads(out.read_text())

    assert r["machine"]["device_count"] == 8 and r["jax_version"] == r["machine"]["jax"]
    assert r["nccl_nvls_enable"] == "0" and r["matmul_precision"] == "highest"
    assert [m["name"] for m in r["meshes"]] == MESHES and r["skipped"] == []
    assert r["meshes"][2]["shape"] == {"data": 4, "fsdp": 2}
    for m in r["meshes"]:  # every program traced once: the timed steps reused the checked ones
        assert m["traces"] == m["programs"], m
    assert [m["programs"] for m in r["meshes"]] == [4, 2, 2]  # 1 device: strong and weak batches

    # The check, as the float32 CPU test states it: 1e-5, and the parameters really moved.
    assert r["check_passed"] is True
    assert r["tolerances"] == {"loss": 1e-5, "grad_norm": 1e-5, "param": 1e-5, "update": None}
    assert r["elim_schedule"] is not None and max(r["elim_schedule"]) < r["length"]
    for mesh in MESHES:
        for mode in ("dense", "elim"):
            c = r["check"][mesh][mode]
            assert c["passed"] and all(c["ok"].values()), (mesh, mode, c)
            assert c["max_abs_loss_diff"] <= 1e-5 and c["max_abs_param_diff"] <= 1e-5, (mesh, mode)
            assert c["max_abs_param_update"] > 1e-4, (mesh, mode)
            assert len(c["loss"]) == 3 and all(np.isfinite(c["loss"]))
    # Dense and elim@3 are different computations: their losses differ.
    assert r["check"]["1 device"]["dense"]["loss"] != r["check"]["1 device"]["elim"]["loss"]

    rows = r["rows"]
    assert len(rows) == 2 * 3 * 2  # (strong, weak) x meshes x (dense, elim)
    by = {(x["scaling"], x["mesh"], x["mode"]): x for x in rows}
    for scaling_kind in ("strong", "weak"):
        for mode in ("dense", "elim@3"):
            one = by[(scaling_kind, "1 device", mode)]
            assert one["efficiency"] == 1.0 and one["devices"] == 1
            for mesh in MESHES[1:]:
                x = by[(scaling_kind, mesh, mode)]
                assert x["devices"] == 8 and x["per_device_batch"] * 8 == x["global_batch"]
                assert x["examples_per_s"] > 0 and x["step_ms"] > 0
                np.testing.assert_allclose(x["examples_per_s"], x["global_batch"] / (x["step_ms"] / 1e3))
                np.testing.assert_allclose(x["efficiency"], x["examples_per_s"] / (8 * one["examples_per_s"]))
    assert by[("strong", "1 device", "dense")]["global_batch"] == 16
    assert by[("weak", "1 device", "dense")]["global_batch"] == 2
    assert all(x["global_batch"] == 16 for x in rows if x["scaling"] == "strong")
    # FSDP really splits parameters over 2 devices; data parallelism replicates them.
    dp = by[("strong", "8 data", "dense")]["param_bytes_per_device"]
    fsdp = by[("strong", "4 data x 2 fsdp", "dense")]["param_bytes_per_device"]
    assert by[("strong", "1 device", "dense")]["param_bytes_per_device"] == dp
    assert fsdp < 0.6 * dp


def test_check_fails_on_another_dropout_key():
    """The comparison can fail: the same 3 steps with another dropout key (a real fault, e.g.
    a mesh that drew its own key) break the float32 tolerances, and a grad norm scaled by the
    device count breaks the grad-norm bound although Adam's updates hardly change."""
    import argparse

    setup = scaling.build("bert-base-uncased", "float32", tiny=True)
    batches = scaling.random_batches(setup, 8, 16, seed=0)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    tol = scaling.TOLERANCES["float32"]
    results = []
    for seed in (0, 1):
        args = argparse.Namespace(lr=1e-4, acc_variant="plain", seed=seed, dropout=True)
        tr = scaling.make_trainer(setup, mesh, sharding.DP_RULES, args)
        state, res = scaling.check_steps(tr, setup.params, batches, None)
        res["params"] = sharding.to_host(state.params)
        results.append(res)
    same = scaling.compare(results[0], results[0], setup.params, tol, 1e-4)
    assert same["passed"] and same["max_abs_param_diff"] == 0.0
    other = scaling.compare(results[0], results[1], setup.params, tol, 1e-4)
    assert not other["passed"]
    assert not other["ok"]["param"] and not other["ok"]["loss"], other
    assert other["rel_update_diff"] > 0.3  # beyond even the bf16 bound
    scaled = dict(results[0], grad_norm=[8 * g for g in results[0]["grad_norm"]])
    bad = scaling.compare(results[0], scaled, setup.params, tol, 1e-4)
    assert not bad["ok"]["grad_norm"] and bad["ok"]["param"]
    # Parameters that did not move prove nothing, so they fail too.
    still = dict(results[0], params=setup.params)
    assert not scaling.compare(still, still, setup.params, tol, 1e-4)["ok"]["moved"]
