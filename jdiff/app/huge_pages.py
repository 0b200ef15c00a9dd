"""Transparent huge pages for XLA:CPU's buffers, by restarting the process with a glibc tunable.

XLA:CPU allocates a step's temporaries afresh on every call. glibc serves allocations that large
with mmap and unmaps them on free, so every step faults its buffers back in 4 KB at a time. With
`glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages on those mappings:
bench/train.py's U-Net step, 235k -> 2k page faults and 0.47 -> 0.23 s of kernel time per step;
the default run's diffusion stage, with the same losses, 110 -> 142 images/s (0.29 -> 0.225 s per
batch-32 step). glibc reads its tunables only when a process starts, hence the restart.

Nothing is done unless Linux's THP mode is `madvise` (with `always` the pages are huge already, with
`never` they cannot be) and the user has not set `glibc.malloc.hugetlb` in GLIBC_TUNABLES themselves
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=0 python train.py` opts out).
"""

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
# Set in the restarted process: never restart twice, even where glibc would hide GLIBC_TUNABLES.
RESTARTED = "JDIFF_HUGE_PAGES_RESTARTED"
_THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or "" if unknown."""
    try:
        text = _THP_MODE_FILE.read_text()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def glibc_version() -> tuple[int, ...]:
    """(major, minor) of the C library when it is glibc, else ()."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()
    except (AttributeError, ValueError, OSError):  # not glibc, or not a POSIX confstr
        return ()


def environment(environ: dict, *, mode: str | None = None, glibc: tuple[int, ...] | None = None) -> dict | None:
    """`environ` with the huge-page tunable added, or None when it would change nothing. `mode` and
    `glibc` default to this machine's."""
    mode = thp_mode() if mode is None else mode
    glibc = glibc_version() if glibc is None else glibc
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if mode != "madvise" or glibc < (2, 35) or any(t.split("=", 1)[0] == TUNABLE for t in tunables):
        return None
    return dict(environ, GLIBC_TUNABLES=":".join([*tunables, f"{TUNABLE}=1"]))


def restart_with_huge_pages() -> None:
    """Replaces this process with the same command under the huge-page tunable, when that changes
    something; returns otherwise. Call it first thing in a script's main guard, before any output."""
    env = None if RESTARTED in os.environ else environment(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**env, RESTARTED: "1"})
