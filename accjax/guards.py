"""Checks that turn bad input and bad numbers into one clear sentence, before the long work.

Two kinds of failure, kept apart: a USER error (a flag, a config value, a file, a path:
``UserError`` or a library error registered with ``user_error``), which entry points print
as ``error: <message>`` on one line, exit 2, no traceback; and a NUMERIC failure while
training (``NonFiniteError``: a NaN / inf loss, gradient norm or parameter), naming the
step, so a diverged run stops instead of exporting a NaN model as its best.

Example::

    positive_int(0, "--batch_size")      # UserError: --batch_size must be an integer >= 1, got 0
    check_finite_metrics([{"loss": 0.7}, {"loss": float("nan")}], first_step=5)
    # NonFiniteError: training diverged at step 6: loss is nan ...
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np


class UserError(ValueError):
    """Bad input a user can fix; the message says how."""


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or an infinity (loss, gradient norm or a parameter)."""


_USER_ERRORS: list[type[BaseException]] = [UserError]


def user_error(cls: type[BaseException]) -> type[BaseException]:
    """Class decorator: ``cls`` means bad input (each module owns its error type and lists it
    here, so this module imports none of them)."""
    _USER_ERRORS.append(cls)
    return cls


@user_error
class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (``accjax.convert``, ``accjax.gguf_io``); the
    message names every offending key."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Every exception type that means "bad input": printed in one line, exit 2."""
    return tuple(_USER_ERRORS)


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    """Runs ``fn``; a user error -> ``error: ...`` on stderr and exit 2; a NonFiniteError ->
    one line and exit 1 (the run stopped; its last good checkpoint is kept)."""
    try:
        return fn()
    except (*user_errors(), NonFiniteError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(e, NonFiniteError) else 2)


def one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split())


# ------------------------------------------------------------------------------- values
# Evaluation batches above this many rows only add filler rows and memory (100,000 rows of
# MiniLM at length 64 were killed at 24 GB); the CLIs refuse them up front.
EVAL_BATCH_LIMIT = 4096


def positive_int(value: Any, name: str, *, maximum: int | None = None, hint: str = "") -> int:
    """``value`` as an int >= 1 (and <= ``maximum``), else a UserError naming ``name``."""
    try:
        v = int(value)
        ok = v == float(value)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or v < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    if maximum is not None and v > maximum:
        raise UserError(f"{name} {v} is larger than {maximum}{': ' + hint if hint else ''}")
    return v


def finite_number(value: Any, name: str, *, minimum: float | None = None,
                  above: float | None = None) -> float:
    """``value`` as a finite float (>= ``minimum``, > ``above``), else a UserError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and v < minimum:
        raise UserError(f"{name} must be >= {minimum:g}, got {v:g}")
    if above is not None and not v > above:
        raise UserError(f"{name} must be > {above:g}, got {v:g}")
    return v


def check_optim(optim: Any) -> None:
    """The optimizer values of a training config: finite, in range (a NaN learning rate would
    otherwise train a NaN model to the end)."""
    finite_number(optim.lr, "config: optim.lr", above=0.0)
    finite_number(optim.weight_decay, "config: optim.weight_decay", minimum=0.0)
    w = finite_number(optim.warmup_ratio, "config: optim.warmup_ratio", minimum=0.0)
    if w > 1:
        raise UserError(f"config: optim.warmup_ratio must be in [0, 1], got {w:g}")
    finite_number(optim.clip, "config: optim.clip")
    for name in ("b1", "b2"):
        b = finite_number(getattr(optim, name), f"config: optim.{name}", minimum=0.0)
        if b >= 1:
            raise UserError(f"config: optim.{name} must be in [0, 1), got {b:g}")
    finite_number(optim.eps, "config: optim.eps", above=0.0)
    d = finite_number(optim.get("layer_decay", 1.0), "config: optim.layer_decay", above=0.0)
    if d > 2:
        raise UserError(f"config: optim.layer_decay must be in (0, 2] (1: the same rate everywhere), got {d:g}")
    a = finite_number(optim.get("average", 0.0), "config: optim.average", minimum=0.0)
    if a >= 1:
        raise UserError(f"config: optim.average must be in [0, 1) (0: no weight average), got {a:g}")


# -------------------------------------------------------------------------------- paths
def writable_file(path: str | os.PathLike, name: str) -> Path:
    """A file path we will be able to write at the END of a long job; checked at its start."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{name} {p} is a folder; give a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"cannot write {name} {p}: the file is read-only")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {name} {p}: {parent} is not a writable folder")
    return p


def writable_dir(path: str | os.PathLike, name: str) -> Path:
    """A folder we will write into (created later if missing); checked up front."""
    p = Path(path)
    probe = p
    while not probe.exists():  # the nearest existing ancestor must let us create it
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write {name} {p}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise UserError(f"cannot write {name} {p}: {probe} is not writable (pass another folder)")
    return p


# ------------------------------------------------------------------------------ numbers
def check_finite_metrics(records: Sequence[Mapping[str, Any]], first_step: int,
                         keys: Sequence[str] = ("loss", "grad_norm")) -> None:
    """Raises NonFiniteError at the first record whose ``keys`` hold a NaN or an infinity.

    Args:
      records: host metrics of consecutive steps, record i for step ``first_step + i``
        (the step count AFTER that update, as the run reports steps).
    """
    for i, rec in enumerate(records):
        bad = {k: float(np.asarray(rec[k])) for k in keys if k in rec
               and not np.isfinite(np.asarray(rec[k])).all()}
        if bad:
            what = ", ".join(f"{k} is {v}" for k, v in bad.items())
            raise NonFiniteError(
                f"training diverged at step {first_step + i}: {what}; stopped without exporting. "
                "Lower optim.lr (or keep optim.clip > 0); the run folder keeps the last good "
                "checkpoint and best model")


@functools.cache
def _all_finite():
    """One jitted check for every call (a new lambda each call compiled again every time)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])


def check_finite_params(params: Any, step: int) -> None:
    """Raises NonFiniteError naming the step and the first parameter holding a NaN / inf."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(params)
    flags = jax.device_get(_all_finite()([x for _, x in leaves]))
    for (path, _), ok in zip(leaves, flags):
        if not bool(ok):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise NonFiniteError(
                f"training diverged at step {step}: parameter {name} holds NaN or inf; stopped "
                "without saving or exporting it. Lower optim.lr (or keep optim.clip > 0)")
