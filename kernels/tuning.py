"""Per-GPU launch configs for the W4A16 decode kernels: tables measured by ``benchmarks/tune_w4a16.py``.

The decode defaults (``w4a16._config``) are rules swept on one H200. Which tile width, pipeline
depth and K split stream 4-bit weights fastest depends on the GPU: its SM count, L2, shared memory
and clock. So, as vLLM ships per-device configs for its fused-MoE Triton kernel, a table per GPU
model can replace the rules where it was measured. A table is a JSON file named after the device
(:func:`file_name`: "NVIDIA H200" -> ``NVIDIA_H200.json``); each entry names one layer shape,
words layout, dtype and row count, and either the launch config that was fastest there (with its
time and the rules') or ``null``: the rules won.

Tables are looked up in:
  1. ``$QOQOPT_KERNEL_TUNING``: a folder of tables, or ``off`` to use the rules alone;
  2. ``<qoqopt cache>/kernels/w4a16/`` (what the tuner writes by default);
  3. ``kernels/tuned/``, shipped with qoqopt.
The first table that has a layer (its words, bits, group size, K, N and dtype) decides it at every
decode row count; tables are not mixed within a layer. Only decode sizes (M <= 16) are tuned: from
128 rows a GPU runs cuBLAS after a dequantization. One row is served by an entry tuned at one row
only (the rules run one-row launches on their own GEMV); 2 to 16 rows by the entry tuned at the
fewest rows, above one, that covers them (the tiles are 16 rows). Where the deciding table has no
such entry, the rules decide.
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
               "SPLIT_K": int, "REDUCE_UNROLL": int, "FRAGMENTS": bool, "DOT_K": int}
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
    return ([Path(env)] if env else []) + [user_dir(), SHIPPED]


def read_table(path: Path) -> dict[Key, dict | None]:
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


def _checked(path: Path, i: int, entry) -> tuple[Key, dict | None]:
    """Entry ``i`` of the table at ``path`` as ``(key, config)``, or a one-line error naming both."""
    try:
        return _entry(entry)
    except (TypeError, ValueError, KeyError) as err:
        raise QoqoptError(f"W4A16 tuning table {path}: entry {i}: {err}") from err


def _entry(entry) -> tuple[Key, dict | None]:
    """``(key, config)`` of a table entry, checked; config None: the rules won there."""
    if not isinstance(entry, dict):
        raise ValueError("an entry is an object")
    missing = [name for name in (*Key.__dataclass_fields__, "config") if name not in entry]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    key = _key({name: entry[name] for name in Key.__dataclass_fields__})
    config = entry["config"]
    if config is not None and not isinstance(config, dict):
        raise ValueError("config is an object, or null (the rules)")
    return key, None if config is None else _config(key, config)


def _key(fields: dict) -> Key:
    from .w4a16 import DECODE_MAX_M  # (w4a16 imports this module)

    for name, value in fields.items():
        if name in ("words", "dtype"):
            if not isinstance(value, str):
                raise ValueError(f"{name} {value!r} is not a name")
        elif type(value) is not int or value < 1:
            raise ValueError(f"{name} {value!r} is not a positive integer")
    key = Key(**fields)
    if key.words not in WORDS or key.dtype not in DTYPES or key.m > DECODE_MAX_M:
        raise ValueError(f"words must be one of {WORDS}, dtype one of {DTYPES}, m at most {DECODE_MAX_M}")
    return key


# what the launch plan takes from a config unchecked (a K tile over two groups would compute wrong
# results, silently): powers of two in range; the decode tiles are 16 rows
TILE_RANGES = {"BLOCK_M": (16, 16), "BLOCK_N": (16, 1024), "BLOCK_K": (16, 1024), "num_warps": (1, 16),
               "DOT_K": (64, 128)}


def _config(key: Key, config: dict) -> dict:
    for name, value in config.items():
        wanted = CONFIG_KEYS.get(name)
        if wanted is None:
            raise ValueError(f"config {name}: not one of {', '.join(CONFIG_KEYS)}")
        if type(value) is not wanted or (wanted is int and value < 1):
            raise ValueError(f"config {name}={value!r}: not a {'positive integer' if wanted is int else wanted.__name__}")
        low, high = TILE_RANGES.get(name, (1, value))
        if wanted is int and (not low <= value <= high or (name in TILE_RANGES and value & (value - 1))):
            raise ValueError(f"config {name}={value}: a power of two from {low} to {high}")
    if key.group_size % config.get("BLOCK_K", 16):  # one row of scales and zeros a K step
        raise ValueError(f"config BLOCK_K={config['BLOCK_K']} does not divide group_size {key.group_size}")
    kernel = config.get("KERNEL")
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"config KERNEL={kernel!r} is not a decode kernel {DECODE_KERNELS}")
    if (kernel == "frag" or config.get("FRAGMENTS", False)) != (key.words == "fragments"):
        raise ValueError(f"config {config} does not read the {key.words} words it is tuned for")
    if "DOT_K" in config and kernel != "frag":
        raise ValueError(f"config DOT_K: the fragment decode kernel's (KERNEL 'frag'), not {kernel!r}'s")
    if kernel == "gemv" and key.m != 1:
        raise ValueError("the one-row GEMV is tuned at m 1 only")
    return dict(config)


def _describe(key: Key) -> str:
    return f"{key.words} words {key.k}->{key.n} ({key.bits}-bit, group {key.group_size}) {key.dtype} M={key.m}"


@functools.lru_cache(maxsize=8)
def tables(device_name: str, dirs: tuple[Path, ...]) -> tuple[tuple[Path, dict[Key, dict | None]], ...]:
    """``(path, entries)`` of each table for ``device_name`` in ``dirs``, first first (read once a
    process; :func:`forget` after writing one)."""
    env = os.environ.get("QOQOPT_KERNEL_TUNING", "")
    if env and dirs and dirs[0] == Path(env) and not dirs[0].is_dir():  # a typo must not quietly mean the rules
        raise QoqoptError(f"QOQOPT_KERNEL_TUNING={env}: not a folder (a folder of tuning tables, or off)")
    found = [d / file_name(device_name) for d in dirs]
    return tuple((path, read_table(path)) for path in found if path.is_file())


def forget() -> None:
    """Drop the tables read so far (the tuner after writing one, ``apply``, tests)."""
    tables.cache_clear()
    _lookup.cache_clear()


def lookup(device_name: str, *, words: str, bits: int, group_size: int, k: int, n: int, m: int,
           dtype: torch.dtype) -> Tuned | None:
    """The tuned config for ``m`` rows of this layer on ``device_name``, or None (the rules decide)."""
    return _lookup(device_name, tuple(search_dirs()), (words, bits, group_size, k, n, dtype_name(dtype)), m)


@functools.lru_cache(maxsize=1024)
def _lookup(device_name: str, dirs: tuple[Path, ...], layer: tuple, m: int) -> Tuned | None:
    # (memoised: w4a16_matmul without a config looks up at every call)
    for path, table in tables(device_name, dirs):
        tuned = [key for key in table if key.layer() == layer]
        if not tuned:
            continue  # the next table may have the layer; this one decides it if it has any entry
        covering = [key for key in tuned if key.m == m] if m == 1 else [key for key in tuned if key.m >= m > 1]
        if not covering:
            return None
        config = table[min(covering, key=lambda key: key.m)]
        return Tuned(tuple(sorted(config.items())), path) if config is not None else None
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
    keys = [_checked(path, i, entry)[0] for i, entry in enumerate(entries)]
    if len(set(keys)) < len(keys):
        twice = next(key for key in keys if keys.count(key) > 1)
        raise QoqoptError(f"W4A16 tuning table {path}: {_describe(twice)} given twice")
    atomic_write_text(path, text)
    forget()


def entry(key: Key, config: dict | None, **measured) -> dict:
    """A table entry: the key's fields, the config (None: the rules), and what was measured (times in
    us, say)."""
    return {**asdict(key), "config": dict(config) if config is not None else None, **measured}
