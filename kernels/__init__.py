"""qoqopt.kernels: Triton kernels for the Qwen2.5-VL vision tower and W4A16 linears (work in progress)."""
