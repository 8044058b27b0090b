"""Pallas and Mosaic GPU kernels. Each module says where it runs (a ``KERNEL`` switch or an
``available`` probe) and keeps an XLA path for everywhere else."""

from __future__ import annotations

from typing import Callable


def probed_once(cache: dict, key: str, probe: Callable[[], bool]) -> bool:
    """Whether ``probe()`` (compile the kernel, run it, compare with numpy) passed for
    ``key`` (a backend or device kind): run once per key and remembered in ``cache``; a
    kernel this jax, Triton or GPU cannot lower or compile counts as failed."""
    if key not in cache:
        try:
            cache[key] = bool(probe())
        except Exception:  # lowering unsupported by this jax / Triton / GPU
            cache[key] = False
    return cache[key]


def runs_here(mode: str, cache: dict, probe: Callable[[], bool]) -> bool:
    """A kernel's ``KERNEL`` switch resolved: 'never' no; 'interpret' yes (Pallas'
    interpreter, how the tests run kernels on the CPU); 'auto' on a GPU where ``probe``
    passed (``probed_once``, per backend)."""
    import jax

    if mode == "never":
        return False
    if mode == "interpret":
        return True
    return jax.default_backend() == "gpu" and probed_once(cache, jax.default_backend(), probe)
