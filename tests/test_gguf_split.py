"""exports/gguf_split.py against gguf-py's reader (llama.cpp's own Python package): every part a valid
GGUF, the split keys llama.cpp checks, the original's metadata and tensor bytes carried over whole.
That llama.cpp loads the parts as one model is tested in test_gguf.py."""

from __future__ import annotations

import numpy as np
import pytest

from qoqopt.errors import QoqoptError
from qoqopt.exports.gguf_split import part_names, read_layout, split_gguf


def _write(path, alignment: int | None = None, sizes=(300, 5, 200, 200, 7, 300, 100)):
    """A GGUF with a string-array vocabulary and Q8_0, F16 and F32 tensors of `sizes` rows of 992 values."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(path, "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_string("general.name", "split test")
    writer.add_token_list([f"tok{i}" for i in range(5000)])
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


@pytest.mark.parametrize("alignment", [None, 64])
def test_parts_carry_the_whole_file(tmp_path, alignment):
    from gguf import GGUFValueType

    path = tmp_path / "m.F32.gguf"
    _write(path, alignment)
    ref = _read(path)
    ref_kv, ref_tensors = _kv(ref), [(t.name, t.tensor_type, list(t.shape), bytes(t.data)) for t in ref.tensors]
    layout = read_layout(path)
    assert layout.spans == [(int(t.data_offset), int(t.n_bytes)) for t in ref.tensors]  # gguf-py's own offsets
    assert layout.alignment == (alignment or 32)
    del ref
    max_bytes = 1_000_000
    parts = split_gguf(path, max_bytes)
    assert [p for p, _ in parts] == part_names(path, len(parts)) and len(parts) >= 3
    assert parts[0][0].name == f"m.F32-00001-of-{len(parts):05d}.gguf"
    assert not path.exists()
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
        assert part.stat().st_size <= max_bytes or count == 1  # a tensor over the size gets a part of its own
        tensors += [(t.name, t.tensor_type, list(t.shape), bytes(t.data)) for t in reader.tensors]
    assert tensors == ref_tensors


def test_a_file_that_fits_stays_whole(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path)
    size = path.stat().st_size
    assert split_gguf(path, size) == [(path, 7)]
    assert path.stat().st_size == size


def test_refuses_a_part_and_a_non_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path)
    first = split_gguf(path, 1_000_000)[0][0]
    with pytest.raises(QoqoptError, match="already a part of a split GGUF"):
        split_gguf(first, 1_000_000)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(QoqoptError, match="x.gguf is not a GGUF file"):
        read_layout(tmp_path / "x.gguf")


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
