"""Compile qoqopt's Triton kernels for an NVIDIA target without a GPU, and read the machine code.

Triton's NVIDIA backend compiles to a cubin offline (ptxas and cuobjdump ship inside the triton
wheel), so register use, spills and the instruction mix of a kernel's main loop can be checked on
any machine. The instruction count of the hot loop is a static proxy for speed when no GPU is at
hand: it says what the SM must issue per weight or per tile, not how long that takes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

CUDA = torch.device("cuda")
HOPPER_SHARED_MEM = 232448  # bytes per block, opted in: H100 and H200
_INSTR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
_BACK_BRANCH = re.compile(r"BRA (0x[0-9a-f]+)")


class NoToolchain(RuntimeError):
    """This triton cannot compile for CUDA offline (no ptxas / backend)."""


@contextlib.contextmanager
def toolchain_needed():
    """Turn a compile's failure to find ptxas or the CUDA backend into :class:`NoToolchain`."""
    try:
        yield
    except (ImportError, RuntimeError) as err:
        if "ptxas" in str(err) or "backend" in str(err).lower():
            raise NoToolchain(str(err)) from err
        raise


def compile_kernel(kernel, signature: dict, constexprs: dict, options: dict, arch: int = 90,
                   ints: dict | None = None):
    """``triton.compile`` of a qoqopt :class:`Kernel` for ``sm_{arch}``, with the launch's alignment hints.

    ``ints``: launch values of int arguments other than strides; as at run time, those that are
    multiples of 16 are specialised as such unless the kernel says ``do_not_specialize``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel[CUDA].fn
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    # Real launches specialise 16-byte-aligned pointers and ints divisible by 16; without that hint
    # loads are scalar and nothing is pipelined, so say so here too (true of every launch at 7B dims).
    divisible = {name for name, v in (ints or {}).items() if v % 16 == 0 and name not in kernel.do_not_specialize}
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, ty in signature.items() if ty.startswith("*") or name.startswith("stride") or name in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    with toolchain_needed():
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": True, **options})


class RecordingDriver:
    """Triton's active driver with no GPU behind it: kernels compile for ``sm_{arch}`` (sm_90 by
    default), Triton checks each against the device's shared memory (``max_shared_mem``: an
    H100/H200's by default), and "launching" one records the argument list its launcher receives
    (stream 0). Triton keeps the kernels it has checked and loaded per device index: a GPU of other
    limits or another arch needs its own ``device``."""

    def __init__(self, max_shared_mem: int = HOPPER_SHARED_MEM, device: int = 0, arch: int = 90):
        from triton.backends.compiler import GPUTarget

        self.device = device
        self.target = GPUTarget("cuda", arch, 32)
        self.launches: list[tuple] = []
        self.launch_devices: list[int] = []  # the current device at each launch
        self.utils = _StubUtils(max_shared_mem)
        self.launcher_cls = lambda src, metadata: self._record

    def _record(self, *args):
        self.launches.append(args)
        self.launch_devices.append(self.device)

    def get_current_device(self):
        return self.device

    def exchange_device(self, device: int) -> int:
        """What qoqopt's launches switch GPUs with (torch's exchange; no CUDA here to switch)."""
        previous, self.device = self.device, device
        return previous

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class _StubUtils:
    def __init__(self, max_shared_mem: int):
        self.max_shared_mem = max_shared_mem

    def get_device_properties(self, device):  # an H100/H200's other limits
        return {"max_shared_mem": self.max_shared_mem, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        # module, function (stand-ins, the function naming the GPU it was loaded on), registers, spills,
        # max threads per block
        return object(), ("function loaded on", device), 0, 0, 1024


@contextlib.contextmanager
def recording_driver(max_shared_mem: int = HOPPER_SHARED_MEM, device: int = 0, arch: int = 90):
    """:class:`RecordingDriver` as Triton's active driver for the duration."""
    from unittest import mock

    from triton.runtime.driver import driver

    from qoqopt.kernels import _triton

    saved = driver._active
    stub = RecordingDriver(max_shared_mem, device, arch)
    driver.set_active(stub)
    try:
        with mock.patch.object(_triton, "_exchange_device", stub.exchange_device), \
                mock.patch.object(_triton, "_restore_device", stub.exchange_device):  # fmt: skip
            yield stub
    finally:
        driver._active = saved


def _tool(name: str) -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def _cuobjdump(compiled, flag: str) -> str | None:
    if _tool("cuobjdump") is None or "cubin" not in compiled.asm:
        return None
    return _disassemble(compiled.asm["cubin"], flag)


@functools.lru_cache(maxsize=64)
def _disassemble(cubin: bytes, flag: str) -> str:
    """cuobjdump ``flag`` of one cubin, once (a report reads a kernel's loops more than one way)."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(_tool("cuobjdump")), flag, str(path)], capture_output=True, text=True).stdout


def resource_usage(compiled) -> dict | None:
    """``{"registers": n, "stack_bytes": n}`` of the cubin, or None without cuobjdump."""
    out = _cuobjdump(compiled, "-res-usage") or ""
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return {"registers": int(match.group(1)), "stack_bytes": int(match.group(2))} if match else None


def _loop_bodies(sass: str, skip_branches: bool = False) -> list[list[tuple[str, str]]]:
    """Every backward-branch loop in the SASS as (opcode, line) pairs (nested loops include their
    inner ones). ``skip_branches``: leave out what a predicated forward branch inside the loop jumps
    over (a block run on some iterations only, such as the merger's per-slot 1/RMS step)."""
    instrs = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines() if (m := _INSTR.match(line))]
    loops = []
    for addr, _, line in instrs:
        branch = _BACK_BRANCH.search(line)
        if branch and int(branch.group(1), 16) < addr:
            start = int(branch.group(1), 16)
            body = [(a, op, text) for a, op, text in instrs if start <= a <= addr]
            skipped = [(a, int(m.group(1), 16)) for a, _, text in body if skip_branches and "@" in text
                       and (m := _BACK_BRANCH.search(text)) and a < int(m.group(1), 16) <= addr]
            loops.append([(op, text) for a, op, text in body if not any(b < a < t for b, t in skipped)])
    return loops


def loop_mixes(compiled, skip_branches: bool = False) -> list[collections.Counter] | None:
    """Opcode counts of every loop (:func:`_loop_bodies`); ``skip_branches``: the steady-state step."""
    sass = _cuobjdump(compiled, "-sass")
    if sass is None:
        return None
    return [collections.Counter(op for op, _ in body) for body in _loop_bodies(sass, skip_branches)]


def loads_read_in_their_step(compiled) -> list[str] | None:
    """The main loop's plain global loads read in the step that makes them
    (:func:`loads_read_in_step`), for a compiled kernel; None without cuobjdump."""
    sass = _cuobjdump(compiled, "-sass")
    return None if sass is None else loads_read_in_step(sass)


_PREDICATE = re.compile(r"^@!?U?P\w+\s+")
_REG = re.compile(r"\bR(\d+)(\.64|\.128)?")
_NO_DEST = ("ST", "RED", "LDGSTS", "BAR", "BRA", "DEPBAR", "LDGDEPBAR", "EXIT", "RET", "CALL", "WARPSYNC", "NOP")


def _parse(line: str) -> tuple[bool, str, list[str]]:
    """One SASS line -> (predicated, opcode, operands)."""
    body = line.split("*/", 1)[1].split(";", 1)[0].strip()
    predicated = bool(_PREDICATE.match(body))
    opcode, _, rest = _PREDICATE.sub("", body).partition(" ")
    return predicated, opcode, [op.strip() for op in rest.split(",")] if rest.strip() else []


def _registers(operand: str) -> set[str]:
    """General registers an operand names; ``R2.64`` (a 64-bit address) is R2 and R3."""
    regs = set()
    for m in _REG.finditer(operand):
        n, width = int(m.group(1)), {".64": 2, ".128": 4}.get(m.group(2) or "", 1)
        regs |= {f"R{n + i}" for i in range(width)}
    return regs


def _dests_and_sources(opcode: str, ops: list[str]) -> tuple[set[str], set[str]]:
    """Registers an instruction writes and reads. The leading operand is written, unless the opcode
    writes none (stores, barriers, branches) or it is an address; after a predicate written first
    (``SHFL PT, R4, ...``) the next register is written too."""
    n_dest = 0 if opcode.startswith(_NO_DEST) or not ops or ops[0].startswith("[") else 1
    if n_dest and re.fullmatch(r"U?P(\d|T)", ops[0]) and len(ops) > 1 and re.fullmatch(r"R\d+", ops[1]):
        n_dest = 2
    dests = set().union(*(_registers(op) for op in ops[:n_dest] if not op.startswith("[")))
    return dests, set().union(set(), *(_registers(op) for op in ops[n_dest:]))


def loads_read_in_step(sass: str) -> list[str]:
    """The K loop's plain global loads (``LDG``: not copied ahead by cp.async) whose value the
    same pass through the loop reads: such a load's whole latency sits inside every step, where one
    read only after the back branch (issued a step ahead) overlaps a step's work. A register stops
    being followed once an unpredicated instruction overwrites it."""
    bodies = _loop_bodies(sass)
    if not bodies:
        return []
    # a GEMM's K loop: the smallest loop issuing MMAs (as mma_loop_mix; TMA kernels wrap more in outer
    # loops), else the largest (as main_loop_mix)
    mma = [b for b in bodies if any(op.endswith("MMA") for op, _ in b)]
    body = [_parse(line) for _, line in (min(mma, key=len) if mma else max(bodies, key=len))]
    read = []
    for i, (_, opcode, ops) in enumerate(body):
        if not opcode.startswith("LDG.") or not ops or not re.fullmatch(r"R\d+", ops[0]):
            continue
        first = int(ops[0][1:])
        width = next((w for suffix, w in ((".256", 8), (".128", 4), (".64", 2)) if suffix in opcode), 1)
        live = {f"R{first + j}" for j in range(width)}
        for predicated, later, later_ops in body[i + 1 :]:
            dests, sources = _dests_and_sources(later, later_ops)
            if sources & live:
                read.append(f"{opcode} {ops[0]}")
                break
            if not predicated:
                live -= dests
            if not live:
                break
    return read


def main_loop_mix(compiled) -> collections.Counter | None:
    """The largest loop: the K loop of the W4A16 kernels."""
    loops = loop_mixes(compiled)
    return max(loops, key=lambda c: sum(c.values()), default=collections.Counter()) if loops is not None else None


def mma_loop_mix(compiled, skip_branches: bool = False) -> collections.Counter | None:
    """The smallest loop that issues tensor-core instructions: a GEMM's K loop inside outer loops."""
    loops = loop_mixes(compiled, skip_branches)
    if loops is None:
        return None
    mma = [c for c in loops if any(op.endswith("MMA") for op in c)]
    return min(mma, key=lambda c: sum(c.values()), default=collections.Counter())


# The device name tuning tables are looked up under for offline launches: none ships for it
OFFLINE_DEVICE = "offline sm_90 stand-in"


@contextlib.contextmanager
def offline_w4a16(sms: int = 132, max_shared_mem: int = HOPPER_SHARED_MEM, device: int = 0, arch: int = 90):
    """W4A16 launches planned for a CUDA GPU with ``sms`` SMs, made with CPU stand-in tensors under
    :func:`recording_driver`: Triton's own dispatch specialises and compiles them exactly as at run
    time (no hand-written signature or hints), and nothing runs."""
    from unittest import mock

    from qoqopt.kernels import _splitk, tuning, w4a16

    workspace = (torch.empty(16), torch.zeros(16, dtype=torch.int32))  # split-K scratch: only pointers are passed
    # Shared launches bind to the driver of their first call: none made before reaches the stub, and
    # none made under it outlives it
    w4a16._shared_launch.cache_clear()
    try:
        with mock.patch.object(w4a16, "num_sms", lambda device: sms), \
                mock.patch.object(_splitk, "splitk_workspace", lambda device, numel, tiles: workspace), \
                mock.patch.object(tuning, "device_name", lambda device: OFFLINE_DEVICE), \
                recording_driver(max_shared_mem, device, arch) as driver:  # fmt: skip
            yield driver
    finally:
        w4a16._shared_launch.cache_clear()


def w4a16_operands(m: int, k: int, n: int, dtype: torch.dtype = torch.bfloat16, group_size: int = 128,
                   fragments: bool = False) -> tuple:
    """CPU stand-ins (uninitialised) for a launch's x, qweight (GPTQ words, or ``fragments``: the
    fragment words ``KERNEL="frag"`` reads), qzeros, scales, bias and out."""
    from qoqopt.kernels.w4a16 import qweight_shape

    groups = k // group_size
    return (torch.empty(m, k, dtype=dtype), torch.empty(qweight_shape(k, n, 4, fragments), dtype=torch.int32),
            torch.empty(groups, n // 8, dtype=torch.int32), torch.empty(groups, n, dtype=torch.float16),
            torch.empty(n, dtype=torch.float16), torch.empty(m, n, dtype=dtype))


def w4a16_compile(m: int, k: int, n: int, *, zero_offset: int = 1, dtype: torch.dtype = torch.bfloat16,
                  group_size: int = 128, sms: int = 132, max_shared_mem: int = HOPPER_SHARED_MEM, device: int = 0,
                  arch: int = 90, **config):
    """Compile what ``w4a16_matmul`` would launch for ``[m, k] @ [k, n]`` on a GPU with ``sms`` SMs,
    through the launch itself (:func:`offline_w4a16`); ``config`` overrides the plan's choices
    (kernel, tiles) as ``w4a16_matmul``'s does. Returns ``(compiled, plan)``: the kernel launched."""
    from qoqopt.kernels import w4a16

    with offline_w4a16(sms, max_shared_mem, device, arch):
        plan = w4a16.launch_plan(m, n, k, bits=4, group_size=group_size, zero_offset=zero_offset, has_bias=True,
                                 dtype=dtype, device=CUDA, **config)
        launch = w4a16.prepare_w4a16(m, k, n, dtype, CUDA, has_bias=True, group_size=group_size,
                                     zero_offset=zero_offset, **config)
        operands = w4a16_operands(m, k, n, dtype, group_size, w4a16.reads_fragment_words(config))
        with toolchain_needed():
            if plan.kernel == "dense":  # its GEMM is cuBLAS's: only the dequantization compiles
                launch.dense_weight(*operands[1:4])
            else:
                launch(*operands)
    return launch.matmul.kernel, plan


def merger_fc1_compile(m: int, c: int = 1280, merge: int = 4, n: int = 5120, *,
                       max_shared_mem: int = HOPPER_SHARED_MEM, device: int = 0, **config):
    """Compile the merger fc1 kernel as ``merger_fc1`` launches it for ``m`` merged rows (its own
    launch plan, on CPU stand-ins), through Triton's dispatch under :func:`recording_driver`
    (Triton checks its shared memory against ``max_shared_mem``). ``config``: tile overrides, as
    ``merger_fc1`` takes them. Returns ``(compiled, constexprs)``: the kernel and its launch's
    constexprs (tiles, warps and stages as asked)."""
    from qoqopt.kernels.merger import _merger_fc1_kernel, fc1_launch

    bf16 = dict(dtype=torch.bfloat16)
    x, w1, b1 = torch.empty(merge * m, c, **bf16), torch.empty(n, merge * c, **bf16), torch.empty(n, **bf16)
    launch = fc1_launch(x, w1, b1, device=CUDA, **config)
    rstd = torch.empty(x.shape[0])
    with recording_driver(max_shared_mem, device), toolchain_needed():
        compiled = _merger_fc1_kernel[CUDA][launch.grid](x, rstd, *launch.args, **launch.constexprs)
    return compiled, launch.constexprs


def attention_compile(avg_len: int, dtype: str = "*bf16", head_dim: int = 80, heads: int = 16):
    """Compile the vision attention kernel as the patched module launches it for segments of ``avg_len``
    (shared rotary halves: fp16 table for 16-bit activations, fp32 for fp32). Returns ``(compiled, cfg)``."""
    from qoqopt.kernels.vision_attention import _attention_config, _vision_attention_kernel, head_split

    cfg = _attention_config(CUDA, avg_len, torch.float32 if dtype == "*fp32" else torch.bfloat16)
    options = {key: cfg.pop(key) for key in ("num_warps", "num_stages")}
    table = "*fp32" if dtype == "*fp32" else "*fp16"
    signature = {"qkv_ptr": dtype, "cos_ptr": table, "sin_ptr": table, "plan_ptr": "*i32", "out_ptr": dtype,
                 "stride_qkv": "i32", "stride_rope": "i32", "stride_out": "i32", "qk_scale": "fp32"}
    main, rest = head_split(head_dim)
    constexprs = dict(H=heads, HEAD_DIM=head_dim, MAIN=main, REST=rest, SHARED_HALVES=True,
                      DOT_PRECISION="ieee" if dtype == "*fp32" else "tf32", **cfg)
    return compile_kernel(_vision_attention_kernel, signature, constexprs, options), cfg | options
