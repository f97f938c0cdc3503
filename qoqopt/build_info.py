"""`qoqopt info` for GGUF: what a GGUF build directory, or one GGUF file, holds.

Read from manifest.json and the GGUF headers (`exports/gguf_header.py`; no tensor data is read).
Sizes and bits per weight are counted as llama.cpp's loader reports them: tensor data only, so a
text file's BPW here is the one `llama-cli` prints on load, and the parts of a split file count as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import QoqoptError, printable
from .manifest import entry_path, file_key, gguf_entries, gguf_quants, is_int, made_from, preferred_quant

TEXT_KEYS = {  # summary field: the key under the text GGUF's `general.architecture`
    "layers": "block_count", "hidden": "embedding_length", "intermediate": "feed_forward_length",
    "heads": "attention.head_count", "kv_heads": "attention.head_count_kv", "context": "context_length",
    "rope_theta": "rope.freq_base", "mrope_sections": "rope.dimension_sections",
}  # fmt: skip
VISION_KEYS = {
    "projector": "clip.projector_type", "depth": "clip.vision.block_count", "hidden": "clip.vision.embedding_length",
    "intermediate": "clip.vision.feed_forward_length", "heads": "clip.vision.attention.head_count",
    "patch": "clip.vision.patch_size", "window": "clip.vision.window_size", "out_hidden": "clip.vision.projection_dim",
    "min_pixels": "clip.vision.image_min_pixels", "max_pixels": "clip.vision.image_max_pixels",
}  # fmt: skip


@dataclass
class GGUFFile:
    path: str  # the first part's, for a file in parts
    kind: str  # text | mmproj | imatrix | modelfile | ollama | readme | ? (a file no manifest describes)
    quant: str | None
    bytes: int  # on disk, all parts
    parts: int = 1
    present: bool = True  # False: listed, but not here (a Hub repo's file not downloaded, or missing)
    tensors: int | None = None
    params: int | None = None  # elements of every tensor, as llama.cpp's "model params"
    bpw: float | None = None  # tensor bytes x 8 / params, as llama.cpp's "BPW"
    types: dict[str, int] = field(default_factory=dict)  # ggml type: tensor count
    cut_off: list[str] = field(default_factory=list)  # parts shorter than their header's tensor data
    unreadable: str | None = None  # why its header could not be read


@dataclass
class GGUFSummary:
    source: str
    files: list[GGUFFile]
    made_from: dict | None = None
    qoqopt_version: str | None = None
    text: dict | None = None
    vision: dict | None = None
    imatrix: dict | None = None
    default_quant: str | None = None  # what `ask` and the card use when no quant is named
    modelfile_from: str | None = None
    hub: bool = False  # a Hub repo's snapshot: a file not here is one not downloaded
    left_out: list[str] = field(default_factory=list)  # what the export left out on purpose (the ECG encoder)
    notes: list[str] = field(default_factory=list)


def summarize_build(folder: Path, manifest: dict, source: str | None = None) -> GGUFSummary:
    """A GGUF build: every file its manifest lists, with the headers of those present. ``source``:
    the Hub id ``folder`` is a snapshot of."""
    files = [_listed(folder, manifest, entry) for entry in manifest["files"] if (entry.get("part") or 1) == 1]
    summary = GGUFSummary(source or str(folder), files, manifest.get("source"), manifest.get("qoqopt_version"),
                          imatrix=manifest.get("imatrix"), default_quant=_default_quant(folder, manifest, source),
                          hub=source is not None or bool(manifest.get("published")),  # a download: maybe one quant
                          left_out=_left_out(manifest), notes=list(manifest.get("notes") or []))  # fmt: skip
    _add_headers(summary, folder)
    modelfile = folder / "Modelfile"
    if modelfile.is_file():  # its first FROM is the text GGUF, the first part of one in parts (one FROM per part)
        summary.modelfile_from = next((ln[5:].strip() for ln in modelfile.read_text(encoding="utf-8", errors="replace")
                                       .splitlines() if ln.startswith("FROM ") and ln[5:].strip()), None)  # fmt: skip
    return summary


def _default_quant(folder: Path, manifest: dict, source: str | None) -> str | None:
    """The quant `ask` runs when none is named: of a Hub repo, the build's default (ask fetches it);
    of a local copy, the preferred one that is here (a download of one quant has no other)."""
    from .integrity import downloaded_quant  # integrity -> fileio -> leftovers -> build_info: not at import

    return preferred_quant(gguf_quants(manifest)) if source else downloaded_quant(folder, manifest)


def _kind(meta: dict) -> str:
    """text, mmproj or imatrix, by general.type; an mmproj of older llama.cpp scripts has none, but
    its architecture is clip, which llama.cpp refuses as a main model."""
    kind = meta.get("general.type")
    if isinstance(kind, str) and kind in ("mmproj", "imatrix"):
        return kind
    return "mmproj" if meta.get("general.architecture") == "clip" else "text"


def summarize_file(path: Path) -> GGUFSummary:
    """One GGUF file (for a file in parts, its first part and the parts beside it)."""
    entry = GGUFFile(path.name, "?", None, 0)
    meta = _tensor_stats(entry, path)  # an unreadable header is the one-line error here
    entry.kind = _kind(meta)
    entry.quant = _file_type(meta.get("general.file_type"))
    summary = GGUFSummary(str(path), [entry], default_quant=None)
    _add_dims(summary, entry, meta)
    return summary


def _left_out(manifest: dict) -> list[str]:
    """What the export left out on purpose, as its card's "Left out on purpose" says it."""
    left = list(manifest.get("skipped") or [])
    if not gguf_entries(manifest, "mmproj"):
        left.append("the mmproj (`--mmproj-type none`): this build reads text only")
    return left


def _file_type(value) -> str | None:
    """general.file_type as the quant name `export --quant` takes (15: Q4_K_M)."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_").replace("ALL_F32", "F32")
    except ValueError:
        return None if value is None else str(value)


def _listed(folder: Path, manifest: dict, entry: dict) -> GGUFFile:
    """A file as the manifest lists it (a file in parts: its first part, with the others' sizes)."""
    same = [f for f in manifest["files"] if file_key(f) == file_key(entry)]
    return GGUFFile(entry_path(entry), entry.get("kind") or "?", entry.get("quant"), sum(f.get("bytes", 0) for f in same),
                    len(same), all((folder / entry_path(f)).is_file() for f in same))  # fmt: skip


def _add_headers(summary: GGUFSummary, folder: Path) -> None:
    """Tensor counts and BPW of every GGUF present; text and vision dims from the first of each."""
    for f in summary.files:
        if not (f.present and f.path.lower().endswith(".gguf")):
            continue
        try:
            meta = _tensor_stats(f, folder / f.path)
        except QoqoptError as exc:  # one damaged file: the rest of the build is still described
            f.unreadable = str(exc)
            continue
        _add_dims(summary, f, meta)


def _add_dims(summary: GGUFSummary, f: GGUFFile, meta: dict) -> None:
    """Text and vision dims, and the source, from the first file of each kind that has them."""
    if f.kind == "text" and summary.text is None:
        arch = meta.get("general.architecture")
        vocab = meta.get("tokenizer.ggml.tokens")
        summary.text = {"architecture": arch, **_dims(meta, {k: f"{arch}.{v}" for k, v in TEXT_KEYS.items()}),
                        "vocab": len(vocab) if isinstance(vocab, list) else vocab}  # fmt: skip
    elif f.kind == "mmproj" and summary.vision is None:
        summary.vision = _dims(meta, VISION_KEYS)
    if summary.made_from is None and meta.get("qoqopt.source"):
        # the manifest's own keys for what the file carries (a Hub source's commit too)
        summary.made_from = {key: meta.get(f"qoqopt.{name}") for key, name in
                             (("model", "source"), ("revision", "source_revision"), ("fingerprint", "source_fingerprint"))}  # fmt: skip


def _dims(meta: dict, keys: dict[str, str]) -> dict:
    return {name: meta.get(key) for name, key in keys.items()}


def _tensor_stats(f: GGUFFile, first: Path) -> dict:
    """Fill ``f``'s sizes and tensor counts from every part of the file; return the first part's
    metadata (arrays longer than a few dozen items as their length)."""
    from collections import Counter

    from .exports.gguf_header import data_end, elements, type_name

    header = _header(first)
    paths = [first, *later_parts(first, header.kv)]
    headers = [header] + [_header(p) for p in paths[1:]]
    tensors = [t for h in headers for t in h.tensors]
    _check_parts(paths, headers, len(paths), len(tensors))
    sizes = [_sizes(h) for h in headers]  # None where a type is newer than this gguf-py
    f.cut_off = [p.name for p, h, n in zip(paths, headers, sizes) if n is not None and p.stat().st_size < data_end(h, n)]
    f.parts, f.bytes, f.tensors = len(paths), sum(p.stat().st_size for p in paths), len(tensors)
    f.types = dict(Counter(type_name(t.qtype) for t in tensors).most_common())
    f.params = sum(elements(t) for t in tensors)
    known = None not in sizes and f.params
    f.bpw = sum(map(sum, sizes)) * 8 / f.params if known else None
    return header.kv


def _check_parts(paths: list[Path], headers: list, count: int, n_tensors: int) -> None:
    """Each part says it is the part its name makes it, and all hold the tensors the first part
    counts, as llama.cpp's loader checks ("invalid split file idx", "corrupted model"): parts
    swapped, or from two exports, passed here and failed to load."""
    if count == 1:
        return
    for i, (path, header) in enumerate(zip(paths, headers)):
        no, of = header.kv.get("split.no"), header.kv.get("split.count")
        if (no, of) != (i, count):  # split.no counts from 0; the names, and what is said, from 1
            said = f"part {no + 1} of {of}" if is_int(no) else f"split.no {no!r}"
            raise QoqoptError(f"{path.name} is named part {i + 1} of {count} but its header says {said}: parts swapped "
                              "or from another file, which llama.cpp refuses")  # fmt: skip
    expected = headers[0].kv.get("split.tensors.count")
    if is_int(expected) and expected != n_tensors:
        raise QoqoptError(f"{paths[0].name}: its {count} parts hold {n_tensors} tensors, but split.tensors.count says "
                          f"{expected}, which llama.cpp refuses as a corrupted model")  # fmt: skip


def _sizes(header) -> list[int] | None:
    """Each tensor's data bytes; None where a type's block size is unknown to this gguf-py."""
    from .exports.gguf_header import tensor_bytes

    try:
        return [tensor_bytes(t) for t in header.tensors]
    except QoqoptError:
        return None


def _split_keys(path: Path, kv: dict) -> tuple[int, int]:
    """(split.count, split.no) as llama.cpp holds them (16-bit), checked before any part name is
    built from them: a 119-byte file saying 10**10 parts took 90 s to a MemoryError."""
    from .exports.gguf_split import MAX_PARTS

    count, no = kv.get("split.count", 1), kv.get("split.no", 0)
    if not is_int(count) or not 1 <= count <= MAX_PARTS:
        raise QoqoptError(f"{path.name}: split.count is {count!r}, not a part count of 1..{MAX_PARTS}")
    if not is_int(no) or not 0 <= no < count:
        raise QoqoptError(f"{path.name}: split.no is {no!r}, not a part number of 0..{count - 1} (split.count {count})")
    return count, no


def later_parts(first: Path, kv: dict) -> list[Path]:
    """Parts 2..N of the GGUF whose first part is ``first`` (header ``kv``): none for a whole file; a
    later part given as the first, a misnamed first part or a missing part is refused in one line."""
    return _other_parts(first, *_split_keys(first, kv))


def _other_parts(first: Path, count: int, no: int) -> list[Path]:
    """Parts 2..count of a split file, named from its first part as llama.cpp finds them."""
    from .exports.gguf_split import SPLIT_NAME, part_names

    if count == 1:
        return []
    if no != 0:  # split.no counts from 0
        raise QoqoptError(f"{first.name} is part {no + 1} of {count} of a split GGUF; give its first part")
    cut = first.name.rfind(SPLIT_NAME.format(stem="", no=1, count=count))
    if cut < 0:
        raise QoqoptError(f"{first.name} is part 1 of {count} of a split GGUF, but not named -00001-of-{count:05d}.gguf: "
                          "llama.cpp finds the other parts by that name")  # fmt: skip
    parts = part_names(first.with_name(first.name[:cut] + ".gguf"), count)[1:]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""  # 65534 names is no line to read
        raise QoqoptError(f"{first.name} is part 1 of {count}; {', '.join(missing[:3])}{more} missing beside it")
    return parts


def _header(path: Path):
    from .exports.gguf_header import read_header

    return read_header(path)


def render(s: GGUFSummary) -> str:
    what = "GGUF file " if s.source.lower().endswith(".gguf") else "GGUF build"
    lines = [f"{what}   {s.source}" + (f" (qoqopt {s.qoqopt_version})" if s.qoqopt_version else "")]
    if s.made_from:
        lines.append(f"made from    {made_from(s.made_from)}")
    if s.text:
        t = {k: "?" if v is None else v for k, v in s.text.items()}  # a key this file lacks
        lines += [f"text         {t['architecture']}: {t['layers']} layers, hidden {t['hidden']}, intermediate "
                  f"{t['intermediate']}, {t['heads']} heads / {t['kv_heads']} KV, vocab {t['vocab']}, context {t['context']}",
                  f"             rope_theta {t['rope_theta']}, mrope sections {t['mrope_sections']}"]  # fmt: skip
    if s.vision:
        v = {k: "?" if x is None else x for k, x in s.vision.items()}
        lines.append(f"vision       {v['projector']} projector: depth {v['depth']}, hidden {v['hidden']}, intermediate "
                     f"{v['intermediate']}, {v['heads']} heads, patch {v['patch']}, window {v['window']}, "
                     f"merger -> {v['out_hidden']}")  # fmt: skip
        if s.vision["min_pixels"] is not None:
            lines.append(f"             images of {v['min_pixels']}..{v['max_pixels']} pixels")
    if s.imatrix:
        m = s.imatrix
        lines.append(f"imatrix      {m.get('source')}: {'; '.join(m.get('datasets') or [])}")
    lines.append("files        (params and BPW as llama.cpp reports them on load: tensor data only)")
    lines += [_file_line(f, s.modelfile_from, s.hub) for f in s.files]
    if s.default_quant:
        lines.append(f"default      {s.default_quant}: the text GGUF `qoqopt ask` runs here when none is named")
    lines += [f"left out     {x}" for x in s.left_out] + [f"note         {n}" for n in s.notes]
    return "\n".join(map(printable, lines))  # every value here is read from the file or its manifest


def _file_line(f: GGUFFile, modelfile_from: str | None, hub: bool) -> str:
    name = f.path + (f" (+{f.parts - 1} parts)" if f.parts > 1 else "")
    line = f"  {name:40s} {f.kind:9s} {f.quant or '':8s} {decimal_size(f.bytes):>9s}"
    if not f.present:
        return line + ("  not downloaded" if hub else "  MISSING")
    if f.unreadable:
        return line + f"  UNREADABLE: {f.unreadable}"
    if f.cut_off:
        return line + f"  CUT OFF: {', '.join(f.cut_off)} ends before its tensor data (an incomplete copy or download)"
    if f.params and f.kind in ("text", "mmproj"):
        types = ", ".join(f"{t} {n}" for t, n in f.types.items())
        bpw = "  ?" if f.bpw is None else f"{f.bpw:5.2f}"
        line += f"  {f.params / 1e6:9.2f} M params  {bpw} BPW  {f.tensors} tensors: {types}"
    elif f.kind == "imatrix" and f.tensors:
        line += f"  {f.tensors} tensors (activation statistics)"
    elif f.kind == "modelfile" and modelfile_from:
        line += f"  FROM {modelfile_from}"
    return line


def decimal_size(n: int | None) -> str:
    """Bytes in decimal units, as the Hub shows file sizes ("?" when unknown)."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
