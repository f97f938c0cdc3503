"""argparse value types for counts and sizes: a bad number is refused by the parser, in one line,
before any model is loaded (a negative --threads or --max-side used to run on silently)."""

from __future__ import annotations

import argparse
import math
import re


def _number(kind, low: float, what: str, high: float = math.inf):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (low <= value <= high and math.isfinite(value)):  # float("nan") compares False with anything
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive_int = _number(int, 1, "an integer >= 1")
count_or_all = _number(int, 0, "an integer >= 0 (0: the default)")  # --threads
index = _number(int, 0, "an integer >= 0")  # --frame
answer_limit = _number(int, 0, "an integer >= 0 (0: no answers, drift only)")  # --answer-tokens
# numpy's generators take no negative seed, torch.manual_seed none of 2**64 or more
seed = _number(int, 0, "a seed from 0 to 2**64 - 1", high=2**64 - 1)
non_negative_float = _number(float, 0.0, "a finite number >= 0")
damp_fraction = _number(float, 1e-6, "a number from 1e-6 to 1", high=1.0)  # --damp: 0 would never grow on retry

# decimal, as llama.cpp's converter and gguf-split read sizes, and as the Hub states its 50 GB limit
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def byte_size(text: str) -> int:
    """A size like 48G, 500M or 1.5G (decimal units; a plain number is bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 48G or 500M (decimal units: no Mi/Gi), got {text!r}")
    return int(float(m[1]) * _UNITS[m[2].upper()])


byte_size.__name__ = "a size such as 48G"


def label(text: str) -> str:
    """A machine label for report tables: its whitespace (tabs, newlines, no-break spaces) as single
    spaces, and without the characters Markdown tables and code spans are made of (a `|` split the
    label into columns and the rows after it) or control characters."""
    words = " ".join(text.split())
    if not words:
        raise argparse.ArgumentTypeError("the label is empty: give a name for the machine, or leave --label out")
    bad = next((c for c in words if c in "|`" or not c.isprintable()), None)
    if bad:
        raise argparse.ArgumentTypeError(f"expected text without | or ` or control characters, got {text!r} (it has {bad!r})")
    return words


label.__name__ = "a label"


class Once(argparse.Action):
    """An option given at most once: a second --image replaced the first without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} was given twice; it takes one value")
        setattr(namespace, self.dest, values)
