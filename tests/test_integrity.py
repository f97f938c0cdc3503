"""A build's files are checked against their manifest sha256 before a runtime is given them, and a
file that matched is not hashed again until it changes."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from qoqopt import integrity
from qoqopt.errors import QoqoptError


@pytest.fixture()
def counted_hashes(tmp_path, monkeypatch):
    """qoqopt's cache in tmp_path, and a list that grows by the path of every file actually hashed.
    A digest is remembered for a file last changed 50 ms before it is looked at (``settle``), not 2 s."""
    monkeypatch.setenv("QOQOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(integrity, "RACY_NS", 50_000_000)
    hashed, real = [], integrity.sha256_file

    def counting(path, **kw):
        hashed.append(path.name)
        return real(path, **kw)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    return hashed


def settle():
    """Wait until files written so far are older than the fixture's racy window."""
    time.sleep(0.06)


def test_a_hashed_file_is_not_hashed_again_until_it_changes(tmp_path, counted_hashes, monkeypatch):
    f = tmp_path / "m.Q8_0.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 50)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    with monkeypatch.context() as m:  # qoqopt's own window: an edit to come could share these time stamps
        m.setattr(integrity, "RACY_NS", 2_000_000_000)
        assert integrity.sha256_of(f) == want and integrity.sha256_of(f) == want
    assert counted_hashes == ["m.Q8_0.gguf"] * 2  # so the digest of a file just written is not remembered
    settle()
    assert integrity.sha256_of(f) == want and integrity.sha256_of(f) == want
    assert counted_hashes == ["m.Q8_0.gguf"] * 3  # the second answer came from the cache
    st = f.stat()
    with open(f, "r+b") as fh:  # a same-size edit in place, its mtime then put back: ctime still moves
        fh.seek(100)
        fh.write(b"\xff")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert integrity.sha256_of(f) == hashlib.sha256(f.read_bytes()).hexdigest() != want
    assert counted_hashes == ["m.Q8_0.gguf"] * 4


def test_a_same_size_edit_in_the_tick_of_the_check_is_not_missed(tmp_path, counted_hashes, monkeypatch):
    """File times come from a coarse clock: whole seconds on ext3 and some NFS servers, a 1-10 ms
    tick before Linux 6.13. A same-size rewrite in the tick of the first check then keeps size,
    inode, mtime and ctime. Seen through whole-second time stamps, with qoqopt's own window, the
    rewrite is still hashed again (the cached digest answered before)."""
    real_stat = os.stat

    def whole_seconds(path, *args, **kwargs):  # the file system's clock, not the kernel's: times floored
        st = real_stat(path, *args, **kwargs)
        times = {f"st_{t}time_ns": getattr(st, f"st_{t}time_ns") // 10**9 * 10**9 for t in "amc"}
        return os.stat_result(tuple(st), {f"st_{t}time": v / 1e9 for t, v in zip("amc", times.values())} | times)

    monkeypatch.setattr(integrity, "RACY_NS", 2_000_000_000)
    monkeypatch.setattr(os, "stat", whole_seconds)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"w" * 16)
    stamps = os.stat(f)
    assert integrity.sha256_of(f) == hashlib.sha256(b"w" * 16).hexdigest()
    f.write_bytes(b"v" * 16)
    assert (os.stat(f).st_mtime_ns, os.stat(f).st_ctime_ns) == (stamps.st_mtime_ns, stamps.st_ctime_ns) or pytest.skip(
        "a second boundary fell between the writes")  # fmt: skip
    assert integrity.sha256_of(f) == hashlib.sha256(b"v" * 16).hexdigest()
    assert counted_hashes == ["model.safetensors"] * 2


def test_a_corrupt_file_of_the_right_size_is_refused(tmp_path, counted_hashes):
    build = tmp_path / "build"
    build.mkdir()
    (build / "m.Q8_0.gguf").write_bytes(b"a" * 64)
    settle()
    entry = {"path": "m.Q8_0.gguf", "kind": "text", "bytes": 64, "sha256": hashlib.sha256(b"b" * 64).hexdigest()}
    with pytest.raises(QoqoptError, match=r"^m.Q8_0.gguf does not match the sha256 in manifest.json: the file is corrupt"):
        integrity.checked_files(build, [entry])
    entry["sha256"] = hashlib.sha256(b"a" * 64).hexdigest()
    assert integrity.checked_files(build, [entry]) == [build / "m.Q8_0.gguf"]
    (build / "cut.gguf").write_bytes(b"a" * 10)
    with pytest.raises(QoqoptError, match="cut.gguf is 10 bytes but manifest.json records 64: an incomplete download"):
        integrity.checked_files(build, [entry, {**entry, "path": "cut.gguf"}])
    (build / "grown.gguf").write_bytes(b"a" * 70)
    with pytest.raises(QoqoptError, match="grown.gguf is 70 bytes but manifest.json records 64: changed after export"):
        integrity.checked_files(build, [{**entry, "path": "grown.gguf"}])
    # hashed once: the recheck used the digest remembered, and the cut-off file was found by its size
    assert counted_hashes == ["m.Q8_0.gguf"]


def test_ask_refuses_a_corrupt_build_in_one_line(tmp_path, counted_hashes, capsys):
    """The corrupt text GGUF stops `ask` before llama.cpp is given it (llama.cpp would load these
    bytes and answer with garbage)."""
    from tests.conftest import refused

    build = tmp_path / "build"
    build.mkdir()
    (build / "m.Q8_0.gguf").write_bytes(bytes(100))
    (build / "mmproj-m-f16.gguf").write_bytes(bytes(10))
    files = [{"path": "m.Q8_0.gguf", "kind": "text", "quant": "Q8_0", "bytes": 100,
              "sha256": hashlib.sha256(bytes(99) + b"\1").hexdigest()},
             {"path": "mmproj-m-f16.gguf", "kind": "mmproj", "bytes": 10, "sha256": hashlib.sha256(bytes(10)).hexdigest()}]  # fmt: skip
    (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files}))
    err = refused(["ask", str(build), "--item", "ct-abd-pancreas.region_ct.eval-0"], capsys)
    assert err.startswith("error: m.Q8_0.gguf does not match the sha256 in manifest.json"), err


def test_a_file_without_a_recorded_sha256_is_said_to_be_unchecked(tmp_path, counted_hashes, capsys):
    (tmp_path / "m.gguf").write_bytes(b"x" * 8)
    assert integrity.checked_files(tmp_path, [{"path": "m.gguf", "bytes": 8}]) == [tmp_path / "m.gguf"]
    assert capsys.readouterr().err == "warning: manifest.json records no sha256 for m.gguf: its bytes are not checked\n"
    assert counted_hashes == []


def test_an_edited_config_of_a_gptq_build_is_named_not_refused(tmp_path, counted_hashes, capsys):
    """A GPTQ/AWQ build's weights must match; its JSON may be edited on purpose, but an edited
    quantization_config only showed as "quantized tensors disagree" at load: the edit is named once."""
    config = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    (tmp_path / "model.safetensors").write_bytes(b"w" * 16)
    (tmp_path / "config.json").write_text(json.dumps(config))
    manifest = {"format": "gptq", "files": [
        {"path": name, "bytes": (tmp_path / name).stat().st_size,
         "sha256": hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}
        for name in ("model.safetensors", "config.json")]}  # fmt: skip
    assert integrity.checked_weights(tmp_path, manifest) == [tmp_path / "model.safetensors"]
    assert capsys.readouterr().err == ""
    config["quantization_config"]["group_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert integrity.checked_weights(tmp_path, manifest) == [tmp_path / "model.safetensors"]
    assert capsys.readouterr().err == ("warning: config.json is not the one export wrote (its sha256 differs from "
                                       "manifest.json); if loading fails, look at that edit first\n")  # fmt: skip
    # a README.md is not named: on the Hub the card replaces it, in repos published before their manifest said so
    (tmp_path / "README.md").write_text("export's readme")
    manifest["files"].append({"path": "README.md", "bytes": 1, "sha256": "0" * 64})
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {**config["quantization_config"], "group_size": 128}}))
    manifest["files"][1]["sha256"] = hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest()
    assert integrity.checked_weights(tmp_path, manifest) == [tmp_path / "model.safetensors"]
    assert capsys.readouterr().err == ""
    (tmp_path / "model.safetensors").write_bytes(b"v" * 16)
    with pytest.raises(QoqoptError, match="model.safetensors does not match the sha256"):
        integrity.checked_weights(tmp_path, manifest)


@pytest.mark.parametrize("errno_", [28, 30], ids=["disk-full", "read-only"])
def test_a_cache_that_cannot_be_written_costs_only_hashing_again(tmp_path, counted_hashes, monkeypatch, errno_):
    """The digest is only remembered: a full or read-only cache (a home disk filled by the Hub's
    downloads) must not fail the check of an intact file, as it did through atomic_write_text's
    QoqoptError (`info --verify` said FAILED, `ask` and `bench` refused the build)."""
    f = tmp_path / "m.Q8_0.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 50)
    settle()
    (tmp_path / "cache" / "sha256").mkdir(parents=True)

    def full(*args, **kwargs):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr("qoqopt.fileio.tempfile.mkstemp", full)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert integrity.sha256_of(f) == want
    entry = {"path": f.name, "bytes": f.stat().st_size, "sha256": want}
    assert integrity.problems(tmp_path, {"files": [entry]}) == []


def test_verify_reads_every_file_again_whatever_the_cache_remembers(tmp_path, counted_hashes, capsys):
    """Bits that rot on a disk change no time stamp, so the cache's identity of an unchanged file
    still vouches for it: a second `info --verify` said "match" without reading a byte. --verify
    reads every file each time (the quick checks before a runtime keep the cache). Rot is staged by
    a stamp that remembers another digest for the file, as the cache would after the bytes changed."""
    from qoqopt.cli import main

    build = tmp_path / "build"
    build.mkdir()
    data = b"GGUF" + bytes(range(256)) * 10
    (build / "m.Q8_0.gguf").write_bytes(data)
    entry = {"path": "m.Q8_0.gguf", "kind": "text", "quant": "Q8_0", "bytes": len(data),
             "sha256": hashlib.sha256(b"what export wrote").hexdigest()}  # fmt: skip
    (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": [entry]}))
    settle()
    f = build / "m.Q8_0.gguf"
    stamp = integrity._stamp(f, f.stat())
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(entry["sha256"])  # the cache remembers the file as export wrote it
    assert integrity.checked_files(build, [entry]) == [f] and counted_hashes == []  # the quick check trusts it
    for _ in range(2):
        assert main(["info", str(build), "--verify"]) == 1
        assert "verify       FAILED m.Q8_0.gguf does not match the sha256" in capsys.readouterr().out
    assert counted_hashes == ["m.Q8_0.gguf"] * 2
