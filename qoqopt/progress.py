"""Progress bars, on a terminal only."""

from __future__ import annotations


def bar(iterable=None, *, show: bool = True, **kwargs):
    """A tqdm bar on stderr, drawn only when stderr is a terminal. Sent to a file (a SLURM or CI log,
    `2> export.log`) every redraw would be one more \\r-joined line there; the log lines that each
    step prints say what was done instead."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None if show else True, **kwargs)  # None: tqdm's "off unless a TTY"
