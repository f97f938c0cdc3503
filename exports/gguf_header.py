"""A GGUF file's header, its metadata and tensor infos, read per the GGUF spec (v2 and v3).

Why not gguf-py's GGUFReader: it builds an object for each of the vocabulary's 151k strings and
merges, seconds per file, where this steps over a long array and keeps its length. The raw bytes of
the metadata block and of each tensor info are kept too, for `gguf_split` to copy into parts.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from qoqopt.errors import QoqoptError

HEADER_BYTES = 24  # magic, version, tensor count, KV count
DEFAULT_ALIGNMENT = 32
# GGUF value types (gguf.GGUFValueType): the fixed-size ones as struct formats
UINT16, UINT32, INT32, STRING, ARRAY = 2, 4, 5, 8, 9
SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
LONG_ARRAY = 64  # arrays longer than this (the vocabulary, its merges and scores) are read as their length
# Arrays in arrays: gguf-py writes them (a list of lists), in practice at most 2 deep; a limit
# well past that stops a hostile file's 10**5 levels before Python's recursion limit does
MAX_NESTING = 8
_U64 = struct.Struct("<Q")


@dataclass
class TensorInfo:
    name: str
    dims: list[int]
    qtype: int  # gguf.GGMLQuantizationType
    offset: int  # from the start of the data section
    raw: bytes  # the info record as stored, less its trailing 8-byte offset


@dataclass
class Header:
    version: int
    n_kv: int
    kv: dict  # key: value; an array longer than LONG_ARRAY as its length
    kv_raw: bytes  # the metadata block as stored
    tensors: list[TensorInfo]
    alignment: int
    data_start: int  # where tensor data begins (after the header's padding)


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:4] != b"GGUF":
            raise QoqoptError(f"{path.name} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version and version & 0xFFFF == 0:  # llama.cpp's test for the other byte order
            raise QoqoptError(f"{path.name} is a big-endian GGUF (version {int.from_bytes(head[4:8], 'big')}); llama.cpp "
                              "and qoqopt read little-endian ones")  # fmt: skip
        if version not in (2, 3):  # version 1 counted in 32 bits: this layout would misread it
            raise QoqoptError(f"{path.name} is GGUF version {version}; qoqopt reads versions 2 and 3")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(_Buffer(mm, path.name), version, n_tensors, n_kv)


def _parse(buf: _Buffer, version: int, n_tensors: int, n_kv: int) -> Header:
    kv, alignment = {}, DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = buf.string()
        vtype = buf.unpack("<I")
        kv[key] = buf.value(vtype)
        if key == "general.alignment" and vtype == UINT32:
            alignment = kv[key]
            if alignment <= 0 or alignment & (alignment - 1):  # llama.cpp refuses these too
                raise QoqoptError(f"{buf.name}: general.alignment {alignment} is not a power of 2")
    kv_raw = buf.since(HEADER_BYTES)
    tensors = []
    for _ in range(n_tensors):
        start = buf.pos
        name = buf.string()
        dims = [buf.unpack("<Q") for _ in range(buf.unpack("<I"))]
        qtype = buf.unpack("<I")
        raw = buf.since(start)
        tensors.append(TensorInfo(name, dims, qtype, buf.unpack("<Q"), raw))
    return Header(version, n_kv, kv, kv_raw, tensors, alignment, pad(buf.pos, alignment))


def tensor_bytes(t: TensorInfo) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.qtype)]
    except (ValueError, KeyError):  # a type newer than this gguf-py: its byte count is unknown
        raise QoqoptError(f"tensor {t.name} is of GGML type {t.qtype}, which this gguf-py does not know") from None
    return elements(t) // block * size


def data_end(header: Header, sizes: list[int]) -> int:
    """Where a file's last tensor ends (``sizes``: each tensor's bytes): a file shorter than that was cut off."""
    return max((header.data_start + t.offset + n for t, n in zip(header.tensors, sizes)), default=0)


def check_complete(path: Path) -> Header:
    """The header of a GGUF file that holds all of its tensor data: one cut off inside its metadata or
    its tensors (an incomplete copy or download) is a one-line QoqoptError, not a reader's traceback."""
    header = read_header(path)
    if path.stat().st_size < data_end(header, [tensor_bytes(t) for t in header.tensors]):
        raise QoqoptError(f"{path.name} ends before its tensor data: a cut-off file (an incomplete copy or download)")
    return header


def elements(t: TensorInfo) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


def pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class _Buffer:
    """Sequential reads of a memory-mapped file's metadata blocks (bytes are copied out only for
    what is kept: a vocabulary is stepped over, 151k strings in a few hundredths of a second)."""

    def __init__(self, mm, name: str):
        self.mm, self.name, self.pos = mm, name, HEADER_BYTES

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.mm):
            raise self._cut_off()
        b, self.pos = self.mm[self.pos : end], end
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, vtype: int, depth: int = 0):
        """A value of GGUF type `vtype`; `depth`: the arrays it lies in."""
        if vtype == STRING:
            return self.string()
        if vtype in SCALAR:
            return self.unpack(SCALAR[vtype])
        if vtype != ARRAY:
            raise QoqoptError(f"unknown GGUF value type {vtype}")
        if depth == MAX_NESTING:
            raise QoqoptError(f"{self.name}: GGUF arrays nested more than {MAX_NESTING} deep at byte {self.pos}: a damaged file")
        itype, count = self.unpack("<I"), self.unpack("<Q")
        if count <= LONG_ARRAY:
            return [self.value(itype, depth + 1) for _ in range(count)]
        if itype in SCALAR:
            self.read(struct.calcsize(SCALAR[itype]) * count)
        elif itype == STRING:
            self._skip_strings(count)
        else:
            for _ in range(count):
                self.value(itype, depth + 1)
        return count

    def _skip_strings(self, count: int) -> None:
        mm, pos, length = self.mm, self.pos, _U64.unpack_from
        try:
            for _ in range(count):
                pos += 8 + length(mm, pos)[0]
        except struct.error:  # a length read past the end
            raise self._cut_off() from None
        if pos > len(mm):
            raise self._cut_off()
        self.pos = pos

    def since(self, start: int) -> bytes:
        return self.mm[start : self.pos]

    def _cut_off(self) -> QoqoptError:
        return QoqoptError(f"{self.name} ends inside its GGUF metadata: a cut-off file")
