"""The restart under glibc's huge-page tunable: when it applies, what it keeps, and the real restart."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jdiff.app import huge_pages

ROOT = Path(__file__).resolve().parents[1]
ADDED = "glibc.malloc.hugetlb=1"


def test_tunable_is_added_under_madvise_and_a_recent_glibc():
    env = huge_pages.environment({"HOME": "/h"}, mode="madvise", glibc=(2, 36))
    assert env == {"HOME": "/h", "GLIBC_TUNABLES": ADDED}


def test_other_tunables_are_kept():
    env = huge_pages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, mode="madvise", glibc=(2, 35))
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{ADDED}"


@pytest.mark.parametrize("environ, mode, glibc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36)),  # the user's own choice stands
    ({"GLIBC_TUNABLES": "x.y=1:glibc.malloc.hugetlb=2"}, "madvise", (2, 36)),
    ({}, "always", (2, 36)),  # already huge
    ({}, "never", (2, 36)),  # cannot be
    ({}, "", (2, 36)),  # no THP file (not Linux, or a locked-down container)
    ({}, "madvise", (2, 31)),  # glibc without the tunable
    ({}, "madvise", ()),  # musl and other C libraries
])
def test_no_restart_when_it_would_change_nothing(environ, mode, glibc):
    assert huge_pages.environment(environ, mode=mode, glibc=glibc) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path, monkeypatch):
    mode_file = tmp_path / "enabled"
    monkeypatch.setattr(huge_pages, "_THP_MODE_FILE", mode_file)
    assert huge_pages.thp_mode() == ""  # missing
    mode_file.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode() == "madvise"
    mode_file.write_text("garbage")
    assert huge_pages.thp_mode() == ""


def test_restart_keeps_the_command_line_and_adds_the_tunable_once(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from jdiff.app import huge_pages
        print("before", flush=True)  # flushed output survives the restart
        huge_pages.restart_with_huge_pages()
        print("args", sys.argv[1:], "tunables", repr(os.environ.get("GLIBC_TUNABLES", "")))
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.RESTARTED)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-u", str(script), "--flag=a b", "x"], env=env, check=True,
                         capture_output=True, text=True).stdout
    restarts = huge_pages.environment(env) is not None
    expected = repr(ADDED if restarts else "")
    assert out.splitlines()[-1] == f"args ['--flag=a b', 'x'] tunables {expected}"
    assert out.count("before") == (2 if restarts else 1)  # the restarted process ran the script again


def test_a_restarted_process_never_restarts_again(tmp_path):
    script = tmp_path / "again.py"
    script.write_text("import os\nfrom jdiff.app import huge_pages\nhuge_pages.restart_with_huge_pages()\n"
                      "print('ran', repr(os.environ.get('GLIBC_TUNABLES', '')))\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **{huge_pages.RESTARTED: "1"})
    out = subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True, text=True).stdout
    assert out == "ran ''\n"  # as if glibc had hidden the tunable: no exec, the script just runs
