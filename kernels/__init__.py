"""qoqopt.kernels: fused inference ops for the Qwen2.5-VL / QoQ-Med vision tower and W4A16 linears.

One op per module, each with its Triton kernel, launcher, torch reference and module wrapper:

* :mod:`.merger` - RMSNorm + 2x2 merge + Linear + GELU fused, then the projection;
* :mod:`.vision_attention` - varlen window/full attention with in-kernel 2-D RoPE;
* :mod:`.w4a16` - GPTQ v1 / AWQ GEMM weight-only GEMM and :class:`QuantLinear`;
* :mod:`.fused_projections` - quantized q/k/v and gate/up run as one QuantLinear each;
* :mod:`.patch_embed`, :mod:`.vision_mlp` - torch-only fixes (Conv3d as matmul, fused gate/up).

``apply(model)`` patches a transformers model in place from the table in :mod:`.registry`.
"""

from .registry import REGISTRY, PatchReport, apply
from .w4a16 import QuantLinear, replace_linears

__all__ = ["REGISTRY", "PatchReport", "QuantLinear", "apply", "replace_linears"]
