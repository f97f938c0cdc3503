"""Names a build records that qoqopt did not write: found before `publish` uploads them.

Hospitals name folders and files after patients, accession numbers and studies, and a build's files
are uploaded byte for byte. This qoqopt records a user set by its sha256 (`data.jsonl.set_label`),
a local source as `LOCAL_SOURCE`, and drops the datasets a given imatrix file names. Builds made
before it, and configs that transformers 4 saved from a fine-tune's output folder, can still carry
such names. What a field may hold is said by what qoqopt writes there (an allowlist): a path can be
relative, hold spaces or commas, or end in any suffix, so no pattern finds every one.
"""

from __future__ import annotations

import re
from pathlib import Path

from qoqopt.errors import QoqoptError
from qoqopt.manifest import entry_path

LOCAL_SOURCE = "a local checkpoint"  # a GGUF's qoqopt.source when it was made from a local folder
GIVEN_DATASET = "a dataset the given imatrix file named (left out)"  # what replaces such a name
# a calibration label qoqopt writes (calibration.calibration_items), then in the imatrix its counts
_OWN_LABEL = r"(qoqopt clinical calib split \(seed \d+\)|a user JSONL set \(sha256 [0-9a-f]{12}\))"
_OWN = {
    "calibration.source": re.compile(_OWN_LABEL + "$"),
    "imatrix.datasets": re.compile(_OWN_LABEL + r"(: [\w ,().:;-]*)?$|" + re.escape(GIVEN_DATASET) + "$"),
    "imatrix.source": re.compile(r"calibrated$|read from an imatrix file \(sha256 [0-9a-f]{12}\)$"),
}
# keys whose whole value is where the model came from: anything but the Hub repo the build names may
# be a folder (a relative one has a repo id's shape)
_SOURCE_KEYS = {"config.json": "_name_or_path", "tokenizer_config.json": "name_or_path"}


def own_eval_set(text: str) -> bool:
    """An eval set's name as bench records it: the built-in set, or a user set by its sha256."""
    return text == "clinical" or bool(_OWN["calibration.source"].match(text) and text.startswith("a user"))


def own_dataset(text: str) -> str:
    """An imatrix dataset as a build records it: qoqopt's own label kept, anything else (the file
    llama-imatrix names as typed, an older qoqopt's path) replaced by GIVEN_DATASET."""
    return text if _OWN["imatrix.datasets"].match(text) else GIVEN_DATASET


def recorded_local_names(folder: Path, manifest: dict, base: str | None = None) -> list[str]:
    """Each "file key: value" of the build's listed files that qoqopt does not write there. Files
    that are missing are left to the upload's own check. A source is a Hub id only where it is the
    repo the build names: the one the export recorded with its commit (`publish.hub_source`), or
    ``base`` (publish's --base-model). ``runs/DOE_JOHN`` has a Hub id's shape, and whether a folder
    of that name exists depends on where publish runs."""
    from qoqopt.publish import hub_source

    hub = {hub_source(manifest), base} - {None}
    found = [f"manifest.json {key}: {text}" for key, text in _manifest_texts(manifest) if not _OWN[key].match(str(text))]
    for entry in manifest.get("files", []):
        rel = entry_path(entry)
        path = Path(folder) / rel
        if not path.is_file():
            continue
        if rel.endswith(".gguf"):
            found += [f"{rel} {key}: {value}" for key, value in _gguf_names(path, hub, manifest)]
        elif Path(rel).name in _SOURCE_KEYS:
            key = _SOURCE_KEYS[Path(rel).name]
            found += [f"{rel} {key}: {value}" for value in _json_source(path, key, hub)]
    return found


def _manifest_texts(manifest: dict) -> list[tuple[str, str]]:
    """The manifest's own records of the calibration data (its `source.model` is replaced on upload)."""
    imatrix = manifest.get("imatrix") or {}
    texts = [("calibration.source", (manifest.get("calibration") or {}).get("source")),
             ("imatrix.source", imatrix.get("source"))]  # fmt: skip
    texts += [("imatrix.datasets", d) for d in imatrix.get("datasets") or []]
    return [(key, text) for key, text in texts if text is not None]


def _gguf_names(path: Path, hub: set[str], manifest: dict) -> list[tuple[str, str]]:
    """The GGUF's keys that name where it came from: its source, and the imatrix it was quantized
    with (llama-quantize's keys, in every text GGUF: an older qoqopt wrote the imatrix's path there)."""
    from qoqopt.exports.gguf_header import read_header

    try:
        kv = read_header(path).kv
    except QoqoptError:
        return []  # not a GGUF header: it has no keys to name anything in
    from qoqopt.exports.gguf_quant import c_string

    own_file = (manifest.get("imatrix") or {}).get("file")
    own_file = c_string(own_file) if isinstance(own_file, str) else None  # as llama.cpp's key holds it
    checks = {"qoqopt.source": lambda v: v == LOCAL_SOURCE or v in hub,
              "quantize.imatrix.file": lambda v: v == own_file,
              "quantize.imatrix.dataset": lambda v: bool(_OWN["imatrix.datasets"].match(v))}  # fmt: skip
    names = [(key, kv[key]) for key, fine in checks.items() if kv.get(key) is not None and not fine(str(kv[key]))]
    datasets = kv.get("imatrix.datasets")
    if isinstance(datasets, int):  # a list too long for the header reader to keep: unread, so not vouched for
        return names + [("imatrix.datasets", f"{datasets} names, not read")]
    return names + [("imatrix.datasets", d) for d in datasets or [] if not _OWN["imatrix.datasets"].match(str(d))]


def _json_source(path: Path, key: str, hub: set[str]) -> list[str]:
    from qoqopt.fileio import read_json

    try:
        value = read_json(path).get(key)
    except (QoqoptError, AttributeError):
        return []  # not a JSON object: the loaders' checks say so
    return [value] if isinstance(value, str) and value and value not in hub else []
