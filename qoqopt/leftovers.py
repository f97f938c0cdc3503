"""What a killed run leaves: temporary outputs named by their owner, and removed by the next run.

SIGKILL, the OOM killer or a power cut gives a process no chance to remove its hidden temporary
build (gigabytes at 7B, with the BF16 intermediate) or bench's work folder (the reference's
logits). Each such name says which process made it (``.NAME.p<pid>-<owner>.XXXX.tmp``), so the next
run into the same place can tell a dead process's leftovers from a live one's and remove only
those. ``<owner>`` hashes the host name, the machine id and the pid namespace: a pid is only
meaningful there (a folder on a shared disk, or a container sharing the host name, may hold a live
process's output whose pid means nothing here). Leftovers of other owners (another machine, a restarted container,
a qoqopt from before these names) cannot be judged: they are named, with their size, not removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .build_info import decimal_size


# A temporary name adds about 35 bytes to the final one; file systems stop at 255 (NAME_MAX), so a
# longer final name is cut and told apart by its digest.
_NAME_ROOM = 200


def tmp_prefix(final: Path) -> str:
    """The prefix of a temporary name for ``final``, naming this process."""
    return f".{_stem(final)}.p{os.getpid()}-{_owner()}."


def _stem(final: Path) -> str:
    """``final``'s name as its temporary names carry it: whole up to _NAME_ROOM bytes, else cut."""
    name = Path(final).name
    if len(name.encode()) <= _NAME_ROOM:
        return name
    cut = name.encode()[: _NAME_ROOM - 9].decode(errors="ignore")  # not inside a UTF-8 sequence
    return f"{cut}~{_digest(name)}"


def _owner(machine_id: bool = True) -> str:
    """Whose pids a temporary name's are: this machine's (its host name and machine id: VMs cloned
    from one image share the name, and the first pid namespace's number is the same on every Linux
    host) in this pid namespace (a container's pids are its own). ``machine_id=False``: the owner
    as qoqopt named it before the machine id was in it, so that its leftovers here still go."""
    machine = socket.gethostname() + (_machine_id() if machine_id else "")
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")  # Linux: "pid:[4026531836]"
        return _digest(machine + namespace)
    return _digest(machine)


@functools.cache  # read once: every atomic write names its temporary file and tidies beside it
def _machine_id() -> str:
    """systemd's machine id (D-Bus's older copy), stable across reboots; empty where neither exists."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip()
    return ""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass
class Found:
    removed: int = 0  # bytes
    others: list[Path] = field(default_factory=list)  # leftovers whose owner cannot be judged here
    set_aside: list[Path] = field(default_factory=list)  # a previous build a killed replace left


def remove_stale(final: Path) -> Found:
    """Remove what dead processes of this host and pid namespace left for ``final``: temporary
    outputs, and an old output renamed aside for a replace once ``final`` exists again (before,
    it is the only copy of the previous build). Live processes' names and symlinks (qoqopt makes
    none) are left alone; other owners' are listed in ``others``."""
    final = Path(final)
    name = re.escape(_stem(final))
    owners = "|".join(dict.fromkeys((_owner(), _owner(machine_id=False))))
    ours = re.compile(rf"\.{name}\.p(\d{{1,10}})-(?:{owners})\.[A-Za-z0-9_]+\.(tmp|old)")
    # anyone's: owner-tagged, or a name of mkdtemp's 8 characters as qoqopt used before
    anyones = re.compile(rf"\.{name}\.(p\d{{1,10}}-[0-9a-f]{{8}}\.[A-Za-z0-9_]+|[A-Za-z0-9_]{{8}})\.(tmp|old)")
    found = Found()
    with contextlib.suppress(OSError):  # an unreadable folder: nothing of ours can be seen to remove
        for entry in final.parent.iterdir():
            match = ours.fullmatch(entry.name)
            if entry.is_symlink() or not (match or anyones.fullmatch(entry.name)):
                continue
            if not match:
                found.others.append(entry)
            elif _alive(int(match[1])):
                continue
            elif match[2] == "old" and not final.exists():
                found.set_aside.append(entry)
            else:
                found.removed += _remove(entry)
    return found


def tidy(final: Path, where: str, say_others: bool = True) -> None:
    """remove_stale, and a note each for what it removed, what it could not judge and a previous
    build it kept; ``where`` says where they were ("beside OUT", "in OUT")."""
    found = remove_stale(final)
    if found.removed:
        _note(f"removed {decimal_size(found.removed)} that an interrupted run left {where}")
    for old in found.set_aside:
        _note(f"{old} holds the previous {final.name}, set aside by a run killed while replacing it; it goes "
              "once a new one is in place")  # fmt: skip
    if found.others and say_others:
        size = decimal_size(sum(_size(p) for p in found.others))
        _note(f"{len(found.others)} hidden temporary output(s) {where} ({size}, e.g. {found.others[0].name}) are from "
              "another machine or container, or an older qoqopt: remove them if no other run is writing there")  # fmt: skip


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would stop the process there: keep what cannot be judged
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a pid no process has
        return True
    return True


def _size(entry: Path) -> int:
    """Bytes under ``entry``; what went meanwhile (another owner's rename into place) counts 0."""
    try:
        if not entry.is_dir():
            return entry.lstat().st_size
        return sum(f.lstat().st_size for f in entry.rglob("*") if not f.is_dir())
    except OSError:
        return 0


def _remove(entry: Path) -> int:
    """Remove ``entry``; the bytes it held, or 0 when it could not be removed (another user's)."""
    try:
        size = _size(entry)
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except OSError:
        return 0
    return size
