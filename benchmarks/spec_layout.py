"""The GPTQ v1, AWQ GEMM and compressed-tensors pack-quantized layouts, unpacked as their specs
state them, bit by bit in numpy.

An independent reading of exported checkpoints: it imports nothing from qoqopt, so the tests can
hold qoqopt's packing against it, and check_ecosystem_loaders.py can use it inside a venv that has
only the loader libraries.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

AWQ_NIBBLE_TO_COLUMN = [0, 2, 4, 6, 1, 3, 5, 7]  # the AWQ GEMM layout: nibble i of a word holds column 8c + this


def u32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32).astype(np.uint64)


def spec_unpack_gptq(qweight, qzeros, bits):
    """GPTQ v1: value k of column n is bits [b*(k%f), b*(k%f)+b) of qweight[k//f, n]; zeros packed the
    same way along N, stored as zero - 1."""
    f, mask = 32 // bits, (1 << bits) - 1
    qw, qz = u32(qweight), u32(qzeros)
    k, n = qw.shape[0] * f, qw.shape[1]
    ints = np.zeros((k, n), dtype=np.int64)
    for row in range(k):
        ints[row] = (qw[row // f] >> np.uint64(bits * (row % f))) & np.uint64(mask)
    zeros = np.zeros((qz.shape[0], n), dtype=np.int64)
    for col in range(n):
        zeros[:, col] = ((qz[:, col // f] >> np.uint64(bits * (col % f))) & np.uint64(mask)) + 1
    return ints, zeros


def spec_unpack_awq(qweight, qzeros):
    """AWQ GEMM: nibble i of word [r, c] holds column 8c + [0,2,4,6,1,3,5,7][i]; zeros likewise, no offset."""

    def unpack(words):
        w = u32(words)
        out = np.zeros((w.shape[0], w.shape[1] * 8), dtype=np.int64)
        for i, col in enumerate(AWQ_NIBBLE_TO_COLUMN):
            out[:, col::8] = (w >> np.uint64(4 * i)) & np.uint64(0xF)
        return out

    return unpack(qweight), unpack(qzeros)


def unpack_dense(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """compressed-tensors' dense packing along the last axis: element i is the ``bits`` bits from global
    bit i*bits on, least significant first, across little-endian int32 words (no padding between
    elements); returned unsigned."""
    raw = np.unpackbits(np.ascontiguousarray(words.astype("<i4")).view(np.uint8), axis=-1, bitorder="little")
    fields = raw[..., : count * bits].reshape(*raw.shape[:-1], count, bits).astype(np.int64)
    return fields @ (1 << np.arange(bits, dtype=np.int64))


def spec_unpack_compressed(tensors: dict, module: str, bits: int):
    """pack-quantized: weight_packed [N, ceil(K*b/32)] packed along K, zero points [ceil(N*b/32), G] packed
    along N; both store the signed value + 2**(b-1). Returns (ints [K, N], zeros [G, N]) in GPTQ's
    orientation, so that spec_dequantize applies; a symmetric scheme has no zero point (zero = 0)."""
    n, k = (int(d) for d in tensors[module + ".weight_shape"])
    offset = 1 << (bits - 1)
    packed, scales = tensors[module + ".weight_packed"], tensors[module + ".weight_scale"]
    groups = scales.shape[1]
    _expect(module, "weight_packed", packed, (n, -(-k * bits // 32)))
    _expect(module, "weight_scale", scales, (n, groups), dtype=None)
    ints = unpack_dense(packed.numpy(), bits, k) - offset  # [N, K], signed
    if module + ".weight_zero_point" in tensors:
        zp = tensors[module + ".weight_zero_point"]
        _expect(module, "weight_zero_point", zp, (-(-n * bits // 32), groups))  # packed along N
        zeros = unpack_dense(zp.numpy().T, bits, n) - offset  # [G, N]
    else:
        zeros = np.zeros((groups, n), dtype=np.int64)
    return ints.T, zeros


def _expect(module: str, name: str, t: torch.Tensor, shape: tuple, dtype=torch.int32) -> None:
    if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{module}.{name}: {t.dtype} {tuple(t.shape)}, the pack-quantized layout has "
                         f"{dtype or 'float'} {shape}")  # fmt: skip


def spec_dequantize(ints, zeros, scales, g_idx) -> torch.Tensor:
    """W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n], as an nn.Linear weight [N, K]."""
    g = np.asarray(g_idx, dtype=np.int64)
    s = scales.float().numpy()
    w = (ints - zeros[g]).astype(np.float32) * s[g]
    return torch.from_numpy(np.ascontiguousarray(w.T))


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def spec_module_weight(tensors: dict, module: str, qc: dict) -> torch.Tensor:
    """Dequantized [N, K] weight of one packed Linear under its quantization_config ``qc``."""
    if qc["quant_method"] == "compressed-tensors":
        weights = _compressed_scheme(qc)
        ints, zeros = spec_unpack_compressed(tensors, module, weights["num_bits"])
        scales = tensors[module + ".weight_scale"].T  # [N, G] -> [G, N]
        k, gs = ints.shape[0], -(-ints.shape[0] // scales.shape[0])  # one column of scales per group (or channel)
        g_idx = tensors.get(module + ".weight_g_idx")
        if g_idx is None or bool((g_idx < 0).any()):  # -1 marks "not set": column order
            g_idx = np.arange(k) // gs
        return spec_dequantize(ints, zeros, scales, np.asarray(g_idx))
    if qc["quant_method"] == "gptq":
        ints, zeros = spec_unpack_gptq(tensors[module + ".qweight"], tensors[module + ".qzeros"], qc["bits"])
        g_idx = tensors[module + ".g_idx"].numpy()
    else:
        ints, zeros = spec_unpack_awq(tensors[module + ".qweight"], tensors[module + ".qzeros"])
        g_idx = np.arange(ints.shape[0]) // qc["group_size"]
    return spec_dequantize(ints, zeros, tensors[module + ".scales"], g_idx)


def _compressed_scheme(qc: dict) -> dict:
    """The one weight scheme of a compressed-tensors config; anything but pack-quantized ints is refused."""
    groups = list(qc.get("config_groups", {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors: {len(groups)} config groups; this reader takes one scheme")
    weights = groups[0].get("weights") or {}
    fmt = groups[0].get("format") or qc.get("format")
    if fmt != "pack-quantized" or weights.get("type") != "int":
        raise ValueError(f"compressed-tensors: format {fmt!r}, type {weights.get('type')!r}; this reader takes pack-quantized int")
    return weights


# the tensor a packed Linear is recognised by, and all the tensors it is stored as, per layout (qoqopt.info
# keeps its own list on purpose: this file imports nothing from qoqopt, so it stays an independent reader)
PACKED_MARK = {"gptq": ".qweight", "awq": ".qweight", "compressed-tensors": ".weight_packed"}
PACKED_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed", ".weight_scale", ".weight_shape",
                ".weight_zero_point", ".weight_g_idx")  # fmt: skip


def spec_weights(path: Path, tensors: dict | None = None) -> dict[str, torch.Tensor]:
    """Module name -> dequantized weight, for every packed Linear of an exported directory."""
    qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    t = read_dir(path) if tensors is None else tensors
    if qc["quant_method"] == "compressed-tensors":
        _compressed_scheme(qc)  # an unpacked format has no weight_packed: refuse it rather than read nothing
    mark = PACKED_MARK[qc["quant_method"]]
    return {name.removesuffix(mark): spec_module_weight(t, name.removesuffix(mark), qc) for name in t if name.endswith(mark)}


def spec_state(path: Path, tensors: dict | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint as fp32 state-dict entries (packed Linears dequantized to ``.weight``; every other
    tensor as stored, e.g. AWQ's rescaled norms) and the names of the packed Linears."""
    t = read_dir(path) if tensors is None else tensors
    packed = spec_weights(path, t)
    state = {k: v.float() for k, v in t.items() if not k.endswith(PACKED_PARTS)}
    state.update({f"{name}.weight": w for name, w in packed.items()})
    return state, sorted(packed)
