"""`--help` teaches: the top level and every subcommand show runnable examples of themselves; `export`
fills each format family's own defaults and refuses the other family's options."""

import pytest

from qoqopt.cli import build_parser


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


def _export_args(*flags):
    from qoqopt.commands.export import check_format_options

    args = build_parser().parse_args(["export", "m", "--out", "o", *flags])
    check_format_options(args)
    return args


@pytest.mark.parametrize("fmt,samples", [("gguf", 64), ("gptq", 128), ("awq", 128)])
def test_export_calibration_count_defaults_per_format(fmt, samples):
    args = _export_args("--format", fmt)
    assert args.samples == samples
    assert _export_args("--format", fmt, "--calib-items", "9").samples == 9  # the GGUF flag of earlier releases
    assert _export_args("--format", fmt, "--samples", "9").samples == 9


def test_export_fills_only_its_own_family():
    gguf = _export_args("--format", "gguf")
    assert (gguf.quant, gguf.imatrix, gguf.mmproj_type, gguf.bits, gguf.calib) == ("Q4_K_M", "clinical", "f16", None, None)
    gptq = _export_args("--format", "gptq")
    assert (gptq.bits, gptq.group_size, gptq.calib, gptq.quant, gptq.imatrix) == (4, 128, "clinical", None, None)


@pytest.mark.parametrize("fmt,flags", [
    ("gguf", ["--bits", "8"]), ("gguf", ["--group-size", "64"]), ("gguf", ["--asym"]), ("gguf", ["--calib", "x.jsonl"]),
    ("gguf", ["--quantize-vision"]), ("gptq", ["--imatrix", "none"]), ("awq", ["--mmproj-type", "q8_0"]),
    ("gptq", ["--name", "n"]), ("awq", ["--threads", "2"]), ("gptq", ["--imatrix-image-weight", "1"]),
])  # fmt: skip
def test_export_refuses_the_other_formats_options(fmt, flags):
    from qoqopt.errors import QoqoptError

    with pytest.raises(QoqoptError) as err:
        _export_args("--format", fmt, *flags)
    named, rest = str(err.value).split(" is a ", 1)
    assert flags[0] in named.split("/") and f" option, not for --format {fmt}; " in rest
