"""Sibling W4A16 projections that read the same input, launched as one.

A decoder layer's q/k/v projections read the same hidden state, and so do gate/up. At decode each
is its own launch, and a launch's host cost (QuantLinear's Python plus Triton's dispatch) is of the
order of the GPU time to stream a 4-bit 7B projection. Fused, a layer's 7 linears are 4 launches
and the activation is read once. The packed tensors concatenate along N exactly: qweight and scales
by column, qzeros by whole words (qzeros packs along N: a width that is not a multiple of 32 / bits
ends in a partial word, and such layers are not fused).

The parent's forward is not replaced (transformers' attention code changes between versions).
Each projection becomes a :class:`ProjectionSlice` over one :class:`SharedProjection`: the first
sibling called with a given input launches the fused layer, and the others, called with the same
tensor (unmodified since: same version counter), take their columns of that output. Any other call
order or input still gets the right answer, only without the saving.

The fused layer is registered on the parent under the field's name (``qkv_proj``,
``gate_up_proj``), so ``.to()`` moves it; state-dict hooks split it back on save and join it on
load, so the model keeps transformers' ``q_proj.qweight``-style keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._triton import tensor_version
from .w4a16 import DECODE_MAX_M, QuantLinear


@dataclass(frozen=True)
class Fusion:
    fused: str  # name of the fused layer on the parent
    parts: tuple[str, ...]  # the sibling projections, in output-column order
    # Parts whose prefill output may be kept as it comes (v goes into the KV cache unchanged): they
    # get their own copy, or a cache entry would pin the whole fused output. The others are consumed
    # at once (q and k by RoPE, gate and up by the gating), so views cost nothing.
    kept: tuple[str, ...] = ()


FUSIONS = (
    Fusion("qkv_proj", ("q_proj", "k_proj", "v_proj"), kept=("v_proj",)),
    Fusion("gate_up_proj", ("gate_proj", "up_proj")),
)
QUANT_NAMES = ("qweight", "qzeros", "scales", "bias")  # split along N; ``g_idx`` (along K) is shared


class SharedProjection:
    """The fused layer and the last output it computed, handed out one slice per sibling.

    A plain object, not a module: every slice refers to it, and the parent owns the layer. The
    cache never outlives one forward of the parent (a hook clears it), so a sibling that was not
    called, or an exception, leaves nothing pinned. Inference-mode tensors have no version counter:
    an input changed in place between two siblings of one forward would go unnoticed there
    (transformers' layers never do that).
    """

    def __init__(self, layer: QuantLinear, widths: tuple[int, ...], has_bias: tuple[bool, ...],
                 kept: tuple[int, ...] = ()):
        self.layer = layer
        self.widths = widths
        self.has_bias = has_bias  # a part without bias gets zeros in the fused one, and no key on save
        self.kept = kept  # indexes of the parts copied out at prefill (see Fusion.kept)
        self.clear()

    def clear(self, *_) -> None:
        self._input = self._version = self._outputs = None
        self._pending: set[int] = set()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if index in self._pending and x is self._input and tensor_version(x) == self._version:
            self._pending.discard(index)
            out = self._outputs[index]
            if not self._pending:
                self.clear()  # drop the references: the input and output belong to the caller now
            return out
        y = self.layer(x)
        outputs = y.split(self.widths, dim=-1)
        if self.kept and y.numel() > DECODE_MAX_M * y.shape[-1]:  # prefill (at decode, views are small)
            outputs = tuple(o.contiguous() if i in self.kept else o for i, o in enumerate(outputs))
        self._input, self._version, self._outputs = x, tensor_version(x), outputs
        self._pending = set(range(len(self.widths))) - {index}
        return outputs[index]


class ProjectionSlice(nn.Module):
    """Stands in for one sibling projection: its columns of the shared fused output."""

    def __init__(self, shared: SharedProjection, index: int):
        super().__init__()
        self.shared = shared
        self.index = index
        self.in_features = shared.layer.in_features
        self.out_features = shared.widths[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns of fused #{self.index}"


def fusion_blocker(layers: list[nn.Module]) -> str | None:
    """Why these sibling layers cannot run as one QuantLinear, or None."""
    if not all(isinstance(layer, QuantLinear) for layer in layers):
        return "not all are qoqopt QuantLinear"
    if any(layer.words != "gptq" for layer in layers):
        return "fragment words already (fuse first: a fused layer is repacked whole)"
    same = ("in_features", "bits", "group_size", "zero_offset", "source")  # source: the layout a save writes
    for name in same:
        if len({getattr(layer, name) for layer in layers}) > 1:
            return f"{name} differs"
    if len({layer.g_idx is None for layer in layers}) > 1:  # a save would give g_idx to those without
        return "some have a g_idx, some not"
    if len({(layer.scales.dtype, layer.scales.device) for layer in layers}) > 1:
        return "scales dtype or device differs"
    if any(layer.out_features % (32 // layer.bits) for layer in layers):  # qzeros join by whole words
        return f"a width is not a multiple of {32 // layers[0].bits} (its qzeros end in a partial word)"
    perms = [layer.perm for layer in layers]
    if any(p is None for p in perms) != all(p is None for p in perms) or (
        perms[0] is not None and not all(torch.equal(p, perms[0]) for p in perms)
    ):
        return "act-order permutations differ"
    return None


def concat_layers(layers: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose output columns are the layers', in order (see :func:`fusion_blocker`)."""
    first = layers[0]
    biases = None
    if any(layer.bias is not None for layer in layers):
        # zeros of the biases' dtype (scales may be kept in the checkpoint's fp16 under a bf16 model)
        given = next(layer.bias for layer in layers if layer.bias is not None)
        biases = torch.cat([layer.bias if layer.bias is not None else given.new_zeros(layer.out_features)
                            for layer in layers])
    return QuantLinear(*(torch.cat([getattr(layer, name) for layer in layers], dim=1)
                         for name in ("qweight", "qzeros", "scales")),
                       biases, bits=first.bits, group_size=first.group_size, zero_offset=first.zero_offset,
                       perm=first.perm, g_idx=first.g_idx, source=first.source, strict=first.strict)


def fuse_projections(model: nn.Module, skipped: dict[str, str] | None = None) -> dict[str, int]:
    """Fuse every sibling group of :data:`FUSIONS` whose members are QuantLinear, in place.

    Returns how many groups were fused per fused name; groups that cannot be fused are left as they
    are, with the reason in ``skipped`` (keyed by the parent's path).
    """
    counts = {fusion.fused: 0 for fusion in FUSIONS}
    # Parents only: a list of every module would keep each replaced layer's weights alive (beside
    # their fused copy) until the last group is fused.
    parents = [(path, module) for path, module in model.named_modules()
               if any(isinstance(getattr(module, name, None), QuantLinear) for f in FUSIONS for name in f.parts)]
    for path, parent in parents:
        for fusion in FUSIONS:
            layers = [getattr(parent, name, None) for name in fusion.parts]
            if not any(isinstance(layer, QuantLinear) for layer in layers):
                continue
            reason = fusion_blocker(layers)
            if reason is not None:
                if skipped is not None:
                    skipped[f"{path}.{fusion.fused}"] = f"not fused: {reason}"
                continue
            _fuse(parent, fusion, layers)
            counts[fusion.fused] += 1
    return counts


def _fuse(parent: nn.Module, fusion: Fusion, layers: list[QuantLinear]) -> None:
    shared = SharedProjection(concat_layers(layers), tuple(layer.out_features for layer in layers),
                              tuple(layer.bias is not None for layer in layers),
                              tuple(i for i, name in enumerate(fusion.parts) if name in fusion.kept))
    parent.add_module(fusion.fused, shared.layer)
    for index, name in enumerate(fusion.parts):
        setattr(parent, name, ProjectionSlice(shared, index))
    parent.register_forward_hook(shared.clear, always_call=True)
    parent.register_state_dict_post_hook(_SplitOnSave(fusion, shared))
    parent.register_load_state_dict_pre_hook(_JoinOnLoad(fusion, shared))


def _column_splits(shared: SharedProjection, name: str) -> tuple[int, ...]:
    """Column widths of each part in the fused tensor ``name`` (qzeros packs 32 / bits per word)."""
    awq = shared.layer.source == "awq"  # saved as AWQ: its qweight is packed along N too
    pack = 32 // shared.layer.bits if name == "qzeros" or (name == "qweight" and awq) else 1
    return tuple(width // pack for width in shared.widths)


class _SplitOnSave:
    def __init__(self, fusion: Fusion, shared: SharedProjection):
        self.fusion, self.shared = fusion, shared

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        fused = f"{prefix}{self.fusion.fused}."
        for name in (*QUANT_NAMES, "g_idx"):
            tensor = state_dict.pop(fused + name, None)
            if tensor is None:
                continue
            # clones: savers treat views of one storage as tied weights
            parts = ([tensor] * len(self.fusion.parts) if name == "g_idx"
                     else tensor.split(_column_splits(self.shared, name), dim=-1))
            for part_name, part, has_bias in zip(self.fusion.parts, parts, self.shared.has_bias):
                if name != "bias" or has_bias:
                    state_dict[f"{prefix}{part_name}.{name}"] = part.clone()


class _JoinOnLoad:
    def __init__(self, fusion: Fusion, shared: SharedProjection):
        self.fusion, self.shared = fusion, shared

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        for name in (*QUANT_NAMES, "g_idx"):
            parts = [state_dict.pop(f"{prefix}{part}.{name}", None) for part in self.fusion.parts]
            if all(p is None for p in parts):
                continue
            if name == "bias":  # zeros where a part has none, as at fusion time (beside the given ones)
                given = next(p for p in parts if p is not None)
                parts = [p if p is not None else given.new_zeros(width) for p, width in zip(parts, self.shared.widths)]
            elif any(p is None for p in parts):
                errors.append(f"{prefix}: {name} is missing for some of {', '.join(self.fusion.parts)}")
                continue
            if name == "g_idx" and not all(torch.equal(p, parts[0]) for p in parts):
                errors.append(f"{prefix}: {', '.join(self.fusion.parts)} have different act-order permutations")
                continue
            joined = parts[0] if name == "g_idx" else torch.cat(parts, dim=-1)
            state_dict[f"{prefix}{self.fusion.fused}.{name}"] = joined
