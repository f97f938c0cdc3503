"""Peak memory and wall time of a child process, as benchmarks report them."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def run_measured(cmd: list[str], env: dict | None = None, show_failure: bool = False) -> dict:
    """Run a command; wall seconds, peak RSS (MiB) of the child, exit code, last output line.

    The child is reaped with ``os.wait4`` for its own rusage (its peak RSS, not ours)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    out = proc.stdout.read()  # drain while it runs, so a chatty child never blocks on a full pipe
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    lines = out.decode(errors="replace").strip().splitlines()
    if rc and show_failure:
        print("\n".join(lines[-20:]), file=sys.stderr)
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024, "rc": rc,
            "tail": lines[-1] if lines else ""}  # fmt: skip
