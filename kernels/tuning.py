"""Per-GPU launch configs for the W4A16 decode kernels: tables measured by ``benchmarks/tune_w4a16.py``.

The decode defaults (``w4a16._config``) are rules swept on one H200. Which tile width, pipeline
depth and K split stream 4-bit weights fastest depends on the GPU: its SM count, L2, shared memory
and clock. So, as vLLM ships per-device configs for its fused-MoE Triton kernel, a table per GPU
model can replace the rules where it was measured. A table is a JSON file named after the device
(:func:`file_name`: "NVIDIA H200" -> ``NVIDIA_H200.json``); each entry names one layer shape,
words layout, dtype and row count, and the launch config that was fastest there, with its time and
the default's.

Tables are looked up, first match wins, in:
  1. ``$QOQOPT_KERNEL_TUNING``: a folder of tables, or ``off`` to use the rules alone;
  2. ``<qoqopt cache>/kernels/w4a16/`` (what the tuner writes by default);
  3. ``kernels/tuned/``, shipped with qoqopt.
Only decode sizes (M <= 16) are tuned: from 128 rows a GPU runs cuBLAS after a dequantization.
An entry tuned at M rows serves every row count up to M (the tiles are 16 rows), down to the next
tuned M; one tuned at one row serves one row only (it may name the one-row GEMV).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qoqopt.cache import cache_root
from qoqopt.errors import QoqoptError
from qoqopt.fileio import atomic_write_text

SCHEMA = "qoqopt.w4a16_tuning/1"
SHIPPED = Path(__file__).resolve().parent / "tuned"
# what a tuned config may set, and the type of each value
CONFIG_KEYS = {"KERNEL": str, "BLOCK_M": int, "BLOCK_N": int, "BLOCK_K": int, "num_warps": int, "num_stages": int,
               "SPLIT_K": int, "REDUCE_UNROLL": int, "FRAGMENTS": bool}
DECODE_KERNELS = ("gemv", "mma", "frag")
WORDS = ("gptq", "fragments")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Key:
    """One tuned launch: the layer (words layout, bits, group size, K, N), the dtype and the rows."""

    words: str
    bits: int
    group_size: int
    k: int
    n: int
    dtype: str  # "bfloat16", "float16", "float32"
    m: int

    def layer(self) -> tuple:
        return (self.words, self.bits, self.group_size, self.k, self.n, self.dtype)


@dataclass(frozen=True)
class Tuned:
    """A tuned config and the table it came from (hashable: launches are cached on it)."""

    items: tuple  # the config's (name, value) pairs, sorted
    source: Path

    @property
    def config(self) -> dict:
        return dict(self.items)


def file_name(device_name: str) -> str:
    """The table's file name for a device: its name with every run of other characters as ``_``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def user_dir() -> Path:
    """Where the tuner writes by default (not created here)."""
    return cache_root() / "kernels" / "w4a16"


def search_dirs() -> list[Path]:
    """The folders a table is looked up in, first match first; none when tuning is ``off``."""
    env = os.environ.get("QOQOPT_KERNEL_TUNING", "")
    if env.lower() == "off":
        return []
    if env and not Path(env).is_dir():  # a typo must not quietly fall back to the rules
        raise QoqoptError(f"QOQOPT_KERNEL_TUNING={env}: not a folder (a folder of tuning tables, or off)")
    return ([Path(env)] if env else []) + [user_dir(), SHIPPED]


def read_table(path: Path) -> dict[Key, dict]:
    """A table's entries, checked: every problem is a one-line error that names the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QoqoptError(f"W4A16 tuning table {path}: cannot read it ({err})") from err
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("entries"), list):
        raise QoqoptError(f"W4A16 tuning table {path}: not a {SCHEMA} table (schema and entries)")
    table = {}
    for i, entry in enumerate(doc["entries"]):
        key, config = _checked(path, i, entry)
        if key in table:
            raise QoqoptError(f"W4A16 tuning table {path}: entry {i} repeats {_describe(key)}")
        table[key] = config
    return table


def _checked(path: Path, i: int, entry) -> tuple[Key, dict]:
    """Entry ``i`` of the table at ``path`` as ``(key, config)``, or a one-line error naming both."""
    try:
        return _entry(entry)
    except (TypeError, ValueError, KeyError) as err:
        raise QoqoptError(f"W4A16 tuning table {path}: entry {i}: {err}") from err


def _entry(entry) -> tuple[Key, dict]:
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ValueError("an entry is an object with a config object")
    missing = [name for name in Key.__dataclass_fields__ if name not in entry]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    fields = {name: entry[name] for name in Key.__dataclass_fields__}
    for name, value in fields.items():
        if name in ("words", "dtype"):
            if not isinstance(value, str):
                raise ValueError(f"{name} {value!r} is not a name")
        elif type(value) is not int or value < 1:
            raise ValueError(f"{name} {value!r} is not a positive integer")
    key = Key(**fields)
    from .w4a16 import DECODE_MAX_M  # (w4a16 imports this module)

    if key.words not in WORDS or key.dtype not in DTYPES or key.m > DECODE_MAX_M:
        raise ValueError(f"words must be one of {WORDS}, dtype one of {DTYPES}, m at most {DECODE_MAX_M}")
    config = entry["config"]
    for name, value in config.items():
        wanted = CONFIG_KEYS.get(name)
        if wanted is None or type(value) is not wanted or (wanted is int and value < 1):
            raise ValueError(f"config {name}={value!r}: the keys are {', '.join(CONFIG_KEYS)} (positive integers, "
                             "KERNEL a name, FRAGMENTS true or false)")
    kernel = config.get("KERNEL")
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"config KERNEL={kernel!r} is not a decode kernel {DECODE_KERNELS}")
    if (kernel == "frag" or config.get("FRAGMENTS", False)) != (key.words == "fragments"):
        raise ValueError(f"config {config} does not read the {key.words} words it is tuned for")
    if kernel == "gemv" and key.m != 1:
        raise ValueError("the one-row GEMV is tuned at m 1 only")
    return key, dict(config)


def _describe(key: Key) -> str:
    return f"{key.words} words {key.k}->{key.n} ({key.bits}-bit, group {key.group_size}) {key.dtype} M={key.m}"


@functools.lru_cache(maxsize=8)
def tables(device_name: str, dirs: tuple[Path, ...]) -> tuple[tuple[Path, dict[Key, dict]], ...]:
    """``(path, entries)`` of each table for ``device_name`` in ``dirs``, first first (read once a
    process; :func:`forget` after writing one)."""
    found = [d / file_name(device_name) for d in dirs]
    return tuple((path, read_table(path)) for path in found if path.is_file())


def forget() -> None:
    """Drop the tables read so far (the tuner, after writing one; tests)."""
    tables.cache_clear()


def lookup(device_name: str, *, words: str, bits: int, group_size: int, k: int, n: int, m: int,
           dtype: torch.dtype) -> Tuned | None:
    """The tuned config for ``m`` rows of this layer on ``device_name``, or None (the rules decide)."""
    layer = (words, bits, group_size, k, n, dtype_name(dtype))
    for path, table in tables(device_name, tuple(search_dirs())):
        # the smallest tuned M that covers m; one tuned at one row serves one row only
        tuned = [key for key in table if key.layer() == layer and key.m >= m and (key.m > 1 or m == 1)]
        if tuned:
            return Tuned(tuple(sorted(table[min(tuned, key=lambda key: key.m)].items())), path)
    return None


def tables_for(device: torch.device) -> list[Path]:
    """The tables a CUDA ``device``'s decode launches read, first first (read and checked now)."""
    if device.type != "cuda":
        return []
    return [path for path, _ in tables(device_name(device), tuple(search_dirs()))]


def device_name(device: torch.device) -> str:
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def write_table(path: Path, device: str, entries: list[dict], meta: dict, force: bool = False) -> None:
    """Write a table atomically (checked as :func:`read_table` checks it); an existing file is kept
    unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise QoqoptError(f"{path} exists (--force replaces it)")
    text = json.dumps({"schema": SCHEMA, "device": device, **meta, "entries": entries}, indent=2) + "\n"
    for i, entry in enumerate(entries):
        _checked(path, i, entry)
    atomic_write_text(path, text)
    forget()


def entry(key: Key, config: dict, **measured) -> dict:
    """A table entry: the key's fields, the config, and what was measured (times in us, say)."""
    return {**asdict(key), "config": dict(config), **measured}
