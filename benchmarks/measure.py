"""Peak memory and wall time of a child process, as benchmarks report them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from qoqopt.bench.machine import ru_maxrss_mib

# Linux carries a process's peak RSS across exec (the kernel keeps the larger of the old and new
# address spaces' high-water marks), and a child starts as a copy of its parent: a command started
# straight from a benchmark that has grown to 1 GB reports at least 1 GB (measured: `python -c pass`
# 11 MiB from a small parent, 1035 MiB from one holding 1 GiB). So a fresh interpreter, small when it
# forks, starts the command, reaps it with wait4 and passes on its ru_maxrss through a pipe.
LAUNCHER = """import os, signal, sys
report = int(sys.argv[1])
os.set_inheritable(report, False)  # the command itself must not hold the pipe open
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        print(f"{sys.argv[2]}: {exc.strerror}", file=sys.stderr, flush=True)
        os._exit(127)  # as a shell reports a command it cannot run
_, status, usage = os.wait4(pid, 0)
os.write(report, str(usage.ru_maxrss).encode())
if os.WIFSIGNALED(status):  # die the same way, so the caller sees -SIGNAL (an OOM kill reads -9)
    if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):  # these two have no handler to reset
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], env: dict | None = None, show_failure: bool = False) -> dict:
    """Run a command; wall seconds, peak RSS (MiB) of the command itself, exit code, last output line."""
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(write_fd), *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, pass_fds=(write_fd,))  # fmt: skip
    os.close(write_fd)
    with proc.stdout:
        out = proc.stdout.read()  # drain while it runs, so a chatty child never blocks on a full pipe
    rc = proc.wait()
    wall = time.perf_counter() - start
    with os.fdopen(read_fd, "rb") as f:
        ru_maxrss = f.read()
    lines = out.decode(errors="replace").strip().splitlines()
    if rc and show_failure:
        print("\n".join(lines[-20:]), file=sys.stderr)
    peak = ru_maxrss_mib(int(ru_maxrss)) if ru_maxrss and rc != 127 else None  # None: the command never ran
    return {"wall_s": wall, "peak_rss_mib": peak, "rc": rc, "tail": lines[-1] if lines else ""}
