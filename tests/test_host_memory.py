"""accjax.host_memory: when an entry point restarts itself with huge pages for malloc, and that
it does so once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from accjax import host_memory

GLIBC = ("glibc", "2.36")


def test_the_tunable_is_added_only_where_it_helps_and_only_once():
    t = host_memory.tunables
    assert t({}, system="Linux", libc=GLIBC, thp="madvise") == "glibc.malloc.hugetlb=1"
    assert t({}, system="Linux", libc=GLIBC, thp="always") == "glibc.malloc.hugetlb=1"
    # the user's own tunables are kept
    assert t({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, system="Linux", libc=GLIBC, thp="madvise") \
        == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # already set (by the user, or by the restart itself): nothing to do, so no second restart
    assert t({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, system="Linux", libc=GLIBC, thp="madvise") is None
    assert t({}, system="Linux", libc=GLIBC, thp="never") is None  # the kernel gives none
    assert t({}, system="Linux", libc=("glibc", "2.31"), thp="madvise") is None  # no such tunable yet
    assert t({}, system="Linux", libc=("", ""), thp="madvise") is None  # musl or unknown
    assert t({}, system="Darwin", libc=GLIBC, thp="madvise") is None
    assert t({"ACCJAX_HUGE_PAGES": "0"}, system="Linux", libc=GLIBC, thp="madvise") is None


@pytest.mark.skipif(host_memory.tunables({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}) is None,
                    reason="no glibc >= 2.35 with transparent huge pages here")
def test_ensure_restarts_the_command_once_with_the_tunable():
    code = ("from accjax import host_memory; host_memory.ensure(); import os; "
            "print('ran with', os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ACCJAX_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["ran with glibc.malloc.hugetlb=1"]  # the first process never printed
    off = subprocess.run([sys.executable, "-c", code], env={**env, "ACCJAX_HUGE_PAGES": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert off.splitlines() == ["ran with None"]
