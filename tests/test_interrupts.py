"""Signal handling around calls (qoqopt/interrupts.py), against the OS's own timer."""

from __future__ import annotations

import signal
import time

import pytest

from qoqopt.interrupts import time_limit


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
