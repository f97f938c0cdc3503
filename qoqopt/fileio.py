"""Atomic output: nothing partial ever sits under a final name.

Files are written to a hidden temporary sibling and renamed into place; a directory is built
under a temporary name and renamed as a whole. A crash (even SIGKILL) leaves only `.*.tmp*`
debris, never a truncated file that looks finished; the next write of the same file or folder
removes it (leftovers.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows, which qoqopt refuses at start
    fcntl = None

from .errors import QoqoptError
from .interrupts import deferred_signals
from .leftovers import tidy, tmp_prefix


@contextlib.contextmanager
def removed_if_left_empty(*folders: Path) -> Iterator[None]:
    """The folders made inside this block (``folders`` and any parents made for them) are removed
    again when it fails or is stopped before anything is in them: an interrupted bench left an
    empty OUT/, a failed `export --out a/b` an empty a/."""
    made = {f for folder in map(Path.absolute, folders) for f in (folder, *folder.parents) if not f.exists()}
    try:
        yield
    except BaseException:
        for folder in sorted(made, key=lambda f: len(f.parts), reverse=True):  # inner first
            with contextlib.suppress(OSError):  # not empty, or never made
                folder.rmdir()
        raise


def read_json(path: Path):
    """A JSON file's value, or a one-line error: bytes that are not UTF-8 (JSON's encoding, whatever
    the locale's), not JSON, nested past what Python's parser takes, or a folder of that name."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON, an integer past 4300 digits
        raise QoqoptError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    except IsADirectoryError:
        raise QoqoptError(f"{path} is a folder, not a JSON file") from None


class OutputExists(QoqoptError):
    """``final`` appeared while a write that must not replace it was under way."""

    def __init__(self, final: Path):
        super().__init__(f"{final} already exists (use --force to replace it)")


@contextlib.contextmanager
def atomic_path(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it over `final` only on success. With
    ``replace=False`` a `final` that exists by then is kept and :class:`OutputExists` raised: a check
    at the start misses a second run that wrote the same name meanwhile."""
    final = Path(final)
    with removed_if_left_empty(final.parent), _atomic_path(final, replace) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_path(final: Path, replace: bool) -> Iterator[Path]:
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # best effort: another owner's file may come and go meanwhile
            tidy(final, f"beside {final}")  # a killed write's temporary file, as atomic_dir removes a build's
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(final), suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; published files get the usual umask-derived mode instead.
        os.chmod(tmp_path, 0o666 & ~_umask())
        synced(tmp_path)
        _give_final_name(tmp_path, final, replace)
        synced(final.parent)
    except OutputExists:
        tmp_path.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise write_error(exc, final) from exc
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        os_error = library_os_error(exc)
        if os_error is not None:
            raise write_error(os_error, final) from exc
        raise


def _give_final_name(tmp: Path, final: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, final)
        return
    try:  # link(2) fails on an existing name, in one step, where rename(2) replaces it
        os.link(tmp, final)
    except FileExistsError:
        raise OutputExists(final) from None
    except OSError as exc:  # a file system without hard links (FAT, some FUSE): checked, then renamed
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if final.exists() or final.is_symlink():
            raise OutputExists(final) from None
        os.replace(tmp, final)
        return
    tmp.unlink()


_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None) if fcntl else None


def synced(path: Path) -> None:
    """Flush a finished file's data (or a folder's entries) to the disk. A rename is recorded before
    the data it names is written (ext4's delayed allocation): after a power cut the final name held
    an empty file, which the caches then took as complete (a 0-byte tokenizer.json). Synced before
    the rename, and the folder after it, the final name holds the whole file or the old one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a link to nothing, a file that is not ours to read: nothing to flush
        return
    try:
        if _FULLFSYNC is None:
            os.fsync(fd)
        else:  # macOS's fsync leaves the data in the drive's cache; F_FULLFSYNC flushes that too
            fcntl.fcntl(fd, _FULLFSYNC)
    except OSError as exc:  # EIO is the disk failing the write: said, as any failed write is
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # no fsync here (some FUSE, SMB)
            raise
    finally:
        os.close(fd)


def library_os_error(exc: BaseException) -> OSError | None:
    """The OSError a library reported as an exception of its own: safetensors' writer raises
    SafetensorError("... No space left on device (os error 28)"), which was a traceback."""
    found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


@contextlib.contextmanager
def writing(final: Path) -> Iterator[None]:
    """Where an output is about to be made (its folder, its temporary name): an OSError there, such as
    a read-only or unwritable folder, is about ``final``, the path the user gave."""
    try:
        yield
    except OSError as exc:
        exc.filename = str(final)  # not the temporary name it may carry
        raise write_error(exc, final) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(final: Path, text: str, replace: bool = True) -> None:
    with atomic_path(final, replace) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


@dataclass(frozen=True)
class Owned:
    """How --force knows an earlier output of its command, the only folder it replaces: `--out
    ~/Documents --force` is a typo, and the swap would delete the whole folder."""

    what: str  # said in the refusal, after "holds no": "manifest.json written by qoqopt export"
    test: Callable[[Path], bool]


def holding(name: str, text: str) -> Callable[[Path], bool]:
    """A test that the folder's file ``name`` holds ``text`` near its start."""

    def test(folder: Path) -> bool:
        try:
            with open(folder / name, encoding="utf-8", errors="replace") as f:
                return text in f.read(1 << 16)
        except OSError:
            return False

    return test


def _is_or_holds(folder: Path, path: Path) -> bool:
    """Whether ``folder`` is ``path`` (which exists) or a folder above it, by the file system's
    identity: resolve() keeps apart spellings of one folder that a case-insensitive disk (macOS's
    APFS) or a bind mount gives it."""
    return folder.exists() and any(os.path.samefile(folder, above) for above in (path, *path.resolve().parents))


def prepare_output_dir(out: Path, force: bool, inputs=(), owned: Owned | None = None) -> None:
    """Refuse to clobber an existing non-empty output unless --force was given, and always refuse an
    output that is, or holds, one of the command's ``inputs`` (the source checkpoint, say): replacing
    it would delete what the build is made from. With ``owned``, --force replaces only a folder
    that test says is an earlier output of the command."""
    out = Path(out)
    for source in map(Path, inputs):
        if source.exists() and _is_or_holds(out, source):
            raise QoqoptError(f"output {out} would replace {source}, which this command reads; choose another --out")
    if _is_or_holds(out, Path.cwd()):  # it would be renamed from under us
        raise QoqoptError(f"output {out} is the current folder or holds it: give a folder to create, such as --out build")
    if out.is_symlink():  # replacing the build would replace the link, not fill the folder it names
        raise QoqoptError(f"output {out} is a symbolic link; give the folder it points to ({out.resolve()})")
    # a build is made beside its output, then renamed into place
    if os.path.ismount(out):
        raise QoqoptError(f"output {out} is a mount point, and a build is made beside its output and renamed "
                          f"into place, which a mount point cannot take: give a folder inside it ({out / 'build'})")  # fmt: skip
    # a folder an admin made for you; one the user cannot write either (/usr/share/doc, a read-only
    # mount) is no such folder, and a folder inside it could not be made: the write says why
    if out.is_dir() and os.access(out, os.W_OK | os.X_OK) and not os.access(out.resolve().parent, os.W_OK | os.X_OK):
        raise QoqoptError(f"output {out} is writable but the folder it is in is not, and a build is made beside "
                          f"its output and renamed into place: give a folder inside it ({out / 'build'})")  # fmt: skip
    check_can_make_dir(out)
    if not (out.exists() and any(out.iterdir())):
        return
    if not force:
        raise QoqoptError(f"output {out} already exists and is not empty (use --force to replace it)")
    if owned and not owned.test(out):
        raise QoqoptError(f"output {out} is not an earlier output of this command (it holds no {owned.what}): "
                          "--force replaces only such a folder; choose another --out, or empty it yourself")  # fmt: skip


def check_can_make_dir(out: Path) -> None:
    """``out`` is, or can become, a directory: neither it nor its nearest existing parent is a file.
    Checked before any work, so such an --out fails in one line rather than after the work."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise QoqoptError(f"output {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise QoqoptError(f"output {out} exists and is not a directory")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise QoqoptError(f"cannot create {out}: {blocker} is a file")


def file_in_the_way(out: Path) -> Path | None:
    """The nearest existing parent of ``out`` when it is not a folder (so ``out`` cannot be made), else None."""
    parent = Path(out).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return None if parent.is_dir() else parent


def check_image_path(out: Path) -> None:
    """An image file name Pillow can write, whose folder can be made."""
    from PIL import Image

    Image.init()
    if Path(out).suffix.lower() not in Image.EXTENSION:
        raise QoqoptError(f"{out}: give an image file name ending in .png (or .jpg, .webp, ...)")
    if Path(out).is_dir():
        raise QoqoptError(f"{out} is a directory; give an image file name")
    check_can_make_dir(Path(out).parent)


@contextlib.contextmanager
def atomic_dir(final: Path, force: bool = False, inputs=(), owned: Owned | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in as a whole on success."""
    final = Path(final)
    prepare_output_dir(final, force, inputs, owned)
    tidy(final, f"beside {final}")
    with removed_if_left_empty(final.parent), _built_dir(final, force) as tmp:
        yield tmp


@contextlib.contextmanager
def _built_dir(final: Path, force: bool) -> Iterator[Path]:
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(final), suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        for path in (*tmp.rglob("*"), tmp):
            synced(path)
        _swap_in(tmp, final, force)
        synced(final.parent)
        tidy(final, f"beside {final}", say_others=False)  # a previous build a killed replace set aside
    except OSError as exc:
        if exc.filename and Path(exc.filename).is_relative_to(tmp):  # name what the user asked for
            exc.filename = str(final / Path(exc.filename).relative_to(tmp))
        # only writes fill a disk: any other OSError may be a source read. Said before the temporary
        # build is deleted, so the free space is the failed write's, not what deleting it gave back
        said = write_error(exc, final) if exc.errno in OUT_OF_ROOM else None
        shutil.rmtree(tmp, ignore_errors=True)
        if said is not None:
            raise said from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, final: Path, force: bool = False) -> None:
    """Put the finished ``tmp`` in ``final``'s place. An old output is renamed aside first and
    deleted last: deleting it first left, when interrupted, a half-deleted build under the final
    name. A stop signal is held through both renames; should the second fail, the old output is
    put back.

    Without ``force`` the rename itself is the check that ``final`` is still absent or empty: a
    second run into the same --out, started before the first finished, replaced the first's build
    when it was checked only at the start (both said "done", the first's build was gone)."""
    if not force or not final.exists():
        _rename_into_place(tmp, final, force)
        return
    old = Path(tempfile.mkdtemp(prefix=tmp_prefix(final), suffix=".old", dir=final.parent))
    swapped = False
    try:
        # a stop signal between the renames left no build at all (the new one deleted as unfinished,
        # the old one set aside): both renames happen, or neither, before it is delivered
        with deferred_signals():
            os.replace(final, old)  # over the empty folder just made
            try:
                _rename_into_place(tmp, final, force)
            except BaseException:
                with contextlib.suppress(OSError):  # another run's build may hold the name now
                    os.replace(old, final)
                raise
            swapped = True
    finally:  # a signal held through the renames is raised as the block ends: the old build goes first
        if swapped:
            shutil.rmtree(old, ignore_errors=True)


def _rename_into_place(tmp: Path, final: Path, force: bool) -> None:
    """Rename over nothing or an empty folder; a folder with files refuses it, and is left alone."""
    try:
        os.replace(tmp, final)  # rename(2), as os.rename: over a folder only if it is empty
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):  # a folder or a file
            raise
        again = "run again to replace it" if force else "use --force to replace it"
        raise QoqoptError(f"output {final} was filled by another run while this one worked; it is left as "
                          f"that run wrote it ({again})") from exc  # fmt: skip


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
OUT_OF_ROOM = (*DISK_FULL, errno.EFBIG)  # EFBIG: a FAT32 drive's 4 GiB, or `ulimit -f`


def write_error(exc: OSError, path: Path) -> QoqoptError:
    """The one-line error for a failed write of ``path`` (or of the file the OSError names, which may
    sit on another filesystem, a cache say); disk full says how much is left there."""
    path = Path(exc.filename) if exc.filename else Path(path)
    if exc.errno in DISK_FULL:
        free = free_bytes(path.parent) or 0
        return QoqoptError(f"disk full while writing {path.name} ({free / 2**30:.1f} GiB free)")
    if exc.errno == errno.EFBIG:  # a FAT32 drive, or `ulimit -f`: more room does not help
        return QoqoptError(f"cannot write {path.name}: larger than one file may be at {_shown(path.parent)} (a FAT32 "
                           "drive holds at most 4 GiB a file; or a `ulimit -f` limit): write to another drive")  # fmt: skip
    return QoqoptError(f"cannot write {path}: {exc.strerror or exc}")


def check_free_space(out: Path, need: int) -> None:
    """Refuse before a long export whose output (``need`` bytes, estimated) cannot fit where it is
    written: the build is made beside ``out``."""
    folder = _existing(Path(out).parent)
    free = free_bytes(folder)
    if free is not None and need > free:  # no answer is not a full disk: the writes will say if it is
        raise QoqoptError(f"not enough disk space at {folder}: the export needs ~{need / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB free")  # fmt: skip


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:  # a temporary name's final one, not made yet
        folder = folder.parent
    return folder


def _shown(folder: Path) -> Path:
    """``folder`` as a user knows it: not inside a hidden temporary build (``.NAME.p123-....tmp``)."""
    folder = _existing(folder)
    while folder.name.startswith(".") and folder.name.endswith(".tmp") and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk that holds ``folder`` (or would: its nearest existing parent); None
    when the disk cannot be asked."""
    try:
        return shutil.disk_usage(_existing(Path(folder))).free
    except OSError:
        return None


def sha256_file(path: Path, chunk: int = 1 << 22, progress=None) -> str:
    """The file's sha256; ``progress(nbytes)`` is called after each block read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()
