"""`qoqopt bench` on the trained mini model (CPU): every variant in its own runtime, drift checked against
an independent computation (transformers logits and llama.cpp logits, KLD by torch), and the report."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import HUB_COMMIT, TRAIN_TOKENS, cache_as_hub_repo, error_line, refused, run_cli

pytestmark = pytest.mark.slow

ITEMS = 5  # one chat per clinical domain
VARIANTS = "bf16,gguf:Q4_K_M,gguf:Q8_0,gptq:4,awq:4"
HAVE_BNB = all(importlib.util.find_spec(name) for name in ("bitsandbytes", "accelerate"))


def _bench(model: Path, out: Path, *extra: str, status: int = 0):
    res = run_cli("bench", str(model), "--items", str(ITEMS), "--repeats", "1", "--decode-tokens", "8",
                  "--calib-items", "8", "--out", str(out), *extra)  # fmt: skip
    assert res.returncode == status, res.stderr[-2000:]
    (result,) = sorted(out.glob("bench-*.json"))
    return json.loads(result.read_text()), result, res


@pytest.fixture(scope="module")
def run_1t(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench1")
    return _bench(trained_dir, out, "--variants", VARIANTS, "--threads", "1")


@pytest.fixture(scope="module")
def run_2t(trained_dir, run_1t, tmp_path_factory):
    """A second machine stand-in: 2 threads, builds reused, plus one build that cannot load."""
    root = tmp_path_factory.mktemp("bench2")
    builds = Path(run_1t[1]).parent / "builds"
    (gguf_dir,) = builds.glob("gguf-*")
    broken = root / "broken"
    shutil.copytree(gguf_dir, broken)
    q4 = next(broken.glob("*.Q4_K_M.gguf"))
    q4.write_bytes(q4.read_bytes()[: q4.stat().st_size // 3])  # truncated download
    failing = 1 if HAVE_BNB else 2  # bnb:nf4 fails where bitsandbytes is not installed
    return _bench(trained_dir, root / "out", "--variants", "gguf:Q4_K_M,gguf:Q8_0,bnb:nf4", "--threads", "2",
                  "--from", str(broken), "--builds", str(builds), "--label", "cpu 2 threads", status=1) + (failing,)  # fmt: skip


def _by_name(result):
    return {v["name"]: v for v in result["variants"]}


def test_bench_writes_every_variant_with_tags(run_1t, trained_dir):
    result, path, res = run_1t
    assert result["schema"] == "qoqopt.bench/1"
    run = result["run"]
    assert run["machine"]["threads"] == 1 and run["machine"]["cpu"] and run["machine"]["gpu"] is None
    assert run["software"]["packages"]["torch"] and run["software"]["packages"]["llama_cpp_python"]
    assert run["eval"]["domains"] == {"ct": 1, "ecg": 1, "mri": 1, "ultrasound": 1, "xray": 1}
    v = _by_name(result)
    assert list(v) == ["reference", "bf16", "gguf:Q4_K_M", "gguf:Q8_0", "gptq:4", "awq:4"]
    assert all(x["status"] == "ok" for x in v.values()), [x.get("error") for x in v.values()]
    assert v["gguf:Q4_K_M"]["runtime"].startswith("llama.cpp") and "W4A16" in v["gptq:4"]["runtime"] == v["awq:4"]["runtime"]
    for rec in v.values():  # the exact files, by sha256
        for f in rec["files"]:
            assert hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() == f["sha256"]
        if rec["format"] != "hf":
            assert rec["size_bytes"] == sum(f["size_bytes"] for f in rec["files"]) and rec["size_basis"] == "files"
    # the reference (fp32) and a dtype variant are cast at load: their size is the weights as transformers
    # holds them in that dtype, not the checkpoint's files (bf16 here, so fp32 would read half its size)
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    for name, dtype in (("reference", torch.float32), ("bf16", torch.bfloat16)):
        loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=dtype)
        assert (v[name]["size_bytes"], v[name]["size_basis"]) == (loaded.get_memory_footprint(), "loaded weights"), name
    assert v["reference"]["size_bytes"] > 1.9 * sum(f["size_bytes"] for f in v["reference"]["files"])
    for name in ["gguf:Q4_K_M", "gptq:4", "awq:4"]:  # provenance from each build's manifest
        assert v[name]["built_from"]["model"] == str(trained_dir)
    names = {Path(f["path"]).name for f in v["gguf:Q4_K_M"]["files"]}
    assert any(n.endswith(".Q4_K_M.gguf") for n in names) and any(n.startswith("mmproj-") for n in names)
    assert v["gguf:Q4_K_M"]["size_bytes"] < v["gguf:Q8_0"]["size_bytes"] < v["bf16"]["size_bytes"]


def test_drift_fields_and_worst_domain(run_1t):
    v = _by_name(run_1t[0])
    for name in ["bf16", "gguf:Q4_K_M", "gguf:Q8_0", "gptq:4", "awq:4"]:
        drift = v[name]["drift"]
        assert set(drift) == {"all", "ct", "ecg", "mri", "ultrasound", "xray"}
        a = drift["all"]
        assert a["positions"] == sum(drift[d]["positions"] for d in drift if d != "all")
        assert a["mean_kld"] >= 0 and a["p99_kld"] >= 0 and a["positions"] > 0
        assert 0 <= a["accuracy"] <= 1 and 0 <= a["same_top_pct"] <= 100
        worst = max((drift[d]["mean_kld"], d) for d in drift if d != "all")[1]
        assert v[name]["worst_domain"] == worst
        # one chat per domain: any redraw of the chats pools to a mean between the chats' own
        chats = [drift[d]["mean_kld"] for d in drift if d != "all"]
        low, high = a["mean_kld_ci95"]
        assert min(chats) <= low < high <= max(chats)
        # the chats' totals kept for the report's paired table pool to the run's own mean, chat by chat
        totals = a["chat_kld"]
        assert len(totals) == a["items"] and sum(n for _, n in totals) == a["positions"]
        assert sum(s for s, _ in totals) / a["positions"] == pytest.approx(a["mean_kld"], rel=1e-9)
        assert sorted(s / n for s, n in totals) == pytest.approx(sorted(chats), rel=1e-9)
    # Q4_K_M must stray further than Q8_0, which is near the bf16 rounding floor
    assert v["gguf:Q4_K_M"]["drift"]["all"]["mean_kld"] > 3 * v["gguf:Q8_0"]["drift"]["all"]["mean_kld"]


def _set_f1(reply: str, answer: str) -> float:
    """The last \\boxed{...} of a reply, found by a regex, its comma-separated conditions scored by set F1."""

    def conditions(text):
        return {c.strip().strip(".").lower() for c in text.split(",")} - {""}

    boxed = re.findall(r"\\boxed\{([^{}]*)\}", reply)
    got, want = conditions(boxed[-1]) if boxed else set(), conditions(answer)
    hit = len(got & want)
    return 2 * hit / (len(got) + len(want)) if hit else 0.0


def _greedy_replies(model, proc, answer_tokens: int) -> dict:
    """Eval item -> transformers' greedy reply, one chat per domain."""
    import torch

    from qoqopt.bench.eval_set import eval_items

    replies = {}
    for item in eval_items("clinical", ITEMS, 0):
        inputs = proc.apply_chat_template(item.messages(), add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=answer_tokens, do_sample=False)
        replies[item] = proc.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return replies


def _greedy_scores(model, proc, answer_tokens: int) -> dict[str, float]:
    """Per domain (one eval chat each), the set F1 of transformers' greedy reply."""
    return {item.domain: _set_f1(reply, item.answer) for item, reply in _greedy_replies(model, proc, answer_tokens).items()}


def _assert_accuracy(drift: dict, scores: dict[str, float]) -> None:
    assert {d: drift[d]["accuracy"] for d in scores} == pytest.approx(scores)
    assert drift["all"]["accuracy"] == pytest.approx(sum(scores.values()) / len(scores))


def test_answer_accuracy_is_greedy_generation_scored_by_set_f1(run_1t, trained_dir):
    """The reference's per-domain answer accuracy, redone here: transformers' greedy generate on each
    eval chat (the bench's answer tokens), the last \\boxed{...} found by a regex, its
    comma-separated conditions scored by set F1 against the item's answer."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.processor import load_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=torch.float32).eval()
    scores = _greedy_scores(model, load_processor(trained_dir), run_1t[0]["run"]["eval"]["answer_tokens"])
    _assert_accuracy(_by_name(run_1t[0])["reference"]["drift"], scores)
    assert 0 < _by_name(run_1t[0])["reference"]["drift"]["all"]["accuracy"] < 1  # some right, some wrong: a score stuck at 0 or 1 would show
    assert _by_name(run_1t[0])["reference"]["unboxed"] == 0  # the mini boxes every answer, well inside the limit


def test_an_answer_cut_off_before_its_boxed_is_counted_and_said(trained_dir, tmp_path):
    """bench answered in 64 tokens, where QoQ-Med thinks at length before its \\boxed{}: every reply
    cut off scored 0, and nothing said so. The limit is --answer-tokens (default 1024), and each
    variant names its answers with no \\boxed{}: here every one of transformers' own 4-token greedy
    replies, which the report then counts."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.processor import load_processor

    result, path, _ = _bench(trained_dir, tmp_path / "o", "--variants", "bf16", "--no-speed", "--answer-tokens", "4")
    assert result["run"]["eval"]["answer_tokens"] == 4
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=torch.float32).eval()
    replies = _greedy_replies(model, load_processor(trained_dir), 4)
    cut = [item.id for item, reply in replies.items() if not re.search(r"\\boxed\{[^{}]*\}", reply)]
    assert cut == [item.id for item in replies]  # 4 tokens never reach the mini's \boxed{}
    assert _by_name(result)["reference"]["unboxed"] == len(cut) and _by_name(result)["reference"]["drift"]["all"]["accuracy"] == 0
    res = run_cli("report", str(path), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    drift_table = text.split("## Drift against the reference")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip(): line for line in drift_table.splitlines() if line.startswith(("| reference", "| bf16"))}
    assert f"| 0.00 ({ITEMS} unboxed) |" in rows["reference"] and "cut off at the run's 4 answer tokens" in text


def test_speed_fields(run_1t):
    """Every speed field is measured (values are compared in benchmarks, never in tests)."""
    for rec in _by_name(run_1t[0]).values():
        if rec["name"] == "reference":
            continue
        s = rec["speed"]
        for key in ["prefill_tok_s", "decode_tok_s", "image_encode_ms", "ttft_ms", "peak_host_mb"]:
            assert s[key] > 0, (rec["name"], key)
        # 728x700 -> 26x25 merged tokens; 256x256 rounds to 252 < the pixel minimum, so grows to 280: 10x10
        assert s["image_tokens_max"] == 650 and s["image_tokens_min"] == 100
        for key in ["ttft_ms", "prefill_tok_s", "decode_tok_s"]:  # one repeat: its range is its value
            assert s["spread"][key] == [s[key], s[key]], (rec["name"], key)
        assert s["prefill"] == "prompt pass"  # the report marks transformers rows without it as older
        # the rates' units, from what contains what: the prompt's time is inside TTFT, the image's
        # encode too, and every timed span inside the worker's own wall time (an inverted rate, s/token,
        # passed before: helper-66)
        assert s["prompt_tokens"] / s["prefill_tok_s"] <= s["ttft_ms"] / 1e3 and s["image_encode_ms"] <= s["ttft_ms"]
        assert s["decode_tokens"] / s["decode_tok_s"] + s["ttft_ms"] / 1e3 <= rec["seconds"], rec["name"]
    assert "float32" in _by_name(run_1t[0])["gptq:4"]["runtime"]  # on CPU its torch path runs in fp32, bf16 in bf16


def test_a_workers_peak_memory_is_its_own():
    """Linux carries ru_maxrss across exec: a worker started from a bench process holding 700 MiB
    read 700 MiB before it loaded anything (helper-64: every GGUF row showed the parent's peak). The
    worker reads its own address space's high-water mark; the kernel's ru_maxrss shows the trap."""
    child = ("import resource; from qoqopt.bench.worker import peak_host_mib; "
             "print(peak_host_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    parent = (f"import subprocess, sys; held = b'x' * (700 * 2**20); "
              f"sys.exit(subprocess.run([sys.executable, '-c', {child!r}]).returncode)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout
    own, inherited = map(float, out.split())
    assert inherited > 700 and own < 200


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity masks (macOS)")
def test_default_threads_are_one_per_physical_core(tmp_path):
    """llama.cpp and torch default to a thread a physical core (SMT siblings share its vector units);
    bench and ask used every logical CPU. Counted within the affinity mask: a taskset of one CPU is one.
    A topology of SMT pairs (as Linux's sysfs lays it out) halves the count, which a machine without
    SMT cannot show (helper-68)."""
    import psutil

    from qoqopt.bench.machine import usable_physical_cores

    if len(os.sched_getaffinity(0)) == os.cpu_count():
        assert usable_physical_cores() == psutil.cpu_count(logical=False)
    cpus = sorted(os.sched_getaffinity(0))
    for n, cpu in enumerate(cpus):  # CPUs 2k and 2k+1 of the mask are one core's two threads
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{n // 2}\n")
    assert usable_physical_cores(tmp_path) == (len(cpus) + 1) // 2
    one = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from qoqopt.bench.machine import usable_physical_cores as u; print(u())"
    assert subprocess.run([sys.executable, "-c", one], capture_output=True, text=True, check=True).stdout.strip() == "1"


def test_a_mac_is_named_by_its_chip_and_threaded_on_its_performance_cores(tmp_path, monkeypatch):
    """macOS has no /proc or /sys: every Apple Silicon Mac was labelled "arm" (an M1's result and an
    M3's were told apart only as #1 and #2), and bench used every core, efficiency cores too, where
    llama.cpp's default takes the performance cores. Simulated here (no Mac): the sysctl names are
    macOS's own, answered as an M3 Pro answers them (6 performance, 6 efficiency cores)."""
    from qoqopt.bench import machine

    answers = {"machdep.cpu.brand_string": "Apple M3 Pro", "hw.perflevel0.physicalcpu": "6", "hw.physicalcpu": "12"}
    asked = []

    def sysctl(argv, **kw):
        asked.append(argv)
        value = answers.get(argv[-1])
        return subprocess.CompletedProcess(argv, 0 if value else 1, f"{value or ''}\n", "")

    monkeypatch.setattr(machine.sys, "platform", "darwin")
    monkeypatch.setattr(machine.subprocess, "run", sysctl)
    monkeypatch.setattr(machine, "_cpuinfo", lambda *keys: None)  # no /proc/cpuinfo
    assert machine.cpu_model() == "Apple M3 Pro"
    assert machine.usable_physical_cores(tmp_path / "no-sysfs") == 6
    del answers["hw.perflevel0.physicalcpu"]  # an Intel Mac has one performance level
    assert machine.usable_physical_cores(tmp_path / "no-sysfs") == 12
    assert all(argv[:2] == ["sysctl", "-n"] for argv in asked)


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, `docker run --cpus 2`
    ({"cpu.max": "150000 100000\n"}, 1),  # --cpus 1.5: a second lock-step thread would wait on throttling
    ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU: still one thread
    # a host cgroup namespace: the process's own cgroup, and the tightest quota on the way to the root
    ({"own": "0::/kubepods/pod1/ctr\n", "kubepods/pod1/ctr/cpu.max": "max 100000\n",
      "kubepods/pod1/cpu.max": "300000 100000\n", "cpu.max": "max 100000\n"}, 3),
    ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
    ({}, None),
])  # fmt: skip
def test_a_containers_cpu_quota_caps_the_default_threads(files, quota, tmp_path, monkeypatch):
    """Docker's --cpus and Kubernetes CPU limits set a CFS quota, in the files and formats the kernel's
    cgroup documentation gives, not an affinity mask: a pod limited to 2 CPUs on a 64-core host got 32
    threads, tagged 64 cores."""
    from qoqopt.bench import machine

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert machine.cpu_quota(tmp_path, tmp_path / "own") == quota
    monkeypatch.setattr(machine, "cpu_quota", lambda: quota)
    monkeypatch.setattr(machine, "_usable_cpus", lambda: range(64))
    assert machine.usable_cores() == (quota or 64)
    assert machine.usable_physical_cores(tmp_path / "no-sysfs", tmp_path / "no-hybrid") == (quota or 64)


def test_a_hybrid_intel_cpu_counts_its_performance_cores(tmp_path, monkeypatch):
    """An i9-13900K: 8 performance cores with two threads each (CPUs 0-15) and 16 efficiency cores
    (16-31), as Linux's sysfs lays them out. llama.cpp's default leaves the efficiency cores out;
    bench took 24 threads."""
    from qoqopt.bench import machine

    for cpu in range(32):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{cpu // 2 if cpu < 16 else cpu}\n")
    (tmp_path / "cpu_core_cpus").write_text("0-15\n")
    monkeypatch.setattr(machine, "_usable_cpus", lambda: range(32))
    monkeypatch.setattr(machine, "cpu_quota", lambda: None)
    assert machine.usable_physical_cores(tmp_path, tmp_path / "no-hybrid") == 24
    assert machine.usable_physical_cores(tmp_path, tmp_path / "cpu_core_cpus") == 8
    assert machine.cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}


def test_a_gpu_nodes_tag_names_every_gpu(monkeypatch):
    """The tag named GPU 0 and a count: a node of an H100 SXM and an H100 PCIe (one name, 132 and 114
    SMs) read as two of the first. Asked of torch's own device properties (two faked here)."""
    from types import SimpleNamespace

    import torch

    from qoqopt.bench import machine

    gpus = [SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0, multi_processor_count=132),
            SimpleNamespace(name="NVIDIA H100 PCIe", total_memory=80 * 2**30, major=9, minor=0, multi_processor_count=114)]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpus[i])
    monkeypatch.setattr(machine, "_nvidia_driver", lambda: "580.65")
    info = machine.gpu_info()
    assert info["names"] == ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"] and info["count"] == 2
    assert (info["name"], info["sms"], info["memory_gib"]) == ("NVIDIA H100 80GB HBM3", 132, 80.0)


def test_an_arm_server_is_named_by_its_core(monkeypatch):
    """Arm Linux's /proc/cpuinfo has no model name: Graviton3, Graviton4, Ampere Altra and Grace were
    all "aarch64". The part numbers are Linux's (arch/arm64/include/asm/cputype.h)."""
    from qoqopt.bench import machine

    cpuinfo = {"CPU implementer": "0x41", "CPU part": "0xd4f"}  # Grace, Graviton4
    monkeypatch.setattr(machine, "_cpuinfo", lambda *keys: next((cpuinfo[k] for k in keys if k in cpuinfo), None))
    monkeypatch.setattr(machine, "_sysctl", lambda name: None)
    assert machine.cpu_model() == "Arm Neoverse-V2"
    cpuinfo["CPU part"] = "0xd0c"
    assert machine.cpu_model() == "Arm Neoverse-N1"  # Ampere Altra, Graviton2
    cpuinfo.update({"CPU implementer": "0xc0", "CPU part": "0xac3"})
    assert machine.cpu_model() == "Arm CPU (implementer 0xc0, part 0xac3)"


@pytest.mark.parametrize("omp", ["1", "2", "5,2", "99", None])
def test_the_default_thread_count_is_torchs_own(omp):
    """With no --threads, ask and bench take as many threads as torch does by itself: one per physical
    core, or fewer where OMP_NUM_THREADS asks for fewer (a scheduler's or a shared machine's share);
    fewer again than torch where a CPU quota or a hybrid CPU's efficiency cores cap the cores."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | ({"OMP_NUM_THREADS": omp} if omp else {})
    code = ("import torch; from qoqopt.bench.machine import threads_or_default as t, usable_physical_cores as c; "
            "print(t(0), torch.get_num_threads(), c(), t(7))")  # fmt: skip
    ours, torchs, cores, given = map(int, subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                                         text=True, check=True).stdout.split())  # fmt: skip
    assert given == 7 and ours == min(torchs, cores) == min(int(omp.split(",")[0]) if omp else cores, cores)
    from qoqopt.bench.machine import cpu_quota

    if omp is None and cpu_quota() is None and not Path("/sys/devices/cpu_core/cpus").exists():
        assert cores == torchs  # no cap to apply: the physical cores are torch's own count of them


def test_transformers_decode_is_timed_inside_one_request(tiny_dir):
    """TTFT and decode come from one generate() of 1 + n tokens, each step time-stamped: decode was
    the difference of two requests, and one slow request made it 0 ms (3.2e10 tok/s, helper-64).
    Prefill is the language model's first pass and its logits alone: TTFT less the encode held
    generate()'s host work too (16-19 ms a request on the H200, against a sub-ms pass)."""
    from qoqopt.bench.hf_runner import load_hf
    from qoqopt.bench.speed import probe_image

    runner = load_hf(tiny_dir, None, {}, "cpu")
    calls, generate = [], runner.model.generate

    def timed_generate(**kw):
        start = time.perf_counter()
        out = generate(**kw)
        calls.append((time.perf_counter() - start, out.shape[1] - kw["input_ids"].shape[1]))
        return out

    runner.model.generate = timed_generate
    passes: dict[str, list[float]] = {"lm": [], "head": []}  # each forward of the language model and lm_head
    for key, module in (("lm", runner.model.model.language_model), ("head", runner.model.lm_head)):
        def forward(*a, _forward=module.forward, _key=key, **kw):
            start = time.perf_counter()
            out = _forward(*a, **kw)
            passes[_key].append(time.perf_counter() - start)
            return out

        module.forward = forward
    image = probe_image(Image.new("RGB", (64, 64), (90, 90, 90)), "min")
    started = time.perf_counter()
    p = runner.profile(image, "Which organ is shown?", 4)
    wall = time.perf_counter() - started
    ((seconds, new_tokens),) = calls  # one request, as transformers generated it: 1 + 4 tokens
    assert new_tokens == 5 and 0 < p["decode_s"] < seconds and p["encode_s"] < p["ttft_s"] and p["ttft_s"] + p["decode_s"] <= wall
    # prefill is the first pass of each (TTFT less the encode also held generate()'s own host work),
    # and none of the decode steps' passes
    assert len(passes["lm"]) == len(passes["head"]) == 5
    first = passes["lm"][0] + passes["head"][0]
    assert first <= p["prefill_s"] < min(first + passes["lm"][1], p["ttft_s"] - p["encode_s"])


def _reply_logits(model, proc, item):
    """Teacher-forced logits at the reply's positions, straight from a transformers model: (reply ids, logits)."""
    import torch

    prompt = proc.apply_chat_template(item.messages(), add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="pt")  # fmt: skip
    reply = proc.tokenizer(item.target_text() + "<|im_end|>", return_tensors="pt").input_ids
    n = prompt["input_ids"].shape[1]
    ids = torch.cat([prompt["input_ids"], reply], 1)
    mm = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(reply)], 1)
    hidden = []  # what the lm_head gets: projected here in fp32, as llama.cpp's logits are
    handle = model.lm_head.register_forward_hook(lambda m, args, out: hidden.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                  pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])  # fmt: skip
            logits = hidden[0][0, n - 1 : -1].float() @ model.lm_head.weight.float().T
    finally:
        handle.remove()
    return reply[0].tolist(), logits


@pytest.fixture(scope="module")
def independent_reference(trained_dir):
    """transformers' reply logits (fp32) for the bench's eval chats, computed from scratch once:
    (item, llama.cpp prompt text, reply ids, logits) per chat."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.bench.eval_set import eval_items
    from qoqopt.exports.gguf_runtime import MARKER
    from qoqopt.processor import load_processor

    proc = load_processor(trained_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=torch.float32).eval()
    out = []
    for item in eval_items("clinical", ITEMS, 0):
        reply_ids, ref = _reply_logits(model, proc, item)
        text = proc.apply_chat_template(item.messages(), add_generation_prompt=True, tokenize=False)
        out.append((item, text.replace("<|vision_start|><|image_pad|><|vision_end|>", MARKER), reply_ids, ref))
    return out


def _kld(ref, cand):
    """Per-position KL(ref || cand) by torch's kl_div in float64, and whether the top tokens agree."""
    import torch.nn.functional as F

    lp_ref, lp_cand = F.log_softmax(ref.double(), -1), F.log_softmax(cand.double(), -1)
    return F.kl_div(lp_cand, lp_ref, log_target=True, reduction="none").sum(-1), ref.argmax(-1) == cand.argmax(-1)


def _transformers_kld(model, proc, reference):
    """Per-position KLD from scratch and top-1 agreement: the reference's logits vs ``model``'s
    (a transformers model) over the same reply tokens, torch's kl_div."""
    import torch

    klds, same = [], []
    for item, _, reply_ids, ref in reference:
        ids, cand = _reply_logits(model, proc, item)
        assert ids == reply_ids
        kld, agree = _kld(ref, cand)
        klds.append(kld)
        same.append(agree)
    return torch.cat(klds).numpy(), torch.cat(same).numpy()


def _independent_kld(reference, gguf_text, mmproj, answer_tokens: int):
    """KLD from scratch: the reference's logits vs llama.cpp reply logits, torch's kl_div; and
    llama.cpp's greedy reply to each chat's prompt as transformers' chat template writes it."""
    import torch

    from qoqopt.exports.gguf_runtime import LlamaVL

    klds, same, replies = [], [], []
    with LlamaVL(gguf_text, mmproj, threads=1, image_min_tokens=TRAIN_TOKENS[0], image_max_tokens=TRAIN_TOKENS[1]) as vl:
        for item, text, reply_ids, ref in reference:
            kld, agree = _kld(ref, torch.from_numpy(vl.chat_logits(text, item.image, reply_ids)))
            klds.append(kld)
            same.append(agree)
            replies.append((item, vl.generate(text, item.image, max_tokens=answer_tokens)))
    return torch.cat(klds).numpy(), torch.cat(same).numpy(), replies


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_gguf_drift_matches_independent_computation(run_1t, independent_reference, quant):
    rec = _by_name(run_1t[0])[f"gguf:{quant}"]
    paths = {Path(f["path"]).name: Path(f["path"]) for f in rec["files"]}
    text = next(p for n, p in paths.items() if n.endswith(f".{quant}.gguf"))
    mmproj = next(p for n, p in paths.items() if n.startswith("mmproj-"))
    kld, same, replies = _independent_kld(independent_reference, text, mmproj, run_1t[0]["run"]["eval"]["answer_tokens"])
    a = rec["drift"]["all"]
    assert a["positions"] == len(kld)
    np.testing.assert_allclose(a["mean_kld"], kld.mean(), rtol=1e-5)
    np.testing.assert_allclose(a["p99_kld"], np.percentile(kld, 99), rtol=1e-5)
    assert a["same_top_pct"] == pytest.approx(100 * same.mean(), abs=1e-9)
    _assert_accuracy(rec["drift"], {item.domain: _set_f1(reply, item.answer) for item, reply in replies})


@pytest.mark.parametrize("variant", ["bf16", "gptq:4", "awq:4"])
def test_transformers_variants_drift_matches_independent_computation(run_1t, independent_reference, trained_dir,
                                                                     variant):
    """bf16: transformers loading the checkpoint in bf16. gptq:4 / awq:4: their builds as the format
    spec dequantizes them (benchmarks/spec_layout.py imports nothing from qoqopt), in transformers'
    fp32 model, as the bench runs them on a CPU: the bench's drift must be these models' KLD."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.processor import load_processor

    rec = _by_name(run_1t[0])[variant]
    if variant == "bf16":
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=torch.bfloat16).eval()
    else:
        model = _spec_model(trained_dir, Path(next(f["path"] for f in rec["files"] if f["path"].endswith("config.json"))).parent)
    kld, _ = _transformers_kld(model, load_processor(trained_dir), independent_reference)
    a = rec["drift"]["all"]
    assert a["positions"] == len(kld) and kld.mean() > 0
    np.testing.assert_allclose(a["mean_kld"], kld.mean(), rtol=1e-3)
    # the variant's own greedy answers (the reference's score in their place passed before: helper-66)
    _assert_accuracy(rec["drift"], _greedy_scores(model, load_processor(trained_dir), run_1t[0]["run"]["eval"]["answer_tokens"]))


def _spec_model(trained_dir: Path, build: Path):
    """transformers' fp32 model of the checkpoint holding a GPTQ/AWQ build's weights as the format
    spec dequantizes them (benchmarks/spec_layout.py imports nothing from qoqopt)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from benchmarks.spec_layout import spec_state
    from qoqopt.loader import canonical_name, runtime_name

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=torch.float32).eval()
    stored, packed = spec_state(build)
    params = model.state_dict()
    with torch.no_grad():
        for key, t in stored.items():
            params[runtime_name(canonical_name(key))].copy_(t)
    assert len(packed) == 14  # every decoder linear of the 2-layer model
    return model


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes + accelerate not installed (qoqopt[bnb])")
def test_bnb_drift_matches_independent_computation(run_1t, run_2t, independent_reference, trained_dir):
    """bnb:nf4 is bitsandbytes' own quantization at load: the bench's drift must be what transformers +
    bitsandbytes give when called directly, and the language model's linears must really be 4-bit."""
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration

    from qoqopt.processor import load_processor

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), quantization_config=qc,
                                                               dtype=torch.bfloat16).eval()  # fmt: skip
    layers = model.model.language_model.layers
    linears = [m for layer in layers for m in (layer.mlp.gate_proj, layer.self_attn.q_proj)]
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    kld, same = _transformers_kld(model, load_processor(trained_dir), independent_reference)
    a = _by_name(run_2t[0])["bnb:nf4"]["drift"]["all"]
    assert a["positions"] == len(kld)
    np.testing.assert_allclose(a["mean_kld"], kld.mean(), rtol=1e-3)
    assert a["same_top_pct"] == pytest.approx(100 * same.mean(), abs=1e-9)
    # 4-bit strays well past bf16 rounding (same chats in both runs)
    assert a["mean_kld"] > 3 * _by_name(run_1t[0])["bf16"]["drift"]["all"]["mean_kld"]


def test_bnb_without_accelerate_is_a_one_line_error(tiny_dir, monkeypatch):
    """bitsandbytes alone is not enough: transformers loads bnb models through accelerate."""
    from qoqopt.bench import hf_runner
    from qoqopt.bench.variants import parse_variants
    from qoqopt.errors import QoqoptError

    assert (hf_runner.missing_bnb_packages() == []) == HAVE_BNB
    monkeypatch.setattr(hf_runner, "missing_bnb_packages", lambda: ["accelerate"])
    with pytest.raises(QoqoptError, match=r"^bnb variants need accelerate \(pip install 'qoqopt\[bnb\]'\)$"):
        hf_runner.load_hf(tiny_dir, parse_variants("bnb:nf4")[0], {}, "cpu")


def test_failed_variant_is_recorded_and_the_rest_run(run_2t):
    """The truncated Q4_K_M is named before the reference runs, the others still run, and the exit
    status is 1 with the failures named."""
    v, out, err = _by_name(run_2t[0]), run_2t[2].stdout, run_2t[2].stderr
    assert v["gguf:Q4_K_M"]["status"] == "failed" and v["gguf:Q4_K_M"]["error"]
    assert out.index("note: gguf:Q4_K_M cannot run and is recorded as failed: ") < out.index("reference: ")
    assert err.rstrip().splitlines()[-1] == (f"error: {run_2t[3]} of 3 variants failed (gguf:Q4_K_M"
                                             f"{'' if HAVE_BNB else ', bnb:nf4'}); {run_2t[1].name} records why")
    assert v["gguf:Q8_0"]["status"] == "ok"
    if not HAVE_BNB:  # `make test` installs it (qoqopt[bnb]); a bare `pip install -e .[test]` does not
        assert v["bnb:nf4"]["status"] == "failed" and "pip install 'qoqopt[bnb]'" in v["bnb:nf4"]["error"]
    else:
        assert v["bnb:nf4"]["status"] == "ok", v["bnb:nf4"].get("error")
    assert run_2t[0]["run"]["machine"]["label"] == "cpu 2 threads" and run_2t[0]["run"]["machine"]["threads"] == 2


def test_report_merges_the_two_runs(run_1t, run_2t, tmp_path):
    res = run_cli("report", str(run_1t[1]), str(run_2t[1]), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    label_1t = run_1t[0]["run"]["machine"]["label"]
    assert f"| {label_1t} | gguf:Q8_0 |" in md and "| cpu 2 threads | gguf:Q8_0 |" in md
    assert "cpu 2 threads: `gguf:Q4_K_M`" in md  # the failure, with its error
    for png in ["drift_vs_size.png", "speed.png", "domain_drift.png"]:
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_answer_tokens_0_measures_the_same_drift_without_answers(run_1t, trained_dir, tmp_path):
    """`--answer-tokens 0` is drift only (llama-perplexity's --kl-divergence pass): no greedy answers,
    so no accuracy and nothing unboxed, and the KLDs of the same chats those of the run that answered
    (teacher-forced logits do not depend on the answers); the report says why accuracy is empty."""
    builds = Path(run_1t[1]).parent / "builds"
    result, path, _ = _bench(trained_dir, tmp_path / "o", "--variants", "gguf:Q8_0", "--threads", "1", "--no-speed",
                             "--answer-tokens", "0", "--builds", str(builds))  # fmt: skip
    assert result["run"]["eval"]["answer_tokens"] == 0
    (before,), (now,) = ([v for v in r["variants"] if v["name"] == "gguf:Q8_0"] for r in (run_1t[0], result))
    assert now["files"] == before["files"] and now["unboxed"] == 0
    for domain, drift in now["drift"].items():
        assert drift["accuracy"] is None and before["drift"][domain]["accuracy"] is not None
        assert drift["mean_kld"] == pytest.approx(before["drift"][domain]["mean_kld"], rel=1e-6)
    assert all(d["accuracy"] is None for d in result["variants"][0]["drift"].values())  # the reference's too
    res = run_cli("report", str(path), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "; eval set `clinical`, seed 0. No answers were asked for (`--answer-tokens 0`): drift only." in md
    assert "One answer moves accuracy" not in md


def test_the_next_step_bench_prints_runs_as_printed_and_again_after_a_second_run(run_1t, tmp_path):
    """bench ends with the `qoqopt report` command for its results. Followed as printed (the shell
    expanding the glob) it writes the report; after a second run into the same folder, the command
    printed then (with --force) does too, where the first one's is refused by report."""
    import glob
    import shlex

    from qoqopt.commands.bench import next_step

    (line,) = [ln for ln in run_1t[2].stdout.splitlines() if ln.startswith("next: ")]
    assert line == f"next: {next_step(run_1t[1])}" and " --force" not in line
    copy = tmp_path / run_1t[1].name
    shutil.copy(run_1t[1], copy)

    def follow(command: str):
        argv = [a for word in shlex.split(command) for a in (sorted(glob.glob(word)) if "*" in word else [word])]
        assert argv[0] == "qoqopt"
        return run_cli(*argv[1:])

    first = next_step(copy)
    assert follow(first).returncode == 0 and (tmp_path / "report" / "report.md").is_file()
    again = next_step(copy)
    assert again == first + " --force"
    assert follow(first).returncode == 2 and follow(again).returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "gguf:Q9_X"], "unknown quant type"),
        (["--variants", "int3"], "unknown variant 'int3'"),
        (["--variants", "bf16,bf16"], "more than once"),
        (["--variants", "bf16", "--from", "{tmp}"], "not an export directory"),
        (["--variants", "bf16", "--from", "me/not-cached"],
         "--from me/not-cached: no such directory; as a Hub id: cannot get me/not-cached: HF_HUB_OFFLINE is set"),
        (["--variants", "bf16", "--eval", "{tmp}/bad.jsonl"], "bad.jsonl:1"),
        (["--variants", "bf16", "--items", "0"], "--items must be at least 1"),
        # a | split the label into two columns of the report's speed table, and the rows after it
        (["--variants", "bf16", "--label", "ward 3 | A100"], "argument --label: expected text without | or ` or control characters, got 'ward 3 | A100' (it has '|')"),
    ],
)
def test_bad_input_one_line_error(tiny_dir, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"image": "nope.png"}\n')
    out = tmp_path / "out"
    res = run_cli("bench", str(tiny_dir), "--out", str(out), *[a.format(tmp=tmp_path) for a in args])
    assert res.returncode != 0
    assert message in error_line(res)
    assert not out.exists()


def test_a_stopped_bench_leaves_no_empty_output_folder(tiny_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the reference pass: the --out folder the run made (and the parents it made) is
    gone again, as is its work folder (an empty OUT/ was left); one that was there before stays. A
    work folder a killed bench left (the reference's logits: hundreds of MB at 7B) is removed by the
    next run into the same --out."""
    import os
    import subprocess

    from qoqopt.bench import run
    from qoqopt.bench.variants import parse_variants
    from qoqopt.leftovers import tmp_prefix

    def stopped(job, work, tag):
        assert work.parent.is_dir() and work.is_dir()  # the run's folders exist while it works
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_run_worker", stopped)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process has now
    ours = tmp_prefix(tmp_path / "bench").replace(f".p{os.getpid()}-", f".p{dead.pid}-")
    (tmp_path / f"{ours}abc.tmp").mkdir()
    (tmp_path / f"{ours}abc.tmp" / "reference.npz").write_bytes(b"z" * 2000)
    for out in (tmp_path / "new" / "deeper" / "out", tmp_path):
        with pytest.raises(KeyboardInterrupt):
            run.run_bench(run.BenchOptions(model=str(tiny_dir), variants=parse_variants("bf16"), out=out, items=1))
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.endswith(f"note: removed 2.0 kB that an interrupted run left in {tmp_path}\n")


def test_bench_refuses_builds_of_another_checkpoint(run_1t, trained_dir, tiny_dir, tmp_path, capsys):
    """A build is benched against the checkpoint it was made from, or not at all: the trained mini's
    builds against the untrained one (same config, same tensor names and shapes) gave KLD 9.2 and
    "accuracy 1.00" beside a reference at 0.00. The check is by content, so a copy of the source
    passes; builds whose manifest predates content fingerprints get a note."""
    from qoqopt.bench.run import _check_sources
    from qoqopt.loader import open_checkpoint

    builds = Path(run_1t[1]).parent / "builds"
    (gguf_dir,), gptq_dir = builds.glob("gguf-*"), builds / "gptq-4bit"
    for variant, build in (("gguf:Q8_0", gguf_dir), ("gptq:4", gptq_dir)):
        argv = ["bench", tiny_dir, "--variants", variant, "--from", build, "--out", tmp_path / "o"]
        err = refused(argv, capsys)
        assert f"{variant}: {build} was built from {trained_dir} (sha256-v2:" in err and f"not from {tiny_dir} (" in err
    assert not (tmp_path / "o").exists()
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in trained_dir.iterdir():
        (copy / f.name).symlink_to(f)
    found = {"gguf:Q8_0": {"text": next(gguf_dir.glob("*.Q8_0.gguf"))}, "gptq:4": {"dir": gptq_dir}}
    notes = []
    _check_sources(str(copy), open_checkpoint(str(copy)).fingerprint, found, notes.append)
    assert notes == []
    for name, recorded in (("none", None), ("headers-only", "sha256:042d5c2b4f1e9a7d")):  # earlier manifests
        manifest = json.loads((gptq_dir / "manifest.json").read_text())
        manifest["source"]["fingerprint"] = recorded
        old = tmp_path / name
        shutil.copytree(gptq_dir, old)
        (old / "manifest.json").write_text(json.dumps(manifest))
        _check_sources(str(tiny_dir), "sha256-v2:0", {"gptq:4": {"dir": old}}, notes.append)
        assert notes.pop() == (f"note: {old} is an older build whose manifest records no content fingerprint: "
                               f"cannot check that gptq:4 was built from {tiny_dir}")  # fmt: skip


def test_an_earlier_runs_build_is_reused_only_if_this_run_would_make_it(run_1t, trained_dir, tiny_dir, tmp_path):
    """OUT/builds is bench's own cache, matched on format and type: a build of the model benched
    before into the same --out stopped the next model's run ("was built from ..."), and one made
    with other --calib-items was measured as this run's. Each cached build is now checked against its
    manifest (the export's record of its source and calibration) and built again where it differs."""
    from qoqopt.bench.run import BenchOptions, _cached_builds
    from qoqopt.bench.variants import parse_variants
    from qoqopt.loader import open_checkpoint

    cache = Path(run_1t[1]).parent / "builds"
    manifests = {p.name: json.loads((p / "manifest.json").read_text()) for p in cache.iterdir()}
    (gguf,) = [name for name in manifests if name.startswith("gguf-")]
    assert manifests[gguf]["imatrix"]["chunks"] == manifests["gptq-4bit"]["calibration"]["chats"] == 8  # _bench's
    trained = open_checkpoint(str(trained_dir)).fingerprint
    variants = parse_variants("gguf:Q4_K_M,gguf:Q8_0,gptq:4,bf16")
    wanted = {v.name: None for v in variants if v.name != "bf16"}

    def cached(fingerprint: str, calib_items: int, found=wanted) -> tuple[dict, list[str]]:
        notes: list[str] = []
        opts = BenchOptions(model="m", variants=variants, out=tmp_path, calib_items=calib_items)
        return _cached_builds(opts, cache, found, fingerprint, notes.append), notes

    hits, notes = cached(trained, 8)
    assert notes == [] and {n: h.get("dir") or h["text"].parent for n, h in hits.items()} == {
        "gguf:Q4_K_M": cache / gguf, "gguf:Q8_0": cache / gguf, "gptq:4": cache / "gptq-4bit"}
    hits, notes = cached(trained, 16)  # Q8_0 takes no imatrix: its build is what --calib-items 16 makes too
    assert hits.keys() == {"gguf:Q8_0"} and sorted(notes) == [
        f"note: {cache / gguf} was calibrated on 8 chats, not --calib-items 16: gguf:Q4_K_M is built again",
        f"note: {cache / 'gptq-4bit'} was calibrated on 8 chats, not --calib-items 16: gptq:4 is built again"]
    hits, notes = cached(open_checkpoint(str(tiny_dir)).fingerprint, 8)
    assert hits == {} and len(notes) == 3
    assert all(f" was made from {trained_dir}, not this one: " in n for n in notes), notes
    assert cached(trained, 16, found={**wanted, "gptq:4": {"dir": tmp_path}})[0].keys() == {"gguf:Q8_0"}  # --from wins
    plain = dict(manifests[gguf], imatrix=None)  # as `export --imatrix none` writes it: not what bench makes
    (cache / gguf / "manifest.json").write_text(json.dumps(plain))
    try:
        hits, notes = cached(trained, 8)
    finally:
        (cache / gguf / "manifest.json").write_text(json.dumps(manifests[gguf]))
    assert hits.keys() == {"gguf:Q8_0", "gptq:4"} and notes == [
        f"note: {cache / gguf} was not calibrated on the built-in clinical set, as bench's own builds are: gguf:Q4_K_M is built again"]


def test_a_gguf_another_tool_made_is_benched_beside_qoqopts_by_its_file(run_1t, trained_dir, tmp_path, capsys):
    """`gguf:FILE.gguf` benches a GGUF with no qoqopt manifest (llama.cpp's converter's, a download),
    its mmproj the one beside it. The same bytes as qoqopt's Q8_0, under another tool's folder and
    names, give the same drift chat for chat; the run says its origin cannot be checked. A file
    without one mmproj beside it, or of another model's dims, is refused in one line before the
    reference pass. A file a qoqopt build's manifest lists is checked as that build is."""
    from gguf import GGUFWriter

    (build,) = (Path(run_1t[1]).parent / "builds").glob("gguf-*")
    ours_by_file = next(build.glob("*.Q8_0.gguf"))
    other = tmp_path / "llama.cpp"
    other.mkdir()
    text = other / "mini-Q8_0.gguf"
    shutil.copy(ours_by_file, text)
    shutil.copy(next(build.glob("mmproj-*.gguf")), other / "mmproj-mini-f16.gguf")
    (other / "manifest.json").write_text("{}")  # another tool's, or a damaged one: no manifest lists the file
    result, _, res = _bench(trained_dir, tmp_path / "o", "--variants", f"gguf:Q8_0,gguf:{text},gguf:{ours_by_file}",
                            "--threads", "1", "--no-speed", "--answer-tokens", "0", "--from", str(build))  # fmt: skip
    ours, theirs, by_file = (_by_name(result)[n] for n in ("gguf:Q8_0", "gguf:mini-Q8_0.gguf", f"gguf:{ours_by_file.name}"))
    assert theirs["status"] == "ok" and theirs["built_from"] == {} and [f["path"] for f in theirs["files"]] == [
        str(text), str(other / "mmproj-mini-f16.gguf")]
    assert theirs["drift"]["all"]["chat_kld"] == by_file["drift"]["all"]["chat_kld"] == ours["drift"]["all"]["chat_kld"]
    assert by_file["built_from"] == ours["built_from"] and by_file["built_from"]["fingerprint"].startswith("sha256-v2:")
    notes = [ln for ln in res.stdout.splitlines() if " is not a qoqopt build" in ln]
    assert notes == [f"note: gguf:mini-Q8_0.gguf is not a qoqopt build (no manifest lists it): its dims are {trained_dir}'s, "
                     "but which checkpoint it was made from cannot be checked (a base model's build has the same dims)"]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(text, alone / "m.gguf")
    argv = ["bench", trained_dir, "--variants", f"gguf:{alone / 'm.gguf'}", "--out", tmp_path / "o2"]
    assert refused(argv, capsys) == (f"error: gguf:{alone / 'm.gguf'}: no mmproj*.gguf file beside it; name the one to use: "
                                     f"gguf:{alone / 'm.gguf'}+MMPROJ.gguf")  # fmt: skip
    deeper = GGUFWriter(tmp_path / "deeper.gguf", "qwen2vl")
    deeper.add_block_count(3)
    deeper.write_header_to_file()
    deeper.write_kv_data_to_file()
    deeper.close()
    argv[3] = f"gguf:{tmp_path / 'deeper.gguf'}+{other / 'mmproj-mini-f16.gguf'}"
    assert refused(argv, capsys) == ("error: gguf:deeper.gguf: deeper.gguf has qwen2vl.block_count 3, the source "
                                     "checkpoint 2: not a build of this model")  # fmt: skip
    argv[3] = f"gguf:{tmp_path / 'a file.gguf'}+{other / 'mmproj-mini-f16.gguf'}"
    shutil.copy(text, tmp_path / "a file.gguf")
    assert "rename the file to letters, digits and . _ - + only: gguf:a file.gguf names the variant" in refused(argv, capsys)
    assert not (tmp_path / "o2").exists()


def test_a_given_gguf_in_parts_is_all_its_parts(run_1t, tmp_path):
    """A split text GGUF given by its first part is measured, sized and hashed as all its parts, as
    llama.cpp loads them (found from the first part's name and split.count); a later part given as
    the first is refused. A "+" in a folder's name is part of the path, not the mmproj's separator."""
    from qoqopt.bench.given_gguf import given_files
    from qoqopt.errors import QoqoptError
    from qoqopt.exports.gguf_split import split_gguf

    (build,) = (Path(run_1t[1]).parent / "builds").glob("gguf-*")
    folder = tmp_path / "c++"
    folder.mkdir()
    shutil.copy(next(build.glob("*.Q8_0.gguf")), folder / "m.gguf")
    shutil.copy(next(build.glob("mmproj-*.gguf")), folder / "mmproj-m.gguf")
    parts = [p for p, _ in split_gguf(folder / "m.gguf", (folder / "m.gguf").stat().st_size // 2)]
    assert len(parts) >= 2
    files = given_files(str(parts[0]))
    assert list(files.values()) == [*parts, folder / "mmproj-m.gguf"]
    assert list(files)[:2] == ["text", "text part 2"]
    assert given_files(f"{parts[0]}+{folder / 'mmproj-m.gguf'}") == files
    with pytest.raises(QoqoptError, match=f"{parts[1].name} is part 2 of {len(parts)} of a split GGUF; give its first part"):
        given_files(str(parts[1]))


def test_missing_model(tmp_path):
    res = run_cli("bench", str(tmp_path / "nothing"), "--variants", "bf16", "--out", str(tmp_path / "o"))
    assert error_line(res) == f"error: {tmp_path / 'nothing'}: no such directory, and not a Hub id of the form owner/name"
    assert not (tmp_path / "o").exists()


def test_cuda_refused_without_gpu(tiny_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = run_cli("bench", str(tiny_dir), "--variants", "bf16", "--device", "cuda", "--out", str(tmp_path / "o"))
    assert "no CUDA GPU" in error_line(res)


def test_an_fp32_model_turns_off_cudnns_tf32(tiny_dir, monkeypatch):
    """torch's default leaves cuDNN convolutions on TF32 (torch.backends.cudnn.allow_tf32 is True): on
    a GPU the fp32 reference's patch embedding (a Conv3d) would be ~1e-3 off, read as drift. A bf16
    model leaves the switch as it was."""
    import torch

    from qoqopt.calibration import load_hf_model

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    load_hf_model(tiny_dir, "bfloat16", "cpu")
    assert torch.backends.cudnn.allow_tf32
    load_hf_model(tiny_dir, "float32", "cpu")
    assert not torch.backends.cudnn.allow_tf32


def test_gguf_on_a_cpu_llama_cpp_under_cuda_is_said_up_front(monkeypatch):
    """--device cuda with the CPU-only llama-cpp-python PyPI's sdist builds (llama.cpp's own answer,
    llama_supports_gpu_offload): the GGUF variants are named, with the rebuild for this version.
    Nothing is said under --device cpu, without GGUF variants, or with a GPU build."""
    import llama_cpp

    from qoqopt.bench import run
    from qoqopt.bench.variants import parse_variants
    from qoqopt.exports import gguf_runtime

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python offloads to a GPU")

    def said(variants: str, device: str) -> list[str]:
        lines: list[str] = []
        run._say_gguf_on_cpu(run.BenchOptions("m", parse_variants(variants), Path("o"), device=device), lines.append)
        return lines

    (note,) = said("bf16,gguf:Q4_K_M,gguf:Q8_0", "cuda")
    assert note.startswith("note: gguf:Q4_K_M, gguf:Q8_0 will run on the CPU: this llama-cpp-python was built without GPU")
    assert note.endswith(f'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir --no-deps '
                         f"llama-cpp-python=={llama_cpp.__version__}")  # fmt: skip
    assert said("bf16,gguf:Q4_K_M", "cpu") == said("bf16,gptq:4", "cuda") == []
    monkeypatch.setattr(gguf_runtime, "gpu_offload_available", lambda: True)
    assert said("gguf:Q4_K_M", "cuda") == []


def test_a_gguf_bench_on_a_gpu_node_runs_on_one_gpu_as_transformers_does(monkeypatch, tmp_path):
    """transformers' variants run on cuda:0; llama.cpp's default (split_mode LAYER) spreads a model over
    every visible GPU, so on an 8-GPU node the GGUF rows timed a pipeline against one GPU. The bench
    asks llama-cpp-python for one GPU (split_mode NONE, main_gpu 0: its own names); `ask` keeps
    llama.cpp's default, where a model too big for one GPU still loads."""
    import llama_cpp

    from qoqopt.bench import gguf_runner
    from qoqopt.exports import gguf_runtime

    asked = []

    class Loaded(Exception):
        pass

    def llama(path, **kwargs):
        asked.append(kwargs)
        raise Loaded

    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "m.gguf", "qwen2vl")  # a header to size the context from (bench reads it first)
    writer.add_context_length(8192)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        write()
    monkeypatch.setattr(gguf_runner, "gpu_offload_available", lambda: True)
    monkeypatch.setattr(llama_cpp, "Llama", llama)
    with pytest.raises(Loaded):
        gguf_runner.GGUFRunner(tmp_path / "m.gguf", tmp_path / "mmproj.gguf", "cuda", 2)
    with pytest.raises(Loaded):
        gguf_runtime.LlamaVL(tmp_path / "m.gguf", gpu=True)
    bench, ask = asked
    assert (bench["n_gpu_layers"], bench["split_mode"], bench["main_gpu"]) == (-1, llama_cpp.LLAMA_SPLIT_MODE_NONE, 0)
    assert ask["n_gpu_layers"] == -1 and "split_mode" not in ask and "main_gpu" not in ask


def test_ask_uses_the_build_from_its_manifest(run_1t, tmp_path):
    """`qoqopt ask` finds the text GGUF and mmproj through manifest.json, and refuses clearly otherwise."""
    from PIL import Image

    (gguf_dir,) = (Path(run_1t[1]).parent / "builds").glob("gguf-*")
    res = run_cli("ask", str(gguf_dir), "--quant", "Q8_0", "--item", "ct-abd-pancreas.region_ct.eval-0")
    assert res.returncode == 0, res.stderr
    assert ".Q8_0.gguf + mmproj-" in res.stdout and "(reference: Abdomen)" in res.stdout
    assert res.stderr == ""  # none of llama.cpp's loader chatter, nor its Qwen-VL 1024-token warning
    res = run_cli("ask", str(gguf_dir), "--quant", "Q8_0", "--item", "ct-abd-pancreas.region_ct.eval-0", "--max-tokens", "3")
    assert res.returncode == 0 and "answer    None" in res.stdout  # cut off before the \\boxed{} the full reply has
    assert res.stderr.startswith("note: the reply holds no \\boxed{} answer: if it was cut off, ask again with a larger "
                                 "--max-tokens (this one: 3;")
    res = run_cli("ask", str(gguf_dir), "--quant", "Q5_K_M", "--item", "ct-abd-pancreas.region_ct.eval-0")
    assert error_line(res).endswith("has no text GGUF of type Q5_K_M (it has: Q4_K_M, Q8_0)"), res.stderr
    # a published build downloaded one quant at a time, as its card says (Q8_0 here): ask takes the one
    # that is here, not the build's default Q4_K_M, which it refused as a damaged copy of the whole build
    one = tmp_path / "one-quant"
    one.mkdir()
    manifest = json.loads((gguf_dir / "manifest.json").read_text()) | {"published": True}
    for entry in manifest["files"]:
        if entry.get("quant") != "Q4_K_M" and entry["path"] != "manifest.json":
            (one / entry["path"]).symlink_to(gguf_dir / entry["path"])
    (one / "manifest.json").write_text(json.dumps(manifest))
    item = ["--item", "ct-abd-pancreas.region_ct.eval-0"]
    res = run_cli("ask", str(one), *item)
    assert ".Q8_0.gguf + mmproj-" in res.stdout and _asked(res) == _asked(run_cli("ask", str(gguf_dir), "--quant", "Q8_0", *item))
    assert "lists" in error_line(run_cli("ask", str(one), "--quant", "Q4_K_M", *item))  # asked for by name: still refused
    res = run_cli("ask", str(tmp_path), "--item", "ct-abd-pancreas.region_ct.eval-0")
    assert "has no manifest.json" in error_line(res)
    # a question past a fixed 4864-token context was refused; the model's own context is the limit now
    q8 = next(gguf_dir.glob("*.Q8_0.gguf"))
    trained = int(_llama_cpp_print_info(q8)["n_ctx_train"])  # as llama.cpp's loader reads it
    image = tmp_path / "scan.png"
    Image.new("RGB", (56, 56)).save(image)
    # past the old 4864; then past the model's context, in words of 2 bytes (one argument holds at most 128 KiB)
    for question, fits in (("scan " * 6000, True), ("a " * trained, False)):
        res = run_cli("ask", str(gguf_dir), "--quant", "Q8_0", "--image", str(image), "--question", question,
                      "--max-tokens", "2")  # fmt: skip
        assert (res.returncode == 0) == fits, res.stderr
    assert f"but the context holds {trained}: shorten the question or the reply" in error_line(res)
    res = run_cli("ask", str(gguf_dir), "--quant", "Q8_0", "--image", str(image), "--question", "scan",
                  "--max-tokens", str(trained))  # fmt: skip
    assert error_line(res) == f"error: --max-tokens {trained} leaves no room for the question in the model's context of {trained} tokens"


def test_ask_on_a_gguf_asks_with_the_builds_own_chat_template(run_1t, trained_dir, monkeypatch, capsys):
    """`ask` on a GGUF sends llama.cpp the chat its template (the checkpoint's, carried in the GGUF)
    writes, as transformers renders it: a fixed prompt put "You are a helpful assistant." first
    whatever system turn the checkpoint's template writes, unlike `bench` and the transformers
    builds. A template that loses the image or the question is one line."""
    from qoqopt.chat_template import gguf_prompt
    from qoqopt.cli import main
    from qoqopt.commands.data import builtin_item
    from qoqopt.errors import QoqoptError
    from qoqopt.exports import gguf_runtime
    from qoqopt.exports.gguf_verify import IMAGE_SPAN
    from qoqopt.processor import load_processor

    proc = load_processor(trained_dir)
    item = builtin_item("ct-abd-pancreas.region_ct.eval-0")
    sent = []

    class Recording(gguf_runtime.LlamaVL):
        def generate(self, prompt, image, max_tokens=32, **kw):
            sent.append(prompt)
            return "\\boxed{Abdomen}"

    monkeypatch.setattr(gguf_runtime, "LlamaVL", Recording)
    (gguf_dir,) = (Path(run_1t[1]).parent / "builds").glob("gguf-*")
    assert main(["ask", str(gguf_dir), "--quant", "Q8_0", "--item", item.id]) == 0
    transformers_chat = proc.apply_chat_template(item.messages(), add_generation_prompt=True, tokenize=False)
    assert sent == [transformers_chat.replace(IMAGE_SPAN, gguf_runtime.MARKER)]
    # a checkpoint's own system turn reaches llama.cpp as it reaches transformers
    template = proc.chat_template.replace("You are a helpful assistant.", "You are QoQ-Med. Reply in French.")
    assert template != proc.chat_template
    own = proc.apply_chat_template(item.messages(), chat_template=template, add_generation_prompt=True, tokenize=False)
    assert gguf_prompt(template, item.question, "x.gguf") == own.replace(IMAGE_SPAN, gguf_runtime.MARKER)
    assert "You are QoQ-Med. Reply in French." in own
    for broken in (template.replace("<|vision_start|><|image_pad|><|vision_end|>", ""), "{{ raise_exception('no') }}"):
        with pytest.raises(QoqoptError, match="^x.gguf's chat template ") as err:
            gguf_prompt(broken, item.question, "x.gguf")
        assert "\n" not in str(err.value)


def _llama_cpp_print_info(path: Path) -> dict[str, str]:
    """What llama.cpp's loader prints about a text GGUF (`print_info: n_layer = 2`, ...), by name."""
    import re
    import subprocess
    import sys

    code = "import sys; from llama_cpp import Llama; Llama(sys.argv[1], n_ctx=64, verbose=True)"
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return {k.strip(): v.strip() for k, v in re.findall(r"print_info: ([^=\n]+?)\s*= ([^\n]*)", res.stderr)}


def test_info_of_a_gguf_build_says_what_llama_cpp_loads(run_1t, trained_dir, tmp_path):
    """`qoqopt info` on a GGUF build reads manifest.json and the GGUF headers: per text GGUF, the
    parameter count, bits per weight and dims that llama.cpp's own loader reports for that file; the
    file `ask` uses by default is the one the Modelfile names; a listed file that is gone is MISSING,
    one shorter than its header says is CUT OFF."""
    (gguf_dir,) = (Path(run_1t[1]).parent / "builds").glob("gguf-*")
    res = run_cli("info", str(gguf_dir), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    texts = {f["quant"]: f for f in summary["files"] if f["kind"] == "text"}
    assert sorted(texts) == ["Q4_K_M", "Q8_0"]
    for quant, f in texts.items():
        seen = _llama_cpp_print_info(gguf_dir / f["path"])
        assert seen["model params"] == f"{f['params'] / 1e6:.2f} M", quant
        assert seen["file size"].endswith(f"({f['bpw']:.2f} BPW)"), (quant, seen["file size"])
    t = summary["text"]
    assert [seen[k] for k in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_ctx_train", "n_vocab")] == \
        [str(t[k]) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "context", "vocab")]  # fmt: skip
    assert seen["mrope sections"] == str(t["mrope_sections"])
    vision = json.loads((trained_dir / "config.json").read_text())["vision_config"]  # transformers' config
    assert summary["made_from"]["model"] == str(trained_dir)
    assert [summary["vision"][k] for k in ("depth", "hidden", "heads", "patch")] == \
        [vision[k] for k in ("depth", "hidden_size", "num_heads", "patch_size")]  # fmt: skip
    from_line = next(ln for ln in (gguf_dir / "Modelfile").read_text().splitlines() if ln.startswith("FROM "))
    assert from_line == f"FROM ./{texts[summary['default_quant']]['path']}"
    one = json.loads(run_cli("info", str(gguf_dir / texts["Q8_0"]["path"]), "--json").stdout)
    assert one["files"] == [texts["Q8_0"]] and one["text"] == t  # a file alone: the same, from its header
    source = ("revision", "fingerprint")
    assert {k: one["made_from"][k] for k in source} == {k: summary["made_from"][k] for k in source}
    assert one["made_from"]["model"] == "a local checkpoint"  # the file is uploaded as it is: no local path
    partial = tmp_path / "partial"
    shutil.copytree(gguf_dir, partial)
    (partial / texts["Q8_0"]["path"]).unlink()
    assert run_cli("info", str(partial)).returncode == 1  # a file missing alone (the usual broken download)
    q4 = partial / texts["Q4_K_M"]["path"]
    q4.write_bytes(q4.read_bytes()[: q4.stat().st_size - 1000])  # a download cut off in the tensor data
    res = run_cli("info", str(partial))
    out = res.stdout
    assert next(ln for ln in out.splitlines() if texts["Q8_0"]["path"] in ln).endswith("MISSING")
    assert f"CUT OFF: {q4.name} ends before its tensor data" in out
    assert res.returncode == 1  # a script checking a download by the exit status got 0


def _hub_repo(build: Path, hub: Path, repo_id: str) -> None:
    """`build` cached as a downloaded Hub repo less its Q4_K_M file, which the repo's listing names."""
    files = list(build.iterdir())
    cache_as_hub_repo(hub, repo_id, [f for f in files if not f.name.endswith(".Q4_K_M.gguf")], [f.name for f in files])


def test_ask_fetches_one_quant_of_a_hub_gguf_repo(run_1t, tmp_path, monkeypatch, capsys):
    """`qoqopt ask OWNER/NAME` on a GGUF repo fetches the manifest and configs, then the one text GGUF
    and the mmproj, not every quant: huggingface_hub, offline (tests never reach the Hub), serves
    Q8_0 from a cache that lacks the repo's Q4_K_M file, and says so when Q4_K_M is asked for."""
    from huggingface_hub import constants

    from qoqopt.cli import main

    (gguf_dir,) = (Path(run_1t[1]).parent / "builds").glob("gguf-*")
    _hub_repo(gguf_dir, tmp_path / "hub", "me/qoq-gguf")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    item = ["--item", "ct-abd-pancreas.region_ct.eval-0"]
    assert main(["ask", "me/qoq-gguf", "--quant", "Q8_0", "--revision", HUB_COMMIT, *item]) == 0
    assert ".Q8_0.gguf + mmproj-" in (out := capsys.readouterr().out) and "(reference: Abdomen)" in out
    err = refused(["ask", "me/qoq-gguf", "--revision", "v2", *item], capsys)
    assert err == "error: cannot get me/qoq-gguf: HF_HUB_OFFLINE is set and it is not in the local cache", err
    q4 = next(gguf_dir.glob("*.Q4_K_M.gguf")).name
    assert main(["info", "me/qoq-gguf", "--revision", HUB_COMMIT]) == 0  # from the manifest: nothing more fetched
    out = capsys.readouterr().out
    assert out.startswith("GGUF build   me/qoq-gguf") and "text         qwen2vl: " in out  # the cached Q8_0's header
    assert next(ln for ln in out.splitlines() if q4 in ln).endswith("not downloaded")
    err = refused(["ask", "me/qoq-gguf", "--quant", "Q4_K_M", *item], capsys, downloads=True)
    # the mmproj is in the cache: only the text GGUF is named
    assert err == f"error: cannot get {q4} from me/qoq-gguf: HF_HUB_OFFLINE is set and the local cache lacks it", err


def test_a_build_in_parts_answers_as_the_whole_file(run_1t, trained_dir, tmp_path, monkeypatch, capsys):
    """A Q8_0 written in parts (--split-max-size) replies as the bench's whole Q8_0 of the same model
    does (llama.cpp loads the parts as one); the Modelfile names every part in order, one FROM line
    each, as Ollama 0.30 and later merge them. From a Hub repo, ask fetches every part and names one
    the cache lacks; bench finds every part too (it fetches what it finds), and refuses a local build
    that lacks one."""
    from huggingface_hub import constants

    from qoqopt.bench.run import _fetch_from_hub
    from qoqopt.bench.variants import find_in, parse_variants
    from qoqopt.errors import QoqoptError

    (gguf_dir,) = (Path(run_1t[1]).parent / "builds").glob("gguf-*")
    split = tmp_path / "split"
    res = run_cli("export", str(trained_dir), "--format", "gguf", "--quant", "Q8_0", "--imatrix", "none",
                  "--split-max-size", "40M", "--name", "mini", "--out", str(split))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    parts = sorted(split.glob("mini.Q8_0-*-of-*.gguf"))
    assert len(parts) >= 2 and not (split / "mini.Q8_0.gguf").exists()
    card = (split / "README.md").read_text()
    from_lines = [ln for ln in (split / "Modelfile").read_text().splitlines() if ln.startswith("FROM ")]
    mmproj = next(split.glob("mmproj-*.gguf")).name
    assert from_lines == [f"FROM ./{p.name}" for p in parts] + [f"FROM ./{mmproj}"] and "Ollama 0.30 or later merges" in card
    assert f"put `{parts[0].name}` with its other parts and" in card  # LM Studio needs every part
    item = ["--item", "ct-abd-pancreas.region_ct.eval-0"]
    assert _asked(run_cli("ask", str(split), *item)) == _asked(run_cli("ask", str(gguf_dir), "--quant", "q8_0", *item))  # any case, as export takes it
    (found,) = [find_in(split, v) for v in parse_variants("gguf:Q8_0")]
    assert [p.name for k, p in found.items() if k.startswith("text")] == [p.name for p in parts]
    moved = shutil.move(parts[1], tmp_path / parts[1].name)
    with pytest.raises(QoqoptError, match=f"lists {parts[1].name}, which is missing: copy or download the whole build"):
        _fetch_from_hub(find_in(split, parse_variants("gguf:Q8_0")[0]), {}, print)  # a local build: nothing to fetch
    shutil.move(moved, parts[1])
    cache_as_hub_repo(tmp_path / "hub", "me/split", [f for f in split.iterdir() if f != parts[1]],
                      [f.name for f in split.iterdir()])  # fmt: skip
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    err = refused(["ask", "me/split", "--revision", HUB_COMMIT, *item], capsys, downloads=True)
    assert err == f"error: cannot get {parts[1].name} from me/split: HF_HUB_OFFLINE is set and the local cache lacks it", err


def test_bench_takes_builds_from_hub_repos(run_1t, trained_dir, tmp_path, monkeypatch, capsys):
    """`bench --from OWNER/NAME` (repos `qoqopt publish` uploaded) benches the builds their manifests
    list, fetching only the GGUF quant type benched; the result records the published files' sha256."""
    builds = Path(run_1t[1]).parent / "builds"
    (gguf_dir,), gptq_dir = builds.glob("gguf-*"), builds / "gptq-4bit"
    _hub_repo(gguf_dir, tmp_path / "hub", "me/qoq-gguf")
    _hub_repo(gptq_dir, tmp_path / "hub", "me/qoq-gptq")
    res = run_cli("bench", str(trained_dir), "--variants", "gguf:Q8_0,gptq:4", "--from", "me/qoq-gguf", "--from",
                  "me/qoq-gptq", "--items", "2", "--no-speed", "--threads", "1", "--out", str(tmp_path / "out"),
                  env={"HF_HUB_CACHE": str(tmp_path / "hub")})  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert ".Q8_0.gguf" in res.stdout and "from me/qoq-gguf" in res.stdout
    assert "fetching the me/qoq-gptq checkpoint" in res.stdout
    (result,) = (tmp_path / "out").glob("*.json")
    for name, build, count in (("gguf:Q8_0", gguf_dir, 2), ("gptq:4", gptq_dir, 2)):
        variant = _by_name(json.loads(result.read_text()))[name]
        assert variant["status"] == "ok", variant
        benched = {Path(f["path"]).name: f["sha256"] for f in variant["files"]}
        assert len(benched) == count and all(hashlib.sha256((build / n).read_bytes()).hexdigest() == sha
                                             for n, sha in benched.items()), benched  # fmt: skip
    assert not (tmp_path / "out" / "builds").exists()  # nothing was exported
    from huggingface_hub import constants

    cache_as_hub_repo(tmp_path / "hub", "me/plain", [trained_dir / "config.json"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    argv = ["bench", trained_dir, "--variants", "gguf:Q8_0", "--from", "me/plain", "--out", tmp_path / "o2"]
    assert "--from me/plain: the Hub repo has no manifest.json" in refused(argv, capsys)  # before any work


def _asked(res) -> str:
    """The reply `qoqopt ask` printed (it may span lines: <think> ... </think>, then \\boxed{})."""
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split("\nreply     ", 1)[1].split("\nanswer    ", 1)[0]


def _greedy_reply(model, folder: Path, item, near_tie: float = 0.0) -> str:
    """transformers' own greedy generate, with the processor of `folder`. With `near_tie`, only the
    reply up to its first token whose two best logits are closer than that: two runtimes that agree
    to ~1e-6 may pick either there, so on another CPU the rest of the reply may differ."""
    import torch

    from qoqopt.processor import load_processor

    proc = load_processor(folder)
    inputs = proc.apply_chat_template(item.messages(), add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=64, do_sample=False, repetition_penalty=1.0,
                             output_scores=True, return_dict_in_generate=True)  # fmt: skip
    ids = out.sequences[0, inputs["input_ids"].shape[1] :]
    best_two = [step[0].topk(2).values for step in out.scores]
    ties = [i for i, (a, b) in enumerate(best_two) if a - b < near_tie]
    if ties:
        return proc.decode(ids[: ties[0]], skip_special_tokens=True).lstrip()
    return proc.decode(ids, skip_special_tokens=True).strip()


def test_ask_runs_checkpoints_and_gptq_builds_in_transformers(run_1t, trained_dir, tmp_path, capsys):
    """`qoqopt ask` on a checkpoint replies as transformers' own greedy generate does; on a GPTQ build,
    as transformers does over the build's dequantized weights (checked against the format spec in
    test_quant_formats). GGUF-only and GPU-only options are refused in one line, and so is a build whose
    weights are not the bytes its manifest records."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.data import find_item

    item_id = "ct-abd-pancreas.region_ct.eval-0"
    item = find_item(item_id)
    (gptq_dir,) = (Path(run_1t[1]).parent / "builds").glob("gptq-*")
    res = run_cli("ask", str(trained_dir), "--item", item_id)
    assert "(transformers float32, cpu)" in res.stdout
    assert "Loading weights" not in res.stderr and "\r" not in res.stderr  # no bar when stderr is not a terminal
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=torch.float32).eval()
    assert _asked(res) == _greedy_reply(model, trained_dir, item)
    res = run_cli("ask", str(gptq_dir), "--item", item_id)
    assert "(transformers + qoqopt W4A16 (torch reference, float32), cpu)" in res.stdout
    spec = _spec_model(trained_dir, gptq_dir)  # the build as the GPTQ format dequantizes it, not as qoqopt does
    assert _asked(res) == _greedy_reply(spec, gptq_dir, item)
    assert "--quant picks a text GGUF" in refused(["ask", gptq_dir, "--quant", "Q8_0", "--item", item_id], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in refused(["ask", trained_dir, "--device", "cuda", "--item", item_id], capsys)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(gptq_dir, corrupt)
    (shard,) = corrupt.glob("*.safetensors")
    with open(shard, "r+b") as fh:  # one weight byte flipped: same size, loads, answers differently
        fh.seek(shard.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x40]))
    err = refused(["ask", corrupt, "--item", item_id], capsys)
    assert err.startswith(f"error: {shard.name} does not match the sha256 in manifest.json"), err
    # without qoqopt's manifest (another tool's GPTQ build, a Hub repo) it still runs in qoqopt's W4A16
    # layers: transformers' loader wanted optimum and died in a traceback
    foreign = tmp_path / "foreign"
    shutil.copytree(gptq_dir, foreign)
    (foreign / "manifest.json").unlink()
    res = run_cli("ask", str(foreign), "--item", item_id)
    assert "(transformers + qoqopt W4A16 (torch reference, float32), cpu)" in res.stdout, res.stderr
    assert _asked(res) == _greedy_reply(spec, gptq_dir, item)
    config = json.loads((foreign / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (foreign / "config.json").write_text(json.dumps(config))
    assert refused(["ask", foreign, "--item", item_id], capsys) == (
        f"error: {foreign} is a FP8 build (its config.json has a quantization_config): qoqopt runs GPTQ and AWQ "
        "builds and unquantized checkpoints")  # fmt: skip


def test_ask_through_llama_cpp_replies_as_transformers(trained_dir, tmp_path):
    """`qoqopt ask` on a GGUF build, through llama.cpp, gives transformers' greedy reply word for word
    (an F32 build: its logits agree to ~1e-6): the GGUF reply was compared with nothing, and a
    transposed or grey image passed (helper-66). A square CT slice and a wide ultrasound frame."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.data import find_item

    out = tmp_path / "f32"
    res = run_cli("export", str(trained_dir), "--format", "gguf", "--quant", "F32", "--imatrix", "none", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=torch.float32).eval()
    for item_id in ("ct-abd-pancreas.region_ct.eval-0", "us-lymph-doppler.modality.eval-0"):
        reply = _asked(run_cli("ask", str(out), "--item", item_id))
        whole = _greedy_reply(model, trained_dir, find_item(item_id))
        upto = _greedy_reply(model, trained_dir, find_item(item_id), 1e-3)
        # word for word up to a near-tie (here the closest two logits differ by 0.056 and 3.2), a prefix after it;
        # without one, the whole reply: no more (llama.cpp going on past transformers' end of reply), no less
        assert reply == whole if upto == whole else reply.startswith(upto), item_id


def test_user_jsonl_eval_set(tiny_dir, tmp_path):
    """--eval FILE.jsonl: the user's own DICOMs and questions, domains taken from the file."""
    from pydicom.data import get_testdata_file

    rows = [
        {"dicom": get_testdata_file("CT_small.dcm"), "question": "Which body region is shown?", "answer": "Spine", "domain": "ct"},
        {"dicom": get_testdata_file("MR_small.dcm"), "question": "Which modality is this?", "answer": "MRI", "domain": "mri"},
    ]  # fmt: skip
    user_set = tmp_path / "DOE_JOHN_MRN12345" / "DOE_JOHN_MRN12345.jsonl"  # hospitals name files after patients
    user_set.parent.mkdir()
    user_set.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result, _, _ = _bench(tiny_dir, tmp_path / "out", "--variants", "bf16", "--eval", str(user_set),
                          "--no-speed", "--threads", "1", "--answer-tokens", "16")  # fmt: skip
    # (the random-weight model never ends its answer: 16 tokens, not 1024, of each reply are enough here)
    assert result["run"]["eval"]["domains"] == {"ct": 1, "mri": 1}
    # results travel between sites and onto cards: the set goes by its sha256, not its path or name
    assert result["run"]["eval"]["source"] == f"a user JSONL set (sha256 {hashlib.sha256(user_set.read_bytes()).hexdigest()[:12]})"
    assert "MRN12345" not in json.dumps(result)
    # the set's content and the chats chosen, for `report` to compare drift only from the same chats
    ev = result["run"]["eval"]
    assert len(ev["sha256"]) == 64 and len(ev["ids_sha256"]) == 64 and ev["only_domains"] is None
    bf16 = _by_name(result)["bf16"]
    assert bf16["status"] == "ok" and set(bf16["drift"]) == {"all", "ct", "mri"} and bf16["speed"]["peak_host_mb"] > 0
    assert "prefill_tok_s" not in bf16["speed"]


def test_a_chat_that_fails_in_a_runtime_is_named(tmp_path):
    """The worker's error is the one line a failed variant keeps: it names the chat it failed on."""
    from qoqopt.bench.worker import reference_pass
    from qoqopt.data import clinical_set

    items = clinical_set("eval", n_per_base=1)[:3]

    class Refusing:
        def reference_chat(self, item):
            if item is items[1]:
                raise ValueError("absolute aspect ratio must be smaller than 200")
            return np.zeros((1, 4), np.float32), {"reply_ids": [0]}

        def answer(self, item, chat, n):
            return "\\boxed{x}"

    with pytest.raises(RuntimeError, match=rf"^on chat {re.escape(items[1].id)} \({re.escape(Path(items[1].source).name)}\): "
                                          "ValueError: absolute aspect ratio"):  # fmt: skip
        reference_pass(Refusing(), items, {"answer_tokens": 4, "ref_dir": str(tmp_path)}, Counter())


def test_non_finite_logits_fail_the_variant_naming_the_chat(tmp_path):
    """A build whose logits hold NaN or inf (fp16 overflow, a poisoned scale) failed no check: its
    KLD was NaN, which the report shows as "–" (not measured) rather than as broken."""
    from qoqopt.bench.worker import reference_pass, variant_pass
    from qoqopt.data import clinical_set

    items = clinical_set("eval", n_per_base=1)[:2]
    logits = np.zeros((2, 4), np.float32)

    class Runner:
        def reference_chat(self, item):
            return logits.copy(), {"reply_ids": [0, 1]}

        def reply_logits(self, item, chat):
            return np.where(np.arange(4) == 2, np.nan if item is items[1] else 0.0, logits).astype(np.float32)

        def answer(self, item, chat, n):
            return "\\boxed{x}"

    job = {"answer_tokens": 4, "ref_dir": str(tmp_path), "variant": {"name": "gptq:4"}}
    reference_pass(Runner(), items, job, Counter())
    with pytest.raises(RuntimeError, match=rf"^on chat {re.escape(items[1].id)} .*: 2 of 8 logits are NaN or infinite"):
        variant_pass(Runner(), items, job, Counter())
    logits[1, 3] = np.inf  # a reference with one is refused too
    with pytest.raises(RuntimeError, match=rf"^on chat {re.escape(items[0].id)} .*: 1 of 8 logits are NaN or infinite"):
        reference_pass(Runner(), items, job, Counter())


def test_the_workers_warnings_reach_the_user_once(tmp_path, capsys, monkeypatch):
    """A worker's stderr is captured (for its last line if it dies); its warnings, such as a 16-bit
    eval image shown dark, are passed on, each once, without the progress bars around them."""
    import subprocess

    from qoqopt.bench import run

    warning = "warning: scan.png is a 16-bit image that uses at most 12 bits: it is shown dark"

    def fake_worker(argv, **kw):
        (tmp_path / "v.result.json").write_text('{"status": "ok"}')
        return subprocess.CompletedProcess(argv, 0, None, f"ref:  10%|#   |\r{warning}\nref: 50%|##  |\r{warning}\n")

    monkeypatch.setattr(run.subprocess, "run", fake_worker)
    assert run._run_worker({}, tmp_path, "v") == {"status": "ok"}
    assert capsys.readouterr().err == warning + "\n"


OOM = r"signal SIGKILL; killed from outside, often by the kernel's out-of-memory killer\)"


@pytest.mark.parametrize("sig, said", [("SIGSEGV", r"signal SIGSEGV\)"), ("SIGKILL", OOM)])
def test_a_worker_killed_by_a_signal_names_it(tmp_path, monkeypatch, sig, said):
    """A worker that dies (a crash in a runtime, the out-of-memory killer on a 7B) fails its variant
    with the signal's name and the last line it wrote, not a bare number."""
    from qoqopt.bench import run

    crash = f"import os, signal, sys; print('loading the model', file=sys.stderr); os.kill(os.getpid(), signal.{sig})"
    monkeypatch.setattr(run, "python_module", lambda *args: [sys.executable, "-c", crash])
    got = run._run_worker({}, tmp_path, "v")
    assert got["status"] == "failed" and re.fullmatch(rf"worker died \({said}: loading the model", got["error"]), got


def test_no_runnable_variant_is_refused_before_the_reference(tiny_dir, tmp_path):
    """A --from build cut short (or missing a file) is found from its manifest before anything runs:
    with no variant left, bench refuses in one line instead of spending the reference pass first
    and then exiting 0."""
    build = _listed_gguf_build(tmp_path / "build", text_bytes=50)
    res = run_cli("bench", str(tiny_dir), "--variants", "gguf:Q8_0", "--from", str(build), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "reference: " not in res.stdout
    assert error_line(res) == ("error: no variant can run, so there is nothing to compare: gguf:Q8_0: m.Q8_0.gguf is "
                               "50 bytes but manifest.json records 100: an incomplete download or copy")
    assert not list((tmp_path / "out").glob("bench-*.json"))


def test_domain_narrows_the_eval_chats():
    """`bench --domain ct` measures a CT-only service on CT chats only; a domain the set lacks is one line."""
    from qoqopt.bench.eval_set import eval_items
    from qoqopt.data import clinical_set
    from qoqopt.errors import QoqoptError

    pool = clinical_set(split="eval", n_per_base=4, seed=0)
    chosen = eval_items("clinical", 6, render=False, domains=["ecg", "xray"])
    assert {it.domain for it in chosen} == {"ecg", "xray"} and len(chosen) == 6
    assert {it.id for it in chosen} <= {it.id for it in pool}
    with pytest.raises(QoqoptError, match=r"^--domain pathology: the clinical eval set has no items of it \(it has: "):
        eval_items("clinical", 6, render=False, domains=["pathology"])


def _listed_gguf_build(build: Path, text_bytes: int) -> Path:
    """A build folder whose manifest lists a 100-byte Q8_0 text file (written `text_bytes` long) and an mmproj."""
    build.mkdir()
    (build / "m.Q8_0.gguf").write_bytes(bytes(text_bytes))
    (build / "mmproj-m-f16.gguf").write_bytes(bytes(10))
    files = [{"path": "m.Q8_0.gguf", "kind": "text", "quant": "Q8_0", "bytes": 100},
             {"path": "mmproj-m-f16.gguf", "kind": "mmproj", "bytes": 10}]  # fmt: skip
    (build / "manifest.json").write_text(json.dumps({"format": "gguf", "files": files}))
    return build


def test_a_variant_in_two_from_folders_is_refused(tiny_dir, tmp_path):
    """Which of two --from builds of gguf:Q8_0 was measured was the order's choice, and unsaid."""
    a, b = _listed_gguf_build(tmp_path / "a", 100), _listed_gguf_build(tmp_path / "b", 100)
    res = run_cli("bench", str(tiny_dir), "--variants", "gguf:Q8_0", "--from", str(a), "--from", str(b),
                  "--out", str(tmp_path / "out"))  # fmt: skip
    assert res.returncode == 2 and "reference: " not in res.stdout
    assert error_line(res) == f"error: gguf:Q8_0 is in more than one --from ({a}, {b}): give only the one to bench"


def test_a_sets_sha256_covers_its_images_not_its_folder(tmp_path):
    """`report` groups drift by the eval set's sha256: the same set moved elsewhere is the same chats,
    one image replaced is not (the JSONL text alone hashed the same)."""
    import shutil

    from PIL import Image

    from qoqopt.bench.run import _set_sha
    from qoqopt.data import load_jsonl

    a = tmp_path / "a"
    a.mkdir()
    for name, grey in (("x.png", 40), ("y.png", 90)):
        Image.new("L", (64, 64), grey).save(a / name)
    rows = [{"image": n, "question": "Which organ?", "answer": "Liver", "domain": "ct"} for n in ("x.png", "y.png")]
    (a / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(a, tmp_path / "b")
    sha = {d: _set_sha(str(tmp_path / d / "set.jsonl"), load_jsonl(tmp_path / d / "set.jsonl")) for d in "ab"}
    assert sha["a"] == sha["b"] and len(sha["a"]["sha256"]) == 64
    Image.new("L", (64, 64), 91).save(tmp_path / "b" / "y.png")
    assert _set_sha(str(tmp_path / "b" / "set.jsonl"), load_jsonl(tmp_path / "b" / "set.jsonl")) != sha["a"]


def test_an_answer_past_the_models_context_is_refused_before_the_reference(tiny_dir, tmp_path):
    """transformers generated past the positions the model learned without a word, and llama.cpp's
    context was sized past them: an --answer-tokens that the largest eval image (TRAIN_TOKENS) and
    its prompt leave no room for is refused before the reference pass; the most it names fits."""
    from transformers import AutoConfig

    from qoqopt.bench.gguf_runner import PROMPT_ROOM
    from qoqopt.bench.run import _check_answer_room

    config = AutoConfig.from_pretrained(tiny_dir)
    most = config.get_text_config().max_position_embeddings - TRAIN_TOKENS[1] - PROMPT_ROOM
    res = run_cli("bench", str(tiny_dir), "--variants", "bf16", "--answer-tokens", str(most + 1), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "reference: " not in res.stdout
    assert error_line(res).startswith(f"error: --answer-tokens {most + 1}: with the largest image ({TRAIN_TOKENS[1]} ")
    assert error_line(res).endswith(f"tokens; at most {most}") and not (tmp_path / "o").exists()
    _check_answer_room(most, config)  # no error
