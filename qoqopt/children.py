"""qoqopt's own child processes (bench workers, the exports bench makes, llama.cpp's quantize): how
they are started and how they are stopped.

Started: a module run by this Python as `python -m` runs it, but without the user's current folder
on sys.path: `-m` puts it first, so a `llama_cpp.py`, a `tqdm.py` or an empty `dl/` folder there
(gdcm imports `dl`) was imported in place of the real one. (`python -P` does this from 3.11 only.)
A child also dies with its parent: a `kill -9` of bench or export left a quantize or an export
running for hours.

Stopped: a Ctrl-C or SIGTERM of ours is passed on once, and the child is given time to clean up.
Paused: a Ctrl-Z of ours is passed on, and so is the shell's `fg` or `bg`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# `-c` puts "" (the current folder) first on sys.path: take it off (PYTHONSAFEPATH / -P put nothing
# there, and the first entry is then one of PYTHONPATH), then run the module as -m would
_BOOTSTRAP = ("import runpy, sys; sys.path[:1] == [''] and sys.path.pop(0); "
              "from qoqopt.children import die_with_parent; "
              "die_with_parent({ppid}); runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")  # fmt: skip


def python_module(module: str, *args: str) -> list[str]:
    """The command line that runs ``module`` as ``python -m`` does, minus the current folder."""
    return [sys.executable, "-c", _BOOTSTRAP.format(ppid=os.getpid(), module=module), *args]


def how_it_ended(returncode: int) -> str:
    """A child's end in words: its exit status, or the signal that killed it by name."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:  # a real-time signal has no name
        return f"signal {-returncode}"
    # nothing of ours sends SIGKILL: on Linux it is most often the kernel's out-of-memory killer
    oom = "; killed from outside, often by the kernel's out-of-memory killer" if name == "SIGKILL" else ""
    return f"signal {name}{oom}"


def die_with_parent(ppid: int) -> None:
    """End this process when its parent ``ppid`` goes: Linux SIGKILLs it on request; elsewhere (macOS
    has no such request) a thread watches. Exit now if the parent has gone already."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        watch_parent(ppid)
    if os.getppid() != ppid:  # the parent died before the request was made
        os._exit(1)


def watch_parent(ppid: int, every: float = 1.0) -> None:
    """A daemon thread that kills this process, as Linux's request would, once it is given to another
    parent (``ppid`` gone). It runs while the main thread is in llama.cpp or torch: their C calls
    release the GIL."""

    def watch() -> None:
        while os.getppid() == ppid:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="qoqopt-watch-parent", daemon=True).start()


def run_child(cmd: list[str], grace: float = 30.0, **popen) -> subprocess.CompletedProcess:
    """`subprocess.run`, except when we are interrupted: the child, in a process group of its own (a
    terminal's Ctrl-C reaches only us), is sent one SIGTERM and given ``grace`` seconds to remove
    its temporary output, undisturbed by a second Ctrl-C, before it is killed. `subprocess.run`
    killed it outright, which left a `qoqopt export` child's hidden temporary build (gigabytes at
    7B) behind; and a second signal on top of the terminal's own cut its cleanup short. The child
    reads no terminal (in a background group, a read would stop it for good)."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    with subprocess.Popen(cmd, **_own_group(), **popen) as proc:
        try:
            with _paused_together(proc.pid):
                out, err = proc.communicate()
        except BaseException:
            proc.terminate()
            if hasattr(signal, "SIGCONT"):  # a child paused with us cannot clean up until continued
                _signal_group(proc.pid, signal.SIGCONT)
            _wait_for(proc, grace)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _own_group() -> dict:
    """Popen's arguments for a child in a process group of its own, in our session. A session of its
    own (what this was) made the group an orphan's, and the kernel drops a Ctrl-Z passed to one."""
    if sys.platform == "win32":
        return {}
    # Python 3.10 has no process_group: preexec_fn (no vfork, and unsafe only where a thread holds a
    # lock the child needs between fork and exec; setpgrp is one system call)
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


@contextmanager
def _paused_together(group: int):
    """While the child runs: a Ctrl-Z stops the terminal's foreground group, ours, and the child's
    group ran on (an export at full speed while the shell said "Stopped"). The stop is passed on to
    the child's group before we stop, and the shell's SIGCONT (`fg`, `bg`) after we continue.
    Python sets handlers from its main thread only: elsewhere nothing changes."""
    if not hasattr(signal, "SIGTSTP") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTSTP)
    if previous is signal.SIG_IGN or previous is None:  # ignored on purpose, or a handler not set from Python: kept
        yield
        return

    def pause(signum, frame) -> None:
        _signal_group(group, signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        try:
            os.kill(os.getpid(), signal.SIGTSTP)  # we stop here, until the shell continues us
        finally:  # a SIGTERM waiting while we were stopped (`kill %1`) raises here: continue the child first
            signal.signal(signal.SIGTSTP, pause)
            _signal_group(group, signal.SIGCONT)

    signal.signal(signal.SIGTSTP, pause)
    try:
        yield
    finally:
        signal.signal(signal.SIGTSTP, previous)


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:  # the child has ended and been waited for
        pass


def _wait_for(proc: subprocess.Popen, grace: float) -> None:
    deadline = time.monotonic() + grace
    while proc.poll() is None:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except BaseException:  # another Ctrl-C or SIGTERM: the cleanup under way is let finish
            continue
