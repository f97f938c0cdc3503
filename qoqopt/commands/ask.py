"""`qoqopt ask BUILD`: answer a clinical question with an exported GGUF build, in llama.cpp itself."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """\
examples:
  qoqopt ask out/mini-gguf --item ct-abd-pancreas.region_ct.eval-0        # a built-in item
  qoqopt ask out/mini-gguf --image scan.dcm --question "Which body region is shown? ..."
  qoqopt ask out/mini-gguf --quant Q8_0 --item ecg-12lead.rhythm.eval-0

Runs the build's text GGUF and its mmproj through llama.cpp's multimodal path (llama-cpp-python's
mtmd): llama.cpp resizes and normalises the image, so this is what LM Studio and Ollama users get.
Prints the model's reply and, for built-in items, the reference answer. A DICOM is converted with
its own window (see `qoqopt data --help`). Decoding is greedy.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "ask",
        help="answer an image question with a GGUF build in llama.cpp (mmproj included)",
        description="Run one clinical image+question through an exported GGUF build in llama.cpp.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, help="directory written by `qoqopt export --format gguf`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--item", help="a built-in clinical item id (see `qoqopt data list`)")
    src.add_argument("--image", type=Path, help="an image (PNG/JPEG) or DICOM file")
    p.add_argument("--question", help="the question for --image (QoQ-Med's think/\\boxed{} instruction is added)")
    p.add_argument("--quant", help="which text GGUF of the build (default: the first in its manifest)")
    p.add_argument("--max-tokens", type=int, default=64, help="reply length limit (default 64)")
    p.set_defaults(func=run)


def _pick_files(build: Path, quant: str | None) -> tuple[Path, Path]:
    from ..errors import QoqoptError
    from ..manifest import gguf_entries, gguf_quants, read_manifest

    manifest = read_manifest(build, "a directory written by `qoqopt export --format gguf`")
    texts, mmproj = gguf_entries(manifest, "text", quant), gguf_entries(manifest, "mmproj")
    if not texts:
        have = ", ".join(q for q in gguf_quants(manifest) if q)
        raise QoqoptError(f"{build} has no text GGUF{' of type ' + quant if quant else ''} (it has: {have})")
    if not mmproj:
        raise QoqoptError(f"{build} has no mmproj; re-export without --mmproj-type none to ask about images")
    return build / texts[0], build / mmproj[0]


def _item(args):
    from ..data import find_item
    from ..data.dicom import dicom_to_image
    from ..data.prompts import with_suffix
    from ..errors import QoqoptError

    if args.item:
        item = find_item(args.item)
        return item.image, item.question, item.answer
    if not args.question:
        raise QoqoptError("--image needs --question")
    if not args.image.is_file():
        raise QoqoptError(f"{args.image}: no such file")
    if args.image.suffix.lower() in (".dcm", ".dicom"):
        image = dicom_to_image(args.image)
    else:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    return image, with_suffix(args.question), None


def run(args) -> int:
    from ..exports.gguf_meta import train_token_range
    from ..exports.gguf_runtime import LlamaVL, chat_prompt

    text_path, mmproj_path = _pick_files(args.build, args.quant)
    image, question, reference = _item(args)
    prompt = chat_prompt(question)
    lo, hi = train_token_range()  # what the build's README and Modelfile tell llama.cpp users to pass
    with LlamaVL(text_path, mmproj_path, image_min_tokens=lo, image_max_tokens=hi) as vl:
        reply = vl.generate(prompt, image, max_tokens=args.max_tokens)
    print(f"model     {text_path.name} + {mmproj_path.name} (llama.cpp)")
    print(f"question  {question}")
    print(f"reply     {reply.strip()}")
    if reference is not None:
        from ..drift import extract_boxed

        print(f"answer    {extract_boxed(reply)!s}   (reference: {reference})")
    return 0
