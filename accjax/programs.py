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

import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Hashable, Sequence

import jax
import numpy as np


def compiler_options() -> dict[str, Any]:
    """XLA options every program of this cache is compiled with. On GPUs XLA's own Triton GEMM
    fusions are off, so GEMMs run on cuBLAS: measured faster for every BERT-base program on an
    H200 and much quicker to compile (fp32 Triton autotuning took minutes per training program;
    docs/benchmarks.md). ``ACCJAX_TRITON_GEMM=1`` leaves XLA's choice."""
    if jax.default_backend() != "gpu" or os.environ.get("ACCJAX_TRITON_GEMM") == "1":
        return {}
    return {"xla_gpu_enable_triton_gemm": False}


def compile_lowered(lowered) -> Any:
    """``lowered.compile()`` with ``compiler_options()``: the one place programs are compiled."""
    return lowered.compile(compiler_options() or None)


class Bound:
    """``compiled(params, *inputs)`` with ``params`` fixed, called straight through the
    program's PJRT executable where that is safe.

    jax checks every argument of every call (type, shape, sharding, device); for BERT-base's
    153 parameter arrays that is a fixed host cost which a batch-1 call on a GPU pays in full
    (docs/benchmarks.md, "Batch 1"). Here the parameters are flattened once; a call flattens and
    checks only its inputs (tree, shape and dtype; numpy inputs are put on the device) and hands
    the buffers to the executable. jax's path is kept for whatever this cannot check cheaply:
    programs with effects, host callbacks, donated or mutable arguments, more than one device,
    ``jax_debug_nans``, an input tree or aval that differs (jax then raises its own error), or
    ``ACCJAX_DIRECT_CALL=0``. ``direct`` says which path a program got.
    """

    def __init__(self, compiled, params):
        self.compiled, self.params = compiled, params
        self.direct, self._inputs = False, None
        if os.environ.get("ACCJAX_DIRECT_CALL") == "0":
            return
        try:
            run = compiled._executable.unsafe_call  # jax internals: any change keeps jax's path
            devices = run.xla_executable.local_devices()
            if (run.ordered_effects or run.has_unordered_effects or run.has_host_callbacks or run.mut
                    or len(devices) != 1 or any(compiled.donate_argnums)):
                return
            self._run, self._handlers, self._device = run, run.out_handler.handlers, devices[0]
            n = len(jax.tree_util.tree_leaves(params))
            kept = sorted(run.kept_var_idx)
            self._params = [leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(params)) if i in kept]
            self._kept_inputs = [i - n for i in kept if i >= n]
            self._avals = list(compiled.in_avals)[n:]  # the inputs' shapes and dtypes
        except Exception:  # noqa: BLE001 - a jax without these internals: jax's own path
            return
        self.direct = True

    def _check(self, inputs) -> list | None:
        """Flat device buffers of every argument, or None where jax's path must decide."""
        leaves, tree = jax.tree_util.tree_flatten(inputs)
        if self._inputs is None:  # first call: the whole tree must be the compiled one
            if jax.tree_util.tree_structure(((self.params, *inputs), {})) != self.compiled.in_tree:
                return None
            self._inputs = tree
        elif tree != self._inputs:
            return None
        if len(leaves) != len(self._avals) or any(
                getattr(x, "shape", None) != a.shape or getattr(x, "dtype", None) != a.dtype
                for x, a in zip(leaves, self._avals)):
            return None
        host = [i for i, x in enumerate(leaves) if not isinstance(x, jax.Array)]
        if host:
            for i, x in zip(host, jax.device_put([leaves[i] for i in host], self._device)):
                leaves[i] = x
        return self._params + [leaves[i] for i in self._kept_inputs]

    def __call__(self, *inputs):
        bufs = self._check(inputs) if self.direct and not jax.config.jax_debug_nans else None
        if bufs is None:
            return self.compiled(self.params, *inputs)
        out = self._run.xla_executable.execute_sharded(bufs).consume_with_handlers(self._handlers)
        return jax.tree_util.tree_unflatten(self.compiled.out_tree, out)


class Program:
    """A compiled program whose first argument is always the same parameter tree (a
    predictor's): ``program(params, *inputs)`` goes through ``Bound`` for those parameters,
    rebound when another tree is passed. Everything else is the compiled program's."""

    def __init__(self, compiled):
        self.compiled, self._bound = compiled, None

    def __call__(self, params, *inputs):
        if self._bound is None or self._bound.params is not params:
            self._bound = Bound(self.compiled, params)
        return self._bound(*inputs)

    def __getattr__(self, name):
        return getattr(self.compiled, name)


class ProgramCache:
    """Keyed ahead-of-time compiled programs with trace and compile counters; with
    ``bind_params`` each is a ``Program`` (for predictors, whose programs all take the same
    parameters first)."""

    def __init__(self, bind_params: bool = False):
        self.bind_params = bind_params
        self._programs: dict[Hashable, Any] = {}
        self.traces = 0  # Python traces of ``counted`` functions: a retrace would show here
        self.compiles = 0

    def counted(self, fn: Callable) -> Callable:
        """``fn`` wrapped so each trace of it is counted."""
        def traced(*args, **kw):
            self.traces += 1
            return fn(*args, **kw)

        return traced

    def get(self, key: Hashable, lower: Callable[[], Any]) -> Any:
        """The program for ``key``; ``lower()`` (returning a ``jax.stages.Lowered``) and
        compile only the first time."""
        prog = self._programs.get(key)
        if prog is None:
            prog = self._keep(key, compile_lowered(lower()))
        return prog

    def _keep(self, key: Hashable, compiled) -> Any:
        self.compiles += 1
        prog = self._programs[key] = Program(compiled) if self.bind_params else compiled
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
                self._keep(futures[fut], fut.result())
                if progress is not None:
                    progress(i, len(lowered))
        return len(lowered)

    def __len__(self) -> int:
        return len(self._programs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._programs


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


def time_interleaved(calls: dict[Hashable, Callable[[], Any]], *, rounds: int,
                     warmup: int = 1) -> dict[Hashable, list[float]]:
    """Wall milliseconds of every call, ``rounds`` times, the calls interleaved (a, b, c, a, b,
    ...) so that on a shared or throttling machine each meets the same conditions and their
    ratios hold; each result synchronised; ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    times: dict[Hashable, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def time_calls(call: Callable[[Any], Any], inputs: Sequence[Any], *, iters: int = 30,
               warmup: int = 3) -> dict[str, float]:
    """Median, min and max wall milliseconds of ``call(inputs[i % len])`` (synchronised on its
    result), after ``warmup`` untimed calls."""
    for i in range(warmup):
        jax.block_until_ready(call(inputs[i % len(inputs)]))
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(call(inputs[i % len(inputs)]))
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)),
            "max_ms": float(np.max(times))}
