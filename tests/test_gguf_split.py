"""exports/gguf_split.py against gguf-py's reader (llama.cpp's own Python package): every part a valid
GGUF, the split keys llama.cpp checks, the original's metadata and tensor bytes carried over whole.
That llama.cpp loads the parts as one model is tested in test_gguf.py."""

from __future__ import annotations

import numpy as np
import pytest

from qoqopt.errors import QoqoptError
from qoqopt.exports.gguf_split import part_names, read_layout, split_gguf


def _write(path, alignment: int | None = None, sizes=(300, 5, 200, 200, 7, 300, 100), vocab: int = 5000):
    """A GGUF with a string-array vocabulary and Q8_0, F16 and F32 tensors of `sizes` rows of 992 values."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(path, "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_string("general.name", "split test")
    writer.add_token_list([f"tok{i}" for i in range(vocab)])
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_uint32("test.count", 7)
    rng = np.random.default_rng(0)
    for i, n in enumerate(sizes):
        x = rng.standard_normal((n, 992)).astype(np.float32)
        if i % 3 == 0:
            writer.add_tensor(f"t{i}.q8", quants.quantize(x, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        elif i % 3 == 1:
            writer.add_tensor(f"t{i}.f16", x.astype(np.float16))
        else:
            writer.add_tensor(f"t{i}.f32", x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _read(path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _kv(reader) -> dict:
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith(("GGUF.", "split."))}


def _split_and_check(path, max_bytes: int, alignment: int | None) -> list:
    """Split `path` and check every part against the original as gguf-py reads both: returns the parts."""
    from gguf import GGUFValueType

    ref = _read(path)
    ref_kv, ref_tensors = _kv(ref), [(t.name, t.tensor_type, list(t.shape), bytes(t.data)) for t in ref.tensors]
    layout = read_layout(path)
    assert layout.spans == [(int(t.data_offset), int(t.n_bytes)) for t in ref.tensors]  # gguf-py's own offsets
    assert layout.alignment == (alignment or 32)
    del ref
    size, progress = path.stat().st_size, []
    parts = split_gguf(path, max_bytes, progress=progress.append)
    assert sum(progress) == size  # a progress bar of the file's size ends full
    assert [p for p, _ in parts] == part_names(path, len(parts)) and not path.exists()
    tensors = []
    for no, (part, count) in enumerate(parts):
        reader = _read(part)
        split = {k: (reader.fields[k].types, reader.fields[k].contents()) for k in reader.fields if k.startswith("split.")}
        assert split == {"split.no": ([GGUFValueType.UINT16], no), "split.count": ([GGUFValueType.UINT16], len(parts)),
                         "split.tensors.count": ([GGUFValueType.INT32], len(ref_tensors))}  # fmt: skip
        kv = _kv(reader)
        if no == 0:
            assert kv == ref_kv
        else:  # only what reading the part needs
            assert kv == ({"general.alignment": ([GGUFValueType.UINT32], alignment)} if alignment else {})
        assert reader.alignment == (alignment or 32) and len(reader.tensors) == count
        own = [len(t[3]) for t in ref_tensors[len(tensors) : len(tensors) + count]]
        # within the size, unless it is one tensor (with its header) that alone is not
        assert part.stat().st_size <= max_bytes or (count == 1 and own[0] + 4096 > max_bytes), (no, count, own)
        tensors += [(t.name, t.tensor_type, list(t.shape), bytes(t.data)) for t in reader.tensors]
    assert tensors == ref_tensors
    return parts


@pytest.mark.parametrize("alignment", [None, 64])
def test_parts_carry_the_whole_file(tmp_path, alignment):
    path = tmp_path / "m.F32.gguf"
    _write(path, alignment)
    parts = _split_and_check(path, 1_000_000, alignment)
    assert len(parts) >= 3 and parts[0][0].name == f"m.F32-00001-of-{len(parts):05d}.gguf"
    assert max(p.stat().st_size for p, _ in parts) > 1_000_000  # a 1.2 MB tensor got a part of its own


def test_the_first_part_may_hold_the_metadata_alone(tmp_path):
    """Metadata (a 60k-token vocabulary, 0.95 MB) and the first tensor (0.3 MB) do not fit in 1 MB
    together: the first part holds the metadata only, within the size, and the tensor goes on."""
    path = tmp_path / "m.gguf"
    _write(path, vocab=60_000)
    parts = _split_and_check(path, 1_000_000, None)
    assert parts[0][1] == 0 and parts[1][1] >= 1 and parts[0][0].stat().st_size <= 1_000_000


@pytest.mark.parametrize("alignment", [None, 64])
def test_a_part_is_as_large_as_fits_to_the_byte(tmp_path, alignment):
    """A part's size is planned to the byte: with the limit set to a part's real size on disk, the
    same tensors go in; one byte less, the last of them moves on (a plan that ignored the tensor
    infos' bytes wrote parts over the limit, and no part had come near it; helper-66)."""
    first = tmp_path / "a" / "m.gguf"
    first.parent.mkdir()
    _write(first, alignment)
    (head, count), *_ = _split_and_check(first, 1_000_000, alignment)
    limit = head.stat().st_size
    for max_bytes, expected in ((limit, count), (limit - 1, count - 1)):
        again = tmp_path / str(max_bytes) / "m.gguf"
        again.parent.mkdir()
        _write(again, alignment)
        parts = _split_and_check(again, max_bytes, alignment)
        assert parts[0][1] == expected and (parts[0][0].stat().st_size == limit) == (max_bytes == limit)


def test_a_file_that_fits_stays_whole(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path)
    size = path.stat().st_size
    assert split_gguf(path, size) == [(path, 7)]
    assert path.stat().st_size == size


def test_refuses_what_it_cannot_split_safely(tmp_path):
    """A part, a non-GGUF, GGUF version 1 (32-bit counts), a tensor type gguf-py does not know (its
    size is unknown), and tensors listed out of their file order (cutting the file from its end would
    then lose data): each refused before anything is written."""
    import struct

    path = tmp_path / "m.gguf"
    _write(path)
    swapped = tmp_path / "swapped.gguf"
    data = bytearray(path.read_bytes())
    a, b = _read(path).tensors[:2]
    at = [t.field.offset + sum(int(x.nbytes) for x in t.field.parts[:-1]) for t in (a, b)]  # each data offset
    data[at[0] : at[0] + 8], data[at[1] : at[1] + 8] = data[at[1] : at[1] + 8], data[at[0] : at[0] + 8]
    swapped.write_bytes(data)
    with pytest.raises(QoqoptError, match="swapped.gguf lists its tensors out of their order in the file"):
        split_gguf(swapped, 1_000_000)
    assert swapped.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "swapped.gguf"]
    first = split_gguf(path, 1_000_000)[0][0]
    with pytest.raises(QoqoptError, match="already a part of a split GGUF"):
        split_gguf(first, 1_000_000)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(QoqoptError, match="x.gguf is not a GGUF file"):
        read_layout(tmp_path / "x.gguf")
    (tmp_path / "v1.gguf").write_bytes(b"GGUF" + struct.pack("<III", 1, 0, 0) + bytes(16))
    with pytest.raises(QoqoptError, match="v1.gguf is GGUF version 1; qoqopt reads versions 2 and 3"):
        read_layout(tmp_path / "v1.gguf")
    from gguf import GGUFEndian, GGUFWriter  # gguf-py's own big-endian file: said as such, not "version 50331648"

    writer = GGUFWriter(tmp_path / "be.gguf", "llama", endianess=GGUFEndian.BIG)
    writer.add_tensor("t", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QoqoptError, match=r"^be.gguf is a big-endian GGUF \(version 3\); llama.cpp and qoqopt read"):
        read_layout(tmp_path / "be.gguf")
    info = struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 32, 999, 0)  # 1-D, 32 values, GGML type 999
    (tmp_path / "new.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + info + bytes(64))
    with pytest.raises(QoqoptError, match="is of GGML type 999, which this gguf-py does not know; cannot split it"):
        read_layout(tmp_path / "new.gguf")


def test_splitting_takes_room_for_one_part_not_a_copy(tmp_path, monkeypatch):
    """Each part's bytes leave the original once the part is written: on disk at any time are the
    original's size and at most one part more, plus each part's own header (a second copy would be
    65 GB at 32B F16)."""
    from qoqopt.exports import gguf_split

    path = tmp_path / "m.gguf"
    _write(path)
    size, on_disk = path.stat().st_size, []
    write_part = gguf_split._write_part

    def measured(dest, *args):
        write_part(dest, *args)
        on_disk.append(sum(p.stat().st_size for p in tmp_path.iterdir()))

    monkeypatch.setattr(gguf_split, "_write_part", measured)
    parts = split_gguf(path, 1_000_000)
    largest = max(p.stat().st_size for p, _ in parts)
    assert len(on_disk) == len(parts) >= 3 and max(on_disk) <= size + largest + 1024 * len(parts)


def test_parts_written_directly_leave_nothing_behind_on_failure(tmp_path):
    """write_parts (a file qoqopt writes straight into parts): a disk error in a later part removes
    the parts already written and names the failing part in one line; no part stands without the
    others."""
    import errno

    from qoqopt.exports.gguf_split import plan_parts, write_parts

    path = tmp_path / "m.gguf"
    _write(path)
    layout = read_layout(path)
    parts = plan_parts(layout, 1_000_000)
    with open(path, "rb") as f:
        data = [(f.seek(start), f.read(size))[1] for start, size in layout.spans]

    def full_disk(i, out):
        if i >= parts[2][0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        out.write(data[i])

    out = tmp_path / "out"
    out.mkdir()
    names = part_names(out / "m.gguf", len(parts))
    with pytest.raises(QoqoptError, match=f"^disk full while writing {names[2].name}"):
        write_parts(out / "m.gguf", layout, parts, full_disk)
    assert list(out.iterdir()) == []
    written = write_parts(out / "m.gguf", layout, parts, lambda i, f: f.write(data[i]))
    assert [p.read_bytes() for p, _ in written] == [p.read_bytes() for p, _ in split_gguf(path, 1_000_000)]


@pytest.mark.parametrize("alignment", [None, 64])
def test_the_header_reader_reads_what_gguf_py_reads(tmp_path, alignment):
    """exports/gguf_header.py (which `split` and `qoqopt info` read GGUFs with) against gguf-py's
    reader: every metadata value (an array past LONG_ARRAY items as its length), and each tensor's
    name, shape, type, data offset, element and byte count."""
    from gguf import GGUFValueType

    from qoqopt.exports.gguf_header import LONG_ARRAY, elements, read_header, tensor_bytes, type_name

    path = tmp_path / "m.gguf"
    _write(path, alignment)
    ref, header = _read(path), read_header(path)
    want = {k: len(f.data) if f.types[0] == GGUFValueType.ARRAY and len(f.data) > LONG_ARRAY else f.contents()
            for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # fmt: skip
    assert header.kv == want and header.kv["tokenizer.ggml.tokens"] == 5000 and header.n_kv == len(want)
    assert [(t.name, t.dims, type_name(t.qtype), header.data_start + t.offset, elements(t), tensor_bytes(t))
            for t in header.tensors] == [(t.name, [int(d) for d in t.shape], t.tensor_type.name, int(t.data_offset),
                                          int(t.n_elements), int(t.n_bytes)) for t in ref.tensors]  # fmt: skip
