"""Transparent huge pages for XLA's CPU buffers: the entry points restart themselves once.

XLA's CPU runtime takes each execution's temporaries as one block, which glibc maps fresh
from the kernel and unmaps after the call (377 MB for the main job's train step at 32
tokens), so every 4 KiB page of it faults on first touch, every step: 93,000 page faults and
0.16 s of kernel time a step on 2 cores. glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc
2.35 and later) makes malloc ask for transparent huge pages (``madvise``), 2 MiB each: 274
faults a step and the step 20% faster (docs/results.md "Time"). glibc reads its tunables
only when a process starts, so an entry point calls ``ensure()`` first thing under
``__main__``: where the tunable would help and is not set, the process replaces itself
(``os.execve``) with the same command line and the tunable added, once.

``ACCJAX_HUGE_PAGES=0`` turns this off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = "GLIBC_TUNABLES"
HUGETLB = "glibc.malloc.hugetlb"
SWITCH = "ACCJAX_HUGE_PAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_ENABLED) -> str:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'; '' unknown)."""
    try:
        text = open(path).read()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def tunables(env: dict[str, str], *, system: str | None = None, libc: tuple[str, str] | None = None,
             thp: str | None = None) -> str | None:
    """The ``GLIBC_TUNABLES`` value to restart with, or None when there is nothing to do: off
    (``ACCJAX_HUGE_PAGES=0``), not Linux with glibc >= 2.35, huge pages off in the kernel
    ('never'), or ``glibc.malloc.hugetlb`` already set (by the user or by the restart)."""
    if env.get(SWITCH, "1") == "0" or (system or platform.system()) != "Linux":
        return None
    name, version = libc or platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or (major, minor) < (2, 35):
        return None
    if (thp if thp is not None else _thp_mode()) not in ("always", "madvise"):
        return None
    current = env.get(TUNABLES, "")
    if HUGETLB in current:
        return None
    return f"{current}:{HUGETLB}=1" if current else f"{HUGETLB}=1"


def ensure() -> None:
    """Restarts this process with huge pages for malloc where ``tunables`` says so (call it
    under ``if __name__ == "__main__"``, before the work: the command line is run again)."""
    value = tunables(dict(os.environ))
    if value is None or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, TUNABLES: value})
