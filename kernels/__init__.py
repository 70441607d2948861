"""Triton kernels for LiteWhisper encoders on CUDA (installed as `lite_whisper.kernels`).

Cheap to import: triton and the kernels load only inside `enable`, so CPU-only installs and machines without
triton never touch them.

Kernels (each with a PyTorch reference in `reference.py` and its contract in its module docstring):
  * `attention.lowrank_attention`: flash-style self-attention whose q/k and/or v side runs in the low-rank
    dimension (M_h = Wq2_h Wk2_h^T precomputed), chosen per layer by the FLOP/byte rule in `encoder.plan_layer`.
  * `linear.fused_linear`: GEMM with bias, exact GELU, residual add and fp16 clamp fused into the epilogue (used
    only where the same rule says it beats cuBLAS with its own epilogues).
  * `decode`: the decoder-step kernels of the fast generation path (`lite_whisper.fast_generation`): layer norm +
    GEMV + bias/GELU/residual/K-V cache write, mask-free self-attention over the cache, split-KV cross-attention,
    logits + token masks + argmax, and the step's bookkeeping; used for float16/bfloat16 steps replayed from CUDA
    graphs, with programmatic dependent launch on Hopper and newer.
`enable(model)` patches the encoder layers (see `encoder.py`: one GEMM for the q/k/v first factors, bias/GELU and
bias/residual folded into cuBLAS epilogues); `disable(model)` restores the stock forward exactly.
"""

import logging

logger = logging.getLogger(__name__)


def triton_available():
    """True when triton imports and a CUDA device is present (the kernels' only requirements)."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def enable(model):
    """Swap the kernel-backed forward into `model`'s encoder layers; returns the number of layers changed.

    A no-op returning 0 unless the encoder's weights are on CUDA and triton imports.
    """
    try:
        params = next(model.model.encoder.parameters())
    except (AttributeError, StopIteration):
        return 0
    if params.device.type != "cuda" or not triton_available():
        return 0
    try:
        from .encoder import enable_encoder
    except ImportError as error:  # an incompatible triton, say: keep the plain path
        logger.warning("lite_whisper kernels unavailable (%s); using the plain PyTorch path", error)
        return 0
    changed = enable_encoder(model)
    logger.info("lite_whisper kernels enabled on %d encoder layers", changed)
    return changed


def disable(model):
    """Restore the stock encoder-layer forward everywhere; returns the number of layers restored."""
    try:
        layers = model.model.encoder.layers
    except AttributeError:
        return 0
    restored = 0
    for layer in layers:
        if "forward" in layer.__dict__:
            del layer.forward
            restored += 1
        layer.__dict__.pop("_lite_whisper_plan", None)
    return restored
