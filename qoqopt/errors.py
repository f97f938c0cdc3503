"""The one exception type users see: its message is printed as a single line by the CLI."""

import re

# C0 (newline and tab too), DEL and C1: what a terminal acts on rather than shows
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class QoqoptError(Exception):
    """A user-facing failure (bad input, missing file, unsupported model).

    The CLI prints ``error: <message>`` on one line and exits with status 2; anything else
    escaping is a bug and keeps its traceback.
    """


def printable(text: str) -> str:
    """``text`` with each control character as its visible escape, as repr writes it (ESC as \\x1b):
    a string from a file (a GGUF's general.architecture, a manifest's note or file name) printed raw
    could clear or recolour the terminal, or start a line of its own."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
