"""`qoqopt export --format gguf` on the tiny mini model, proven in llama.cpp itself (llama-cpp-python).

One export per module (F32 and F16 text + F16 mmproj) feeds the runtime tests. Logit tolerances are
stated where they are asserted; the numbers are printed (pytest -s). Quantized builds are judged on
the trained mini model (random weights make drift meaningless): see test_imatrix.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import psutil
import pytest

from qoqopt.build_info import decimal_size
from qoqopt.errors import QoqoptError
from qoqopt.exports import gguf_split
from qoqopt.exports.gguf_export import GGUFOptions, export_gguf
from qoqopt.exports.gguf_runtime import LlamaVL
from qoqopt.exports.gguf_verify import clinical_text_prompts, set_text_rms_eps
from tests.conftest import TRAIN_TOKENS, error_line, refused, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-gguf"
    log: list[str] = []
    res = export_gguf(
        str(tiny_dir), out,
        GGUFOptions(quants=["F32", "F16"], imatrix="none", mmproj_type="f16", name="tiny", progress=False),
        log=log.append,
    )  # fmt: skip
    res.log = log
    return res


@pytest.fixture(scope="module")
def hf(tiny_dir):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.processor import load_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    return model, load_processor(tiny_dir)


def hf_text_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        x = torch.tensor([ids])
        return model(input_ids=x, mm_token_type_ids=torch.zeros_like(x)).logits[0].numpy()


# ---------------------------------------------------------------------------- files and metadata


@pytest.fixture(scope="module")
def vocab_llm(built):
    from llama_cpp import Llama

    return Llama(str(built.file("text", "F16")), vocab_only=True, verbose=False)


def test_files_and_metadata(built, tiny_dir, vocab_llm):
    """What llama.cpp reads from the files: arch, hyperparameters, tokenizer, special ids, template."""
    import llama_cpp
    from gguf import GGUFReader

    names = sorted(p.name for p in built.out.iterdir())
    assert names == sorted(
        ["tiny.F32.gguf", "tiny.F16.gguf", "mmproj-tiny-f16.gguf", "Modelfile", "template", "params", "README.md",
         "manifest.json"]
    )  # fmt: skip
    meta = vocab_llm.metadata
    assert meta["general.architecture"] == "qwen2vl" and meta["general.file_type"] == "1"
    assert (meta["qwen2vl.block_count"], meta["qwen2vl.embedding_length"], meta["qwen2vl.attention.head_count_kv"]) == ("2", "256", "2")
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"], meta["tokenizer.ggml.add_bos_token"]) == ("gpt2", "qwen2", "false")
    assert meta["tokenizer.chat_template"] == json.loads((tiny_dir / "chat_template.json").read_text())["chat_template"]
    vocab = llama_cpp.llama_model_get_vocab(vocab_llm.model)
    assert llama_cpp.llama_vocab_n_tokens(vocab) == 152064
    assert (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_pad(vocab), llama_cpp.llama_vocab_bos(vocab)) == (151645, 151643, 151643)

    def kind(token_id):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token_id)
        text = llama_cpp.llama_vocab_get_text(vocab, token_id).decode()
        for name in ("CONTROL", "USER_DEFINED", "UNUSED", "NORMAL"):
            if attr & getattr(llama_cpp, f"LLAMA_TOKEN_ATTR_{name}"):
                return text, name
        return text, attr

    assert kind(9707) == ("Hello", "NORMAL")
    assert kind(151645) == ("<|im_end|>", "CONTROL")
    assert kind(151657) == ("<tool_call>", "USER_DEFINED")  # not special in HF either
    assert kind(152000) == ("[PAD152000]", "UNUSED")
    mm = GGUFReader(str(built.file("mmproj")))
    assert bytes(mm.fields["clip.projector_type"].parts[-1]).decode() == "qwen2.5vl_merger"
    assert mm.fields["clip.vision.n_wa_pattern"].parts[-1][0] == 2
    assert mm.fields["clip.vision.image_min_pixels"].parts[-1][0] == 65536
    assert {t.name for t in mm.tensors} >= {"v.patch_embd.weight", "v.patch_embd.weight.1", "mm.0.weight", "mm.2.weight"}
    manifest = json.loads((built.out / "manifest.json").read_text())
    assert sorted(f["path"] for f in manifest["files"]) == [n for n in names if n != "manifest.json"]  # every file
    for f in manifest["files"]:
        path = built.out / f["path"]
        assert path.stat().st_size == f["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"]
    assert manifest["source"]["fingerprint"].startswith("sha256-v2:")  # in llama.cpp's reading of the file too
    assert meta["qoqopt.source_fingerprint"] == manifest["source"]["fingerprint"] and "qoqopt.source_revision" not in meta
    modelfile = (built.out / "Modelfile").read_text()
    assert "FROM ./tiny.F16.gguf" in modelfile and "FROM ./mmproj-tiny-f16.gguf" in modelfile
    assert "repeat_penalty 1.05" in modelfile and 'stop "<|endoftext|>"' in modelfile
    readme = (built.out / "README.md").read_text()
    assert "llama-mtmd-cli -m tiny.F16.gguf --mmproj mmproj-tiny-f16.gguf" in readme
    assert "--image-min-tokens 84 --image-max-tokens 668" in readme
    assert ("llama-server -m tiny.F16.gguf --mmproj mmproj-tiny-f16.gguf \\\n"
            "        -c 4096 --temp 0 --repeat-penalty 1.05 --repeat-last-n 4096 \\\n") in readme


def test_the_card_gives_qoq_meds_answer_instruction(built, fixture_7b):
    """The card's commands leave the question short; the instruction QoQ-Med was trained with after
    each question (its medical_format.jinja, less the bounding-box sentence qoqopt drops) is given
    beside them, as `ask` and `bench` send it: without it the model need not answer in \\boxed{}."""
    import jinja2

    readme = (built.out / "README.md").read_text()
    run_it = readme.split("## Run it\n", 1)[1]
    instruction = run_it.split("the examples below leave it out for length:\n\n    ", 1)[1].split("\n", 1)[0]
    rendered = jinja2.Template((fixture_7b / "medical_format.jinja").read_text()).render(content="")
    trained, dropped = re.subn(r"\nBefore analyzing medical images.*?wrapped in ```json \.\.\. ``` tags\. ", " ", rendered)
    assert dropped == 1 and instruction == trained.strip()
    assert run_it.index(instruction) < run_it.index("llama-mtmd-cli")  # before the first command


# ---------------------------------------------------------------------------- logits


def test_f32_logits_match_transformers(built, hf):
    """F32 GGUF vs transformers on clinical text prompts. Tight (F32 KV cache, HF RMSNorm eps 0 as
    llama.cpp runs): rel err < 1e-4 asserted (measured ~1e-6). Default settings: < 5e-3 (~1e-3)."""
    model, proc = hf
    prompts = clinical_text_prompts(proc.tokenizer)
    tight, loose = [], []
    with LlamaVL(built.file("text", "F32"), f32_kv=True) as vl32, LlamaVL(built.file("text", "F32")) as vl16:
        for text in prompts:
            ids = proc.tokenizer(text).input_ids
            assert vl32.tokenize(text) == ids
            set_text_rms_eps(model, 0.0)
            ref0 = hf_text_logits(model, ids)
            set_text_rms_eps(model, 1e-6)
            ref = hf_text_logits(model, ids)
            tight.append(np.abs(vl32.logits(ids) - ref0).max() / np.abs(ref0).max())
            loose.append(np.abs(vl16.logits(ids) - ref).max() / np.abs(ref).max())
    print(f"\nF32 GGUF vs transformers, max rel err over {len(prompts)} prompts: "
          f"{max(tight):.2e} (f32 KV, eps 0), {max(loose):.2e} (f16 KV, eps 1e-6)")  # fmt: skip
    assert max(tight) < 1e-4
    assert max(loose) < 5e-3


# ---------------------------------------------------------------------------- tokenizer


def tokenizer_cases() -> list[str]:
    from qoqopt.data import report_texts

    cases = list(report_texts()[:20])
    cases += [
        "BP 120/80 mmHg, HR 72 bpm, SpO2 94% on 2 L/min O2.",
        "Give 5 mg/kg IV q8h; max 1.2 g/day.",
        "T 38.5°C, WBC 12.3 ×10⁹/L, CRP 87 mg/L.",
        "eGFR <60 mL/min/1.73m², HbA1c 7.2 %.",
        "Nodule 2.3 x 1.8 cm (previously 1,9 cm) at 3333333 ms.",
        "Dose: 0.125mg, 1e-3 M, -4.5 dB, +12.0%, 1/2 tablet",
        "Sjögren's syndrome; café-au-lait spots; naïve patient.",
        "Ménière's disease with β-blocker and 50 µg of α-agonist.",
        "肺结节，右上叶，直径 8 毫米。",
        "胸部CT：両側肺野に異常なし。",
        "Пациент жалуется на боль в груди.",
        "مريض يعاني من ضيق في التنفس",
        "🫁 lungs 🩺 stethoscope 🧠 brain ✅ done",
        "Stage IIIA (T2N2M0) — non-small-cell lung cancer…",
        "  leading spaces, tabs\tand\nnewlines\n\n\ntrailing   ",
        "I've seen it's DON'T we'll they'd",
        '```json\n{"bbox_2d": [10, 20, 312, 400], "label": "nodule"}\n```',
        "<think>Bright bone, dark air.</think>\n\\boxed{CT}",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n",
        "<|vision_start|><|image_pad|><|vision_end|>Above is a CT image of a patient.",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>ECG?<|im_end|>",
        "<tool_call>{\"name\": \"lookup\"}</tool_call>",
        "<|fim_prefix|>def f(x):<|fim_suffix|>\n<|fim_middle|>",
        "<|time_series_pad|> 12-lead ECG at 500 Hz",
        "<|endoftext|><|endoftext|>",
        "Answer with one word from the following: CT, MRI, Ultrasound, X-ray, ECG.",
        "x" * 300,
        "a.b.c/d-e_f:g;h,i!j?k",
        "ICD-10 I21.0; SNOMED 22298006; LOINC 2160-0",
        "e\u0301 composed vs é",  # NFC turns the first into the second
        "Ａｎｇｉｏｇｒａｍ full-width letters",
        "1234567890 12 345 6789",
    ]
    return [unicodedata.normalize("NFC", c) for c in cases]


def test_tokenization_matches_hf(vocab_llm, hf):
    _, proc = hf
    cases = tokenizer_cases()
    assert len(cases) >= 50
    vocab = vocab_llm
    mismatches = [
        c for c in cases
        if vocab.tokenize(c.encode(), add_bos=False, special=True) != proc.tokenizer(c, add_special_tokens=False).input_ids
    ]  # fmt: skip
    print(f"\ntokenization: {len(cases) - len(mismatches)}/{len(cases)} strings identical")
    assert not mismatches
    # detokenization round-trips too, every case (chats with control tokens among them, shown when asked for)
    assert any("<|im_start|>" in c for c in cases)
    for c in cases:
        assert vocab.detokenize(proc.tokenizer(c).input_ids, special=True).decode() == c, c


def test_a_users_decomposed_text_reaches_llama_cpp_as_transformers_reads_it(vocab_llm, hf, tmp_path):
    """transformers' Qwen2 tokenizer composes text (NFC) and llama.cpp's does not: a question with
    "é" typed as e + U+0301 (macOS, text from PDFs) was 7 tokens in one and 9 in the other. What
    qoqopt passes on from a user (a JSONL set, ``ask --question``) tokenizes in llama.cpp as the
    user's own text does in transformers."""
    from PIL import Image

    from qoqopt.data import load_jsonl
    from qoqopt.user_text import checked_text

    _, proc = hf
    raw = unicodedata.normalize("NFD", "Is this Ménière disease or a Schwannoma? Düsseldorf protocol, façade.")
    assert vocab_llm.tokenize(raw.encode(), add_bos=False, special=False) != proc.tokenizer(raw, add_special_tokens=False).input_ids
    said = checked_text(raw, "question", "--question")
    assert vocab_llm.tokenize(said.encode(), add_bos=False, special=False) == proc.tokenizer(raw, add_special_tokens=False).input_ids
    Image.new("RGB", (300, 300)).save(tmp_path / "a.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"image": "a.png", "question": raw, "answer": "Ménière", "domain": "mri"}))
    (item,) = load_jsonl(str(tmp_path / "set.jsonl"))
    assert said in item.question and unicodedata.is_normalized("NFC", item.answer)


def test_a_users_image_is_as_many_tokens_in_transformers_as_in_llama_cpp(built, tiny_dir, tmp_path):
    """`ask` gives llama.cpp QoQ-Med's training range of image tokens; transformers took the
    checkpoint's preprocessor_config.json range, which for a checkpoint carrying Qwen's defaults
    (3136..12845056 pixels) made a 1024x1024 scan 1369 image tokens there and 625 in llama.cpp: the
    two runtimes saw the image at different resolutions. Now both see the training range."""
    from PIL import Image

    from qoqopt.bench.hf_runner import HFRunner, image_question
    from qoqopt.exports.gguf_meta import train_token_range
    from qoqopt.processor import load_processor

    src = tmp_path / "qwen-range"
    shutil.copytree(tiny_dir, src)
    pre = json.loads((src / "preprocessor_config.json").read_text())
    pre |= {"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 3136, "longest_edge": 12845056}}
    (src / "preprocessor_config.json").write_text(json.dumps(pre))
    runner = HFRunner(None, load_processor(src), "transformers", "cpu")
    lo, hi = train_token_range()
    with LlamaVL(built.file("text", "F16"), built.file("mmproj"), image_min_tokens=lo, image_max_tokens=hi) as vl:
        for size in ((1024, 1024), (300, 200), (2000, 600)):
            image = Image.new("RGB", size, (90, 90, 90))
            ours = int(runner._inputs(image_question(image, "Which organ?"))["image_grid_thw"].prod()) // 4
            assert ours == vl.image_embeddings(image).shape[0], size


# ---------------------------------------------------------------------------- images


def _ct_eval_item():
    from qoqopt.data import clinical_set

    return next(i for i in clinical_set("eval", n_per_base=1) if i.domain == "ct")


def _llama_cpp_reads(vl: LlamaVL, path: Path) -> np.ndarray:
    """The RGB pixels llama.cpp's own file loader gives (mtmd_helper_bitmap_init_from_file: stb_image),
    as llama-mtmd-cli and LM Studio read a user's image."""
    m = vl._mtmd
    bitmap = m.mtmd_helper_bitmap_init_from_file(vl.mctx, str(path).encode(), False)
    assert bitmap, f"llama.cpp could not read {path}"
    try:
        nx, ny, n = m.mtmd_bitmap_get_nx(bitmap), m.mtmd_bitmap_get_ny(bitmap), m.mtmd_bitmap_get_n_bytes(bitmap)
        return np.ctypeslib.as_array(m.mtmd_bitmap_get_data(bitmap), shape=(n,)).reshape(ny, nx, 3).copy()
    finally:
        m.mtmd_bitmap_free(bitmap)


def test_user_images_are_the_pixels_llama_cpp_reads(built, tmp_path):
    """`ask --image` decodes a user's file to the pixels llama.cpp's loader gets from it, 16-bit
    greyscale included (Pillow's convert("RGB") clips 16 bits at 255: 99.6% white on a ramp)."""
    from PIL import Image

    from qoqopt.images import open_image

    rng = np.random.default_rng(0)
    images = {
        "rgb.png": Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)),
        "grey.png": Image.fromarray(rng.integers(0, 256, (60, 90), dtype=np.uint8)),
        "palette.png": Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).quantize(16),
        "grey16.png": Image.fromarray(rng.integers(0, 65536, (60, 90), dtype=np.uint16)),
        "ramp16.png": Image.fromarray(np.linspace(0, 65535, 60 * 90).astype(np.uint16).reshape(60, 90)),
        "ramp12.png": Image.fromarray(np.linspace(0, 4095, 60 * 90).astype(np.uint16).reshape(60, 90)),  # a detector's
    }
    with LlamaVL(built.file("text", "F16"), built.file("mmproj"), threads=1) as vl:
        for name, img in images.items():
            img.save(tmp_path / name)
            assert np.array_equal(np.asarray(open_image(tmp_path / name)), _llama_cpp_reads(vl, tmp_path / name)), name
    clipped = np.asarray(Image.open(tmp_path / "ramp16.png").convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # what open_image is there to avoid


def test_mmproj_embeddings_match_vision_tower(built, hf):
    """llama.cpp's image embeddings (mtmd_encode_chunk) vs transformers' get_image_features on the same
    pixels (sizes on the 28-px grid inside the training range, so neither side resizes).
    Tolerance: max abs err < 2e-3 x max |embedding| with the F16 mmproj (measured ~5e-4)."""
    import torch
    from PIL import Image

    model, proc = hf
    base = _ct_eval_item().image.convert("RGB")
    errs = []
    with LlamaVL(built.file("text", "F32"), built.file("mmproj"), image_min_tokens=TRAIN_TOKENS[0], image_max_tokens=TRAIN_TOKENS[1]) as vl:
        for size in [(308, 308), (364, 252)]:  # 11x11 and 13x9 merged tokens: partial attention windows
            img = base.resize(size, Image.BICUBIC)
            ours = vl.image_embeddings(img)
            inputs = proc.image_processor(images=[img], return_tensors="pt")
            with torch.no_grad():
                out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            feats = getattr(out, "pooler_output", out)
            ref = torch.cat(list(feats)).numpy() if isinstance(feats, (list, tuple)) else feats.numpy()
            assert ours.shape == ref.shape == (size[0] * size[1] // 784, 256)
            errs.append(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"\nimage embeddings llama.cpp vs transformers: max rel err {max(errs):.2e}")
    assert max(errs) < 2e-3


def test_image_chat_logits_match(built, hf):
    """A whole image chat (CT image + question + reply) in llama.cpp vs transformers: image token
    placement and M-RoPE positions included. F32 text + F16 mmproj, F32 KV, eps 0: rel err < 5e-3."""
    from qoqopt.exports.gguf_verify import reference

    model, proc = hf
    item = _ct_eval_item()
    set_text_rms_eps(model, 0.0)
    try:
        ref = reference(model, proc, item)
    finally:
        set_text_rms_eps(model, 1e-6)
    assert ref["image_tokens"] == 121
    with LlamaVL(built.file("text", "F32"), built.file("mmproj"), f32_kv=True,
                 image_min_tokens=TRAIN_TOKENS[0], image_max_tokens=TRAIN_TOKENS[1]) as vl:  # fmt: skip
        cand = vl.chat_logits(ref["prompt"], item.image, ref["reply_ids"])
    err = np.abs(cand - ref["ref_logits"]).max() / np.abs(ref["ref_logits"]).max()
    print(f"\nimage chat logits llama.cpp vs transformers ({len(ref['reply_ids'])} reply tokens): max rel err {err:.2e}")
    assert err < 5e-3


def test_a_bf16_references_logits_are_projected_in_fp32(trained_dir):
    """bench's reference runs bf16 above ~3 B parameters, and its lm_head rounded every logit to bf16
    (about 0.06 at a logit of 20): a KLD floor near Q8_0's own drift, which llama.cpp's fp32 logits
    do not have. The reference's logits are now the lm_head's input (as transformers hands it over)
    times its weight in fp32; transformers' own bf16 logits are those, rounded."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.exports.gguf_verify import HEAD_ROWS, reference
    from qoqopt.processor import load_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=torch.bfloat16).eval()
    proc, item = load_processor(trained_dir), _ct_eval_item()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out.clone())))
    try:
        ref = reference(model, proc, item)["ref_logits"]
    finally:
        handle.remove()
    assert model.lm_head.weight.shape[0] > HEAD_ROWS  # more than one chunk of the vocabulary
    ((x, projected),) = seen
    assert projected.dtype == torch.float32  # the head ran in fp32 only: no bf16 product computed and dropped
    assert "forward" not in vars(model.lm_head)  # and is transformers' own again
    with torch.no_grad():
        want = (x[0, :-1].float() @ model.lm_head.weight.float().T).numpy()
        plain = model.lm_head(x)  # transformers' own bf16 logits
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
    assert np.any(ref != torch.from_numpy(ref).bfloat16().float().numpy())  # not bf16 values
    rounded = plain[0, :-1].float().numpy()
    assert plain.dtype == torch.bfloat16 and 0 < np.abs(rounded - ref).max() <= 2**-7 * np.abs(ref).max()


def test_the_types_refused_without_an_imatrix_are_the_ones_llama_cpp_refuses(built, tmp_path):
    """export refuses NEEDS_IMATRIX with --imatrix none before any file is written. IQ2_M and
    IQ3_XS/XXS were missing: llama-quantize's up-front list omits them, and llama.cpp's library then
    failed mid-export ("this quantization requires an imatrix!") after the other files were written.
    Every type export offers goes through llama.cpp itself here, past our own check: the ones it
    refuses are the list, no more (an export failed part-way) and no fewer (refused for nothing)."""
    from qoqopt.exports import gguf_quant

    refused = set()
    for quant in sorted(gguf_quant.llama_ftypes()):
        dst = tmp_path / f"{quant}.gguf"
        try:  # in this process (the worker's job): a worker's start-up, 30 times, was most of a 108 s test
            gguf_quant.quantize_here(built.file("text", "F32"), dst, quant, None, threads=2)
        except QoqoptError as exc:
            assert "requires an imatrix" in str(exc), (quant, str(exc))
            refused.add(quant)
        dst.unlink(missing_ok=True)
    assert refused == gguf_quant.NEEDS_IMATRIX


def test_ct_chat_through_qwen25vl_handler(built, tmp_path):
    """The path LM Studio-like apps take: Llama + Qwen25VLChatHandler + a real CT slice (pydicom's CT_small)."""
    import base64
    import io

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler
    from pydicom.data import get_testdata_file

    from qoqopt.data import dicom_to_image

    img = dicom_to_image(get_testdata_file("CT_small.dcm")).convert("RGB").resize((280, 280))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    handler = Qwen25VLChatHandler(clip_model_path=str(built.file("mmproj")), verbose=False)
    llm = Llama(str(built.file("text", "F16")), chat_handler=handler, n_ctx=1024, n_threads=2, verbose=False)
    question = {"type": "text", "text": "Above is a CT image. What organ is shown?"}
    outs = [llm.create_chat_completion(messages=[{"role": "user", "content": content}], max_tokens=6,
                                       temperature=0.0, repeat_penalty=1.05)
            for content in ([{"type": "image_url", "image_url": {"url": url}}, question], [question])]
    llm.close()
    with_image, text_only = (out["usage"]["prompt_tokens"] for out in outs)
    print(f"\nCT chat via Qwen25VLChatHandler: prompt {with_image} tokens ({text_only} without the image), "
          f"reply {outs[0]['choices'][0]['message']['content']!r}")
    # Qwen2.5-VL's M-RoPE: a 280 px image is 20 x 20 patches, 10 x 10 merged tokens, and advances the
    # positions the binding counts by max(10, 10), plus <|vision_start|> and <|vision_end|>.
    assert with_image - text_only == 10 + 2
    assert outs[0]["usage"]["completion_tokens"] > 0


def test_runtime_key_layout_gives_same_tensors(built, tiny_runtime_dir, tmp_path):
    """model.visual.* / model.language_model.* keys: every tensor found, data identical to the legacy export
    (llama.cpp's own converter writes an empty mmproj for this layout)."""
    from gguf import GGUFReader

    res = export_gguf(str(tiny_runtime_dir), tmp_path / "rt", GGUFOptions(quants=["F16"], imatrix="none", progress=False), log=lambda s: None)
    a, b = GGUFReader(str(res.file("mmproj"))), GGUFReader(str(built.file("mmproj")))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))
    ids = list(range(100, 140))
    with LlamaVL(res.file("text", "F16")) as x, LlamaVL(built.file("text", "F16")) as y:
        assert np.array_equal(x.logits(ids), y.logits(ids))



def test_split_build_loads_in_llama_cpp_as_the_whole_file(built, tiny_dir, tmp_path):
    """--split-max-size: llama.cpp, given the first part, finds the others by name, checks their split
    keys and runs the model; its logits equal the whole F16 file's bit for bit, and without a part it
    does not load. The metadata (6 MB) and the 78 MB token embedding do not fit in 80 MB together, so
    the first part holds the metadata only. The F16 is written straight into its parts (no whole file
    on disk), byte for byte the parts gguf_split cuts from the whole file. The BF16 intermediate is
    written in parts too, and llama.cpp quantizes from them as from the whole file: Q4_K_M comes out
    byte-identical. It fits and stays whole, and the Modelfile names it (the build's preferred quant)."""
    out = tmp_path / "split"
    opts = GGUFOptions(quants=["F16", "Q4_K_M"], imatrix="none", mmproj_type="none", name="tiny",
                       split_max_bytes=80_000_000, progress=False)  # fmt: skip
    log: list[str] = []
    res = export_gguf(str(tiny_dir), out, opts, log=log.append)
    texts = [r for r in res.files if r.kind == "text" and r.quant == "F16"]
    assert [(r.path, r.part, r.parts) for r in texts] == [(f"tiny.F16-0000{i}-of-00003.gguf", i, 3) for i in (1, 2, 3)]
    assert texts[0].tensors == 0 and all(r.bytes <= 80_000_000 for r in texts)
    whole = next(f for f in built.files if f.quant == "F16")
    assert sum(r.tensors for r in texts) == whole.tensors and sorted(p.name for p in out.iterdir()) == sorted(
        [r.path for r in texts] + ["tiny.Q4_K_M.gguf", "Modelfile", "template", "params", "README.md", "manifest.json"])  # fmt: skip
    assert any(line.startswith("wrote tiny.F16.gguf as 3 parts (tiny.F16-00001-of-00003.gguf, ...) of at most 80,000,000 bytes (")
               for line in log), log  # fmt: skip
    cut = tmp_path / "tiny.F16.gguf"
    shutil.copy(built.file("text", "F16"), cut)
    assert [p.read_bytes() for p, _ in gguf_split.split_gguf(cut, 80_000_000)] == [(out / r.path).read_bytes() for r in texts]
    plain = export_gguf(str(tiny_dir), tmp_path / "whole", GGUFOptions(quants=["Q4_K_M"], imatrix="none", mmproj_type="none",
                        name="tiny", progress=False), log=log.append)  # fmt: skip
    assert (out / "tiny.Q4_K_M.gguf").read_bytes() == plain.file("text", "Q4_K_M").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(f["path"], f.get("part"), f.get("parts"), f["bytes"]) for f in manifest["files"] if f["kind"] == "text"] == [
        (r.path, r.part, r.parts, (out / r.path).stat().st_size) for r in texts] + [
        ("tiny.Q4_K_M.gguf", None, None, (out / "tiny.Q4_K_M.gguf").stat().st_size)]  # fmt: skip
    assert "FROM ./tiny.Q4_K_M.gguf" in (out / "Modelfile").read_text()
    assert "F16 is written in parts" in (out / "README.md").read_text()
    ids = list(range(100, 140))
    with LlamaVL(built.file("text", "F16")) as a, LlamaVL(out / texts[0].path) as b:
        assert np.array_equal(a.logits(ids), b.logits(ids))
    (out / texts[1].path).unlink()
    with pytest.raises(QoqoptError, match=f"llama.cpp could not load {out / texts[0].path}: a part missing") as failed:
        LlamaVL(out / texts[0].path)
    assert "(llama.cpp: " in str(failed.value)  # its own reason, on the same line
    assert f"failed to load GGUF split from {out / texts[1].path}" in str(failed.value) and "\n" not in str(failed.value)


# ---------------------------------------------------------------------------- reliability


@pytest.mark.parametrize("where", ["tokenize", "decode"])
def test_a_ctrl_c_during_an_image_chat_is_not_lost(where, built, monkeypatch, ctrl_c):
    """Each llama.cpp call of an image chat logs through qoqopt's Python callback, where Python ran the
    Ctrl-C's handler and ctypes swallowed its KeyboardInterrupt: `ask` went on and exited 0 (29 of 40
    Ctrl-Cs lost in helper-95's run). The Ctrl-C here arrives while llama.cpp logs, inside mtmd's
    tokenize or inside a llama_decode, and ends the chat once that call returns."""
    from qoqopt.exports import gguf_runtime

    item = _ct_eval_item()
    with LlamaVL(built.file("text", "F16"), built.file("mmproj"), image_min_tokens=TRAIN_TOKENS[0],
                 image_max_tokens=TRAIN_TOKENS[1]) as vl:  # fmt: skip
        prompt = f"<|im_start|>user\n{gguf_runtime.MARKER}{item.question}<|im_end|>\n<|im_start|>assistant\n"
        real_write, sent = gguf_runtime._ERRORS.write, []

        def write(level, text):  # llama.cpp logging, from inside the C call
            if not sent and (where == "tokenize" or stage):
                sent.append(text)
                os.kill(os.getpid(), signal.SIGINT)
            return real_write(level, text)

        stage = []
        if where == "decode":  # a llama_decode of the reply that logs (as a full KV cache does)
            real_decode = vl._llama_cpp.llama_decode

            def decode(ctx, batch):
                stage.append(1)
                gguf_runtime._LOG_CALLBACK(3, b"decode: warning\n", None)
                return real_decode(ctx, batch)

            monkeypatch.setattr(vl._llama_cpp, "llama_decode", decode)
        monkeypatch.setattr(gguf_runtime._ERRORS, "write", write)
        with pytest.raises(KeyboardInterrupt):
            vl.generate(prompt, item.image, max_tokens=4)
        assert sent


def test_ctrl_c_stops_a_quantize_at_once(built, tmp_path, monkeypatch):
    """llama.cpp's quantize is one C call that Python cannot interrupt: a Ctrl-C used to be lost in
    its log callback, then (held until the call returned) waited minutes on a 7B model. It runs in a
    child process now: a Ctrl-C reaches the handler it was meant for while the quantize runs, the
    child is killed rather than left to finish, and no partial output is left."""
    import threading

    from qoqopt.exports import gguf_quant

    started = []

    def interrupt_once_running():  # the worker exec'd and importing: seconds from done, on any machine
        _wait_for_child(os.getpid(), "quantize_worker", timeout=60)
        time.sleep(0.05)  # the caller, microseconds past Popen, now waits in communicate()
        os.kill(os.getpid(), signal.SIGINT)

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)
            sender.append(threading.Thread(target=interrupt_once_running))
            sender[0].start()

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    sender = []
    monkeypatch.setattr(gguf_quant.subprocess, "Popen", Recorded)
    previous = signal.signal(signal.SIGINT, stop)
    try:
        with pytest.raises(Stop):
            gguf_quant.llama_quantize(built.file("text", "F16"), tmp_path / "q.gguf", "Q4_K_M", None)
    finally:
        for thread in sender:
            thread.join()
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGINT) is previous
    assert [p.returncode for p in started] == [-signal.SIGKILL]  # killed, not waited for
    assert list(tmp_path.iterdir()) == []


def test_a_quantize_ignores_modules_in_the_working_directory(built, tmp_path, monkeypatch):
    """The quantize child is started with `python -P`: a llama_cpp.py (or an empty dl/ folder, which
    gdcm's `import dl` took for a package) in the user's folder is not imported in its place."""
    from qoqopt.exports import gguf_quant

    (tmp_path / "llama_cpp.py").write_text("raise ImportError('the user folder was imported')\n")
    (tmp_path / "dl").mkdir()
    monkeypatch.chdir(tmp_path)
    gguf_quant.llama_quantize(built.file("text", "F16"), tmp_path / "q.gguf", "Q4_K_M", None)
    assert gguf_quant.tensor_types(tmp_path / "q.gguf")["blk.0.attn_q.weight"] in ("Q4_K", "Q5_0")


def test_a_killed_or_failing_quantize_is_one_line(built, tmp_path, monkeypatch):
    """A quantize killed from outside (the out-of-memory killer, on a 32B model) is named as such; an
    error inside llama.cpp, or in the worker itself, comes back as its own line; the temporary
    imatrix file goes with it."""
    from qoqopt.children import python_module
    from qoqopt.exports import gguf_quant

    argv = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    with pytest.raises(QoqoptError, match=r"quantize to Q4_K_M died \(signal SIGKILL; killed from outside"):
        gguf_quant._run_worker(argv, tmp_path / "q.gguf", "Q4_K_M")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(QoqoptError, match="llama.cpp could not quantize to Q4_K_M: "):
        gguf_quant.llama_quantize(tmp_path / "bad.gguf", tmp_path / "q.gguf", "Q4_K_M", {"blk.0.attn_q.weight": np.ones(4)})
    argv = python_module("qoqopt.exports.quantize_worker", str(built.file("text", "F16")), str(tmp_path / "q.gguf"),
                         "Q4_K_M", "0", str(tmp_path / "no-such.safetensors"))  # fmt: skip
    with pytest.raises(QoqoptError, match=r"^the quantize worker failed: \w+Error: .*no-such.safetensors"):
        gguf_quant._run_worker(argv, tmp_path / "q.gguf", "Q4_K_M")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_a_terminals_ctrl_c_ends_an_export_mid_quantize(tiny_dir, tmp_path):
    """Ctrl-C at a terminal reaches the export and its quantize worker at once (one process group):
    the export exits 130 within seconds, mid-quantize, leaving no worker running and nothing under
    its folder, not even hidden debris."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qoqopt", "export", str(tiny_dir), "--format", "gguf", "--quant",
           "Q4_K_M,Q5_K_M,Q6_K,Q3_K_M", "--imatrix", "none", "--out", str(out)]  # fmt: skip
    # as from a terminal: a test run in the background (`make test &`, CI) inherits SIGINT ignored,
    # and the export and its worker rightly keep ignoring it
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)  # fmt: skip
    try:
        worker = _wait_for_child(proc.pid, "quantize_worker", timeout=120)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.rstrip().endswith("error: interrupted"), err[-2000:]
    assert not _runs(worker, "quantize_worker")
    assert list(tmp_path.iterdir()) == []


def _wait_for_child(ppid: int, marker: str, timeout: float) -> int:
    """The pid of a child of `ppid` whose command line holds `marker`, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(ppid).children():
            if _runs(child.pid, marker):
                return child.pid
        time.sleep(0.05)
    raise AssertionError(f"no {marker} child of {ppid} within {timeout} s")


def _runs(pid: int, marker: str) -> bool:
    """Whether process `pid` runs, with `marker` in its command line (a zombie does not run)."""
    try:
        return marker in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:  # gone, or a zombie
        return False


def test_a_direct_export_leaves_torch_unloaded(tiny_dir, tmp_path):
    """F16/BF16/Q8_0 without an imatrix are read and written by qoqopt alone: importing torch (through
    transformers' config classes) doubled the export's memory and time on small models (154 -> 354 MiB,
    benchmarks/bench_gguf_convert.py). A K-quant with the clinical imatrix runs transformers, so its
    config is checked by transformers up front, before the long work."""
    script = ("import sys; from qoqopt.cli import main; rc = main(sys.argv[1:]); "
              "print('torch loaded' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")  # fmt: skip
    argv = ["export", str(tiny_dir), "--format", "gguf", "--quant", "F16,Q8_0", "--imatrix", "none",
            "--mmproj-type", "f16", "--out", str(tmp_path / "o")]  # fmt: skip
    res = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("no torch"), res.stdout[-500:] + res.stderr[-500:]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"], "hidden_size": "abc"}}))
    res = run_cli("export", str(bad), "--format", "gguf", "--quant", "Q4_K_M", "--out", str(tmp_path / "k"))
    assert error_line(res).startswith("error: config.json is not a valid Qwen2.5-VL config") and not (tmp_path / "k").exists()
    assert "wrote" not in res.stdout  # refused before the intermediate was written



def test_rerun_is_byte_identical_and_refuses_existing(tiny_dir, tmp_path):
    opts = dict(quants=["F16"], imatrix="none", mmproj_type="f16", progress=False)
    a = export_gguf(str(tiny_dir), tmp_path / "a", GGUFOptions(**opts), log=lambda s: None)
    with pytest.raises(QoqoptError, match="already exists"):
        export_gguf(str(tiny_dir), tmp_path / "a", GGUFOptions(**opts), log=lambda s: None)
    b = export_gguf(str(tiny_dir), tmp_path / "a", GGUFOptions(**opts), force=True, log=lambda s: None)
    c = export_gguf(str(tiny_dir), tmp_path / "c", GGUFOptions(**opts), log=lambda s: None)
    digest = {f.path: f.sha256 for f in a.files}
    assert digest == {f.path: f.sha256 for f in b.files} == {f.path: f.sha256 for f in c.files}
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "c" / "manifest.json").read_bytes()
    for f in c.files:  # the files on disk, not only what the writer recorded of them
        data = (tmp_path / "c" / f.path).read_bytes()
        assert data == (tmp_path / "a" / f.path).read_bytes() and hashlib.sha256(data).hexdigest() == f.sha256
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary debris


def test_one_line_errors(tiny_dir, tmp_path):
    bad = run_cli("export", str(tiny_dir), "--format", "gguf", "--quant", "Q4_K_X", "--out", str(tmp_path / "x"))
    assert error_line(bad) and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: unknown quant type 'Q4_K_X'; choose from BF16, F16, F32")
    # a truncated shard is an unreadable checkpoint, named as such
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[: 1 << 20] if f.suffix == ".safetensors" else f.read_bytes())
    res = run_cli("export", str(broken), "--format", "gguf", "--quant", "F16", "--out", str(tmp_path / "y"))
    assert "model.safetensors is truncated" in error_line(res) and res.stderr.count("\n") == 1
    ecg = run_cli("export", str(tiny_dir), "--format", "gguf", "--drop-ecg", "--out", str(tmp_path / "z"))
    assert error_line(ecg) == "error: --drop-ecg is a GPTQ/AWQ option, not for --format gguf; GGUF builds always leave the ECG encoder out"
    quant = run_cli("export", str(tiny_dir), "--format", "gptq", "--quant", "Q8_0", "--out", str(tmp_path / "z"))
    assert error_line(quant) == "error: --quant is a GGUF option, not for --format gptq; GPTQ/AWQ take --bits and --group-size"
    none = run_cli("export", str(tiny_dir), "--format", "gguf", "--quant", "Q4_K_M", "--samples", "0", "--out", str(tmp_path / "z"))
    assert error_line(none) == "error: --samples must be at least 1, got 0"
    typo = run_cli("export", str(tiny_dir), "--format", "gguf", "--split-max-size", "48", "--out", str(tmp_path / "z"))
    assert error_line(typo).startswith("error: --split-max-size 48 bytes: give at least 1M (sizes take K, M, G: 48G keeps")
    natural = run_cli("export", str(tiny_dir), "--format", "awq", "--natural-order", "--out", str(tmp_path / "z"))
    assert error_line(natural) == "error: the column order (--order) is a GPTQ option; AWQ has none"
    gguf = run_cli("export", str(tiny_dir), "--format", "gguf", "--order", "act", "--out", str(tmp_path / "z"))
    assert error_line(gguf) == "error: the column order (--order) is a GPTQ option; GGUF has none"
    both = run_cli("export", str(tiny_dir), "--format", "gptq", "--natural-order", "--act-order", "--out", str(tmp_path / "z"))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr  # argparse's mutual exclusion
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_what_would_fail_late_is_refused_before_any_file_is_written(tiny_dir, tmp_path, monkeypatch):
    """An image_mean/std llama.cpp's clip loader cannot use (it reads three numbers a channel) was a
    traceback after every text file was written, or an mmproj that llama.cpp refused to load, said
    "done"; an IQ2 type with --imatrix none was refused after the direct types were written (GBs at
    7B), where llama-quantize refuses before it loads anything. One number for all three channels is
    taken, as transformers' image processors take it."""
    from gguf import GGUFReader

    from qoqopt.exports import gguf_export

    def no_work(*args, **kwargs):
        raise AssertionError("a file was written before the refusal")

    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    pre = json.loads((src / "preprocessor_config.json").read_text())
    options = dict(quants=["Q8_0", "F16"], imatrix="none", name="t")
    with monkeypatch.context() as m:
        m.setattr(gguf_export, "write_text", no_work)
        with pytest.raises(QoqoptError, match="^IQ2_XXS needs an importance matrix; drop --imatrix none$"):
            export_gguf(str(src), tmp_path / "o", GGUFOptions(**{**options, "quants": ["Q8_0", "IQ2_XXS"]}), log=print)
        for mean, std in (([0.5, 0.5], [0.5, 0.5]), ([0.5] * 3, "abc"), ([0.5] * 3, [0.5, 0.0, 0.5]), ([0.5, None, 0.5], 0.5)):
            (src / "preprocessor_config.json").write_text(json.dumps({**pre, "image_mean": mean, "image_std": std}))
            with pytest.raises(QoqoptError, match=r"preprocessor_config.json: image_(mean|std) is .*; give three finite numbers"):
                export_gguf(str(src), tmp_path / "o", GGUFOptions(**options), log=print)
    assert not (tmp_path / "o").exists()
    (src / "preprocessor_config.json").write_text(json.dumps({**pre, "image_mean": 0.5, "image_std": 0.25}))
    result = export_gguf(str(src), tmp_path / "o", GGUFOptions(**{**options, "quants": ["F16"]}), log=lambda s: None)
    fields = GGUFReader(result.file("mmproj")).fields
    for key, want in (("clip.vision.image_mean", [0.5] * 3), ("clip.vision.image_std", [0.25] * 3)):
        assert [float(fields[key].parts[i][0]) for i in fields[key].data] == want


def test_force_never_replaces_what_the_export_reads(tiny_dir, tmp_path, capsys):
    """--out naming the source checkpoint, or a folder holding it, is refused even with --force (which
    would delete the source when the finished build is swapped in), for both export families."""
    src = tmp_path / "models" / "src"
    shutil.copytree(tiny_dir, src)
    before = {f.name: f.stat().st_size for f in src.iterdir()}
    for fmt, out in (("gguf", src), ("gptq", src), ("gguf", src.parent), ("awq", src.parent)):
        extra = ("--quant", "Q8_0", "--imatrix", "none") if fmt == "gguf" else ()
        err = refused(["export", src, "--format", fmt, *extra, "--out", out, "--force"], capsys)
        assert err == f"error: output {out} would replace {src}, which this command reads; choose another --out"
    assert {f.name: f.stat().st_size for f in src.iterdir()} == before
    assert sorted(p.name for p in src.parent.iterdir()) == ["src"]


def test_disk_full_is_one_line_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import errno

    from qoqopt.exports import gguf_write

    def full(self, fp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_write.StreamedTensor, "tofile", full)
    with pytest.raises(QoqoptError, match=r"^disk full while writing tiny.F16.gguf \(\d+\.\d GiB free\)$"):
        export_gguf(str(tiny_dir), tmp_path / "out", GGUFOptions(quants=["F16"], imatrix="none", name="tiny"), log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_too_little_disk_space_is_refused_before_work(built, tiny_dir, tmp_path, monkeypatch, capsys):
    """The export checks free space before it writes: on a disk with less room than the F16 GGUF
    the export wrote (its size as the OS states it), one line and nothing left."""
    import collections

    from qoqopt import fileio

    room = (built.out / "tiny.F16.gguf").stat().st_size // 2
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: collections.namedtuple("usage", "total used free")(1 << 40, 0, room))
    err = refused(["export", tiny_dir, "--format", "gguf", "--quant", "F16", "--imatrix", "none", "--out", tmp_path / "out"], capsys)
    assert err.startswith(f"error: not enough disk space at {tmp_path}: the export needs ~") and err.endswith(
        f"GiB, {room / 2**30:.1f} GiB free")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


QUANTIZE_UNDER_A_LIMIT = """
import collections, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(2), as a full disk gives ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from qoqopt.errors import QoqoptError
from qoqopt import fileio
from qoqopt.exports import gguf_quant
for free in (None, 1 << 20):  # the disk as it is; one with 1 MiB left
    if free is not None:
        fileio.shutil.disk_usage = lambda p: collections.namedtuple("usage", "total used free")(1 << 40, 0, free)
    try:
        gguf_quant.quantize_here(Path(sys.argv[1]), Path(sys.argv[2]), "Q8_0", None)
    except QoqoptError as exc:
        print(exc)
"""


def test_a_quantize_whose_write_fails_on_a_nearly_full_disk_says_disk_full(built, tmp_path):
    """llama.cpp writes through a std::ofstream whose failure ("basic_ios::clear: iostream error")
    names no cause. A real failed write (a 1 MiB `ulimit -f`) is llama.cpp's own line where the disk
    has room, and "disk full" where under 64 MiB is left, as on a disk that filled."""
    if shutil.disk_usage(tmp_path).free < 1 << 30:
        pytest.skip("needs a disk with room, to tell the two apart")
    run = subprocess.run([sys.executable, "-c", QUANTIZE_UNDER_A_LIMIT, str(built.out / "tiny.F16.gguf"), str(tmp_path / "q.gguf")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    own, full = run.stdout.splitlines()
    # the C++ library's words: libstdc++'s (Linux), or libc++'s (macOS)
    assert re.fullmatch(r"llama.cpp could not quantize to Q8_0: llama_model_quantize: failed to quantize: (basic_ios::clear: "
                        r"iostream error|ios_base::clear: unspecified iostream_category error)", own), own  # fmt: skip
    assert full == "disk full while writing q.gguf (0.0 GiB free)"


def _as_from_a_terminal() -> None:
    """A command started from a terminal has SIGHUP and SIGINT at their defaults; a test run under
    `nohup` or in a script's background job passes them on ignored, and qoqopt rightly keeps them so."""
    for signum in (signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def _export_stopped_mid_write(tiny_dir, tmp_path, signum) -> subprocess.Popen:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qoqopt", "export", str(tiny_dir), "--format", "gguf", "--quant", "F32,F16,BF16", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_as_from_a_terminal,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the F32 file is being written in the temporary folder
        tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        if tmp and any(f.stat().st_size > 1 << 20 for f in tmp[0].iterdir()):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the export never started writing its temporary folder")
    os.kill(proc.pid, signum)
    proc.wait(timeout=120)
    assert not out.exists()
    return proc


def test_sigkill_mid_export_leaves_no_final_name(tiny_dir, tmp_path):
    """SIGKILL cannot be caught: the temporary folder stays, never a final name. The next export to
    the same --out removes it and says so (it was never cleaned, gigabytes at 7B)."""
    _export_stopped_mid_write(tiny_dir, tmp_path, signal.SIGKILL)
    assert all(p.name.startswith(".out.") and p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # the kill really landed mid-export
    left = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    again = subprocess.run([sys.executable, "-m", "qoqopt", "export", str(tiny_dir), "--format", "gguf", "--quant", "F16",
                            "--imatrix", "none", "--mmproj-type", "none", "--out", str(tmp_path / "out")],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"note: removed {decimal_size(left)} that an interrupted run left beside {tmp_path / 'out'}\n" in again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("signum, message", [(signal.SIGTERM, "terminated"), (signal.SIGHUP, "hangup (the terminal closed)")])
def test_sigterm_mid_export_cleans_up_and_says_so(tiny_dir, tmp_path, signum, message):
    """SIGTERM (what `timeout` and schedulers send) and SIGHUP (a closed terminal or ssh session)
    remove the temporary folder, as Ctrl-C does; SIGHUP left it, with its BF16 intermediate."""
    proc = _export_stopped_mid_write(tiny_dir, tmp_path, signum)
    assert proc.returncode == 128 + signum and proc.stderr.read().splitlines()[-1] == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_kquant_fallback_is_reported(tmp_path):
    """Rows not divisible by 256 (intermediate 320): llama.cpp falls back per tensor; the export says so."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.exports.gguf_quant import tensor_types
    from qoqopt.mini import build_config, save_checkpoint

    cfg = build_config("tiny")
    cfg.text_config.intermediate_size = 320
    torch.manual_seed(0)
    ckpt = tmp_path / "odd"
    ckpt.mkdir()
    save_checkpoint(Qwen2_5_VLForConditionalGeneration(cfg).eval(), ckpt)
    log: list[str] = []
    res = export_gguf(str(ckpt), tmp_path / "out", GGUFOptions(quants=["Q4_K_M", "BF16"], imatrix="none", mmproj_type="none"), log=log.append)
    note = next(n for n in res.notes if "not divisible" in n)
    assert "blk.*.ffn_down.weight Q4_K -> Q5_0" in note and any(note in line for line in log)
    types = tensor_types(res.file("text", "Q4_K_M"))
    assert types["blk.0.ffn_down.weight"] in ("Q5_0", "Q8_0") and types["blk.0.ffn_up.weight"] == "Q4_K"
    # llama.cpp's own rule, exactly: Q4_K_M gives layer 0's ffn_down Q4_K (-> Q5_0), layer 1's Q6_K (-> Q8_0)
    assert types["blk.0.ffn_down.weight"] == "Q5_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert note in (tmp_path / "out" / "README.md").read_text()
    # the manifest counts the tensors of a file llama.cpp wrote as qoqopt's writer counts those it writes
    entries = {f.get("quant"): f for f in json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]}
    assert entries["Q4_K_M"]["tensors"] == entries["BF16"]["tensors"] == len(types)


def test_direct_type_fallback_is_one_note_per_tensor_kind(tmp_path):
    """A Q8_0 mmproj whose vision MLP rows are not a multiple of 32 (the 7B's 3420 columns) writes
    those tensors F16 in every block: gguf-py reads F16 there, and the log says so once, not per block."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.exports.gguf_quant import tensor_types
    from qoqopt.mini import build_config, save_checkpoint

    cfg = build_config("tiny")
    cfg.vision_config.intermediate_size = 344  # 344 % 32 == 24
    torch.manual_seed(0)
    ckpt = tmp_path / "odd"
    ckpt.mkdir()
    save_checkpoint(Qwen2_5_VLForConditionalGeneration(cfg).eval(), ckpt)
    log: list[str] = []
    res = export_gguf(str(ckpt), tmp_path / "out", GGUFOptions(quants=["BF16"], imatrix="none", mmproj_type="q8_0"), log=log.append)
    types = tensor_types(res.file("mmproj"))
    depth = cfg.vision_config.depth
    assert [types[f"v.blk.{i}.ffn_down.weight"] for i in range(depth)] == ["F16"] * depth
    assert types["v.blk.0.ffn_up.weight"] == "Q8_0"
    fallback_lines = [line for line in log if "not divisible" in line]
    assert fallback_lines == [f"note: v.blk.*.ffn_down.weight: rows of 344 not divisible by 32 for Q8_0; wrote F16 (x{depth})"]


def _copy_without_weights(src: Path, dst: Path) -> Path:
    """A checkpoint folder with src's config/tokenizer files, for a test to write edited weights into."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_ecg_encoder_skipped_and_said(tiny_dir, tmp_path):
    """QoQ-Med's own variant carries time_series_embedding.*: left out of the GGUF on purpose, and said so."""
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = _copy_without_weights(tiny_dir, tmp_path / "ecg")
    state = load_file(str(tiny_dir / "model.safetensors"))
    state["time_series_embedding.proj.weight"] = torch.zeros(256, 768, dtype=torch.bfloat16)
    state["time_series_embedding.encoder.blocks.0.attn.qkv.weight"] = torch.zeros(2304, 768, dtype=torch.bfloat16)
    save_file(state, str(ckpt / "model.safetensors"))
    res = run_cli("export", str(ckpt), "--format", "gguf", "--quant", "F16", "--mmproj-type", "none", "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert "skipped deliberately: 2 tensor(s) time_series_embedding.*: QoQ-Med's ECG encoder" in res.stdout
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "time_series_embedding.*" in readme and "no ECG encoder" in readme
    # built without an mmproj (--mmproj-type none): the card says text only and gives no image command
    run_it, left_out = readme.split("## Run it", 1)[1].split("## Left out on purpose", 1)
    assert not any(word in run_it for word in ("--mmproj", "--image", "mtmd", "mmproj with", "llama_cpp"))
    assert "This build is text only" in readme and "The mmproj comes from" not in readme
    assert "- the mmproj (`--mmproj-type none`): this build reads text only" in left_out
    assert "mmproj" not in (tmp_path / "out" / "Modelfile").read_text()
    said = next(ln for ln in res.stdout.splitlines() if ln.startswith("skipped deliberately: "))
    info = run_cli("info", str(tmp_path / "out")).stdout.splitlines()  # and so does `qoqopt info` of the build
    assert [ln for ln in info if ln.startswith("left out")] == [
        "left out     " + said.removeprefix("skipped deliberately: "),
        "left out     the mmproj (`--mmproj-type none`): this build reads text only"]  # fmt: skip
    # an unknown tensor is refused, not dropped
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(state, str(ckpt / "model.safetensors"))
    res = run_cli("export", str(ckpt), "--format", "gguf", "--quant", "F16", "--out", str(tmp_path / "out2"))
    assert res.returncode == 2
    assert res.stderr == "error: 1 tensor(s) have no GGUF mapping: model.layers.0.mlp.extra.weight (refusing to drop them silently)\n"


def test_mmproj_needs_the_vision_tower(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    ckpt = _copy_without_weights(tiny_dir, tmp_path / "novis")
    state = {k: v for k, v in load_file(str(tiny_dir / "model.safetensors")).items() if not k.startswith("visual.")}
    save_file(state, str(ckpt / "model.safetensors"))
    # refused when opened (config.json names a vision tower the weights do not hold), before the GGUF mapping
    with pytest.raises(QoqoptError, match=r"novis: config.json's depth is 4, but the weights hold none of those layers"):
        export_gguf(str(ckpt), tmp_path / "out", GGUFOptions(quants=["F16"], imatrix="none"), log=lambda s: None)


def _narrowed_mmproj(src: Path, dst: Path, width: int) -> Path:
    """A copy of an mmproj whose projector ends at `width` outputs: the mmproj of another model size."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        data = np.array(t.data)
        writer.add_tensor(t.name, data[:width] if t.name.startswith("mm.2.") else data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_llama_cpp_reasons_reach_the_error_and_its_chatter_does_not(built, tmp_path, capfd):
    """A wrong mmproj fails with llama.cpp's own reason in the one-line QoqoptError; a right one loads
    with nothing on stderr (no tensor listings, no Qwen-VL 1024-image-token grounding warning)."""
    text = built.file("text", "F16")
    with LlamaVL(text, built.file("mmproj"), image_min_tokens=TRAIN_TOKENS[0], image_max_tokens=TRAIN_TOKENS[1]) as vl:
        assert vl.image_embeddings(_ct_eval_item().image.convert("RGB")).shape[1] == 256
    assert capfd.readouterr().err == ""
    narrow = _narrowed_mmproj(built.file("mmproj"), tmp_path / "mmproj-narrow.gguf", 128)
    wrong = {narrow: "mismatch between text model (n_embd = 256) and mmproj (n_embd = 128) hint: you may be using wrong mmproj",
             text: f"Failed to load CLIP model from {text}"}  # fmt: skip
    for mmproj, reason in wrong.items():
        with pytest.raises(QoqoptError) as failed:
            LlamaVL(text, mmproj)
        assert str(failed.value).startswith(f"llama.cpp could not load the mmproj {mmproj} (llama.cpp: ")
        assert reason in str(failed.value) and "\n" not in str(failed.value)
    assert capfd.readouterr().err == ""


def test_llama_cpp_memory_is_its_own_buffers(built):
    """bench's GGUF memory is what llama.cpp logs of its buffers, and that is what it allocated: the
    weights are the files' tensor bytes (gguf-py's reader), the KV cache n_ctx x layers x (K + V) in
    F16 from the GGUF's own metadata; compute buffers are reserved. On the CPU none is device memory."""
    import llama_cpp
    from gguf import GGUFReader

    from qoqopt.exports.gguf_runtime import BUFFERS

    text, mmproj = built.file("text", "F16"), built.file("mmproj")
    with LlamaVL(text, mmproj, n_ctx=512, threads=1, image_min_tokens=TRAIN_TOKENS[0], image_max_tokens=TRAIN_TOKENS[1]) as vl:
        vl.image_embeddings(_ct_eval_item().image.convert("RGB"))  # reserves clip's compute buffer
        sizes = dict(BUFFERS.mib)

    def tensor_mib(reader):
        return sum(int(t.n_bytes) for t in reader.tensors) / 2**20

    def meta(reader, key):
        return int(reader.fields[key].contents())

    reader = GGUFReader(text)  # once: it parses the 152k-token vocabulary (about 10 s here)
    n_layer, n_kv = meta(reader, "qwen2vl.block_count"), meta(reader, "qwen2vl.attention.head_count_kv")
    head_dim = meta(reader, "qwen2vl.embedding_length") // meta(reader, "qwen2vl.attention.head_count")
    by_kind = {kind: sum(mib for (fn, _, k), mib in sizes.items() if k == kind and fn != "clip") for kind in ("model", "KV")}
    assert tensor_mib(reader) <= by_kind["model"] <= tensor_mib(reader) + 1  # + alignment padding
    assert by_kind["KV"] == pytest.approx(512 * n_layer * 2 * n_kv * head_dim * 2 / 2**20, abs=0.01)
    assert sizes[("clip", "CPU", "model")] == pytest.approx(tensor_mib(GGUFReader(mmproj)), abs=0.01)
    assert {fn for (fn, _, kind) in sizes if kind == "compute"} == {"sched_reserve", "reserve_compute_meta"}  # text, clip
    assert BUFFERS.total_mib(device=False) == pytest.approx(sum(sizes.values()))
    assert BUFFERS.total_mib(device=True) is None
    # no GPU asked for: the device list is emptied (llama.cpp's src/llama.cpp), or a GPU build would
    # still run batches of 32+ tokens on a GPU (op_offload)
    assert (vl.llm.model_params.split_mode, vl.llm.model_params.main_gpu) == (llama_cpp.LLAMA_SPLIT_MODE_NONE, -1)


def test_bench_reserves_clips_buffer_for_its_largest_image_first(built):
    """clip sizes its compute buffer for the first image it encodes and regrows it for a larger one
    without a log line (measured: 2.2 MiB logged after a 100-token image, where a first image of 668
    tokens logs 46.9). The bench runner encodes the largest image its token range allows first, so no
    image in range makes a fresh llama.cpp log more, at either extreme of shape."""
    from PIL import Image

    from qoqopt.bench.gguf_runner import GGUFRunner
    from qoqopt.exports.gguf_runtime import BUFFERS

    def clip_compute() -> float:
        return BUFFERS.mib[("reserve_compute_meta", "CPU", "compute")]

    text, mmproj = built.file("text", "F16"), built.file("mmproj")
    runner = GGUFRunner(text, mmproj, "cpu", threads=1, answer_tokens=3000)
    try:
        reserved = clip_compute()
        # room for the largest image and bench's longest answer (a fixed 4096 refused every chat of
        # --answer-tokens 3500), as llama.cpp reports its context
        assert runner.vl.llm.n_ctx() >= TRAIN_TOKENS[1] + 3000 + 256
    finally:
        runner.close()
    fresh = {}
    for size in [(252, 252), (728, 700), (812, 644), (4676, 112), (18704, 28), (3000, 3000)]:
        with LlamaVL(text, mmproj, n_ctx=512, threads=1, image_min_tokens=TRAIN_TOKENS[0], image_max_tokens=TRAIN_TOKENS[1]) as vl:
            vl.image_embeddings(Image.new("RGB", size))
            fresh[size] = clip_compute()
    assert max(fresh.values()) == pytest.approx(reserved) and fresh[(252, 252)] < reserved / 4, (reserved, fresh)


def test_buffer_lines_on_a_gpu_are_read_from_llama_cpps_own_formats():
    """The log lines a GPU run writes, made from the format strings compiled into this llama.cpp
    (read from its libraries): device buffers carry the device's name (CUDA0), pinned host memory
    ends in _Host. Every buffer format llama.cpp has must be read, or a new one would go uncounted."""
    import llama_cpp

    from qoqopt.exports.llama_memory import BufferLog

    libs = [p.read_bytes() for p in (Path(llama_cpp.__file__).parent / "lib").glob("lib*.so*")]
    formats = {f.decode() for lib in libs for f in re.findall(rb"%s: +%\d*s +[A-Za-z ]*buffer size = %8\.2f MiB\n", lib)}
    backend = {f.decode() for lib in libs for f in re.findall(rb"%s: CLIP using %s backend\n", lib)}
    weights = {f.decode() for lib in libs for f in re.findall(rb"%s: model size: +%\.2f MiB\n", lib)}
    assert len(formats) >= 4 and len(backend) == 1 and len(weights) == 1, (formats, backend, weights)
    log = BufferLog()
    for i, fmt in enumerate(sorted(formats)):
        log.write(fmt % ("fn%d" % i, "CUDA0", 100.0))
        log.write(fmt % ("fn%d" % i, "CUDA_Host", 1.0))
        log.write(fmt % ("fn%d" % i, "CPU_Mapped", 2.0))
        log.write(fmt % ("fn%d" % i, "CUDA0", 50.0))  # a buffer reserved again, smaller: the peak stays
    log.write(backend.pop() % ("clip_ctx", "CUDA0"))
    log.write(weights.pop() % ("load_hparams", 1276.44))
    assert log.total_mib(device=True) == pytest.approx(100.0 * len(formats) + 1276.44)
    assert log.total_mib(device=False) == pytest.approx(3.0 * len(formats))
    log.clear()
    assert log.total_mib(device=True) is None and log.total_mib(device=False) is None


def test_log_levels_are_the_compiled_ggml_headers():
    """The log filter's level numbers, read from the ggml.h llama-cpp-python was built with (its own
    _logger.py comment lists an older numbering, in which 3 was ERROR)."""
    import re

    import llama_cpp

    from qoqopt.exports.gguf_runtime import GGML_LOG_LEVEL_CONT, GGML_LOG_LEVEL_ERROR

    header = Path(llama_cpp.__file__).parents[1] / "include" / "ggml.h"
    levels = {name: int(v) for name, v in re.findall(r"GGML_LOG_LEVEL_(\w+)\s*=\s*(\d+)", header.read_text())}
    assert (levels["ERROR"], levels["CONT"]) == (GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT)
    assert levels["WARN"] < levels["ERROR"]


def test_published_card_carries_the_builds_own_run_instructions(built):
    """The Hub card replaces the export's README: it must carry what that README told users, word for
    word (the image-token range, QoQ-Med's sampling settings, the llama-cpp-python recipe, the
    Modelfile; `ollama run hf.co/...` with the repo's id) and its known issues, not a generic usage
    that drops them."""
    from qoqopt.hub_license import CardLicense
    from qoqopt.publish import plan_upload, readme_sections

    # a base that no cache holds: check_base_model only notes it (the real 7B's config would refuse the tiny build)
    plan = plan_upload(built.out, "me/tiny-gguf", base_model="someone/uncached-base", license=CardLicense("apache-2.0"))
    exported = readme_sections((built.out / "README.md").read_text())
    card = readme_sections(plan.card)
    # the repo is known now, and the quant is named: untagged, Ollama picks one itself, not
    # necessarily the one the Modelfile (FROM) and the card describe
    quant = re.search(r"^FROM \./\S+\.([A-Z0-9_]+)\.gguf$", (built.out / "Modelfile").read_text(), re.M)[1]
    hub_run = exported["Run it"].replace("hf.co/<user>/<repo>", f"hf.co/me/tiny-gguf:{quant}")
    assert hub_run != exported["Run it"] and f"`ollama run hf.co/me/tiny-gguf:{quant}` reads the repo's `template`" in hub_run
    assert hub_run in card["Usage"] and exported["Known issues"] == card["Known issues"]
    assert "--image-min-tokens" in card["Usage"] and "QoQMedChatHandler" in card["Usage"]
    assert "RMSNorm epsilon" in card["Known issues"] and card["Left out on purpose"] == "- nothing"
    assert any("carries its run instructions" in note for note in plan.notes)


def test_a_prompt_longer_than_the_context_is_named(built):
    """llama.cpp itself only says "failed to find a memory slot" and llama_decode fails."""
    from PIL import Image

    from qoqopt.exports.gguf_runtime import chat_prompt

    image = Image.new("RGB", (308, 308), (90, 90, 90))  # 121 image tokens
    with LlamaVL(built.file("text", "F16"), built.file("mmproj"), n_ctx=256, threads=1) as vl:
        assert vl.generate(chat_prompt("Which region?"), image, max_tokens=1) is not None
        with pytest.raises(QoqoptError, match=r"^the prompt is \d+ tokens \(text and image\) and the reply up to 1, but "
                                              "the context holds 256"):  # fmt: skip
            vl.generate(chat_prompt("Which region? " * 60), image, max_tokens=1)
        with pytest.raises(QoqoptError, match=r"and the reply up to 200, but the context holds 256"):
            vl.generate(chat_prompt("Which region?"), image, max_tokens=200)  # the prompt alone fits
