"""Checkpoint tensor names -> GGUF tensor names, as one declarative table.

Every canonical tensor of a QoQ-Med / Qwen2.5-VL checkpoint (see `qoqopt.loader`: `visual.*`,
`model.*`, `lm_head.*`, `time_series_embedding.*`, whichever key layout was on disk) must match
exactly one rule here:
- a TEXT rule: it goes into `<Name>.<QUANT>.gguf` (llama.cpp arch `qwen2vl`);
- a VISION rule: it goes into `mmproj-<Name>-<type>.gguf` (llama.cpp arch `clip`,
  projector `qwen2.5vl_merger`);
- a SKIP rule: it is left out on purpose, with the reason printed and written to the README.

A tensor matching no rule is an error (gguf-py's own map silently drops what it doesn't know;
that is how an mmproj ends up empty). The table is also a completeness spec: every rule with a
block index must be matched for every block, so a checkpoint missing a tensor fails here too.

The GGUF names are the ones llama.cpp's loaders look up (`src/llama-arch.cpp` for qwen2vl,
`tools/mtmd/clip-impl.h` for clip); `tests/test_gguf_map.py` checks them against gguf-py's
constants. Two vision tensors are split on the way:
- `attn.qkv` (3*d rows) -> `attn_q`, `attn_k`, `attn_v` (d rows each), weight and bias;
- `patch_embed.proj.weight`, a Conv3d [d, 3, 2, 14, 14] over two frames, -> two Conv2d weights
  `v.patch_embd.weight` (frame 0) and `v.patch_embd.weight.1` (frame 1); clip.cpp adds their outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qoqopt.errors import QoqoptError

# ---------------------------------------------------------------------------- the table

TEXT, VISION, SKIP = "text", "vision", "skip"

# split kinds
WHOLE = "whole"  # the tensor as it is
QKV_ROWS = "qkv_rows"  # thirds along dim 0 -> q, k, v
TEMPORAL = "temporal"  # Conv3d [out, in, t=2, kh, kw] -> frame t as Conv2d [out, in, kh, kw]

ECG_SKIP_REASON = (
    "QoQ-Med's ECG encoder (ECG-JEPA + Linear to the text width); llama.cpp has no ECG encoder, "
    "so GGUF builds read ECGs only as rendered images"
)


@dataclass(frozen=True)
class Rule:
    part: str  # TEXT | VISION | SKIP
    source: str  # canonical name; `{bid}` = block index; a trailing `*` = any suffix (SKIP only)
    targets: tuple[str, ...] = ()  # GGUF names, `{bid}` filled in
    split: str = WHOLE
    reason: str = ""  # SKIP only

    @property
    def per_block(self) -> bool:
        return "{bid}" in self.source


def _text(source: str, target: str) -> Rule:
    return Rule(TEXT, source, (target,))


def _vision(source: str, *targets: str, split: str = WHOLE) -> Rule:
    return Rule(VISION, source, targets, split)


RULES: tuple[Rule, ...] = (
    # ---- text model (llama.cpp LLM_ARCH_QWEN2VL)
    _text("model.embed_tokens.weight", "token_embd.weight"),
    _text("model.layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight"),
    _text("model.layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight"),
    _text("model.layers.{bid}.self_attn.q_proj.bias", "blk.{bid}.attn_q.bias"),
    _text("model.layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight"),
    _text("model.layers.{bid}.self_attn.k_proj.bias", "blk.{bid}.attn_k.bias"),
    _text("model.layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight"),
    _text("model.layers.{bid}.self_attn.v_proj.bias", "blk.{bid}.attn_v.bias"),
    _text("model.layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight"),
    _text("model.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight"),
    _text("model.layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight"),
    _text("model.layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight"),
    _text("model.layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight"),
    _text("model.norm.weight", "output_norm.weight"),
    _text("lm_head.weight", "output.weight"),
    # ---- vision tower + merger (llama.cpp clip, PROJECTOR_TYPE_QWEN25VL)
    _vision("visual.patch_embed.proj.weight", "v.patch_embd.weight", "v.patch_embd.weight.1", split=TEMPORAL),
    _vision("visual.blocks.{bid}.norm1.weight", "v.blk.{bid}.ln1.weight"),
    _vision("visual.blocks.{bid}.norm2.weight", "v.blk.{bid}.ln2.weight"),
    _vision(
        "visual.blocks.{bid}.attn.qkv.weight",
        "v.blk.{bid}.attn_q.weight", "v.blk.{bid}.attn_k.weight", "v.blk.{bid}.attn_v.weight",
        split=QKV_ROWS,
    ),  # fmt: skip
    _vision(
        "visual.blocks.{bid}.attn.qkv.bias",
        "v.blk.{bid}.attn_q.bias", "v.blk.{bid}.attn_k.bias", "v.blk.{bid}.attn_v.bias",
        split=QKV_ROWS,
    ),  # fmt: skip
    _vision("visual.blocks.{bid}.attn.proj.weight", "v.blk.{bid}.attn_out.weight"),
    _vision("visual.blocks.{bid}.attn.proj.bias", "v.blk.{bid}.attn_out.bias"),
    _vision("visual.blocks.{bid}.mlp.gate_proj.weight", "v.blk.{bid}.ffn_gate.weight"),
    _vision("visual.blocks.{bid}.mlp.gate_proj.bias", "v.blk.{bid}.ffn_gate.bias"),
    _vision("visual.blocks.{bid}.mlp.up_proj.weight", "v.blk.{bid}.ffn_up.weight"),
    _vision("visual.blocks.{bid}.mlp.up_proj.bias", "v.blk.{bid}.ffn_up.bias"),
    _vision("visual.blocks.{bid}.mlp.down_proj.weight", "v.blk.{bid}.ffn_down.weight"),
    _vision("visual.blocks.{bid}.mlp.down_proj.bias", "v.blk.{bid}.ffn_down.bias"),
    _vision("visual.merger.ln_q.weight", "v.post_ln.weight"),
    _vision("visual.merger.mlp.0.weight", "mm.0.weight"),
    _vision("visual.merger.mlp.0.bias", "mm.0.bias"),
    _vision("visual.merger.mlp.2.weight", "mm.2.weight"),
    _vision("visual.merger.mlp.2.bias", "mm.2.bias"),
    # ---- deliberately left out
    Rule(SKIP, "time_series_embedding.*", reason=ECG_SKIP_REASON),
)


def _compile(rule: Rule) -> re.Pattern:
    pattern = re.escape(rule.source).replace(r"\{bid\}", r"(?P<bid>\d+)")
    if pattern.endswith(r"\*"):
        pattern = pattern[:-2] + ".*"
    return re.compile(pattern + r"\Z")


_COMPILED = [(_compile(r), r) for r in RULES]


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Entry:
    """One GGUF tensor: where it comes from and what shape it has (numpy order, rows first)."""

    target: str
    source: str
    shape: tuple[int, ...]
    split: str = WHOLE
    index: int = 0  # which third (QKV_ROWS) or which frame (TEMPORAL)


@dataclass
class Mapping:
    text: list[Entry] = field(default_factory=list)
    vision: list[Entry] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> source names

    def entries(self, part: str) -> list[Entry]:
        return self.text if part == TEXT else self.vision

    def skip_summary(self) -> list[str]:
        return [f"{len(names)} tensor(s) {_prefix(names)}: {reason}" for reason, names in self.skipped.items()]


def _prefix(names: list[str]) -> str:
    first = names[0].split(".")[0]
    return f"{first}.*" if all(n.startswith(first + ".") for n in names) else ", ".join(names[:3])


def by_block(lines: list[str]) -> list[str]:
    """Lines that differ only in a block number, once each with a count:
    'blk.0.ffn_down.weight ...', 'blk.1.ffn_down.weight ...' -> 'blk.*.ffn_down.weight ... (x2)'."""
    counts: dict[str, int] = {}
    for line in lines:
        key = re.sub(r"blk\.\d+\.", "blk.*.", line)
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} (x{n})" if n > 1 else k for k, n in counts.items()]


def match(name: str) -> tuple[Rule, int | None]:
    """The rule a canonical tensor name falls under, and its block index. Unmapped -> QoqoptError."""
    for regex, rule in _COMPILED:
        m = regex.match(name)
        if m:
            bid = m.groupdict().get("bid")
            return rule, (int(bid) if bid is not None else None)
    raise QoqoptError(f"tensor {name!r} has no GGUF mapping")


def split_shape(shape: tuple[int, ...], split: str, name: str) -> tuple[int, ...]:
    if split == WHOLE:
        return tuple(shape)
    if split == QKV_ROWS:
        if shape[0] % 3:
            raise QoqoptError(f"{name}: {shape[0]} rows cannot be split into q, k, v")
        return (shape[0] // 3, *shape[1:])
    if split == TEMPORAL:
        if len(shape) != 5 or shape[2] != 2:
            raise QoqoptError(f"{name}: expected a Conv3d weight [out, in, 2, kh, kw], got {list(shape)}")
        return (shape[0], shape[1], shape[3], shape[4])
    raise AssertionError(split)


def _block_key(rule: Rule, order: int, bid: int | None) -> int:
    """File order: a part's leading tensors, then block 0, 1, ..., then its trailing tensors."""
    if bid is not None:
        return bid
    first_block_rule = min(i for i, r in enumerate(RULES) if r.part == rule.part and r.per_block)
    return -1 if order < first_block_rule else 1 << 30


def build_mapping(shapes: dict[str, tuple[int, ...]], n_layers: int, n_vision_blocks: int | None) -> Mapping:
    """Map every canonical tensor; fail on unmapped names and on tensors the table expects but lacks.

    `n_vision_blocks` None means the checkpoint has no vision tower to export (then any vision
    tensor is an error, since it would be silently unused).
    """
    unmapped, mapping = [], Mapping()
    found: dict[tuple[str, int | None], str] = {}
    for name in sorted(shapes):
        try:
            rule, bid = match(name)
        except QoqoptError:
            unmapped.append(name)
            continue
        if rule.part == SKIP:
            mapping.skipped.setdefault(rule.reason, []).append(name)
            continue
        found[(rule.source, bid)] = name
    if unmapped:
        more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
        raise QoqoptError(
            f"{len(unmapped)} tensor(s) have no GGUF mapping: {', '.join(unmapped[:5])}{more} "
            "(refusing to drop them silently)"
        )
    blocks = {TEXT: n_layers, VISION: n_vision_blocks}
    missing, ordered = [], []
    for order, rule in enumerate(RULES):
        if rule.part == SKIP:
            continue
        count = blocks[rule.part]
        if count is None:
            stray = [n for (src, _), n in found.items() if src == rule.source]
            if stray:
                raise QoqoptError(f"{stray[0]} is a vision tensor but the config has no vision_config")
            continue
        for bid in range(count) if rule.per_block else [None]:
            name = found.pop((rule.source, bid), None)
            if name is None:
                missing.append(rule.source.replace("{bid}", str(bid)))
                continue
            fmt = {"bid": bid} if bid is not None else {}
            shape = split_shape(shapes[name], rule.split, name)
            for i, target in enumerate(rule.targets):
                key = (_block_key(rule, order, bid), order, i)
                ordered.append((key, rule.part, Entry(target.format(**fmt), name, shape, rule.split, i)))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise QoqoptError(f"checkpoint lacks {len(missing)} tensor(s) GGUF needs: {', '.join(missing[:3])}{more}")
    for _, part, entry in sorted(ordered, key=lambda t: t[0]):
        mapping.entries(part).append(entry)
    if found:  # block indexes beyond the config's layer count
        extra = sorted(found.values())
        raise QoqoptError(f"{len(extra)} tensor(s) beyond the configured layer count, e.g. {extra[0]}")
    return mapping
