"""Calibration: run clinical image+text chats through the model (whole, or streamed one decoder layer at
a time), collect per-Linear input statistics.

For every Linear of the language model (q/k/v/o, gate/up/down of each layer, and lm_head) this
accumulates, per input channel, the sum of squared inputs and the token count: what llama.cpp's
`llama-imatrix` accumulates, but over clinical image chats, with text positions and image positions
kept apart. Text positions here are image-conditioned (they attend to the image), which a text-only
imatrix never sees; image positions are the vision tower's tokens themselves. Exporters decide how to
weigh the two (`InputStats.combined`). lm_head never counts image positions: their logits are unused.

Exporters weigh image positions 0 by default. Counted like text positions, they once made Q4_K_M on
the trained mini model drift ~20% more than no imatrix at all: image tokens carry activations far
larger in a few channels, while their own outputs hardly reach the answer. Later runs could not
order the weights, or the imatrix against none, on that model (README, Known issues): the default
rests on that reasoning, not on a measured gain.

Each chat is the prompt as at inference (image + QoQ-Med question, through the processor, with
`mm_token_type_ids` so image tokens get their 3-D M-RoPE positions) followed by the reference reply
(`<think>...</think>\\boxed{...}`), so answer-shaped tokens are covered too. Chats run one at a time,
unpadded, so no padding token is ever counted.

This module knows nothing about output formats: statistics are keyed by the checkpoint's canonical
weight names (`model.layers.0.self_attn.q_proj.weight`); exporters map them to their own names.
"""

from __future__ import annotations

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


class _SqSums:
    """Running sums of squared inputs per input channel, text and image positions apart; ``text`` is
    the running chat's text-position mask, set before each forward."""

    def __init__(self):
        self.sums: dict[str, dict] = {"text": {}, "image": {}}
        self.counts: dict[str, dict] = {"text": {}, "image": {}}
        self.text = None

    def track(self, name: str, in_features: int) -> None:
        import torch

        for kind in ("text", "image"):
            self.sums[kind].setdefault(name, torch.zeros(in_features, dtype=torch.float64))
            self.counts[kind].setdefault(name, 0)

    def hook(self, name: str, in_features: int):
        """A forward pre-hook adding a Linear's inputs under ``name``."""
        self.track(name, in_features)
        return lambda module, args: self.add(name, args[0])

    def add(self, name: str, x) -> None:
        import torch

        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        for kind, rows in (("text", x[self.text]), ("image", x[~self.text])):
            if kind == "image" and name == OUTPUT:
                continue  # logits at image positions are never used
            self.sums[kind][name] += (rows * rows).sum(dim=0).cpu()
            self.counts[kind][name] += rows.shape[0]

    def fill(self, stats: InputStats) -> InputStats:
        stats.text_sums = {n: s.numpy() for n, s in self.sums["text"].items()}
        stats.image_sums = {n: s.numpy() for n, s in self.sums["image"].items()}
        stats.text_tokens, stats.image_tokens_seen = self.counts["text"], self.counts["image"]
        return stats


def _count_chat(stats: InputStats, chat: dict, domain: str) -> None:
    stats.chats += 1
    stats.total_tokens += int(chat["input_ids"].numel())
    stats.image_tokens += int(chat["mm_token_type_ids"].sum())
    stats.domains[domain] = stats.domains.get(domain, 0) + 1


def collect_input_sq_sums(model, processor, items, *, dataset: str = "", with_answer: bool = True, progress: bool = True) -> InputStats:
    """Sum of squared inputs per input channel of every language-model Linear, over all tokens of `items`,
    with hooks on a whole transformers model (the reference for :func:`stream_input_sq_sums`)."""
    import torch
    from .progress import bar

    acc = _SqSums()
    handles = [m.register_forward_pre_hook(acc.hook(n, m.in_features)) for n, m in language_linears(model).items()]
    stats = InputStats({}, {}, {}, {}, dataset=dataset)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for item in bar(items, desc="calibrating", show=progress):
                batch = {k: v.to(device) for k, v in encode_chat(processor, item, with_answer).items()}
                acc.text = (batch["mm_token_type_ids"] == 0).reshape(-1)
                if batch.get("pixel_values") is not None:
                    batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
                model(**batch)
                _count_chat(stats, batch, item.domain)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return acc.fill(stats)


def stream_input_sq_sums(ckpt, processor, items, *, dataset: str = "", with_answer: bool = True,
                         device=None, progress: bool = True) -> InputStats:
    """The statistics of :func:`collect_input_sq_sums`, with one decoder layer in memory at a time.

    The chats go through the vision tower and embeddings once; then each decoder layer is loaded
    from the checkpoint, run on every chat's hidden states (its Linears hooked) and dropped, as GPTQ
    export streams the model. Peak memory is one fp32 layer plus the chats' hidden states, not the
    whole model (about 15 GB in bf16 for the 7B).
    """
    import torch
    from .progress import bar
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    from .quantize.runner import (
        LAYER_LINEARS,
        LayerInput,
        capture_layer0_inputs,
        decoder_config,
        encode_chats,
        load_decoder_layer,
        run_layer,
    )

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chats = encode_chats(processor, items, with_answer)
    captured = capture_layer0_inputs(ckpt, chats, device=device, progress=progress)
    config = decoder_config(ckpt, captured)
    masks = [(chat["mm_token_type_ids"] == 0).reshape(-1).to(device) for chat in chats]
    acc = _SqSums()
    inputs = captured.inputs
    for i in bar(range(config.num_hidden_layers), desc="imatrix layers", show=progress, leave=False):
        layer = load_decoder_layer(ckpt, config, i, device)
        ckpt.close()  # each layer's mapped pages are released with it
        mods = dict(layer.named_modules())
        handles = [mods[n].register_forward_pre_hook(acc.hook(f"model.layers.{i}.{n}.weight", mods[n].in_features))
                   for n in LAYER_LINEARS]  # fmt: skip
        outs = []
        for inp, text in zip(inputs, masks):
            acc.text = text
            outs += run_layer(layer, [inp])
        for h in handles:
            h.remove()
        inputs = [LayerInput(o, inp.kwargs) for o, inp in zip(outs, inputs)]
        del layer
    norm = Qwen2_5_VLRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(device)
    norm.weight.data = ckpt.tensor("model.norm.weight").to(device=device, dtype=torch.float32)
    acc.track(OUTPUT, config.hidden_size)
    with torch.no_grad():
        for inp, text in zip(inputs, masks):
            acc.text = text
            acc.add(OUTPUT, norm(inp.hidden))  # what lm_head receives
    ckpt.close()
    stats = InputStats({}, {}, {}, {}, dataset=dataset)
    for chat, item in zip(chats, items):
        _count_chat(stats, chat, item.domain)
    return acc.fill(stats)


def calibration_items(source: str = "clinical", n: int = 64, seed: int = 0, log=None):
    """Domain-balanced calibration chats: the built-in clinical "calib" split, or a user JSONL set.
    ``log`` is told when the set holds fewer than ``n``: a 3-chat set given --samples 256 calibrated
    on 3, and only the count in the log said so."""
    from .data import balanced_sample, clinical_set, load_jsonl
    from .data.jsonl import set_label

    if source == "clinical":
        pool = clinical_set(split="calib", n_per_base=_views_per_image(n, seed), seed=seed)
        label = f"qoqopt clinical calib split (seed {seed})"
    else:
        pool = load_jsonl(source)
        label = set_label(source)
    items = balanced_sample(pool, n, seed=seed)
    if log and len(items) < n:
        log(f"note: {label} holds {len(items)} chats; calibrating on all of them, not the {n} --samples asks for")
    return items, label


def _views_per_image(n: int, seed: int) -> int:
    """Views of each calib image enough for every domain's share of ``n`` chats: the ECG domain has
    the fewest images (3), and one view per 40 chats gave 64 chats with 6 ECGs where 13 are its share."""
    from .data import clinical_set, domain_counts

    per_view = domain_counts(clinical_set(split="calib", n_per_base=1, seed=seed))
    share = -(-n // len(per_view))
    return max(1, -(-n // 40), *(-(-share // count) for count in per_view.values()))


def load_hf_model(path, dtype: str = "auto", device: str | None = None):
    """The checkpoint as a transformers Qwen2.5-VL model (either key layout), for calibration."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if dtype == "auto":
        from .loader import open_checkpoint

        dtype = auto_dtype(open_checkpoint(str(path)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "float32":
        # fp32 means fp32: torch leaves cuDNN convolutions (the patch embedding's Conv3d) on TF32 by
        # default, ~1e-3 off, which an fp32 reference would pass on as every build's drift
        torch.backends.cudnn.allow_tf32 = False
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.to(device).eval()


def auto_dtype(ckpt) -> str:
    """fp32 compute over the (bf16) weights of an open checkpoint where it fits comfortably; bf16
    beyond ~3 B parameters."""
    from .info import params_from_headers

    return "float32" if sum(params_from_headers(ckpt)[0].values()) < 3e9 else "bfloat16"
