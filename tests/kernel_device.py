"""Where the kernel tests run: CUDA when available (or QOQOPT_KERNEL_DEVICE=cuda), else the CPU
through the Triton interpreter, which a test switches on with conftest's ``interpreter`` fixture."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("QOQOPT_KERNEL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
