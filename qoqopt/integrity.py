"""A build's files checked against the sha256 its manifest records before a runtime is given them.

A copy or download of the right size can still be corrupt (a failing disk, an `rsync --inplace`
cut short, a hand edit), and llama.cpp then answers with garbage and exits 0. Hashing a 7B text
GGUF takes seconds to a minute, so a file that matched is remembered in qoqopt's cache under its
identity (real path, size, inode, mtime and ctime): asking again of the unchanged file costs one
stat. Writing to a file changes its ctime, so a rewritten file is hashed again; but file times
come from a coarse clock (a 1-10 ms tick before Linux 6.13, 2 s on FAT), and an edit in the tick
of the stat would leave the identity as it was. So, as git does with its index ("racy git"), a
digest is remembered only for a file last changed well before it was looked at.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from .cache import cache_root
from .errors import QoqoptError
from .fileio import atomic_write_text, sha256_file
from .manifest import entry_path, file_key, gguf_entries, gguf_quants, listed_file, preferred_quant

BAR_FROM_BYTES = 256 << 20  # smaller files hash in well under a second: no bar
RACY_NS = 2_000_000_000  # a file changed this recently is hashed again when asked again


def checked_files(folder: Path, entries: list[dict], fresh: bool = False) -> list[Path]:
    """The files of manifest ``entries``, each present at its recorded size and sha256 (with
    ``fresh``, read again even where the cache vouches for the unchanged file)."""
    paths = [listed_file(folder, e) for e in entries]  # a missing or cut-off file is found without hashing
    for path, entry in zip(paths, entries):
        want = entry.get("sha256")
        if not want:  # publish refuses such a build; a runtime can still be given it, said once
            print(f"warning: manifest.json records no sha256 for {entry_path(entry)}: its bytes are not checked",
                  file=sys.stderr)  # fmt: skip
        elif sha256_of(path, fresh) != want:
            raise QoqoptError(f"{entry_path(entry)} does not match the sha256 in manifest.json: the file is corrupt "
                              "or was changed after export; copy or download it again")  # fmt: skip
    return paths


def not_downloaded(folder: Path, manifest: dict) -> list[str]:
    """The listed files a download of a published build left out on purpose: the card tells users
    to fetch one quant (`hf download --include`), and `info` called such a copy damaged. A file in
    parts counts as left out only with every part absent; a missing part of one present is damage.
    Nothing is, in a build as `export` wrote it."""
    if not manifest.get("published"):
        return []
    files: dict[tuple, list[str]] = {}  # each file's parts (a whole file: itself)
    for entry in manifest["files"]:
        files.setdefault(file_key(entry), []).append(entry_path(entry))
    return [rel for parts in files.values() if not any((Path(folder) / p).exists() for p in parts) for rel in parts]


def downloaded_quant(folder: Path, manifest: dict) -> str | None:
    """The build's preferred text GGUF among those in ``folder``: a download of one quant (as a
    published build's card says) has the build's default absent, and `ask` refused that as a damaged
    copy. The build's default where every quant is here; None where none is."""
    absent = set(not_downloaded(folder, manifest))
    return preferred_quant(q for q in gguf_quants(manifest) if not set(gguf_entries(manifest, "text", q)) <= absent)


def problems(folder: Path, manifest: dict) -> list[str]:
    """Every file the manifest lists, checked in full (present, size, sha256, each file read again
    whatever the cache remembers): one line per file that fails, none for an intact build. A file
    with no recorded sha256 cannot be vouched for. A published build's files left out of its
    download (:func:`not_downloaded`) are not checked."""
    found, absent = [], set(not_downloaded(folder, manifest))
    for entry in (e for e in manifest["files"] if entry_path(e) not in absent):
        try:
            if not entry.get("sha256"):
                listed_file(folder, entry)
                raise QoqoptError(f"{entry_path(entry)}: manifest.json records no sha256, so its bytes cannot be checked")
            checked_files(folder, [entry], fresh=True)
        except QoqoptError as exc:
            found.append(str(exc))
    return found


def unlisted(folder: Path, manifest: dict) -> list[str]:
    """Files in the build folder that its manifest does not list (hidden ones, such as the
    `.cache/` an `hf download --local-dir` leaves, aside): nothing vouches for them, and a runtime
    pointed at the folder may still offer them, as LM Studio lists every GGUF."""
    listed = {entry_path(e) for e in manifest["files"]} | {"manifest.json"}
    if manifest.get("published"):  # a Hub copy: its README.md is the model card publish wrote
        listed.add("README.md")
    # a link to nothing is named too: a copy whose link target went away looks like a build file
    found = (p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file() or _dangling(p))
    return sorted(rel for rel in found if rel not in listed and not any(part.startswith(".") for part in rel.split("/")))


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def checked_weights(folder: Path, manifest: dict) -> list[Path]:
    """A GPTQ/AWQ build's safetensors files at their recorded size and sha256. Its JSON files (the
    configs the loader reads) are not refused when edited (a generation setting changed on purpose
    is the user's call), but named once: an edited quantization_config otherwise surfaces as tensors
    that "disagree". Other files (a README the Hub card replaced) do not matter to loading."""
    weights = [e for e in manifest["files"] if entry_path(e).endswith(".safetensors")]
    for entry in manifest["files"]:
        path = Path(folder) / entry_path(entry)
        if path.suffix == ".json" and entry.get("sha256") and path.is_file() and sha256_file(path) != entry["sha256"]:
            print(f"warning: {entry_path(entry)} is not the one export wrote (its sha256 differs from manifest.json); "
                  "if loading fails, look at that edit first", file=sys.stderr)  # fmt: skip
    return checked_files(folder, weights)


def sha256_of(path: Path, fresh: bool = False) -> str:
    """The file's sha256, from the cache when this very file, unchanged, was hashed before (unless
    ``fresh``: bits that rot on a disk change no time stamp, and `info --verify` is asked to find them)."""
    looked_at = time.time_ns()
    st = Path(path).stat()
    stamp = _stamp(Path(path), st)
    try:
        known = "" if fresh else stamp.read_text()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = _hash(Path(path), st.st_size)
    if st.st_ctime_ns > looked_at - RACY_NS:  # a later edit could share its time stamps
        return digest
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, digest)
    except (OSError, QoqoptError):  # a full or read-only cache costs hashing again next time, nothing more
        pass  # (atomic_write_text reports its own failures as QoqoptError, which once failed the check)
    return digest


def _stamp(path: Path, st: os.stat_result) -> Path:
    identity = f"{path.resolve()}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return cache_root() / "sha256" / hashlib.sha256(identity.encode()).hexdigest()[:32]


def _hash(path: Path, size: int) -> str:
    from .progress import bar

    with bar(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", leave=False,
             show=size >= BAR_FROM_BYTES) as progress:  # fmt: skip
        return sha256_file(path, progress=progress.update)
