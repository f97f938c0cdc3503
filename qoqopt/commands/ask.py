"""`qoqopt ask BUILD`: answer a clinical image question with a build in its own runtime: a GGUF
build in llama.cpp, a GPTQ/AWQ build or the original checkpoint in transformers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .argtypes import Once, count_or_all, index, positive_int

EXAMPLES = """\
examples:
  qoqopt ask out/mini-gguf --item ct-abd-pancreas.region_ct.eval-0        # a built-in item
  qoqopt ask out/mini-gguf --image scan.dcm --question "Which body region is shown? ..."
  qoqopt ask out/mini-gguf --quant Q8_0 --item ecg-12lead.rhythm.eval-0
  qoqopt ask out/mini-gptq --item ct-abd-pancreas.region_ct.eval-0        # GPTQ/AWQ in transformers
  qoqopt ask out/mini --item ct-abd-pancreas.region_ct.eval-0             # the original, to compare

What runs depends on BUILD (a directory or a Hub id; from a GGUF repo only the chosen text GGUF
and the mmproj are downloaded, from any other its metadata and safetensors):
  GGUF export      its text GGUF and mmproj through llama.cpp's multimodal path (llama-cpp-python's
                   mtmd): llama.cpp resizes and normalises the image, so this is what llama.cpp and
                   LM Studio users get; at QoQ-Med's training image range (84-668 image tokens;
                   Ollama runs every image at 1024 or more)
  GPTQ/AWQ export  transformers with qoqopt's W4A16 layers (Triton kernels on CUDA, their torch
                   reference on a CPU)
  checkpoint       transformers (fp32 compute up to ~3 B parameters, bf16 beyond)
Prints the model's reply and, for built-in items, the reference answer. A DICOM is converted with
its own window (see `qoqopt data --help`). Decoding is greedy.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "ask",
        help="answer an image question with a build in its runtime (GGUF: llama.cpp; GPTQ/AWQ: transformers)",
        description="Run one clinical image+question through a build (or the original) in its own runtime.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", help="a directory written by `qoqopt export`, or a checkpoint (directory or Hub id)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--item", action=Once, help="a built-in clinical item id (see `qoqopt data list`)")
    src.add_argument("--image", type=Path, action=Once, help="an image file (PNG, JPEG, TIFF, ...; 16-bit greyscale as llama.cpp reads it, "
                     "EXIF orientation applied) or a DICOM file (.dcm, or any name with the DICM marker; "
                     "a slice stored mirrored is flipped to the radiological view, patient's left on the right "
                     "(`qoqopt data show` shows what the model sees); an ECG waveform DICOM is drawn as a 12-lead sheet)")
    p.add_argument("--frame", type=index,
                   help="--image with several frames: which one, from 0 (default: a DICOM's middle frame, as the "
                   "clinical sets take it; a GIF's or TIFF stack's first)")  # fmt: skip
    p.add_argument("--question", action=Once,
                   help="the question for --image (QoQ-Med's think/\\boxed{} instruction is added); plain text, not "
                        "the chat format's control tokens such as <|im_end|>")  # fmt: skip
    p.add_argument("--quant", help="GGUF builds: which text GGUF (default: the one the build's card and Modelfile "
                                   "use: Q4_K_M, else Q5_K_M, Q6_K, Q8_0, ..., F16/F32 last)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default): CUDA when torch sees a GPU (GGUF: the GPU llama.cpp was built "
                        "for, CUDA or a Mac's Metal, which PyPI's source builds there by default), else the "
                        "CPU; cuda for a GGUF: that GPU, or an error")  # fmt: skip
    p.add_argument("--threads", type=count_or_all, default=0, help="CPU threads for llama.cpp and torch (default and 0: one per physical core this process may use, as llama.cpp and torch choose; fewer where OMP_NUM_THREADS asks for fewer, as torch takes it)")
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="reply length limit (default 1024: QoQ-Med "
                        "thinks at length before its \\boxed{} answer, ~125 tokens for a short one and up to ~1000; "
                        "the reply stops sooner where the model ends it)")
    p.add_argument("--revision", help="Hub branch, tag or commit of BUILD (default: main)")
    p.set_defaults(func=run)


def _pick_entries(build: str, manifest: dict, quant: str | None) -> list[dict]:
    """The manifest entries of the build's text GGUF of type ``quant`` (every part, the first first),
    then of its mmproj."""
    from ..errors import QoqoptError
    from ..manifest import entry_path, gguf_entries, gguf_quants, gguf_text_files

    quant = quant.upper() if quant else None  # as `export --quant` takes them: q8_0 is Q8_0
    texts, mmproj = gguf_text_files(manifest, quant), gguf_entries(manifest, "mmproj")
    if not texts:
        have = ", ".join(q for q in gguf_quants(manifest) if q)
        raise QoqoptError(f"{build} has no text GGUF{' of type ' + quant if quant else ''} (it has: {have})")
    if not mmproj:
        raise QoqoptError(f"{build} has no mmproj; re-export without --mmproj-type none to ask about images")
    entries = {entry_path(f): f for f in manifest["files"]}
    return [entries[t] for t in texts] + [entries[mmproj[0]]]


def _item(args):
    from ..data.prompts import with_suffix
    from ..errors import QoqoptError
    from ..images import open_image
    from ..user_text import checked_text
    from .data import builtin_item

    if args.item:
        if args.question or args.frame is not None:
            flag = "--question" if args.question else "--frame"
            raise QoqoptError(f"{flag} goes with --image; a built-in --item has its own")
        item = builtin_item(args.item)
        return item.image, item.question, item.answer
    if args.question is None:
        raise QoqoptError("--image needs --question")
    question = checked_text(args.question, "question", "--question")
    image = open_image(args.image, args.frame)
    return image, with_suffix(question), None


def run(args) -> int:
    from ..errors import QoqoptError
    from ..integrity import checked_files, checked_weights, downloaded_quant
    from ..loader import resolve
    from ..manifest import build_kind, entry_path

    folder, commit = resolve(args.build, args.revision, weights=False)  # a Hub id: its manifest and configs first
    kind, manifest = build_kind(folder)
    if args.quant and kind != "gguf":
        raise QoqoptError(f"--quant picks a text GGUF; {args.build} is a {kind} build, not GGUF")
    image, question, reference = _item(args)
    if kind == "gguf":
        # a GGUF repo holds every quant type (tens of GB at 7B): fetch the one text file (all its parts) and the mmproj
        quant = args.quant or (downloaded_quant(folder, manifest) if commit is None else None)
        entries = _pick_entries(args.build, manifest, quant)
        folder, _ = resolve(args.build, commit, only=[entry_path(e) for e in entries])
        files = checked_files(folder, entries)  # every part present, at its recorded size and sha256
        model, reply = _ask_llama_cpp(files[0], files[-1], args, image, question)
    else:
        folder, _ = resolve(args.build, commit)
        if manifest:
            checked_weights(folder, manifest)
        model, reply = _ask_transformers(folder, kind != "checkpoint", args, image, question)
    print(f"model     {model}")
    print(f"question  {question}")
    print(f"reply     {reply.strip()}")
    from ..drift import extract_boxed

    answer = extract_boxed(reply)
    if reference is not None:
        print(f"answer    {answer!s}   (reference: {reference})")
    if answer is None:  # QoQ-Med ends with one; a reply cut at the limit has none yet
        print(f"note: the reply holds no \\boxed{{}} answer: if it was cut off, ask again with a larger "
              f"--max-tokens (this one: {args.max_tokens}; QoQ-Med's reasoning can take ~1000)", file=sys.stderr)
    return 0


def _ask_llama_cpp(text_path: Path, mmproj_path: Path, args, image, question: str) -> tuple[str, str]:
    from ..bench.machine import threads_or_default
    from ..chat_template import gguf_prompt
    from ..errors import QoqoptError
    from ..exports.gguf_header import read_header
    from ..exports.gguf_meta import train_token_range
    from ..exports.gguf_runtime import LlamaVL, gpu_offload_available

    gpu = args.device != "cpu" and gpu_offload_available()
    if args.device == "cuda" and not gpu:
        raise QoqoptError("--device cuda: this llama-cpp-python was built without GPU offload")
    lo, hi = train_token_range()  # what the build's README and Modelfile tell llama.cpp users to pass
    threads = threads_or_default(args.threads)
    kv = read_header(text_path).kv  # the context the model was trained for, and its chat template
    n_ctx = _context(kv, hi, question, args.max_tokens)
    prompt = gguf_prompt(kv.get("tokenizer.chat_template"), question, text_path.name)
    with LlamaVL(text_path, mmproj_path, n_ctx=n_ctx, image_min_tokens=lo, image_max_tokens=hi, gpu=gpu,
                 threads=threads) as vl:  # fmt: skip
        reply = vl.generate(prompt, image, max_tokens=args.max_tokens)
    return f"{text_path.name} + {mmproj_path.name} (llama.cpp{', GPU' if gpu else ''})", reply


TEMPLATE_ROOM = 256  # the chat template's tokens around the image and the question


def _context(kv: dict, image_tokens: int, question: str, max_tokens: int) -> int:
    """A context with room for the image, the question (a token covers at least one UTF-8 byte), the
    chat template and the whole reply (a fixed 2048 refused a --max-tokens 1500 that the original
    answers: QoQ-Med's <think> runs long), up to the context the model was trained for. The prompt is
    counted once tokenized: a question that does not fit is refused then."""
    from ..errors import QoqoptError
    from ..exports.gguf_runtime import context_size, trained_context

    trained, fixed = trained_context(kv), image_tokens + TEMPLATE_ROOM + max_tokens
    if trained and fixed >= trained:
        raise QoqoptError(f"--max-tokens {max_tokens} leaves no room for the question in the model's context "
                          f"of {trained} tokens")  # fmt: skip
    return context_size(trained, fixed + len(question.encode()))


def _ask_transformers(folder: Path, quantized: bool, args, image, question: str) -> tuple[str, str]:
    import torch

    from ..bench.hf_runner import load_folder
    from ..bench.machine import threads_or_default
    from ..errors import QoqoptError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise QoqoptError("--device cuda: no CUDA GPU is visible to torch here (use --device cpu)")
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads_or_default(args.threads))
    runner = load_folder(folder, quantized, device)
    try:
        return f"{args.build} ({runner.runtime}, {device})", runner.reply(image, question, args.max_tokens)
    finally:
        runner.close()
