"""The Triton kernels as torch.library custom ops, so that torch.compile treats each as one opaque call
(the encoder-layer forward uses these only while being compiled; eagerly it calls the kernels directly, which
skips the dispatcher's overhead)."""

from typing import Optional

import torch

from .attention import lowrank_attention
from .linear import fused_linear


@torch.library.custom_op("lite_whisper::fused_linear", mutates_args=())
def fused_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool,
    residual: Optional[torch.Tensor], clamp_fp16: bool,
) -> torch.Tensor:
    return fused_linear(x, weight, bias, gelu=gelu, residual=residual, clamp_fp16=clamp_fp16)


@fused_linear_op.register_fake
def _(x, weight, bias, gelu, residual, clamp_fp16):
    return x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.custom_op("lite_whisper::lowrank_attention", mutates_args=())
def lowrank_attention_op(
    q_src: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor, batch: int, num_heads: int, head_dim: int,
    scaling: float, qk_matrix: Optional[torch.Tensor], qk_bias: Optional[torch.Tensor],
    v_weight: Optional[torch.Tensor], v_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return lowrank_attention(q_src, k_src, v_src, batch, num_heads, head_dim, scaling,
                             qk_matrix, qk_bias, v_weight, v_bias)


@lowrank_attention_op.register_fake
def _(q_src, k_src, v_src, batch, num_heads, head_dim, scaling, qk_matrix, qk_bias, v_weight, v_bias):
    return q_src.new_empty((q_src.shape[0], num_heads * head_dim))
