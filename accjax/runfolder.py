"""The run folder's rules: one writer at a time, resume only the same run, survive torn files.

A run folder (``train.finetune``'s ``run_dir``) is written by one training process at a time
(``lock``: an exclusive ``flock`` on ``run_dir/.lock``, which the kernel drops when its process
ends, however it ends: a SIGKILL leaves no stale lock). A restart must train the same thing
(``check_resume``: against the config INSIDE the newest readable checkpoint too, so deleting
``train_config.json`` does not bypass the check), survives a torn last line of
``metrics.jsonl`` (``read_jsonl``) and changes nothing once the run finished (``finished``).
Tools that write model folders never overwrite a run folder (``refuse_writing_into_run``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Callable

from accjax import guards
from accjax.guards import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # resolved run folder -> open lock fd (this process)


@guards.user_error
class RunFolderBusy(UserError):
    """Another process is writing this run folder (wait, or pick another: exit 2)."""


# --------------------------------------------------------------------------------- lock
def lock(run_dir: str | os.PathLike) -> Path:
    """Takes the run folder's exclusive lock for this process (created if missing).

    Held until ``unlock`` or the process ends. Taking it again in the same process is a
    no-op, so an in-process caller that failed half-way can simply start again.

    Raises:
      RunFolderBusy naming the pid that holds it.
    """
    import fcntl

    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _held:
        return run_dir
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise RunFolderBusy(
            f"run folder {run_dir} is in use by another training process (pid {_read_pid(path)}); "
            "wait for it to finish (or stop it), or pass another --config.run_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd
    return run_dir


def unlock(run_dir: str | os.PathLike) -> None:
    """Releases this process's lock of ``run_dir`` (no-op when not held)."""
    fd = _held.pop(str(Path(run_dir).absolute().resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------- resume
def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the committed resume checkpoints in ``run_dir/checkpoints``, newest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    # orbax writes into "<step>.orbax-checkpoint-tmp-*" and renames: a digits-only name is whole
    return sorted((int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                  reverse=True)


def _read_json(path: Path) -> dict | None:
    """A JSON object file's content; None when absent, unreadable, torn or not an object."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def check_resume(run_dir: str | os.PathLike, config: dict,
                 compare: Callable[[dict, dict], None]) -> None:
    """Before a run resumes, the config it will train with must be the one it was started with.

    Compared (with ``compare(saved, current)``, which raises on a difference) against the
    config recorded in the newest checkpoint whose meta is readable, and against
    ``train_config.json`` when present. No checkpoint: nothing to resume, nothing to check.
    """
    run_dir = Path(run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps:
        return
    metas = (_read_json(run_dir / "checkpoints" / str(step) / "meta" / "metadata") for step in steps)
    recorded = next((m.get("config") for m in metas if m is not None), None)
    saved = _read_json(run_dir / "train_config.json")  # torn: the checkpoint's copy is the record
    try:
        for one in (recorded, saved):
            if one is not None:
                compare(one, config)
    except ValueError as e:  # a user's choice (another config), not a fault: exit 2
        raise UserError(str(e)) from None
    if recorded is None and saved is None:
        log.warning("%s has checkpoints but neither train_config.json nor a config inside them "
                    "(an older run): resuming without checking the config", run_dir)


# -------------------------------------------------------------------------------- jsonl
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file; a line that is not a whole JSON object (a write torn by a
    killed process) is skipped with a warning instead of failing every later restart."""
    path = Path(path)
    if not path.exists():
        return []
    out, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                out.append(rec)
            else:
                bad.append(n)
    if bad:
        log.warning("%s: skipped %d unreadable line(s) (%s), e.g. a write torn by a killed "
                    "process", path, len(bad), ", ".join(map(str, bad[:5])))
    return out


def replace_text(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path``'s contents with ``text`` atomically (a temporary file renamed into
    place): a process killed while writing leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rewrite_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Replaces ``path`` with ``records``, atomically (``replace_text``)."""
    replace_text(path, "".join(json.dumps(r) + "\n" for r in records))


# ----------------------------------------------------------------------------- finished
def finished(run_dir: str | os.PathLike, total_steps: int) -> dict | None:
    """The ``summary.json`` of a run that already completed ``total_steps`` steps, else None."""
    summary = _read_json(Path(run_dir) / "summary.json")
    return summary if summary and int(summary.get("steps") or -1) == int(total_steps) else None


# ------------------------------------------------------------------------ other writers
def is_run_folder(folder: str | os.PathLike) -> bool:
    """A folder written by ``train.finetune`` (its metadata must not be overwritten)."""
    folder = Path(folder)
    if (folder / "train_config.json").exists() or (folder / "checkpoints").is_dir():
        return True
    meta = _read_json(folder / "accjax.json") or {}
    return "train_config" in meta or "task" in meta


def refuse_writing_into_run(out: str | os.PathLike, src: str | os.PathLike | None = None) -> None:
    """Raises a UserError when ``out`` is the source folder or a training run's folder."""
    out = Path(out)
    if src is not None and out.exists() and Path(src).exists() and \
            out.resolve() == Path(src).resolve():
        raise UserError(f"the output folder {out} is the source folder; pass another output "
                        "folder (the source is never rewritten)")
    if out.exists() and is_run_folder(out):
        raise UserError(f"{out} is a training run's folder; its model and metadata are never "
                        "rewritten: pass a new output folder")

