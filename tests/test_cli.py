"""`--help` teaches: the top level and every subcommand show runnable examples of themselves; `export`
fills each format family's own defaults and refuses the other family's options."""

import re

import pytest

from qoqopt.cli import build_parser
from tests.conftest import refused


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


def test_top_level_help_lists_every_subcommand_with_an_example():
    parser, subs = _subcommands()
    text = parser.format_help()
    for name in subs:
        assert f"qoqopt {name} " in text, f"top-level --help has no example of `qoqopt {name}`"


@pytest.mark.parametrize("name", sorted(_subcommands()[1]))
def test_subcommand_help_has_examples(name):
    text = _subcommands()[1][name].format_help()
    assert "examples:" in text and f"qoqopt {name} " in text, text[-400:]


def _export_call(monkeypatch, *flags) -> dict:
    """What `qoqopt export` hands its exporter, defaults applied: GGUFOptions' fields for GGUF,
    export_hf_quant's bound arguments for GPTQ/AWQ (the exporters own the defaults)."""
    import dataclasses
    import functools
    import inspect

    from qoqopt.exports import gguf_export, hf_quant

    seen = {}
    def fake_gguf(src, out, options, **kw):
        seen.update(dataclasses.asdict(options), passed=set(kw))

    monkeypatch.setattr(gguf_export, "export_gguf", fake_gguf)
    real = inspect.signature(hf_quant.export_hf_quant)  # follows __wrapped__ past an earlier call's stand-in

    @functools.wraps(hf_quant.export_hf_quant)
    def fake_hf(*a, **kw):
        seen["passed"] = set(kw)  # the keywords as the command passes them, before defaults
        bound = real.bind(*a, **kw)
        bound.apply_defaults()
        seen.update(bound.arguments)

    monkeypatch.setattr(hf_quant, "export_hf_quant", fake_hf)
    args = build_parser().parse_args(["export", "m", "--out", "o", *flags])
    assert args.func(args) == 0
    return seen


@pytest.mark.parametrize("fmt,samples", [("gguf", 64), ("gptq", 128), ("awq", 128)])
def test_export_calibration_count_defaults_per_format(fmt, samples, monkeypatch):
    key = "calib_items" if fmt == "gguf" else "samples"
    assert _export_call(monkeypatch, "--format", fmt)[key] == samples
    assert _export_call(monkeypatch, "--format", fmt, "--calib-items", "9")[key] == 9  # the GGUF flag of earlier releases
    assert _export_call(monkeypatch, "--format", fmt, "--samples", "9")[key] == 9
    assert _export_call(monkeypatch, "--format", fmt, "--seed", "3")["seed"] == 3


def test_export_fills_only_its_own_family(monkeypatch):
    gguf = _export_call(monkeypatch, "--format", "gguf")
    assert (gguf["quants"], gguf["imatrix"], gguf["mmproj_type"]) == (["Q4_K_M"], "clinical", "f16")
    assert gguf["passed"] == {"revision", "force"}  # every other choice travels inside GGUFOptions
    gptq = _export_call(monkeypatch, "--format", "gptq", "--bits", "8")
    assert (gptq["bits"], gptq["group_size"], gptq["calib"]) == (8, 128, "clinical")
    # given options only, none of GGUF's; threads always (the command caps the default by a CPU quota)
    assert gptq["passed"] == {"order", "force", "seed", "revision", "bits", "threads"}
    # --threads serves both families: llama.cpp's quantizer, torch's calibration
    assert _export_call(monkeypatch, "--format", "gguf", "--threads", "3")["threads"] == 3
    assert _export_call(monkeypatch, "--format", "awq", "--threads", "3")["threads"] == 3
    # sizes are decimal, as llama.cpp's converter and the Hub's 50 GB limit count them
    assert gguf["split_max_bytes"] == 0
    for size, n in (("48G", 48 * 10**9), ("1.5g", 15 * 10**8), ("500MB", 5 * 10**8), ("2000000", 2 * 10**6)):
        assert _export_call(monkeypatch, "--format", "gguf", "--split-max-size", size)["split_max_bytes"] == n


@pytest.mark.parametrize("fmt,flags", [
    ("gguf", ["--bits", "8"]), ("gguf", ["--group-size", "64"]), ("gguf", ["--asym"]), ("gguf", ["--calib", "x.jsonl"]),
    ("gguf", ["--quantize-vision"]), ("gptq", ["--imatrix", "none"]), ("awq", ["--mmproj-type", "q8_0"]),
    ("gptq", ["--name", "n"]), ("awq", ["--quant", "Q8_0"]), ("gptq", ["--imatrix-image-weight", "1"]),
    ("awq", ["--split-max-size", "48G"]),
])  # fmt: skip
def test_export_refuses_the_other_formats_options(fmt, flags):
    from qoqopt.errors import QoqoptError

    from qoqopt.commands.export import refuse_foreign_options

    with pytest.raises(QoqoptError) as err:
        refuse_foreign_options(build_parser().parse_args(["export", "m", "--out", "o", "--format", fmt, *flags]))
    named, rest = str(err.value).split(" is a ", 1)
    assert flags[0] in named.split("/") and f" option, not for --format {fmt}; " in rest


ITEM = "ct-abd-pancreas.region_ct.eval-0"


def test_bad_numbers_and_usage_arerefused(capsys):
    """argparse's own refusals (bad numbers, unknown command, missing or clashing options) come as one
    `error:` line naming the command's --help, not argparse's usage block plus a line."""
    cases = {
        ("ask", "b", "--item", ITEM, "--threads", "-3"): "argument --threads: expected an integer >= 0 (0: the default), got -3",
        ("ask", "b", "--item", ITEM, "--max-tokens", "abc"): "argument --max-tokens: expected an integer >= 1, got 'abc'",
        ("bench", "m", "--variants", "bf16", "--calib-items", "0"): "argument --calib-items: expected an integer >= 1, got 0",
        ("export", "m", "--format", "gguf", "--imatrix-image-weight", "-1", "--out", "o"):
            "argument --imatrix-image-weight: expected a finite number >= 0, got -1",
        # nan passed `< 0` and weighted every image position nan: the imatrix was all NaN, so llama.cpp's
        # quantize fell back to plain weights under a card that said "clinical imatrix"
        ("export", "m", "--format", "gguf", "--imatrix-image-weight", "nan", "--out", "o"):
            "argument --imatrix-image-weight: expected a finite number >= 0, got nan",
        ("export", "m", "--format", "gguf", "--imatrix-image-weight", "inf", "--out", "o"):
            "argument --imatrix-image-weight: expected a finite number >= 0, got inf",
        ("export", "m", "--format", "gguf", "--threads", "-2", "--out", "o"): "argument --threads: expected an integer >= 0",
        ("export", "m", "--format", "gguf", "--split-max-size", "48GiB", "--out", "o"):
            "argument --split-max-size: expected a size such as 48G or 500M (decimal units: no Mi/Gi), got '48GiB'",
        ("data", "list", "--max-side", "0"): "argument --max-side: expected an integer >= 1, got 0",
        # numpy's generators take no negative seed: these were tracebacks from deep in the data code
        ("export", "m", "--format", "gptq", "--seed", "-1", "--out", "o"): "argument --seed: expected a seed from 0 to 2**64 - 1, got -1",
        ("bench", "m", "--variants", "bf16", "--seed", "-1"): "argument --seed: expected a seed from 0 to 2**64 - 1, got -1",
        ("data", "show", ITEM, "--seed", "-1", "--out", "x.png"): "argument --seed: expected a seed from 0 to 2**64 - 1, got -1",
        ("mini", "--out", "o", "--seed", "-1"): "argument --seed: expected a seed from 0 to 2**64 - 1, got -1",
        # torch.manual_seed takes none of 2**64 or more (checked below): a traceback from deep in training
        ("mini", "--out", "o", "--seed", str(2**64)): f"argument --seed: expected a seed from 0 to 2**64 - 1, got {2**64}",
        ("frobnicate",): "argument COMMAND: invalid choice: 'frobnicate'",
        ("ask", "b"): "one of the arguments --item --image is required",
    }  # fmt: skip
    for argv, message in cases.items():
        err = refused(list(argv), capsys)
        assert message in err and err.endswith("--help`)"), err
    import torch

    torch.manual_seed(2**64 - 1)
    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(2**64)


def test_a_leftover_argument_names_the_help_that_lists_the_commands_options(capsys):
    """An option the command does not take was refused under `qoqopt --help`, which lists commands,
    not options. The error names the deepest command the line chose; that parser's own help lists
    its options (and not the stray one), as argparse prints it."""
    from qoqopt.cli import build_parser

    cases = {
        ("info", "m", "--quant", "Q4_K_M"): "qoqopt info",
        ("data", "show", ITEM, "--split", "calib", "--out", "x.png"): "qoqopt data show",
        ("data", "list", "extra"): "qoqopt data list",
        ("--bogus",): "qoqopt",
    }  # fmt: skip
    def shown_help(prog: str) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*prog.split()[1:], "--help"])
        return capsys.readouterr().out.split("\n\n")[0]  # argparse's usage block: every option the parser takes

    for argv, prog in cases.items():
        stray = " ".join(a for a in argv if a in ("--quant", "Q4_K_M", "--split", "calib", "extra", "--bogus"))
        assert refused(list(argv), capsys) == f"error: unrecognized arguments: {stray} (see `{prog} --help`)"
        text = shown_help(prog)
        assert text.startswith(f"usage: {prog} ") and stray.split()[0] not in text
    assert "--split" in shown_help("qoqopt data list")  # the sibling that takes it: the help named is the right one


def test_a_file_given_for_a_folder_names_the_folder_to_give(tiny_dir, tmp_path, capsys):
    """`ask out/x.Q4_K_M.gguf` or `info ckpt/config.json` said "give the checkpoint's directory" of a
    GGUF build, which has none. The error names the folder that holds the file, and that folder is
    what the same command then takes."""
    from qoqopt.cli import main

    err = refused(["info", tiny_dir / "config.json"], capsys)
    assert err == f"error: {tiny_dir / 'config.json'} is a file; give the folder that holds it, {tiny_dir}"
    assert main(["info", str(tiny_dir)]) == 0
    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_text("{}")
    (build / "x.Q4_K_M.gguf").write_bytes(b"GGUF")
    err = refused(["ask", build / "x.Q4_K_M.gguf", "--item", ITEM], capsys)
    assert err.startswith(f"error: {build / 'x.Q4_K_M.gguf'} is a file; give the folder that holds it, {build} (")
    assert "ask --quant" in err
    (tmp_path / "loose.gguf").write_bytes(b"GGUF")
    err = refused(["ask", tmp_path / "loose.gguf", "--item", ITEM], capsys)
    assert err == f"error: {tmp_path / 'loose.gguf'} is a file; give a checkpoint's directory or a build folder written by `qoqopt export`"


def test_an_empty_value_is_refused_before_anything_reads_it(capsys):
    """An empty value is an unset shell variable: `ask --item ''` said "--image needs --question",
    `ask --image ''` "`.` is a directory", `info ''` began its message with the empty name."""
    for argv, where in ((["ask", "b", "--item", ""], "after --item"), (["ask", "b", "--image=", "--question", "q"], "in --image="),
                        (["info", ""], "after info"), (["", "x"], "")):  # fmt: skip
        assert refused(argv, capsys) == f"error: an empty value{' ' * bool(where)}{where} (an unset shell variable?)"


def test_unusable_paths_are_refused_before_any_work(tiny_dir, tmp_path, capsys):
    """An output that cannot be made, an image name Pillow cannot write, an existing image, a build
    whose listed file is missing or cut short, --question beside --item, a GGUF --name that is a path,
    an --imatrix that is not one: each one line, before any long work (export used to refuse the
    last two only after converting and calibrating)."""
    import json

    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "seen.png").write_bytes(b"")
    build = tmp_path / "build"
    build.mkdir()
    (build / "m.Q8_0.gguf").write_bytes(bytes(50))
    files = [{"path": "m.Q8_0.gguf", "kind": "text", "quant": "Q8_0", "bytes": 100},
             {"path": "mmproj-m-f16.gguf", "kind": "mmproj", "bytes": 10}]  # fmt: skip
    (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files}))
    bad_set = tmp_path / "scans.JSONL"  # any case of .jsonl is a set, not an imatrix file
    bad_set.write_text('{"image": "afile", "question": "q", "answer": "a", "domain": "ct"}\n{"image": \n')
    cases = {
        ("mini", "--out", f"{afile}/sub"): f"cannot create {afile}/sub: {afile} is a file",
        ("bench", str(tiny_dir), "--variants", "bf16", "--out", str(afile)): f"output {afile} exists and is not a directory",
        ("data", "show", ITEM, "--out", str(tmp_path / "z.xyz")): "give an image file name ending in .png",
        ("data", "show", ITEM, "--out", str(tmp_path / "seen.png")): "seen.png already exists (use --force to replace it)",
        ("ask", str(build), "--item", ITEM, "--question", "Which?"): "--question goes with --image",
        ("ask", str(build), "--item", ITEM, "--frame", "2"): "--frame goes with --image",
        ("ask", str(build), "--item", ITEM, "--revision", "v1"): "--revision picks a Hub revision; ",
        ("info", str(tiny_dir), "--revision", "v1"): f"--revision picks a Hub revision; {tiny_dir} is a local directory",
        ("ask", str(build), "--item", ITEM): "m.Q8_0.gguf is 50 bytes but manifest.json records 100: an incomplete download",
        ("export", str(tiny_dir), "--format", "gguf", "--name", "a/b", "--out", str(tmp_path / "o")):
            "--name 'a/b': give a plain file-name stem",
        ("export", str(tiny_dir), "--format", "gguf", "--imatrix", str(afile), "--out", str(tmp_path / "o")):
            "afile is not a llama.cpp imatrix file",
        ("export", str(tiny_dir), "--format", "gguf", "--imatrix", str(build), "--out", str(tmp_path / "o")):
            "build: a directory, not an imatrix file (--imatrix takes clinical, none, a .jsonl set",
        ("export", str(tiny_dir), "--format", "gguf", "--imatrix", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")):
            "none.jsonl: no such calibration file",
        ("export", str(tiny_dir), "--format", "gguf", "--imatrix", str(bad_set), "--out", str(tmp_path / "o")):
            "scans.JSONL:1: " + str(afile) + ": not an image Pillow can read",  # the set whole, before the intermediate
    }  # fmt: skip
    for argv, message in cases.items():
        assert message in refused(list(argv), capsys)
    (build / "m.Q8_0.gguf").write_bytes(bytes(100))
    assert "lists mmproj-m-f16.gguf, which is missing" in refused(["ask", str(build), "--item", ITEM], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "build", "scans.JSONL", "seen.png"]


def test_unwritable_output_folder_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    """An output folder that cannot be written gives one `error:` line naming the path given, from
    every command that writes (a read-only mount had given four tracebacks and, from export, the name
    of a temporary folder). Root ignores file modes, so the folder fails as a read-only mount does:
    making anything new under it raises EROFS."""
    import errno
    import json
    import tempfile
    from pathlib import Path

    from tests.test_report import _run

    ro = tmp_path / "ro"
    ro.mkdir()

    def guard(path):
        path = Path(path)
        if not path.exists() and path.resolve().is_relative_to(ro.resolve()):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    mkdir, mkstemp, mkdtemp = Path.mkdir, tempfile.mkstemp, tempfile.mkdtemp
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (guard(self), mkdir(self, *a, **k))[1])
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, dir, **k: (guard(Path(dir) / ".new"), mkstemp(*a, dir=dir, **k))[1])
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, dir, **k: (guard(Path(dir) / ".new"), mkdtemp(*a, dir=dir, **k))[1])
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_run("cpu", 1.0)))
    cases = {
        ("data", "show", ITEM, "--out", ro / "ct.png"): ro / "ct.png",
        ("report", run, "--out", ro / "rep"): ro / "rep",
        ("mini", "--out", ro / "m"): ro / "m",
        ("bench", tiny_dir, "--variants", "bf16", "--items", "1", "--no-speed", "--out", ro / "res"): ro / "res",
        ("export", tiny_dir, "--format", "gguf", "--quant", "F16", "--imatrix", "none", "--out", ro / "g"): ro / "g",
        ("export", tiny_dir, "--format", "awq", "--samples", "2", "--out", ro / "a"): ro / "a",
    }  # fmt: skip
    for argv, given in cases.items():
        assert refused(list(argv), capsys) == f"error: cannot write {given}: Read-only file system", argv
    assert list(ro.iterdir()) == []
    # before the long work: GPTQ/AWQ loaded and calibrated the model first
    monkeypatch.setattr("qoqopt.calibration.calibration_items", lambda *a: pytest.fail("calibrated before the output was made"))
    refused(["export", tiny_dir, "--format", "gptq", "--samples", "2", "--out", ro / "q"], capsys)


def test_a_closed_pipe_ends_quietly():
    """`qoqopt data list | head` : the reader goes away, and qoqopt stops with SIGPIPE's status and
    no traceback (Python raises BrokenPipeError where a C tool would die of the signal)."""
    import os
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a shell's default: stdout buffered
    proc = subprocess.Popen([sys.executable, "-m", "qoqopt", "data", "list", "--split", "eval"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    proc.stdout.close()  # before it writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE and err == "", err


def test_an_os_error_a_user_can_fix_is_one_line(monkeypatch, capsys):
    """Permission and disk errors that no write path has turned into a message of its own still end
    in one line (the file and the reason), exit status 2; any other OSError is a bug, shown in full."""
    import errno

    import qoqopt.commands.info as info

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/qoq/config.json")

    monkeypatch.setattr(info, "run", denied)
    assert refused(["info", "x"], capsys) == "error: /data/qoq/config.json: Permission denied"

    def bug(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(info, "run", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):
        refused(["info", "x"], capsys)


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first moments, while the command modules are imported, ends as any other
    Ctrl-C does (it printed a traceback from inside the imports)."""
    import qoqopt.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info", "x"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_source_that_cannot_make_a_chat_is_refused_up_front(tiny_dir, tmp_path, capsys):
    """A checkpoint copied without tokenizer.json or chat_template.json, or a GPTQ build given as the
    source, is one line from export, ask and bench before any model is loaded (they were
    transformers tracebacks after loading and calibrating)."""
    import json

    def copy_without(name: str, edit=None, folder_name=None):
        folder = tmp_path / (folder_name or f"no-{name}")
        folder.mkdir()
        for f in tiny_dir.iterdir():
            if f.name != name:
                (folder / f.name).symlink_to(f)
        if edit:
            (folder / "config.json").unlink()
            (folder / "config.json").write_text(json.dumps(edit(json.loads((tiny_dir / "config.json").read_text()))))
        return folder

    no_vocab, no_template = copy_without("tokenizer.json"), copy_without("chat_template.json")
    # the tokenizer's own template (tokenizer_config.json) is the last place one is looked for
    tok_cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    (no_template / "tokenizer_config.json").unlink()
    (no_template / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tok_cfg.items() if k != "chat_template"}))
    gptq = copy_without("none", lambda c: c | {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    out = tmp_path / "out"
    for folder, message in ((no_vocab, "has no tokenizer vocabulary (tokenizer.json): copy the tokenizer files"),
                            (no_template, "has no chat template (chat_template.json, chat_template.jinja or in "
                                          "tokenizer_config.json): copy it")):  # fmt: skip
        for argv in (["export", folder, "--format", "gptq", "--samples", "1", "--out", out],
                     ["export", folder, "--format", "gguf", "--quant", "Q4_K_M", "--out", out],
                     ["ask", folder, "--item", ITEM],
                     ["bench", folder, "--variants", "bf16", "--items", "1", "--out", out]):  # fmt: skip
            assert refused(argv, capsys) == f"error: {folder} {message} from the original checkpoint", argv
    # a template saved as chat_template.jinja (current transformers) is one too, with or without torchvision
    from qoqopt.loader import checked_processor

    template = json.loads((tiny_dir / "chat_template.json").read_text())["chat_template"]
    (no_template / "chat_template.jinja").write_text(template)
    assert checked_processor(no_template, "x").chat_template == template
    # and a template kept only in tokenizer_config.json (older checkpoints), which GGUF export embeds too
    only_tok_cfg = copy_without("chat_template.json", folder_name="template-in-tokenizer-config")
    assert checked_processor(only_tok_cfg, "x").chat_template == tok_cfg["chat_template"] == template
    from qoqopt.loader import find_chat_template

    assert find_chat_template(only_tok_cfg) == find_chat_template(tiny_dir) == template
    (only_tok_cfg / "chat_template.json").write_text('{"chat_template": ""}')  # an empty one is none
    assert checked_processor(only_tok_cfg, "x").chat_template == find_chat_template(only_tok_cfg) == template
    # named templates without a "default": the first, as the GGUF export embeds it
    (only_tok_cfg / "tokenizer_config.json").unlink()
    named = tok_cfg | {"chat_template": [{"name": "qoq", "template": template}, {"name": "other", "template": "x"}]}
    (only_tok_cfg / "tokenizer_config.json").write_text(json.dumps(named))
    assert checked_processor(only_tok_cfg, "x").chat_template == template
    from qoqopt.exports.gguf_vocab import read_vocab

    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert read_vocab(only_tok_cfg, cfg, cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]).chat_template == template
    (no_template / "chat_template.jinja").unlink()
    assert find_chat_template(no_template) is None
    for fmt in ("awq", "gguf"):
        err = refused(["export", gptq, "--format", fmt, "--out", out], capsys)
        assert err == (f"error: {gptq} is already a GPTQ build (its config.json has a quantization_config): "
                       "export from the original checkpoint")  # fmt: skip
    assert not out.exists()


TWO_IMAGES = "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "{{ messages[0].content[1].text }}"
BAD_TEMPLATES = {  # template -> the refusal's end; jinja2 and transformers name the first two errors
    "{{ raise_exception('no images here') }}": "cannot render a chat of one image and a question: TemplateError: no images here",
    "{% for m in messages %}{{ m.role ": "cannot render a chat of one image and a question: TemplateSyntaxError: "
                                        "unexpected end of template, expected 'end of print statement'.",
    "{% for m in messages %}{{ m.content[1].text }}{% endfor %}": "writes <|image_pad|> 0 times for a chat of one "
        "image and a question (Qwen2.5-VL's template writes it once): copy the chat template from the original checkpoint",
    "<|vision_start|><|image_pad|><|vision_end|>{{ messages[0].role }}": "leaves the question out of a chat of one "
        "image and a question: copy the chat template from the original checkpoint",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}": "did not render a chat of "
        "one image and a question within 0.5 s (a loop that does not end?)",
    TWO_IMAGES: "writes <|image_pad|> 2 times for a chat of one image and a question (Qwen2.5-VL's template writes "
        "it once): copy the chat template from the original checkpoint",
    "{{ raise_exception('no images here\\nsecond line') }}": "cannot render a chat of one image and a question: "
        "TemplateError: no images here",
    "{{ messages[0].role }}{% if add_generation_prompt %}{{ raise_exception('no prompt') }}{% endif %}": "cannot "
        "render a chat of one image and a question: TemplateError: no prompt",
}  # fmt: skip


@pytest.mark.parametrize("name", ["tokenizer_config.json", "preprocessor_config.json"])
def test_a_processor_file_that_is_no_json_object_is_one_line(tiny_dir, tmp_path, capsys, name):
    """transformers and the GGUF vocabulary read these files' keys with .get: a list in one was an
    AttributeError traceback from export, ask and bench."""
    folder = tmp_path / "m"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        if f.name != name:
            (folder / f.name).symlink_to(f)
    (folder / name).write_text("[1]")
    out = tmp_path / "out"
    for argv in (["export", folder, "--format", "gguf", "--quant", "Q8_0", "--out", out],
                 ["export", folder, "--format", "gptq", "--samples", "1", "--out", out],
                 ["ask", folder, "--item", ITEM], ["bench", folder, "--variants", "bf16", "--out", out]):  # fmt: skip
        assert refused(argv, capsys) == f"error: {folder / name} is not a JSON object (it holds a list)", argv
    assert not out.exists()


def test_a_chat_template_that_cannot_render_the_chat_is_refused_up_front(tiny_dir, tmp_path, capsys, monkeypatch):
    """The checkpoint's chat template is its own code: one that fails, drops the image or the question,
    or loops on (nested range(100000): ask hung) is one line from export, ask and bench before any model
    loads. The timer is the main thread's SIGALRM, left as it was found."""
    import json
    import signal

    from qoqopt import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    alarm_handler = signal.getsignal(signal.SIGALRM)
    out = tmp_path / "out"
    for n, (template, message) in enumerate(BAD_TEMPLATES.items()):
        folder = tmp_path / f"template-{n}"
        folder.mkdir()
        for f in tiny_dir.iterdir():
            if f.name != "chat_template.json":
                (folder / f.name).symlink_to(f)
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
        for argv in (["export", folder, "--format", "gguf", "--quant", "Q4_K_M", "--out", out],
                     ["ask", folder, "--item", ITEM],
                     ["bench", folder, "--variants", "bf16", "--items", "1", "--out", out]):  # fmt: skip
            assert refused(argv, capsys) == f"error: {folder}'s chat template {message}", (template, argv)
            assert signal.getsignal(signal.SIGALRM) is alarm_handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert not out.exists()
    # the mini's own template (Qwen2.5-VL's) renders the probe as transformers renders any chat of ours
    from qoqopt.loader import checked_processor

    processor = checked_processor(tiny_dir, "x")
    probe = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": chat_template.PROBE_QUESTION}]}],
        add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert probe.endswith(f"<|vision_start|><|image_pad|><|vision_end|>{chat_template.PROBE_QUESTION}<|im_end|>\n"
                          "<|im_start|>assistant\n")  # fmt: skip
    # transformers' own processor refuses the text a template with two placeholders makes for one image
    from PIL import Image

    with pytest.raises(ValueError, match=re.escape("Found total 2 <|image_pad|> tokens and 1 images")):
        processor(text=[TWO_IMAGES.replace("{{ messages[0].content[1].text }}", chat_template.PROBE_QUESTION)],
                  images=[Image.new("RGB", (28, 28))])  # fmt: skip


def test_windows_is_refused_in_one_line(monkeypatch, capsys):
    """Native Windows lacks os.pread, POSIX signals and renaming a folder over another, which exports,
    bench and --force need (helper-74): one line pointing to WSL2, not a traceback midway."""
    import os

    from qoqopt.cli import main

    monkeypatch.setattr(os, "name", "nt")
    assert main(["info", "anything"]) == 2
    assert capsys.readouterr().err == "error: qoqopt runs on Linux and macOS; on Windows, run it under WSL2\n"


def test_export_threads_default_to_what_a_containers_cpu_quota_runs(monkeypatch):
    """Neither llama.cpp's quantizer (one thread per hardware thread) nor torch (one per physical
    core) reads a container's CPU quota: on a 64-CPU host with `--cpus 2` every export ran 32-64
    threads throttled to 2 CPUs' time. The default is capped by the quota, for both families;
    --threads is still taken as given."""
    from qoqopt.bench import machine

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the test run sets it per worker
    monkeypatch.setattr(machine, "_usable_cpus", lambda: range(64))
    monkeypatch.setattr(machine, "cpu_quota", lambda: 2)
    for fmt in ("gguf", "gptq", "awq"):
        assert _export_call(monkeypatch, "--format", fmt)["threads"] == 2, fmt
        assert _export_call(monkeypatch, "--format", fmt, "--threads", "0")["threads"] == 2, fmt
        assert _export_call(monkeypatch, "--format", fmt, "--threads", "5")["threads"] == 5, fmt
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch takes it, llama.cpp does not
    assert [_export_call(monkeypatch, "--format", f)["threads"] for f in ("gguf", "awq")] == [2, 1]
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(machine, "cpu_quota", lambda: None)  # no quota: llama.cpp's own count, every usable CPU
    assert _export_call(monkeypatch, "--format", "gguf")["threads"] == 64
