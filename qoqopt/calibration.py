"""Calibration: run the transformers model on clinical image+text chats, collect per-Linear input statistics.

For every Linear of the language model (q/k/v/o, gate/up/down of each layer, and lm_head) this
accumulates, per input channel, the sum of squared inputs and the token count: what llama.cpp's
`llama-imatrix` accumulates, but over clinical image chats, with text positions and image positions
kept apart. Text positions here are image-conditioned (they attend to the image), which a text-only
imatrix never sees; image positions are the vision tower's tokens themselves. Exporters decide how to
weigh the two (`InputStats.combined`). lm_head never counts image positions: their logits are unused.

Measured on the trained mini model (README, test_imatrix.py): counting image positions like text
positions makes Q4_K_M answers drift 25-40% more than no imatrix at all, because image tokens carry
activations ~250x larger in a few channels while their own outputs hardly reach the answer; so
exporters default to weight 0 for image positions.

Each chat is the prompt as at inference (image + QoQ-Med question, through the processor, with
`mm_token_type_ids` so image tokens get their 3-D M-RoPE positions) followed by the reference reply
(`<think>...</think>\\boxed{...}`), so answer-shaped tokens are covered too. Chats run one at a time,
unpadded, so no padding token is ever counted.

This module knows nothing about output formats: statistics are keyed by the checkpoint's canonical
weight names (`model.layers.0.self_attn.q_proj.weight`); exporters map them to their own names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


OUTPUT = "lm_head.weight"


@dataclass
class InputStats:
    """Per canonical weight name: sums of x^2 per input channel, and token counts, for text and image positions."""

    text_sums: dict[str, np.ndarray]
    text_tokens: dict[str, int]
    image_sums: dict[str, np.ndarray]
    image_tokens_seen: dict[str, int]
    chats: int = 0
    total_tokens: int = 0
    image_tokens: int = 0
    domains: dict[str, int] = field(default_factory=dict)
    dataset: str = ""

    def combined(self, image_weight: float = 0.0) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """sums and counts with image positions weighted by `image_weight` (1 = every token alike)."""
        sums = {n: s + image_weight * self.image_sums[n] for n, s in self.text_sums.items()}
        counts = {n: self.text_tokens[n] + image_weight * self.image_tokens_seen[n] for n in self.text_sums}
        return sums, counts

    def describe(self) -> str:
        doms = ", ".join(f"{d} {n}" for d, n in sorted(self.domains.items()))
        return (
            f"{self.chats} chats, {self.total_tokens} tokens ({self.image_tokens} image tokens), "
            f"{len(self.text_sums)} Linear layers; domains: {doms}"
        )


def language_linears(model) -> dict[str, object]:
    """Canonical weight name -> nn.Linear, for the language model and lm_head (not the vision tower)."""
    import torch

    from .loader import canonical_name, part_of

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            canon = canonical_name(name + ".weight")
            if part_of(canon) == "text":
                out[canon] = module
    return out


def encode_chat(processor, item, with_answer: bool = True) -> dict:
    """Model inputs for one item: the inference prompt, plus the reference reply when `with_answer`."""
    import torch

    inputs = processor.apply_chat_template(
        item.messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    batch = {k: v for k, v in inputs.items() if k in ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")}
    if "mm_token_type_ids" not in batch:  # older processors: 1 where the id is <|image_pad|>
        image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        batch["mm_token_type_ids"] = (batch["input_ids"] == image_id).long()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return with_reply(processor, batch, item) if with_answer else batch


def with_reply(processor, prompt: dict, item) -> dict:
    """A prompt batch from :func:`encode_chat` followed by the item's reference reply (text tokens)."""
    import torch

    reply = processor.tokenizer(item.target_text() + "<|im_end|>", return_tensors="pt").input_ids
    full = dict(prompt)
    full["input_ids"] = torch.cat([prompt["input_ids"], reply], dim=1)
    full["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(reply)], dim=1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    return full


def collect_input_sq_sums(model, processor, items, *, dataset: str = "", with_answer: bool = True, progress: bool = True) -> InputStats:
    """Sum of squared inputs per input channel of every language-model Linear, over all tokens of `items`."""
    import torch
    from tqdm import tqdm

    linears = language_linears(model)
    sums = {kind: {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()} for kind in ("text", "image")}
    counts = {kind: dict.fromkeys(linears, 0) for kind in ("text", "image")}
    current: dict = {}  # the running chat's text-position mask

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).to(torch.float64)
            text = current["text"]
            for kind, rows in (("text", x[text]), ("image", x[~text])):
                if kind == "image" and name == OUTPUT:
                    continue  # logits at image positions are never used
                sums[kind][name] += (rows * rows).sum(dim=0).cpu()
                counts[kind][name] += rows.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    stats = InputStats({}, {}, {}, {}, dataset=dataset)
    domains: Counter = Counter()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for item in tqdm(items, desc="calibrating", disable=not progress):
                batch = {k: v.to(device) for k, v in encode_chat(processor, item, with_answer).items()}
                current["text"] = (batch["mm_token_type_ids"] == 0).reshape(-1).to(device)
                if batch.get("pixel_values") is not None:
                    batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
                model(**batch)
                stats.chats += 1
                stats.total_tokens += int(batch["input_ids"].numel())
                stats.image_tokens += int(batch["mm_token_type_ids"].sum())
                domains[item.domain] += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats.text_sums = {n: s.numpy() for n, s in sums["text"].items()}
    stats.image_sums = {n: s.numpy() for n, s in sums["image"].items()}
    stats.text_tokens, stats.image_tokens_seen = counts["text"], counts["image"]
    stats.domains = dict(domains)
    return stats


def calibration_items(source: str = "clinical", n: int = 64, seed: int = 0):
    """Domain-balanced calibration chats: the built-in clinical "calib" split, or a user JSONL set."""
    from .data import balanced_sample, clinical_set, load_jsonl

    if source == "clinical":
        pool = clinical_set(split="calib", n_per_base=max(1, -(-n // 40)), seed=seed)
        label = f"qoqopt clinical calib split (seed {seed})"
    else:
        pool = load_jsonl(source)
        label = str(source)
    return balanced_sample(pool, n, seed=seed), label


def load_hf_model(path, dtype: str = "auto", device: str | None = None):
    """The checkpoint as a transformers Qwen2.5-VL model (either key layout), for calibration."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if dtype == "auto":
        from .loader import open_checkpoint

        dtype = auto_dtype(open_checkpoint(str(path)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.to(device).eval()


def auto_dtype(ckpt) -> str:
    """fp32 compute over the (bf16) weights of an open checkpoint where it fits comfortably; bf16
    beyond ~3 B parameters."""
    from .info import params_from_headers

    return "float32" if sum(params_from_headers(ckpt)[0].values()) < 3e9 else "bfloat16"
