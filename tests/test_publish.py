"""`qoqopt publish`: refusals, the plan, the card's metadata, and a token that never leaks."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from qoqopt import integrity
from qoqopt.errors import QoqoptError
from qoqopt.hub_license import CardLicense, checked_license
from qoqopt.publish import plan_upload, upload
from tests.conftest import cache_as_hub_repo, error_line, refused, run_cli

SECRET = "hf_SeCrEtTokenValue1234567890abcdef"
COMMIT = "abc123" * 6 + "abcd"  # a build of a Hub repo records the commit it was made from; a local folder none


def _kind(name: str) -> dict:
    """The kind (and quant) a GGUF export records for a file it names ``<name>.<QUANT>.gguf``."""
    if name.startswith("mmproj"):
        return {"kind": "mmproj"}
    if name.endswith(".imatrix.gguf"):
        return {"kind": "imatrix"}
    return {"kind": "text", "quant": name.rsplit(".", 2)[1]}


@pytest.fixture()
def export_dir(tmp_path):
    """A minimal export directory: two files and a manifest, as `qoqopt export` writes it."""
    d = tmp_path / "build"
    d.mkdir()
    files = {"QoQ-Med-mini.Q8_0.gguf": b"GGUF" + bytes(100), "mmproj-QoQ-Med-mini-f16.gguf": b"GGUF" + bytes(50)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "README.md").write_text("usage notes")
    entries = [{"path": n, "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} | _kind(n) for n, b in files.items()]
    manifest = {"format": "gguf", "source": {"model": "ddvd233/QoQ-Med-VL-7B", "revision": COMMIT}, "files": entries}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_card_metadata_parses_as_a_valid_model_card(export_dir):
    from huggingface_hub import ModelCard

    plan = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF")
    card = ModelCard(plan.card)  # parses the YAML and builds ModelCardData; raises on invalid metadata
    data = card.data.to_dict()
    assert data["base_model"] == "ddvd233/QoQ-Med-VL-7B"
    assert data["base_model_relation"] == "quantized"
    assert data["license"] == "mit" and data["pipeline_tag"] == "image-text-to-text"
    assert "gguf" in data["tags"] and "medical" in data["tags"]
    for f in plan.files:
        assert f.sha256 in plan.card or f.path == "manifest.json"
    for runtime in ["llama-mtmd-cli", "LM Studio", "ollama create"]:
        assert runtime in plan.card


@pytest.mark.parametrize("fmt, bits", [("gptq", 8), ("gptq", 4), ("awq", 4)])
def test_card_tags_the_bit_width_the_build_has(fmt, bits):
    """An 8-bit GPTQ card was tagged `4-bit` beside its own table's 8 (the Hub filters on the tag)."""
    from huggingface_hub import ModelCard

    from qoqopt.publish import card_metadata

    data = card_metadata({"format": fmt, "quantization": {"bits": bits},
                          "source": {"model": "ddvd233/QoQ-Med-VL-7B", "revision": COMMIT}})  # fmt: skip
    tags = ModelCard(f"---\n{data.to_yaml()}\n---\n").data.to_dict()["tags"]
    assert fmt in tags and f"{bits}-bit" in tags and f"{12 - bits}-bit" not in tags


def _add_listed_files(build, names):
    manifest = json.loads((build / "manifest.json").read_text())
    for name in names:
        data = b"GGUF" + bytes(200 if ".F16." in name else 10)
        (build / name).write_bytes(data)
        manifest["files"].append({"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                 | _kind(name))
    (build / "manifest.json").write_text(json.dumps(manifest))


def test_card_names_the_quant_llama_cpp_fetches(export_dir):
    """llama.cpp's ``-hf <user>/<model>[:quant]`` takes Q4_K_M, or the repo's first file, when no quant is
    named: the card names one the build has, Q4_K_M where built, and runs the same file locally;
    never the imatrix (a GGUF too, listed first, and the smallest)."""
    (export_dir / "README.md").unlink()  # no exported run section: the card writes its own commands
    _add_listed_files(export_dir, ["QoQ-Med-mini.imatrix.gguf", "QoQ-Med-mini.F16.gguf"])
    manifest = json.loads((export_dir / "manifest.json").read_text())
    manifest["files"] = manifest["files"][-2:] + manifest["files"][:-2]  # imatrix and F16 first, as exports list
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    card = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF").card
    assert "llama-mtmd-cli -hf me/QoQ-Med-mini-GGUF:Q8_0 " in card, card  # a quantized type before F16
    assert "llama-mtmd-cli -m QoQ-Med-mini.Q8_0.gguf --mmproj mmproj-QoQ-Med-mini-f16.gguf" in card
    _add_listed_files(export_dir, ["QoQ-Med-mini.Q4_K_M.gguf"])
    card = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF").card
    assert "llama-mtmd-cli -hf me/QoQ-Med-mini-GGUF:Q4_K_M " in card and "imatrix" not in card.split("## Usage")[1]


def _add_parts(build, quant: str, sizes: list[int]) -> None:
    """A text GGUF of type `quant` in parts of `sizes` bytes, listed as `--split-max-size` exports list them."""
    manifest = json.loads((build / "manifest.json").read_text())
    for no, size in enumerate(sizes, 1):
        name, data = f"QoQ-Med-mini.{quant}-{no:05d}-of-{len(sizes):05d}.gguf", b"GGUF" + bytes(size - 4)
        (build / name).write_bytes(data)
        manifest["files"].append({"path": name, "kind": "text", "quant": quant, "part": no, "parts": len(sizes),
                                  "bytes": size, "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    (build / "manifest.json").write_text(json.dumps(manifest))


def test_card_runs_the_builds_preferred_quant_from_its_first_part(export_dir):
    """The card's `-hf` tag and local command name the quant `ask`, the Modelfile and `info` use (it
    took the smallest file, so a Q8_0 + Q3_K_S build's card said Q3_K_S and its commands Q8_0); a
    quant in parts is run from its first part, and every part is uploaded."""
    from qoqopt.manifest import gguf_text_files

    (export_dir / "README.md").unlink()
    _add_parts(export_dir, "Q3_K_S", [40, 40])  # smaller than the Q8_0, and not preferred over it
    plan = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF")
    assert "llama-mtmd-cli -hf me/QoQ-Med-mini-GGUF:Q8_0 " in plan.card
    assert gguf_text_files(json.loads((export_dir / "manifest.json").read_text())) == ["QoQ-Med-mini.Q8_0.gguf"]
    _add_parts(export_dir, "Q4_K_M", [60, 60])
    plan = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF")
    assert "llama-mtmd-cli -hf me/QoQ-Med-mini-GGUF:Q4_K_M " in plan.card
    assert "llama-mtmd-cli -m QoQ-Med-mini.Q4_K_M-00001-of-00002.gguf --mmproj" in plan.card
    assert {f"QoQ-Med-mini.{q}-0000{n}-of-00002.gguf" for q in ("Q3_K_S", "Q4_K_M") for n in (1, 2)} <= {f.path for f in plan.files}


def _drop_part(files):
    files.remove(next(f for f in files if f.get("part") == 2))


def _swap_parts(files):
    one, two = [f for f in files if f.get("part") in (1, 2)]
    one["part"], two["part"] = two["part"], one["part"]


@pytest.mark.parametrize("edit", [_drop_part, _swap_parts, lambda files: [f.update(parts=4) for f in files if "parts" in f],
                                  lambda files: files[0].update(bytes="abc"), lambda files: files[0].update(bytes=-1),
                                  lambda files: files.append(dict(files[0]))])
def test_a_hand_edited_manifest_is_refused_in_one_line(export_dir, edit, capsys):
    """A file in parts must be listed as parts 1..N named as llama.cpp finds them from the first,
    sizes must be counts, and a file listed once: otherwise publish would upload a repo llama.cpp
    cannot load (a part left out), ask would hand llama.cpp a later part first, a size would end
    in a traceback, or info would count a file twice."""
    _add_parts(export_dir, "Q3_K", [40, 40, 40])
    manifest = json.loads((export_dir / "manifest.json").read_text())
    edit(manifest["files"])
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    for argv in (["publish", export_dir, "--repo", "me/x", "--dry-run"],
                 ["ask", export_dir, "--quant", "Q3_K", "--item", "ct-abd-pancreas.region_ct.eval-0"]):  # fmt: skip
        err = refused(argv, capsys)
        assert "manifest.json" in err and any(w in err for w in ("parts inconsistently", "not a count", " twice: ")), err


def test_a_build_edited_to_another_format_is_refused(export_dir, tmp_path, capsys):
    """A GGUF build whose manifest was edited to say GPTQ stops in one line (it reached transformers),
    and so does a GPTQ build edited to say GGUF (it was described as a GGUF build of unknown files)."""
    manifest = json.loads((export_dir / "manifest.json").read_text()) | {"format": "gptq"}
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    item = ["--item", "ct-abd-pancreas.region_ct.eval-0"]
    for argv in (["ask", export_dir, *item], ["info", export_dir]):
        assert "says format 'gptq', but the build lists text GGUFs" in refused(argv, capsys)
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text("{}")
    files = [{"path": "config.json", "bytes": 2}, {"path": "model.safetensors", "bytes": 8}]
    (gptq / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files}))
    for argv in (["ask", gptq, *item], ["info", gptq]):
        assert "says format 'gguf', but the build lists no text GGUF" in refused(argv, capsys)


def test_without_quant_a_build_answers_with_the_file_its_card_recommends():
    """`ask` with no --quant, like the card and the Modelfile, takes Q4_K_M over a larger file listed
    first (it took the first listed: the F16, several times the size, at 7B 15 GB to load)."""
    from qoqopt.manifest import gguf_text_files

    files = [{"path": f"m.{q}.gguf", "kind": "text", "quant": q} for q in ("F16", "Q8_0", "Q4_K_M")]
    assert gguf_text_files({"files": files}) == ["m.Q4_K_M.gguf"]
    assert gguf_text_files({"files": files[:2]}) == ["m.Q8_0.gguf"]
    assert gguf_text_files({"files": [{"path": "m.Q2_K.gguf", "kind": "text", "quant": "Q2_K"}]}) == ["m.Q2_K.gguf"]
    other = [{"path": f"m.{q}.gguf", "kind": "text", "quant": q} for q in ("F16", "Q3_K_S", "BF16")]
    assert gguf_text_files({"files": other}) == ["m.Q3_K_S.gguf"]  # any quantized type before the unquantized


@pytest.mark.parametrize("fields, serves", [({"ecg_encoder": "carried"}, False), ({"ecg_encoder": "dropped"}, True),
                                            ({"ecg_encoder": None}, True), ({}, True), ({"source_ecg": True}, False)])
def test_card_sends_vllm_users_to_a_build_it_loads(export_dir, fields, serves):
    """Older manifests have only source.ecg_encoder: their builds carried the encoder."""
    manifest = json.loads((export_dir / "manifest.json").read_text()) | {"format": "awq"}
    if fields.pop("source_ecg", False):
        manifest["source"]["ecg_encoder"] = True
    (export_dir / "manifest.json").write_text(json.dumps(manifest | fields))
    card = plan_upload(export_dir, "me/QoQ-Med-mini-AWQ").card
    assert ("vllm serve me/QoQ-Med-mini-AWQ" in card) == serves
    assert ("--drop-ecg" in card) != serves


def test_dry_run_lists_exactly_the_files(export_dir):
    res = run_cli("publish", str(export_dir), "--repo", "me/QoQ-Med-mini-GGUF", "--dry-run", env={"HF_TOKEN": SECRET})
    assert res.returncode == 0, res.stderr
    listed = [line.split()[0] for line in res.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["QoQ-Med-mini.Q8_0.gguf", "mmproj-QoQ-Med-mini-f16.gguf", "manifest.json", "README.md"]
    assert "nothing was uploaded" in res.stdout
    assert SECRET not in res.stdout + res.stderr


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "bad name/x", "user/--x", "user/x..y", "user/x.git", "u/" + "x" * 97])
def test_invalid_repo_name(export_dir, repo):
    assert "invalid repo name" in error_line(run_cli("publish", str(export_dir), "--repo", repo, "--dry-run"))


def test_directory_without_manifest(tmp_path):
    assert "has no manifest.json" in error_line(run_cli("publish", str(tmp_path), "--repo", "me/x", "--dry-run"))


def test_hash_mismatch_is_refused(export_dir):
    with open(export_dir / "QoQ-Med-mini.Q8_0.gguf", "r+b") as fh:
        fh.seek(10)
        fh.write(b"\x01")  # same size, different content
    err = error_line(run_cli("publish", str(export_dir), "--repo", "me/x", "--dry-run"))
    assert "does not match its sha256" in err


def test_a_file_over_the_hubs_limit_is_refused_before_hashing(export_dir):
    """The Hub takes files of at most 50 GB (its storage docs); a 32B F16 GGUF is about 65. A sparse
    file of that size (no disk used) stands in: the plan must stop on its size, in one line, without
    reading it (its recorded sha256 is of other bytes, so hashing first would fail differently)."""
    f16 = export_dir / "QoQ-Med-32B.F16.gguf"
    with open(f16, "wb") as fh:
        fh.truncate(65_500_000_000)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    manifest["files"].append({"path": f16.name, "bytes": 65_500_000_000, "sha256": "0" * 64} | _kind(f16.name))
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    err = error_line(run_cli("publish", str(export_dir), "--repo", "me/x", "--dry-run"))
    assert "QoQ-Med-32B.F16.gguf is 65.5 GB and the Hub takes files of at most 50 GB" in err
    assert "export again with --split-max-size 48G" in err and "or leave F16 out of --quant" in err


def test_no_token_is_refused_before_any_upload(export_dir, tmp_path):
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "empty-home"), "HF_TOKEN_PATH": str(tmp_path / "none")}
    assert "no Hugging Face token" in error_line(run_cli("publish", str(export_dir), "--repo", "me/x", env=env))
    dry = run_cli("publish", str(export_dir), "--repo", "me/x", "--dry-run", env=env)  # says so beforehand
    assert dry.returncode == 0 and "note: the upload would stop here: no Hugging Face token" in dry.stdout


def _content(source) -> bytes:
    """What an upload operation carries: a path, bytes or a binary file object."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Path(source).read_bytes()
    return source.read()


class RecordingApi:
    """Stands in for HfApi at the network boundary: records the operations it is asked to perform.
    ``existing``: the repo's state as huggingface_hub's own ModelInfo (None: the Hub answers 404)."""

    def __init__(self, existing=None):
        self.calls = []
        self.existing = existing

    def repo_info(self, repo_id, **kw):
        if self.existing is None:
            import httpx2
            from huggingface_hub.errors import RepositoryNotFoundError

            response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)
        return self.existing

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        from huggingface_hub import CommitOperationAdd

        self.calls.append(("create_commit", repo_id, [op.path_in_repo for op in operations], kw))
        self.sent = {op.path_in_repo: _content(op.path_or_fileobj) for op in operations
                     if isinstance(op, CommitOperationAdd)}  # the bytes, as the Hub gets them  # fmt: skip
        self.deleted = [op.path_in_repo for op in operations if not isinstance(op, CommitOperationAdd)]
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


def test_upload_sends_the_plan_through_hfapi_and_never_writes_the_token(export_dir):
    plan = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF", private=True)
    api = RecordingApi()
    upload(plan, SECRET, api=api)
    (kind, repo, kw), (kind2, repo2, paths, kw2) = api.calls
    assert (kind, repo, kw["private"], kw["token"]) == ("create_repo", "me/QoQ-Med-mini-GGUF", True, SECRET)
    assert paths == [f.path for f in plan.files] + ["README.md"]
    assert kw2["token"] == SECRET
    # the generated card, not the export's own README; every listed file as the manifest hashed it
    assert api.sent["README.md"] == plan.card.encode()
    listed = {f["path"]: f["sha256"] for f in json.loads((export_dir / "manifest.json").read_text())["files"]}
    for path in paths[:-2]:
        assert hashlib.sha256(api.sent[path]).hexdigest() == listed[path], path
    # a download of the repo checks out whole (the uploaded manifest listed the export's README.md,
    # which the card replaces: `info --verify` failed on every download)
    download = export_dir.parent / "download"
    download.mkdir()
    for path, data in api.sent.items():
        (download / path).write_bytes(data)
    shipped = json.loads(api.sent["manifest.json"])
    assert integrity.problems(download, shipped) == [] and integrity.unlisted(download, shipped) == []
    assert {f["path"] for f in shipped["files"]} == set(listed) - {"README.md"}
    assert (f"| `manifest.json` | manifest | – | {len(api.sent['manifest.json']):,} | "
            f"`{hashlib.sha256(api.sent['manifest.json']).hexdigest()}` |") in plan.card  # fmt: skip
    for f in export_dir.rglob("*"):
        assert SECRET.encode() not in f.read_bytes()
    assert SECRET not in plan.card and SECRET not in plan.describe()


def test_an_upload_that_fails_outside_http_is_one_line(export_dir):
    """Only the Hub's HTTP errors were one line: a listed file gone between the plan and the commit
    (huggingface_hub's own ValueError), or a Xet transfer's error, was a traceback after the repo had
    been made, without the line saying it exists now."""
    plan = plan_upload(export_dir, "me/x")
    (export_dir / "mmproj-QoQ-Med-mini-f16.gguf").unlink()
    api = RecordingApi()
    with pytest.raises(QoqoptError) as err:
        upload(plan, SECRET, api=api)
    assert str(err.value).startswith("upload to me/x failed: ") and "mmproj-QoQ-Med-mini-f16.gguf" in str(err.value)
    assert str(err.value).endswith("; no file was committed (me/x exists, without this build)") and "\n" not in str(err.value)
    assert [call[0] for call in api.calls] == ["create_repo"]


def test_a_gguf_card_says_what_each_file_is_and_how_the_k_quants_were_calibrated(export_dir):
    """The card replaces the export's README, whose file table (kind, quant type) and imatrix line
    the card dropped: its Files table listed `*.imatrix.gguf` with nothing to say what it was, and
    nothing said the K-quants were calibrated on clinical chats."""
    m = json.loads((export_dir / "manifest.json").read_text())
    data = b"GGUF imatrix"
    (export_dir / "m.imatrix.gguf").write_bytes(data)
    m["files"].append({"path": "m.imatrix.gguf", "kind": "imatrix", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    m["imatrix"] = {"file": "m.imatrix.gguf", "source": "calibrated", "datasets": ["qoqopt clinical calib split (seed 0): 64 chats"]}
    (export_dir / "manifest.json").write_text(json.dumps(m))
    card = plan_upload(export_dir, "me/x").card
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:4]]
            for line in card.split("## Files")[1].split("\n## ")[0].splitlines() if line.startswith("| `")}  # fmt: skip
    assert rows == {"QoQ-Med-mini.Q8_0.gguf": ["text", "Q8_0"], "mmproj-QoQ-Med-mini-f16.gguf": ["mmproj", "–"],
                    "m.imatrix.gguf": ["imatrix", "–"], "manifest.json": ["manifest", "–"]}  # fmt: skip
    assert ("quantized with an importance matrix (calibrated; qoqopt clinical calib split (seed 0): 64 chats), "
            "shipped as `m.imatrix.gguf`.") in card  # fmt: skip


def test_plan_refuses_missing_listed_file(export_dir):
    (export_dir / "mmproj-QoQ-Med-mini-f16.gguf").unlink()
    with pytest.raises(QoqoptError, match="missing"):
        plan_upload(export_dir, "me/x")


@pytest.mark.parametrize("listed", ["/etc/hostname", "../outside.txt", "sub/../../outside.txt", ""])
def test_manifest_cannot_name_files_outside_the_build(export_dir, listed, capsys):
    """A manifest is data from wherever the build came from: it must not make publish upload (and list
    in the card) a file outside the build, even one whose sha256 it records correctly."""
    outside = export_dir.parent / "outside.txt"
    outside.write_text("not part of the build")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    digest = hashlib.sha256((outside if listed else export_dir / "README.md").read_bytes()).hexdigest()
    manifest["files"].append({"path": listed, "bytes": 21, "sha256": digest})
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    err = refused(["publish", export_dir, "--repo", "me/x", "--dry-run"], capsys)
    assert err.endswith(f"lists {listed!r}: every file must be a relative path inside the build")


@pytest.mark.parametrize("body", ["[]", '{"files": {"a": 1}}', '{"files": ["a.gguf"]}'])
def test_manifest_of_the_wrong_shape_is_one_line(export_dir, body, capsys):
    (export_dir / "manifest.json").write_text(body)
    for argv in (["publish", export_dir, "--repo", "me/x", "--dry-run"],
                 ["ask", export_dir, "--item", "ct-abd-pancreas.region_ct.eval-0"]):  # fmt: skip
        assert "manifest.json" in refused(argv, capsys)


def test_entry_without_sha256_says_so(export_dir, capsys):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    del manifest["files"][0]["sha256"]
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    err = refused(["publish", export_dir, "--repo", "me/x", "--dry-run"], capsys)
    assert err == "error: manifest.json records no sha256 for QoQ-Med-mini.Q8_0.gguf: re-export to publish it"


def test_format_and_results_are_checked(export_dir, tmp_path, capsys):
    """A manifest that declares no qoqopt build format, and --results that is not the report's Markdown
    (its folder, or a bench JSON, which used to be pasted raw into the card), are one line each."""
    bench_json = tmp_path / "bench.json"
    bench_json.write_text("{}")
    latin1 = tmp_path / "report.md"
    latin1.write_bytes("| variant |\n| Kontrast ä |\n".encode("latin-1"))
    for results, message in ((tmp_path, "is a directory; give the report.md"),
                             (bench_json, "give the report.md of `qoqopt report`, not its inputs"),
                             (latin1, "report.md: not UTF-8 text (byte 23); give the report.md")):  # fmt: skip
        assert message in refused(["publish", export_dir, "--repo", "me/x", "--results", results, "--dry-run"], capsys)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    (export_dir / "manifest.json").write_text(json.dumps({**manifest, "format": "onnx"}))
    err = refused(["publish", export_dir, "--repo", "me/x", "--dry-run"], capsys)
    assert err.endswith("format 'onnx' is not a qoqopt build (gguf, gptq, awq)")


def _measured(name: str, sha: str, kld: float, **extra) -> dict:
    return {"name": name, "status": "ok", "runtime": "llama.cpp", "size_bytes": 60_000_000,
            "files": [{"path": f"b/{name}.gguf", "sha256": sha * 32}, {"path": "b/mmproj.gguf", "sha256": "ee" * 32}],
            "drift": {"all": {"mean_kld": kld}, "ct": {"mean_kld": kld}}, "speed": {"decode_tok_s": 50.0, "spread": {}}} | extra  # fmt: skip


def test_card_carries_only_this_builds_rows():
    """Only rows measured on this build's own files reach its card: a report also holding another
    build of the same types (Q4_K_M, Q5_K_M from `gg`) put their numbers on a Q6_K + Q8_0 build's
    card, with no Q6_K row. The reference stays for scale; other formats, plots and the report's
    title go; the build's quants with no row are named."""
    from qoqopt.publish import tables_for_build
    from qoqopt.report import SCHEMA, render_markdown

    ref = {"name": "reference", "status": "ok", "runtime": "transformers", "size_bytes": 160_000_000,
           "files": [{"path": "mini/model.safetensors", "sha256": "00" * 32}], "drift": {"all": {"accuracy": 0.6}}}  # fmt: skip
    variants = [ref, _measured("gguf:Q4_K_M", "aa", 1e-4), _measured("gguf:Q8_0", "cc", 1e-6),
                _measured("gptq:4", "dd", 3e-5), {"name": "gguf:Q5_K_M", "status": "failed", "error": "x", "files": []}]  # fmt: skip
    run = {"schema": SCHEMA, "run": {"machine": {"label": "cpu"}}, "variants": variants}
    report = render_markdown([run], {"Drift against file size": "drift_vs_size.png"})
    card, measured = tables_for_build(report, "gguf", {"cc" * 32, "ee" * 32, "ff" * 32})
    assert measured == {"gguf:Q8_0"}
    assert "| gguf:Q8_0 |" in card and "| cpu | gguf:Q8_0 |" in card and "| reference |" in card
    assert "Q4_K_M" not in card and "Q5_K_M" not in card and "gptq:4" not in card
    assert "![" not in card and "## Plots" not in card and "# qoqopt report" not in card
    assert "| variant | size MB | mean KLD |" in card and "qoqopt-files" not in card
    assert "★ Pareto-optimal: no other build the report measured (some are not shown here) is both smaller" in card
    _, measured = tables_for_build(report, "gguf", {"aa" * 32, "ee" * 32})
    assert measured == {"gguf:Q4_K_M"}
    with pytest.raises(QoqoptError, match="does not record which files it measured"):
        tables_for_build("| variant | size MB |\n|---|---|\n| gguf:Q8_0 | 1 |", "gguf", set())


def test_rows_are_matched_by_name_and_scale_rows_by_run():
    """A report edited by hand (rows reordered or deleted, the hidden record damaged) is refused: rows
    were matched to their files by position, so a swap put another build's row on the card. In the
    speed table, a bf16 row stays only from the runs that measured this build (another model's bf16
    was kept)."""
    from qoqopt.publish import tables_for_build
    from qoqopt.report import SCHEMA, render_markdown

    def run(label, ref_sha, *variants):
        ref = {"name": "reference", "status": "ok", "size_bytes": 1, "drift": {"all": {}},
               "files": [{"sha256": ref_sha * 32}]}  # fmt: skip
        return {"schema": SCHEMA, "run": {"machine": {"label": label}}, "variants": [ref, *variants]}

    now = {"spread": {}, "prefill": "prompt pass"}  # as bench writes speed now
    bf16 = {"name": "bf16", "status": "ok", "size_bytes": 2, "runtime": "transformers", "speed": {"decode_tok_s": 9.0, **now}}
    ours = run("ours", "01", _measured("gguf:Q8_0", "cc", 1e-6), bf16 | {"speed": {"decode_tok_s": 1.0, **now}})
    other = run("other", "02", _measured("gguf:Q4_K_M", "aa", 1e-4), bf16)
    report = render_markdown([ours, other])
    card, measured = tables_for_build(report, "gguf", {"cc" * 32, "ee" * 32})
    speed = card.split("## Speed per machine")[1].split("\n## ")[0]
    assert measured == {"gguf:Q8_0"} and "| ours | bf16 |" in speed and "| other | bf16 |" not in speed
    lines = report.splitlines()
    q8, q4 = (next(i for i, ln in enumerate(lines) if ln.startswith(f"| {n} |")) for n in ("gguf:Q8_0", "gguf:Q4_K_M"))
    swapped = lines.copy()
    table = next(i for i, ln in enumerate(lines) if ln.startswith("| ours | gguf"))  # the speed rows of run "ours"
    swapped[table], swapped[table + 1] = lines[table + 1], lines[table]
    damaged = report.replace("<!-- qoqopt-files [", "<!-- qoqopt-files [{", 1)
    for edited in ("\n".join(swapped), damaged, report.replace(lines[q8] + "\n", "", 1)):
        with pytest.raises(QoqoptError, match=r"^--results: report.md's rows do not match the files it records"):
            tables_for_build(edited, "gguf", {"cc" * 32, "ee" * 32})
    assert q4 != q8


def test_a_report_of_other_builds_is_refused_and_unmeasured_quants_named(export_dir, tmp_path, capsys):
    from qoqopt.report import SCHEMA, render_markdown

    manifest = json.loads((export_dir / "manifest.json").read_text())
    text = next(f for f in manifest["files"] if f.get("kind") == "text")
    ref = {"name": "reference", "status": "ok", "size_bytes": 1, "drift": {"all": {}}}
    run = {"schema": SCHEMA, "run": {"machine": {"label": "cpu"}}, "variants": [ref, _measured("gguf:Q4_K_M", "aa", 1e-4)]}
    (tmp_path / "report.md").write_text(render_markdown([run]))
    argv = ["publish", export_dir, "--repo", "me/x", "--results", tmp_path / "report.md", "--dry-run"]
    assert refused(argv, capsys) == ("error: --results: the report measured none of this build's files (its gguf rows "
                                     "are of other builds); bench this build and run `qoqopt report` on that")  # fmt: skip
    run["variants"].append(_measured("gguf:" + text["quant"], "aa", 1e-6) | {"files": [{"sha256": text["sha256"]}]})
    _add_listed_files(export_dir, ["QoQ-Med-mini.Q6_K.gguf"])
    (tmp_path / "report.md").write_text(render_markdown([run]))
    card = plan_upload(export_dir, "me/x", results=tmp_path / "report.md").card
    assert f"| gguf:{text['quant']} |" in card and "| gguf:Q4_K_M |" not in card
    assert "Not measured in these results: gguf:Q6_K." in card
    # the report's sections sit one level under the card's own heading, which names what they hold
    evidence = card.split("\n## Evidence: drift and speed\n", 1)[1].split("\n## ", 1)[0]
    assert "\n### Drift against the reference" in evidence and "\n### Speed per machine" in evidence
    for v in run["variants"]:
        v.pop("speed", None)  # as `bench --no-speed` writes them
    (tmp_path / "report.md").write_text(render_markdown([run]))
    card = plan_upload(export_dir, "me/x", results=tmp_path / "report.md").card
    assert "\n## Evidence: drift\n" in card and "### Speed" not in card


def test_local_source_needs_base_model(export_dir, tmp_path):
    """A build of a local folder names no Hub base model: the upload is refused up front; a dry run
    (the --help examples, on the mini model) shows the plan and a card with a placeholder, and says
    why the upload would stop."""
    m = json.loads((export_dir / "manifest.json").read_text())
    m["source"]["model"] = str(tmp_path / "mini")
    (tmp_path / "mini").mkdir()
    (export_dir / "manifest.json").write_text(json.dumps(m))
    listed = export_dir / m["files"][0]["path"]  # changed after export: the refusal comes before any file is hashed
    listed.write_bytes(listed.read_bytes()[::-1])
    m["source"]["revision"] = None  # as export records a local folder
    (export_dir / "manifest.json").write_text(json.dumps(m))
    line = error_line(run_cli("publish", str(export_dir), "--repo", "me/x"))
    assert line == (f"error: the build was exported from {str(tmp_path / 'mini')!r}, a local folder, not a Hub repo; "
                    "pass --base-model owner/name (the repo the weights come from)")  # fmt: skip
    listed.write_bytes(listed.read_bytes()[::-1])
    dry = run_cli("publish", str(export_dir), "--repo", "me/x", "--dry-run")
    assert dry.returncode == 1 and "base_model: OWNER/BASE-MODEL" in dry.stdout  # a preflight fails
    assert f"note: the upload would stop here: {line.removeprefix('error: ')} (the card above shows OWNER/BASE-MODEL)" in dry.stdout
    assert "--base-model is not" in error_line(run_cli("publish", str(export_dir), "--repo", "me/x", "--base-model", "./mini"))
    res = run_cli("publish", str(export_dir), "--repo", "me/x", "--dry-run", "--base-model", "ddvd233/QoQ-Med-VL-7B")
    assert res.returncode == 0 and "base_model: ddvd233/QoQ-Med-VL-7B" in res.stdout


def test_a_local_source_is_told_by_its_missing_commit_not_by_where_publish_runs(export_dir, tmp_path, monkeypatch, capsys):
    """`export rev/mini` run from /tmp recorded the folder as typed; published from anywhere else,
    `rev/mini` passed for a Hub id (no such folder there) and became the card's base_model, and the
    uploaded manifest kept it. A folder in the current directory named like the Hub repo made the
    Hub id itself look local. A manifest naming no source got QoQ-Med-VL-7B (MIT) as its base, and a
    --base-model other than the recorded Hub source was taken without a word."""
    from huggingface_hub import ModelCard

    m = json.loads((export_dir / "manifest.json").read_text())
    monkeypatch.chdir(tmp_path)
    for source, said in (({"model": "rev/mini", "revision": None}, "exported from 'rev/mini', a local folder"),
                         ({"revision": None}, "manifest.json names no source model")):
        (export_dir / "manifest.json").write_text(json.dumps({**m, "source": source}))
        assert said in refused(["publish", export_dir, "--repo", "me/x"], capsys)
        shipped = json.loads(plan_upload(export_dir, "me/x", base_model="ddvd233/QoQ-Med-VL-7B").manifest_text)
        assert shipped["source"]["model"] == "ddvd233/QoQ-Med-VL-7B"
    (tmp_path / "ddvd233" / "QoQ-Med-VL-7B").mkdir(parents=True)  # a folder named like the repo, here
    (export_dir / "manifest.json").write_text(json.dumps(m))
    assert ModelCard(plan_upload(export_dir, "me/x").card).data.base_model == "ddvd233/QoQ-Med-VL-7B"
    assert refused(["publish", export_dir, "--repo", "me/x", "--base-model", "Qwen/Qwen2.5-VL-7B-Instruct"], capsys) == (
        f"error: --base-model Qwen/Qwen2.5-VL-7B-Instruct: the build was exported from ddvd233/QoQ-Med-VL-7B at "
        f"revision {COMMIT[:12]}, which its card names; leave --base-model out")  # fmt: skip


def test_a_text_only_gguf_and_another_base_are_carded_as_what_they_are(export_dir):
    """A GGUF built with `--mmproj-type none` reads text only: its card said image-text-to-text, tagged
    it multimodal and sent users to llama-mtmd-cli, which stops without an mmproj. A build of another
    Qwen2.5-VL (the --help's own example) was tagged and described as a clinical QoQ-Med."""
    from huggingface_hub import ModelCard

    from qoqopt.publish import card_metadata

    m = json.loads((export_dir / "manifest.json").read_text())
    text_only = {**m, "files": [e for e in m["files"] if e["kind"] != "mmproj"]}
    data = ModelCard(f"---\n{card_metadata(text_only).to_yaml()}\n---\n").data
    assert data.pipeline_tag == "text-generation" and "multimodal" not in data.tags and "medical" in data.tags
    data = ModelCard(f"---\n{card_metadata(m).to_yaml()}\n---\n").data
    assert data.pipeline_tag == "image-text-to-text" and "multimodal" in data.tags
    qwen = {**m, "source": {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": COMMIT}}
    data = ModelCard(f"---\n{card_metadata(qwen, license=CardLicense('apache-2.0')).to_yaml()}\n---\n").data
    assert not {"qoq-med", "medical", "clinical", "radiology"} & set(data.tags) and "qwen2.5-vl" in data.tags
    (export_dir / "manifest.json").write_text(json.dumps(text_only))
    card = plan_upload(export_dir, "me/x").card
    assert "llama-mtmd-cli" not in card and "llama-cli -hf me/x:Q8_0" in card


def test_legacy_gguf_manifest_key_is_read(export_dir):
    """GGUF manifests from before 0.1.1 named files under "file"; they still verify and publish."""
    m = json.loads((export_dir / "manifest.json").read_text())
    m["files"] = [{"file" if k == "path" else k: v for k, v in e.items()} for e in m["files"]]
    (export_dir / "manifest.json").write_text(json.dumps(m))
    plan = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF")
    assert [f.path for f in plan.files][:2] == ["QoQ-Med-mini.Q8_0.gguf", "mmproj-QoQ-Med-mini-f16.gguf"]


def _gguf_build(d, hidden: int, layers: int) -> None:
    """A GGUF build whose text file's header (written by gguf-py) says `hidden` and `layers`."""
    import gguf

    d.mkdir()
    w = gguf.GGUFWriter(str(d / "m.Q8_0.gguf"), "qwen2vl")
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (d / "m.Q8_0.gguf").read_bytes()
    entry = {"path": "m.Q8_0.gguf", "kind": "text", "quant": "Q8_0", "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    (d / "manifest.json").write_text(json.dumps({"format": "gguf", "source": {"model": "/local/dir"}, "files": [entry]}))


def test_base_model_must_be_the_builds_shape(fixture_7b, tiny_dir, tmp_path, monkeypatch, capsys):
    """--base-model is checked against the build when the base's config can be read (here from an
    offline Hub cache): the real 7B's language model (3584 wide, 28 layers) is not the mini GGUF
    build's (gguf-py header) nor the mini GPTQ-shaped build's (config.json); the mini base is; a
    base that is not cached is a note, not a refusal."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    cache_as_hub_repo(hub, "ddvd233/QoQ-Med-VL-7B", list(fixture_7b.glob("*.json")))
    cache_as_hub_repo(hub, "me/tiny", list(tiny_dir.glob("*.json")))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    cache_as_hub_repo(hub, "someone/llama", [tmp_path / "llama" / "config.json"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    tiny = json.loads((tiny_dir / "config.json").read_text())
    text = tiny.get("text_config", tiny)
    _gguf_build(tmp_path / "gguf", text["hidden_size"], text["num_hidden_layers"])
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps(tiny))
    cfg = (gptq / "config.json").read_bytes()
    entry = {"path": "config.json", "bytes": len(cfg), "sha256": hashlib.sha256(cfg).hexdigest()}
    (gptq / "manifest.json").write_text(json.dumps({"format": "gptq", "source": {"model": "/local"}, "files": [entry]}))
    for build in (tmp_path / "gguf", gptq):
        argv = ["publish", build, "--repo", "me/x", "--dry-run", "--base-model"]
        err = refused([*argv, "ddvd233/QoQ-Med-VL-7B"], capsys)
        assert (f"has a language model of hidden size 3584 with 28 layers; this build's has {text['hidden_size']} "
                f"with {text['num_hidden_layers']}: it was not quantized from ddvd233/QoQ-Med-VL-7B") in err, err  # fmt: skip
        assert "--base-model someone/llama is not a Qwen2.5-VL checkpoint" in refused([*argv, "someone/llama"], capsys)
        plan = plan_upload(build, "me/x", base_model="me/tiny", license=CardLicense("apache-2.0"))
        assert "base_model: me/tiny" in plan.card and not any("not checked" in n for n in plan.notes)
        plan = plan_upload(build, "me/x", base_model="someone/uncached", license=CardLicense("apache-2.0"))
        assert any(n.startswith("--base-model someone/uncached not checked against the build") for n in plan.notes)


def test_only_a_readme_the_manifest_lists_speaks_on_the_card(export_dir):
    """The export's README supplies the card's run instructions only when the manifest lists (and so
    hashes) it: an unlisted README, hand-written or edited, is neither uploaded nor read."""
    readme = export_dir / "README.md"
    readme.write_text("## Run it\n\n    llama-mtmd-cli --run-me-like-this\n")
    plan = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF")
    assert "--run-me-like-this" not in plan.card and any("not in manifest.json" in n for n in plan.notes)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    manifest["files"].append({"path": "README.md", "bytes": readme.stat().st_size,
                              "sha256": hashlib.sha256(readme.read_bytes()).hexdigest()})
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    plan = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF")
    assert "\n\n    llama-mtmd-cli --run-me-like-this" in plan.card  # its indented code block intact
    assert "`llama-mtmd-cli -hf me/QoQ-Med-mini-GGUF:Q8_0` also fetches that quant and its mmproj" in plan.card
    assert "This card takes the place of the export's own README.md, which is not uploaded" in plan.card


@pytest.mark.parametrize("offline", ["1", "0"], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_no_hub_is_one_line_and_never_shows_the_token(export_dir, offline):
    """Without the Hub (offline mode; or an endpoint that refuses the connection) the upload stops in
    one line that names the repo, not a traceback from the HTTP client, and without the token."""
    env = {"HF_TOKEN": SECRET, "HF_HUB_OFFLINE": offline, "HF_ENDPOINT": "http://127.0.0.1:9"}
    res = run_cli("publish", str(export_dir), "--repo", "me/x", env=env)
    assert "me/x" in error_line(res) and SECRET not in res.stdout + res.stderr


def test_a_refusing_hub_is_one_line(export_dir):
    """The Hub answering no (a read-only token: HTTP 403) is said in one line with the status, from
    huggingface_hub's own error type, and the token stays out of it."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    class RefusingApi(RecordingApi):
        def create_commit(self, repo_id, operations, **kw):
            response = httpx2.Response(403, request=httpx2.Request("POST", f"https://huggingface.co/api/models/{repo_id}/commit/main"))
            raise HfHubHTTPError("403 Forbidden: you don't have the rights to create a model under this namespace",
                                 response=response)  # fmt: skip

    with pytest.raises(QoqoptError) as err:
        upload(plan_upload(export_dir, "me/x"), SECRET, api=RefusingApi())
    assert str(err.value) == ("the Hub refused the upload to me/x (HTTP 403): 403 Forbidden: you don't have the rights "
                              "to create a model under this namespace; no file was committed (me/x exists, without "
                              "this build)")  # fmt: skip


def _hub_state(private: bool, files: list[str]):
    """An existing repo as huggingface_hub's ModelInfo holds the Hub's answer."""
    from huggingface_hub.hf_api import ModelInfo

    return ModelInfo(id="me/QoQ-Med-mini-GGUF", private=private, siblings=[{"rfilename": f} for f in files])


def test_a_new_repo_takes_its_owners_default_visibility(export_dir):
    """create_repo(private=False) made every repo public, over an organisation's private-by-default
    setting; huggingface_hub's own meaning of private=None is that default."""
    for private, sent in ((False, None), (True, True)):
        api = RecordingApi()
        upload(plan_upload(export_dir, "me/QoQ-Med-mini-GGUF", private=private), SECRET, api=api)
        assert api.calls[0][0] == "create_repo" and api.calls[0][2]["private"] is sent


def test_an_existing_repo_with_other_files_is_refused_unless_replaced(export_dir):
    """Uploading into a repo adds files and removed none: an earlier build's quant or shard index
    stayed beside the new files, where loaders read it. Refused, naming them; --replace deletes them
    in the upload's own commit (the Hub's .gitattributes stays)."""
    remote = [".gitattributes", "README.md", "QoQ-Med-mini.Q8_0.gguf", "QoQ-Med-mini.Q4_K_M.gguf",
              "model.safetensors.index.json"]
    api = RecordingApi(existing=_hub_state(False, remote))
    with pytest.raises(QoqoptError, match=r"^me/QoQ-Med-mini-GGUF already holds files this build does not: "
                                          r"QoQ-Med-mini.Q4_K_M.gguf, model.safetensors.index.json\. .*--replace"):
        upload(plan_upload(export_dir, "me/QoQ-Med-mini-GGUF"), SECRET, api=api)
    assert api.calls == []  # nothing created, nothing committed
    upload(plan_upload(export_dir, "me/QoQ-Med-mini-GGUF", replace=True), SECRET, api=api)
    assert [c[0] for c in api.calls] == ["create_commit"]  # the repo is there: not created again
    assert api.deleted == ["QoQ-Med-mini.Q4_K_M.gguf", "model.safetensors.index.json"]
    assert set(api.sent) == set(remote) - {".gitattributes", "QoQ-Med-mini.Q4_K_M.gguf", "model.safetensors.index.json"} | {
        "mmproj-QoQ-Med-mini-f16.gguf", "manifest.json"}
    api = RecordingApi(existing=_hub_state(True, [".gitattributes", "README.md"]))  # a rerun of the same build
    upload(plan_upload(export_dir, "me/QoQ-Med-mini-GGUF"), SECRET, api=api)
    assert api.deleted == []


def test_private_is_not_promised_for_an_existing_public_repo(export_dir):
    """create_repo(exist_ok=True) leaves an existing repo's visibility as it is: --private then
    uploaded a clinical build into a public repo without a word."""
    api = RecordingApi(existing=_hub_state(False, [".gitattributes"]))
    with pytest.raises(QoqoptError, match=r"^me/x exists and is public: --private does not change an existing repo"):
        upload(plan_upload(export_dir, "me/x", private=True), SECRET, api=api)
    assert api.calls == []


def test_card_licence_is_the_base_models(export_dir, capsys):
    """QoQ-Med is MIT; a build of another base is under that base's licence, which qoqopt cannot
    know: --license gives it (a Hub licence id), and without one the upload stops. The card's
    metadata is read back by huggingface_hub's ModelCard."""
    from huggingface_hub import ModelCard

    assert ModelCard(plan_upload(export_dir, "me/x").card).data.license == "mit"
    m = json.loads((export_dir / "manifest.json").read_text())
    m["source"] = {"model": "/home/me/qwen-vl", "revision": None}  # a local folder: --base-model names its base
    (export_dir / "manifest.json").write_text(json.dumps(m))
    other = ["publish", export_dir, "--repo", "me/x", "--base-model", "Qwen/Qwen2.5-VL-7B-Instruct"]
    assert "the card needs Qwen/Qwen2.5-VL-7B-Instruct's licence" in refused([*other], capsys)
    res = run_cli(*map(str, other), "--dry-run", env={"HF_TOKEN": SECRET})
    assert res.returncode == 1 and "license: other" in res.stdout and "pass --license" in res.stdout
    plan = plan_upload(export_dir, "me/x", base_model="Qwen/Qwen2.5-VL-7B-Instruct", license=CardLicense("apache-2.0"))
    assert ModelCard(plan.card).data.license == "apache-2.0"
    assert "is not one of the Hub's licence ids" in refused([*other, "--license", "apache2"], capsys)
    # a licence the Hub has no id for (Qwen2.5-VL-3B's): `other`, with its name and link on the card
    link = "https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/LICENSE"
    res = run_cli(*map(str, other), "--dry-run", "--license", "other", "--license-name", "qwen-research",
                  "--license-link", link, env={"HF_TOKEN": SECRET})  # fmt: skip
    data = ModelCard(res.stdout.split("--- README.md (model card) ---\n")[1].split("dry run:")[0]).data
    assert (data.license, data.license_name, data.license_link) == ("other", "qwen-research", link)
    assert "needs --license-name" in refused([*other, "--license", "other"], capsys)
    # `other` links to its text: without --license-link the card pointed nowhere, unless the build ships it
    assert "needs --license-link" in refused([*other, "--license", "other", "--license-name", "qwen-research"], capsys)
    # ids the Hub added after its first list (hub-docs repositories-licenses.md): refused before
    for hub_id in ("llama4", "eupl-1.2", "apple-ascl", "openmdw-1.1"):
        assert checked_license(hub_id) == CardLicense(hub_id)
    assert "go with --license other" in refused([*other, "--license", "mit", "--license-name", "x"], capsys)


def test_files_the_manifest_does_not_list_are_named(export_dir):
    """A quant copied into the folder by hand is not uploaded (only listed files are verified):
    the plan says so instead of dropping it unsaid."""
    (export_dir / "QoQ-Med-mini.F16.gguf").write_bytes(b"GGUF")
    (export_dir / "notes.txt").write_text("x")
    plan = plan_upload(export_dir, "me/x")
    assert "note      not in manifest.json, so not uploaded: QoQ-Med-mini.F16.gguf, notes.txt" in plan.describe()
    assert "QoQ-Med-mini.F16.gguf" not in [f.path for f in plan.files]


def _run_measuring(export_dir, label: str, ref_sha: str, source: str) -> dict:
    """A bench run of this build's text GGUF against a reference read from ``source``."""
    from qoqopt.report import SCHEMA

    text = next(f for f in json.loads((export_dir / "manifest.json").read_text())["files"] if f.get("kind") == "text")
    ref = {"name": "reference", "status": "ok", "size_bytes": 1, "drift": {"all": {}}, "files": [{"sha256": ref_sha * 32}]}
    ours = _measured("gguf:" + text["quant"], "aa", 1e-6) | {"files": [{"sha256": text["sha256"]}]}
    return {"schema": SCHEMA, "run": {"machine": {"label": label}, "model": {"source": source}}, "variants": [ref, ours]}


def test_local_paths_stay_home(export_dir, tmp_path):
    """The uploaded manifest named the folder the build was made from (a user name, a project), and a
    report's reference line did too on the card: both now name the base model or the original."""
    from qoqopt.report import render_markdown

    m = json.loads((export_dir / "manifest.json").read_text())
    local = str(tmp_path / "home" / "alice" / "qoq-7b")
    m["source"]["model"] = local
    (export_dir / "manifest.json").write_text(json.dumps(m))
    runs = [_run_measuring(export_dir, machine, ref, source) for machine, ref, source in
            (("a", "01", local), ("b", "02", local + "-other"))]  # two references: the report names each  # fmt: skip
    for run, source in zip(runs, (str(tmp_path / "home" / "alice" / "ward3" / "set.jsonl"), "a user /home/alice/ward3.jsonl")):
        run["run"]["eval"] = {"source": source, "items": 5}  # a user's eval set, by the path bench was given
    (tmp_path / "report.md").write_text(render_markdown(runs))
    assert local in (tmp_path / "report.md").read_text()
    plan = plan_upload(export_dir, "me/x", base_model="ddvd233/QoQ-Med-VL-7B", results=tmp_path / "report.md")
    assert local not in plan.manifest_text and local not in plan.card and "Reference: the original model" in plan.card
    assert "alice" not in plan.card and "ward3" not in plan.card and "eval set `a user JSONL set`" in plan.card
    assert json.loads(plan.manifest_text)["source"]["model"] == "ddvd233/QoQ-Med-VL-7B"
    assert any(n.startswith(f"manifest.json names the local folder {local}") for n in plan.notes)
    m["name"], m["source"]["model"] = "qoq-7b", local + "/"  # export's default: the folder's own name, in every file name
    (export_dir / "manifest.json").write_text(json.dumps(m))
    notes = plan_upload(export_dir, "me/x", base_model="ddvd233/QoQ-Med-VL-7B").notes
    assert "the build's file names and GGUF general.name are 'qoq-7b', the name of that folder; `qoqopt export --name` chooses another" in notes
    # a relative folder has a repo id's shape, whether or not it exists where publish runs: a reference
    # stays named only where it is the Hub repo the build was exported from
    from qoqopt.publish import without_local_paths

    md = "Reference: `runs/DOE_JOHN` (bfloat16).\nReference: `ddvd233/QoQ-Med-VL-7B` (bfloat16)."
    assert without_local_paths(md, "ddvd233/QoQ-Med-VL-7B") == (
        "Reference: the original model (bfloat16).\nReference: `ddvd233/QoQ-Med-VL-7B` (bfloat16).")
    assert without_local_paths(md, None).count("Reference: the original model") == 2


def test_a_dry_run_looks_at_the_target_repo(export_dir):
    """A dry run said the upload would go ahead where the real one then refused (stale files, a public
    repo and --private), and never listed what --replace deletes. It asks the Hub as the upload does;
    offline, it says the repo was not looked up."""
    from qoqopt.publish import preflight

    plan = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF")
    assert preflight(plan, SECRET, RecordingApi()) == (["me/QoQ-Med-mini-GGUF does not exist yet: the upload creates it"], [])
    old = _hub_state(False, [".gitattributes", "QoQ-Med-mini.Q4_K_M.gguf"])
    notes, stops = preflight(plan, SECRET, RecordingApi(existing=old))
    assert notes == ["me/QoQ-Med-mini-GGUF exists (public): the upload adds a commit to it"]
    assert stops and stops[0].startswith("me/QoQ-Med-mini-GGUF already holds files this build does not: QoQ-Med-mini.Q4_K_M.gguf")
    replace = plan_upload(export_dir, "me/QoQ-Med-mini-GGUF", replace=True, private=True)
    notes, stops = preflight(replace, SECRET, RecordingApi(existing=old))
    assert notes[1] == "--replace deletes from it, in the same commit: QoQ-Med-mini.Q4_K_M.gguf"
    assert stops == ["me/QoQ-Med-mini-GGUF exists and is public: --private does not change an existing repo; make it "
                     "private in its settings on the Hub first, or publish to a new repo"]  # fmt: skip
    res = run_cli("publish", str(export_dir), "--repo", "me/x", "--dry-run", env={"HF_TOKEN": SECRET})  # tests: offline
    assert res.returncode == 0 and "note      the repo was not looked up on the Hub (HF_HUB_OFFLINE is set)" in res.stdout


def _write_gguf(path: Path, **strings) -> dict:
    """A GGUF written by gguf-py holding ``strings`` (keys with dots given as __), and its manifest entry."""
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen2vl")
    for key, value in strings.items():
        (w.add_array if isinstance(value, list) else w.add_string)(key.replace("__", "."), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    return {"path": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} | _kind(path.name)


def _local_names_build(d: Path, source: str, datasets: list[str], calibration: str, how: str, trained_in: str) -> None:
    d.mkdir()
    files = [_write_gguf(d / "m.Q4_K_M.gguf", qoqopt__source=source),
             _write_gguf(d / "m.imatrix.gguf", imatrix__datasets=datasets)]  # fmt: skip
    for name, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        (d / name).write_text(json.dumps({key: trained_in}))
        data = (d / name).read_bytes()
        files.append({"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": "gguf", "source": {"model": "ddvd233/QoQ-Med-VL-7B", "revision": COMMIT}, "files": files,
                "imatrix": {"file": "m.imatrix.gguf", "source": how, "datasets": datasets},
                "calibration": {"source": calibration}}  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_local_names_in_the_builds_files_refuse_the_upload(tmp_path, capsys):
    """Files are uploaded byte for byte, so names qoqopt does not write (an older export's GGUF
    source, calibration set and imatrix file name, the `-f` file llama-imatrix records as typed,
    relative or with spaces and commas, a config's `_name_or_path` from a fine-tune's output folder)
    refuse the upload unless --allow-local-names. Written by gguf-py and read back as the upload
    would send them. What this qoqopt writes (a Hub id, a local checkpoint, a set by its sha256, the
    clinical split's counts, a given file's datasets left out) is not refused."""
    from qoqopt.local_names import GIVEN_DATASET, recorded_local_names

    build = tmp_path / "old"
    datasets = ["wiki.train.raw", "/Users/dr/Patient Data/Smith, John (MRN 4455)/calib.txt"]
    _local_names_build(build, "/home/alice/DOE_JOHN_MRN12345", datasets, "/home/alice/DOE_JOHN_MRN12345.jsonl",
                       "read from DOE_JOHN.imatrix.gguf", "/home/drsmith/ft_SMITH/checkpoint-500")  # fmt: skip
    named = ["manifest.json calibration.source: /home/alice/DOE_JOHN_MRN12345.jsonl",
             "manifest.json imatrix.source: read from DOE_JOHN.imatrix.gguf",
             *(f"manifest.json imatrix.datasets: {d}" for d in datasets),
             "m.Q4_K_M.gguf qoqopt.source: /home/alice/DOE_JOHN_MRN12345",
             *(f"m.imatrix.gguf imatrix.datasets: {d}" for d in datasets),
             "config.json _name_or_path: /home/drsmith/ft_SMITH/checkpoint-500",
             "tokenizer_config.json name_or_path: /home/drsmith/ft_SMITH/checkpoint-500"]  # fmt: skip
    assert recorded_local_names(build, json.loads((build / "manifest.json").read_text())) == named
    with pytest.raises(QoqoptError, match="--allow-local-names") as err:
        plan_upload(build, "me/x")
    assert f"({', '.join(named[:3])} and 6 more)" in str(err.value)
    assert refused(["publish", build, "--repo", "me/x"], capsys) == f"error: {err.value}"
    plan = plan_upload(build, "me/x", dry_run=True)
    assert [s for s in plan.stops if "--allow-local-names" in s] == [str(err.value)]
    kept = plan_upload(build, "me/x", allow_local_names=True)
    assert f"uploaded as they are (--allow-local-names): {', '.join(named[:5])} and 4 more" in kept.notes and not kept.stops
    assert "Smith, John (MRN 4455)" in (build / "m.imatrix.gguf").read_bytes().decode("latin-1")  # sent as it is

    now = tmp_path / "new"
    clinical = "qoqopt clinical calib split (seed 0): 64 chats, 15130 tokens (7261 image tokens); domains: ct 15, mri 16"
    own = [clinical, "a user JSONL set (sha256 0123456789ab): 2 chats; image positions weighted 0.5", GIVEN_DATASET]
    for source, how, trained in (("a local checkpoint", "calibrated", "ddvd233/QoQ-Med-VL-7B"),
                                 ("ddvd233/QoQ-Med-VL-7B", "read from an imatrix file (sha256 0123456789ab)", "")):  # fmt: skip
        shutil.rmtree(now, ignore_errors=True)  # "" is what transformers saves for a config made in memory
        _local_names_build(now, source, own, "a user JSONL set (sha256 0123456789ab)", how, trained)
        assert recorded_local_names(now, json.loads((now / "manifest.json").read_text())) == []
        assert not plan_upload(now, "me/x").stops
    # qoqopt's own words with a name after them are not its own words
    tails = ["a user JSONL set (sha256 0123456789ab)/home/a/x.jsonl", GIVEN_DATASET + " /home/a/x",
             "qoqopt clinical calib split (seed 0): /home/a/x"]  # fmt: skip
    shutil.rmtree(now)
    _local_names_build(now, "a local checkpoint", tails, tails[0], "calibrated", "")
    found = recorded_local_names(now, json.loads((now / "manifest.json").read_text()))
    assert found == [f"manifest.json calibration.source: {tails[0]}", *(f"manifest.json imatrix.datasets: {t}" for t in tails),
                     *(f"m.imatrix.gguf imatrix.datasets: {t}" for t in tails)]  # fmt: skip
    # a source shaped like a Hub id is one only where it is the repo the export recorded with its commit:
    # `runs/DOE_JOHN` names a folder whether or not one of that name is where publish runs (it passed
    # wherever none was), and so does any other repo id there; a list too long to read is not vouched for
    (tmp_path / "owner" / "name").mkdir(parents=True)
    long = [f"set {i}" for i in range(65)]
    cwd = os.getcwd()
    for source, trained, where in (("owner/name", "", tmp_path), ("runs/DOE_JOHN", "runs/DOE_JOHN", now.parent),
                                   ("a local checkpoint", "Qwen/Qwen2.5-VL-7B-Instruct", now.parent)):  # fmt: skip
        shutil.rmtree(now)
        _local_names_build(now, source, long, "a user JSONL set (sha256 0123456789ab)", "calibrated", trained)
        manifest = json.loads((now / "manifest.json").read_text())
        manifest["imatrix"]["datasets"] = []
        os.chdir(where)
        try:
            found = recorded_local_names(now, manifest)
        finally:
            os.chdir(cwd)
        named = [f"m.Q4_K_M.gguf qoqopt.source: {source}"] if source != "a local checkpoint" else []
        named += ["m.imatrix.gguf imatrix.datasets: 65 names, not read"]
        named += [f"{f} {key}: {trained}" for f, key in (("config.json", "_name_or_path"),
                                                         ("tokenizer_config.json", "name_or_path")) if trained]  # fmt: skip
        assert found == named, source
    # another repo id in a Hub build's config (an older export kept its fine-tune's base there) is refused
    # too; the repo publish is told is the base (--base-model, for a build made from a local folder) is not
    shutil.rmtree(now)
    _local_names_build(now, "a local checkpoint", [], "a user JSONL set (sha256 0123456789ab)", "calibrated",
                       "Qwen/Qwen2.5-VL-7B-Instruct")  # fmt: skip
    manifest = json.loads((now / "manifest.json").read_text())
    assert recorded_local_names(now, manifest) == ["config.json _name_or_path: Qwen/Qwen2.5-VL-7B-Instruct",
                                                   "tokenizer_config.json name_or_path: Qwen/Qwen2.5-VL-7B-Instruct"]
    manifest["source"] = {"model": "a local checkpoint"}
    assert recorded_local_names(now, manifest, base="Qwen/Qwen2.5-VL-7B-Instruct") == []


def test_a_builds_notes_stay_plain_text_on_the_card(export_dir):
    """A build's manifest notes go on the card; one made elsewhere may hold a new section, HTML or a
    link. As markdown-it-py renders the card, they stay one plain-text bullet each."""
    from markdown_it import MarkdownIt

    m = json.loads((export_dir / "manifest.json").read_text())
    m["notes"] = ["vision left unquantized\n\n## Download\n[the fixed build](https://evil.example) <img src=https://evil.example/t>",
                  "# Heading", "---", "~~~", "1. first", "> quoted", "clear \x1b[2J screen",
                  "* item", "+ item", "***", "1) first", "12. x", "==="]  # each opens a block at a list item's start
    (export_dir / "manifest.json").write_text(json.dumps(m))
    card = plan_upload(export_dir, "me/x").card
    tokens = MarkdownIt("commonmark").parse(card)
    rendered = tokens + [c for t in tokens for c in t.children or []]
    assert "Download" not in [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert not [t for t in rendered if "evil" in str(t.attrs) or (t.type.startswith("html") and "evil" in t.content)]
    inline = [i for i, t in enumerate(tokens) if t.type == "inline"]
    shown = ["".join(c.content for c in tokens[i].children) for i in inline]  # each as rendered text
    first = shown.index("vision left unquantized ## Download [the fixed build](https://evil.example) <img src=https://evil.example/t>")
    assert shown[first + 1:first + 13] == ["# Heading", "---", "~~~", "1. first", "> quoted", "clear \\x1b[2J screen",
                                           "* item", "+ item", "***", "1) first", "12. x", "==="]  # fmt: skip
    for i in inline[first:first + 13]:  # one plain item each: nothing opened a heading, rule, fence, quote or list
        assert [tokens[i - 2].type, tokens[i - 1].type] == ["list_item_open", "paragraph_open"], tokens[i].content
    assert "\x1b" not in card
    assert "- vision left unquantized ## Download \\[the fixed build\\](https://evil.example) \\<img" in card


def test_a_builds_source_licence_text_goes_with_it(tiny_dir, tmp_path):
    """Apache-2.0 (4a) and MIT ask that the licence text go with every copy, and the Hub's `license:
    other` points to a LICENSE file in the repo; no build carried one. A source's LICENSE (and NOTICE)
    is copied into a GGUF build and a GPTQ/AWQ build, listed and hashed in the manifest, checked by
    `info --verify` and uploaded by publish."""
    from qoqopt.exports.gguf_export import GGUFOptions, export_gguf
    from qoqopt.exports.hf_quant import _copy_support_files

    source = tmp_path / "src"
    shutil.copytree(tiny_dir, source)
    text = "Apache License\nVersion 2.0, January 2004\n"
    (source / "LICENSE").write_text(text)
    (source / "NOTICE").write_text("Copyright the authors\n")
    out = tmp_path / "gguf"
    export_gguf(str(source), out, GGUFOptions(quants=["F16"], imatrix="none", mmproj_type="none", progress=False),
                log=lambda s: None)  # fmt: skip
    assert (out / "LICENSE").read_text() == text
    kinds = {f["path"]: f.get("kind") for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert kinds["LICENSE"] == kinds["NOTICE"] == "license"
    res = run_cli("info", str(out), "--verify")
    assert res.returncode == 0 and "not in manifest.json" not in res.stdout, res.stdout + res.stderr
    plan = plan_upload(out, "me/x", base_model="Qwen/Qwen2.5-VL-7B-Instruct", license=CardLicense("apache-2.0"))
    assert {"LICENSE", "NOTICE"} <= {f.path for f in plan.files}
    # `license: other` with no --license-link links to the LICENSE the build ships, as hub-docs writes it
    from huggingface_hub import ModelCard

    plan = plan_upload(out, "me/x", base_model="Qwen/Qwen2.5-VL-3B-Instruct", license=CardLicense("other", "qwen-research"))
    data = ModelCard(plan.card).data
    assert (data.license, data.license_name, data.license_link) == ("other", "qwen-research", "LICENSE")
    copied = tmp_path / "gptq"
    copied.mkdir()
    assert {"LICENSE", "NOTICE", "tokenizer.json"} <= set(_copy_support_files(source, copied))
    assert (copied / "LICENSE").read_text() == text


def test_a_card_keeps_the_paired_rows_of_its_own_builds():
    """The report's paired table (each build against the next smaller one) goes through the same
    narrowing as the drift table: a card keeps the rows whose build is its own and names what each
    was compared with; a card with no such row drops the section."""
    from qoqopt.publish import tables_for_build
    from qoqopt.report import SCHEMA, render_markdown

    def chats(scale):
        return {"chat_kld": [[scale * s, n] for s, n in ((3e-3, 30), (1e-2, 12), (4e-4, 40))]}

    q4, gptq, q8 = (_measured("gguf:Q4_K_M", "aa", 1e-4), _measured("gptq:4", "dd", 5e-5),
                    _measured("gguf:Q8_0", "cc", 1e-6))  # fmt: skip
    for v, size, scale in ((q4, 50e6, 1.0), (gptq, 60e6, 0.5), (q8, 90e6, 0.01)):
        v["size_bytes"] = size
        v["drift"]["all"] |= chats(scale)
        v["drift"]["all"]["mean_kld"] = sum(s for s, _ in chats(scale)["chat_kld"]) / 82
    run = {"schema": SCHEMA, "run": {"machine": {"label": "cpu"}}, "variants": [q4, gptq, q8]}
    report = render_markdown([run])
    paired = "## Each build against the next smaller one (paired)"
    gguf_card, _ = tables_for_build(report, "gguf", {"aa" * 32, "cc" * 32, "ee" * 32})
    gguf_rows = [ln for ln in gguf_card.split(paired)[-1].split("\n## ")[0].splitlines() if ln.startswith("| gguf")]
    assert paired in gguf_card and gguf_rows == ["| gguf:Q8_0 | gptq:4 | 0.02 | 0.02–0.02 | yes, lower |"]
    gptq_card, _ = tables_for_build(report, "gptq", {"dd" * 32, "ee" * 32})
    assert "| gptq:4 | gguf:Q4_K_M | 0.5 | 0.5–0.5 | yes, lower |" in gptq_card and "| gguf:Q8_0 | gptq:4 |" not in gptq_card
    q4_card, _ = tables_for_build(report, "gguf", {"aa" * 32, "ee" * 32})
    assert "(paired)" not in q4_card


def test_llama_quantizes_imatrix_keys_are_checked_for_local_names(tmp_path):
    """llama-quantize's keys name the imatrix in every text GGUF made with one: an older qoqopt wrote
    the calibration set's path and the imatrix file as given there. Written by gguf-py: only the
    build's own imatrix file and qoqopt's own dataset words pass."""
    from qoqopt.local_names import recorded_local_names

    own = "a user JSONL set (sha256 0123456789ab): 2 chats"
    for file, dataset, named in (("m.imatrix.gguf", own, []),
                                 ("/home/dr/DOE.imatrix", "/home/dr/cases/Jane_Doe_MRN0012345.jsonl",
                                  ["m.Q4_K_M.gguf quantize.imatrix.file: /home/dr/DOE.imatrix",
                                   "m.Q4_K_M.gguf quantize.imatrix.dataset: /home/dr/cases/Jane_Doe_MRN0012345.jsonl"])):  # fmt: skip
        build = tmp_path / str(len(named))
        build.mkdir()
        entry = _write_gguf(build / "m.Q4_K_M.gguf", qoqopt__source="a local checkpoint",
                            quantize__imatrix__file=file, quantize__imatrix__dataset=dataset)  # fmt: skip
        manifest = {"format": "gguf", "files": [entry], "imatrix": {"file": "m.imatrix.gguf", "datasets": [own]}}
        assert recorded_local_names(build, manifest) == named
