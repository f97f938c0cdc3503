"""GGUF metadata for the text model (arch `qwen2vl`) and the mmproj (arch `clip`), from config.json.

Only plain dicts are read (config.json, preprocessor_config.json): no transformers import, so a
plain F16 export needs neither torch nor transformers. Both config layouts occur:
- transformers 4.x (QoQ-Med's own): text fields at the top, `rope_scaling` with `mrope_section`;
- transformers 5.x: text fields under `text_config`, `rope_parameters`.

Keys are the ones llama.cpp reads: `src/llama-model.cpp` (qwen2vl reads `rope.dimension_sections`
on top of the llama keys) and `tools/mtmd/clip.cpp` (`clip.vision.*`, `n_wa_pattern`).
Known trap: llama.cpp's qwen2vl never reads `attention.layer_norm_rms_epsilon` (it runs with eps 0).
We still write the key, so the file states the truth and a fixed llama.cpp will pick it up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from qoqopt.errors import QoqoptError
from qoqopt.loader import read_json_object
from qoqopt.local_names import LOCAL_SOURCE
from qoqopt.mini import CLIP_MEAN, CLIP_STD, TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS

TEXT_ARCH = "qwen2vl"
CLIP_ARCH = "clip"
PROJECTOR = "qwen2.5vl_merger"
CLIP_IMAGE_SIZE = 560  # the converter's default for Qwen2.5-VL; clip.cpp requires the key
QOQOPT_KEY = "qoqopt"  # our own keys live under this prefix


@dataclass(frozen=True)
class TextHParams:
    n_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab_size: int
    context_length: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    rms_eps: float
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class VisionHParams:
    depth: int
    hidden: int
    intermediate: int
    heads: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    window_size: int
    fullatt_blocks: tuple[int, ...]
    out_hidden: int

    @property
    def n_wa_pattern(self) -> int:
        """clip.cpp's window pattern: block i attends globally iff (i + 1) % n == 0."""
        blocks = self.fullatt_blocks
        if not blocks:
            return 0
        n = blocks[0] + 1
        if list(blocks) != list(range(n - 1, self.depth, n)):
            raise QoqoptError(
                f"fullatt_block_indexes {list(blocks)} is not one block in every {n} of {self.depth}; "
                "llama.cpp's qwen2.5vl_merger can only express a fixed period (clip.vision.n_wa_pattern)"
            )
        return n


def _need(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise QoqoptError(f"config.json has no {where}{key}")
    return cfg[key]


def text_hparams(config: dict) -> TextHParams:
    cfg = {**config, **(config.get("text_config") or {})}
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise QoqoptError(f"rope type {rope_type!r} is not supported for qwen2vl GGUF (expected default/mrope)")
    section = tuple(int(x) for x in _need(rope, "mrope_section", "rope_parameters."))
    hp = TextHParams(
        n_layers=int(_need(cfg, "num_hidden_layers", "")),
        hidden=int(_need(cfg, "hidden_size", "")),
        intermediate=int(_need(cfg, "intermediate_size", "")),
        heads=int(_need(cfg, "num_attention_heads", "")),
        kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        vocab_size=int(_need(cfg, "vocab_size", "")),
        context_length=int(cfg.get("max_position_embeddings") or 32768),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1e6))),
        mrope_section=section,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
    )
    if hp.hidden % hp.heads or hp.heads % hp.kv_heads:
        raise QoqoptError(f"hidden {hp.hidden} / heads {hp.heads} / kv heads {hp.kv_heads} do not divide")
    if len(section) > 4 or 2 * sum(section) != hp.head_dim:
        raise QoqoptError(f"mrope_section {list(section)} must cover head_dim/2 = {hp.head_dim // 2} rotary pairs")
    return hp


def vision_hparams(config: dict) -> VisionHParams | None:
    v = config.get("vision_config")
    if not v:
        return None
    hp = VisionHParams(
        depth=int(_need(v, "depth", "vision_config.")),
        hidden=int(_need(v, "hidden_size", "vision_config.")),
        intermediate=int(_need(v, "intermediate_size", "vision_config.")),
        heads=int(_need(v, "num_heads", "vision_config.")),
        patch_size=int(v.get("patch_size", 14)),
        merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        window_size=int(v.get("window_size", 112)),
        fullatt_blocks=tuple(int(i) for i in _need(v, "fullatt_block_indexes", "vision_config.")),
        out_hidden=int(_need(v, "out_hidden_size", "vision_config.")),
    )
    if hp.temporal_patch_size != 2:
        raise QoqoptError(f"temporal_patch_size {hp.temporal_patch_size}: llama.cpp's clip supports only 2")
    if hp.merge_size != 2:
        raise QoqoptError(f"spatial_merge_size {hp.merge_size}: llama.cpp's qwen2.5vl_merger supports only 2")
    hp.n_wa_pattern  # validate now, not halfway through a write
    return hp


@dataclass(frozen=True)
class ImageNorm:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    note: str | None = None


def image_norm(path: Path) -> ImageNorm:
    """image_mean/std from the checkpoint's preprocessor_config.json (CLIP's when it has none)."""
    pre = path / "preprocessor_config.json"
    if pre.exists():
        cfg = read_json_object(pre)  # a list here would have meant CLIP's values, said only as a note
        if "image_mean" in cfg and "image_std" in cfg:
            return ImageNorm(_per_channel(cfg, "image_mean", pre), _per_channel(cfg, "image_std", pre))
    return ImageNorm(tuple(CLIP_MEAN), tuple(CLIP_STD), "no image_mean/std in preprocessor_config.json; used CLIP's")


def _per_channel(cfg: dict, key: str, pre: Path) -> tuple[float, float, float]:
    """One value per RGB channel, as llama.cpp's clip loader reads three (it refuses an mmproj with
    fewer); one number stands for all three, as transformers' image processors take it."""
    value = cfg[key]
    values = [value] * 3 if _is_number(value) else value
    ok = isinstance(values, list) and len(values) == 3 and all(_is_number(x) and math.isfinite(x) for x in values)
    if not ok or (key == "image_std" and min(values) <= 0):
        raise QoqoptError(f"{pre}: {key} is {value!r}; give three finite numbers, one per RGB channel"
                          + (", each above 0" if key == "image_std" else ""))  # fmt: skip
    return tuple(float(x) for x in values)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------- writing KV


def add_common(writer, *, name: str, file_type: int, source: str, revision: str | None, fingerprint: str,
               skipped: list[str]) -> None:
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)  # GGML_QNT_VERSION
    # A local folder's path names the user's folders, and the file is uploaded as it is; the
    # fingerprint still identifies the weights. Only a Hub snapshot has a revision.
    writer.add_string(f"{QOQOPT_KEY}.source", source if revision else LOCAL_SOURCE)
    if revision:
        writer.add_string(f"{QOQOPT_KEY}.source_revision", revision)
    writer.add_string(f"{QOQOPT_KEY}.source_fingerprint", fingerprint)
    if skipped:
        writer.add_array(f"{QOQOPT_KEY}.skipped_tensors", skipped)


def add_text_hparams(writer, hp: TextHParams) -> None:
    writer.add_type("model")
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.intermediate)
    writer.add_head_count(hp.heads)
    writer.add_head_count_kv(hp.kv_heads)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_dimension_sections(list(hp.mrope_section) + [0] * (4 - len(hp.mrope_section)))


def add_vision_hparams(writer, hp: VisionHParams, text_hidden: int, norm: ImageNorm) -> None:
    if hp.out_hidden != text_hidden:
        raise QoqoptError(f"vision out_hidden_size {hp.out_hidden} != text hidden_size {text_hidden}")
    writer.add_type("mmproj")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(PROJECTOR)
    writer.add_vision_use_silu(True)
    writer.add_vision_projection_dim(text_hidden)
    writer.add_vision_image_size(CLIP_IMAGE_SIZE)
    writer.add_vision_patch_size(hp.patch_size)
    writer.add_vision_embedding_length(hp.hidden)
    writer.add_vision_feed_forward_length(hp.intermediate)
    writer.add_vision_block_count(hp.depth)
    writer.add_vision_head_count(hp.heads)
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_vision_n_wa_pattern(hp.n_wa_pattern)
    writer.add_vision_spatial_merge_size(hp.merge_size)
    writer.add_vision_window_size(hp.window_size)
    writer.add_vision_image_mean(list(norm.mean))
    writer.add_vision_image_std(list(norm.std))
    # QoQ-Med's training pixel range. This llama.cpp's qwen2.5vl path ignores these two keys (it uses
    # 8..4096 tokens unless --image-min-tokens/--image-max-tokens are given); other runtimes and later
    # llama.cpp versions read them, and the README/Modelfile pass the equivalent token limits.
    writer.add_vision_min_pixels(TRAIN_MIN_PIXELS)
    writer.add_vision_max_pixels(TRAIN_MAX_PIXELS)
    writer.add_uint32(f"{QOQOPT_KEY}.train_min_pixels", TRAIN_MIN_PIXELS)
    writer.add_uint32(f"{QOQOPT_KEY}.train_max_pixels", TRAIN_MAX_PIXELS)


def train_token_range(hp: VisionHParams | None = None) -> tuple[int, int]:
    """QoQ-Med's training pixel range as llama.cpp image-token limits (84..668 for patch 14, merge 2)."""
    patch, merge = (hp.patch_size, hp.merge_size) if hp else (14, 2)
    area = (patch * merge) ** 2
    return -(-TRAIN_MIN_PIXELS // area), TRAIN_MAX_PIXELS // area
