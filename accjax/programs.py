"""Compiled programs: the one keyed cache of ahead-of-time compiled programs, the padding of
a last partial batch, and the timing helper. Every predictor (``inference``, ``seq2seq``,
``generate``, ``lm``) and the ``train.Trainer`` keep their programs here.

A program is compiled once per key (batch shapes, schedule, ...) with
``jax.jit(fn).lower(*specs).compile()`` and kept; a later call at the same key neither traces
nor compiles. ``traces`` counts Python traces of the wrapped functions (``counted``) and
``compiles`` the programs built, so a test can assert that a second call compiled nothing::

    cache = ProgramCache()
    prog = cache.get(("fwd", 8, 32), lambda: jax.jit(cache.counted(f)).lower(spec))
    prog(x)                      # compiled once; cache.traces == cache.compiles == 1
"""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# Inference programs (16-bit) whose GEMMs have at most this many rows on average (batch x length /
# analytic speedup) keep XLA's Triton GEMMs. H100, BERT-base bf16 with its GELU in cuBLAS's
# epilogue (``common.GELU_16BIT``), same process, pipelined: Triton 3.7% faster at 27 rows (1 x 128
# at 4.8x), cuBLAS 2% faster at 43 (1 x 128 at 3x), 3% at 53 (2 x 128 at 4.8x), 5% at 64
# (1 x 128 at 2x) and 8% at 85 (2 x 128 at 3x) (docs/benchmarks.md, thirtieth session; the
# thirteenth session's bound of 96 was measured on an H200 with the exact GELU as its own kernel).
TRITON_GEMM_MAX_ROWS = 32
# Generation programs are chosen by their decoding steps' rows (``DecodingRows``: the batch), with
# their own bound: Triton GEMMs ran generation 9-19% faster from 8 to 32 sequences on an H100
# (GPT-2, Flan-T5; twenty-sixth and twenty-seventh sessions).
TRITON_GEMM_MAX_DECODE_ROWS = 96


class DecodingRows(float):
    """A generation program's rows for ``compiler_options``: its decoding steps' batch
    (``generate.decoding_rows``), bounded by ``TRITON_GEMM_MAX_DECODE_ROWS``."""


def compiler_options(rows: float | None = None) -> dict[str, Any]:
    """XLA options every program of this cache is compiled with. On GPUs XLA's own Triton GEMM
    fusions are off, so GEMMs run on cuBLAS: measured faster for BERT-base programs on an
    H200 and much quicker to compile (fp32 Triton autotuning took minutes per training program;
    docs/benchmarks.md), except an inference program whose GEMMs have at most
    ``TRITON_GEMM_MAX_ROWS`` rows on average (``rows``, given by its predictor), or a generation
    program decoding at most ``TRITON_GEMM_MAX_DECODE_ROWS`` sequences (``DecodingRows``): there
    XLA's small Triton tiles win. ``ACCJAX_TRITON_GEMM=1`` leaves XLA's choice everywhere."""
    if jax.default_backend() != "gpu" or os.environ.get("ACCJAX_TRITON_GEMM") == "1":
        return {}
    bound = TRITON_GEMM_MAX_DECODE_ROWS if isinstance(rows, DecodingRows) else TRITON_GEMM_MAX_ROWS
    if rows is not None and rows <= bound:
        return {}
    return {"xla_gpu_enable_triton_gemm": False}


def gemm_rows(dtype, rows: float) -> float | None:
    """``rows`` (a program's GEMMs' rows on average, or a ``DecodingRows``, for
    ``compiler_options``) when it computes in 16 bits, where the rule was measured; None
    (cuBLAS) for float32 programs."""
    if jnp.dtype(dtype).itemsize != 2:
        return None
    return rows if isinstance(rows, DecodingRows) else float(rows)


def compile_lowered(lowered, rows: float | None = None) -> Any:
    """``lowered.compile()`` with ``compiler_options(rows)``: the one place programs are compiled."""
    return lowered.compile(compiler_options(rows) or None)


class ProgramCache:
    """Keyed ahead-of-time compiled programs with trace and compile counters."""

    def __init__(self):
        self._programs: dict[Hashable, Any] = {}
        self.traces = 0  # Python traces of ``counted`` functions: a retrace would show here
        self.compiles = 0

    def counted(self, fn: Callable) -> Callable:
        """``fn`` wrapped so each trace of it is counted."""
        def traced(*args, **kw):
            self.traces += 1
            return fn(*args, **kw)

        return traced

    def get(self, key: Hashable, lower: Callable[[], Any], *, rows: float | None = None) -> Any:
        """The program for ``key``; ``lower()`` (returning a ``jax.stages.Lowered``) and
        compile only the first time (``rows``: see ``compiler_options``)."""
        prog = self._programs.get(key)
        if prog is None:
            prog = compile_lowered(lower(), rows)
            self.compiles += 1
            self._programs[key] = prog
        return prog

    def compile_all(self, items: Sequence[tuple[Hashable, Callable[[], Any]]], *,
                    threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> int:
        """Builds every (key, lower) not built yet: traced here one by one, compiled in
        ``threads`` parallel threads (XLA compiles outside the GIL). ``progress(done, total)``
        after each. Returns how many were compiled."""
        todo = {k: lower for k, lower in items if k not in self._programs}
        lowered = [(k, lower()) for k, lower in todo.items()]
        with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
            futures = {pool.submit(compile_lowered, low): k for k, low in lowered}
            for i, fut in enumerate(as_completed(futures), 1):
                self._programs[futures[fut]] = fut.result()
                self.compiles += 1
                if progress is not None:
                    progress(i, len(lowered))
        return len(lowered)

    def __len__(self) -> int:
        return len(self._programs)


def pad_rows(a: np.ndarray, rows: int, length: int, *, fill: int = 0) -> np.ndarray:
    """Pads / crops a [b, t] int batch to [rows, length] int32.

    Only trailing columns are cropped (callers pick ``length`` >= the longest real row).
    Filler rows (b < rows) are zeros with ``fill`` in column 0, e.g. one valid token in an
    attention mask (so no example is all padding) or an EOS id.
    """
    out = np.zeros((rows, length), np.int32)
    b, t = a.shape
    t = min(t, length)
    out[:b, :t] = a[:, :t]
    if b < rows:
        out[b:, 0] = fill
    return out


def random_batches(rng: np.random.Generator, shape: tuple[int, int], vocab: int, *, low: int = 1,
                   count: int = 3) -> list[np.ndarray]:
    """``count`` random int32 id batches: timing rotates inputs so no call is served from a
    cache of one buffer."""
    return [rng.integers(low, vocab, shape).astype(np.int32) for _ in range(count)]


# Untimed milliseconds each call runs before each of its timed rounds (0: none). A GPU that
# meets its power cap under a heavy program (dense) runs the next program at lowered clocks
# until they recover; a server runs one program steadily, so a settled round is its time.
# The timing commands set it (``--settle_ms``: by default 100 ms on a GPU, ``eval/cli.py``).
SETTLE_MS = 0.0


def time_interleaved(calls: dict[Hashable, Callable[[], Any]], *, rounds: int,
                     warmup: int = 1, depth: int = 1) -> dict[Hashable, list[float]]:
    """Wall milliseconds per call of every call, ``rounds`` times, the calls interleaved (a, b,
    c, a, b, ...) so that on a shared or throttling machine each meets the same conditions and
    their ratios hold; ``warmup`` untimed rounds first. ``depth`` 1: each call synchronised
    (one request at a time); ``depth`` d > 1: d calls of one program enqueued, the last waited
    for, the time divided by d (a server with queued requests: the host's dispatch of a call
    overlaps the device's work on the previous ones)."""
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    times: dict[Hashable, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            if SETTLE_MS > 0:
                t0 = time.perf_counter()
                while (time.perf_counter() - t0) * 1e3 < SETTLE_MS:
                    jax.block_until_ready([call() for _ in range(depth)])
            t0 = time.perf_counter()
            for _ in range(depth):
                out = call()
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t0) * 1e3 / depth)
    return times


# Calls in flight for a "pipelined" figure: a server with queued requests, where the host's
# dispatch of a call overlaps the device's work on the previous ones.
PIPELINE_DEPTH = 20


def pipelined_rounds(iters: int) -> int:
    """Rounds of ``PIPELINE_DEPTH`` calls for a timing of ``iters`` synchronised calls."""
    return max(3, iters // 4)


def time_levels(calls: dict[Hashable, Callable[[], Any]], *, iters: int) -> dict[Hashable, dict[str, Any]]:
    """The timings every benchmark reports, all ``calls`` interleaved (``time_interleaved``):
    each call synchronised over ``iters`` rounds (``median_ms``, ``min_ms``: one request at a
    time), then ``PIPELINE_DEPTH`` in flight over ``pipelined_rounds(iters)`` rounds
    (``pipelined_ms``, and ``pipelined_rounds_ms`` for ``paired_ratios``)."""
    ms = time_interleaved(calls, rounds=iters)
    pipe = time_interleaved(calls, rounds=pipelined_rounds(iters), depth=PIPELINE_DEPTH)
    return {k: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v)),
                "pipelined_ms": float(np.median(pipe[k])), "pipelined_rounds_ms": pipe[k]}
            for k, v in ms.items()}


def paired_ratios(base: Sequence[float], other: Sequence[float]) -> np.ndarray:
    """Per round of ``time_interleaved``, ``base``'s time over ``other``'s in the same round:
    a measured speedup's passes (their median and min-max are its figure and spread). The
    ratio of the two medians lies within their min-max: each of ``base``'s times is at least
    the smallest ratio times ``other``'s in its round, so their order statistics are too."""
    return np.asarray(base, np.float64) / np.asarray(other, np.float64)


def time_calls(call: Callable[[Any], Any], inputs: Sequence[Any], *, iters: int = 30,
               warmup: int = 3) -> dict[str, float]:
    """Median, min and max wall milliseconds of ``call`` on each of ``inputs`` in turn
    (synchronised on its result), after ``warmup`` untimed calls (``time_interleaved``)."""
    rotation = itertools.cycle(inputs)
    times = time_interleaved({0: lambda: call(next(rotation))}, rounds=iters, warmup=warmup)[0]
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)),
            "max_ms": float(np.max(times))}
