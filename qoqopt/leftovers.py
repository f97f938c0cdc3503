"""What a killed run leaves: temporary outputs named by their owner, and removed by the next run.

SIGKILL, the OOM killer or a power cut gives a process no chance to remove its hidden temporary
build (gigabytes at 7B, with the BF16 intermediate) or bench's work folder (the reference's
logits). Each such name says which process made it (``.NAME.p<pid>-<owner>.XXXX.tmp``), so the next
run into the same place can tell a dead process's leftovers from a live one's and remove only
those. ``<owner>`` hashes the host name and the pid namespace: a pid is only meaningful there (a
folder on a shared disk, or a container sharing the host name, may hold a live process's output
whose pid means nothing here).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from .build_info import decimal_size


def tmp_prefix(final: Path) -> str:
    """The prefix of a temporary name for ``final``, naming this process."""
    return f".{Path(final).name}.p{os.getpid()}-{_owner()}."


def _owner() -> str:
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")  # Linux: "pid:[4026531836]"
        return _digest(socket.gethostname() + namespace)
    return _digest(socket.gethostname())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def remove_stale(final: Path) -> int:
    """Remove what dead processes of this host left for ``final``: its temporary outputs and an
    old output renamed aside for a replace, the latter only once ``final`` exists again (else it is
    the only copy of the previous build). Returns the bytes removed. Symlinks (qoqopt makes none),
    live processes' names, other hosts' and names of no recorded owner are left alone."""
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.p(\d{{1,10}})-{_owner()}\.[A-Za-z0-9_]+\.(tmp|old)")
    removed = 0
    with contextlib.suppress(OSError):  # an unreadable folder: nothing of ours can be seen to remove
        for entry in final.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if not match or entry.is_symlink() or _alive(int(match[1])):
                continue
            if match[2] == "old" and not final.exists():
                continue
            removed += _remove(entry)
    return removed


def say_removed(removed: int, where: str) -> None:
    """One note for what remove_stale removed, ``where`` saying where it was ("in OUT")."""
    if removed:
        print(f"note: removed {decimal_size(removed)} that an interrupted run left {where}", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a pid no process has
        return True
    return True


def _remove(entry: Path) -> int:
    """Remove ``entry``; the bytes it held, or 0 when it could not be removed (another user's)."""
    try:
        if entry.is_dir():
            size = sum(f.lstat().st_size for f in entry.rglob("*") if not f.is_dir())
            shutil.rmtree(entry)
        else:
            size = entry.lstat().st_size
            entry.unlink()
    except OSError:
        return 0
    return size
