"""Hardware and software tags for a bench result: what a reader needs to trust or reproduce a number."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "triton", "transformers", "llama_cpp_python", "gguf", "bitsandbytes", "numpy")


def _usable_cpus():
    """The CPU numbers this process may run on (its affinity mask: a container's or taskset's share)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> int | None:
    """Whole CPUs this process's CPU quota grants (rounded down, at least 1); None without one.
    `docker run --cpus 2` and Kubernetes CPU limits set a quota (cgroup v2 `cpu.max`, v1
    `cpu.cfs_quota_us` over `cpu.cfs_period_us`), not an affinity mask: 32 threads on a 2-CPU quota
    spend most of each period throttled, and llama.cpp's threads, which wait for each other, worse
    on a fraction of a CPU. v2 is read from the process's own cgroup up to the root (a host cgroup
    namespace shows the whole tree), the tightest quota counting."""
    quotas = [_quota(_read(folder / "cpu.max"), None) for folder in _v2_folders(cgroup, own)]
    quotas += [_quota(_read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us"))
               for v1 in (cgroup / "cpu", cgroup / "cpu,cpuacct")]  # fmt: skip
    quotas = [q for q in quotas if q]
    return max(1, int(min(quotas))) if quotas else None


def _v2_folders(cgroup: Path, own: Path) -> list[Path]:
    """The cgroup v2 folders from the process's own (``0::/path`` in /proc/self/cgroup) up to the root."""
    path = next((line[3:].strip() for line in (_read(own) or "").splitlines() if line.startswith("0::")), "/")
    folder = cgroup / path.strip("/")
    return [folder, *[p for p in folder.parents if p.is_relative_to(cgroup)]]


def _quota(text: str | None, period: str | None) -> float | None:
    """CPUs from cgroup v2's "QUOTA PERIOD" (``period`` None) or v1's two files; None for no limit
    ("max", -1) or no file."""
    fields = (text or "").split() + ([period.strip()] if period else [])
    if len(fields) < 2 or not fields[0].isdigit() or not fields[1].isdigit() or int(fields[1]) == 0:
        return None
    return int(fields[0]) / int(fields[1])


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def usable_cores() -> int:
    """CPUs this process may run on, not the host's: its affinity mask, capped by a CPU quota."""
    return min(len(_usable_cpus()), cpu_quota() or math.inf)


def usable_physical_cores(sysfs: Path = Path("/sys/devices/system/cpu"), p_cores: Path = Path("/sys/devices/cpu_core/cpus")) -> int:
    """Physical cores among the CPUs this process may use, capped by a CPU quota: SMT siblings
    share one core's vector units, and llama.cpp and torch both default to one thread a physical
    core. Linux's topology files name each CPU's (package, core); on a hybrid Intel CPU only the
    performance cores count (`p_cores` lists them), as llama.cpp leaves efficiency cores out of its
    default; macOS's sysctl names its performance cores; elsewhere every usable CPU counts."""
    cpus = _usable_cpus()
    performance = cpu_list(_read(p_cores) or "")  # empty: not a hybrid CPU
    cpus = [c for c in cpus if c in performance] or cpus
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return _macos_performance_cores() or usable_cores()
    return min(len(cores) or 1, cpu_quota() or math.inf)


def cpu_list(text: str) -> set[int]:
    """Linux's CPU list format ("0-15,20,22-23") as CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _macos_performance_cores() -> int | None:
    """Apple Silicon's performance cores (Intel Macs: physical cores), which llama.cpp's default
    thread count also takes: threads on the efficiency cores slow a matmul down to their pace."""
    count = _sysctl("hw.perflevel0.physicalcpu") or _sysctl("hw.physicalcpu")
    return int(count) if count and count.isdigit() else None


def _sysctl(name: str) -> str | None:
    """A macOS sysctl value (macOS has no /proc or /sys); None elsewhere or when it has none."""
    if sys.platform != "darwin":
        return None
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def threads_or_default(threads: int) -> int:
    """--threads as given, or (0) one per usable physical core (torch's default, capped by a CPU
    quota and, on a hybrid CPU, by its performance cores, as torch is not); as torch does,
    OMP_NUM_THREADS lowers that where it is set (a scheduler's or a shared machine's share) but does
    not raise it."""
    if threads:
        return threads
    cores = usable_physical_cores()
    return min(omp_threads() or cores, cores)


def omp_threads() -> int | None:
    """OMP_NUM_THREADS's thread count (its first level: "8,2" asks for 8, then 2 in nested
    regions); None where it is unset or not a positive number, as OpenMP then ignores it."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isascii() and first.isdigit() and int(first) > 0 else None


def _cpuinfo(*keys: str) -> str | None:
    """The value of /proc/cpuinfo's first line naming one of ``keys`` (Linux only)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name ("Apple M3 Pro", not macOS's "arm", which every Apple Silicon Mac says;
    "Arm Neoverse-V2", not "aarch64", which Graviton, Ampere and Grace alike say)."""
    return (_cpuinfo("model name") or _sysctl("machdep.cpu.brand_string") or _arm_core()
            or platform.processor() or platform.machine())  # fmt: skip


# Arm's core part numbers (Linux, arch/arm64/include/asm/cputype.h): Arm Linux's /proc/cpuinfo has no
# model name, only the implementer and part
_ARM_PARTS = {0xD03: "Cortex-A53", 0xD08: "Cortex-A72", 0xD0B: "Cortex-A76", 0xD0C: "Neoverse-N1", 0xD40: "Neoverse-V1",
              0xD41: "Cortex-A78", 0xD49: "Neoverse-N2", 0xD4F: "Neoverse-V2", 0xD84: "Neoverse-V3", 0xD8E: "Neoverse-N3"}  # fmt: skip


def _arm_core() -> str | None:
    implementer, part = _cpuinfo("CPU implementer"), _cpuinfo("CPU part")
    if not implementer or not part:
        return None
    try:
        if int(implementer, 16) == 0x41 and int(part, 16) in _ARM_PARTS:
            return f"Arm {_ARM_PARTS[int(part, 16)]}"
    except ValueError:
        pass
    return f"Arm CPU (implementer {implementer}, part {part})"


def cpu_id() -> str | None:
    """An x86 CPU's family, model and stepping: a cloud VM's model name can be as bare as
    "Intel(R) Xeon(R) Processor", the same for Sapphire Rapids (model 143) and its elders."""
    family, model, stepping = (_cpuinfo(k) for k in ("cpu family", "model\t", "stepping"))
    return f"family {family} model {model} stepping {stepping}" if family and model else None


# The vector extensions llama.cpp's and torch's CPU kernels choose between (x86 "flags", Arm
# "Features" in /proc/cpuinfo): two CPUs of one model name can differ here (a VM may hide AVX-512).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")  # fmt: skip


def cpu_flags() -> list[str] | None:
    have = _cpuinfo("flags", "Features")
    return None if have is None else [f for f in ISA_FLAGS if f in set(have.split())]


def gpu_info() -> dict | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)  # cuda:0, where bench runs every variant
        count = torch.cuda.device_count()
        return {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,  # an H100 PCIe has 114, an SXM 132: one name, two speeds
            "count": count,
            "names": [torch.cuda.get_device_properties(i).name for i in range(count)],
            "driver": _nvidia_driver(),
            "cuda": torch.version.cuda,  # the CUDA torch was built with
        }
    except Exception:  # a broken CUDA install must not stop a CPU bench
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def machine_info(device: str, threads: int, label: str | None = None) -> dict:
    import psutil

    gpu = gpu_info() if device == "cuda" else None
    cpu = cpu_model()
    auto = f"{gpu['name']}" if gpu else f"{cpu} ({threads} thread{'s' if threads != 1 else ''})"
    return {
        "label": label or auto,
        "device": device,
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "cpu_id": cpu_id(),
        "cores": usable_cores(),  # this process's share (taskset, a container's quota); the host's below
        "cpu_quota": cpu_quota(),
        "host_cores": os.cpu_count(),
        "threads": threads,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu,
    }


def software_info() -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    from qoqopt import __version__

    return {"qoqopt": __version__, "qoqopt_commit": _git_commit(), "packages": versions}


def _git_commit() -> str | None:
    """The checkout's commit (and '+dirty' for uncommitted changes) when qoqopt runs from a git tree."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def ru_maxrss_mib(ru_maxrss: int) -> float:
    """getrusage's ru_maxrss in MiB: macOS counts it in bytes, Linux in KiB."""
    return ru_maxrss / 2**20 if sys.platform == "darwin" else ru_maxrss / 1024
