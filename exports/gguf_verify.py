"""Compare a GGUF build, run in llama.cpp, with the transformers model on the same clinical chats.

For each item the chat is the inference prompt (image + question) followed by the reference reply,
teacher-forced. transformers gives the reference next-token logits at the reply positions (with
`mm_token_type_ids`, so image tokens get their M-RoPE positions); llama.cpp evaluates the same prompt
through its own multimodal path (mtmd: its own resize/normalise and clip graph) and then the same
reply tokens. The per-item logits feed `qoqopt.drift` (mean / p99 KLD, same-top-1 %, RMS dp).

Images are kept inside QoQ-Med's training pixel range on both sides: the HF processor carries it in
preprocessor_config.json; llama.cpp gets the equivalent `image_min_tokens`/`image_max_tokens`.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from qoqopt.errors import QoqoptError

from .gguf_runtime import MARKER

IMAGE_SPAN = "<|vision_start|><|image_pad|><|vision_end|>"


def set_text_rms_eps(model, value: float) -> None:
    """Set the language model's RMSNorm epsilon: llama.cpp ignores qwen2vl's and runs 0, so the tight
    comparisons set 0 here too (and the config's value back afterwards)."""
    for module in model.model.language_model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = value


def clinical_text_prompts(tokenizer) -> list[str]:
    """Text-only clinical chats (report summaries, triage, a diagnosis), each opened up to the
    assistant's ``<think>``: the prompts whose logits the text-model comparisons check."""
    from qoqopt.data import report_texts

    reports = report_texts()
    questions = [
        f"Summarise this report for the referring physician: {reports[0]} {reports[4]}",
        f"Is the following finding urgent? {reports[2]} Answer yes or no.",
        "A 67-year-old man has troponin 0.8 ng/mL and ST elevation in V2-V4. What is the diagnosis?",
        f"Translate into plain language: {reports[7]}",
    ]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        + "<think>"
        for q in questions
    ]


HEAD_ROWS = 2048  # vocabulary rows upcast at a time: 29 MB of fp32 at the 7B's hidden size (bench's peak memory)


@contextlib.contextmanager
def fp32_logits(model):
    """The vocabulary projection in fp32 while inside, as llama.cpp's logits are: a bf16 model's
    lm_head rounds each logit to 8 significant bits (about 0.06 at a logit of 20), a KLD floor near
    1e-4 that sat under every build's drift, where Q8_0's own is about that size. The head's forward
    is replaced, not followed by a hook: the bf16 product (300 reply rows x 152k x 3584 at 7B) is
    never computed only to be thrown away."""
    import torch

    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    own = head.__dict__.get("forward")  # an instance forward already there (accelerate's hook) comes back
    head.forward = functools.partial(_fp32_projection, head)
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _fp32_projection(head, x):
    import torch

    x = x.to(head.weight.device).float()
    out = torch.empty(*x.shape[:-1], head.weight.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, head.weight.shape[0], HEAD_ROWS):
        rows = head.weight[start : start + HEAD_ROWS].float()
        out[..., start : start + rows.shape[0]] = x @ rows.T
    if head.bias is not None:
        out += head.bias.float()
    return out


def reference(model, processor, item, device: str = "cpu") -> dict:
    """transformers' side of one chat: llama.cpp prompt text, reply ids, reference logits at the reply,
    and the processed prompt (``prompt_inputs``) for a caller that goes on to generate from it."""
    import torch

    from qoqopt.calibration import encode_chat, with_reply

    prompt_only = encode_chat(processor, item, with_answer=False)  # the image is processed once
    full = with_reply(processor, prompt_only, item)
    n_prompt, n_total = prompt_only["input_ids"].shape[1], full["input_ids"].shape[1]
    with torch.no_grad(), fp32_logits(model):  # the vocabulary projection only at the positions that predict the reply
        out = model(**{k: v.to(device) for k, v in full.items()}, logits_to_keep=n_total - n_prompt + 1)
    logits = out.logits[0, :-1].float().cpu().numpy()
    text = processor.apply_chat_template(item.messages(), add_generation_prompt=True, tokenize=False)
    if text.count(IMAGE_SPAN) != 1:
        raise QoqoptError(f"{item.id}: expected exactly one image in the chat")
    return {
        "prompt": text.replace(IMAGE_SPAN, MARKER),
        "reply_ids": full["input_ids"][0, n_prompt:].tolist(),
        "ref_logits": logits,
        "image_tokens": int(prompt_only["mm_token_type_ids"].sum()),
        "prompt_inputs": prompt_only,
    }


def reply_logits(vl, ref: dict, item) -> np.ndarray:
    """llama.cpp's teacher-forced logits for one reference chat, checked to have come from as many image
    tokens as transformers' preprocessing gave (else positions would not line up).
    The image is encoded once per `item.id` when `vl` has an embd_cache."""
    logits = vl.chat_logits(ref["prompt"], item.image, ref["reply_ids"], image_key=item.id)
    if vl.last_image_tokens != ref["image_tokens"]:
        raise QoqoptError(f"{item.id}: llama.cpp gives {vl.last_image_tokens} image tokens, transformers {ref['image_tokens']}")
    return logits


def drift_records(vl, refs: list[dict], items) -> list[dict]:
    """Records for qoqopt.drift.drift_by_domain: llama.cpp logits against the references."""
    return [
        {"domain": item.domain, "ref_logits": ref["ref_logits"], "cand_logits": reply_logits(vl, ref, item),
         "target_ids": np.asarray(ref["reply_ids"])}
        for ref, item in zip(refs, items)
    ]  # fmt: skip
