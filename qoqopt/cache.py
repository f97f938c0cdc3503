"""Where qoqopt keeps things that are expensive to rebuild (tokenizer, trained mini model, GGUFs).

`QOQOPT_CACHE` overrides the location; otherwise it follows XDG (`~/.cache/qoqopt`). Nothing here
is required for correctness: deleting the folder only costs rebuild time.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import QoqoptError


def cache_root() -> Path:
    env = os.environ.get("QOQOPT_CACHE")
    if env:  # a quoted "~/..." reaches us unexpanded; relative, it would follow the working folder
        return Path(env).expanduser().absolute()
    # XDG: an empty or relative XDG_CACHE_HOME is invalid and ignored (relative, it put a 320 MB
    # trained model under whatever folder qoqopt ran from, the package source included)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "qoqopt"


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home (HPC nodes, containers), or a file where a folder goes
        raise QoqoptError(f"cannot make qoqopt's cache folder {path} ({exc.strerror or exc}): set QOQOPT_CACHE "
                          "to a folder you can write") from None
    return path
