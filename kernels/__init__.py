"""qoqopt.kernels: fused inference ops for the Qwen2.5-VL / QoQ-Med vision tower and W4A16 linears.

One op per module, each with its Triton kernel, launcher, torch reference and module wrapper:

* :mod:`.merger` - RMSNorm + 2x2 merge + Linear + GELU fused, then the projection;
* :mod:`.vision_attention` - varlen window/full attention with in-kernel 2-D RoPE;
* :mod:`.w4a16` - GPTQ v1 / AWQ GEMM weight-only GEMM and :class:`QuantLinear`;
* :mod:`.fused_projections` - quantized q/k/v and gate/up run as one QuantLinear each;
* :mod:`.patch_embed`, :mod:`.vision_mlp` - torch-only fixes (Conv3d as matmul, fused gate/up).

``apply(model)`` patches a transformers model in place from the table in :mod:`.registry`.
"""


def _give_the_name_back() -> None:
    """Imported as the top-level ``kernels``, from a checkout's root on sys.path (pytest, or ``python
    -m qoqopt`` run there). That name is Hugging Face's kernel-hub package, which transformers imports
    when it is installed; finding this folder instead, its import fails (or pulls in Triton for
    nothing). The name goes to the installed package, or stays this empty module, which transformers
    reads as "not installed" (it has no version)."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is not None and spec.origin:  # a namespace folder (no origin) is no package
        sys.modules[__name__] = hub = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hub)


if __name__ == "kernels":
    _give_the_name_back()
else:
    from .registry import REGISTRY, PatchReport, apply
    from .w4a16 import QuantLinear, replace_linears

    __all__ = ["REGISTRY", "PatchReport", "QuantLinear", "apply", "replace_linears"]
