"""User evaluation / calibration sets as JSONL, one item per line.

    {"image": "scans/a.png", "question": "...", "answer": "Head", "domain": "ct", "choices": [...]}
    {"dicom": "ecg/b.dcm", "question": "...", "answer": "Normal", "domain": "ecg"}

Paths are relative to the JSONL file's folder. Every problem is reported as a one-line
QoqoptError "FILE:LINE: what is wrong". Each line, and each file's header, is checked when the set
is loaded, so a long run does not die at item 900; pixels are decoded when an item is used.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import shlex
from functools import partial
from pathlib import Path

from PIL import Image

from qoqopt.data.augment import FACTOR, MAX_PIXELS, MIN_PIXELS, _floor28, _round28, fit_size, resize_to
from qoqopt.data.domains import DOMAINS
from qoqopt.data.ecg import ecg_signal, read_ecg, render_ecg
from qoqopt.data.items import ClinicalItem
from qoqopt.data.prompts import with_suffix
from qoqopt.errors import QoqoptError
from qoqopt.images import MAX_ASPECT, check_image, is_waveform, open_dicom, open_image
from qoqopt.user_text import checked_text

_REQUIRED = ("question", "answer", "domain")
_ALLOWED = {"image", "dicom", "frame", "question", "answer", "domain", "choices", "id", "meta"}


def set_label(path: str | Path) -> str:
    """How builds, bench results and cards name a user set: by its sha256, never its path or file name
    (hospitals name folders and files after patients, accession numbers and studies, and these
    records are uploaded and shared)."""
    from qoqopt.integrity import sha256_of

    return f"a user JSONL set (sha256 {sha256_of(Path(path))[:12]})"


def load_jsonl(path: str | Path, max_side: int | None = None) -> list[ClinicalItem]:
    """Items of a JSONL set. Blank lines are skipped. `max_side` None keeps each image's own size
    (rounded to Qwen's 28-pixel grid and clamped into QoQ-Med's pixel range)."""
    path = Path(path)
    if path.is_dir():
        raise QoqoptError(f"{path} is a directory; give the JSONL file of the set")
    if not path.is_file():
        raise QoqoptError(f"{path}: no such file")
    items, first_line, bad = [], {}, []
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            item = _parse_line(path, lineno, line, max_side)
            # ids key the runtimes' image caches: a repeated one would be given another item's image
            if item.id in first_line:
                raise QoqoptError(f"{path}:{lineno}: id {item.id!r} is already used on line {first_line[item.id]}")
        except QoqoptError as exc:  # every bad line is found in one pass, not one per run
            bad.append(str(exc))
            if len(bad) == MAX_BAD_LINES:  # the wrong file (a CSV, a log) is bad on every line
                break
            continue
        first_line[item.id] = lineno
        items.append(item)
    if bad:
        raise BadLines(path, bad)
    if not items:
        raise QoqoptError(f"{path}: contains no items")
    return items


MAX_BAD_LINES = 50


class BadLines(QoqoptError):
    """The bad lines of a set (``errors``, one message each, at most MAX_BAD_LINES); as one line, the
    first and how many more."""

    def __init__(self, path: Path, errors: list[str]):
        self.path, self.errors = path, errors
        more = self.count(len(errors) - 1, "more ")
        tail = f" (and {more}: `qoqopt data list --jsonl {shlex.quote(str(path))}` names them)"
        super().__init__(errors[0] + (tail if len(errors) > 1 else ""))

    @property
    def stopped(self) -> bool:
        """Whether it stopped looking at MAX_BAD_LINES: there may be more."""
        return len(self.errors) == MAX_BAD_LINES

    def count(self, n: int | None = None, more: str = "") -> str:
        """"3 bad lines", "49+ more bad lines" (when it stopped looking)."""
        n = len(self.errors) if n is None else n
        return f"{n}{'+' * self.stopped} {more}bad line{'s' * (n != 1)}"


def _lines(path: Path) -> list[str]:
    """The file's lines, split on line ends only: str.splitlines would also split inside a JSON
    string at U+2028 or U+0085, which json.dumps(ensure_ascii=False) writes raw. A BOM (as Excel
    and Notepad save) is dropped."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            raise QoqoptError(f"{path}: UTF-16 text; save the set as UTF-8") from None
        at = exc.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)  # counted after the BOM
        line = data.count(b"\n", 0, at) + 1
        raise QoqoptError(f"{path}:{line}: not UTF-8 text (byte {at}); save the set as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _parse_line(path: Path, lineno: int, line: str, max_side: int | None) -> ClinicalItem:
    where = f"{path}:{lineno}"
    row = _row(line, where)
    kind = "image" if "image" in row else "dicom"
    file = (path.parent / row[kind]).resolve()
    if not file.exists():
        raise QoqoptError(f"{where}: {kind} file not found: {file}")
    choices = [checked_text(c, "choice", where) for c in _choices(row, where)]
    answer = checked_text(row["answer"], "answer", where)
    _check_answer(answer, choices, where)
    meta = {**row.get("meta", {}), "qtype": "user", "jsonl": str(path), "line": lineno}
    make, signal = _picture(file, kind, row.get("frame"), where)
    return ClinicalItem(
        id=str(row["id"]).strip() if "id" in row else f"{path.stem}:{lineno}",
        domain=row["domain"],
        question=_prompt(checked_text(row["question"], "question", where), choices),
        answer=answer,
        choices=choices,
        source=str(file),
        ecg_signal=signal,
        meta=meta,
        image_fn=partial(_sized, make, max_side, where),
    )


def _row(line: str, where: str) -> dict:
    """The line's JSON object, every field of the right type (files and choices are checked after)."""
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
        if key in row and not isinstance(row[key], str):
            raise QoqoptError(f"{where}: '{key}' must be a string, not {type(row[key]).__name__}")
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise QoqoptError(f"{where}: missing or empty field '{key}'")
    if "id" in row and (not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool) or not str(row["id"]).strip()):
        raise QoqoptError(f"{where}: 'id' must be a non-empty string")
    if row["domain"] not in DOMAINS:
        raise QoqoptError(f"{where}: unknown domain '{row['domain']}' (known: {', '.join(DOMAINS)})")
    if ("image" in row) == ("dicom" in row):
        raise QoqoptError(f"{where}: give exactly one of 'image' or 'dicom'")
    kind = "image" if "image" in row else "dicom"
    if not isinstance(row[kind], str) or not row[kind]:
        raise QoqoptError(f"{where}: '{kind}' must be a file path")
    frame = row.get("frame")
    if frame is not None and (not isinstance(frame, int) or isinstance(frame, bool) or frame < 0):
        raise QoqoptError(f"{where}: 'frame' must be an integer >= 0 (which frame of a multi-frame file)")
    if not isinstance(row.get("meta", {}), dict):
        raise QoqoptError(f"{where}: 'meta' must be a JSON object")
    reason = row.get("meta", {}).get("reason")
    if reason is not None:  # the reference reply's reasoning: text of a chat, checked as the question is
        if not isinstance(reason, str):
            raise QoqoptError(f"{where}: 'meta.reason' must be a string, not {type(reason).__name__}")
        if reason.strip():
            row["meta"]["reason"] = checked_text(reason, "meta.reason", where)
        else:  # no reason given: the default sentence stands in
            del row["meta"]["reason"]
    return row


def _picture(file: Path, kind: str, frame: int | None, where: str):
    """How the item's picture is made, and its ECG signal, decided by the file (not by the field
    or the domain): a waveform DICOM is decoded now (a bad one fails at load), its encoder signal
    kept, and read again when its 12-lead sheet is drawn; any other file has its header checked
    now, its pixels later."""
    header = _guarded(where, check_image, file, kind == "dicom", frame)  # a DICOM's, read once
    if header is not None and is_waveform(header):
        rec = _guarded(where, read_ecg, file)  # check_image has refused a "frame" for it
        # not the recording itself (~1 MB each: a 1000-ECG set held 1.1 GB), only the 80 KB signal
        return partial(render_ecg, file), ecg_signal(rec)
    return partial(open_dicom if kind == "dicom" else open_image, file, frame), None


def _prompt(question: str, choices: list[str]) -> str:
    """The user's question; given choices it does not list itself, they are offered in the words
    the built-in set uses (prompts.format_question, after CLIMB), then QoQ-Med's instruction."""
    question = question.strip()
    # as whole words: "Normal" is inside "abnormal", and "CT" inside "structure"
    listed = all(re.search(rf"(?<!\w){re.escape(c)}(?!\w)", question, re.IGNORECASE) for c in choices)
    if choices and not listed:
        unit = "one word" if all(" " not in c for c in choices) else "one option"
        question = f"{question} Answer with {unit} from the following: {', '.join(choices)}."
    return with_suffix(question)


def _choices(row: dict, where: str) -> list[str]:
    choices = row.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise QoqoptError(f"{where}: 'choices' must be a list of non-empty strings")
    if choices and len(choices) < 2:
        raise QoqoptError(f"{where}: 'choices' needs at least two options")
    if len({c.strip().lower() for c in choices}) < len(choices):
        raise QoqoptError(f"{where}: 'choices' lists an option twice")
    with_comma = next((c for c in choices if "," in c), None)
    if with_comma:  # answers are scored as comma-separated label sets, so "A, B" would be two labels
        raise QoqoptError(f"{where}: choice {with_comma.strip()!r} holds a comma, which separates labels in answers "
                          "and in scoring; reword it (e.g. 'Normal without findings')")  # fmt: skip
    return [c.strip() for c in choices]


def _check_answer(answer: str, choices: list[str], where: str) -> None:
    """Every comma-separated label of the answer must be one of the choices (when choices are given)."""
    if not choices:
        return
    allowed = {c.lower() for c in choices}
    missing = [a.strip() for a in answer.split(",") if a.strip().lower() not in allowed]
    if missing:
        raise QoqoptError(f"{where}: answer '{', '.join(missing)}' is not among the choices")


def _guarded(where: str, fn, *args):
    try:
        return fn(*args)
    except QoqoptError as exc:
        raise QoqoptError(f"{where}: {exc}") from None


def _sized(make, max_side: int | None, where: str) -> Image.Image:
    try:
        img = make()
    except QoqoptError as exc:
        raise QoqoptError(f"{where}: cannot read image ({exc})") from None
    return resize_to(img, _within_aspect(fit_size(img.width, img.height, max_side or max(img.size)), img.size))


def _within_aspect(size: tuple[int, int], original: tuple[int, int]) -> tuple[int, int]:
    """``size`` on the 28-pixel grid, or for a thin picture whose rounding left its sides more than
    MAX_ASPECT apart (the processor refuses those: a 7443x39 scan became 7448x28, a 9530x57 one
    9352x28, aspect 334, a traceback mid-export) the size with a 28 or 56 pixel short side that
    keeps the picture's own aspect best, within the pixel range. (Here, not in augment.fit_size,
    whose every byte is in the trained mini model's cache key: the built-in images are not thin.)"""
    if max(size) <= MAX_ASPECT * min(size):
        return size
    aspect = max(original) / min(original)
    sizes = []
    for short in (FACTOR, 2 * FACTOR):
        long = min(_round28(short * aspect), MAX_ASPECT * short, _floor28(MAX_PIXELS / short))
        if long * short >= MIN_PIXELS:  # an aspect kept as well (to 1%) by both: the sharper one
            sizes.append((round(abs(math.log(long / short / aspect)), 2), -short, long, short))
    long, short = min(sizes)[2:]
    return (long, short) if original[0] >= original[1] else (short, long)
