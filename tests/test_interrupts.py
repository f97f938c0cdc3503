"""Signal handling around calls (qoqopt/interrupts.py), against the OS's own timer."""

from __future__ import annotations

import signal
import time

import pytest

from qoqopt.interrupts import TimeLimit, time_limit


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_a_time_limit_leaves_a_callers_own_timer_running():
    """There is one ITIMER_REAL a process: time_limit's own setitimer cancelled a caller's alarm (a
    notebook's watchdog, pytest-timeout's signal method), which then never fired. The OS's timer
    is still armed after the block and fires into the caller's handler."""
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with time_limit(10):
            pass
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fired == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_a_time_limit_ends_a_block_when_its_time_is_up():
    """The block is ended by the OS's timer after its time, measured on the monotonic clock, and the
    SIGALRM handler and timer are as they were."""
    handler = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(TimeLimit):
        with time_limit(0.3):
            while time.monotonic() - start < 30:
                pass
    assert 0.3 <= time.monotonic() - start < 2.0  # loose: a loaded machine delivers late, not never
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_time_limit_off_the_main_thread_sets_none():
    """Python sets signal handlers from the main thread only (signal.signal raises ValueError
    elsewhere): a check run in a worker thread (a web app's request) runs without a limit."""
    with pytest.raises(ValueError):  # Python's own rule, which time_limit must not trip over
        _in_thread(lambda: signal.signal(signal.SIGALRM, signal.SIG_DFL))

    def limited():
        with time_limit(10):
            return "ran"

    assert _in_thread(limited) == "ran"


def _in_thread(fn):
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # carried back to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


_SECOND_SIGNAL = """
import os, shutil, signal, sys
from pathlib import Path
from qoqopt import cli, fileio

out, real_rmtree = Path(sys.argv[1]), shutil.rmtree

def rmtree(path, *args, **kwargs):  # the job stop's second SIGTERM (or a second Ctrl-C), mid-cleanup
    os.kill(os.getpid(), int(sys.argv[2]))
    return real_rmtree(path, *args, **kwargs)

cli._catch_stop_signals()
try:
    with fileio.atomic_dir(out / "build") as tmp:
        (tmp / "model.gguf").write_bytes(bytes(1 << 20))
        shutil.rmtree = rmtree
        os.kill(os.getpid(), int(sys.argv[2]))
except (cli.Terminated, KeyboardInterrupt) as exc:
    print(type(exc).__name__, sorted(p.name for p in out.iterdir()))
"""


def test_a_third_stop_signal_ends_the_process_at_once():
    """The second stop signal is let go so the cleanup finishes; a third (a cleanup that hangs, a
    download's threads being waited for) ends the process as the signal's default action does."""
    import subprocess
    import sys

    code = ("import os, signal, time\nfrom qoqopt import cli\ncli._catch_stop_signals()\n"
            "try:\n    os.kill(os.getpid(), signal.SIGTERM)\nexcept cli.Terminated:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    print('second let go', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\n    print('not ended')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout == "second let go\n" and done.returncode == -signal.SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_stop_signal_does_not_cut_the_cleanup_short(signum, tmp_path):
    """systemd, Slurm and Kubernetes stop a job by signalling every process, and the parent then stops
    its child again; an impatient user presses Ctrl-C twice. The second signal landed in the removal
    of the temporary build, which stayed behind (40,000 files in helper-95's run)."""
    import subprocess
    import sys

    from tests.conftest import CTRL_C_FIRST

    done = subprocess.run([sys.executable, "-c", CTRL_C_FIRST + _SECOND_SIGNAL, str(tmp_path), str(int(signum))],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    name = "Terminated" if signum == signal.SIGTERM else "KeyboardInterrupt"
    assert done.stdout.strip() == f"{name} []", done.stdout + done.stderr


def test_a_stop_signal_between_the_renames_of_a_replace_keeps_a_build(tmp_path, monkeypatch, ctrl_c):
    """--force replaces a build by renaming the old one aside, then the new one in. A Ctrl-C between
    the two renames left no build at all (the new one was deleted as unfinished); both renames now
    happen before it is delivered, so the new build is in place, and the old one is removed."""
    import os

    from qoqopt import fileio

    final = tmp_path / "build"
    final.mkdir()
    (final / "old.gguf").write_text("old")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # the old build just set aside
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_dir(final, force=True) as tmp:
            (tmp / "new.gguf").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.gguf"]
    assert [p.name for p in tmp_path.iterdir()] == ["build"]  # and the old build set aside is gone


def test_nested_holds_set_no_handlers_and_a_loop_sees_what_is_held(monkeypatch, ctrl_c):
    """A decode loop holds stop signals once and checks between tokens; the per-call holds inside it
    set no handlers of their own (each token's three handler swaps cost more than its Python work)."""
    from qoqopt.interrupts import deferred_signals

    swaps = []
    real = signal.signal
    monkeypatch.setattr(signal, "signal", lambda s, h: (swaps.append(s), real(s, h))[1])
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals() as pending:
            outer = len(swaps)
            for step in range(5):
                with deferred_signals() as inner:
                    assert inner is pending
                    if step == 2:
                        signal.raise_signal(signal.SIGINT)  # held: the loop goes on to see it
                if pending:
                    break
            assert step == 2 and len(swaps) == outer
