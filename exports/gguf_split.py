"""Split a finished GGUF into the parts llama.cpp loads as one model, as `llama-gguf-split --split` does.

Why: the Hugging Face Hub takes files of at most 50 GB, and a 32B F16/BF16 text GGUF is about 65.

Part i of n is named `<stem>-0000i-of-0000n.gguf` (llama.cpp's `llama_split_path`): llama.cpp and
LM Studio are given the first part and find the others by that name. The first part carries every
metadata key of the original, the others none; every part carries `split.no` (0-based),
`split.count` and `split.tensors.count`, which llama.cpp checks before it loads. Tensors keep their
order and their bytes. Unlike llama-gguf-split, which bounds only a part's tensor data, SIZE bounds
the whole part file (header and metadata included), unless one tensor alone is larger; where the
metadata and the first tensor do not fit together, the first part holds the metadata only (as
llama-gguf-split's --no-tensor-first-split writes it; llama.cpp needs no tensor in it).

Parts are written last first and the original is cut short behind each one, so splitting needs
room for one more part, not a second copy of the file (65 GB at 32B F16). A file qoqopt writes
itself (F32/F16/BF16/Q8_0) goes straight into its parts (`write_parts`), with the layout read from
its header alone: the same parts, and the whole file never on disk.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qoqopt.errors import QoqoptError
from qoqopt.fileio import write_error

from .gguf_header import DEFAULT_ALIGNMENT, HEADER_BYTES, INT32, UINT16, UINT32, pad, read_header, tensor_bytes

SPLIT_NAME = "{stem}-{no:05d}-of-{count:05d}.gguf"
MAX_PARTS = 0xFFFF  # split.no and split.count are 16-bit in llama.cpp
MIN_SPLIT_BYTES = 10**6  # below this a size is a typo (48 for 48G), not a plan: every tensor its own file
COPY_BYTES = 16 << 20


@dataclass
class Layout:
    """What the original holds, read before any of it is cut."""

    version: int
    n_kv: int
    kv: bytes  # the metadata block, raw
    infos: list[bytes]  # each tensor's info record, without its trailing 8-byte data offset
    spans: list[tuple[int, int]]  # each tensor's (absolute data offset, byte count)
    alignment: int


def read_layout(path: Path) -> Layout:
    """The original's blocks, from its header (`gguf_header`: gguf-py's reader takes seconds)."""
    header = read_header(path)
    if "split.count" in header.kv:
        raise QoqoptError(f"{path.name} is already a part of a split GGUF")
    spans = [(header.data_start + t.offset, _tensor_bytes(t)) for t in header.tensors]
    # the parts are cut from the end of the file: tensors out of file order would lose data
    if any(b[0] < a[0] + a[1] for a, b in zip(spans, spans[1:])):
        raise QoqoptError(f"{path.name} lists its tensors out of their order in the file; cannot split it")
    return Layout(header.version, header.n_kv, header.kv_raw, [t.raw for t in header.tensors], spans, header.alignment)


def _tensor_bytes(t) -> int:
    try:
        return tensor_bytes(t)
    except QoqoptError as exc:
        raise QoqoptError(f"{exc}; cannot split it") from None


def _kv(key: str, vtype: int, fmt: str, value: int) -> bytes:
    name = key.encode()
    return struct.pack("<Q", len(name)) + name + struct.pack("<I", vtype) + struct.pack("<" + fmt, value)


def _split_kv(no: int, count: int, n_tensors: int, alignment: int) -> list[bytes]:
    kv = [_kv("split.no", UINT16, "H", no), _kv("split.count", UINT16, "H", count),
          _kv("split.tensors.count", INT32, "i", n_tensors)]  # fmt: skip
    if no and alignment != DEFAULT_ALIGNMENT:  # the first part keeps the original's own key
        kv.append(_kv("general.alignment", UINT32, "I", alignment))
    return kv


def _part_bytes(layout: Layout, first: bool, tensors: range) -> int:
    """A part's file size, to the byte (the split keys' values never change their length)."""
    meta = HEADER_BYTES + (len(layout.kv) if first else 0) + sum(map(len, _split_kv(int(not first), 1, 0, layout.alignment)))
    meta += sum(len(layout.infos[i]) + 8 for i in tensors)
    return pad(meta, layout.alignment) + sum(pad(layout.spans[i][1], layout.alignment) for i in tensors)


def whole_bytes(layout: Layout, header_bytes: int) -> int:
    """The unsplit file's size, from its header's size (a file without tensors is a little smaller:
    gguf-py pads only before tensor data)."""
    return pad(header_bytes, layout.alignment) + sum(pad(size, layout.alignment) for _, size in layout.spans)


def plan_parts(layout: Layout, max_bytes: int) -> list[range]:
    """Consecutive tensor ranges, each part as large as fits in `max_bytes`: a tensor too large for
    any part gets one of its own, and the first part may hold the metadata alone."""
    parts: list[range] = []
    start = 0
    for i in range(len(layout.spans)):
        first = not parts
        if (i > start or first) and _part_bytes(layout, first, range(start, i + 1)) > max_bytes:
            parts.append(range(start, i))
            start = i
    return parts + [range(start, len(layout.spans))]


def part_names(path: Path, count: int) -> list[Path]:
    stem = path.name.removesuffix(".gguf")
    return [path.with_name(SPLIT_NAME.format(stem=stem, no=i + 1, count=count)) for i in range(count)]


def split_gguf(path: Path, max_bytes: int, progress: Callable[[int], None] | None = None) -> list[tuple[Path, int]]:
    """Replace `path` by its parts of at most `max_bytes` each: [(part path, its tensor count)].
    A file that fits stays whole, under its own name."""
    layout = read_layout(path)
    parts = plan_parts(layout, max_bytes) if path.stat().st_size > max_bytes else []
    if len(parts) <= 1:
        return [(path, len(layout.spans))]
    names = part_names(path, _count(path, parts))
    if progress:  # the header and padding, so that the tensors' bytes bring the count to the file's size
        progress(path.stat().st_size - sum(size for _, size in layout.spans))
    fd = os.open(path, os.O_RDWR)

    def copy(i: int, out) -> None:
        _copy(fd, out, *layout.spans[i], Path(out.name).name)
        if progress:
            progress(layout.spans[i][1])

    try:
        for no in reversed(range(len(parts))):
            _write_part(names[no], layout, no, parts, copy)
            if parts[no]:  # what the part holds leaves the original
                os.ftruncate(fd, layout.spans[parts[no][0]][0])
    finally:
        os.close(fd)
    path.unlink()
    return [(name, len(r)) for name, r in zip(names, parts)]


def _count(path: Path, parts: list[range]) -> int:
    if len(parts) > MAX_PARTS:
        raise QoqoptError(f"{path.name} would need {len(parts)} parts; give a larger --split-max-size")
    return len(parts)


def write_parts(path: Path, layout: Layout, parts: list[range], write_tensor: Callable[[int, object], None]) -> list[tuple[Path, int]]:
    """Write a file laid out as `layout` straight into its `parts`, first to last, without the whole
    file ever on disk: `write_tensor(i, out)` writes tensor i's bytes (unpadded) to `out`."""
    names = part_names(path, _count(path, parts))
    done: list[Path] = []
    try:
        for no, name in enumerate(names):
            done.append(name)
            _write_part(name, layout, no, parts, write_tensor)
    except BaseException as exc:
        for part in done:  # no part without the others
            part.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(exc, done[-1]) from exc
        raise
    return [(name, len(r)) for name, r in zip(names, parts)]


def _write_part(dest: Path, layout: Layout, no: int, parts: list[range], write_tensor: Callable[[int, object], None]) -> None:
    tensors, align = parts[no], layout.alignment
    split = _split_kv(no, len(parts), len(layout.spans), align)
    kv, n_kv = (layout.kv, layout.n_kv + len(split)) if no == 0 else (b"", len(split))
    offset, infos = 0, []
    for i in tensors:
        infos.append(layout.infos[i] + struct.pack("<Q", offset))
        offset += pad(layout.spans[i][1], align)
    head = b"GGUF" + struct.pack("<IQQ", layout.version, len(tensors), n_kv) + kv + b"".join(split) + b"".join(infos)
    with open(dest, "wb") as out:
        out.write(head + bytes(pad(len(head), align) - len(head)))
        for i in tensors:
            write_tensor(i, out)
            size = layout.spans[i][1]
            out.write(bytes(pad(size, align) - size))


def _copy(src: int, out, offset: int, size: int, name: str) -> None:
    while size:
        chunk = os.pread(src, min(size, COPY_BYTES), offset)
        if not chunk:
            raise QoqoptError(f"the GGUF being split into {name} ended early")
        out.write(chunk)
        offset, size = offset + len(chunk), size - len(chunk)
