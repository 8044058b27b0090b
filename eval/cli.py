"""Command-line plumbing every ``eval`` (and ``train``) entry point shares: comma lists, a
preset or checkpoint for benchmarks, the one-line error and exit 2 for bad input, and the
``--json`` tail.

Entry points stay thin: they parse flags with these and call library functions.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Callable, Sequence

from accjax import guards
from accjax.guards import UserError as UsageError  # bad command-line input: one line, exit 2


def speedups(text: str, flag: str = "--speedup") -> list[float]:
    """'1.5,2,4.8' -> [1.5, 2.0, 4.8]: finite numbers >= 1 (1 = dense), duplicates scored once."""
    out = []
    for s in (x.strip() for x in str(text).split(",") if x.strip()):
        try:
            v = float(s)
        except ValueError:
            raise UsageError(f"speedup {s!r} is not a number; write e.g. {flag} 2 or {flag} 1.5,2,4.8") from None
        if not math.isfinite(v):
            raise UsageError(f"speedup {s} is not a finite number; speedups are numbers >= 1")
        if v < 1:
            raise UsageError(f"speedup {s} is below 1 (1 = the dense model); speedups are >= 1")
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


# What ``--settle_ms auto`` (the default) settles on a GPU. An H100 at its 700 W power cap
# under the dense program ran the next program's round at lowered clocks: BERT-base 128 x 128
# 4.8x measured 0.78-0.79 of analytic unsettled and 0.85-0.86 settled for 100 ms, dense 4-6%
# slower settled (docs/benchmarks.md, forty-third and forty-fourth sessions). Each program's
# steady state is what a server running one speedup meets, so a GPU's figures are settled.
SETTLE_GPU_MS = 100

SETTLE_HELP = ("untimed ms each program runs before each of its timed rounds (default auto: "
               f"{SETTLE_GPU_MS} on a GPU, 0 elsewhere): a GPU at its power cap under dense runs the "
               "next program at lowered clocks; settled, each round is the program's steady state "
               "(docs/benchmarks.md, forty-third session)")


def add_settle(ap, *, many: bool = False) -> None:
    """The ``--settle_ms`` flag of every command that times levels (``programs.SETTLE_MS``)."""
    ap.add_argument("--settle_ms", default="auto", help=SETTLE_HELP + (
        "; a comma list (0,100) times the same programs under each" if many else ""))


def settles(text: str, *, many: bool = False, rounds: bool = True) -> list[int]:
    """``--settle_ms``'s values: whole milliseconds >= 0, one unless ``many``; ``auto``:
    ``SETTLE_GPU_MS`` where JAX runs on a GPU and the levels are timed in rounds (``rounds``),
    else 0."""
    if str(text).strip() == "auto":
        import jax

        return [SETTLE_GPU_MS if rounds and jax.default_backend() == "gpu" else 0]
    out = ints(text, "--settle_ms", low=0)
    if len(out) > 1 and not many:
        raise UsageError(f"--settle_ms takes one value here, got {text!r}")
    return out


@contextlib.contextmanager
def settled(ms: float):
    """``programs.SETTLE_MS`` is ``ms`` inside, 0 again after (a fault included)."""
    from accjax import programs

    programs.SETTLE_MS = float(ms)
    try:
        yield
    finally:
        programs.SETTLE_MS = 0.0


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


def batch_size(value: int, flag: str = "--batch_size") -> int:
    return guards.positive_int(value, flag, maximum=guards.EVAL_BATCH_LIMIT)


def run(main: Callable[[], dict | None], *, json_path: str | None = None,
        errors: Sequence[type[BaseException]] = ()) -> int:
    """Runs ``main``; a user error (``guards.user_errors`` and the library's ValueErrors:
    a bad speedup, task, checkpoint, path) prints ``error: ...`` on one line and returns 2;
    the result goes to ``json_path`` (with the machine) when given, checked before any work."""
    from accjax import compile_cache

    compile_cache.enable()  # every program compiled once per machine, not once per run
    try:
        out = guards.writable_file(json_path, "--json") if json_path else None
        result = main()
    except (*guards.user_errors(), ValueError, FileNotFoundError, KeyError, guards.NonFiniteError,
            *errors) as e:
        print(f"error: {guards.one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, guards.NonFiniteError) else 2  # 1: the default run's training diverged
    if out is not None and result is not None:
        from accjax import benchmark

        benchmark.write_json(out, {"machine": benchmark.machine(), **result})
        print(f"wrote {out}")
    return 0
