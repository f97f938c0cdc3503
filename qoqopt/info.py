"""`qoqopt info`: what a checkpoint is, computed from its metadata and (if present) shard headers."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from .loader import SAFETENSORS_DTYPE_BYTES, Checkpoint, find_chat_template, part_of
from .build_info import decimal_size
from .errors import QoqoptError, printable
from .manifest import made_from

PARTS = ("text", "vision", "ecg")
# a packed Linear's tensors: the one holding its integer levels (counted as K x N parameters), and
# the quantization metadata beside it (scales, zero points, g_idx, shape: not parameters)
PACKED_LEVELS = (".qweight", ".weight_packed")  # GPTQ / AWQ, compressed-tensors pack-quantized
PACKED_META = (".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx",
               # bitsandbytes: 4-bit block absmax (nested with double quant), code books, the packed quant state;
               # LLM.int8's per-row scales
               ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
               ".quant_state.bitsandbytes__fp4", ".SCB", ".weight_format")  # fmt: skip


@dataclass
class Summary:
    source: str
    architecture: str
    layout: str
    text: dict
    vision: dict
    params: dict[str, int | None]
    tensors: dict[str, int]
    dtype: str
    total_bytes: int | None
    shards: list[tuple[str, int | None]]
    missing: list[str]
    files: dict[str, bool]
    ecg: bool
    notes: list[str] = field(default_factory=list)
    quantization: dict | None = None  # from config.json's quantization_config, for a quantized build
    build: dict | None = None  # from a qoqopt GPTQ/AWQ build's manifest.json: source, calibration, layer errors


def _tensor_counts(ckpt: Checkpoint) -> dict[str, int]:
    counts = Counter(part_of(n) for n in ckpt.names)
    return {p: counts.get(p, 0) for p in PARTS}


def params_from_headers(ckpt: Checkpoint, bits: int | None = None) -> tuple[dict[str, int], str]:
    """Parameters per part and the dtype most of the unpacked ones have. Packed Linears (``bits``)
    count as the K x N weights they hold, not as the words they are stored in (int32 for GPTQ/AWQ;
    uint8 or bfloat16 for bitsandbytes 4-bit, whose packed weight keeps the name ``weight``)."""
    params: Counter = Counter()
    dtypes: Counter = Counter()
    names = set(ckpt.names)
    for name in ckpt.names:
        if name.endswith(PACKED_META):
            continue
        info = ckpt.tensor_info(name)
        n = math.prod(info["shape"])
        if bits and (name.endswith(PACKED_LEVELS) or _bnb_packed(name, names)):
            params[part_of(name)] += n * 8 * SAFETENSORS_DTYPE_BYTES[info["dtype"]] // bits
            continue
        params[part_of(name)] += n
        dtypes[info["dtype"]] += n
    return {p: params.get(p, 0) for p in PARTS}, dtypes.most_common(1)[0][0]


def _bnb_packed(name: str, names: set[str]) -> bool:
    """A bitsandbytes Linear's weight: 4-bit beside its absmax, LLM.int8 beside its row scales (SCB)."""
    return f"{name}.absmax" in names or (name.endswith(".weight") and f"{name.removesuffix('weight')}SCB" in names)


def quantization(config: dict, names: list[str]) -> dict | None:
    """What a quantized build declares, in one shape for GPTQ, AWQ and compressed-tensors configs."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method", "?")
    if method == "bitsandbytes":
        return _bitsandbytes(qc, names)
    if method == "compressed-tensors":
        weights = next(iter(qc.get("config_groups", {}).values()), {}).get("weights", {})
        bits, group, sym, plain = weights.get("num_bits"), weights.get("group_size"), weights.get("symmetric"), qc.get("ignore", [])
        order = weights.get("actorder") and f"actorder {weights['actorder']}"
        method = f"compressed-tensors ({qc.get('format', '?')})"
    else:
        bits, group = qc.get("bits"), qc.get("group_size")
        sym = qc.get("sym") if method == "gptq" else not qc.get("zero_point", True)
        plain = qc.get("modules_to_not_convert") or [_module_of(k[2:]) for k in qc.get("dynamic", {}) if k.startswith("-:")]
        order = _gptq_order(qc) if method == "gptq" else None
    packed = sum(n.endswith(PACKED_LEVELS) for n in names)
    quantizer = (qc.get("meta") or {}).get("quantizer") or qc.get("quantizer")
    return {"method": method, "bits": bits, "group_size": group, "sym": sym, "order": order,
            "packed_linears": packed, "left_plain": list(plain), "quantizer": quantizer}  # fmt: skip


def _bitsandbytes(qc: dict, names: list[str]) -> dict:
    """A bitsandbytes config (transformers' BitsAndBytesConfig): 4-bit NF4/FP4 in blocks of 64 (the
    block size transformers quantizes with; the config does not record it), or LLM.int8 per row."""
    four = bool(qc.get("load_in_4bit"))
    kind = qc.get("bnb_4bit_quant_type", "fp4") if four else "LLM.int8"
    present = set(names)  # once: a 7B build has thousands of names
    packed = sum(_bnb_packed(n, present) for n in names)
    return {"method": f"bitsandbytes ({kind})", "bits": 4 if four else 8 if qc.get("load_in_8bit") else None,
            "group_size": 64 if four else -1, "sym": True, "order": None, "packed_linears": packed,
            "left_plain": list(qc.get("llm_int8_skip_modules") or []), "quantizer": None}  # fmt: skip


def _gptq_order(qc: dict) -> str | None:
    """The visiting order a GPTQ config records: at its top level (qoqopt) or under meta (GPTQModel)."""
    meta = qc.get("meta") or {}
    if qc.get("desc_act"):
        return "desc_act"
    if qc.get("static_groups") or meta.get("static_groups"):
        return "static groups"
    return "group-aware" if meta.get("act_group_aware") else None


def _params_from_meta(ckpt: Checkpoint, notes: list[str]) -> dict[str, int | None]:
    """Text and vision counts from meta-device shapes; the ECG encoder's from the index's byte total."""
    params: Counter = Counter()
    for name, shape in ckpt.expected_shapes().items():
        params[part_of(name)] += math.prod(shape)
    out: dict[str, int | None] = {"text": params["text"], "vision": params["vision"], "ecg": 0}
    if any(part_of(n) == "ecg" for n in ckpt.names):
        out["ecg"] = None  # the index has names but no shapes
        width = SAFETENSORS_DTYPE_BYTES.get(_config_dtype(ckpt), 2)
        if ckpt.index_total_size:
            rest = ckpt.index_total_size - width * (params["text"] + params["vision"])
            notes.append(
                f"ECG encoder holds the remaining {decimal_size(rest)} of the index total (no shapes without the "
                f"shards: {_count(rest // 4)} params if stored fp32, {_count(rest // 2)} if bf16)"
            )
    return out


def _config_dtype(ckpt: Checkpoint) -> str:
    name = ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "bfloat16"
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(str(name), str(name).upper())


def summarize(ckpt: Checkpoint) -> Summary:
    cfg = ckpt.hf_config()
    t, v = cfg.text_config, cfg.vision_config
    notes: list[str] = []
    missing = ckpt.missing_shards()
    quant = quantization(ckpt.config, ckpt.names)
    if missing:
        params = _params_from_meta(ckpt, notes)
        dtype = _config_dtype(ckpt) + " (from config.json)"
        shard_sizes = [(f, None) for f in ckpt.shard_files]
    else:
        params, dtype = params_from_headers(ckpt, quant and quant["bits"])
        shard_sizes = [(f, (ckpt.path / f).stat().st_size) for f in ckpt.shard_files]
    total = ckpt.index_total_size or sum(s or 0 for _, s in shard_sizes) or None
    files = {
        "tokenizer": (ckpt.path / "tokenizer.json").exists() or (ckpt.path / "vocab.json").exists(),
        "tokenizer_config": (ckpt.path / "tokenizer_config.json").exists(),
        "processor": (ckpt.path / "preprocessor_config.json").exists(),
        "chat_template": find_chat_template(ckpt.path) is not None,
        "generation_config": (ckpt.path / "generation_config.json").exists(),
    }
    text = dict(
        hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_hidden_layers,
        heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, vocab=t.vocab_size,
        head_dim=t.hidden_size // t.num_attention_heads, rope_theta=t.rope_parameters.get("rope_theta"),
        mrope_section=t.rope_parameters.get("mrope_section"), rms_eps=t.rms_norm_eps,
        tied_embeddings=cfg.tie_word_embeddings,
    )  # fmt: skip
    if "vision_config" not in ckpt.config:
        notes.append("config.json has no vision_config: the vision dims above are transformers' defaults, "
                     "not read from this checkpoint")
    vision = dict(
        depth=v.depth, hidden=v.hidden_size, intermediate=v.intermediate_size, heads=v.num_heads,
        head_dim=v.hidden_size // v.num_heads, patch=v.patch_size, merge=v.spatial_merge_size,
        temporal_patch=v.temporal_patch_size, window=v.window_size,
        fullatt_blocks=list(v.fullatt_block_indexes), out_hidden=v.out_hidden_size,
    )  # fmt: skip
    build = _build_record(ckpt.path)
    notes += (build or {}).get("notes", [])
    return Summary(
        ckpt.source, ckpt.architecture, ckpt.layout, text, vision, params, _tensor_counts(ckpt),
        dtype, total, shard_sizes, missing, files, ckpt.has_ecg_encoder, notes, quant, build,
    )  # fmt: skip


def _build_record(folder) -> dict | None:
    """What a qoqopt GPTQ/AWQ build's manifest says of how it was made (None for any other folder)."""
    from .fileio import read_json

    try:
        manifest = read_json(folder / "manifest.json")
    except (OSError, QoqoptError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") not in ("gptq", "awq"):
        return None
    errors = [(r["rel_error"], r["layer"]) for r in manifest.get("layers") or [] if r.get("rel_error") is not None]
    return {"made_from": manifest.get("source"), "calibration": manifest.get("calibration"),
            "mean_layer_error": sum(e for e, _ in errors) / len(errors) if errors else None,
            "worst_layer": max(errors) if errors else None, "layers": len(errors),
            "notes": list(manifest.get("notes") or [])}  # fmt: skip


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _module_of(rule: str) -> str:
    """A GPTQ ``dynamic`` exclusion written as ``^name(\\.|$)`` (what qoqopt and GPTQModel write) as the
    plain module name; any other regex as it is."""
    m = re.fullmatch(r"\^((?:[A-Za-z0-9_]|\\\.)+)\(\\\.\|\$\)", rule)
    return m.group(1).replace("\\.", ".") if m else rule


def _render_quantization(q: dict) -> str:
    sym = {True: "symmetric", False: "zero points"}.get(q["sym"], "?")
    group = "per channel" if q["group_size"] in (-1, None) else f"group {q['group_size']}"
    order = f", {q['order']}" if q["order"] else ""
    by = f"; by {', '.join(q['quantizer'])}" if isinstance(q["quantizer"], list) else ""
    plain = ", ".join(q["left_plain"][:4]) + (f" (+{len(q['left_plain']) - 4})" if len(q["left_plain"]) > 4 else "")
    return (f"quantized    {q['method']} {q['bits']}-bit, {group}, {sym}{order}: {q['packed_linears']} Linears packed"
            f"; left plain: {plain or 'none declared'}{by}")  # fmt: skip


def _render_build(b: dict) -> list[str]:
    lines = []
    if b["made_from"]:
        lines.append(f"made from    {made_from(b['made_from'])}")
    if c := b["calibration"]:
        domains = ", ".join(f"{d} {n}" for d, n in (c.get("domains") or {}).items())
        lines.append(f"calibrated   {c.get('chats')} chats, {c.get('tokens', 0):,} tokens ({c.get('image_tokens', 0):,} image) "
                     f"from {c.get('source')}" + (f": {domains}" if domains else ""))  # fmt: skip
    if b["worst_layer"]:
        worst, layer = b["worst_layer"]
        lines.append(f"layer error  relative output error per decoder layer: mean {b['mean_layer_error']:.4f}, "
                     f"worst {worst:.4f} (layer {layer + 1} of {b['layers']}, as the export log counts)")  # fmt: skip
    return lines


def render(s: Summary) -> str:
    t, v = s.text, s.vision
    known = [p for p in s.params.values() if p is not None]
    lines = [
        f"checkpoint   {s.source}",
        f"architecture {s.architecture}" + ("  (QoQ-Med variant with ECG encoder)" if s.ecg else ""),
        f"key layout   {s.layout}",
        f"text         hidden {t['hidden']}, intermediate {t['intermediate']}, {t['layers']} layers, "
        f"{t['heads']} heads / {t['kv_heads']} KV (head_dim {t['head_dim']}), vocab {t['vocab']}",
        f"             rope_theta {t['rope_theta']:g}, mrope_section {t['mrope_section']}, rms_eps {t['rms_eps']:g}, "
        f"tied embeddings {t['tied_embeddings']}",
        f"vision       depth {v['depth']}, hidden {v['hidden']}, intermediate {v['intermediate']}, "
        f"{v['heads']} heads (head_dim {v['head_dim']}), patch {v['patch']}, merge {v['merge']}, "
        f"temporal patch {v['temporal_patch']}",
        f"             window {v['window']}, full-attention blocks {v['fullatt_blocks']}, "
        f"merger -> {v['out_hidden']}",
    ]
    if s.ecg:
        lines.append(
            f"ECG encoder  time_series_embedding.*: {s.tensors['ecg']} tensors, {_count(s.params['ecg'])} params "
            "(ECG-JEPA + Linear to hidden; ignored by the plain Qwen2.5-VL class)"
        )
    lines.append(
        "parameters   "
        + ", ".join(f"{p} {_count(s.params[p])} ({s.tensors[p]} tensors)" for p in ("text", "vision", "ecg") if s.tensors[p])
        + (f"; total {_count(sum(known))}" if len(known) == len(s.params) else "")
    )
    lines.append(f"dtype        {s.dtype}" + (" (the unpacked tensors)" if s.quantization else ""))
    if s.quantization:
        lines.append(_render_quantization(s.quantization))
    if s.build:
        lines += _render_build(s.build)
    lines.append(f"size         {decimal_size(s.total_bytes)} in {len(s.shards)} shard(s)")
    for name, size in s.shards:
        lines.append(f"  {name:40s} {'MISSING' if name in s.missing else decimal_size(size)}")
    lines.append("files        " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in s.files.items()))
    if s.missing:
        lines.append(
            f"weights      MISSING: {len(s.missing)} of {len(s.shards)} shard(s) not present "
            f"({', '.join(s.missing)}); metadata only, shapes from the meta-device model"
        )
    lines += [f"note         {n}" for n in s.notes]
    return "\n".join(map(printable, lines))  # config.json's and manifest.json's values, as they are in the file
