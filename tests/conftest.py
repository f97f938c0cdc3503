"""Shared fixtures: the mini QoQ-Med checkpoints are built once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The real QoQ-Med-VL-7B's metadata (config, all 868 tensor names, prompt format; no weights), a copy
# of the MIT-licensed files its README names, so a fresh clone tests against it; QOQOPT_FIXTURES
# points the tests at another copy.
FIXTURES = Path(os.environ.get("QOQOPT_FIXTURES") or Path(__file__).resolve().parent / "fixtures" / "qoq-med-vl-7b")

# No test may reach the network: the Hub is unreachable here and must stay unused in CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The kernel tests check the rules' W4A16 launches, not whatever tuning table this machine's cache or
# a shipped folder holds; tests/test_kernels_tuning.py points it at tables of its own.
os.environ["QOQOPT_KERNEL_TUNING"] = "off"


def _split_cores_between_workers() -> None:
    """pytest-xdist runs a test file per core at once. Each worker, and each export, ask or bench it
    starts, took a torch thread per core as well, and OpenMP threads that wait for a core spin:
    oversubscribed, a GPTQ export ran 7x slower than alone. Each worker's processes get its share,
    through the variable torch and qoqopt's --threads default both read; a test that sets a thread
    count still gets what it sets."""
    from qoqopt.bench.machine import usable_physical_cores

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_physical_cores() // workers))
        assert "torch" not in sys.modules, "torch was imported before the thread count was set"


_split_cores_between_workers()


@pytest.fixture
def interpreter(monkeypatch):
    """The Triton interpreter for this test, where the kernel tests run on the CPU (tests/kernel_device.py)."""
    pytest.importorskip("triton")
    from tests.kernel_device import DEVICE

    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="session")
def fixture_7b() -> Path:
    if not (FIXTURES / "config.json").exists():
        pytest.fail(f"real QoQ-Med-VL-7B metadata not found at {FIXTURES}")
    return FIXTURES


def _build_mini(out: Path, layout: str) -> Path:
    from qoqopt.mini import build_model, save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(build_model("tiny", seed=0), out, layout=layout)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Random-weight tiny mini model, legacy key layout (visual.*, model.layers.*)."""
    return _build_mini(tmp_path_factory.mktemp("tiny") / "ckpt", "legacy")


@pytest.fixture(scope="session")
def tiny_runtime_dir(tmp_path_factory) -> Path:
    """The same model in the transformers>=4.52 runtime layout (model.visual.*, model.language_model.*)."""
    return _build_mini(tmp_path_factory.mktemp("tiny_rt") / "ckpt", "runtime")


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    """The trained mini model (`qoqopt mini --train`, from the cache after the first run) as a checkpoint."""
    from qoqopt.mini import save_checkpoint
    from qoqopt.train import trained_model

    model, _ = trained_model("tiny", 0)
    d = tmp_path_factory.mktemp("trained") / "ckpt"
    d.mkdir()
    save_checkpoint(model, d)
    return d


# QoQ-Med's training pixel range (65,536..524,288 px) in 28x28-pixel image tokens, as llama.cpp takes it.
TRAIN_TOKENS = (84, 668)


def error_line(res: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints: exit status 2, a single `error: ...` line on stderr."""
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def refused(argv: list[str], capsys, downloads: bool = False) -> str:
    """Run `qoqopt ARGV` in this process (no interpreter start-up: refusals come before any work) and
    return its one `error:` line; it must exit with status 2 and print nothing else on stderr but,
    with `downloads`, huggingface_hub's download bars of a fetch that then failed."""
    from qoqopt.cli import main

    capsys.readouterr()  # what the test printed before (progress bars, warnings) is not this command's
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's refusals exit from inside parse_args
        rc = exc.code
    err = capsys.readouterr().err
    if downloads:
        err = "".join(line for line in err.splitlines(keepends=True) if line.strip() and "it/s]" not in line)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m qoqopt ...` in a fresh process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "qoqopt", *args], capture_output=True, text=True, env=full_env, timeout=600
    )


@pytest.fixture()
def one_thread():
    """Small-tensor loops run ~20x slower with two contended threads on the 2-core machine."""
    from qoqopt.exports.hf_quant import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture()
def ctrl_c():
    """Ctrl-C as a terminal's Python gets it (KeyboardInterrupt): pytest-xdist's workers ignore SIGINT,
    and so would a child they start. ``CTRL_C_FIRST`` does the same as the first line of a child's code."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


CTRL_C_FIRST = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_as_hub_repo(hub: Path, repo_id: str, files: list[Path], listed: list[str] | None = None) -> str:
    """`files` as huggingface_hub caches a downloaded `repo_id` under `hub` (symlinks in
    snapshots/<commit>/, refs/main); with `listed`, also the whole repo's file listing that
    huggingface_hub >= 2.4 keeps (trees/<commit>.json, the format its _tree_cache documents), so an
    offline fetch that needs a listed file the snapshot lacks is refused. Returns the commit."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    for f in files:
        (snapshot / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    if listed is not None:
        entries = {name: {"size": 1, "blob_id": f"{i:040x}"} for i, name in enumerate(listed)}
        (repo / "trees").mkdir()
        (repo / "trees" / f"{HUB_COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": entries}))
    return HUB_COMMIT
