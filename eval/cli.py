"""Command-line plumbing every ``eval`` (and ``train``) entry point shares: comma lists, a
preset or checkpoint for benchmarks, the one-line error and exit 2 for bad input, and the
``--json`` tail.

Entry points stay thin: they parse flags with these and call library functions.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit 2."""


def speedups(text: str, flag: str = "--speedup") -> list[float]:
    """'1.5,2,4.8' -> [1.5, 2.0, 4.8]: finite numbers >= 1 (1 = dense), duplicates scored once."""
    out = []
    for item in str(text).split(","):
        s = item.strip()
        if not s:
            continue
        try:
            v = float(s)
        except ValueError:
            raise UsageError(f"{flag}: {s!r} is not a number; write e.g. {flag} 2 or {flag} 1.5,2,4.8") from None
        if not (v >= 1 and math.isfinite(v)):
            raise UsageError(f"{flag}: speedup {s} is below 1 or not finite; speedups are numbers >= 1 "
                             "(1 = the dense model)")
        out.append(v)
    if not out:
        raise UsageError(f"{flag}: no speedup given")
    return list(dict.fromkeys(out))


def ints(text: str, flag: str, *, low: int = 0) -> list[int]:
    """'0,3' -> [0, 3], every value >= ``low``."""
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes whole numbers separated by commas, got {text!r}") from None
    if not out or any(k < low for k in out):
        raise UsageError(f"{flag} takes whole numbers of at least {low}, got {text!r}")
    return out


def words(text: str | None) -> list[str] | None:
    """'a, b,,c' -> ['a', 'b', 'c']; None or empty -> None."""
    out = [x.strip() for x in (text or "").split(",") if x.strip()]
    return out or None


def model(spec: str, head: str, *, seed: int = 0, **overrides) -> tuple[Any, Any]:
    """(config, params) of a preset (random weights, for benchmarks) or a checkpoint spec."""
    from accjax import convert, models

    if spec in models.all_presets():
        cfg = models.preset(spec, **overrides)
        return cfg, models.init_params(cfg, head, seed)
    ld = convert.load(spec, head, **overrides)
    return ld.config, ld.params


def writable(path: str | None, flag: str = "--json") -> Path | None:
    """Checks before any work that ``path`` can be written (a file in a writable folder)."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {flag} {path}: {parent} is not a writable folder")
    return p


# What a user's mistake raises (a missing file, a bad value, an unknown checkpoint, ...).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def run(main: Callable[[], dict | None], *, json_path: str | None = None,
        errors: Sequence[type[BaseException]] = ()) -> int:
    """Runs ``main``; a user error prints ``error: ...`` on one line and returns 2; the result
    goes to ``json_path`` (with the machine) when given."""
    from accjax import compile_cache

    compile_cache.enable()  # every program compiled once per machine, not once per run
    try:
        out = writable(json_path)
        result = main()
    except (*USER_ERRORS, *errors) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if out is not None and result is not None:
        from accjax import benchmark

        benchmark.write_json(out, {"machine": benchmark.machine(), **result})
        print(f"wrote {out}")
    return 0
