"""JAX's persistent compilation cache, on by default under ``$ACCJAX_CACHE/xla``.

A compiled XLA program is written to disk the first time it is built and read back by every
later process that builds the same program (same HLO, jax/jaxlib version, backend, device and
XLA flags: jax's own cache key), so a second run of the same config skips compilation::

    from accjax import compile_cache
    compile_cache.enable()        # before the first compile; idempotent; returns the folder

Switches: ``ACCJAX_COMPILE_CACHE=0`` (or ``false``/``off``/``no``) in the environment, or
``enable(enabled=False)``. Off means accjax configures no cache (and undoes one it set up
earlier in the process); a cache a user configured through JAX's own
``JAX_COMPILATION_CACHE_DIR`` is theirs and left alone. Why each setting: ``enable``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

ENV_SWITCH = "ACCJAX_COMPILE_CACHE"
XLA_CACHES = "xla_gpu_per_fusion_autotune_cache_dir"
_OFF = {"0", "false", "off", "no"}

_lock = threading.Lock()
_active: Path | None = None  # the folder accjax set up, None when accjax set up none


def env_enabled() -> bool:
    """False when ``ACCJAX_COMPILE_CACHE`` says off; on when unset or anything else."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF


def default_path() -> Path:
    from accjax import hub
    import jaxlib

    return hub.cache_dir() / "xla" / f"jaxlib-{jaxlib.__version__}"


def enable(path: str | os.PathLike | None = None, *, enabled: bool | None = None) -> Path | None:
    """Turns the persistent compilation cache on in ``path``, or off (``enabled``; default what
    ``ACCJAX_COMPILE_CACHE`` says); idempotent. Returns the folder in use, or None when off.

    Without ``path`` a folder this process already set up stays in use (a training run's
    ``enable()`` keeps the one its caller chose); with none, ``$ACCJAX_CACHE/xla/jaxlib-<version>``."""
    global _active
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    on = env_enabled() if enabled is None else bool(enabled)
    with _lock:
        if not on:
            if _active is not None:  # undo only what accjax itself set up
                jax.config.update("jax_compilation_cache_dir", None)
                cc.reset_cache()
                _active = None
            return None
        if path is not None:
            folder = Path(path).expanduser().resolve()
        else:
            folder = _active or default_path()
        if _active == folder:
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_enable_compilation_cache", True)
        # jax's defaults (1 s, filesystem dependent) skip most CPU programs, which compile in
        # well under a second each but add up to minutes over a run's programs.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        # XLA:GPU keeps each fusion's autotuning there: a program that misses the cache (one
        # changed layer) skips re-autotuning the fusions it shares (set, not left to a default).
        jax.config.update("jax_persistent_cache_enable_xla_caches", XLA_CACHES)
        # One folder per jaxlib: the autotune cache is keyed by fusion only, not by version.
        jax.config.update("jax_compilation_cache_dir", str(folder))
        # jax opens its cache object once per process, at the first compile; a new folder
        # (or one set after a compile already happened) needs that object rebuilt.
        cc.reset_cache()
        _active = folder
        return folder


_EVENTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
           "/jax/compilation_cache/cache_misses": "cache_misses"}
_counts = {"cache_hits": 0, "cache_misses": 0}
_counting = False


def counts() -> dict[str, int]:
    """Persistent-cache hits and misses in this process so far: with the cache on, a miss is
    an XLA compile and a hit a program read from disk. Counting starts at the first call."""
    global _counting
    if not _counting:
        import jax

        def on_event(event, **kw):
            if event in _EVENTS:
                _counts[_EVENTS[event]] += 1

        jax.monitoring.register_event_listener(on_event)
        _counting = True
    return dict(_counts)


def active() -> Path | None:
    """The folder accjax's cache writes to now, or None."""
    return _active
