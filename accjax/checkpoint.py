"""Checkpoints for resume (orbax) and the run folder's exported model.

A run folder holds two kinds of saved parameters:

  * ``checkpoints/<step>/`` — orbax ``CheckpointManager`` items ``state`` (the whole
    ``TrainState``: params, optimizer state, step) and ``meta`` (JSON: seed, data position,
    best dev result so far). Written every N steps and at every epoch end, the newest
    ``keep`` kept; a restarted run restores the latest one straight into its shardings.
    Saves are collective: every process calls ``save``.
  * the run folder itself — the best parameters by dev metric as an accjax model folder
    (``accjax.json`` with the model config, task and training config; ``params.safetensors``;
    tokenizer files), written by process 0 only. ``convert.load(run_dir, head)`` and a
    ``Predictor`` need nothing else.

Saves are synchronous: a step's state is donated to the next step, so an asynchronous save
would race with it, and CPU-sized checkpoints take about a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from accjax import convert
from accjax.benchmark import json_default

log = logging.getLogger(__name__)


class Checkpointer:
    """The resume checkpoints of a run in ``run_dir/checkpoints`` (orbax ``CheckpointManager``),
    the newest ``keep`` kept."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` (a pytree of jax arrays) and ``meta`` (JSON data) as ``step``."""
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state laid out as ``abstract_state``'s shardings say, meta) of ``step``."""
        out = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest checkpoint that reads back whole; None: none saved.

        A newer checkpoint that fails to read (a torn or corrupted file) is skipped with a
        warning naming it; once an older one has restored, the unreadable ones are moved to
        ``checkpoints.corrupt/`` (kept for inspection; the run will save those steps again).

        Raises:
          CheckpointError when checkpoints exist and none of them reads back.
        """
        steps, broken, first_error = sorted(self.all_steps(), reverse=True), [], None
        for step in steps:
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # orbax / TensorStore raise many types for a damaged file
                reason = " ".join(str(e).split())[:200] or type(e).__name__
                first_error = first_error or f"{type(e).__name__}: {reason}"
                log.warning("checkpoint at step %d in %s is unreadable (%s): falling back to an "
                            "older one", step, self.directory, reason)
                broken.append(step)
                continue
            if broken:
                print(f"warning: the checkpoint(s) at step {', '.join(map(str, broken))} in "
                      f"{self.directory} are unreadable; resuming from the intact one at step "
                      f"{step}", flush=True)
                self._set_aside(broken)
            return int(step), state, meta
        if steps:
            raise convert.CheckpointError(
                f"none of the checkpoints in {self.directory} (steps {steps}) reads back "
                f"({first_error}); delete that folder to start the run over")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        import jax

        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + ".corrupt")
            aside.mkdir(exist_ok=True)
            for step in steps:
                dst = aside / str(step)
                if dst.exists():
                    shutil.rmtree(dst)
                os.replace(self.directory / str(step), dst)
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def restore_params(run_dir: str | os.PathLike, step: int | None = None) -> tuple[dict, dict[str, Any]]:
    """The parameters (numpy, nested dicts) and meta of a run's checkpoint (default: latest),
    saved on any mesh, read onto this process's first device (for inspection and tests)."""
    import jax

    directory = Path(run_dir).absolute() / "checkpoints"
    mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                item_handlers={"state": ocp.StandardCheckpointHandler(),
                                               "meta": ocp.JsonCheckpointHandler()})
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                              mgr.item_metadata(step)["state"])
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                        meta=ocp.args.JsonRestore()))
    finally:
        mgr.close()
    return jax.tree.map(np.asarray, out.state["params"]), out.meta


def export_model(run_dir: str | os.PathLike, family, model_config, params: Any, head: str, *,
                 tokenizer_from: str | os.PathLike | None, extra: dict[str, Any]) -> Path:
    """Writes the run folder's model: accjax.json + params.safetensors + tokenizer files.

    Written into a temporary folder first and moved into place with ``accjax.json`` last, so
    an interrupted export never leaves new metadata beside old parameters.
    """
    run_dir = Path(run_dir)
    tmp = run_dir / ".export-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    convert.save_accjax(family, model_config, params, head, tmp, tokenizer_from=tokenizer_from,
                        extra=json.loads(json.dumps(extra, default=json_default)))
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != convert.ACCJAX_META] + [convert.ACCJAX_META]:
        os.replace(tmp / name, run_dir / name)
    tmp.rmdir()
    return run_dir


def model_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of a model folder's parameters: what a table measured beside it (offline-tuning)
    records, so a table left by other weights (a re-export, a copied folder) is not reused."""
    from accjax import hub

    return hub.sha256_of(Path(folder) / convert.ACCJAX_PARAMS)

