"""The README.md a GPTQ/AWQ build carries: what it is, how to run it, and what its export noticed.

Rendered from the build's manifest (less its file list, which the README joins), so it says only
what the manifest records. It names no output path, so exporting the same model twice writes the
same bytes; the commands run from the build's folder. `qoqopt publish` replaces it on the Hub with
a card that shows the same :func:`summary_table` and :func:`run_instructions` for the repo id.
"""

from __future__ import annotations

import json

from qoqopt.manifest import source_id

ASK_ITEM = "ct-abd-pancreas.region_ct.eval-0"  # a built-in clinical item (`qoqopt data list`)
# The build's tensors carry the module names transformers 4.52 introduced (model.language_model.*,
# model.visual.*); older transformers, and vLLM before its 0.9.1 name map (vllm-project/vllm#19054),
# leave them unloaded. config.json keeps the source's transformers_version, which says nothing of this.
MIN_TRANSFORMERS = "4.52"
MIN_VLLM = "0.9.1"


def render_readme(manifest: dict) -> str:
    q, src = manifest["quantization"], manifest["source"]
    notes = "\n".join(f"- {n}" for n in manifest.get("notes", [])) or "- none"
    return f"""# {manifest['format'].upper()} {q['bits']}-bit build of {src['model']}

Built by qoqopt {manifest.get('qoqopt_version', '')} from `{src['model']}` ({source_id(src.get('revision'), src.get('fingerprint'))}).
`manifest.json` lists every file with its sha256, the calibration set and each layer's relative
output error.

{summary_table(manifest)}

## Run it

From this folder:

{run_instructions(".", manifest)}

## Notes from this build

{notes}
"""


def summary_table(manifest: dict) -> str:
    q, calib = manifest["quantization"], manifest.get("calibration") or {}
    rows = [
        ("bits / group size", f"{q['bits']} / {q['group_size']}"),
        ("symmetric", "yes" if q["sym"] else "no"),
        *([("GPTQ order", q["order"])] if q.get("order") else []),
        ("calibration", f"{calib.get('chats', '?')} chats from {calib.get('source', '?')} "
                        f"({calib.get('tokens', '?')} tokens, {calib.get('image_tokens', '?')} of them image tokens)"),
        ("vision tower", f"{len(manifest.get('vision') or [])} Linear(s) quantized" if manifest.get("vision")
                         else "unquantized"),
        ("ECG encoder", manifest.get("ecg_encoder") or "none in the source"),
    ]  # fmt: skip
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def run_instructions(where: str, manifest: dict) -> str:
    """How to run the build at ``where`` (a folder, or a Hub repo id) in each runtime that loads it."""
    path = json.dumps(where)  # a JSON string is a valid Python string literal
    return f"""**transformers** ≥ {MIN_TRANSFORMERS} (GPTQ/AWQ through the GPTQModel backend, which transformers does not
install: `pip install "transformers>={MIN_TRANSFORMERS}" optimum gptqmodel accelerate torchvision` first; without
them from_pretrained, or the processor's video part, stops with an ImportError){_awq_dtype(manifest)}

    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained({path}, device_map="auto")
    processor = AutoProcessor.from_pretrained({path})

{_vllm(where, manifest)}

**qoqopt's own W4A16 kernels** (Triton, no other kernel library; the torch reference on a CPU)

    import torch
    from qoqopt.exports.hf_quant import load_with_quant_linear
    from qoqopt.kernels import apply
    model = load_with_quant_linear({path}, dtype=torch.bfloat16).to("cuda")
    print(apply(model))  # also the vision tower's kernels; q/k/v and gate/up fused

**Check an answer**: `qoqopt ask {where} --item {ASK_ITEM}` (or `--image scan.png --question
"..."`; QoQ-Med reasons at length before its `\\boxed{{}}` answer)."""


def _awq_dtype(manifest: dict) -> str:
    # transformers' AWQ quantizer casts a bfloat16 request to float16 on CUDA (quantizer_awq.update_dtype)
    if manifest.get("format") != "awq":
        return ""
    return (".\nOn a GPU, transformers runs an AWQ build in float16 whatever dtype is asked, the vision tower "
            "included,\nwhere fp16 can overflow; vLLM or qoqopt's kernels below keep bfloat16")


def _vllm(where: str, manifest: dict) -> str:
    """vLLM's line: the command, or why it does not load this build."""
    if manifest.get("ecg_encoder") == "carried":
        return ("**vLLM** does not load this build: it carries QoQ-Med's ECG encoder, whose class and tensors "
                "vLLM does not know. `qoqopt export ... --drop-ecg` makes the build vLLM serves.")
    serve = f"`vllm serve {where} --served-model-name qoq-med --limit-mm-per-prompt '{{\"image\": 1}}'"
    if manifest.get("format") == "gptq" and (manifest.get("quantization") or {}).get("sym") is False:
        # vLLM's Marlin GPTQ kernels take symmetric weights only; its plain `gptq` method takes float16
        # only, and refuses the bfloat16 this build's config names
        return (f"**vLLM** ≥ {MIN_VLLM}: {serve} --dtype float16` (asymmetric GPTQ runs in vLLM's plain "
                "`gptq` kernels, float16 only; export without `--asym` for its Marlin kernels)")
    return f"**vLLM** ≥ {MIN_VLLM}: {serve}`"
