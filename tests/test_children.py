"""qoqopt's children die with their parent (qoqopt/children.py): a `kill -9` of bench or export left
a quantize or an export running for hours. The OS says whether the child is gone (psutil)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from qoqopt.children import python_module

# A parent that starts one child and sleeps; its first line of output is the child's pid.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(child.pid, flush=True)
time.sleep(120)
"""
LINUX = "import os, time; from qoqopt.children import die_with_parent; die_with_parent(os.getppid()); time.sleep(120)"
# macOS's way, the watching thread, run here while the main thread sleeps in C as llama.cpp's calls do
WATCHED = ("import ctypes, os; from qoqopt.children import watch_parent; watch_parent(os.getppid(), every=0.1); "
           "ctypes.CDLL(None).sleep(120)")  # fmt: skip


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by its new parent
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _orphan_lives_on(child_code: str) -> bool:
    """Start PARENT with a child running ``child_code``, SIGKILL the parent: does the child outlive it?"""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, child_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child has imported qoqopt and made its request (or started its thread)
    try:
        assert psutil.Process(child).status() != psutil.STATUS_ZOMBIE, "the child ended by itself"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        return not _gone(child, within=5.0)
    finally:
        parent.stdout.close()
        if psutil.pid_exists(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_parent_on_linux():
    assert not _orphan_lives_on(LINUX)


def test_a_watched_child_dies_with_its_parent_as_on_macos():
    assert not _orphan_lives_on(WATCHED)


def test_an_unwatched_child_outlives_its_parent():
    """The check above can fail: without a request or a watch, the OS leaves the child running."""
    assert _orphan_lives_on("import time; time.sleep(120)")


@pytest.mark.parametrize("safe_path", ["", "1"], ids=["plain", "PYTHONSAFEPATH"])
def test_a_child_imports_from_pythonpath_but_not_from_the_current_folder(tmp_path, safe_path):
    """A child runs its module without the current folder on sys.path (a `json.py` there was
    imported in place of the real one). The first entry was deleted blindly: under PYTHONSAFEPATH,
    where Python puts no current folder there, that was PYTHONPATH's first folder (a qoqopt run
    from a checkout through PYTHONPATH could not import itself in its workers)."""
    here, lib = tmp_path / "here", tmp_path / "lib"
    here.mkdir(), lib.mkdir()
    (here / "shadowed.py").write_text("raise SystemExit('the current folder was on sys.path')\n")
    (lib / "wanted.py").write_text("import sys\nprint('wanted ran')\n")
    (lib / "probe.py").write_text("import importlib.util, wanted\nprint(importlib.util.find_spec('shadowed'))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lib), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONSAFEPATH": safe_path}  # fmt: skip
    if not safe_path:
        env.pop("PYTHONSAFEPATH")
    done = subprocess.run(python_module("probe"), cwd=here, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["wanted ran", "None"]


# A parent that runs a child through run_child; the child starts a grandchild (as a bench's export
# child starts its quantize worker) and prints both pids.
PAUSED = """
import signal, sys
from qoqopt.children import run_child
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # as qoqopt's commands stop: an exception, then cleanup
child = ("import os, subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
         "print(os.getpid(), g.pid, flush=True); time.sleep(60)")
run_child([sys.executable, "-c", child])
"""


def _all_reach(pids: list[int], states: set[str], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(psutil.Process(p).status() in states for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(sys.platform == "win32", reason="job control is POSIX's")
def test_ctrl_z_pauses_the_child_and_its_children_and_fg_continues_them():
    """Ctrl-Z stops the terminal's foreground process group (the parent's here); the child, in a group
    of its own so that Ctrl-C reaches only the parent, ran on at full speed while the shell said
    "Stopped", and so did its own children. The kernel (psutil reads its process states) now shows
    all three stopped, and all three running again after the shell's SIGCONT to the parent's group."""
    from qoqopt.children import _own_group

    parent = subprocess.Popen([sys.executable, "-c", PAUSED], stdout=subprocess.PIPE, text=True, **_own_group())
    pids = [parent.pid]
    try:
        pids += map(int, parent.stdout.readline().split())
        time.sleep(0.3)
        os.killpg(parent.pid, signal.SIGTSTP)  # what the terminal does on Ctrl-Z
        assert _all_reach(pids, {psutil.STATUS_STOPPED}), [psutil.Process(p).status() for p in pids]
        os.killpg(parent.pid, signal.SIGCONT)  # the shell's fg
        assert _all_reach(pids, {psutil.STATUS_SLEEPING, psutil.STATUS_RUNNING}), [psutil.Process(p).status() for p in pids]
        # `kill %1` of the stopped job (bash: SIGTERM, then SIGCONT): the child is continued to take its
        # SIGTERM at once; left stopped, it waited out run_child's 30 s grace and was SIGKILLed
        os.killpg(parent.pid, signal.SIGTSTP)
        assert _all_reach(pids, {psutil.STATUS_STOPPED})
        os.killpg(parent.pid, signal.SIGTERM)
        os.killpg(parent.pid, signal.SIGCONT)
        assert _gone(pids[1], within=5.0) and _gone(pids[0], within=5.0)
    finally:
        for pid in pids[::-1]:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait()
        parent.stdout.close()
