"""The README of a GGUF build, which `publish` makes its Hub card: what each file is, and how to run
it in llama.cpp, LM Studio, Ollama and llama-cpp-python with QoQ-Med's image range and sampling.

`ctx` is the export's context (name, source, revision, fingerprint, vision hparams, what it left
out) and `records` its file records (path, kind, quant, part, parts, bytes), as exports/gguf_export.py
makes them.
"""

from __future__ import annotations

from qoqopt.data.prompts import THINK_SUFFIX
from qoqopt.manifest import source_id
from qoqopt.mini import TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS

from . import gguf_meta, ollama

TRAIN_PIXELS = f"{TRAIN_MIN_PIXELS}..{TRAIN_MAX_PIXELS}"  # QoQ-Med's training image range, as the cards say it
# QoQ-Med's generation settings, which the Modelfile and `params` give Ollama: every recipe here reads
# them. Its llama.cpp recipes keep each image inside the training range (at most 668 tokens at 7B),
# so a 4096 context holds an image, a question and a long answer; Ollama's images are larger.
NUM_CTX = 4096
SAMPLING = {**ollama.PARAMS, "num_ctx": NUM_CTX, "repeat_last_n": NUM_CTX}
SETTINGS = "-c {num_ctx} --temp {temperature} --repeat-penalty {repeat_penalty} --repeat-last-n {repeat_last_n}".format(**SAMPLING)


def size_text(n: int) -> str:
    """A file size as the card's table gives it (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _llama_cpp_python_usage(text: str, mmproj: str | None) -> str:
    """The card's llama-cpp-python recipe, with the chat handler's lost newline kept.

    llama-cpp-python's Qwen25VLChatHandler (0.3.36) renders its template with Jinja's
    ``keep_trailing_newline=False``, which drops the template's last character, the newline after
    ``<|im_start|>assistant`` that Qwen2.5-VL was trained on: the reply starts mid-thought. Ending
    the template on an empty expression keeps that newline whether or not a later release keeps
    trailing newlines. test_imatrix.py runs this recipe's handler against transformers.
    """
    if not mmproj:
        return ""
    return f"""
**llama-cpp-python** (images through its `Qwen25VLChatHandler`; seen in 0.3.36): the handler renders
its chat template with Jinja's `keep_trailing_newline=False`, which drops the template's last
newline, the one after `<|im_start|>assistant`, and the model then starts its reply mid-thought.
Keep it:

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler

    class QoQMedChatHandler(Qwen25VLChatHandler):
        # ends the template on an empty expression, so Jinja keeps the newline before it
        CHAT_FORMAT = Qwen25VLChatHandler.CHAT_FORMAT + '{{{{ "" }}}}'

    # last_n_tokens_size: the repetition penalty over the whole reply, not only its last 64 tokens
    llm = Llama("{text}", chat_handler=QoQMedChatHandler(clip_model_path="{mmproj}"), n_ctx={SAMPLING["num_ctx"]},
                last_n_tokens_size={SAMPLING["repeat_last_n"]})
    image = {{"type": "image_url", "image_url": {{"url": "file:///path/to/scan.png"}}}}
    question = {{"type": "text", "text": "Above is a CT image of a patient. What is the diagnosis? Answer with one word."}}
    out = llm.create_chat_completion(messages=[{{"role": "user", "content": [image, question]}}],
                                     temperature={SAMPLING["temperature"]}, repeat_penalty={SAMPLING["repeat_penalty"]})
    print(out["choices"][0]["message"]["content"])

The handler has no image-size option: give it images inside {TRAIN_PIXELS} pixels.
"""


def _instruction_line() -> str:
    """The answer instruction QoQ-Med was trained with after each question: without it the model need
    not think in <think> nor answer in \\boxed{}, and this build's drift and accuracy were measured with it."""
    return ("QoQ-Med was trained with an answer instruction after each question (reasoning in `<think>`, the\n"
            "answer in `\\boxed{}`). `qoqopt ask` and `qoqopt bench` append its think / `\\boxed{}` part, and so should\n"
            f"you; the examples below leave it out for length:\n\n    {THINK_SUFFIX}\n\n")


def _split_line(records: list) -> str:
    split = sorted({r.quant for r in records if r.part})
    if not split:
        return ""
    return (f"{', '.join(split)} {'is' if len(split) == 1 else 'are'} written in parts (`-00001-of-0000N.gguf`): download "
            "every part into one\nfolder and give llama.cpp or LM Studio the first; they load the rest. Ollama 0.30 or "
            "later merges\nparts given one FROM line each in the Modelfile.\n\n")


def _mmproj_line(mmproj: str | None) -> str:
    if not mmproj:
        return ("This build is text only (exported with `--mmproj-type none`): no runtime can give it an image. "
                "Export again without that option for image input. ")
    return ("The mmproj comes from this checkpoint's own vision tower (QoQ-Med fine-tuned it; a base Qwen2.5-VL\n"
            "mmproj sees images differently). ")


def _penalty_window(tool: str | None) -> str:
    """Why the card passes --repeat-last-n; `tool`: one that counts only the reply in that window."""
    reply_only = f"; {tool} counts only the reply" if tool else ""
    return (f"`--repeat-last-n {NUM_CTX}` applies QoQ-Med's repetition penalty over the whole conversation, as\n"
            f"transformers does (llama.cpp's default is the last 64 tokens{reply_only}).")


def _llama_cpp(ctx, text: str, mmproj: str | None) -> str:
    """The card's llama.cpp commands: image chat at QoQ-Med's training image range, or text chat."""
    if not mmproj:
        return (f"**llama.cpp** (text chat, with the chat template the GGUF carries)\n\n    llama-cli -m {text} {SETTINGS}\n"
                f"    llama-server -m {text} {SETTINGS} --port 8080   # OpenAI-compatible /v1/chat/completions\n\n"
                f"{_penalty_window(None)}")
    lo, hi = gguf_meta.train_token_range(ctx.vision_hp)
    return f"""**llama.cpp**

    llama-mtmd-cli -m {text} --mmproj {mmproj} --image scan.png \\
        -p "Above is a CT image of a patient. What is the diagnosis? Answer with one word." \\
        {SETTINGS} \\
        --image-min-tokens {lo} --image-max-tokens {hi}

`--image-min-tokens {lo} --image-max-tokens {hi}` keeps images inside QoQ-Med's training range
({TRAIN_PIXELS} pixels); the mmproj records that range (`clip.vision.image_min_pixels` /
`image_max_pixels`), but llama.cpp does not read those keys for Qwen2.5-VL (checked in the
llama.cpp of llama-cpp-python 0.3.36). The two flags came in November 2025 (ggml-org/llama.cpp#16921):
an older llama.cpp refuses them. llama.cpp's own hint to use `--image-min-tokens 1024` does not
apply to QoQ-Med.
{_penalty_window("llama-mtmd-cli")}
As an OpenAI-compatible server (`POST /v1/chat/completions`, the image as an `image_url` part; a
request's own temperature overrides the one given here):

    llama-server -m {text} --mmproj {mmproj} \\
        {SETTINGS} \\
        --image-min-tokens {lo} --image-max-tokens {hi} --port 8080"""


def _lm_studio(ctx, text: str, mmproj: str | None, in_parts: bool) -> str:
    files = f"`{text}`" + (" with its other parts" if in_parts else "")
    settings = f"Set temperature {SAMPLING['temperature']} and repeat penalty {SAMPLING['repeat_penalty']}."
    if not mmproj:
        return f"put {files} in a folder under `~/.lmstudio/models/<publisher>/{ctx.name}/`. {settings}"
    return (f"put {files} and `{mmproj}` in one folder under\n`~/.lmstudio/models/<publisher>/{ctx.name}/`; "
            "LM Studio pairs the mmproj with the model and enables\nimage input. It has no image-size setting: "
            f"give it images inside {TRAIN_PIXELS} pixels.\n{settings}")


def _ollama(ctx, text: str, mmproj: str | None, in_parts: bool) -> str:
    """The card's Ollama paragraph: what the Modelfile and the Hub files carry, and Ollama's image size."""
    carries = "the chat template, QoQ-Med's generation settings" + (" and the mmproj" if mmproj else "")
    parts = f",\nand names every part of `{text}` (Ollama 0.30 or later merges them)" if in_parts else ""
    # the Hub's Ollama endpoint answers a sharded tag with "Ollama does not support this yet"
    # (ollama/ollama#14270): a build whose quant is in parts has only the Modelfile route
    hub = ("This quant is in parts, which `ollama run hf.co/...` cannot fetch (the Hub refuses a sharded GGUF\n"
           "for Ollama): use the Modelfile." if in_parts else
           f"`ollama run {ollama.HF_CO_PLACEHOLDER}` reads the repo's `template` and `params` files (shipped beside\n"
           "the Modelfile) rather than the Modelfile.")  # fmt: skip
    run = f"`ollama create qoq-med -f Modelfile`, then `ollama run qoq-med`.\nThe Modelfile carries {carries}{parts}.\n{hub}"
    if not mmproj:
        return f"**Ollama**: {run}"
    lo, hi = gguf_meta.train_token_range(ctx.vision_hp)
    return (f"**Ollama** (0.30 or later for images: earlier versions give image embeddings text positions):\n{run}\n"
            "Ollama runs every image at 1024 or more image tokens (it passes llama-server `--image-min-tokens 1024`\n"
            f"for this architecture, up to 4096), above QoQ-Med's training range of {lo}..{hi} tokens, which a Modelfile\n"
            "cannot change; qoqopt's drift numbers were measured inside the training range. For answers at the\n"
            f"training range, use llama.cpp or llama-server with the flags above. The Modelfile's context is\n"
            f"{ollama.NUM_CTX} tokens, room for two full-size images and a long answer (Ollama never shortens a\n"
            "prompt with images: one that does not fit fails).")


def _run_it(ctx, text: str, mmproj: str | None, in_parts: bool) -> str:
    """The card's "Run it" for llama.cpp, LM Studio and Ollama; text chat only without an mmproj.
    `text` is what llama.cpp is given (the first part of a split file), also the Modelfile's."""
    return f"""{_llama_cpp(ctx, text, mmproj)}

**LM Studio**: {_lm_studio(ctx, text, mmproj, in_parts)}

{_ollama(ctx, text, mmproj, in_parts)}
"""


def render_readme(ctx, records: list, mmproj: str | None, primary: str, notes: list[str],
                  imatrix: dict | None) -> str:  # fmt: skip
    first = next(r for r in records if r.kind == "text" and r.quant == primary)  # records in path order
    text = first.path
    rows = "\n".join(f"| `{r.path}` | {r.kind} | {r.quant or ''} | {size_text(r.bytes)} |" for r in records if r.kind in ("text", "mmproj", "imatrix"))
    left_out = ctx.skipped + ([] if mmproj else ["the mmproj (`--mmproj-type none`): this build reads text only"])
    skipped = "\n".join(f"- {s}" for s in left_out) or "- nothing"
    note_lines = "\n".join(f"- {n}" for n in notes) or "- none"
    im = (
        f"The K-quant / IQ files were quantized with an importance matrix ({imatrix['source']}; "
        f"{'; '.join(imatrix['datasets'])}), saved as `{imatrix['file']}` "
        f"(llama.cpp's GGUF imatrix format: `llama-quantize --imatrix {imatrix['file']} ...` reuses it)."
        if imatrix
        else "No importance matrix was used."
    )
    return f"""# {ctx.name}: GGUF build

Built by qoqopt from `{ctx.source}` ({source_id(ctx.revision, ctx.fingerprint)}). `manifest.json` lists
every file with its sha256.

| file | kind | type | size |
|---|---|---|---|
{rows}

{_mmproj_line(mmproj)}{im}

## Run it

{_instruction_line()}{_split_line(records)}{_run_it(ctx, text, mmproj, bool(first.part))}{_llama_cpp_python_usage(text, mmproj)}
## Left out on purpose

{skipped}

## Notes from this build

{note_lines}

## Known issues

- llama.cpp's `qwen2vl` architecture ignores the RMSNorm epsilon (it runs with eps 0): an F32 build's
  logits differ from transformers by ~1e-3 relative on qoqopt's mini model with the default F16 KV
  cache (~1e-6 with an F32 cache and eps 0 on both sides).
- llama.cpp does not NFC-normalise input and the HF tokenizer does: tokenization agrees on NFC text.
"""
