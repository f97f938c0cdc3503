"""The repo's top-level kernels/ folder installs as qoqopt.kernels (pyproject's package-dir). From a
checkout's root, which pytest and `python -m` put on sys.path, it must not take the top-level name
`kernels` from Hugging Face's kernel-hub package: transformers imports that package when installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Stands in for an installed kernel-hub release that transformers accepts: its distribution metadata,
# and a module that answers every name transformers imports from it (a decorator factory each).
HUB_INIT = '''
__version__ = "{version}"
HUB = True

def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return lambda *args, **kwargs: (lambda obj: obj)
'''


def _python_at_root(code: str, env_path: Path | None = None) -> subprocess.CompletedProcess:
    """``python -c CODE`` run in the checkout's root, which puts the root first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ({"PYTHONPATH": str(env_path)} if env_path else {})
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _installed_hub(site: Path) -> Path:
    from transformers.utils import import_utils

    version = import_utils.KERNELS_MIN_VERSION  # the oldest release this transformers uses
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(HUB_INIT.format(version=version))
    dist = site / f"kernels-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    return site


def test_an_installed_kernel_hub_keeps_its_name_in_a_checkout(tmp_path):
    """With the hub package installed, transformers imports it, not this folder (which lacks its
    names: `from kernels import CUDAProperties` failed, and with it every Qwen2.5-VL import)."""
    site = _installed_hub(tmp_path / "site")
    res = _python_at_root(
        "import kernels, transformers.utils.import_utils as u\n"
        "from transformers import Qwen2_5_VLForConditionalGeneration\n"
        "print(kernels.__file__, u.is_kernels_available())",
        site,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [str(site / "kernels" / "__init__.py"), "True"]


def _hub_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version("kernels"))
    except PackageNotFoundError:
        return False


@pytest.mark.skipif(_hub_installed(), reason="Hugging Face's kernels is installed here: the name is handed to it")
def test_without_the_hub_the_name_is_an_empty_module_transformers_reads_as_absent():
    """Nothing installed: transformers' probe reads "no kernel hub", and the name holds none of
    qoqopt's kernels (their Triton import cost every transformers import from the root 0.4 s)."""
    res = _python_at_root(
        "import sys, kernels, transformers.utils.import_utils as u\n"
        "print(kernels.__file__, u.is_kernels_available(), hasattr(kernels, 'apply'), 'triton' in sys.modules)"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [str(REPO / "kernels" / "__init__.py"), "False", "False", "False"]


def test_qoqopt_kernels_is_the_folder_with_its_api():
    import qoqopt.kernels as k

    assert Path(k.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert callable(k.apply) and k.QuantLinear.__module__ == "qoqopt.kernels.w4a16"
