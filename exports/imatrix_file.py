"""llama.cpp importance-matrix files: write the GGUF format, read both formats.

This llama.cpp (common/imatrix-loader.cpp, used by `llama-quantize --imatrix`) reads:
- the GGUF format that `llama-imatrix` writes by default: `general.type = "imatrix"`,
  `imatrix.datasets` (string array), `imatrix.chunk_count`, `imatrix.chunk_size` (u32), and per
  weight `<name>.in_sum2` (F32, ne = [n_in, n_mat]: raw sums of squared inputs) plus
  `<name>.counts` (F32, ne = [1, n_mat]: tokens seen); the quantizer uses in_sum2 / counts;
- the legacy `.dat` format: int32 n_entries, then per entry (int32 name length, name, int32 ncall,
  int32 n_values, float32[n_values] = mean x^2 * ncall), then optionally int32 chunk count and a
  dataset name.
We write GGUF (the current default; the quantizer refuses a GGUF imatrix without the three
metadata keys) and read either.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qoqopt.errors import QoqoptError

IN_SUM2, COUNTS = ".in_sum2", ".counts"
_LEAST_ENTRY = 16  # bytes of the smallest legacy entry: int32 name length (0), ncall, n_values (1), a float32


@dataclass
class IMatrix:
    """Per GGUF weight name: raw sums of squared inputs per input column, and the token count."""

    sums: dict[str, np.ndarray]
    counts: dict[str, float]  # tokens seen (fractional when positions are weighted)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def means(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer consumes: mean x^2 per column (sum / count)."""
        # in float32, as llama.cpp's loader divides in_sum2 by counts, each rounded to a whole token
        # count first (common/imatrix-loader.cpp: std::lround); 0 gives ones, the unweighted default
        out = {}
        for name, s in self.sums.items():
            count = whole_count(self.counts[name])
            out[name] = s.astype(np.float32) / np.float32(count) if count > 0 else np.ones_like(s, np.float32)
        return out


def whole_count(count: float) -> float:
    """A token count as llama.cpp keeps it: rounded half away from zero (std::lround). Image positions
    weighted by --imatrix-image-weight make it fractional; an older llama-quantize divided by the
    float itself, so the file holds the whole count, which every version reads alike."""
    if not math.isfinite(count):
        return count  # a NaN stays, for checked() to refuse
    whole = math.floor(count)
    return float(whole + (count - whole >= 0.5))  # not floor(count + 0.5): 0.49999999999999994 + 0.5 is 1.0


def checked(im: IMatrix, source: str) -> IMatrix:
    """``im``, whose sums and counts are finite and not negative: a NaN count reads as no tokens, and
    the quantizer then weighs that weight's columns all alike, under a build that says it used the
    imatrix."""
    for name, sums in im.sums.items():
        count = im.counts[name]
        if not (np.isfinite(count) and count >= 0 and np.isfinite(sums).all() and (sums >= 0).all()):
            raise QoqoptError(f"{source}: imatrix entry {name} holds non-finite or negative values (count {count})")
    return im


def write_imatrix(path: Path, im: IMatrix) -> None:
    from gguf import GGUFWriter

    # llama-imatrix writes no architecture; GGUFWriter always adds one, which the loader ignores.
    writer = GGUFWriter(path=None, arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", list(im.datasets) or ["unknown"])
    writer.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in sorted(im.sums):
        sums = np.asarray(im.sums[name], dtype=np.float32).reshape(1, -1)  # numpy [n_mat, n_in]
        writer.add_tensor(name + IN_SUM2, sums)
        writer.add_tensor(name + COUNTS, np.array([[whole_count(im.counts[name])]], dtype=np.float32))
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: Path) -> IMatrix:
    path = Path(path)
    if not path.is_file():
        what = "a directory, not an imatrix file" if path.is_dir() else "no such imatrix file"
        raise QoqoptError(f"{path}: {what} (--imatrix takes clinical, none, a .jsonl set, or a llama.cpp .gguf/.dat imatrix)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


METADATA = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


def _read_gguf(path: Path) -> IMatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    from .gguf_header import check_complete

    check_complete(path)  # gguf-py's reader fails on a cut-off file with a numpy reshape error
    try:
        reader = GGUFReader(str(path))
    except (ValueError, KeyError) as err:
        raise QoqoptError(f"{path.name} is not a readable GGUF imatrix ({' '.join(str(err).split())})") from None
    fields = reader.fields
    missing = [key for key in METADATA if key not in fields]
    if missing:  # llama-quantize refuses such a file ("missing imatrix metadata"): so would the build's users
        raise QoqoptError(f"{path.name}: a GGUF imatrix without {', '.join(missing)}, which llama-quantize refuses "
                          "too; make it with llama-imatrix")  # fmt: skip
    f = fields["imatrix.datasets"]
    datasets = [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key: str) -> int:
        f = fields[key]
        return int(f.parts[f.data[0]][0])

    sums, counts = {}, {}
    tensors = {t.name: t for t in reader.tensors}
    for tname, t in tensors.items():
        if tname.endswith(IN_SUM2):
            name = tname[: -len(IN_SUM2)]
            c = tensors.get(name + COUNTS)
            if c is None:
                raise QoqoptError(f"{path.name}: {name} has sums but no counts")
            if {t.tensor_type, c.tensor_type} != {GGMLQuantizationType.F32}:  # llama.cpp's loader takes F32 only
                raise QoqoptError(f"{path.name}: {name}'s sums and counts are {t.tensor_type.name}/{c.tensor_type.name}, "
                                  "not F32 as llama.cpp requires")  # fmt: skip
            cvals = np.asarray(c.data, dtype=np.float32).ravel()
            if cvals.size != 1:
                raise QoqoptError(f"{path.name}: {name} has {cvals.size} expert counts; MoE imatrix not supported")
            sums[name] = np.asarray(t.data, dtype=np.float32).ravel().astype(np.float64)
            counts[name] = float(cvals[0])  # fractional when image positions were weighted
    if not sums:
        raise QoqoptError(f"{path.name} holds no imatrix entries")
    return checked(IMatrix(sums, counts, datasets, scalar("imatrix.chunk_count"), scalar("imatrix.chunk_size")),
                   path.name)


def _read_legacy(path: Path) -> IMatrix:
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise QoqoptError(f"{path.name} is not a llama.cpp imatrix file (it is empty)")
        # mapped, not read: a model shard given by mistake cost its whole size in memory before the
        # first count refused it
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse_legacy(path, data)


def _parse_legacy(path: Path, data) -> IMatrix:
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise QoqoptError(f"{path.name} is not a llama.cpp imatrix file (truncated)")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    def count(what: str, item_bytes: int, least: int) -> int:
        """A count read from the file, checked against what is left of it: a negative one moved the
        reader backwards, so that a 4 MB file saying 10**6 entries looped for minutes."""
        at = pos
        (n,) = take("<i")
        if n < least or n * item_bytes > len(data) - pos:
            why = f"below {least}" if n < least else f"past the end of the file ({len(data)} bytes)"
            raise QoqoptError(f"{path.name}: {what} {n} at byte {at} is {why}: not a llama.cpp imatrix file, "
                              "or a damaged one")  # fmt: skip
        return n

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000 or n_entries * _LEAST_ENTRY > len(data) - pos:
        raise QoqoptError(f"{path.name} is not a llama.cpp imatrix file (it says {n_entries} entries in "
                          f"{len(data)} bytes)")  # fmt: skip
    sums, counts = {}, {}
    for _ in range(n_entries):
        n = count("name length", 1, 0)
        name = data[pos : pos + n].decode("utf-8", "replace")
        pos += n
        (ncall,) = take("<i")
        nval = count("value count", 4, 1)  # llama.cpp's loader refuses an entry of no values too
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        # legacy values are mean * ncall; keep "sum / count" semantics with count = ncall
        sums[name], counts[name] = values, max(int(ncall), 1)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                datasets.append(data[pos : pos + length].decode("utf-8", "replace"))
    return checked(IMatrix(sums, counts, datasets, chunk_count, 0), path.name)
