"""Module names as the runtimes that read our GPTQ/AWQ exports spell them.

Exclusion lists in ``quantization_config`` are matched against each runtime's own module names:
transformers 5 and GPTQModel use the checkpoint's (``model.visual.blocks.0.attn.qkv``), while vLLM
renames Qwen2.5-VL modules first (``hf_to_vllm_mapper`` in vLLM's ``qwen2_5_vl.py`` maps the prefix
``model.visual.`` to ``visual.``) and then tests each exclusion as a substring of its own name. A
config that names only ``model.visual`` therefore protects the vision tower in transformers but not
in vLLM, which builds those layers as quantized and fails to load their plain weights.
"""

from __future__ import annotations

VISION = "model.visual"


def vllm_spelling(module: str) -> str:
    """vLLM's name for a checkpoint module of the vision tower (other names are returned unchanged)."""
    if module == VISION or module.startswith(VISION + "."):
        return module.removeprefix("model.")
    return module


def for_every_runtime(modules: list[str]) -> list[str]:
    """``modules`` followed by the vLLM spelling of each one that vLLM spells differently."""
    extra = [vllm_spelling(m) for m in modules if vllm_spelling(m) != m]
    return list(modules) + [m for m in extra if m not in modules]
