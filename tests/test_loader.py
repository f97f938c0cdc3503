"""The loader against the real QoQ-Med-VL-7B metadata and both key layouts of the mini model."""

import json
import re
import shutil

import pytest

from qoqopt.errors import QoqoptError
from qoqopt.loader import canonical_name, open_checkpoint, part_of
from tests.conftest import cache_as_hub_repo, error_line, refused, run_cli


def test_real_7b_index_is_understood(fixture_7b):
    ckpt = open_checkpoint(str(fixture_7b), weights=False)
    assert ckpt.architecture == "TimeSeriesQwen2_5_VLForConditionalGeneration"
    assert ckpt.has_ecg_encoder
    parts = [part_of(n) for n in ckpt.names]
    assert len(parts) == 868
    assert parts.count("ecg") == 139 and parts.count("vision") == 390 and parts.count("text") == 339
    # Every text and vision tensor of the index has a full-size shape from the meta-device model,
    # and the model has no tensor the index lacks.
    shapes = ckpt.expected_shapes()
    indexed = {n for n in ckpt.names if part_of(n) != "ecg"}
    assert indexed == set(shapes)
    assert shapes["model.embed_tokens.weight"] == (152064, 3584)
    assert shapes["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["visual.merger.mlp.0.weight"] == (5120, 5120)
    assert shapes["visual.merger.mlp.2.weight"] == (3584, 5120)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)
    assert ckpt.missing_shards() == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    with pytest.raises(QoqoptError, match="missing 4 shard"):
        ckpt.tensor("lm_head.weight")


def test_the_ecg_encoder_is_known_by_its_tensors_not_by_the_class_name(fixture_7b, tmp_path):
    """A vision+text release may keep QoQ-Med's ECG class in config.json without the encoder's
    tensors (DESIGN: the Hub release may ship only vision+text): `info` said "with ECG encoder ... 0
    tensors", and builds recorded it as carried. The 7B's own index, its 139 ECG names taken out."""
    import shutil

    shutil.copytree(fixture_7b, tmp_path / "vl")
    index = json.loads((tmp_path / "vl" / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("time_series_embedding.")}
    (tmp_path / "vl" / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(str(tmp_path / "vl"), weights=False)
    assert ckpt.architecture == "TimeSeriesQwen2_5_VLForConditionalGeneration" and not ckpt.has_ecg_encoder
    assert open_checkpoint(str(fixture_7b), weights=False).has_ecg_encoder
    res = run_cli("info", str(tmp_path / "vl"), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ecg"] is False, res.stderr


def test_another_tools_manifest_beside_a_checkpoint_leaves_it_a_checkpoint(tiny_dir, tmp_path):
    """A checkpoint folder holding some other tool's manifest.json (an OCI image manifest, say) was
    refused as a qoqopt build that "lists no files". It is read as the checkpoint it is; a damaged
    manifest of ours is still refused."""
    import shutil

    from qoqopt.manifest import build_kind

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    plain = run_cli("info", str(ckpt), "--json")
    (ckpt / "manifest.json").write_text(json.dumps({"schemaVersion": 2, "layers": []}))
    assert build_kind(ckpt)[0] == "checkpoint"
    res = run_cli("info", str(ckpt), "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == json.loads(plain.stdout), res.stderr
    (ckpt / "manifest.json").write_text(json.dumps({"format": "gptq", "files": []}))
    _one_line_error(run_cli("info", str(ckpt)), "lists no files")


def test_a_tied_lm_head_is_counted_once_as_transformers_counts_it(fixture_7b, tmp_path):
    """Qwen2.5-VL-3B ties its lm_head to the embedding: the metadata-only count (every Hub id's
    `info`) listed it twice, 4.07 B for a 3B. The 7B's metadata, tied, checked against transformers'
    own parameter count of the same config on the meta device."""
    import shutil

    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    shutil.copytree(fixture_7b, tmp_path / "3b")
    config = json.loads((tmp_path / "3b" / "config.json").read_text())
    config["tie_word_embeddings"] = True  # the 7B's shapes otherwise: its index names the layers
    (tmp_path / "3b" / "config.json").write_text(json.dumps(config))
    index = json.loads((tmp_path / "3b" / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("lm_head.weight")
    (tmp_path / "3b" / "model.safetensors.index.json").write_text(json.dumps(index))
    res = run_cli("info", str(tmp_path / "3b"), "--json")
    assert res.returncode == 0, res.stderr
    params = json.loads(res.stdout)["params"]
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(str(tmp_path / "3b")))
    assert params["text"] + params["vision"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["nf4", "fp4-bf16-storage", "int8"])
def test_info_counts_a_bitsandbytes_builds_parameters_as_transformers_does(kind, tiny_dir, tmp_path):
    """A bitsandbytes build as transformers saves one (BitsAndBytesConfig): 4-bit weights packed two
    per byte (four per bfloat16 with bnb_4bit_quant_storage), each beside its absmax, code book and
    packed quant state; LLM.int8 weights beside their row scales (SCB). `info` counted the packed
    bytes as parameters, the metadata too, and said "None-bit"."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    four = kind != "int8"
    build = tmp_path / "bnb"
    shutil.copytree(tiny_dir, build, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(str(tiny_dir / "model.safetensors"))
    linears = [k for k in state if re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight", k)]
    assert len(linears) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for k in linears:
        n = state[k].numel()
        if kind == "int8":
            state[k], state[k.removesuffix("weight") + "SCB"] = torch.zeros(state[k].shape, dtype=torch.int8), torch.ones(state[k].shape[0])
            continue
        storage = torch.bfloat16 if kind == "fp4-bf16-storage" else torch.uint8
        per_word = 2 * storage.itemsize  # 4-bit levels per stored element
        state[k] = torch.zeros((n // per_word, 1), dtype=storage)
        state[f"{k}.absmax"] = torch.zeros(n // 64, dtype=torch.uint8)  # double quant: absmax quantized itself
        state[f"{k}.nested_absmax"] = torch.ones(-(-n // 64 // 256))
        state[f"{k}.nested_quant_map"] = torch.zeros(256)
        state[f"{k}.quant_map"] = torch.zeros(16)
        quant_state = json.dumps({"quant_type": kind[:3], "blocksize": 64, "dtype": "bfloat16", "shape": [*state[k].shape]})
        state[f"{k}.quant_state.bitsandbytes__{kind[:3]}"] = torch.tensor(list(quant_state.encode()), dtype=torch.uint8)
    save_file(state, str(build / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((build / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": four, "load_in_8bit": not four, "bnb_4bit_quant_type": kind[:3],
        "bnb_4bit_use_double_quant": True, "llm_int8_skip_modules": ["lm_head", "visual"],
        "bnb_4bit_quant_storage": "bfloat16" if kind == "fp4-bf16-storage" else "uint8",
    }  # fmt: skip
    (build / "config.json").write_text(json.dumps(config))

    res = run_cli("info", str(build), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(str(tiny_dir)))
    assert summary["params"]["text"] + summary["params"]["vision"] == sum(p.numel() for p in model.parameters())
    q = summary["quantization"]
    assert q["bits"] == (4 if four else 8) and q["packed_linears"] == len(linears) and q["left_plain"] == ["lm_head", "visual"]
    assert summary["dtype"] == "BF16"  # the tensors left plain, not the packed words
    text = run_cli("info", str(build)).stdout
    want = f"bitsandbytes ({kind[:3]}) 4-bit, group 64" if four else "bitsandbytes (LLM.int8) 8-bit, per channel"
    assert f"quantized    {want}, symmetric: {len(linears)} Linears packed" in text


def test_info_on_real_metadata_prints_true_summary(fixture_7b):
    res = run_cli("info", str(fixture_7b))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for expected in [
        "TimeSeriesQwen2_5_VLForConditionalGeneration",
        "hidden 3584, intermediate 18944, 28 layers, 28 heads / 4 KV (head_dim 128), vocab 152064",
        "mrope_section [16, 24, 24]",
        "depth 32, hidden 1280, intermediate 3420, 16 heads (head_dim 80)",
        "full-attention blocks [7, 15, 23, 31]",
        "ECG encoder  time_series_embedding.*: 139 tensors",
        "16.9 GB in 4 shard(s)",
        "MISSING: 4 of 4 shard(s)",
    ]:
        assert expected in out, f"{expected!r} not in:\n{out}"
    # as transformers' model of this config counts them (7.62 B text: 2 x 152064 x 3584 embeddings + 28 layers)
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(str(fixture_7b)))
    counts = {part: sum(p.numel() for n, p in model.named_parameters() if (".visual." in n) == (part == "vision"))
              for part in ("text", "vision")}  # fmt: skip
    assert f"text {counts['text'] / 1e9:.2f} B" in out and f"vision {counts['vision'] / 1e6:.1f} M" in out, counts
    assert "no vision_config" not in out


@pytest.mark.parametrize("layout", ["legacy", "runtime"])
def test_both_key_layouts_read_the_same_tensors(layout, tiny_dir, tiny_runtime_dir):
    """The runtime layout (transformers >= 4.52 keys) reads as the legacy one's tensors, and `info`
    names each layout and counts the text parameters transformers' model has."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    folder = tiny_dir if layout == "legacy" else tiny_runtime_dir
    ckpt = open_checkpoint(str(folder))
    if layout == "runtime":
        raw = set(ckpt.weight_map)
        assert any(n.startswith("model.language_model.layers.") for n in raw)
        assert any(n.startswith("model.visual.") for n in raw)
        ref = open_checkpoint(str(tiny_dir))
        assert set(ckpt.names) == set(ref.names)
        assert all(ckpt.tensor(name).equal(ref.tensor(name)) for name in ref.names)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(str(folder)))
    text = sum(p.numel() for n, p in model.named_parameters() if ".visual." not in n)  # tied lm_head once
    res = run_cli("info", str(ckpt.path))
    assert res.returncode == 0, res.stderr
    assert layout in res.stdout
    assert f"text {text / 1e6:.1f} M" in res.stdout, (text, res.stdout)


def test_transformers_reads_both_layouts_as_the_same_model(tiny_dir, tiny_runtime_dir):
    """The reference for what the two key layouts mean: transformers loads both into identical weights,
    so the runtime-layout checks elsewhere (loader, GGUF) compare against a known-equal model."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    a = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_dir), dtype=torch.float32).state_dict()
    b = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_runtime_dir), dtype=torch.float32).state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = open_checkpoint(str(tiny_dir))  # and our loader's canonical names point at the same data
    assert torch.equal(ref.tensor("model.layers.1.mlp.down_proj.weight").float(),
                       a["model.language_model.layers.1.mlp.down_proj.weight"])  # fmt: skip


@pytest.mark.parametrize("layout", ["legacy", "runtime"])
def test_lazy_reads_match_transformers(layout, tiny_dir, tiny_runtime_dir):
    """Tensors streamed by canonical name equal what transformers itself loads, under either key layout."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = tiny_dir if layout == "legacy" else tiny_runtime_dir
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    ckpt = open_checkpoint(str(path))
    loaded = {canonical_name(k): v for k, v in model.state_dict().items()}
    streamed = dict(ckpt.iter_tensors())
    assert set(streamed) == set(loaded)
    assert all(streamed[k].equal(loaded[k]) for k in loaded)


def _one_line_error(res, pattern):
    line = error_line(res)
    assert pattern in line, line


def test_info_rejects_non_qwen25vl(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    _one_line_error(run_cli("info", str(tmp_path)), "found model_type='llama', architectures=['LlamaForCausalLM']")


def _text(config: dict, **fields) -> dict:
    """The config with text fields set where this layout keeps them (nested in 5.x, flat in 4.x)."""
    if "text_config" in config:
        return {**config, "text_config": {**config["text_config"], **fields}}
    return {**config, **fields}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: [1, 2], "config.json is not a JSON object"),
        # read with .get wherever a build is (info, ask, bench): an AttributeError traceback
        (lambda c: {**c, "quantization_config": "gptq"}, "config.json's quantization_config is not a JSON object"),
        (lambda c: _text(c, num_attention_heads=0), "config.json: text num_attention_heads must be a positive integer, got 0"),
        (lambda c: {**c, "vision_config": {**c["vision_config"], "depth": -2}},
         "config.json: vision depth must be a positive integer, got -2"),
        (lambda c: _text(c, hidden_size="abc"),
         "config.json is not a valid Qwen2.5-VL config: Validation error for field 'hidden_size'"),
    ],
)  # fmt: skip
def test_a_broken_config_is_one_line(fixture_7b, tiny_dir, tmp_path, edit, message, capsys):
    """A config.json that parses but cannot describe a model (every shape comes from it) is one line,
    where it used to be an AttributeError, ZeroDivisionError or a transformers validation traceback:
    `info` on the real 7B metadata (flat text fields) and `bench` on the mini model (nested)."""
    for command, source in (("info", fixture_7b), ("bench", tiny_dir)):
        d = tmp_path / command
        shutil.copytree(source, d)
        (d / "config.json").write_text(json.dumps(edit(json.loads((source / "config.json").read_text()))))
        argv = [command, d, *(("--variants", "bf16", "--out", tmp_path / "o") if command == "bench" else ())]
        assert message in refused(argv, capsys), command
    assert not (tmp_path / "o").exists()


def test_info_says_when_the_vision_dims_are_transformers_defaults(fixture_7b, tmp_path, capsys):
    """A config.json without vision_config still loads in transformers (with its default vision
    config); info says the dims it prints came from those defaults, not from the checkpoint."""
    from transformers import Qwen2_5_VLConfig

    from qoqopt.cli import main

    d = tmp_path / "no-vision"
    shutil.copytree(fixture_7b, d)
    config = json.loads((d / "config.json").read_text())
    del config["vision_config"]
    (d / "config.json").write_text(json.dumps(config))
    assert main(["info", str(d)]) == 0  # in-process: no second interpreter start-up
    out = capsys.readouterr().out
    v = Qwen2_5_VLConfig().vision_config
    assert f"depth {v.depth}, hidden {v.hidden_size}, intermediate {v.intermediate_size}" in out
    assert "config.json has no vision_config: the vision dims above are transformers' defaults" in out


def test_info_rejects_missing_path(tmp_path):
    _one_line_error(run_cli("info", str(tmp_path / "nope")), "no such directory")


def test_info_rejects_truncated_safetensors(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    shard = bad / "model.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    _one_line_error(run_cli("info", str(bad)), "model.safetensors is truncated")


def test_pickle_only_checkpoint_is_refused(tiny_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not-read")
    with pytest.raises(QoqoptError, match="pickle"):
        open_checkpoint(str(d))


def test_hub_id_resolves_from_offline_cache(fixture_7b, tmp_path):
    """A Hub id is resolved by huggingface_hub from its cache layout, with HF_HUB_OFFLINE=1."""
    cache_as_hub_repo(tmp_path / "hub", "ddvd233/QoQ-Med-VL-7B", list(fixture_7b.glob("*.json")))
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    res = run_cli("info", "ddvd233/QoQ-Med-VL-7B", "--json", env=env)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["ecg"] and summary["tensors"] == {"text": 339, "vision": 390, "ecg": 139}
    _one_line_error(run_cli("info", "someone/not-cached", env=env), "HF_HUB_OFFLINE is set")


def test_a_partly_cached_hub_checkpoint_names_what_is_missing(fixture_7b, tmp_path, monkeypatch, capsys):
    """huggingface_hub (>= 2.4) keeps each downloaded commit's file listing beside the snapshot (the
    format its _tree_cache documents). Offline, a snapshot holding only the metadata still serves
    `info`; `bench`, which needs the weights, names the shards it cannot get; a snapshot lacking a
    listed metadata file says which, in one line."""
    from huggingface_hub import constants

    from qoqopt.cli import main

    metadata = list(fixture_7b.glob("*.json"))
    index = json.loads((fixture_7b / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    cache_as_hub_repo(tmp_path / "hub", "ddvd233/QoQ-Med-VL-7B", metadata, [f.name for f in metadata] + shards)
    cache_as_hub_repo(tmp_path / "hub", "me/partial", metadata, [f.name for f in metadata] + ["chat_template.jinja"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["info", "ddvd233/QoQ-Med-VL-7B", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"]["ecg"] == 139
    argv = ["bench", "ddvd233/QoQ-Med-VL-7B", "--variants", "bf16", "--out", tmp_path / "o"]
    err = refused(argv, capsys, downloads=True)
    assert err == (f"error: cannot get {', '.join(shards)} from ddvd233/QoQ-Med-VL-7B: HF_HUB_OFFLINE is set and "
                   "the local cache lacks them"), err  # fmt: skip
    err = refused(["info", "me/partial"], capsys)
    assert err == ("error: cannot get me/partial: HF_HUB_OFFLINE is set and the local cache lacks 1 of its files: "
                   "chat_template.jinja"), err  # fmt: skip


def test_offline_refusal_tells_uncached_files_from_files_the_repo_lacks(fixture_7b, tmp_path, monkeypatch):
    """Which named files an offline cache cannot serve is read from huggingface_hub's own cache
    layout: a file never fetched, and one an earlier online fetch found absent (its .no_exist marker)."""
    from huggingface_hub import constants

    from qoqopt import loader

    config = fixture_7b / "config.json"
    commit = cache_as_hub_repo(tmp_path / "hub", "me/shards", [config])
    marker = tmp_path / "hub" / "models--me--shards" / ".no_exist" / commit / "model-00002-of-00002.safetensors"
    marker.parent.mkdir(parents=True)
    marker.touch()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    names = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert loader._uncached("me/shards", commit, names) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors (absent from the repo at that revision)"]
    assert loader._uncached("me/shards", None, names[:1]) == []  # main, through refs/main
    assert loader._uncached("me/shards", "v2", names[:1]) == names[:1]  # a revision the cache does not know


def test_a_hub_checkpoint_is_fetched_without_pickles_or_extras(tiny_dir, tmp_path, monkeypatch):
    """From a Hub id qoqopt fetches the metadata and the safetensors it reads, not the repo's pickle
    weights (never loaded) or other extras: with a cached listing that names a pytorch_model.bin,
    a GGUF and another folder's safetensors, all absent, huggingface_hub serves the checkpoint
    offline, and its tensors are the local directory's."""
    from huggingface_hub import constants

    files = list(tiny_dir.iterdir())
    # runs/ and onnx/ hold JSON at depth: metadata patterns match at any depth, so offline these
    # uncached files were asked for (and online, a folder of logs would be downloaded)
    listed = [f.name for f in files] + ["pytorch_model.bin", "t.gguf", "int4/model.safetensors", "runs/events.json",
                                        "onnx/config.json"]  # fmt: skip
    sha = cache_as_hub_repo(tmp_path / "hub", "me/tiny", files, listed)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ckpt = open_checkpoint("me/tiny")
    assert ckpt.revision == sha
    name = "model.layers.1.mlp.down_proj.weight"
    assert ckpt.tensor(name).equal(open_checkpoint(str(tiny_dir)).tensor(name))


def test_info_on_a_single_file_hub_checkpoint(tiny_dir, tmp_path, monkeypatch, capsys):
    """A Hub checkpoint without an index (one model.safetensors) has its tensor names in that file's
    header, which `info` reads through huggingface_hub (a range request) rather than downloading the
    weights: offline that is one line naming why; once the file is cached, the header is read."""
    from huggingface_hub import constants

    from qoqopt.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cache_as_hub_repo(tmp_path / "hub", "me/tiny-meta", list(tiny_dir.glob("*.json")))
    err = refused(["info", "me/tiny-meta"], capsys)
    assert err.startswith("error: cannot read the safetensors header of me/tiny-meta from the Hub: ")
    assert "offline" in err
    cache_as_hub_repo(tmp_path / "hub", "me/tiny", list(tiny_dir.iterdir()))
    assert main(["info", "me/tiny"]) == 0
    assert "text 79.4 M" in capsys.readouterr().out


def test_info_reads_a_single_file_hub_checkpoints_header_by_range_request(tiny_dir, tmp_path, monkeypatch, capsys):
    """Online, the tensor names come from huggingface_hub.get_safetensors_metadata (one range request
    for the header) at the commit the metadata came from; here it is stood in for by the real
    header of the mini model's file, as that function returns it, since tests never reach the Hub."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    from qoqopt.cli import main
    from qoqopt.loader import read_safetensors_header

    header = read_safetensors_header(tiny_dir / "model.safetensors")
    tensors = {n: TensorInfo(dtype=h["dtype"], shape=h["shape"], data_offsets=tuple(h["data_offsets"]))
               for n, h in header.items()}  # fmt: skip
    asked = []

    def get_safetensors_metadata(repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        files = {"model.safetensors": SafetensorsFileMetadata({}, tensors)}
        weight_map = dict.fromkeys(tensors, "model.safetensors")
        return SafetensorsRepoMetadata(metadata=None, sharded=False, weight_map=weight_map, files_metadata=files)

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = cache_as_hub_repo(tmp_path / "hub", "me/tiny-meta", list(tiny_dir.glob("*.json")))
    assert main(["info", "me/tiny-meta"]) == 0
    out = capsys.readouterr().out
    assert asked == [("me/tiny-meta", commit)]
    assert "text 79.4 M" in out and "MISSING: 1 of 1 shard(s) not present (model.safetensors)" in out


def test_fingerprint_follows_the_weights_not_the_files(tiny_dir, tmp_path):
    """`Checkpoint.fingerprint`, which bench checks builds against: the same weights split into other
    shards, with a config saved by another transformers, keep it; one weight changed (a fine-tune
    changes them all) changes it, though config, names and shapes stay the same."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_dir / "model.safetensors"))
    names = sorted(state)

    def copy(folder, edit_state=None):
        shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        tensors = edit_state(dict(state)) if edit_state else state
        shards = {"part-1.safetensors": names[::2], "part-2.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: tensors[k].contiguous() for k in keys}, str(folder / shard))
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}, indent=4))
        return open_checkpoint(str(folder)).fingerprint

    original = open_checkpoint(str(tiny_dir)).fingerprint
    assert copy(tmp_path / "resharded") == original
    big = max(names, key=lambda k: state[k].numel())

    def nudge(tensors):
        w = tensors[big].clone()
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf"), dtype=w.dtype))
        return {**tensors, big: w}

    assert copy(tmp_path / "tuned", nudge) != original


@pytest.mark.parametrize("shard", ["/home/x/private/model.safetensors", "../private/model.safetensors",
                                   "..\\private\\model.safetensors", "model.bin", ["model.safetensors"]])  # fmt: skip
def test_an_index_cannot_name_a_shard_outside_the_checkpoint(tiny_dir, tmp_path, monkeypatch, shard, capsys):
    """The index comes with the model: a Hub repo whose weight_map named a file elsewhere on this
    machine had its weights read, exported and published as the repo's (a security review did it
    with an absolute path and with ../). Each is refused in one line, from a folder and from a
    Hub cache, before any shard is opened."""
    from huggingface_hub import constants

    private = tmp_path / "private"
    private.mkdir()
    shutil.copy(tiny_dir / "model.safetensors", private)
    names = open_checkpoint(str(tiny_dir)).names
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in tiny_dir.glob("*.json"):
        shutil.copy(f, repo)
    (repo / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cache_as_hub_repo(tmp_path / "hub", "evil/qoq", list(repo.iterdir()))
    for source in (str(repo), "evil/qoq"):
        err = refused(["info", source], capsys)
        assert "every shard must be a .safetensors file inside the checkpoint's folder" in err, err


def test_a_missing_local_path_is_not_read_as_a_hub_repo(tiny_dir, tmp_path, monkeypatch, capsys):
    """`qoqopt info out/mini-gguf` with out/ here but no mini-gguf in it read the Hub repo of that
    name (here cached offline), so a mistyped path ran whoever owns the Hub user `out`'s model. A
    missing path whose first folder exists is refused; the same id from elsewhere reads the Hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cache_as_hub_repo(tmp_path / "hub", "out/mini", list(tiny_dir.iterdir()))
    (tmp_path / "work" / "out").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    err = refused(["info", "out/mini"], capsys)
    assert err == ("error: out/mini: no such directory (./out/ exists, so this is read as a local path, not as the Hub "
                   "repo out/mini; to read that repo, run from a folder without ./out/)"), err  # fmt: skip
    assert refused(["bench", "out/x", "--variants", "bf16", "--from", "out/mini"], capsys).endswith("without ./out/)")
    monkeypatch.chdir(tmp_path)
    assert open_checkpoint("out/mini").revision is not None


def _ints_pair(offsets) -> bool:
    return isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)


def _safetensors_file(path, header: dict, data: bytes) -> None:
    """A file laid out as the safetensors format specifies: u64 header length, JSON header, data."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["b"].update(data_offsets=[16, 0]), "tensor 'b' has no valid shape and data_offsets"),
    (lambda h: h["b"].update(data_offsets=[24, 40]), "tensor b starts at byte 24 of the data, not at 16"),
    (lambda h: h["b"].update(shape=[2, 3]), "tensor b of shape [2, 3] in F32 takes 24 bytes, its data_offsets span 16"),
    (lambda h: h["a"].update(shape=["2", 2]), "tensor 'a' has no valid shape and data_offsets"),
    (lambda h: h.update(c=[0, 1]), "tensor 'c' has no valid shape and data_offsets"),
    (lambda h: h["b"].update(data_offsets=[8, 24]), "tensor b starts at byte 8 of the data, not at 16"),  # overlap
    (lambda h: h["b"].update(data_offsets=[16, 48]), "tensor b of shape [4] in F32 takes 16 bytes, its data_offsets span 32"),
])  # fmt: skip
def test_a_safetensors_header_is_checked_as_the_format_specifies(tmp_path, edit, message):
    """Offsets come with the file: a reversed range read to the end of the file once per tensor (a
    security review's 13 GB from a 160 MB checkpoint), a hole or overlap reads other tensors' bytes.
    The file safetensors itself writes is read; each edit of its header is one line, as are a header
    that is not an object and one over the format's 100 MB limit (a sparse file: nothing is read)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qoqopt.loader import read_safetensors_header

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 2), "b": torch.ones(4)}, str(good))
    header = read_safetensors_header(good)
    assert {k: v["data_offsets"] for k, v in header.items()} == {"a": [0, 16], "b": [16, 32]}
    edit(header)
    bad = tmp_path / "bad.safetensors"
    ends = [v["data_offsets"][1] for v in header.values() if isinstance(v, dict) and _ints_pair(v.get("data_offsets"))]
    _safetensors_file(bad, header, bytes(max(ends + [0])))  # data exactly as long as the offsets say
    with pytest.raises(QoqoptError, match=re.escape(message)):
        read_safetensors_header(bad)
    with pytest.raises(Exception):  # the format's own reader refuses the file too
        with safe_open(str(bad), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    _safetensors_file(bad, [1, 2], bytes(8))
    with pytest.raises(QoqoptError, match="its header is not a JSON object"):
        read_safetensors_header(bad)
    with open(bad, "wb") as fh:
        fh.write((100_000_001).to_bytes(8, "little"))
        fh.truncate(100_000_100)
    with pytest.raises(QoqoptError, match="a safetensors header of 100,000,001 bytes, over the format's 100,000,000"):
        read_safetensors_header(bad)


def test_a_config_naming_more_layers_than_the_weights_hold_is_refused(tiny_dir, tmp_path, capsys):
    """transformers builds every layer config.json names and fills those the weights lack at random
    (its loading info lists them as missing; nothing stops the load), so `ask` answered through a
    random layer, and a config naming 200,000 built them for minutes. The counts are checked against
    the stored layers first, text and vision."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = json.loads((tiny_dir / "config.json").read_text())
    layers, depth = config["text_config"]["num_hidden_layers"], config["vision_config"]["depth"]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    for edit, message in (
        (lambda c: c["text_config"].update(num_hidden_layers=layers + 1, layer_types=None),
         f"config.json's num_hidden_layers is {layers + 1}, but the weights hold layers 0-{layers - 1}"),
        (lambda c: c["text_config"].update(num_hidden_layers=200_000),
         f"config.json's num_hidden_layers is 200000, but the weights hold layers 0-{layers - 1}"),
        (lambda c: c["vision_config"].update(depth=depth + 2), f"config.json's depth is {depth + 2}, but the weights hold layers 0-{depth - 1}"),
    ):  # fmt: skip
        edited = json.loads(json.dumps(config))
        edit(edited)
        (bad / "config.json").write_text(json.dumps(edited))
        assert refused(["info", bad], capsys) == f"error: {bad}: {message}"
        if edited["text_config"]["num_hidden_layers"] == layers + 1:
            _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(bad), output_loading_info=True)
            assert any(f"layers.{layers}." in k for k in info["missing_keys"])  # what transformers would have run
    # the count right, a layer missing: layer 0's tensors stored as layer `layers` (a gap at 0)
    from safetensors.torch import load_file, save_file

    (bad / "config.json").write_text(json.dumps(config))
    state = load_file(str(tiny_dir / "model.safetensors"))
    save_file({k.replace("model.layers.0.", f"model.layers.{layers}."): v for k, v in state.items()}, str(bad / "model.safetensors"))
    assert refused(["info", bad], capsys) == (f"error: {bad}: config.json's num_hidden_layers is {layers}, but the weights hold "
                                              f"layers 1-{layers}")  # fmt: skip
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(bad), output_loading_info=True)
    assert any("layers.0." in k for k in info["missing_keys"])
