"""User evaluation / calibration sets as JSONL, one item per line.

    {"image": "scans/a.png", "question": "...", "answer": "Head", "domain": "ct", "choices": [...]}
    {"dicom": "ecg/b.dcm", "question": "...", "answer": "Normal", "domain": "ecg"}

Paths are relative to the JSONL file's folder. Every problem is reported as a one-line
QoqoptError "FILE:LINE: what is wrong", checked up front so a long run does not die at item 900.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pydicom
from PIL import Image

from qoqopt.data.augment import fit_size, resize_to
from qoqopt.data.dicom import dicom_to_image
from qoqopt.data.domains import DOMAINS
from qoqopt.data.ecg import ecg_signal, read_ecg, render_ecg
from qoqopt.data.items import ClinicalItem
from qoqopt.data.prompts import with_suffix
from qoqopt.errors import QoqoptError

_REQUIRED = ("question", "answer", "domain")
_ALLOWED = {"image", "dicom", "question", "answer", "domain", "choices", "id", "meta"}


def load_jsonl(path: str | Path, max_side: int | None = None) -> list[ClinicalItem]:
    """Items of a JSONL set. Blank lines are skipped. `max_side` None keeps each image's own size
    (rounded to Qwen's 28-pixel grid and clamped into QoQ-Med's pixel range)."""
    path = Path(path)
    if not path.is_file():
        raise QoqoptError(f"{path}: no such file")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            items.append(_parse_line(path, lineno, line, max_side))
    if not items:
        raise QoqoptError(f"{path}: contains no items")
    return items


def _parse_line(path: Path, lineno: int, line: str, max_side: int | None) -> ClinicalItem:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QoqoptError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise QoqoptError(f"{where}: expected a JSON object, got {type(row).__name__}")
    extra = sorted(set(row) - _ALLOWED)
    if extra:
        raise QoqoptError(f"{where}: unknown field(s) {', '.join(extra)} (put extras under \"meta\")")
    for key in _REQUIRED:
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise QoqoptError(f"{where}: missing or empty field '{key}'")
    if row["domain"] not in DOMAINS:
        raise QoqoptError(f"{where}: unknown domain '{row['domain']}' (known: {', '.join(DOMAINS)})")
    if ("image" in row) == ("dicom" in row):
        raise QoqoptError(f"{where}: give exactly one of 'image' or 'dicom'")
    kind = "image" if "image" in row else "dicom"
    if not isinstance(row[kind], str) or not row[kind]:
        raise QoqoptError(f"{where}: '{kind}' must be a file path")
    file = (path.parent / row[kind]).resolve()
    if not file.is_file():
        raise QoqoptError(f"{where}: {kind} file not found: {file}")
    choices = _choices(row, where)
    answer = row["answer"].strip()
    _check_answer(answer, choices, where)
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise QoqoptError(f"{where}: 'meta' must be a JSON object")
    meta = {**meta, "qtype": "user", "jsonl": str(path), "line": lineno}

    signal = None
    if kind == "dicom" and row["domain"] == "ecg":
        rec = _guarded(where, read_ecg, file)  # read now: a bad waveform fails at load, not mid-run
        signal = ecg_signal(rec)
        make = partial(render_ecg, rec)
    elif kind == "dicom":
        _check_dicom_header(file, where)
        make = partial(dicom_to_image, file)
    else:
        make = partial(_open_image, file)
    return ClinicalItem(
        id=str(row.get("id") or f"{path.stem}:{lineno}"),
        domain=row["domain"],
        question=with_suffix(row["question"]),
        answer=answer,
        choices=choices,
        source=str(file),
        ecg_signal=signal,
        meta=meta,
        image_fn=partial(_sized, make, max_side, where),
    )


def _choices(row: dict, where: str) -> list[str]:
    choices = row.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise QoqoptError(f"{where}: 'choices' must be a list of non-empty strings")
    if choices and len(choices) < 2:
        raise QoqoptError(f"{where}: 'choices' needs at least two options")
    return [c.strip() for c in choices]


def _check_answer(answer: str, choices: list[str], where: str) -> None:
    """Every comma-separated label of the answer must be one of the choices (when choices are given)."""
    if not choices:
        return
    allowed = {c.lower() for c in choices}
    missing = [a.strip() for a in answer.split(",") if a.strip().lower() not in allowed]
    if missing:
        raise QoqoptError(f"{where}: answer '{', '.join(missing)}' is not among the choices")


def _check_dicom_header(file: Path, where: str) -> None:
    """Parse the header only: big image sets load fast, and a non-DICOM file still fails here."""
    try:
        pydicom.dcmread(file, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise QoqoptError(f"{where}: {file}: not a readable DICOM file ({exc})") from None


def _guarded(where: str, fn, *args):
    try:
        return fn(*args)
    except QoqoptError as exc:
        raise QoqoptError(f"{where}: {exc}") from None


def _open_image(file: Path) -> Image.Image:
    with Image.open(file) as img:
        return img.convert("RGB")


def _sized(make, max_side: int | None, where: str) -> Image.Image:
    try:
        img = make()
    except (OSError, QoqoptError) as exc:  # PIL raises OSError subclasses for unreadable images
        raise QoqoptError(f"{where}: cannot read image ({exc})") from None
    return resize_to(img, fit_size(img.width, img.height, max_side or max(img.size)))
