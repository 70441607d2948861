"""Triton kernels for LiteWhisper encoders (installed as lite_whisper.kernels). Filled by the CUDA-speed work."""


def enable(model):
    """Swap Triton kernels into `model`'s encoder where supported; returns the number of layers changed."""
    return 0


def disable(model):
    """Restore the plain PyTorch encoder path."""
    return 0
