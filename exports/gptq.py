"""The GPTQ "v1" checkpoint format (``checkpoint_format: gptq``), as GPTQModel, transformers/optimum
and vLLM read it. Per quantized Linear ``M`` (K inputs, N outputs, G groups):

* ``M.qweight`` int32 ``[K * bits / 32, N]``, values packed LSB-first along the input dimension;
* ``M.qzeros`` int32 ``[G, N * bits / 32]``, packed along the output dimension, storing zero - 1;
* ``M.scales`` fp16 ``[G, N]``; ``M.g_idx`` int32 ``[K]`` (the group of each input row; with
  ``desc_act`` it follows the act-order visiting order); ``M.bias`` unchanged.

Exclusions: transformers (through optimum) only converts the Linears under ``block_name_to_quantize``,
and GPTQModel only those in its module tree (the language-model layers), so the vision tower and
``lm_head`` stay plain. We write ``block_name_to_quantize`` explicitly with the transformers-5 name,
(measured: the old name ``model.layers`` silently leaves the language model randomly initialised),
and GPTQModel's ``dynamic`` negative rules for the same modules. vLLM matches ``dynamic`` rules
against its own module names (``visual.blocks.*``), so the vision rule is written in both spellings
(:mod:`.runtime_names`); without it vLLM relies on reading the tensor dtypes to find plain layers.
"""

from __future__ import annotations

import re

from qoqopt.packing import pack_gptq

from .runtime_names import for_every_runtime

TEXT_BLOCKS = "model.language_model.layers"


def pack(qw) -> dict:
    """QuantizedWeight -> the four tensors of one GPTQ v1 Linear."""
    qweight, qzeros = pack_gptq(qw.intweight, qw.zeros, qw.bits)
    return {"qweight": qweight, "qzeros": qzeros, "scales": qw.scales.half().contiguous(), "g_idx": qw.g_idx.to(qw.intweight.dtype)}


def quantization_config(*, bits, group_size, sym, desc_act, static_groups, damp, vision_modules=(), vision_skipped=(),
                        plain=()) -> dict:  # fmt: skip
    """``plain``: other modules carried unquantized (QoQ-Med's ECG encoder), ruled out for loaders
    that read ``dynamic`` as they are for AWQ's."""
    from qoqopt import __version__

    # Measured (transformers 5.24, optimum 2.3.0, GPTQModel 7.7.0): a list of blocks raises in optimum,
    # and GPTQModel leaves quantized vision Linears uninitialised, so GPTQ never quantizes the tower.
    assert not vision_modules, "GPTQ exports keep the vision tower unquantized"
    skip = ["lm_head", "model.visual", *plain]
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,  # false unless g_idx is permuted: static groups keep it k // group_size
        "sym": sym,
        "static_groups": static_groups,
        "true_sequential": True,
        "damp_percent": damp,
        "lm_head": False,
        "checkpoint_format": "gptq",
        "block_name_to_quantize": TEXT_BLOCKS,
        "dynamic": {f"-:^{re.escape(m)}(\\.|$)": {} for m in for_every_runtime(skip)},
        "meta": {"quantizer": [f"qoqopt:{__version__}"]},
    }
