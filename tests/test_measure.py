"""The benchmarks' process meter (benchmarks/measure.py), held to the kernel's own accounting."""

import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))

from measure import run_measured  # noqa: E402


def test_peak_rss_is_the_commands_own_whatever_the_parents_size():
    """Started straight from a big parent, a child reported the parent's peak (Linux keeps the larger
    high-water mark across exec): `python -c pass` read 1035 MiB next to a 1 GiB parent."""
    ballast = bytearray(512 << 20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page: resident
    idle = run_measured([sys.executable, "-c", "pass"])
    grow = run_measured([sys.executable, "-c", "b = bytearray(256 << 20); b[::4096] = b'\\1' * (len(b) // 4096)"])
    assert idle["rc"] == grow["rc"] == 0
    assert idle["peak_rss_mib"] < 128, idle
    assert 256 <= grow["peak_rss_mib"] < 256 + 128, grow
    failed = run_measured([sys.executable, "-c", "import sys; print('last words'); sys.exit(3)"])
    assert failed["rc"] == 3 and failed["tail"] == "last words"
    del ballast


def test_signals_and_missing_commands_read_as_such():
    """An OOM kill must read as -9, not as an exit code, and a command that never ran has no peak."""
    killed = run_measured([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed["rc"] == -9 and killed["peak_rss_mib"] > 0
    missing = run_measured(["/nonexistent/qoqopt-command"])
    assert missing["rc"] == 127 and missing["peak_rss_mib"] is None and "No such file" in missing["tail"]
