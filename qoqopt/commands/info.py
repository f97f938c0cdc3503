"""`qoqopt info MODEL`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

EXAMPLES = """\
examples:
  qoqopt info out/mini                      # a local checkpoint directory
  qoqopt info out/mini-gguf                 # a GGUF build: its files, dims, params and BPW per quant
  qoqopt info out/mini-gguf/mini.Q4_K_M.gguf   # one GGUF file (a split file: its first part)
  qoqopt info ddvd233/QoQ-Med-VL-7B         # a Hub id: only config, index and tokenizer are fetched
  HF_HUB_OFFLINE=1 qoqopt info ddvd233/QoQ-Med-VL-7B   # from the local HF cache only
  qoqopt info downloads/QoQ-Med-VL-7B-GGUF --verify      # and every file's sha256 against its manifest

Reads config.json, the safetensors index and shard headers; never the weights themselves.
A directory with the metadata but no shards (config.json and model.safetensors.index.json, as a
metadata-only Hub fetch leaves it) still works: shapes come from a meta-device model.
A GGUF build is read from its manifest.json and the GGUF headers (a Hub GGUF repo: from its manifest,
nothing else is downloaded); a GPTQ/AWQ build is a checkpoint with a quantization_config.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "info",
        help="summarise a QoQ-Med / Qwen2.5-VL checkpoint, a qoqopt build or a GGUF file",
        description="Architecture summary: text and vision dims, parameters by part, dtype, shards, "
        "tokenizer/processor presence, and QoQ-Med's ECG encoder if present.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="checkpoint or build directory, Hub id (owner/name), or a .gguf file")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--verify", action="store_true",
                   help="also check every file of a local build against its manifest.json (present, size, "
                   "sha256, each file read again: ask and bench remember a file that matched until it changes, "
                   "which rot on a disk does not show); exit status 1 if any fails (without it: 1 when a GGUF file is missing, cut off or unreadable)")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses
    import json

    from ..errors import QoqoptError, printable

    path = Path(args.model).expanduser()
    # checked before the summary, which a damaged build may fail to give
    checked = _verify(args, path) if args.verify else None
    try:
        summary, render = _summary(args, path)
    except QoqoptError as exc:
        if not (checked and checked.failed):
            raise
        # what --verify found explains the failure: that is the answer, with its exit status
        if args.json:
            print(json.dumps(checked.as_json() | {"error": str(exc)}, indent=2))
        else:
            _print_checked(checked)
            if str(exc) not in checked.failed:  # a damaged manifest.json is already the failed line
                print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dataclasses.asdict(summary) | (checked.as_json() if checked else {}), indent=2))
    else:
        print(render(summary))
        _print_checked(checked)
    return 1 if (checked and checked.failed) or _damaged(summary) else 0


def _damaged(summary) -> bool:
    """A GGUF file the summary found missing (in a local build), cut off or unreadable: a script
    checking a download by the exit status (without --verify's hashing) got 0 for it. A Hub repo's
    file that is not here was not downloaded, which is no damage."""
    from ..build_info import GGUFSummary

    if not isinstance(summary, GGUFSummary):
        return False
    return any(f.cut_off or f.unreadable or (not f.present and not summary.hub) for f in summary.files)


def _is_gguf_file(path: Path) -> bool:
    """A .gguf name is a file, never a Hub id (a mistyped name must not be looked up online); a
    folder so named is a build directory like any other."""
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def _summary(args, path: Path):
    """(summary, its renderer) for what MODEL names."""
    from ..loader import resolve

    if _is_gguf_file(path):
        return _gguf_file(path, args)
    folder, commit = resolve(args.model, args.revision, weights=False)  # a Hub id: its manifest and configs only
    hub_id = args.model if commit else None
    # a checkpoint is then read at the commit just fetched, not looked up on the Hub again
    return _gguf_build(folder, hub_id) or _checkpoint(args.model, commit or args.revision)


class Verified(NamedTuple):
    """What --verify found: how many files the manifest lists, a line for each that fails its
    check, and the files it does not list."""

    n_files: int
    failed: list[str]
    unlisted: list[str]
    absent: list[str] = []  # a published build's files its download left out (integrity.not_downloaded)

    def as_json(self) -> dict:
        return {"verify_failed": self.failed, "verify_unlisted": self.unlisted, "verify_not_downloaded": self.absent}


def _verify(args, path: Path) -> Verified:
    """A local build's files checked against its manifest."""
    from ..errors import QoqoptError
    from ..integrity import not_downloaded, problems, unlisted
    from ..loader import HUB_ID, mistyped_local_path
    from ..manifest import read_manifest

    if _is_gguf_file(path):
        raise QoqoptError("--verify checks a build folder against its manifest.json; give the folder, not one file")
    if not path.is_dir():
        if path.exists():
            raise QoqoptError(f"--verify checks a build folder; {args.model} is not a folder")
        if not HUB_ID.match(args.model) or mistyped_local_path(args.model):
            raise QoqoptError(f"--verify: {args.model}: no such build folder")
        raise QoqoptError(f"--verify checks a local copy; download {args.model} first (e.g. `hf download "
                          f"{args.model} --local-dir DIR`) and give DIR")  # fmt: skip
    if not (path / "manifest.json").exists():
        raise QoqoptError(f"--verify checks a build written by `qoqopt export`; {args.model} has no manifest.json")
    try:
        manifest = read_manifest(path)
    except QoqoptError as exc:  # the record the files are checked against is itself damaged: a failed check
        return Verified(0, [str(exc)], [])
    absent = not_downloaded(path, manifest)
    return Verified(len(manifest["files"]) - len(absent), problems(path, manifest), unlisted(path, manifest), absent)


def _print_checked(checked: Verified | None) -> None:
    from ..errors import printable

    if checked is None:
        return
    for line in checked.failed:  # they name files as manifest.json lists them, and those on disk
        print(f"verify       FAILED {printable(line)}")
    if not checked.failed:
        print(f"verify       {checked.n_files} files match manifest.json (size and sha256)")
    if checked.absent:
        print(f"verify       not downloaded, so not checked: {printable(', '.join(checked.absent))}")
    for rel in checked.unlisted:
        print(f"verify       not in manifest.json, so not checked: {printable(rel)}")


def _gguf_file(path: Path, args):
    from .. import build_info
    from ..errors import QoqoptError

    if args.revision:
        raise QoqoptError(f"--revision picks a Hub revision; {args.model} is a local file")
    if not path.is_file():
        raise QoqoptError(f"{args.model}: {'not a file' if path.exists() else 'no such file'}")
    return build_info.summarize_file(path), build_info.render


def _gguf_build(folder: Path, hub_id: str | None):
    """(summary, its renderer) for a GGUF build (a Hub repo's snapshot: ``hub_id``); else None."""
    from .. import build_info
    from ..manifest import build_kind

    if not (folder / "manifest.json").exists():
        return None
    kind, manifest = build_kind(folder)
    return (build_info.summarize_build(folder, manifest, hub_id), build_info.render) if kind == "gguf" else None


def _checkpoint(source: str, revision: str | None):
    from ..info import render, summarize
    from ..loader import open_checkpoint

    return summarize(open_checkpoint(source, revision, weights=False)), render
