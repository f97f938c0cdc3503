"""Qwen2.5-VL patch embedding as one matmul.

The Conv3d has kernel == stride == (temporal_patch, patch, patch) and each input row already holds
exactly one patch (``C x T x P x P`` flattened in that order), so the convolution is a plain
``[num_patches, C*T*P*P] @ [C*T*P*P, hidden]`` GEMM. cuDNN's Conv3d path for this shape is slow
and needs a 5-D reshape; the matmul is one cuBLAS call. No Triton kernel: there is nothing to fuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qoqopt.errors import QoqoptError

from ._triton import check_supported


def patch_embed_reference(pixels: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """transformers' path: view as 5-D patches, Conv3d, flatten."""
    c, (t, p, _) = conv.in_channels, conv.kernel_size
    x = pixels.view(-1, c, t, p, p).to(conv.weight.dtype)
    return conv(x).view(-1, conv.out_channels)


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, C*T*P*P] @ weight.view(hidden, -1).T`` (+ bias)."""
    w = weight.reshape(weight.shape[0], -1)
    return F.linear(pixels.reshape(-1, w.shape[1]).to(w.dtype), w, bias)


class MatmulPatchEmbed(nn.Module):
    """Drop-in for ``Qwen2_5_VisionPatchEmbed``; keeps ``proj`` (the Conv3d) so keys are unchanged."""

    def __init__(self, proj: nn.Conv3d):
        super().__init__()
        self.proj = proj
        self.embed_dim = proj.out_channels

    @classmethod
    def from_hf(cls, embed: nn.Module) -> "MatmulPatchEmbed":
        conv = embed.proj
        if tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding) or conv.groups != 1:
            raise QoqoptError("patch embed: Conv3d is not a non-overlapping patchify; cannot use a matmul")
        check_supported(conv.weight.device, conv.weight.dtype, "patch embed")
        return cls(conv)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return patch_embed(hidden_states, self.proj.weight, self.proj.bias)
