"""Atomic output: a finished name only ever holds finished output, and failures are one line."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from qoqopt.errors import QoqoptError
from qoqopt.fileio import atomic_dir, atomic_path, prepare_output_dir


def _debris(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "build"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 10)
            assert not out.exists()  # nothing under the final name while it is being built
            raise RuntimeError("interrupted")
    assert not out.exists() and _debris(tmp_path) == []
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["config.json"] and _debris(tmp_path) == []


def test_a_failed_output_leaves_no_folders_it_made(tmp_path):
    """`export --out a/b/build` that fails (a bad source, Ctrl-C) left an empty a/b/: the folders
    made for an output go again with it. A folder that was there before stays, and so does one
    that something else has filled meanwhile."""
    for make in (lambda p: atomic_dir(p / "build"), lambda p: atomic_path(p / "report.json")):
        with pytest.raises(KeyboardInterrupt):
            with make(tmp_path / "a" / "b"):
                assert (tmp_path / "a" / "b").is_dir()
                raise KeyboardInterrupt
        assert os.listdir(tmp_path) == []
        with pytest.raises(RuntimeError):
            with make(tmp_path / "a" / "b"):
                (tmp_path / "a" / "other.txt").write_text("someone else's")
                raise RuntimeError("failed")
        assert os.listdir(tmp_path / "a") == ["other.txt"]
        shutil.rmtree(tmp_path / "a")


def test_atomic_dir_keeps_existing_output_without_force(tmp_path):
    out = tmp_path / "build"
    out.mkdir()
    (out / "old.gguf").write_text("old")
    with pytest.raises(QoqoptError, match="already exists and is not empty .*--force"):
        with atomic_dir(out):
            pass
    assert (out / "old.gguf").read_text() == "old"
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.gguf").write_text("new")
    assert os.listdir(out) == ["new.gguf"]


def test_an_interrupted_replace_keeps_the_old_output_whole(tmp_path, monkeypatch):
    """--force over an existing build, interrupted while the new one is swapped in: the old build
    stays whole under its name (it was deleted first, and a Ctrl-C there left half of it). A symlinked
    --out is refused before any work: replacing it would replace the link."""
    from qoqopt import fileio

    out = tmp_path / "build"
    out.mkdir()
    for name in ("a.gguf", "b.gguf", "manifest.json"):
        (out / name).write_text("old")
    replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new build into place
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.gguf").write_text("new")
    monkeypatch.setattr(fileio.os, "replace", replace)
    assert sorted(os.listdir(out)) == ["a.gguf", "b.gguf", "manifest.json"] and _debris(tmp_path) == []
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.gguf").write_text("new")
    assert os.listdir(out) == ["new.gguf"] and _debris(tmp_path) == []
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(QoqoptError, match="^output .*link is a symbolic link; give the folder it points to"):
        with atomic_dir(tmp_path / "link", force=True):
            pass
    assert os.listdir(out) == ["new.gguf"]


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    """ENOSPC from any write inside the build (a safetensors shard, a GGUF) becomes one line."""
    out = tmp_path / "build"
    with pytest.raises(QoqoptError, match=r"^disk full while writing build \(\d+\.\d GiB free\)$"):
        with atomic_dir(out) as tmp:
            (tmp / "shard-1.safetensors").write_bytes(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not out.exists() and _debris(tmp_path) == []
    with pytest.raises(QoqoptError, match=r"^disk full while writing report\.json \(\d+\.\d GiB free\)$"):
        with atomic_path(tmp_path / "report.json"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert os.listdir(tmp_path) == []
    # an OSError that names its file (another filesystem, a download cache) is reported as that file
    with pytest.raises(QoqoptError, match=r"^disk full while writing blob-17 \(\d+\.\d GiB free\)$") as caught:
        with atomic_dir(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "hub-cache" / "blob-17"))
    # the free space said is the OS's at the nearest folder that exists (hub-cache does not)
    said = float(re.search(r"\((\d+\.\d) GiB free\)", str(caught.value))[1])
    assert abs(said - shutil.disk_usage(tmp_path).free / 2**30) <= 0.1


def test_disk_full_says_the_space_left_when_the_write_failed(tmp_path, monkeypatch):
    """The free space is read before the temporary build is deleted: after, it is what deleting the
    build gave back (a disk that was full said "3.0 GiB free"). Here a stand-in disk is full while
    the build's hidden folder exists, as a real one would be."""
    import collections

    from qoqopt import fileio

    usage = collections.namedtuple("usage", "total used free")
    building = lambda: any(p.name.startswith(".build.") and p.name.endswith(".tmp") for p in tmp_path.iterdir())  # noqa: E731
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: usage(4 << 30, 4 << 30, 0 if building() else 3 << 30))
    with pytest.raises(QoqoptError, match=r"^disk full while writing build \(0\.0 GiB free\)$"):
        with atomic_dir(tmp_path / "build") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


def test_other_os_errors_pass_through_atomic_dir(tmp_path):
    """A read failure inside the build is not reported as a write failure."""
    with pytest.raises(FileNotFoundError):
        with atomic_dir(tmp_path / "build"):
            open(tmp_path / "missing-source.safetensors", "rb")
    assert os.listdir(tmp_path) == []


def test_an_interrupted_child_is_told_once_and_cleans_up(tmp_path):
    """bench runs `qoqopt export` as a child. A Ctrl-C or SIGTERM of bench is passed on as one
    SIGTERM and the child's cleanup runs to its end, a second Ctrl-C during it notwithstanding.
    subprocess.run killed the child outright, leaving its hidden temporary build; and with the child
    in bench's process group a terminal's Ctrl-C reached it too, so the SIGTERM on top cut its
    cleanup short. It runs in a process group of its own, in bench's session (so that a Ctrl-Z
    passed on to it is not dropped)."""
    import signal
    import sys
    import threading
    import time

    from qoqopt.children import run_child

    child = (
        "import os, pathlib, signal, sys, time\n"
        f"d = pathlib.Path({str(tmp_path)!r})\n"
        "def cleanup(*a):\n"
        "    (d / 'signals').open('a').write('TERM\\n')\n"
        "    (d / 'cleaning').write_text('x')\n"
        "    for _ in range(6000):  # until the second Ctrl-C has reached the parent's handler\n"
        "        if (d / 'handled-2').exists(): break\n"
        "        time.sleep(0.01)\n"
        "    (d / 'cleaned').write_text('x'); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, cleanup)\n"
        "(d / 'ready').write_text(f'{os.getpid()} {os.getpgid(0)} {os.getsid(0)}')\n"
        "time.sleep(60)\n"
    )

    class Stop(Exception):
        pass

    handled = []

    def stop(signum, frame):
        handled.append(signum)
        (tmp_path / f"handled-{len(handled)}").write_text("x")
        raise Stop

    def interrupt_on(name):
        while not (tmp_path / name).exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, stop)
    waiters = [threading.Thread(target=interrupt_on, args=(name,)) for name in ("ready", "cleaning")]
    try:
        for w in waiters:
            w.start()
        with pytest.raises(Stop):
            run_child([sys.executable, "-c", child])
    finally:
        for w in waiters:
            w.join()
        signal.signal(signal.SIGINT, previous)
    pid, group, sid = map(int, (tmp_path / "ready").read_text().split())
    assert pid == group and sid == os.getsid(0)  # a group of its own: a terminal's Ctrl-C does not reach it
    assert (tmp_path / "cleaned").exists() and (tmp_path / "signals").read_text() == "TERM\n"
    assert handled == [signal.SIGINT] * 2


def test_a_killed_runs_temporary_output_is_removed_by_the_next_run(tmp_path, capsys):
    """SIGKILL (the OOM killer, a power cut) leaves a build's hidden temporary folder, gigabytes at 7B.
    The next build of the same folder removes it and says so; a live process's, another host's, one
    of an unknown owner, a symlink and a name no process can have are left alone; an old build set
    aside for a replace goes only once the new one is in place. Liveness is the kernel's answer for
    real processes."""
    import signal
    import subprocess
    import sys

    from qoqopt.leftovers import remove_stale

    out = tmp_path / "build"
    writer = ("import sys, time; from pathlib import Path; from qoqopt.fileio import atomic_dir\n"
              "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
              "    (tmp / 'model.safetensors').write_bytes(b'x' * 4096); print('ready', flush=True); time.sleep(600)")  # fmt: skip
    killed, live = (subprocess.Popen([sys.executable, "-c", writer, str(out)], stdout=subprocess.PIPE, text=True)
                    for _ in range(2))  # fmt: skip
    try:
        for proc in (killed, live):
            assert proc.stdout.readline() == "ready\n"
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        left = {p.name for p in tmp_path.iterdir()}
        assert len(left) == 2 and all(re.fullmatch(r"\.build\.p\d+-[0-9a-f]{8}\.\w+\.tmp", n) for n in left)
        owner = next(iter(left)).split("-")[1].split(".")[0]
        keep = [tmp_path / f".build.p{killed.pid}-00000000.abc123.tmp",  # a dead pid here, maybe alive there
                tmp_path / ".build.q1z2x3.tmp",  # an older qoqopt's name: no owner recorded
                tmp_path / f".build.p99999999999-{owner}.big.tmp"]  # fmt: skip
        for folder in keep:
            folder.mkdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "user.txt").write_text("mine")
        link = tmp_path / f".build.p{killed.pid}-{owner}.lnk.tmp"
        link.symlink_to(elsewhere)
        old = tmp_path / f".build.p{killed.pid}-{owner}.set4side.old"  # killed while replacing: the old build
        old.mkdir()
        (old / "model.gguf").write_bytes(b"y" * 1000)
        with atomic_dir(out) as tmp:
            assert old.exists()  # the only copy of the previous build while there is no new one
            (tmp / "config.json").write_text("{}")
        assert capsys.readouterr().err.splitlines() == [
            f"note: removed 4.1 kB that an interrupted run left beside {out}",
            f"note: {old} holds the previous build, set aside by a run killed while replacing it; it goes once a new "
            "one is in place",
            f"note: 1 hidden temporary output(s) beside {out} (0 B, e.g. {keep[0].name}) are from another machine or "
            "container, or an older qoqopt: remove them if no other run is writing there",
            f"note: removed 1.0 kB that an interrupted run left beside {out}"]  # fmt: skip
        live_tmp = next(n for n in left if f".p{live.pid}-" in n)
        expected = {"build", "elsewhere", live_tmp, link.name, *(f.name for f in keep)}
        assert {p.name for p in tmp_path.iterdir()} == expected and (elsewhere / "user.txt").read_text() == "mine"
        assert remove_stale(out).removed == 0  # nothing more of ours to remove
    finally:
        for proc in (killed, live):
            proc.kill()
            proc.wait()


def test_a_long_final_name_still_gets_a_temporary_name(tmp_path, capsys):
    """A final name the file system allows (255 bytes) but the temporary name's tag would push over it
    failed with "File name too long". Its temporary names are cut (not inside a UTF-8 character) and
    a killed run's are still found and removed; a sibling sharing the cut part is not touched."""
    import signal
    import subprocess
    import sys

    out, sibling = tmp_path / ("QoQ-Med-" + "é" * 123), tmp_path / ("QoQ-Med-" + "é" * 123 + "x")
    assert len(out.name.encode()) == 254
    writer = ("import sys, time; from pathlib import Path; from qoqopt.fileio import atomic_dir\n"
              "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
              "    (tmp / 'a.gguf').write_bytes(b'x' * 2000); print('ready', flush=True); time.sleep(600)")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(f)], stdout=subprocess.PIPE, text=True)
             for f in (out, sibling)]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout.readline() == "ready\n"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        left = sorted(p.name for p in tmp_path.iterdir())
        assert len(left) == 2 and all(len(n.encode()) <= 255 and "é" in n for n in left)
        with atomic_dir(out) as tmp:
            (tmp / "a.gguf").write_bytes(b"y")
        assert capsys.readouterr().err == f"note: removed 2.0 kB that an interrupted run left beside {out}\n"
        assert (out / "a.gguf").read_bytes() == b"y" and len(list(tmp_path.iterdir())) == 2  # the sibling's kept
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_killed_file_writes_temporary_is_removed_by_the_next_write(tmp_path, capsys):
    """A single file (`data show --out`, bench's result JSON, the caches) written by a run killed
    mid-write left its temporary name for good: only build folders were tidied."""
    import signal
    import subprocess
    import sys

    from qoqopt.fileio import atomic_write_text

    final = tmp_path / "scan.png"
    writer = ("import sys, time; from pathlib import Path; from qoqopt.fileio import atomic_path\n"
              "with atomic_path(Path(sys.argv[1])) as tmp:\n"
              "    tmp.write_bytes(b'x' * 3000); print('ready', flush=True); time.sleep(600)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", writer, str(final)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(list(tmp_path.iterdir())) == 1
    atomic_write_text(final, "done")
    assert capsys.readouterr().err == f"note: removed 3.0 kB that an interrupted run left beside {final}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scan.png"]


def test_another_machine_with_our_host_name_keeps_its_temporaries(tmp_path, monkeypatch):
    """VMs cloned from one image share a host name, and every Linux host's first pid namespace has the
    same number: on a shared (NFS) folder one machine took the other's live build for a dead pid's and
    removed it. The machine id (systemd's) tells them apart."""
    from qoqopt import leftovers

    out = tmp_path / "build"
    monkeypatch.setattr(leftovers, "_machine_id", lambda: "0" * 32)  # the clone
    theirs = tmp_path / f"{leftovers.tmp_prefix(out)}abc.tmp".replace(f".p{os.getpid()}-", ".p999999999-")
    theirs.mkdir()
    monkeypatch.undo()
    assert leftovers.remove_stale(out).others == [theirs] and theirs.exists()
    mine = tmp_path / f"{leftovers.tmp_prefix(out)}def.tmp".replace(f".p{os.getpid()}-", ".p999999999-")
    mine.mkdir()
    leftovers.remove_stale(out)  # a dead pid of this machine's: removed; the clone's kept
    assert not mine.exists() and theirs.exists()
    # named by a qoqopt from before the machine id was in the owner: still this machine's
    older = tmp_path / f".build.p999999999-{leftovers._owner(machine_id=False)}.ghi.tmp"
    older.mkdir()
    leftovers.remove_stale(out)
    assert not older.exists() and theirs.exists()


def test_a_pid_is_only_ours_in_our_pid_namespace(tmp_path):
    """A container sharing the host name (docker --uts=host, HPC containers) has pids of its own: a
    live build there must not look like a dead process's here."""
    import shutil
    import subprocess
    import sys

    from qoqopt.leftovers import tmp_prefix

    probe = [sys.executable, "-c", "from pathlib import Path; from qoqopt.leftovers import tmp_prefix; "
             "print(tmp_prefix(Path('b')).split('-')[1])"]  # fmt: skip
    if not shutil.which("unshare"):
        pytest.skip("no unshare here")
    # --user --map-root-user: a pid namespace without root, as a rootless container makes one
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", *probe],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {res.stderr.strip()[:80]}")
    here = subprocess.run(probe, capture_output=True, text=True, check=True).stdout
    assert res.stdout.strip() != here.strip() == tmp_prefix(tmp_path / "b").split("-")[1]


def test_the_current_folder_is_not_an_output(tmp_path, monkeypatch):
    """`--out .` renamed the folder the command runs in (an EBUSY traceback, and `..*.old` debris)."""

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out in (".", "..", str(tmp_path / "here")):
        with pytest.raises(QoqoptError, match=rf"^output {re.escape(out)} is the current folder or holds it: give a "):
            prepare_output_dir(Path(out), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_another_spelling_of_an_input_or_the_current_folder_is_refused(tmp_path, monkeypatch):
    """resolve() keeps apart spellings of one folder that the file system does not: `--out out/Mini`
    over the source `out/mini` on macOS's case-insensitive APFS. A bind mount gives a folder a second
    spelling here (on Linux, as root); the OS's device and inode numbers say it is the same folder."""
    import subprocess

    data, alias = tmp_path / "data", tmp_path / "alias"
    (data / "model").mkdir(parents=True)
    alias.mkdir()
    if subprocess.run(["mount", "--bind", str(data), str(alias)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (Linux, as root)")
    try:
        assert alias.resolve() != data.resolve() and os.path.samefile(alias, data)
        for out in (alias / "model", alias):  # the source itself, and a folder that holds it
            with pytest.raises(QoqoptError, match=rf"^output {re.escape(str(out))} would replace {re.escape(str(data / 'model'))}, "):
                prepare_output_dir(out, force=True, inputs=[data / "model"])
        monkeypatch.chdir(data / "model")
        with pytest.raises(QoqoptError, match=rf"^output {re.escape(str(alias / 'model'))} is the current folder or holds it"):
            prepare_output_dir(alias / "model", force=True)
        prepare_output_dir(alias / "new", force=False, inputs=[data / "model"])  # a new folder beside it is fine
    finally:
        subprocess.run(["umount", str(alias)], check=True)
    assert sorted(p.name for p in data.iterdir()) == ["model"]


def test_a_file_over_the_file_systems_limit_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """EFBIG (a FAT32 drive's 4 GiB, `ulimit -f`) from a write inside a build: one line that says
    more room would not help, naming the folder the user knows, not the hidden temporary build; it
    was a traceback from a GPTQ/AWQ export."""
    from qoqopt import cli

    out = tmp_path / "build"
    with pytest.raises(QoqoptError, match=r"^cannot write build: larger than one file may be at .*FAT32") as caught:
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    assert ".tmp" not in str(caught.value) and not out.exists() and _debris(tmp_path) == []
    from qoqopt.fileio import write_error

    inside = tmp_path / ".build.p1-00000000.abcd.tmp"
    inside.mkdir()
    said = str(write_error(OSError(errno.EFBIG, "File too large"), inside / "m.BF16.gguf"))
    assert said.startswith("cannot write m.BF16.gguf: larger than one file may be at ") and ".tmp" not in said
    assert errno.EFBIG in cli.USER_FIXABLE


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_gguf_tensor_written_to_a_full_disk_says_disk_full():
    """A GGUF's tensors are written with the file's own write: numpy's ndarray.tofile reported a
    full disk as "2097152 requested and 178608 written", with no errno, so the export said that,
    about its hidden temporary file, instead of "disk full"."""
    import numpy as np

    from qoqopt.exports.gguf_write import StreamedTensor
    from qoqopt.fileio import write_error

    tensor = StreamedTensor.__new__(StreamedTensor)
    tensor.nbytes = 4 << 20
    tensor.chunks = lambda: iter([np.ones(1 << 20, dtype=np.float32)])
    with pytest.raises(OSError) as caught:
        with open("/dev/full", "wb") as fp:
            tensor.tofile(fp)
    assert caught.value.errno == errno.ENOSPC
    assert str(write_error(caught.value, Path("/tmp/x.gguf"))).startswith("disk full while writing x.gguf")
    # the bytes are numpy's own, for an empty 2-D chunk, a strided one and a 16-bit one
    import io

    chunks = [np.zeros((0, 4), np.float16), np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
              np.arange(6, dtype=np.uint16).reshape(2, 3)]  # fmt: skip
    tensor.chunks, tensor.nbytes = lambda: iter(chunks), sum(c.nbytes for c in chunks)
    written = io.BytesIO()
    tensor.tofile(written)
    assert written.getvalue() == b"".join(c.tobytes() for c in chunks)


def test_a_build_another_run_finished_meanwhile_is_not_replaced_without_force(tmp_path):
    """Two runs into one new --out (two terminals, a script's loop): the second to finish found the
    folder absent at its start, and its swap replaced the first's build without --force, both
    saying "done". Now it stops in one line and the first's build stays whole; an empty folder
    is still filled, and --force still replaces."""
    out = tmp_path / "build"
    with pytest.raises(QoqoptError, match=r"^output .*build was filled by another run while this one worked.*--force"):
        with atomic_dir(out) as tmp:
            (tmp / "mine.Q8_0.gguf").write_text("second")
            with atomic_dir(out) as other:  # the other run, finishing first
                (other / "theirs.Q4_K_M.gguf").write_text("first")
    assert os.listdir(out) == ["theirs.Q4_K_M.gguf"] and _debris(tmp_path) == []
    empty = tmp_path / "empty"
    with atomic_dir(empty) as tmp:
        empty.mkdir()  # made meanwhile, still empty: filled as before
        (tmp / "a.gguf").write_text("a")
    assert os.listdir(empty) == ["a.gguf"] and _debris(tmp_path) == []
    with atomic_dir(out, force=True) as tmp:
        (tmp / "mine.Q8_0.gguf").write_text("second")
    assert os.listdir(out) == ["mine.Q8_0.gguf"] and _debris(tmp_path) == []
    a_file = tmp_path / "file"  # a file made there meanwhile: the same line (ENOTDIR was a traceback)
    with pytest.raises(QoqoptError, match=r"^output .*file was filled by another run while this one worked"):
        with atomic_dir(a_file) as tmp:
            (tmp / "a.gguf").write_text("a")
            a_file.write_text("theirs")
    assert a_file.read_text() == "theirs" and _debris(tmp_path) == []
    # any other refusal of the rename is not said to be another run's build: EBUSY, which rename(2)
    # gives for a mount point (one made there meanwhile; no test can mount), passes through as itself
    busy = tmp_path / "busy"

    def rename(src, dst):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), None, str(dst))

    with pytest.MonkeyPatch.context() as m:
        m.setattr("qoqopt.fileio.os.replace", rename)
        with pytest.raises(OSError) as caught:
            with atomic_dir(busy) as tmp:
                (tmp / "a.gguf").write_text("a")
    assert caught.value.errno == errno.EBUSY and not busy.exists() and _debris(tmp_path) == []


def test_a_file_another_run_wrote_meanwhile_is_not_replaced_without_force(tmp_path, monkeypatch):
    """`data show --out` and bench's result checked the name once, at the start: a second run that
    wrote the same name meanwhile (bench names its result by the second it finished) was replaced.
    link(2) refuses an existing name in the same step that names the file; a file system without
    hard links is checked just before the rename."""
    from qoqopt.bench.run import _write_result
    from qoqopt.fileio import OutputExists, atomic_write_text

    final = tmp_path / "ct.png"
    with pytest.raises(OutputExists, match=r"ct.png already exists \(use --force to replace it\)$"):
        with atomic_path(final, replace=False) as tmp:
            tmp.write_text("mine")
            final.write_text("theirs")  # the other run, finishing first
    assert final.read_text() == "theirs" and _debris(tmp_path) == []
    atomic_write_text(final, "mine")  # replace=True (the default, and --force) replaces as before
    assert final.read_text() == "mine" and _debris(tmp_path) == []
    first = _write_result(tmp_path, "bench-tiny-cpu-20261203-143000.json", "first")
    second = _write_result(tmp_path, "bench-tiny-cpu-20261203-143000.json", "second")
    assert (first.name, second.name) == ("bench-tiny-cpu-20261203-143000.json", "bench-tiny-cpu-20261203-143000-2.json")
    assert (first.read_text(), second.read_text()) == ("first", "second")

    def no_links(src, dst):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(src), None, str(dst))

    monkeypatch.setattr("qoqopt.fileio.os.link", no_links)  # vfat, some FUSE: EPERM
    with pytest.raises(OutputExists):
        atomic_write_text(final, "again", replace=False)
    atomic_write_text(tmp_path / "new.json", "new", replace=False)
    assert final.read_text() == "mine" and (tmp_path / "new.json").read_text() == "new" and _debris(tmp_path) == []


LIMITED_WRITES = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(2) instead of the signal's kill
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
import numpy as np
from qoqopt.errors import QoqoptError
from qoqopt.exports.gguf_quant import _save_means
try:
    _save_means({"blk.0.ffn_up.weight": np.ones(1 << 19, np.float32)}, __import__("pathlib").Path(sys.argv[2]))
except QoqoptError as exc:
    print(exc)
from qoqopt.fileio import atomic_write_bytes
try:
    atomic_write_bytes(__import__("pathlib").Path(sys.argv[2]).with_name("report.bin"), bytes(2 << 20))
except QoqoptError as exc:
    print(exc)
from qoqopt.cli import main
sys.exit(main(["mini", "--out", sys.argv[1], "--preset", "tiny"]))
"""


def test_safetensors_own_write_errors_are_one_line_and_leave_nothing(tmp_path):
    """safetensors' writer reports an OSError as its own SafetensorError ("... (os error 27)"), which
    a full disk or a file-size limit made a traceback from `qoqopt mini` (and from the trained
    mini's cache, and the imatrix handed to llama.cpp's quantize). Under a real 1 MiB `ulimit -f`,
    safetensors' own error is one line about the file, as is a plain write's EFBIG (the OS's own),
    and no file or temporary is left."""
    import subprocess

    out, means = tmp_path / "mini", tmp_path / "imatrix.safetensors"
    run = subprocess.run([sys.executable, "-c", LIMITED_WRITES, str(out), str(means)], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    larger = f"larger than one file may be at {tmp_path} (a FAT32 drive holds at most 4 GiB a file; or a `ulimit -f` limit)"
    assert run.stdout == (f"cannot write imatrix.safetensors: {larger}: write to another drive\n"
                          f"cannot write report.bin: {larger}: write to another drive\n")  # fmt: skip
    assert run.returncode == 2 and run.stderr == f"error: cannot write model.safetensors: {larger}: write to another drive\n"
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_is_a_mount_point_or_a_dangling_link_is_refused_before_work(tmp_path, tiny_dir, capsys):
    """A Docker volume given as --out (`-v /host/out:/out --out /out`) ran the whole export, then
    failed to rename the build onto the mount point ("Device or resource busy"); a --out that is
    a link to nothing was bench's "File exists". Both are one line before any work."""
    from tests.conftest import refused

    mounts = [m for m in ("/proc", "/dev") if os.path.ismount(m)]  # the OS's own mount table says so
    assert mounts or sys.platform not in ("linux", "darwin")  # /dev is a mount point on Linux and macOS
    for mount in mounts:
        with pytest.raises(QoqoptError, match=rf"^output {mount} is a mount point, .*give a folder inside it \({mount}/build\)$"):
            prepare_output_dir(Path(mount), force=True)
    dangling = tmp_path / "results"
    dangling.symlink_to(tmp_path / "gone")
    said = f"error: output {dangling} is a symbolic link to {tmp_path / 'gone'}, which does not exist"
    assert refused(["bench", tiny_dir, "--variants", "bf16", "--items", "1", "--out", dangling], capsys) == said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_an_output_in_a_folder_that_cannot_be_written_is_refused_before_work(tmp_path, monkeypatch):
    """A cluster's pre-made --out (/scratch/proj/out, writable, in a folder that is not) failed as
    "cannot write OUT: Permission denied", about a folder the user can write. As root every folder
    is writable, so there the answer of os.access is the stand-in's."""
    parent = tmp_path / "proj"
    (parent / "out").mkdir(parents=True)
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != parent.resolve())
        with pytest.raises(QoqoptError, match=rf"^output {re.escape(str(parent / 'out'))} is writable but the folder it is "
                                              rf"in is not, .*give a folder inside it \({re.escape(str(parent / 'out' / 'build'))}\)$"):  # fmt: skip
            with atomic_dir(parent / "out"):
                pass
        with atomic_dir(parent / "out" / "build") as tmp:  # what it says to do
            (tmp / "a.gguf").write_text("a")
        assert os.listdir(parent / "out") == ["build"]
    finally:
        parent.chmod(0o755)


def test_an_output_that_cannot_be_written_itself_is_not_called_writable(tmp_path, monkeypatch):
    """An --out the user cannot write, in a folder they cannot write either (`--out /usr/share/doc`
    as a user, a read-only mount), was refused as "writable but the folder it is in is not ... give
    a folder inside it", a folder that cannot be made either. It is left to the write, which names
    the real cause. As root every folder is writable, so there the answer of os.access is the
    stand-in's."""
    parent = tmp_path / "proj"
    (parent / "out").mkdir(parents=True)
    (parent / "out").chmod(0o555)
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root
            real = os.access
            denied = {parent.resolve(), (parent / "out").resolve()}
            monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p).resolve() not in denied)
        assert not os.access(parent / "out", os.W_OK)
        prepare_output_dir(parent / "out", force=False)  # no claim that it is writable
    finally:
        parent.chmod(0o755)
        (parent / "out").chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an open file through Linux's /proc")
def test_a_finished_output_reaches_the_disk_before_its_name_does(tmp_path, monkeypatch):
    """POSIX renames are recorded before the data they name is written (ext4's delayed allocation): a
    power cut left the final name holding an empty file, which the caches took as complete. Each file
    is fsynced before the rename that names it, and the folder holding the name after it."""
    from qoqopt import fileio

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                        real_fsync(fd))[1])  # fmt: skip
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))[1])
    fileio.atomic_write_text(tmp_path / "stamp.json", "{}")
    first, rename, parent = events
    assert first[0] == "fsync" and re.fullmatch(r".*/\.stamp\.json\.p\d+-\w+\.\w+\.tmp", first[1])
    assert rename == ("rename", str(tmp_path / "stamp.json")) and parent == ("fsync", str(tmp_path))
    events.clear()
    with fileio.atomic_dir(tmp_path / "build") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "model.gguf").write_bytes(b"x")
        (tmp / "manifest.json").write_text("{}")
    *synced, rename, parent = events
    assert {name.rsplit("/", 1)[-1] for _, name in synced[:-1]} == {"sub", "model.gguf", "manifest.json"}
    assert synced[-1][1] == str(tmp) and all(kind == "fsync" for kind, _ in synced)
    assert rename == ("rename", str(tmp_path / "build")) and parent == ("fsync", str(tmp_path))
