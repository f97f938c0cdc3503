"""A GGUF build named by its file, not found in a qoqopt export: another tool's (llama.cpp's
convert_hf_to_gguf.py and llama-quantize, a Hub repo's download), benched beside qoqopt's own.

`--variants gguf:PATH.gguf` takes the text GGUF at PATH (a split file: its first part) and the one
mmproj beside it (`mmproj*.gguf`, as llama.cpp's `-hf` picks it from a repo);
`gguf:TEXT.gguf+MMPROJ.gguf` names the mmproj. Such a file carries no manifest, so nothing records
which checkpoint it was made from: its dims are checked against the source checkpoint's, and the
run says that its origin could not be.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QoqoptError


def is_given(option: str) -> bool:
    """A `gguf:` variant's option that names files rather than a quant type."""
    return option.lower().endswith(".gguf")


def given_files(option: str) -> dict[str, Path]:
    """{"text": ..., "text part 2": ..., "mmproj": ...} for `TEXT.gguf[+MMPROJ.gguf]`, as
    variants.find_in gives a build's: a split text file's every part (its size and sha256 are all of
    them), each an existing GGUF file."""
    from ..build_info import later_parts
    from ..exports.gguf_header import read_header

    cut = option.lower().find(".gguf+")  # at the first file's end: a folder may hold a "+" (c++/)
    text_spec, mmproj_spec = (option[: cut + 5], option[cut + 6 :]) if cut >= 0 else (option, "")
    text = _gguf_file(text_spec)
    mmproj = _gguf_file(mmproj_spec) if mmproj_spec else _mmproj_beside(text)
    if mmproj.samefile(text):
        raise QoqoptError(f"gguf:{option}: the text GGUF and the mmproj are one file")
    parts = later_parts(text, read_header(text).kv)
    return {"text": text, **{f"text part {no}": p for no, p in enumerate(parts, 2)}, "mmproj": mmproj}


def check_shapes(name: str, files: dict[str, Path], config) -> None:
    """Refuse a given GGUF whose dims are not the source checkpoint's (``config``: transformers'
    Qwen2_5_VLConfig): its drift would be measured against another model. Dims alone cannot tell a
    fine-tune from its base, which the caller says."""
    from ..exports.gguf_header import read_header

    text, vision = config.text_config, config.vision_config
    kv = read_header(files["text"]).kv
    arch = kv.get("general.architecture")
    tokens = kv.get("tokenizer.ggml.tokens")
    _compare(name, files["text"], {
        "general.architecture": (arch, "qwen2vl"),
        f"{arch}.block_count": (kv.get(f"{arch}.block_count"), text.num_hidden_layers),
        f"{arch}.embedding_length": (kv.get(f"{arch}.embedding_length"), text.hidden_size),
        "tokenizer.ggml.tokens": (len(tokens) if isinstance(tokens, list) else tokens, text.vocab_size),
    })  # fmt: skip
    kv = read_header(files["mmproj"]).kv
    _compare(name, files["mmproj"], {
        "clip.vision.block_count": (kv.get("clip.vision.block_count"), vision.depth),
        "clip.vision.embedding_length": (kv.get("clip.vision.embedding_length"), vision.hidden_size),
        "clip.vision.projection_dim": (kv.get("clip.vision.projection_dim"), vision.out_hidden_size),
    })  # fmt: skip


def _compare(name: str, path: Path, pairs: dict[str, tuple]) -> None:
    for key, (found, expected) in pairs.items():
        if found != expected:
            raise QoqoptError(f"{name}: {path.name} has {key} {found}, the source checkpoint {expected}: "
                              "not a build of this model")  # fmt: skip


def _gguf_file(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise QoqoptError(f"gguf:{spec}: {'a directory, not a GGUF file' if path.is_dir() else 'no such file'}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise QoqoptError(f"gguf:{spec}: not a GGUF file")
    return path


def _mmproj_beside(text: Path) -> Path:
    found = sorted(p for p in text.parent.glob("*.gguf") if p.name.lower().startswith("mmproj"))
    if len(found) != 1:
        what = f"{len(found)} mmproj*.gguf files" if found else "no mmproj*.gguf file"
        raise QoqoptError(f"gguf:{text}: {what} beside it; name the one to use: gguf:{text}+MMPROJ.gguf")
    return found[0]
