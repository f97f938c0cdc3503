"""Mini QoQ-Med: the real Qwen2.5-VL architecture and tokenizer at small dimensions.

No QoQ-Med weights can be downloaded here, so tests and benchmarks run on this model. It keeps
everything that breaks exporters in practice: the real 152,064-row vocabulary and Qwen2 tokenizer,
M-RoPE sections, window attention with full-attention blocks, the 2x2 patch merger, separate
lm_head. Text dims are multiples of 256 so GGUF K-quants (256-wide super-blocks) apply.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import QoqoptError
from .tokenizer import CHAT_TEMPLATE, VOCAB_SIZE, write_tokenizer

# QoQ-Med's training pixel range (its training config), also recorded in exports.
TRAIN_MIN_PIXELS = 65536
TRAIN_MAX_PIXELS = 524288
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_heads: int
    fullatt: tuple[int, ...]

    @property
    def mrope_section(self) -> list[int]:
        # The real model splits head_dim/2 = 64 rotary pairs as [16, 24, 24] (t, h, w); keep the ratio.
        half = self.hidden // self.heads // 2
        return [half // 4, half * 3 // 8, half * 3 // 8]


PRESETS = {
    # tests: builds in seconds; 2 windows+ per 256x256 image; 2 full-attention blocks of 4
    "tiny": Preset(256, 768, 2, 4, 2, 128, 256, 4, 2, (1, 3)),
    # benchmarks: ~190 M parameters, most of them the real-size vocabulary
    "small": Preset(512, 1536, 8, 8, 2, 256, 512, 8, 4, (3, 7)),
    # QoQ-Med-7B's exact tensor shapes (text head_dim 128 with 7 query heads per KV head, vision
    # head_dim 80, intermediate 3420, window period 8), cut to 2 of 28 decoder layers and 8 of 32
    # vision blocks: 1.76 B parameters, 3.5 GB as bf16. Random weights only, for shape checks.
    "7b-shape": Preset(3584, 18944, 2, 28, 4, 1280, 3420, 8, 16, (7,)),
}
# Presets too large to train on a CPU; `trained_model` refuses them.
SHAPE_ONLY = frozenset({"7b-shape"})


def build_config(preset: str = "tiny"):
    """A Qwen2_5_VLConfig with every vision field set explicitly (the class defaults are wrong)."""
    from transformers import Qwen2_5_VLConfig

    p = _preset(preset)
    vision = dict(
        depth=p.vision_depth, hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
        num_heads=p.vision_heads, hidden_act="silu", in_channels=3, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
        out_hidden_size=p.hidden, fullatt_block_indexes=list(p.fullatt), initializer_range=0.02,
    )  # fmt: skip
    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=p.hidden, intermediate_size=p.intermediate,
        num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
        max_window_layers=p.layers, attention_dropout=0.0, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "mrope_section": p.mrope_section, "rope_theta": 1e6},
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False,
    )  # fmt: skip


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise QoqoptError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_model(preset: str = "tiny", seed: int = 0):
    """Random-weight mini QoQ-Med, deterministic for a given seed."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(build_config(preset)).float().eval()
    return model


def generation_config() -> dict:
    """QoQ-Med's generation settings: near-greedy, repetition penalty 1.05, two EOS ids."""
    return {
        "bos_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
        "repetition_penalty": 1.05,
        "temperature": 1e-06,
    }


def preprocessor_config() -> dict:
    """Qwen2VLImageProcessor settings, limited to QoQ-Med's training pixel range."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": TRAIN_MIN_PIXELS,
        "max_pixels": TRAIN_MAX_PIXELS,
        "size": {"shortest_edge": TRAIN_MIN_PIXELS, "longest_edge": TRAIN_MAX_PIXELS},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_resize": True,
        "do_convert_rgb": True,
    }


def write_support_files(out: Path) -> None:
    """Tokenizer, processor, chat template and generation config: what AutoProcessor needs."""
    from .fileio import atomic_write_text

    write_tokenizer(out)
    atomic_write_text(out / "preprocessor_config.json", json.dumps(preprocessor_config(), indent=2))
    atomic_write_text(out / "chat_template.json", json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    atomic_write_text(out / "generation_config.json", json.dumps(generation_config(), indent=2))


def to_runtime_layout(state_dict: dict) -> dict:
    """Rename legacy keys to the transformers >= 4.52 module names (model.visual.*, model.language_model.*)."""
    from .loader import runtime_name

    return {runtime_name(name): tensor for name, tensor in state_dict.items()}


def save_checkpoint(model, out: Path, layout: str = "legacy") -> None:
    """Write config + bf16 safetensors (as the real release) in the given key layout, plus support files."""
    import torch
    from safetensors.torch import save_file

    from .fileio import atomic_path
    from .loader import canonical_name

    if layout not in ("legacy", "runtime"):
        raise QoqoptError(f"unknown layout {layout!r}; choose legacy or runtime")
    state = {canonical_name(k): v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if layout == "runtime":
        state = to_runtime_layout(state)
    config = copy.deepcopy(model.config)  # the caller's model stays as it was (its weights are not bf16)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    with atomic_path(out / "model.safetensors") as tmp:  # safetensors itself writes mode 0600
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_support_files(out)
