"""`--help` teaches: the top level and every subcommand show runnable examples of themselves."""

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
