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
