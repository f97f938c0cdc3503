"""`qoqopt info` on GGUF files that qoqopt did not write: written here with gguf-py's writer (llama.cpp's
own package), missing keys, a tensor type newer than gguf-py, a bad alignment. Each is described,
with what it lacks as "?", or refused in one line. (Builds qoqopt wrote are checked against
llama.cpp's loader in test_bench.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import refused


def _gguf(path, arch: str | None = "llama", keys: dict | None = None):
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch or "llama")
    if arch is None:  # gguf-py always writes general.architecture: drop it again
        writer.kv_data[0].pop("general.architecture")
    for key, value in (keys or {}).items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.ones((8, 32), dtype=np.float16))
    _finish(writer)
    return path


def _finish(writer) -> None:
    """Write what a gguf-py writer holds (header, metadata, tensors) and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _info(path, capsys) -> str:
    from qoqopt.cli import main

    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


def test_a_foreign_gguf_is_described_with_what_it_lacks_as_unknown(tmp_path, capsys):
    out = _info(_gguf(tmp_path / "l.gguf", keys={"llama.block_count": 2, "llama.embedding_length": 32}), capsys)
    assert "text         llama: 2 layers, hidden 32, intermediate ?, ? heads / ? KV, vocab ?, context ?" in out
    assert "rope_theta ?, mrope sections ?" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("  l.gguf"))
    assert "2 tensors: F32 1, F16 1" in line and f"{(4 * 32 * 4 + 8 * 32 * 2) * 8 / (4 * 32 + 8 * 32):5.2f} BPW" in line
    assert "text         ?: " in _info(_gguf(tmp_path / "n.gguf", arch=None), capsys)


def test_a_tensor_type_newer_than_gguf_py_leaves_only_the_bpw_unknown(tmp_path, capsys):
    from qoqopt.exports.gguf_header import read_header

    path = _gguf(tmp_path / "new.gguf")
    t = read_header(path).tensors[1]
    data = bytearray(path.read_bytes())
    at = data.index(t.raw) + len(t.raw) - 4  # the info record ends with its GGML type
    data[at : at + 4] = (200).to_bytes(4, "little")
    path.write_bytes(data)
    line = next(ln for ln in _info(path, capsys).splitlines() if ln.startswith("  new.gguf"))
    assert "? BPW" in line and "type 200 1" in line


@pytest.mark.parametrize("alignment", [0, 48])
def test_an_alignment_llama_cpp_refuses_is_one_line(tmp_path, capsys, alignment):
    path = _gguf(tmp_path / "a.gguf", keys={"general.alignment": alignment})  # gguf-py's own setter refuses these
    assert refused(["info", path], capsys) == f"error: a.gguf: general.alignment {alignment} is not a power of 2"


def test_a_gguf_path_is_never_looked_up_on_the_hub(tmp_path, capsys, monkeypatch):
    """`gguf/m.Q5_K_M.gguf` also reads as a Hub id (owner/name): a mistyped file name must not leave the machine."""
    import qoqopt.loader

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qoqopt.loader, "_snapshot", lambda *a, **k: pytest.fail("looked up on the Hub"))
    (tmp_path / "gguf").mkdir()
    assert refused(["info", "gguf/m.Q5_K_M.gguf"], capsys) == "error: gguf/m.Q5_K_M.gguf: no such file"
    assert refused(["info", "gguf"], capsys).startswith("error: gguf has no config.json")
    (tmp_path / "qoq.gguf").mkdir()  # a folder named like a file is read as a folder
    assert refused(["info", "qoq.gguf"], capsys).startswith("error: qoq.gguf has no config.json")


def test_an_mmproj_is_known_by_its_clip_architecture_and_an_odd_type_is_no_traceback(tmp_path, capsys):
    """Older llama.cpp scripts wrote an mmproj without general.type: it showed as a text model of
    "? layers". A general.type stored as an array was a TypeError traceback."""
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "mmproj-legacy.gguf", "clip")
    writer.add_string("clip.projector_type", "qwen2.5vl_merger")
    writer.add_tensor("v.blk.0.attn_q.weight", np.ones((8, 32), dtype=np.float16))
    _finish(writer)
    assert json.loads(_json(tmp_path / "mmproj-legacy.gguf", capsys))["files"][0]["kind"] == "mmproj"
    writer = GGUFWriter(tmp_path / "odd.gguf", "llama")
    writer.add_array("general.type", ["mmproj"])
    writer.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    _finish(writer)
    assert json.loads(_json(tmp_path / "odd.gguf", capsys))["files"][0]["kind"] == "text"


def test_a_split_part_is_named_for_what_it_is(tmp_path, capsys):
    """A later part is told to give the first; a first part renamed cannot lead llama.cpp to the others."""
    from qoqopt.exports.gguf_split import split_gguf

    path = _gguf(tmp_path / "m.gguf", keys={f"llama.pad{i}": i for i in range(3)})
    first, second = (p for p, _ in split_gguf(path, path.stat().st_size - 1))  # one tensor in each part
    assert refused(["info", second], capsys) == f"error: {second.name} is part 2 of 2 of a split GGUF; give its first part"
    renamed = first.rename(tmp_path / "first.gguf")
    assert "but not named -00001-of-00002.gguf" in refused(["info", renamed], capsys)
    summary = json.loads(_json(renamed.rename(first), capsys))  # named back: both parts, one file
    assert summary["files"][0]["parts"] == 2 and summary["files"][0]["tensors"] == 2


def test_parts_swapped_or_from_another_file_are_refused_as_llama_cpp_refuses_them(tmp_path, capsys):
    """Parts written by gguf-py's own splitter (llama.cpp's names and split keys): swapped, they
    passed as healthy, where llama.cpp's loader says "invalid split file idx"; a part of another
    file with another tensor count, where it says "corrupted model"."""
    from gguf import GGUFWriter

    def split(folder, tensors: int):
        folder.mkdir()
        writer = GGUFWriter(folder / "m.gguf", "llama", split_max_tensors=1)
        for i in range(tensors):
            writer.add_tensor(f"blk.{i}.ffn_up.weight", np.full((8, 32), i, dtype=np.float32))
        _finish(writer)
        return sorted(folder.glob("m-*-of-*.gguf"))

    parts = split(tmp_path / "a", 3)
    assert [p.name for p in parts] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert json.loads(_json(parts[0], capsys))["files"][0]["tensors"] == 3  # whole, it is one file
    parts[1].rename(tmp_path / "x")
    parts[2].rename(parts[1])
    (tmp_path / "x").rename(parts[2])
    assert refused(["info", parts[0]], capsys) == (
        f"error: {parts[1].name} is named part 2 of 3 but its header says part 3 of 3: parts swapped or from another "
        "file, which llama.cpp refuses")  # fmt: skip


def _json(path, capsys) -> str:
    from qoqopt.cli import main

    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    return capsys.readouterr().out


def test_verify_checks_every_listed_file_against_its_sha256(tmp_path, capsys, monkeypatch):
    """`info --verify` (as `sha256sum -c` on the manifest): exit 0 when every file matches, 1 with
    one FAILED line per file that is missing, cut off or changed; refused for what has no manifest."""
    import hashlib

    from qoqopt.cli import main

    monkeypatch.setenv("QOQOPT_CACHE", str(tmp_path / "cache"))
    build = tmp_path / "build"
    build.mkdir()
    paths = [_gguf(build / "m.Q8_0.gguf"), _gguf(build / "mmproj-m-f16.gguf"), build / "README.md"]
    paths[2].write_text("card\n")
    files = [{"path": p.name, "kind": kind, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p, kind in zip(paths, ("text", "mmproj", "card"))]  # fmt: skip
    files[0]["quant"] = "Q8_0"
    (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files}))

    def verify(*extra) -> tuple[int, str]:
        capsys.readouterr()
        rc = main(["info", str(build), "--verify", *extra])
        return rc, capsys.readouterr().out

    rc, out = verify()
    assert rc == 0 and out.rstrip().endswith("verify       3 files match manifest.json (size and sha256)")
    (build / "m.Q5_K_M.gguf").write_bytes(paths[0].read_bytes())  # a copy no manifest vouches for
    (build / ".cache").mkdir()
    (build / ".cache" / "x.lock").write_text("")  # what `hf download --local-dir` leaves: not a build file
    rc, out = verify()
    assert rc == 0 and out.rstrip().endswith("verify       not in manifest.json, so not checked: m.Q5_K_M.gguf")
    (build / "m.Q4_K_M.gguf").symlink_to(tmp_path / "gone.gguf")  # a link whose target went away
    rc, out = verify()
    assert rc == 0 and out.rstrip().endswith("verify       not in manifest.json, so not checked: m.Q5_K_M.gguf")
    assert "verify       not in manifest.json, so not checked: m.Q4_K_M.gguf" in out
    (build / "m.Q4_K_M.gguf").unlink()
    (build / "m.Q5_K_M.gguf").unlink()
    data = bytearray(paths[0].read_bytes())
    data[-1] ^= 1  # one bit of tensor data: same size, so only the sha256 can tell
    paths[0].write_bytes(data)
    paths[2].unlink()
    rc, out = verify()
    failed = [ln for ln in out.splitlines() if ln.startswith("verify")]
    assert rc == 1 and failed == [
        "verify       FAILED m.Q8_0.gguf does not match the sha256 in manifest.json: the file is corrupt or was "
        "changed after export; copy or download it again",
        f"verify       FAILED {build / 'manifest.json'} lists README.md, which is missing: copy or download the whole build"]
    rc, out = verify("--json")
    assert rc == 1 and len(json.loads(out)["verify_failed"]) == 2
    assert refused(["info", paths[1], "--verify"], capsys).endswith("give the folder, not one file")
    assert "has no manifest.json" in refused(["info", tmp_path, "--verify"], capsys)
    # a missing local path was taken for a Hub id: "download /x/y first (`hf download /x/y ...`)"
    gone = tmp_path / "gone"
    assert refused(["info", gone, "--verify"], capsys) == f"error: --verify: {gone}: no such build folder"
    assert refused(["info", build / "manifest.json", "--verify"], capsys).endswith("manifest.json is not a folder")
    assert "download me/build first" in refused(["info", "me/build", "--verify"], capsys)
    typo = tmp_path.name + "/buidl"  # its first folder exists here: a local path, not a Hub id to download
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path.parent)
        assert refused(["info", typo, "--verify"], capsys) == f"error: --verify: {typo}: no such build folder"


def test_a_download_of_one_quant_of_a_published_build_is_not_damage(tmp_path, capsys, monkeypatch):
    """The Hub card says to fetch one quant (`hf download --include`); `info` of that copy called
    the other quants MISSING and exited 1, and --verify failed them. A published build's files that
    were not downloaded are said so and not checked; one part of a file in parts missing, or any
    file missing from a build as export wrote it, is still damage."""
    import hashlib

    from qoqopt.cli import main

    monkeypatch.setenv("QOQOPT_CACHE", str(tmp_path / "cache"))
    build = tmp_path / "pub"
    build.mkdir()
    names = ["m.Q4_K_M.gguf", "m.Q8_0-00001-of-00002.gguf", "m.Q8_0-00002-of-00002.gguf", "mmproj-m-f16.gguf"]
    files = []
    for i, name in enumerate(names):
        path = _gguf(build / name, "clip" if name.startswith("mmproj") else "llama")
        entry = {"path": name, "kind": "mmproj" if name.startswith("mmproj") else "text", "bytes": path.stat().st_size,
                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}  # fmt: skip
        if entry["kind"] == "text":
            entry["quant"] = name.split(".")[1].split("-")[0]
        if "-of-" in name:
            entry |= {"part": i, "parts": 2}
        files.append(entry)
    manifest = {"format": "gguf", "files": files, "published": {"repo": "me/x"}}
    (build / "manifest.json").write_text(json.dumps(manifest))
    for name in names[1:3]:
        (build / name).unlink()  # `hf download me/x --include "*Q4_K_M*" "mmproj*" manifest.json`
    assert main(["info", str(build), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify       2 files match manifest.json (size and sha256)" in out
    assert "verify       not downloaded, so not checked: m.Q8_0-00001-of-00002.gguf, m.Q8_0-00002-of-00002.gguf" in out
    assert "MISSING" not in out and "not downloaded" in out.split("verify")[0]
    assert "default      Q4_K_M: the text GGUF" in out
    (build / names[0]).rename(tmp_path / names[0])  # swap the download: Q8_0's parts, not Q4_K_M
    for name in names[1:3]:
        _gguf(build / name, "llama")
    assert main(["info", str(build)]) == 0  # `ask` runs the quant that is here, and info names that one
    assert "default      Q8_0: the text GGUF" in capsys.readouterr().out
    (tmp_path / names[0]).rename(build / names[0])
    for name in names[2:0:-1]:
        (build / name).unlink()
    _gguf(build / names[1], "llama")  # one part of two: an incomplete download
    assert main(["info", str(build), "--verify"]) == 1
    assert f"lists {names[2]}, which is missing" in capsys.readouterr().out
    (build / names[1]).unlink()
    del manifest["published"]  # as export wrote it: every file belongs
    (build / "manifest.json").write_text(json.dumps(manifest))
    assert main(["info", str(build), "--verify"]) == 1
    assert f"FAILED {build / 'manifest.json'} lists {names[1]}, which is missing" in capsys.readouterr().out


def test_verify_reports_a_damaged_build_even_when_it_cannot_be_summarised(tmp_path, capsys, monkeypatch):
    """A GPTQ copy that lost its config.json cannot be described, but what --verify found is still printed."""
    from qoqopt.cli import main

    monkeypatch.setenv("QOQOPT_CACHE", str(tmp_path / "cache"))
    tmp_path = tmp_path / "build"
    tmp_path.mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"x" * 8)
    files = [{"path": "model.safetensors", "bytes": 8, "sha256": "0" * 64}, {"path": "config.json", "bytes": 2, "sha256": "0" * 64}]
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "gptq", "files": files}))
    capsys.readouterr()
    assert main(["info", str(tmp_path), "--verify"]) == 1  # the documented status for a build that fails
    out, err = capsys.readouterr()
    failed = [
        "model.safetensors does not match the sha256 in manifest.json: the file is corrupt or was "
        "changed after export; copy or download it again",
        f"{tmp_path / 'manifest.json'} lists config.json, which is missing: copy or download the whole build"]
    assert out.splitlines() == [f"verify       FAILED {line}" for line in failed]
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["info", str(tmp_path), "--verify", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verify_failed"] == failed and out["error"]
    # a manifest.json cut short, edited into invalid JSON or listing nothing is a failed check too
    # (status 2 before, against the documented 1)
    # bytes that are not UTF-8 and nesting past Python's parser were tracebacks, --verify's included
    for manifest, message in (('{"format": "gptq", "fi', "is not valid JSON: "),
                              (b'{"format": "gptq\xff"}', "is not valid JSON: 'utf-8' codec can't decode byte 0xff"),
                              ("[" * 100_000, "is not valid JSON: maximum recursion depth exceeded"),
                              (json.dumps({"format": "gptq", "files": []}), "lists no files")):  # fmt: skip
        getattr(tmp_path / "manifest.json", "write_bytes" if isinstance(manifest, bytes) else "write_text")(manifest)
        assert main(["info", str(tmp_path), "--verify"]) == 1
        out, err = capsys.readouterr()
        assert out.startswith(f"verify       FAILED {tmp_path / 'manifest.json'} {message}") and out.count("\n") == 1
        assert err == ""  # the failed line is the answer, not said twice
    assert refused(["info", tmp_path], capsys) == f"error: {tmp_path / 'manifest.json'} lists no files"  # without --verify
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").mkdir()
    assert refused(["info", tmp_path], capsys) == f"error: {tmp_path / 'manifest.json'} is a folder, not a JSON file"


def test_a_files_source_is_what_its_qoqopt_keys_say(tmp_path, capsys):
    """A GGUF exported from a Hub checkpoint carries the commit it was made from (qoqopt.source_revision)."""
    from gguf import GGUFWriter

    from qoqopt.cli import main

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(path, "qwen2vl")
    for key, value in (("source", "ddvd233/QoQ-Med-VL-7B"), ("source_revision", "a" * 40), ("source_fingerprint", "sha256-v2:f")):
        writer.add_string(f"qoqopt.{key}", value)
    writer.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    _finish(writer)
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    made_from = json.loads(capsys.readouterr().out)["made_from"]
    assert made_from == {"model": "ddvd233/QoQ-Med-VL-7B", "revision": "a" * 40, "fingerprint": "sha256-v2:f"}
    assert main(["info", str(path)]) == 0
    assert f"made from    ddvd233/QoQ-Med-VL-7B, revision {'a' * 40}\n" in capsys.readouterr().out


@pytest.mark.parametrize("part,parts", [(1, 65536), (0, 2), (1, 0)])
def test_a_part_count_llama_cpp_cannot_hold_is_refused_before_it_is_counted(tmp_path, capsys, part, parts):
    """A manifest's "parts" past split.count's 16 bits (a 2 KB manifest with 10**9 made `info`, `ask`
    and `publish` build a billion-item list), or a part numbered from 0: one line, nothing enumerated."""
    name = f"m.Q8_0-{part:05d}-of-{parts:05d}.gguf"
    files = [{"path": name, "kind": "text", "quant": "Q8_0", "bytes": 0, "part": part, "parts": parts}]
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files}))
    bad = "parts" if not 1 <= parts <= 65535 else "part"
    assert refused(["info", tmp_path], capsys) == (f"error: {tmp_path / 'manifest.json'} gives {name} \"{bad}\": "
                                                   f"{files[0][bad]}, not 1..65535 (llama.cpp's split.count is 16-bit)")  # fmt: skip


@pytest.mark.parametrize("name,keys,why", [
    ("x-00001-of-65536.gguf", {"split.count": 65536}, "split.count is 65536, not a part count of 1..65535"),
    ("x-00001-of-00002.gguf", {"split.count": "2"}, "split.count is '2', not a part count of 1..65535"),
    ("x-00001-of-00002.gguf", {"split.count": 2, "split.no": 2}, "split.no is 2, not a part number of 0..1 (split.count 2)"),
])  # fmt: skip
def test_split_keys_llama_cpp_cannot_hold_are_refused_before_any_part_is_named(tmp_path, capsys, name, keys, why):
    """split.count past its 16 bits (a 119-byte file saying 10**10 parts ran 90 s to a MemoryError,
    naming every part), of another type (a string was a traceback), or a split.no past the count."""
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / name, "llama")
    for key, value in keys.items():
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)
    writer.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    _finish(writer)
    assert refused(["info", tmp_path / name], capsys) == f"error: {name}: {why}"


def test_missing_parts_are_counted_past_the_first_three(tmp_path, capsys):
    _gguf(tmp_path / "x-00001-of-65535.gguf", keys={"split.count": 65535})
    assert refused(["info", tmp_path / "x-00001-of-65535.gguf"], capsys) == (
        "error: x-00001-of-65535.gguf is part 1 of 65535; x-00002-of-65535.gguf, x-00003-of-65535.gguf, "
        "x-00004-of-65535.gguf and 65531 more missing beside it")


def _nested_gguf(path, depth: int):
    """A GGUF v3 of no tensors and one key, "x", holding `depth` arrays, each in the one before, the
    last holding the uint32 7, written per the GGUF spec: a key is a uint64 length and its bytes, a
    value's type a uint32 (9 array, 4 uint32), an array its items' type then a uint64 count."""
    import struct

    key = struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9)
    levels = struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQI", 4, 1, 7)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + key + levels)
    return path


def test_arrays_nested_past_the_limit_are_one_line(tmp_path, capsys):
    """10**5 arrays each in the one before ran the header reader into Python's recursion limit (a
    RecursionError traceback); as deep as the limit they are still read."""
    from qoqopt.exports.gguf_header import MAX_NESTING, read_header

    value = read_header(_nested_gguf(tmp_path / "deep.gguf", MAX_NESTING)).kv["x"]
    for _ in range(MAX_NESTING):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == 7
    path = _nested_gguf(tmp_path / "deeper.gguf", 10**5)
    at = 24 + 13 + 12 * MAX_NESTING  # the header, the key and its type, then MAX_NESTING array heads
    assert refused(["info", path], capsys) == f"error: deeper.gguf: GGUF arrays nested more than {MAX_NESTING} deep at byte {at}: a damaged file"


def test_a_files_control_characters_are_shown_not_acted_on(tmp_path, capsys, monkeypatch):
    """GGUF strings, a manifest's notes and file names reach the terminal as visible escapes: an
    architecture "\\x1b[2J" cleared the screen, a newline in a name started a line of its own, and
    an error quoting one was no longer one line."""
    from qoqopt.cli import main

    hostile = "ll\x1b[2J\x1b[31mama\x9b\x7f\n"
    shown = "ll\\x1b[2J\\x1b[31mama\\x9b\\x7f\\n"
    build = tmp_path / "build"
    build.mkdir()
    path = _gguf(build / "m.Q8_0.gguf", arch=hostile)
    out = _info(path, capsys)
    assert f"text         {shown}: " in out and not any(c in out for c in "\x1b\x9b\x7f")
    _gguf(build / "mmproj\x1b[2J.gguf")
    files = [{"path": path.name, "kind": "text", "quant": "Q8_0"}, {"path": "mmproj\x1b[2J.gguf", "kind": "mmproj"}]
    (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files, "notes": [f"a {hostile}note"]}))
    out = _info(build, capsys)
    assert f"note         a {shown}note\n" in out and "  mmproj\\x1b[2J.gguf " in out and "\x1b" not in out
    files[1]["bytes"] = -1  # refused, quoting the file's name
    (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files}))
    assert refused(["info", build], capsys) == f"error: {build / 'manifest.json'} gives mmproj\\x1b[2J.gguf \"bytes\": -1, not a count"
    files[1]["path"] = "mm\nproj.gguf"
    (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files}))
    assert refused(["info", build], capsys) == f"error: {build / 'manifest.json'} gives mm\\nproj.gguf \"bytes\": -1, not a count"
    monkeypatch.setenv("QOQOPT_CACHE", str(tmp_path / "cache"))
    files[1] = {"path": "gone\x1b[2J.gguf", "kind": "mmproj"}  # --verify's failed line names it
    (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files}))
    capsys.readouterr()
    assert main(["info", str(build), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"verify       FAILED {build / 'manifest.json'} lists gone\\x1b[2J.gguf, which is missing" in out and "\x1b" not in out


def test_a_manifest_value_of_another_json_type_is_one_line(tmp_path, capsys):
    """A hand-edited manifest value of another JSON type was a traceback where it is read ("kind": 3
    in info's file table, "calibration": "x" in publish's name check), and so was a Modelfile's bare
    FROM line. Another type is refused in one line naming it; null reads as not recorded."""
    build = tmp_path / "b"
    build.mkdir()
    _gguf(build / "m.Q8_0.gguf")
    size = (build / "m.Q8_0.gguf").stat().st_size

    def manifest(entry=None, **top):
        text = {"path": "m.Q8_0.gguf", "kind": "text", "quant": "Q8_0", "bytes": size} | (entry or {})
        (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": [text]} | top))

    manifest()
    (build / "Modelfile").write_text("FROM \nFROM ./m.Q8_0.gguf\n")
    assert main_ok(["info", str(build)], capsys)
    where = build / "manifest.json"
    manifest({"kind": None})  # not recorded: not a text GGUF
    assert refused(["info", build], capsys) == f"error: {where} says format 'gguf', but the build lists no text GGUF"
    for entry, top, said in (({"kind": 3}, {}, 'gives m.Q8_0.gguf "kind": 3, not a JSON string'),
                             ({"quant": ["Q8_0"]}, {}, 'gives m.Q8_0.gguf "quant": ["Q8_0"], not a JSON string'),
                             ({}, {"calibration": "x"}, 'gives "calibration": "x", not a JSON object'),
                             ({}, {"source": "me/x"}, 'gives "source": "me/x", not a JSON object'),
                             ({}, {"notes": ["ok", 1]}, 'gives "notes": a list that is not all strings')):  # fmt: skip
        manifest(entry, **top)
        assert refused(["info", build], capsys) == f"error: {where} {said}"


def main_ok(argv, capsys) -> bool:
    from qoqopt.cli import main

    ok = main(argv) == 0
    out = capsys.readouterr().out
    return ok and "  m.Q8_0.gguf" in out and "Traceback" not in out


def test_llama_cpp_contexts_stop_at_the_trained_context(tmp_path):
    """bench's and ask's llama.cpp context grows with the reply asked for, in 256-token steps, up to the
    `<arch>.context_length` the GGUF says (gguf-py writes it); a GGUF that says none is not capped."""
    from qoqopt.bench.gguf_runner import PROMPT_ROOM, context_for
    from qoqopt.exports.gguf_header import read_header

    said = read_header(_gguf(tmp_path / "a.gguf", "qwen2vl", {"qwen2vl.context_length": 8192})).kv
    unsaid = read_header(_gguf(tmp_path / "b.gguf", "qwen2vl")).kv
    assert context_for(said, 668, 100) == 4096  # bench's floor
    assert context_for(said, 668, 5000) == -(-(668 + PROMPT_ROOM + 5000) // 256) * 256 == 6912
    assert context_for(said, 668, 9000) == 8192
    assert context_for(unsaid, 668, 9000) == -(-(668 + PROMPT_ROOM + 9000) // 256) * 256 == 10752
