"""Signals around calls: held during a call Python cannot interrupt safely, or raised to end one
that may never return.

`deferred_signals`: Ctrl-C, SIGTERM and SIGHUP during a call into llama.cpp are held until the call
returns, then delivered. Why: llama.cpp logs through a Python callback, and Python runs a signal's
handler in whatever Python code runs next, which during a quantize or a model load is that callback.
ctypes swallows an exception raised there ("Exception ignored on calling ctypes callback function"),
so a Ctrl-C was lost and the command went on to finish with exit status 0 (and, with --force, to
replace the old build).

`time_limit`: a timer's SIGALRM ends Python code that runs too long.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


_HELD: list[list[int]] = []  # the pending signals of the outermost deferred_signals block running


@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[list[int]]:
    """Hold ``signums`` for the block; yields the list of those held so far, which a loop of calls
    can check between them (``if pending: break``) to stop early. A block inside another holds
    nothing itself: the outer one already does, and setting handlers around every token of a
    decode loop cost more than the token's own Python work."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield []
        return
    if _HELD:
        yield _HELD[-1]
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in signums}
    _HELD.append(pending)
    try:
        yield pending
    finally:
        _HELD.pop()
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(pending):  # each once, to the handler it was meant for
            signal.raise_signal(s)


class TimeLimit(Exception):
    """Raised inside a `time_limit` block when its time is up."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeLimit inside the block after `seconds`, for Python code that cannot be trusted to
    end (a checkpoint's Jinja template). Off the main thread, or without SIGALRM, no limit is set:
    a timer's signal is delivered to the main thread only. Nor under a caller's own timer (a
    notebook's or a test runner's alarm): there is one ITIMER_REAL, and setting ours cancelled it."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):  # fmt: skip
        yield
        return

    def expire(signum, frame):
        raise TimeLimit(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:  # a TimeLimit due just as the block ended may be raised here: the handler is put back still
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
