"""manifest.json, which every `qoqopt export` writes: what a build directory holds.

Each entry of "files" names its file under "path" (relative to the directory) with its size and
sha256; GGUF entries also carry "kind" (text | mmproj | imatrix | modelfile | ollama: the Hub's `template`
and `params` | readme | license: the source's licence text) and "quant", and
the parts of a text file written in parts (`--split-max-size`) "part" (from 1) and "parts".
GGUF manifests written before qoqopt 0.1.1 used "file" for the name; both are read.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from .errors import QoqoptError


BUILD_FORMATS = ("gguf", "gptq", "awq")  # what `qoqopt export` writes


def is_build(folder: Path) -> bool:
    """The folder holds a qoqopt build, as :func:`build_kind` reads it (what `export --force` may replace)."""
    try:
        return (Path(folder) / "manifest.json").exists() and build_kind(Path(folder))[0] in BUILD_FORMATS
    except QoqoptError:  # another tool's manifest.json, or a damaged one
        return False


def export_output():
    """What `export --force` replaces: an earlier build (fileio.Owned; imported here, as fileio's own
    imports come back to this module)."""
    from .fileio import Owned

    return Owned("manifest.json of a qoqopt build", is_build)


# The text GGUF a build's card, its Modelfile and `ask` use when none is named: the usual quality/size
# trade first, then any other quantized type, the unquantized last (an F16 7B is 15 GB to load).
PREFERRED_QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_XS", "Q4_K_S", "Q5_K_S", "IQ4_NL", "Q3_K_L", "Q3_K_M")
UNQUANTIZED = ("BF16", "F16", "F32")


def source_id(revision: str | None, fingerprint: str | None) -> str:
    """How a build names the checkpoint it came from: its Hub commit, else its content fingerprint
    (``Checkpoint.fingerprint``), else that it recorded neither."""
    if revision:
        return f"revision `{revision}`"
    return f"fingerprint `{fingerprint}`" if fingerprint else "no revision or fingerprint recorded"


def made_from(source: dict) -> str:
    """A build's source on one plain line, as `info` prints it: its path or Hub id, then its commit
    or fingerprint (``source_id`` without the Markdown quotes the cards use)."""
    return f"{source.get('model')}, {source_id(source.get('revision'), source.get('fingerprint')).replace('`', '')}"


def read_manifest(folder: Path, what: str = "a directory written by `qoqopt export`", data=None) -> dict:
    """The parsed manifest, or a one-line error that says what was expected. ``data``: the file's
    JSON, where the caller has read it already."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QoqoptError(f"{folder} is not a directory")
    path = folder / "manifest.json"
    if not path.exists():
        raise QoqoptError(f"{folder} has no manifest.json; give {what}")
    from .fileio import read_json  # fileio's own imports come back to this module

    manifest = read_json(path) if data is None else data
    if not isinstance(manifest, dict):
        raise QoqoptError(f"{path} is not a qoqopt manifest (a JSON object with a \"files\" list)")
    if not manifest.get("files"):
        raise QoqoptError(f"{path} lists no files")
    if not isinstance(manifest["files"], list) or not all(isinstance(f, dict) for f in manifest["files"]):
        raise QoqoptError(f"{path}: \"files\" must be a list of objects")
    _check_kinds(manifest, path)
    listed = set()
    for entry in manifest["files"]:
        _check_inside(entry_path(entry), path)
        if entry_path(entry) in listed:  # counted twice in sizes and parts, uploaded twice by publish
            raise QoqoptError(f"{path} lists {entry_path(entry)} twice: copy or download the build again")
        listed.add(entry_path(entry))
        _check_counts(entry, path)
        _check_kinds(entry, path, f"{entry_path(entry)} ")
    _check_parts(manifest["files"], path)
    return manifest


# what the commands read of a manifest, by type (null or absent is read as "not recorded")
_TOP_KINDS = {"format": str, "name": str, "source": dict, "imatrix": dict, "calibration": dict, "quantization": dict,
              "notes": list, "skipped": list}  # fmt: skip
_ENTRY_KINDS = {"kind": str, "quant": str, "sha256": str}


def _check_kinds(obj: dict, manifest_path: Path, what: str = "") -> None:
    """A hand-edited value of another JSON type was a traceback where it is read ("kind": null in
    info, "calibration": "x" in publish): one line naming it instead."""
    kinds = _ENTRY_KINDS if what else _TOP_KINDS
    for key, kind in kinds.items():
        value = obj.get(key)
        if value is not None and not isinstance(value, kind):
            raise QoqoptError(f"{manifest_path} gives {what}\"{key}\": {json.dumps(value)[:60]}, not a JSON "
                              f"{ {str: 'string', dict: 'object', list: 'list'}[kind] }")  # fmt: skip
        if kind is list and value is not None and not all(isinstance(x, str) for x in value):
            raise QoqoptError(f"{manifest_path} gives {what}\"{key}\": a list that is not all strings")


def build_kind(folder: Path) -> tuple[str, dict | None]:
    """("gguf" | "gptq" | "awq", its manifest) for a qoqopt export directory, ("checkpoint", None)
    for a directory with a config.json and no manifest."""
    data = _json_or_none(folder / "manifest.json")  # read once, for both questions below
    if (folder / "manifest.json").exists() and not (_foreign(data) and (folder / "config.json").exists()):
        manifest = read_manifest(folder, data=data)  # unreadable (None): read again, to say why
        has_gguf = bool(gguf_entries(manifest, "text"))
        kind = manifest.get("format") or ("gguf" if has_gguf else None)
        if kind not in BUILD_FORMATS:
            raise QoqoptError(f"{folder / 'manifest.json'}: unknown build format {kind!r} ({', '.join(BUILD_FORMATS)})")
        if kind != "gguf" and (has_gguf or not (folder / "config.json").exists()):  # an edited "format"
            raise QoqoptError(f"{folder / 'manifest.json'} says format {kind!r}, but the build "
                              f"{'lists text GGUFs' if has_gguf else 'has no config.json'}")  # fmt: skip
        if kind == "gguf" and not has_gguf:
            raise QoqoptError(f"{folder / 'manifest.json'} says format 'gguf', but the build lists no text GGUF")
        return kind, manifest
    if (folder / "config.json").exists():
        return "checkpoint", None
    raise QoqoptError(f"{folder} has no manifest.json nor config.json; give a directory written by "
                      "`qoqopt export`, or a checkpoint")  # fmt: skip


def _json_or_none(path: Path):
    """The file's JSON, or None where there is none to read (no file, not JSON)."""
    from .fileio import read_json

    try:
        return read_json(path)
    except (OSError, QoqoptError):
        return None


def _foreign(data) -> bool:
    """Another tool's manifest.json (an object with none of the keys a qoqopt build's has), beside a
    checkpoint's config.json: that checkpoint was refused as a build that "lists no files". A
    damaged one of ours still is."""
    return isinstance(data, dict) and not {"format", "files", "qoqopt_version"} & set(data)


def is_int(value) -> bool:
    """A JSON or GGUF integer: Python reads their booleans as bools, which are ints too."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_counts(entry: dict, manifest_path: Path) -> None:
    for key in ("bytes", "part", "parts"):
        value = entry.get(key)
        if key in entry and (not is_int(value) or value < 0):
            raise QoqoptError(f"{manifest_path} gives {entry_path(entry)} \"{key}\": {value!r}, not a count")
    _check_part_count(entry, manifest_path)


def _check_part_count(entry: dict, manifest_path: Path) -> None:
    """A part number and count as llama.cpp can hold them (split.count is 16-bit), checked before
    `_check_parts` builds the list 1..N from them: "parts": 10**9 was a billion-item list."""
    from .exports.gguf_split import MAX_PARTS

    for key in ("part", "parts"):
        if key in entry and not 1 <= entry[key] <= MAX_PARTS:
            raise QoqoptError(f"{manifest_path} gives {entry_path(entry)} \"{key}\": {entry[key]}, not 1..{MAX_PARTS} "
                              "(llama.cpp's split.count is 16-bit)")  # fmt: skip


def _check_parts(files: list[dict], manifest_path: Path) -> None:
    """A file in parts is listed as parts 1..N, each named as llama.cpp finds it from the first
    (`<stem>-0000i-of-0000N.gguf`): a runtime is given part 1, and `publish` uploads what is listed."""
    groups: dict[tuple, list[dict]] = {}
    for f in files:
        if "part" in f or "parts" in f:
            groups.setdefault(file_key(f), []).append(f)
    for group in groups.values():
        count = group[0].get("parts") or 0
        numbered = sorted((f["part"], entry_path(f)) for f in group if "part" in f and f.get("parts") == count)
        stems = {_split_stem(rel, no, count) for no, rel in numbered}
        if len(numbered) != len(group) or [no for no, _ in numbered] != list(range(1, count + 1)) or len(stems) != 1 \
                or None in stems:  # fmt: skip
            raise QoqoptError(f"{manifest_path} lists the {group[0].get('quant') or group[0].get('kind')} parts inconsistently (not parts 1..N of "
                              "one file, each named -0000i-of-0000N.gguf): copy or download the build again")  # fmt: skip


def _split_stem(rel: str, no: int, count: int) -> str | None:
    """The file name part `no` of `count` shares with its other parts, or None if it is misnamed."""
    from .exports.gguf_split import SPLIT_NAME

    suffix = SPLIT_NAME.format(stem="", no=no, count=count)
    return rel.removesuffix(suffix) if rel.endswith(suffix) else None


def entry_path(entry: dict) -> str:
    return entry.get("path") or entry.get("file") or ""


def file_key(entry: dict) -> tuple:
    """What one file of a build is known by: a file in parts, by what its parts share (their kind
    and quant type); a whole file, by its path."""
    return (entry.get("kind"), entry.get("quant")) if entry.get("parts") else (entry_path(entry),)


def listed_file(folder: Path, entry: dict) -> Path:
    """The file a manifest entry names, present and of the size the manifest records: a cut-off
    download or copy stops here in one line (llama.cpp would only say that it failed to load)."""
    rel = entry_path(entry)
    path = Path(folder) / rel
    if not path.is_file():
        raise QoqoptError(f"{Path(folder) / 'manifest.json'} lists {rel}, which is missing: copy or download the whole build")
    size = path.stat().st_size
    if "bytes" in entry and entry["bytes"] != size:
        why = "an incomplete download or copy" if size < entry["bytes"] else "changed after export, or another file"
        raise QoqoptError(f"{rel} is {size:,} bytes but manifest.json records {entry['bytes']:,}: {why}")
    return path


def is_inside(rel) -> bool:
    """A relative POSIX path that stays inside its folder (no root, no "..", no backslash): what a
    manifest or a checkpoint's index may name, since both come with the files they describe."""
    path = PurePosixPath(rel) if isinstance(rel, str) and rel else None
    return path is not None and not path.is_absolute() and ".." not in path.parts and "\\" not in rel


def _check_inside(rel: str, manifest_path: Path) -> None:
    """A listed file must lie inside the build: `publish` uploads what the manifest names."""
    if not is_inside(rel):
        raise QoqoptError(f"{manifest_path} lists {rel!r}: every file must be a relative path inside the build")


def gguf_entries(manifest: dict, kind: str, quant: str | None = None) -> list[str]:
    """Relative paths of a GGUF build's files of one kind (and quant type, for text files), first
    parts first: a runtime is given a split file's first part."""
    found = [f for f in manifest.get("files", []) if f.get("kind") == kind and (quant is None or f.get("quant") == quant)]
    return [entry_path(f) for f in sorted(found, key=lambda f: f.get("part") or 1)]


def gguf_text_files(manifest: dict, quant: str | None = None) -> list[str]:
    """The text GGUF of type `quant` (without one, `preferred_quant` of the build's): [the file], or
    all its parts, the one llama.cpp is given first. Empty if the build has none."""
    texts = gguf_entries(manifest, "text", quant or preferred_quant(gguf_quants(manifest)))
    if not texts:
        return []
    first = next(f for f in manifest["files"] if entry_path(f) == texts[0])
    return gguf_entries(manifest, "text", first.get("quant")) if first.get("parts") else texts[:1]


def preferred_quant(quants) -> str | None:
    """The first of PREFERRED_QUANTS among `quants`, else the first other quantized one, else the
    first of UNQUANTIZED (None if there are none)."""
    quants = list(quants)
    ranked = [q for q in PREFERRED_QUANTS if q in quants] + [q for q in quants if q not in UNQUANTIZED]
    ranked += [q for q in UNQUANTIZED if q in quants]
    return ranked[0] if ranked else None


def gguf_quants(manifest: dict) -> list[str]:
    return list(dict.fromkeys(f.get("quant") for f in manifest.get("files", []) if f.get("kind") == "text"))
