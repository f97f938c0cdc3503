"""Checkpoint loader: resolve a Hub id or directory, validate it is Qwen2.5-VL, stream tensors lazily.

Two key layouts occur in the wild and both are read:
- legacy (transformers < 4.52, and what `save_pretrained` still writes): `visual.*`, `model.layers.*`
- runtime (transformers >= 4.52 module names): `model.visual.*`, `model.language_model.*`

Every consumer sees *canonical* names, which are the legacy ones (the names llama.cpp's converter
and most published checkpoints use). QoQ-Med's own variant adds `time_series_embedding.*`, its
ECG encoder, which the plain Qwen2.5-VL class ignores; it is recognised here and labelled `ecg`.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import QoqoptError
from .hub_license import LICENSE_FILES
from .fileio import read_json
from .manifest import is_inside, is_int

QWEN25VL_ARCHS = {"Qwen2_5_VLForConditionalGeneration"}
QOQMED_ECG_ARCHS = {"TimeSeriesQwen2_5_VLForConditionalGeneration"}
ECG_PREFIX = "time_series_embedding."

# Runtime-layout prefix -> canonical (legacy) prefix. Order matters: most specific first.
_RUNTIME_TO_CANONICAL = [
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on its JSON header
# ... with the licence text (LICENSE has no suffix), which a build carries on: the names it copies
METADATA_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", *LICENSE_FILES]

SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def hf_config(config: dict):
    """A transformers Qwen2_5_VLConfig from a config.json, flat (4.x) or nested (5.x) layout; the
    architecture and quantization entries are not shape fields and are left out."""
    from transformers import Qwen2_5_VLConfig

    fields = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "quantization_config")}
    try:  # config.json is user data: transformers' own field validation speaks for it
        hf = Qwen2_5_VLConfig(**fields)
    except Exception as exc:  # noqa: BLE001 (ValueError, TypeError, huggingface_hub's StrictDataclassError)
        raise QoqoptError(f"config.json is not a valid Qwen2.5-VL config: {' '.join(str(exc).split())}") from exc
    for part, cfg, names in (("text", hf.text_config, DIM_FIELDS["text"]), ("vision", hf.vision_config, DIM_FIELDS["vision"])):
        for name in names:
            value = getattr(cfg, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise QoqoptError(f"config.json: {part} {name} must be a positive integer, got {value!r}")
    return hf


# The sizes every shape is derived from: a zero or a string here would fail deep inside transformers.
DIM_FIELDS = {
    "text": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"),
    "vision": ("hidden_size", "intermediate_size", "depth", "num_heads", "out_hidden_size", "patch_size", "spatial_merge_size"),
}


def meta_model(config: dict):
    """The transformers model of a config.json on the meta device: every text/vision shape, no memory."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(hf_config(config))


def runtime_name(canonical: str) -> str:
    """Inverse of :func:`canonical_name`: the transformers >= 4.52 module name of a tensor."""
    for runtime, canon in _RUNTIME_TO_CANONICAL:
        if canonical.startswith(canon):
            return runtime + canonical[len(canon) :]
    return canonical  # lm_head.*, time_series_embedding.*


def canonical_name(raw: str) -> str:
    for runtime, canonical in _RUNTIME_TO_CANONICAL:
        if raw.startswith(runtime):
            return canonical + raw[len(runtime) :]
    return raw


def part_of(name: str) -> str:
    """Which part of the model a canonical tensor belongs to: text, vision or ecg."""
    if name.startswith("visual."):
        return "vision"
    if name.startswith(ECG_PREFIX):
        return "ecg"
    if name.startswith(("model.", "lm_head.")):
        return "text"
    raise QoqoptError(f"tensor {name!r} belongs to no known part of a Qwen2.5-VL checkpoint")


# --------------------------------------------------------------------------- sources


def _a_file(path: Path, source: str) -> str:
    """What to give instead of a file: a user hands `ask` the .gguf they mean to run, or `info` the
    config.json, where every command takes the folder (a build picks its GGUF by quant type)."""
    holder = path.parent
    if not ((holder / "manifest.json").exists() or (holder / "config.json").exists()):
        return f"{source} is a file; give a checkpoint's directory or a build folder written by `qoqopt export`"
    pick = " (a build's GGUF is picked by its quant type, `ask --quant`; bench takes a file as `--variants gguf:FILE.gguf`)"
    return f"{source} is a file; give the folder that holds it, {holder}{pick if path.suffix.lower() == '.gguf' else ''}"


def resolve(source: str, revision: str | None = None, weights: bool = True,
            only: list[str] | None = None) -> tuple[Path, str | None]:  # fmt: skip
    """A local directory for `source` (a path or Hub id) and the Hub commit it came from.

    Hub downloads go through huggingface_hub, which honours HF_HUB_OFFLINE and the local cache.
    Only what qoqopt reads is fetched: the metadata (config, index, tokenizer, manifest: all `info`
    needs), then, with `weights`, the safetensors files the index names (never pickle weights or
    other folders' files); with `only`, just those files.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QoqoptError(_a_file(path, source))
        if revision:
            raise QoqoptError(f"--revision picks a Hub revision; {source} is a local directory")
        return path, None
    if not HUB_ID.match(source):
        raise QoqoptError(f"{source}: no such directory, and not a Hub id of the form owner/name")
    check_not_a_local_path(source)
    if only is not None:
        return _snapshot(source, revision, files=only)
    path, commit = _snapshot(source, revision, patterns=METADATA_PATTERNS)
    if not weights:
        return path, commit
    return _snapshot(source, commit or revision, files=_shard_files(path))


def mistyped_local_path(source: str) -> bool:
    """A missing path whose first folder exists here is a local path with a typo (``out/gguf`` for
    ``out/ggufs``), not a Hub id."""
    return Path(Path(source).parts[0]).is_dir()


def check_not_a_local_path(source: str) -> None:
    """Refuse a :func:`mistyped_local_path`: reading the Hub repo of that name would run whatever
    model its owner put there in its place, unsaid."""
    first = Path(source).parts[0]
    if mistyped_local_path(source):
        raise QoqoptError(f"{source}: no such directory (./{first}/ exists, so this is read as a local path, not as "
                          f"the Hub repo {source}; to read that repo, run from a folder without ./{first}/)")  # fmt: skip


def _shard_files(path: Path) -> list[str]:
    """The safetensors files a checkpoint's index names; without an index, its one model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(_index(index)[0].values()))
    return ["model.safetensors"]


def _index(index: Path) -> tuple[dict[str, str], int | None]:
    """The index's tensor -> shard map and total size, every shard a safetensors file inside the
    checkpoint: the index comes with the model, and a name like ``/home/x/private.safetensors`` or
    ``../../x`` would make qoqopt read (and export, and publish) a file from elsewhere on this machine."""
    data = read_json(index)
    weight_map = data.get("weight_map", {}) if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise QoqoptError(f"{index}: weight_map must map tensor names to shard files")
    for shard in weight_map.values():
        if not (is_inside(shard) and shard.endswith(".safetensors")):
            raise QoqoptError(f"{index} names the shard {shard!r}: every shard must be a .safetensors file inside "
                              "the checkpoint's folder")  # fmt: skip
    metadata = data.get("metadata")
    return weight_map, metadata.get("total_size") if isinstance(metadata, dict) else None


def is_commit(revision) -> bool:
    """A Hub commit id (40 hex digits), as a snapshot's folder and a build's manifest record it."""
    return isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def _snapshot(repo_id: str, revision: str | None, patterns: list[str] | None = None,
              files: list[str] | None = None) -> tuple[Path, str | None]:  # fmt: skip
    """huggingface_hub's snapshot of `repo_id` holding the files matching `patterns`, or exactly `files`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    if files is not None:
        patterns = [glob.escape(f) for f in files]  # names, matched literally even with [ ] * ?
    # patterns match at any depth: a repo's runs/, onnx/ or dataset folders of JSON are not its metadata
    nested = ["*/*"] if files is None else None
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=nested))
    except LocalEntryNotFoundError as exc:
        raise QoqoptError(_not_cached(repo_id, revision, files, exc)) from exc
    except HFValidationError as exc:
        raise QoqoptError(f"{repo_id}: no such directory, and not a valid Hub id ({str(exc).splitlines()[0]})") from exc
    except HfHubHTTPError as exc:
        raise QoqoptError(f"cannot get {repo_id} from the Hub: {str(exc).splitlines()[0]}") from exc
    # The cache lays snapshots out as .../snapshots/<commit sha>/, which is the revision we report.
    commit = local.name if is_commit(local.name) else None
    return local, commit


def _not_cached(repo_id: str, revision: str | None, files: list[str] | None, exc: Exception) -> str:
    """Why a fetch failed offline or with the Hub unreachable, in one line."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    where = "HF_HUB_OFFLINE is set" if offline else "the Hub is unreachable"
    # huggingface_hub >= 2.4 knows, from its cached file listing, which files a cached snapshot lacks
    missing = re.search(r"(\d+) file\(s\) are missing \((.*?)\)\. ", str(exc))
    if missing:
        return f"cannot get {repo_id}: {where} and the local cache lacks {missing[1]} of its files: {missing[2]}"
    lacking = _uncached(repo_id, revision, files or [])
    if lacking:
        return f"cannot get {', '.join(lacking)} from {repo_id}: {where} and the local cache lacks " + (
            "it" if len(lacking) == 1 else "them")
    return f"cannot get {repo_id}: {where} and it is not in the local cache"


def _uncached(repo_id: str, revision: str | None, files: list[str]) -> list[str]:
    """Which of `files` the local cache cannot serve at `revision` (all of them when the revision itself
    is unknown there): huggingface_hub's per-file error names none of them."""
    from huggingface_hub import try_to_load_from_cache

    lacking = []
    for name in files:
        found = try_to_load_from_cache(repo_id, name, revision=revision)
        if found is None:
            lacking.append(name)
        elif not isinstance(found, str):  # its sentinel: an earlier online fetch found no such file
            lacking.append(f"{name} (absent from the repo at that revision)")
    return lacking


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor entries (dtype, shape, data_offsets) of one shard, checking the file is complete.

    Reading the header ourselves gives shapes without torch and lets a truncated download fail
    with a clear message instead of a Rust panic deep inside a later read.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise QoqoptError(f"{path.name} is truncated: {size} bytes, not even a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise QoqoptError(f"{path.name} is truncated inside its header ({size} bytes on disk)")
        if header_len > MAX_HEADER_BYTES:  # parsed into Python objects, a long one takes ~25x its size
            raise QoqoptError(f"{path.name}: a safetensors header of {header_len:,} bytes, over the format's "
                              f"{MAX_HEADER_BYTES:,}")  # fmt: skip
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise QoqoptError(f"{path.name} is not a safetensors file (bad header: {exc})") from exc
    if not isinstance(header, dict):
        raise QoqoptError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    end = _check_layout(path.name, header)
    if 8 + header_len + end > size:
        raise QoqoptError(
            f"{path.name} is truncated: header promises {8 + header_len + end} bytes, file has {size}"
        )
    return header


def _check_layout(name: str, header: dict) -> int:
    """Where the tensors' data ends, each entry checked as the safetensors format requires (shape,
    dtype size, and byte ranges that tile the data with no hole or overlap): the offsets come with
    the file, and a reversed range reads to the end of the file once per tensor."""
    end = 0
    for start, stop, tensor in sorted(_ranges(name, header)):
        if start != end:
            raise QoqoptError(f"{name}: tensor {tensor} starts at byte {start} of the data, not at {end} (safetensors "
                              "data has no holes or overlaps)")  # fmt: skip
        end = stop
    return end


def _ranges(name: str, header: dict) -> list[tuple[int, int, str]]:
    ranges = []
    for tensor, info in header.items():
        offsets, shape = (info.get("data_offsets"), info.get("shape")) if isinstance(info, dict) else (None, None)
        if not (_ints(offsets) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] and _ints(shape)
                and min(shape, default=0) >= 0):  # fmt: skip
            raise QoqoptError(f"{name}: tensor {tensor!r} has no valid shape and data_offsets (not a safetensors file?)")
        width = SAFETENSORS_DTYPE_BYTES.get(info.get("dtype"))
        if width is not None and offsets[1] - offsets[0] != width * math.prod(shape):
            raise QoqoptError(f"{name}: tensor {tensor} of shape {shape} in {info['dtype']} takes "
                              f"{width * math.prod(shape)} bytes, its data_offsets span {offsets[1] - offsets[0]}")  # fmt: skip
        ranges.append((offsets[0], offsets[1], tensor))
    return ranges


def _ints(values) -> bool:
    return isinstance(values, list) and all(map(is_int, values))


# --------------------------------------------------------------------------- the checkpoint


def _config_identity(config: dict) -> dict:
    """The config as it describes the model: without who saved it, with which transformers."""
    return {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}


FINGERPRINT_PREFIX = "sha256-v2:"  # Checkpoint.fingerprint's scheme (config, headers, tensor ends)


@dataclass
class Checkpoint:
    """A Qwen2.5-VL / QoQ-Med checkpoint on disk, read lazily tensor by tensor."""

    path: Path
    source: str
    revision: str | None = None
    config: dict = field(default_factory=dict)
    weight_map: dict[str, str] = field(default_factory=dict)  # raw name -> shard file
    index_total_size: int | None = None
    _handles: dict = field(default_factory=dict, repr=False)
    _hf: Any = field(default=None, repr=False)

    # ---- identity
    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    @property
    def has_ecg_encoder(self) -> bool:
        """By its tensors: a vision+text release may keep the ECG class in config.json without the
        encoder, whose builds and cards then said they carried it. The class decides only where
        no tensor names are known."""
        if self.weight_map:
            return any(canonical_name(n).startswith(ECG_PREFIX) for n in self.weight_map)
        return self.architecture in QOQMED_ECG_ARCHS

    @property
    def layout(self) -> str:
        runtime = any(n.startswith(("model.visual.", "model.language_model.")) for n in self.weight_map)
        return "runtime (model.visual.*, model.language_model.*)" if runtime else "legacy (visual.*, model.layers.*)"

    @cached_property
    def names(self) -> dict[str, str]:
        """Canonical name -> raw name as stored."""
        out: dict[str, str] = {}
        for raw in self.weight_map:
            canon = canonical_name(raw)
            if canon in out:
                raise QoqoptError(f"tensor {canon} is stored twice, as {out[canon]} and {raw}")
            out[canon] = raw
        return out

    @cached_property
    def fingerprint(self) -> str:
        """A content id that needs no Hub revision, so a local copy of a Hub snapshot, or the same
        weights sharded otherwise, has the same: sha256 of the config (less the fields that record
        who saved it) and, tensor by tensor in name order, its name, dtype, shape and first and last
        32 bytes. Config and shapes alone are the same for a base model and its fine-tune; a
        fine-tune changes nearly every weight, and 64 bytes a tensor (55 KB for the 7B) read in no
        time. Builds record it (manifest ``source.fingerprint``), ``qoqopt bench`` checks it. The
        ``sha256-v2:`` prefix tells it from builds' earlier ``sha256:`` ids, of config and headers."""
        import hashlib

        h = hashlib.sha256(json.dumps(_config_identity(self.config), sort_keys=True).encode())
        ends = self._tensor_ends(32)
        for name in sorted(self.weight_map):
            info = self.headers[self.weight_map[name]][name]
            h.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
            h.update(ends[name])
        return FINGERPRINT_PREFIX + h.hexdigest()[:16]

    def _tensor_ends(self, n: int) -> dict[str, bytes]:
        """Each tensor's first and last ``n`` bytes, each shard opened once."""
        ends = {}
        for shard, header in self.headers.items():
            with open(self.path / shard, "rb") as fh:
                base = 8 + struct.unpack("<Q", fh.read(8))[0]
                for name, info in header.items():
                    start, end = info["data_offsets"]
                    ends[name] = b""
                    for offset in sorted({start, max(start, end - n)}):
                        fh.seek(base + offset)
                        ends[name] += fh.read(min(n, end - offset))
        return ends

    # ---- files
    @property
    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def missing_shards(self) -> list[str]:
        return [f for f in self.shard_files if not (self.path / f).exists()]

    def require_weights(self) -> None:
        missing = self.missing_shards()
        if missing:
            raise QoqoptError(
                f"{self.source} has no weights here: missing {len(missing)} shard(s) ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''})"
            )

    def require_unquantized(self) -> None:
        """A GPTQ/AWQ/bitsandbytes build is no source to quantize: its weights are packed (an export
        of one calibrated first, then failed on a layer "lacking" mlp.down_proj.weight)."""
        method = (self.config.get("quantization_config") or {}).get("quant_method")
        if method:
            raise QoqoptError(f"{self.source} is already a {str(method).upper()} build (its config.json has a "
                              "quantization_config): export from the original checkpoint")  # fmt: skip

    @cached_property
    def headers(self) -> dict[str, dict]:
        """Per shard: safetensors header entries (validated; shards must be present)."""
        self.require_weights()
        return {f: read_safetensors_header(self.path / f) for f in self.shard_files}

    def tensor_info(self, name: str) -> dict:
        raw = self.names[name]
        return self.headers[self.weight_map[raw]][raw]

    # ---- tensors
    def tensor(self, name: str):
        """One tensor by canonical name, read from its shard without touching the rest."""
        from safetensors import safe_open

        if name not in self.names:
            raise QoqoptError(f"{self.source} has no tensor {name}")
        raw = self.names[name]
        shard = self.weight_map[raw]
        if shard not in self._handles:
            self.headers  # validate completeness before safetensors memory-maps it
            self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
        return self._handles[shard].get_tensor(raw)

    def iter_tensors(self, part: str | None = None):
        """(canonical name, tensor) in shard order, so each shard is read sequentially once."""
        order = sorted(self.names, key=lambda n: (self.weight_map[self.names[n]], n))
        for name in order:
            if part is None or part_of(name) == part:
                yield name, self.tensor(name)

    def close(self) -> None:
        self._handles.clear()

    # ---- model views
    def hf_config(self):
        """The transformers Qwen2_5_VLConfig (built once: it imports torch), or a one-line error."""
        if self._hf is None:
            self._hf = hf_config(self.config)
        return self._hf

    def meta_model(self):
        return meta_model(self.config)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> shape for every text and vision parameter, from the meta model; a tied
        lm_head (tie_word_embeddings: Qwen2.5-VL-3B) once, as the embedding it is (state_dict listed
        it again, and a 3B counted 4.07 B)."""
        return {canonical_name(k): tuple(v.shape) for k, v in self.meta_model().named_parameters()}


PROCESSOR_JSON = ("tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                  "processor_config.json", "chat_template.json")


def checked_processor(path: Path, source: str):
    """The checkpoint's processor, refused in one line when it cannot make a QoQ-Med chat: no
    tokenizer vocabulary (without tokenizer.json transformers builds one of the added tokens only,
    and image tokens then fail to match image features), no chat template, or one that cannot render
    an image chat. These used to be transformers tracebacks after the model was loaded and calibrated."""
    from .chat_template import check_chat_template
    from .processor import load_processor

    path = Path(path)
    if not (path / "tokenizer.json").exists() and not ((path / "vocab.json").exists() and (path / "merges.txt").exists()):
        raise QoqoptError(f"{source} has no tokenizer vocabulary (tokenizer.json): copy the tokenizer files from "
                          "the original checkpoint")  # fmt: skip
    for name in PROCESSOR_JSON:  # transformers reads each with .get: a list in one was an AttributeError
        if (path / name).is_file():
            read_json_object(path / name)
    try:
        processor = load_processor(path)
    except (OSError, ValueError) as exc:
        raise QoqoptError(f"cannot load the processor of {source}: {str(exc).splitlines()[0]}") from exc
    if not getattr(processor, "chat_template", None):  # the torch-free processor reads chat_template.json only
        processor.chat_template = find_chat_template(path)
    if not processor.chat_template:
        raise QoqoptError(f"{source} has no chat template (chat_template.json, chat_template.jinja or in "
                          "tokenizer_config.json): copy it from the original checkpoint")  # fmt: skip
    check_chat_template(processor, source)
    return processor


def find_chat_template(path: Path) -> str | None:
    """The checkpoint's chat template, from the first place that has one: chat_template.json,
    chat_template.jinja, then tokenizer_config.json (older checkpoints keep it only there; as named
    templates, "default" or else the first). The processor check, `info` and
    the GGUF export's embedded template all read it here: three readers had disagreed."""
    path = Path(path)
    template = _json_if_there(path / "chat_template.json").get("chat_template")
    if not template and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        template = _json_if_there(path / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) and template.strip() else None


def _json_if_there(path: Path) -> dict:
    """A JSON object file's content, {} when there is no such file (or it holds no object)."""
    data = read_json(path) if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file that must hold an object (its keys are read with .get)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise QoqoptError(f"{path} is not a JSON object (it holds a {type(data).__name__})")
    return data


def validate_config(config: dict, where: str) -> None:
    if not isinstance(config, dict):
        raise QoqoptError(f"{where}: config.json is not a JSON object")
    if not isinstance(config.get("quantization_config", {}), dict):  # its keys are read wherever a build is
        raise QoqoptError(f"{where}: config.json's quantization_config is not a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    known = QWEN25VL_ARCHS | QOQMED_ECG_ARCHS
    if model_type != "qwen2_5_vl" or (archs and not set(archs) & known):
        raise QoqoptError(
            f"{where} is not a Qwen2.5-VL checkpoint: found model_type={model_type!r}, "
            f"architectures={archs} (expected qwen2_5_vl / Qwen2_5_VLForConditionalGeneration)"
        )


def _weight_map(path: Path) -> tuple[dict[str, str], int | None]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return _index(index)
    single = path / "model.safetensors"
    if single.exists():
        return {name: single.name for name in read_safetensors_header(single)}, None
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise QoqoptError(f"{path} holds only pickle weights (.bin/.pt); qoqopt reads safetensors only")
    raise QoqoptError(f"{path} has no model.safetensors or model.safetensors.index.json (qoqopt reads "
                      "safetensors only)")  # fmt: skip


def _hub_weight_map(source: str, commit: str) -> dict[str, str]:
    """Tensor name -> file of a Hub checkpoint without an index (one model.safetensors, not fetched):
    from the file's header, which huggingface_hub reads with a range request, not the whole download."""
    from huggingface_hub import get_safetensors_metadata

    try:
        return dict(get_safetensors_metadata(source, revision=commit).weight_map)
    except Exception as exc:  # noqa: BLE001 (offline, HTTP errors, a repo without safetensors)
        raise QoqoptError(f"cannot read the safetensors header of {source} from the Hub: "
                          f"{str(exc).splitlines()[0]}") from exc  # fmt: skip


def checked_config(path: Path, source: str):
    """config.json of the checkpoint at `path` as read, and as the transformers Qwen2.5-VL config it
    must make (every shape comes from that: a broken one is refused here, not deep in a child process)."""
    config = _config_json(path, source)
    return config, hf_config(config)


def _config_json(path: Path, source: str) -> dict:
    config_path = path / "config.json"
    if not config_path.exists():
        if any(Path(path).glob("*.gguf")):  # GGUF files without the manifest a qoqopt build has
            raise QoqoptError(f"{source} holds GGUF files but no manifest.json (not a `qoqopt export` build); "
                              "`qoqopt info` reads one .gguf file of it")  # fmt: skip
        raise QoqoptError(f"{source} has no config.json; is it a transformers checkpoint?")
    config = read_json(config_path)
    validate_config(config, source)
    return config


def open_checkpoint(source: str, revision: str | None = None, weights: bool = True) -> Checkpoint:
    """Resolve, validate and index a checkpoint. Tensor data is only read on demand.

    The transformers config, and with it transformers' own field checks, comes on first use
    (``ckpt.hf_config()``): building it imports torch (2 s and 200 MB here), which a GGUF export
    of F16/BF16/Q8_0 never needs. Commands that run transformers build it first, before any long work."""
    path, commit = resolve(source, revision, weights=weights)
    config = _config_json(path, source)
    if commit and not any((path / f).exists() for f in ("model.safetensors.index.json", "model.safetensors")):
        weight_map, total = _hub_weight_map(source, commit), None  # a metadata-only fetch of one-file weights
    else:
        weight_map, total = _weight_map(path)
    ckpt = Checkpoint(path, source, commit, config, weight_map, total)
    unknown = [n for n in ckpt.names if not n.startswith(("visual.", "model.", "lm_head.", ECG_PREFIX))]
    if unknown:
        raise QoqoptError(f"{source}: {len(unknown)} tensor(s) outside any known part, e.g. {unknown[0]}")
    _check_layer_counts(ckpt)
    return ckpt


_LAYER_INDEX = {"num_hidden_layers": re.compile(r"^model\.layers\.(\d+)\."), "depth": re.compile(r"^visual\.blocks\.(\d+)\.")}


def _check_layer_counts(ckpt: Checkpoint) -> None:
    """config.json's layer counts against the layers whose tensors are stored: transformers builds
    every layer the config names and initialises those the weights lack at random, with one warning
    table, so a config naming more layers answers through random ones (or, naming 200,000, builds
    them for minutes)."""
    text = ckpt.config.get("text_config") or {}
    counts = {"num_hidden_layers": text.get("num_hidden_layers", ckpt.config.get("num_hidden_layers")),
              "depth": (ckpt.config.get("vision_config") or {}).get("depth")}  # fmt: skip
    for key, count in counts.items():
        if not (isinstance(count, int) and count > 0):
            continue  # transformers' own config checks say what is wrong with it
        stored = {int(m[1]) for n in ckpt.names for m in [_LAYER_INDEX[key].match(n)] if m}
        if len(stored) != count or max(stored) != count - 1:
            held = f"layers {_index_ranges(sorted(stored))}" if stored else "none of those layers"
            raise QoqoptError(f"{ckpt.source}: config.json's {key} is {count}, but the weights hold {held}")


def _index_ranges(indexes: list[int]) -> str:
    """0-27 or 0-1, 5: how a reader sees which layers are there."""
    runs, start = [], indexes[0]
    for prev, cur in zip(indexes, indexes[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev > start else str(start))
            start = cur
    return ", ".join(runs)
