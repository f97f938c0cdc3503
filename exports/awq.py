"""The AWQ GEMM checkpoint format (``quant_method: awq``, ``version: gemm``), as transformers,
GPTQModel and vLLM read it. Per quantized Linear ``M`` (K inputs, N outputs, G groups, 4 bits):

* ``M.qweight`` int32 ``[K, N / 8]``: nibble ``i`` of a word holds column ``8c + [0,2,4,6,1,3,5,7][i]``;
* ``M.qzeros`` int32 ``[G, N / 8]``, same nibble order, zero-points stored as they are (no offset);
* ``M.scales`` fp16 ``[G, N]``; ``M.bias`` unchanged; no ``g_idx``.

``modules_to_not_convert`` is matched by transformers as a prefix or suffix of the transformers-5
module names: a bare ``"visual"`` does not protect ``model.visual.blocks.*`` (measured: the vision
tower is then quantized into garbage), so we write ``"model.visual"``; and ``"lm_head"``. vLLM
matches the same list as substrings of its own names (``visual.blocks.*``), so each vision entry is
also written in vLLM's spelling (:mod:`.runtime_names`).
"""

from __future__ import annotations

from qoqopt.packing import pack_awq

from .runtime_names import for_every_runtime


def pack(qw) -> dict:
    """QuantizedWeight -> the three tensors of one AWQ GEMM Linear."""
    assert qw.bits == 4, "AWQ GEMM is 4-bit"
    qweight, qzeros = pack_awq(qw.intweight, qw.zeros)
    return {"qweight": qweight, "qzeros": qzeros, "scales": qw.scales.half().contiguous()}


def quantization_config(*, bits, group_size, sym, desc_act, static_groups, damp, vision_modules=(), vision_skipped=(),
                        plain=()) -> dict:  # fmt: skip
    """``plain``: other modules carried unquantized (QoQ-Med's ECG encoder): transformers swaps every
    Linear the list does not name for an AWQ layer, which the encoder's plain weights do not fill."""
    skip = ["lm_head"] + ([] if vision_modules else ["model.visual"]) + sorted(vision_skipped) + list(plain)
    if vision_modules:  # the merger is never quantized
        skip.append("model.visual.merger")
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": bits,
        "group_size": group_size,
        "zero_point": not sym,
        "modules_to_not_convert": for_every_runtime(skip),
    }
