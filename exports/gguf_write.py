"""Stream checkpoint tensors into a GGUF file with gguf-py's GGUFWriter, a few MB at a time.

The writer is driven in its explicit mode: tensor infos first (shapes and byte sizes are known
from the safetensors headers), then header, KV and tensor-info blocks, then each tensor's data.
Tensor data is read from the shards with positioned reads (no torch, no whole-file mmap) in row
chunks of ~`CHUNK_BYTES`, converted, and written; nothing else is held. Peak memory therefore
tracks one chunk (or the one non-row-splittable tensor, the small Conv3d patch embedding), not the
model.

Types per tensor follow llama.cpp's converter: 1-D tensors (norms, biases) stay F32; the patch
embedding is F16 in an F16 mmproj and F32 otherwise; Q8_0 needs rows divisible by 32 and falls
back to F16 otherwise (reported).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qoqopt.errors import QoqoptError
from qoqopt.fileio import write_error

from . import gguf_split
from .gguf_header import type_name
from .gguf_map import QKV_ROWS, TEMPORAL, WHOLE, Entry, by_block

CHUNK_BYTES = 8 << 20  # f32 bytes per converted chunk (peak ~3x this: raw, f32, output)

# the writable types: name -> GGMLQuantizationType value (gguf.GGMLQuantizationType)
F32, F16, BF16, Q8_0 = 0, 1, 30, 8
DIRECT_TYPES = {"F32": F32, "F16": F16, "BF16": BF16, "Q8_0": Q8_0}
_NP_SOURCE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def type_size(qtype: int) -> tuple[int, int]:
    """(block size, bytes per block) of a GGML type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


def nbytes(shape: tuple[int, ...], qtype: int) -> int:
    block, size = type_size(qtype)
    assert shape[-1] % block == 0, f"row of {shape[-1]} not a multiple of {block}"
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * (shape[-1] // block) * size


# ---------------------------------------------------------------------------- reading


class ShardReader:
    """Positioned reads of tensors from safetensors shards, by the loader's canonical names."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self._fds: dict[str, int] = {}
        self._data_start: dict[str, int] = {}

    def info(self, name: str) -> dict:
        return self.ckpt.tensor_info(name)

    def dtype(self, name: str) -> str:
        return self.info(name)["dtype"]

    def _fd(self, shard: str) -> int:
        if shard not in self._fds:
            path = self.ckpt.path / shard
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise QoqoptError(f"cannot read {path}: {exc.strerror}") from exc
            (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            self._fds[shard], self._data_start[shard] = fd, 8 + header_len
        return self._fds[shard]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along dim 0, in the stored dtype (BF16 as uint16)."""
        info = self.info(name)
        dtype = info["dtype"]
        if dtype not in _NP_SOURCE:
            raise QoqoptError(f"{name} is stored as {dtype}; qoqopt exports F32/F16/BF16 checkpoints")
        shape = info["shape"] or [1]
        row_items = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        itemsize = np.dtype(_NP_SOURCE[dtype]).itemsize
        shard = self.ckpt.weight_map[self.ckpt.names[name]]
        fd = self._fd(shard)
        offset = self._data_start[shard] + info["data_offsets"][0] + start * row_items * itemsize
        size = (stop - start) * row_items * itemsize
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise QoqoptError(f"{shard} ended early while reading {name}")
            done += n
        arr = np.frombuffer(buf, dtype=_NP_SOURCE[dtype])
        return arr.reshape((stop - start, *shape[1:]) if len(shape) > 1 else (stop - start,))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        wide = arr.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    return arr.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- type policy


@dataclass
class Planned:
    entry: Entry
    qtype: int
    nbytes: int
    note: str | None = None


def choose_type(entry: Entry, ftype: str, mmproj: bool) -> tuple[int, str | None]:
    """The GGML type of one tensor in a file of type `ftype` (F32/F16/BF16/Q8_0), and why if it differs."""
    if len(entry.shape) == 1 or entry.target.endswith("_norm.weight"):
        return F32, None
    if mmproj and entry.target.startswith("v.patch_embd."):
        return (F16 if ftype == "F16" else F32), None  # clip.cpp's conv2d wants F16/F32 kernels
    want = DIRECT_TYPES[ftype]
    block, _ = type_size(want)
    if entry.shape[-1] % block:
        return F16, f"{entry.target}: rows of {entry.shape[-1]} not divisible by {block} for {ftype}; wrote F16"
    return want, None


def plan_tensors(entries: list[Entry], ftype: str, mmproj: bool) -> list[Planned]:
    if ftype not in DIRECT_TYPES:
        raise AssertionError(ftype)
    out = []
    for e in entries:
        qtype, note = choose_type(e, ftype, mmproj)
        out.append(Planned(e, qtype, nbytes(e.shape, qtype), note))
    return out


# ---------------------------------------------------------------------------- conversion


def _convert(rows_f32: Callable[[], np.ndarray], raw: np.ndarray | None, src_dtype: str, qtype: int, name: str):
    if qtype == BF16 and src_dtype == "BF16" and raw is not None:
        return raw  # bit-exact passthrough
    x = rows_f32()
    if qtype == F32:
        return x
    if qtype == F16:
        y = x.astype(np.float16)
        if not np.isfinite(y).all() and np.isfinite(x).all():
            raise QoqoptError(f"{name} has values beyond F16's range (65504); export BF16 instead")
        return y
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(x, GGMLQuantizationType(qtype))


class StreamedTensor:
    """What GGUFWriter.write_tensor_data needs (`nbytes`, `tofile`), produced chunk by chunk."""

    def __init__(self, plan: Planned, reader: ShardReader):
        self.plan, self.reader, self.nbytes = plan, reader, plan.nbytes

    def chunks(self) -> Iterator[np.ndarray]:
        e, qtype, reader = self.plan.entry, self.plan.qtype, self.reader
        dtype = reader.dtype(e.source)
        if e.split == TEMPORAL:  # small: [out, in, 2, kh, kw] -> frame e.index
            full = reader.read_rows(e.source, 0, reader.info(e.source)["shape"][0])
            frame = np.ascontiguousarray(full[:, :, e.index])
            yield _convert(lambda: to_f32(frame, dtype), frame, dtype, qtype, e.target)
            return
        rows = e.shape[0] if len(e.shape) > 1 else 1
        first = e.index * rows if e.split == QKV_ROWS else 0
        assert e.split in (WHOLE, QKV_ROWS)
        if len(e.shape) == 1:  # a vector: one "row" of the stored 1-D tensor, sliced for qkv biases
            full = reader.read_rows(e.source, 0, reader.info(e.source)["shape"][0])
            part = full[e.index * e.shape[0] : (e.index + 1) * e.shape[0]] if e.split == QKV_ROWS else full
            yield _convert(lambda: to_f32(part, dtype), part, dtype, qtype, e.target)
            return
        row_f32 = 4 * int(np.prod(e.shape[1:], dtype=np.int64))
        step = max(1, CHUNK_BYTES // row_f32)
        for r in range(0, rows, step):
            raw = reader.read_rows(e.source, first + r, first + min(rows, r + step))
            yield _convert(lambda raw=raw: to_f32(raw, dtype), raw, dtype, qtype, e.target)

    def tofile(self, fp) -> None:
        written = 0
        for chunk in self.chunks():
            # fp.write, not ndarray.tofile: numpy reports a short fwrite (a full disk, a file size
            # limit) as "N requested and M written" with no errno, so it was not said as disk full
            fp.write(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))  # bytes of any dtype and shape
            written += chunk.nbytes
        if written != self.nbytes:
            raise AssertionError(f"{self.plan.entry.target}: wrote {written} bytes, planned {self.nbytes}")


# ---------------------------------------------------------------------------- the file


@dataclass
class WriteReport:
    path: Path  # what llama.cpp is given: the file, or its first part
    tensors: int
    bytes: int
    types: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensor count
    notes: list[str] = field(default_factory=list)
    parts: list[tuple[Path, int]] = field(default_factory=list)  # (part, its tensor count), if written in parts

    def count(self, plans: list[Planned]) -> None:
        for p in plans:
            name = type_name(p.qtype)
            self.types[name] = self.types.get(name, 0) + 1
        # at 7B a Q8_0 mmproj falls back in all 32 blocks' ffn_down (3420 columns): one note, not 32
        self.notes += by_block([p.note for p in plans if p.note])


def write_gguf(path: Path, arch: str, add_kv: Callable, plans: list[Planned], reader: ShardReader, progress=None,
               max_bytes: int = 0) -> WriteReport:  # fmt: skip
    """Write one GGUF file: `add_kv(writer)` adds the metadata, `plans` the tensors in file order.
    With `max_bytes`, a file larger than that is written straight into parts of at most that many
    bytes (gguf_split's layout and names; the whole file never exists): report.parts lists them."""
    report = WriteReport(Path(path), len(plans), 0)
    try:
        split = _plan_parts(Path(path), arch, add_kv, plans, max_bytes) if max_bytes else None
        if split:
            report.parts = gguf_split.write_parts(Path(path), *split, lambda i, out: _write_tensor(out, plans[i], reader, progress))
            report.path = report.parts[0][0]
            report.bytes = sum(p.stat().st_size for p, _ in report.parts)
        else:
            _write_whole(path, arch, add_kv, plans, reader, progress)
            report.bytes = Path(path).stat().st_size
    except OSError as exc:
        raise write_error(exc, path) from exc
    report.count(plans)
    return report


def _writer(arch: str, add_kv: Callable, plans: list[Planned]):
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(path=None, arch=arch)
    add_kv(writer)
    for p in plans:
        writer.add_tensor_info(p.entry.target, p.entry.shape, np.dtype(np.float32), p.nbytes, raw_dtype=GGMLQuantizationType(p.qtype))
    return writer


def _write_whole(path: Path, arch: str, add_kv: Callable, plans: list[Planned], reader: ShardReader, progress) -> None:
    writer = _writer(arch, add_kv, plans)
    try:
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plans:
            writer.write_tensor_data(StreamedTensor(p, reader))
            if progress:
                progress(p.nbytes)
        writer.flush()
    except BaseException:
        writer.close()
        Path(path).unlink(missing_ok=True)  # nothing partial under the name
        raise
    writer.close()


def _plan_parts(path: Path, arch: str, add_kv: Callable, plans: list[Planned], max_bytes: int):
    """(layout, tensor ranges) of the parts, or None if the whole file fits in `max_bytes`. The
    layout is read back from the file's header alone, written by gguf-py as the whole file's would
    be, so the parts are those gguf_split would cut from the whole file."""
    writer = _writer(arch, add_kv, plans)
    try:
        try:
            writer.write_header_to_file(path=path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        layout = gguf_split.read_layout(path)
        head = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    if [size for _, size in layout.spans] != [p.nbytes for p in plans]:
        raise AssertionError("gguf-py's header disagrees with the planned tensor sizes")
    if gguf_split.whole_bytes(layout, head) <= max_bytes:
        return None
    parts = gguf_split.plan_parts(layout, max_bytes)
    return (layout, parts) if len(parts) > 1 else None


def _write_tensor(out, plan: Planned, reader: ShardReader, progress) -> None:
    StreamedTensor(plan, reader).tofile(out)
    if progress:
        progress(plan.nbytes)
