"""argparse value types for counts and sizes: a bad number is refused by the parser, in one line,
before any model is loaded (a negative --threads or --max-side used to run on silently)."""

from __future__ import annotations

import argparse


def _number(kind, low: float, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive_int = _number(int, 1, "an integer >= 1")
count_or_all = _number(int, 0, "an integer >= 0 (0: all)")  # --threads
non_negative_float = _number(float, 0.0, "a number >= 0")
