"""Names of the user's own folders and files inside a build: found before `publish` uploads them.

Hospitals name folders and files after patients, accession numbers and studies, and a build's files
are uploaded byte for byte. This qoqopt records a user set by its sha256 (`data.jsonl.set_label`)
and a local source as `LOCAL_SOURCE`; builds made before it, imatrix files from llama-imatrix (which
records its `-f` file as typed) and configs that transformers 4 saved from a fine-tune's output
folder can still carry such names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qoqopt.manifest import entry_path

# a path written out (POSIX or home, a Windows drive or share), or a data file named on its own
_PATH = re.compile(r"(?<![\w.])(?:~?/|[A-Za-z]:[\\/]|\\\\)[^\s`'\"();,]+|[^\s`'\"();,/\\]+\.(?:jsonl|txt|csv|parquet)\b",
                   re.IGNORECASE)  # fmt: skip
# keys whose whole value is where the model came from: anything but a Hub id or the placeholder names a folder
_SOURCE_KEYS = {"config.json": "_name_or_path", "tokenizer_config.json": "name_or_path"}
_GGUF_SOURCE, _GGUF_DATASETS = "qoqopt.source", "imatrix.datasets"
LOCAL_SOURCE = "a local checkpoint"


def paths_in(text: str) -> list[str]:
    return _PATH.findall(text)


def scrub(text: str) -> str:
    """``text`` with each path or data file name it holds replaced by "a local file"."""
    return _PATH.sub("a local file", text)


def recorded_local_names(folder: Path, manifest: dict) -> list[str]:
    """Each "file key: name" of the build's listed files that names a local folder or file. Files
    that are missing are left to the upload's own check."""
    found = [f"manifest.json {key}: {name}" for key, text in _manifest_texts(manifest) for name in paths_in(text)]
    for entry in manifest.get("files", []):
        rel = entry_path(entry)
        path = Path(folder) / rel
        if not path.is_file():
            continue
        if rel.endswith(".gguf"):
            found += [f"{rel} {key}: {name}" for key, name in _gguf_names(path)]
        elif Path(rel).name in _SOURCE_KEYS:
            key = _SOURCE_KEYS[Path(rel).name]
            found += [f"{rel} {key}: {name}" for name in _json_source(path, key)]
    return found


def _manifest_texts(manifest: dict) -> list[tuple[str, str]]:
    """The manifest's own records of the calibration data (its `source.model` is replaced on upload)."""
    texts = [("calibration.source", (manifest.get("calibration") or {}).get("source"))]
    imatrix = manifest.get("imatrix") or {}
    texts += [("imatrix.source", imatrix.get("source"))] + [("imatrix.datasets", d) for d in imatrix.get("datasets") or []]
    return [(key, text) for key, text in texts if isinstance(text, str)]


def _gguf_names(path: Path) -> list[tuple[str, str]]:
    from qoqopt.errors import QoqoptError
    from qoqopt.exports.gguf_header import read_header

    try:
        kv = read_header(path).kv
    except QoqoptError:
        return []  # not a GGUF header: it has no keys to name anything in
    names = [(_GGUF_SOURCE, s) for s in [kv.get(_GGUF_SOURCE)] if isinstance(s, str) and _names_a_folder(s)]
    datasets = kv.get(_GGUF_DATASETS)
    if isinstance(datasets, list):
        names += [(_GGUF_DATASETS, name) for d in datasets if isinstance(d, str) for name in paths_in(d)]
    return names


def _json_source(path: Path, key: str) -> list[str]:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (ValueError, AttributeError):
        return []  # not a JSON object: the loaders' checks say so
    return [value] if isinstance(value, str) and value and _names_a_folder(value) else []


def _names_a_folder(source: str) -> bool:
    from qoqopt.publish import is_repo_id

    return source != LOCAL_SOURCE and (not is_repo_id(source) or Path(source).exists())
