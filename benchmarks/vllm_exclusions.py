"""Which Linears of a Qwen2.5-VL GPTQ/AWQ checkpoint vLLM builds unquantized, as vLLM's source decides it.

vLLM is not installable on this project's CPU machines (it pulls a CUDA torch), so the tests hold our
``quantization_config`` against vLLM's rules as its code states them (read from vllm-project/vllm in
2026; file paths below). Imports nothing from qoqopt. vLLM builds every Linear of the model, vision
tower included, with the checkpoint's quantization config unless one of these rules excludes it; an
excluded-by-us layer that vLLM builds quantized fails to load (it looks for ``qweight``).

* Names: ``Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper`` (models/qwen2_5_vl.py) renames
  checkpoint prefixes in order; the quantization config's own lists go through the same mapper
  (``QuantizationConfig.apply_vllm_mapper``).
* AWQ (quantization/awq.py, awq_marlin.py): a layer is skipped when any ``modules_to_not_convert``
  entry is a substring of its name (``is_layer_skipped(..., skip_with_substr=True)``).
* GPTQ (quantization/utils/gptq_utils.py): a ``dynamic`` key ``-:REGEX`` skips a layer whose name
  ``re.match``-es REGEX. (Newer vLLM also scans the safetensors dtypes when the config lists no
  quantized modules; older versions lack that, so the config must stand on its own.)

Judged per checkpoint module: vLLM checks a fused layer (``qkv_proj``, the vision ``gate_up_proj``)
through each of its parts' names and refuses a layer whose parts disagree, so per-part decisions are
what it sees as long as parts share their fate (they do: vision layers are skipped by shape, and
gate and up have the same shape).
"""

from __future__ import annotations

import re

HF_TO_VLLM_PREFIX = (
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "visual."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
)


def vllm_name(name: str) -> str:
    for old, new in HF_TO_VLLM_PREFIX:
        if name.startswith(old):
            name = new + name[len(old) :]
    return name


def vllm_skips(qc: dict, module: str) -> bool:
    """Whether vLLM builds the checkpoint module ``module`` (e.g. ``model.visual.blocks.0.attn.qkv``) plain."""
    prefix = vllm_name(module)
    if qc["quant_method"] == "awq":
        return any(vllm_name(m) in prefix for m in qc.get("modules_to_not_convert") or [])
    if qc["quant_method"] == "gptq":
        return any(key.startswith("-:") and re.match(key[2:], prefix) for key in qc.get("dynamic") or {})
    raise ValueError(f"unknown quant_method {qc['quant_method']!r}")
