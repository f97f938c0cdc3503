"""GPTQ / AWQ checkpoints of QoQ-Med for transformers, GPTQModel and vLLM: calibrate, quantize, write.

    export_hf_quant("ddvd233/QoQ-Med-VL-7B", Path("out/q"), fmt="gptq", bits=4, group_size=128, ...)

Steps, each owned elsewhere: the loader streams tensors (:mod:`qoqopt.loader`); domain-balanced
clinical image+text chats come from :mod:`qoqopt.calibration`; :mod:`qoqopt.quantize.runner`
captures decoder-layer-0 inputs once and quantizes one layer at a time; :mod:`qoqopt.packing` packs.
This module only knows the two formats (:mod:`.gptq`, :mod:`.awq`) and how to write the directory:

* tensor names are the transformers-5 module names (``model.language_model.layers.N...``,
  ``model.visual.*``, ``lm_head``): GPTQModel's loader needs them (with the older names GPTQ raises
  and AWQ silently loads zeros);
* the vision tower and ``lm_head`` stay unquantized unless ``quantize_vision``; the config says so in
  the form each loader reads (see :mod:`.gptq` / :mod:`.awq`);
* QoQ-Med's ECG encoder (``time_series_embedding.*``) is carried through untouched, and config.json
  keeps the source's ``architectures`` entry; with ``drop_ecg`` it is left out and the architecture
  becomes the plain Qwen2.5-VL class, which is what vLLM can serve (it knows neither QoQ-Med's class
  nor its ECG tensors, and refuses checkpoint tensors it has no parameter for);
* tokenizer, processor, chat template and generation config are copied, so the directory is a
  drop-in replacement; ``manifest.json`` records every file's sha256 and the per-layer errors.

Output is built in a temporary directory and renamed into place; the same source, options, seed
and calibration set give the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qoqopt.errors import QoqoptError
from qoqopt.hub_license import copy_license_files
from qoqopt.loader import ECG_PREFIX, SAFETENSORS_DTYPE_BYTES, meta_model, runtime_name

FORMATS = ("gptq", "awq")
SHARD_BYTES = 2 << 30
PLAIN_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"  # what a --drop-ecg build declares
# Files copied from the source so the output is a drop-in replacement (weights and configs excluded).
SUPPORT_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "chat_template.json", "chat_template.jinja", "generation_config.json",
)  # fmt: skip
GPTQ_GROUP_SIZES = (-1, 32, 64, 128)
AWQ_GROUP_SIZES = (32, 64, 128)


def vision_linear_name(canonical_weight: str) -> str:
    """``visual.blocks.0.attn.qkv.weight`` -> module path ``model.visual.blocks.0.attn.qkv``."""
    return runtime_name(canonical_weight).removesuffix(".weight")


@dataclass
class ExportReport:
    out: Path
    fmt: str
    layers: list[dict] = field(default_factory=list)
    vision: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    ecg_encoder: str | None = None  # "carried" or "dropped" where the source has one
    order: str | None = None  # GPTQ's visiting order (GPTQ_ORDERS)
    compute: dict = field(default_factory=dict)  # where it ran: the bytes depend on it (README known issues)


# GPTQ's column visiting orders by name (--order), as gptq_quantize options (see quantize.gptq); all
# but "act" keep the plain layout (g_idx = k // group_size, desc_act false). "static" is the default:
# its per-layer output error was the lowest of the three plain-layout orders on every draw measured
# (README; "act" was not measured)
GPTQ_ORDERS = {
    "static": dict(act_order=True, static_groups=True),
    "group-aware": dict(group_aware=True),
    "natural": {},
    "act": dict(act_order=True),
}
DEFAULT_ORDER = "static"


def validate_options(fmt: str, bits: int, group_size: int, order: str | None, sym: bool, quantize_vision: bool = False) -> None:
    """One-line errors for option combinations no loader reads."""
    if fmt not in FORMATS:
        raise QoqoptError(f"unknown format {fmt!r}; choose gptq or awq")
    if order is not None and order not in GPTQ_ORDERS:
        raise QoqoptError(f"unknown --order {order!r}; choose {', '.join(GPTQ_ORDERS)}")
    if fmt == "gptq":
        if quantize_vision:
            raise QoqoptError(
                "--quantize-vision works with --format awq only: GPTQ loaders convert only the language-model "
                "layers (transformers/optimum rejects a second block list; GPTQModel leaves the vision tower "
                "uninitialised)"
            )
        if bits not in (4, 8):
            raise QoqoptError(f"--bits {bits} is not supported for GPTQ; use 4 or 8")
        if group_size not in GPTQ_GROUP_SIZES:
            raise QoqoptError(f"--group-size {group_size} is not supported for GPTQ; use 32, 64, 128 or -1 (per channel)")
    else:
        if bits != 4:
            raise QoqoptError(f"--bits {bits} is not supported for AWQ (the GEMM format is 4-bit only); use 4")
        if group_size not in AWQ_GROUP_SIZES:
            raise QoqoptError(f"--group-size {group_size} is not supported for AWQ; use 32, 64 or 128")
        if order is not None:
            raise QoqoptError("the column order (--order) is a GPTQ option; AWQ has none")
        if sym:
            raise QoqoptError("AWQ GEMM stores zero-points (zero_point: true); drop --sym for --format awq")


_ST_DTYPES = {  # torch dtype name -> safetensors dtype
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int64": "I64", "int8": "I8",
    "uint8": "U8", "bool": "BOOL", "float64": "F64", "int16": "I16",
}  # fmt: skip
COPY_CHUNK = 16 << 20


class ShardWriter:
    """Safetensors shards of at most ``max_bytes``, named like transformers' own, plus the index.

    Streaming: each tensor's bytes go to a spool file as they arrive (a tensor from torch, or a
    byte range copied from a source shard without ever becoming a tensor), so memory holds at
    most one tensor or one copy chunk, never a shard. On close each shard is laid out as the
    safetensors library lays it out (tensors by alignment, then name) and its header written.
    """

    def __init__(self, out: Path, max_bytes: int = SHARD_BYTES):
        self.out, self.max_bytes = Path(out), max_bytes
        self.entries: list[dict] = []  # current shard: name, dtype, shape, spool offset, size
        self.shards: list[tuple[str, list[str]]] = []
        self.names: set[str] = set()
        self.total = 0
        self._spool = None
        self._spool_size = 0
        self.digests: dict[str, str] = {}  # file name -> sha256, taken while each shard is written

    def _begin(self, size: int) -> None:
        if self.entries and self._spool_size + size > self.max_bytes:
            self.flush()
        if self._spool is None:
            self._spool = open(self.out / f".spool-{len(self.shards):05d}", "w+b")
            self._spool_size = 0

    def _record(self, name: str, dtype: str, shape, size: int) -> None:
        if name in self.names:
            raise QoqoptError(f"internal: tensor {name} written twice")
        self.names.add(name)
        self.entries.append({"name": name, "dtype": dtype, "shape": list(shape), "at": self._spool_size, "size": size})
        self._spool_size += size
        self.total += size

    def add(self, name: str, tensor) -> None:
        import torch

        t = tensor.detach().cpu().contiguous()
        dtype = _ST_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise QoqoptError(f"internal: cannot store {name} of dtype {t.dtype}")
        size = t.numel() * t.element_size()
        self._begin(size)
        if size:
            self._spool.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._record(name, dtype, t.shape, size)

    def add_raw(self, name: str, src_path: Path, offset: int, size: int, dtype: str, shape) -> None:
        """Copy a tensor's bytes straight from a source safetensors file."""
        self._begin(size)
        with open(src_path, "rb") as src:
            src.seek(offset)
            left = size
            while left:
                chunk = src.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise QoqoptError(f"{src_path.name} ended inside tensor {name}")
                self._spool.write(chunk)
                left -= len(chunk)
        self._record(name, dtype, shape, size)

    def flush(self) -> None:
        if self._spool is None:
            return
        order = sorted(self.entries, key=lambda e: (-SAFETENSORS_DTYPE_BYTES[e["dtype"]], e["name"]))
        header, pos = {}, 0
        for e in order:
            header[e["name"]] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [pos, pos + e["size"]]}
            pos += e["size"]
        header = {"__metadata__": {"format": "pt"}, **header}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        tmp_name = f"part-{len(self.shards):05d}.safetensors"
        self._spool.flush()
        digest = hashlib.sha256()
        with open(self.out / tmp_name, "wb") as dst:

            def write(data: bytes) -> None:
                dst.write(data)
                digest.update(data)

            write(struct.pack("<Q", len(blob)))
            write(blob)
            for e in order:
                self._spool.seek(e["at"])
                left = e["size"]
                while left:
                    chunk = self._spool.read(min(COPY_CHUNK, left))
                    write(chunk)
                    left -= len(chunk)
        self.digests[tmp_name] = digest.hexdigest()
        self._spool.close()
        (self.out / f".spool-{len(self.shards):05d}").unlink()
        self._spool = None
        self.shards.append((tmp_name, sorted(e["name"] for e in self.entries)))
        self.entries = []

    def close(self) -> list[str]:
        self.flush()
        if len(self.shards) == 1:
            (self.out / self.shards[0][0]).rename(self.out / "model.safetensors")
            self.digests["model.safetensors"] = self.digests.pop(self.shards[0][0])
            return ["model.safetensors"]
        n = len(self.shards)
        weight_map, files = {}, []
        for i, (tmp_name, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / tmp_name).rename(self.out / final)
            self.digests[final] = self.digests.pop(tmp_name)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files + ["model.safetensors.index.json"]


def copy_source_tensor(writer: ShardWriter, ckpt, canonical: str, out_name: str) -> None:
    """A tensor passed through unchanged: its bytes copied from the source shard, never loaded."""
    info = ckpt.tensor_info(canonical)
    shard = ckpt.path / ckpt.weight_map[ckpt.names[canonical]]
    with open(shard, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
    begin, end = info["data_offsets"]
    writer.add_raw(out_name, shard, 8 + header_len + begin, end - begin, info["dtype"], info["shape"])


_LAYER_WEIGHT = re.compile(r"model\.layers\.\d+\.(.+)\.weight")


def estimate_bytes(ckpt, bits: int, group_size: int, quantize_vision: bool, drop_ecg: bool = False) -> int:
    """The build's size, roughly, for the free-space check only: the decoder layers' Linears (with
    --quantize-vision the vision blocks' the export packs) at ``bits`` a weight plus a 16-bit scale
    and a zero a group, every other tensor copied as stored (the ECG encoder's unless dropped)."""
    from qoqopt.quantize.rtn import QuantSpec
    from qoqopt.quantize.runner import LAYER_LINEARS

    # the export's own plan: the 7B's vision MLPs (3420 wide) do not pack and stay as stored (~0.6 GiB)
    vision = _vision_plan(ckpt, QuantSpec(bits, group_size), "awq").linears if quantize_vision else {}
    total = 0
    for name in ckpt.names:
        if drop_ecg and name.startswith(ECG_PREFIX):
            continue
        info = ckpt.tensor_info(name)
        layer = _LAYER_WEIGHT.fullmatch(name)
        if (layer and layer[1] in LAYER_LINEARS) or (name.endswith(".weight") and name.removesuffix(".weight") in vision):
            n, k = info["shape"]
            groups = n * (k // group_size if group_size > 0 else 1)
            total += n * k * bits // 8 + groups * (16 + bits) // 8
        else:
            total += info["data_offsets"][1] - info["data_offsets"][0]
    return total


def _pack(fmt: str, qw) -> dict:
    from . import awq, gptq

    return gptq.pack(qw) if fmt == "gptq" else awq.pack(qw)


def export_hf_quant(
    source: str,
    out: Path,
    fmt: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    order: str | None = None,
    sym: bool | None = None,
    calib: str = "clinical",
    samples: int = 128,
    quantize_vision: bool = False,
    force: bool = False,
    seed: int = 0,
    *,
    device: str | None = None,
    damp: float = 0.01,
    revision: str | None = None,
    shard_bytes: int = SHARD_BYTES,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    drop_ecg: bool = False,
    threads: int = 0,
) -> Path:
    """Quantize ``source`` (Hub id or directory) to a GPTQ v1 or AWQ GEMM directory at ``out``.

    ``sym`` None picks the format's default: symmetric for GPTQ (what vLLM's Marlin kernels take),
    zero-points for AWQ. ``order`` is GPTQ's column visiting order (GPTQ_ORDERS; None: "static").
    ``threads``: torch's for the export (0: leave torch's setting); a CPU build's bytes follow it.
    Returns ``out``; the per-layer errors are in ``out/manifest.json``.
    """
    with torch_threads(threads):
        report = export_hf_quant_report(
            source, out, fmt, bits, group_size, order, sym, calib, samples, quantize_vision, force, seed,
            device=device, damp=damp, revision=revision, shard_bytes=shard_bytes, log=log, progress=progress,
            drop_ecg=drop_ecg,
        )  # fmt: skip
    return report.out


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set to ``threads`` (0: unchanged) while the block runs."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def export_hf_quant_report(
    source, out, fmt="gptq", bits=4, group_size=128, order=None, sym=None, calib="clinical",
    samples=128, quantize_vision=False, force=False, seed=0, *, device=None, damp=0.01, revision=None,
    shard_bytes=SHARD_BYTES, log=None, progress=True, on_layer=None, drop_ecg=False,
) -> ExportReport:  # fmt: skip
    """:func:`export_hf_quant`, returning the full report. ``on_layer`` is
    called with each :class:`~qoqopt.quantize.runner.LayerResult` before it is written."""
    import torch

    from qoqopt.calibration import calibration_items
    from qoqopt.data import domain_counts
    from qoqopt.fileio import atomic_dir, check_free_space, prepare_output_dir
    from qoqopt.loader import open_checkpoint
    from qoqopt.manifest import export_output
    from qoqopt.quantize.rtn import QuantSpec
    from qoqopt.quantize.runner import (
        QuantizeOptions,
        capture_layer0_inputs,
        check_layer_shapes,
        encode_chats,
        stream_quantize,
    )

    from . import awq as awq_fmt
    from . import gptq as gptq_fmt
    from .hf_readme import render_readme

    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    sym = (fmt == "gptq") if sym is None else sym
    validate_options(fmt, bits, group_size, order, sym, quantize_vision)
    order = (order or DEFAULT_ORDER) if fmt == "gptq" else None
    if samples < 1:
        raise QoqoptError(f"--samples must be at least 1, got {samples}")
    out, owned = Path(out), export_output()
    inputs = [source] + ([calib] if calib != "clinical" else [])
    prepare_output_dir(out, force, inputs, owned=owned)  # fail before hours of work, not after
    ckpt = open_checkpoint(source, revision=revision)
    ckpt.require_weights()
    ckpt.require_unquantized()
    check_free_space(out, estimate_bytes(ckpt, bits, group_size, quantize_vision, drop_ecg))
    config = ckpt.hf_config()
    zero_min = 1 if (fmt == "gptq" and not sym) else 0
    spec = QuantSpec(bits, group_size, sym, zero_min)
    check_layer_shapes(config.text_config, spec, pack_cols=(32 // bits) if fmt == "gptq" else 8)
    fmt_mod = gptq_fmt if fmt == "gptq" else awq_fmt
    report = ExportReport(out, fmt, order=order)
    drops_ecg = drop_ecg and ckpt.has_ecg_encoder
    if ckpt.has_ecg_encoder:
        report.ecg_encoder = "dropped" if drop_ecg else "carried"
    if fmt == "gptq" and not sym:
        report.notes.append(
            "asymmetric GPTQ v1: zero-points kept >= 1 (GPTQModel's v1->v2 conversion adds 0x11111111 to "
            "whole words, so a stored zero-1 of -1 would carry into its neighbour); transformers loads it, "
            "but GPTQModel.load refuses asymmetric v1 that GPTQModel did not produce, and vLLM's Marlin "
            "kernels need sym: prefer the default --sym"
        )

    # the temporary output is made before calibrating: an --out that cannot be written (a read-only
    # mount) fails in one line now, not after the model is loaded and calibrated
    with atomic_dir(out, force=force, inputs=inputs, owned=owned) as tmp:
        items, label = calibration_items(calib, samples, seed, log)
        if not items:
            raise QoqoptError(f"calibration set {calib} gave no items")
        processor = _processor(ckpt)
        chats = encode_chats(processor, items)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        opts = QuantizeOptions(method=fmt, spec=spec, damp=damp, seed=seed, **GPTQ_ORDERS.get(order, {}))
        vision_plan = _vision_plan(ckpt, spec, fmt) if quantize_vision else None
        vision_stats = _VisionStats(vision_plan) if vision_plan else None
        log(f"calibrating on {len(chats)} chats from {label} ({device})")
        report.compute = {"device": str(device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
        captured = capture_layer0_inputs(
            ckpt, chats, device=device, vision_hooks=vision_stats.hooks if vision_stats else None, progress=progress
        )
        report.calibration = {
            "source": label, "chats": len(chats), "tokens": captured.tokens, "image_tokens": captured.image_tokens,
            "domains": domain_counts(items), "seed": seed,
        }  # fmt: skip
        log(f"captured layer-0 inputs: {captured.tokens} tokens ({captured.image_tokens} image) in {captured.seconds:.1f} s")

        writer = ShardWriter(tmp, shard_bytes)
        for result in stream_quantize(ckpt, captured, opts, device=device, log=log, text_config=config.text_config):
            if on_layer:
                on_layer(result)
            prefix = f"model.language_model.layers.{result.index}."
            written = set()
            for name, qw in result.quantized.items():
                for key, tensor in _pack(fmt, qw).items():
                    writer.add(f"{prefix}{name}.{key}", tensor)
                if f"{name}.bias" in result.tensors:  # the bias sits beside its packed weight
                    writer.add(f"{prefix}{name}.bias", result.tensors[f"{name}.bias"])
                    written.add(f"{name}.bias")
            for key, tensor in result.tensors.items():
                if key not in written:
                    writer.add(prefix + key, tensor)
            report.layers.append({"layer": result.index, "rel_error": round(result.rel_error, 6),
                                  "seconds": round(result.seconds, 2), "notes": result.notes})  # fmt: skip
        del captured
        vision_done = _write_vision(ckpt, writer, vision_stats, opts, fmt, log) if vision_stats else {}
        report.vision = [vision_done[k] for k in sorted(vision_done)]
        skipped_vision = sorted(vision_plan.skipped) if vision_plan else []
        for name in ckpt.names:
            if name.startswith("model.layers.") or (drops_ecg and name.startswith(ECG_PREFIX)):
                continue
            if vision_done and name.removesuffix(".weight").removesuffix(".bias") in vision_done:
                continue  # written packed above
            copy_source_tensor(writer, ckpt, name, runtime_name(name))
        files = writer.close()

        quant_config = fmt_mod.quantization_config(
            bits=bits, group_size=group_size, sym=sym, desc_act=opts.act_order and not opts.static_groups,
            static_groups=opts.static_groups,
            damp=damp, vision_modules=sorted(v["module"] for v in vision_done.values()), vision_skipped=skipped_vision,
            plain=[ECG_PREFIX.rstrip(".")] if ckpt.has_ecg_encoder and not drops_ecg else [],
        )  # fmt: skip
        config_json = {k: v for k, v in ckpt.config.items() if k != "_name_or_path"}  # see _drop_local_name
        if drops_ecg:
            _declare_plain_model(config_json)
        config_json["quantization_config"] = quant_config
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=False) + "\n")
        copied = _copy_support_files(ckpt.path, tmp)
        _drop_local_name(tmp / "tokenizer_config.json", "name_or_path")
        if drops_ecg:
            _declare_plain_tokenizer(tmp / "tokenizer_config.json")
        report.notes += _ecg_notes(ckpt, drop_ecg)
        if not quantize_vision:
            report.notes.append("vision tower and lm_head left unquantized (default)")
        else:
            report.notes.append(
                f"{len(vision_done)} vision-block Linear(s) quantized (AWQ clipping search, no scale folding); "
                "transformers loads them, GPTQModel.load does not (it converts only the language-model layers)"
            )
            if skipped_vision:
                report.notes.append(f"{len(skipped_vision)} vision Linear(s) left unquantized: shapes do not fit the format")
        report.seconds = time.perf_counter() - t0
        manifest = _manifest(ckpt, report, opts, quant_config)
        # the README says what the manifest records, and joins the file list it then closes
        (tmp / "README.md").write_text(render_readme(manifest))
        manifest["files"] = _file_entries(files + ["config.json", "README.md"] + copied, tmp, writer.digests)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    mean_err = sum(lr["rel_error"] for lr in report.layers) / max(len(report.layers), 1)
    log(f"wrote {out} ({fmt}, {bits}-bit, group {group_size}; mean layer error {mean_err:.4f}; "
        f"{report.seconds:.0f} s)")  # fmt: skip
    return report


def _declare_plain_model(config_json: dict) -> None:
    """Config of a --drop-ecg build: the plain Qwen2.5-VL class, and no pointer to QoQ-Med's own code
    (``auto_map`` names .py files the build does not ship; with trust_remote_code they are required)."""
    config_json["architectures"] = [PLAIN_ARCHITECTURE]
    for key in ("auto_map", "time_series_token_id"):
        config_json.pop(key, None)


def _drop_local_name(path: Path, key: str) -> None:
    """Remove the folder a fine-tune was loaded from, which transformers 4 saved into its configs
    (``_name_or_path``, ``name_or_path``): it names the user's folders, is uploaded with the build,
    and nothing reads it back."""
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    if isinstance(data, dict) and data.pop(key, None) is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")


def _declare_plain_tokenizer(path: Path) -> None:
    """QoQ-Med's tokenizer class only adds the time-series token to Qwen2's: name Qwen2's instead."""
    if not path.is_file():
        return
    tokenizer_config = json.loads(path.read_text())
    if "TimeSeries" not in str(tokenizer_config.get("tokenizer_class", "")) and "auto_map" not in tokenizer_config:
        return
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    tokenizer_config.pop("auto_map", None)
    path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _ecg_notes(ckpt, drop_ecg: bool) -> list[str]:
    if not ckpt.has_ecg_encoder:
        return ["--drop-ecg: the source has no ECG encoder; nothing dropped"] if drop_ecg else []
    if drop_ecg:
        return [f"ECG encoder (time_series_embedding.*) left out (--drop-ecg); architectures set to "
                f"{PLAIN_ARCHITECTURE}: vLLM and transformers serve images and text, not ECGs"]  # fmt: skip
    return ["ECG encoder (time_series_embedding.*) carried through unquantized; vLLM cannot load this build "
            "(it refuses those tensors, and QoQ-Med's own class): export with --drop-ecg to serve it there"]


def _processor(ckpt):
    from qoqopt.loader import checked_processor

    return checked_processor(ckpt.path, ckpt.source)


def _copy_support_files(src: Path, dst: Path) -> list[str]:
    """The tokenizer, processor and generation files, and the licence text, copied from the source."""
    copied = []
    for path in [src / name for name in SUPPORT_FILES if (src / name).is_file()]:
        shutil.copyfile(path, dst / path.name)
        copied.append(path.name)
    return copied + [path.name for path in copy_license_files(src, dst)]


def _manifest(ckpt, report: ExportReport, opts, quant_config) -> dict:
    """Everything the manifest records but its file list (:func:`_file_entries`)."""
    from qoqopt import __version__

    return {
        "format": report.fmt,
        "qoqopt_version": __version__,
        "source": {
            "model": ckpt.source, "revision": ckpt.revision, "fingerprint": ckpt.fingerprint,
            "architecture": ckpt.architecture, "layout": ckpt.layout, "ecg_encoder": ckpt.has_ecg_encoder,
        },  # fmt: skip
        "ecg_encoder": report.ecg_encoder,
        "quantization": {
            "method": opts.method, "bits": opts.spec.bits, "group_size": opts.spec.group_size,
            "sym": opts.spec.sym, "order": report.order, "damp": opts.damp, "config": quant_config,
        },  # fmt: skip
        "calibration": report.calibration,
        "compute": report.compute,
        "layers": [{k: v for k, v in lr.items() if k != "seconds"} for lr in report.layers],  # no timings: deterministic
        "vision": report.vision,
        "notes": report.notes,
        "files": [],
    }


def _file_entries(files: list[str], tmp: Path, digests: dict) -> list[dict]:
    """``digests``: sha256 of the files already hashed while written (the shards); the rest are read."""
    from qoqopt.fileio import sha256_file

    return [{"path": f, "bytes": (tmp / f).stat().st_size, "sha256": digests.get(f) or sha256_file(tmp / f)}
            for f in sorted(files)]


# --------------------------------------------------------------------------- vision (opt-in)


@dataclass
class _VisionPlan:
    linears: dict[str, tuple[int, int]]  # canonical weight name (without .weight) -> (out, in)
    skipped: dict[str, str]  # runtime module name -> why


def _vision_plan(ckpt, spec, fmt: str) -> _VisionPlan:
    """Which vision-block Linears fit the format: whole groups along K, whole words along N."""
    pack_cols = (32 // spec.bits) if fmt == "gptq" else 8
    plan = _VisionPlan({}, {})
    for name in sorted(ckpt.names):
        if not (name.startswith("visual.blocks.") and name.endswith(".weight")):
            continue
        shape = tuple(ckpt.tensor_info(name)["shape"])
        if len(shape) != 2:
            continue  # norms
        n, k = shape
        module = name.removesuffix(".weight")
        why = None
        if spec.group_size != -1 and k % spec.group_size:
            why = f"in-features {k} not a multiple of group size {spec.group_size}"
        elif n % pack_cols or k % (32 // spec.bits):
            why = f"shape {n}x{k} does not pack into int32 words"
        if why:
            plan.skipped[vision_linear_name(name)] = why
        else:
            plan.linears[module] = (n, k)
    return plan


class _VisionStats:
    """Hooks on the vision tower during capture: a subsample of each planned Linear's inputs."""

    def __init__(self, plan: _VisionPlan):
        self.plan = plan
        self.samples: dict[str, list] = {}

    def hooks(self, visual) -> list:
        handles = []
        for module_name, mod in visual.named_modules():
            canon = "visual." + module_name
            if canon not in self.plan.linears:
                continue

            def hook(m, args, canon=canon):
                rows = args[0].detach().reshape(-1, args[0].shape[-1])
                step = max(1, rows.shape[0] // 64)
                self.samples.setdefault(canon, []).append(rows[::step].float().cpu())

            handles.append(mod.register_forward_pre_hook(hook))
        return handles


def spread_rows(rows, n: int):
    """At most ``n`` of ``rows``, evenly strided over all of them, as AutoAWQ samples its clipping
    tokens: the first ``n`` are the first ~8 chats' images (64 rows each) of a 64-chat calibration."""
    return rows[:: -(-len(rows) // n)][:n]


def _write_vision(ckpt, writer: ShardWriter, stats: _VisionStats, opts, fmt: str, log) -> dict[str, dict]:
    """Quantize the planned vision Linears (AWQ format only) and write them packed. Not layer-streamed
    (the tower is small) and clipping search only: no scale folding in the vision blocks."""
    import torch

    from qoqopt.quantize.awq import awq_quantize, search_clip
    from qoqopt.quantize.rtn import rtn_quantize

    done = {}
    for canon in sorted(stats.plan.linears):
        weight = ckpt.tensor(canon + ".weight").float()
        if opts.method == "awq":
            if canon not in stats.samples:
                raise QoqoptError(f"no calibration inputs reached {canon}")
            x = spread_rows(torch.cat(stats.samples[canon]), opts.awq_clip_tokens)
            qw = awq_quantize(weight, opts.spec, search_clip(weight, x, opts.spec, n_grid=opts.awq_grid))
        else:
            qw = rtn_quantize(weight, opts.spec)
        rel = float((qw.dequantize() - weight).norm() / weight.norm().clamp(min=1e-12))
        module = vision_linear_name(canon + ".weight")
        for key, tensor in _pack(fmt, qw).items():
            writer.add(f"{module}.{key}", tensor)
        if canon + ".bias" in ckpt.names:
            writer.add(f"{module}.bias", ckpt.tensor(canon + ".bias"))
        done[canon] = {"module": module, "weight_rel_error": round(rel, 6)}
    log(f"vision: quantized {len(done)} Linear(s), skipped {len(stats.plan.skipped)}")
    return done


# --------------------------------------------------------------------------- reading back


def dequantized_state_dict(path: Path, dtype=None) -> dict:
    """The exported directory as a plain (fake-quantized) state dict, runtime names, packed
    tensors unpacked with :mod:`qoqopt.packing` and dequantized in fp32."""
    import torch

    from qoqopt.packing import dequantize, unpack_awq, unpack_gptq

    path = Path(path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = _all_tensors(path)
    out = {}
    for name in sorted(tensors):
        if name.endswith(".qweight"):
            mod = name.removesuffix(".qweight")
            qweight, qzeros, scales = tensors[name], tensors[mod + ".qzeros"], tensors[mod + ".scales"]
            if qc["quant_method"] == "gptq":
                q, z = unpack_gptq(qweight, qzeros, qc["bits"])
                g_idx = tensors[mod + ".g_idx"]
            else:
                q, z = unpack_awq(qweight, qzeros)
                g_idx = torch.arange(q.shape[0]) // (q.shape[0] // scales.shape[0])
            out[mod + ".weight"] = dequantize(q, z, scales, g_idx).t().contiguous()
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            out[name] = tensors[name].float()
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return out


def _meta_model(path: Path):
    """An empty (meta-device) transformers Qwen2.5-VL model for an exported directory, and its
    quantization_config."""
    raw = json.loads((Path(path) / "config.json").read_text())
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") not in ("gptq", "awq"):
        raise QoqoptError(f"{path} is not a GPTQ/AWQ build (its config.json has no GPTQ or AWQ quantization_config); "
                          "an unquantized checkpoint loads with transformers' from_pretrained")  # fmt: skip
    model = meta_model(raw)
    if (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        # as from_pretrained reads it: without it generate() stopped at <|im_end|> only, and ran on
        # past the <|endoftext|> the build's own generation_config also stops at
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, qc


def _all_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def load_fake_quantized(path: Path, dtype=None):
    """A transformers Qwen2.5-VL model holding the dequantized weights of an exported directory."""
    import torch

    model, _ = _meta_model(path)
    state = dequantized_state_dict(path, dtype or torch.float32)
    state = {k: v for k, v in state.items() if not k.startswith("time_series_embedding.")}
    model.load_state_dict(state, strict=True, assign=True)
    _fix_rotary(model)
    return model.eval()


def load_with_quant_linear(path: Path | str, dtype=None):
    """The exported directory (or its Hub repo id) in a transformers model whose quantized Linears are
    qoqopt's own :class:`qoqopt.kernels.w4a16.QuantLinear`, built straight from the packed tensors
    (the closest real consumer of the format that runs here).

    Either key layout loads: the runtime names qoqopt writes, or the legacy ones transformers'
    ``save_pretrained`` writes. The model's config keeps the build's quantization_config, so a
    ``save_pretrained`` of it is again a GPTQ/AWQ checkpoint (without the ECG encoder, which the
    transformers class has no place for)."""
    import torch

    from qoqopt.kernels.w4a16 import replace_linears
    from qoqopt.loader import ECG_PREFIX, canonical_name, resolve, runtime_name

    path = resolve(str(path))[0]
    dtype = dtype or torch.float32
    model, qc = _meta_model(path)
    tensors = _all_tensors(path)
    # packed ints and scales stay as stored (the kernels and the torch reference take a scale of any
    # float dtype to fp32: fp16 ones rounded to bf16 moved weights by up to 0.4%); biases and every
    # plain weight take the compute dtype
    tensors = {runtime_name(canonical_name(k)): v.to(dtype) if _takes_dtype(k, v) else v
               for k, v in tensors.items() if not k.startswith(ECG_PREFIX)}  # fmt: skip
    replace_linears(model, tensors, method=qc["quant_method"], bits=qc["bits"], group_size=qc.get("group_size"),
                    checkpoint_format=_gptq_format(path, qc) if qc["quant_method"] == "gptq" else "gptq")  # fmt: skip
    quantized = {k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")}
    plain = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in quantized}
    missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    missing = [m for m in missing if m.rpartition(".")[0] not in quantized]
    if missing or unexpected:
        raise QoqoptError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _fix_rotary(model)
    # save_pretrained writes the config as held: without this the saved packed tensors would
    # claim to be an unquantized model
    model.config.quantization_config = dict(qc)
    return model.eval()


def _takes_dtype(name: str, tensor) -> bool:
    return tensor.is_floating_point() and not name.endswith(".scales")


def _gptq_format(path, qc: dict) -> str:
    """A GPTQ config's zero layout: "format" (transformers 5's key), else the legacy "checkpoint_format"
    (transformers 5 writes both, the same). Both, differing, are refused: transformers would read the
    legacy one, and "format" is the one its GPTQConfig documents."""
    named = {key: str(qc[key]).lower() for key in ("format", "checkpoint_format") if qc.get(key) is not None}
    if len(set(named.values())) > 1:
        raise QoqoptError(f"{path}: quantization_config names two GPTQ formats, format {named['format']!r} and "
                          f"checkpoint_format {named['checkpoint_format']!r}; make them agree")
    return next(iter(named.values()), "gptq")


def _fix_rotary(model) -> None:
    """Rotary inverse frequencies are non-persistent buffers: rebuild them off the meta device."""
    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
    vis = model.model.visual
    vis.rotary_pos_emb = type(vis.rotary_pos_emb)(vis.config)
