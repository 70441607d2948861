"""Fused linear layer: one Triton GEMM with the bias, exact GELU, residual add and fp16 clamp in its epilogue.

Contract (reference: `reference.fused_linear_reference`):
    y = [clamp](residual + act(x @ weight + bias))
    x (M, K) and weight (K, N) with any strides (`linear.weight.t()` for an nn.Linear, `weight2` of a
    LowRankLinear as is), bias (N,), residual (M, N); fp16 or bf16 (all the same dtype), any M, N, K (tiles are
    masked, so K need not be a multiple of the tile). Accumulation and the epilogue run in float32 and round once.

Why: in Whisper's encoder every projection is followed by an elementwise pass (bias + GELU after fc1, the residual
add after out_proj and fc2). For a low-rank projection the GEMM itself is cheap, so that extra pass over the
full-width (M, N) output is a large share of its time; doing it in the GEMM's epilogue removes it.
"""

import os

import torch
import triton
import triton.language as tl

# Tile choice by output size (see `_pick_config`); the benchmark can override it to compare variants.
CONFIG_OVERRIDE = None


@triton.jit
def _fused_linear_kernel(
    X, W, BIAS, RES, Y,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_rm, stride_ym,
    clamp_value,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering of the output tiles: GROUP_M row-tiles share the same weight columns while they run,
    # which keeps the weight tile in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_size
    pid_n = (pid % tiles_per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge are wrapped instead of masked in the main loop (their results are never
    # stored), so only the K tail needs a mask.
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(BIAS + cols).to(tl.float32)[None, :]
    if GELU:
        # Exact GELU, as Whisper's "gelu" activation (not the tanh approximation).
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RESIDUAL:
        res = tl.load(RES + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_mask, other=0.0)
        acc += res.to(tl.float32)
    if CLAMP:
        acc = tl.minimum(tl.maximum(acc, -clamp_value), clamp_value)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=out_mask)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pick_config(M, N, K):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): a 128x256 tile when there are enough tiles to fill
    the GPU twice over (it halves the re-reads of x), else 128x128 so that batch 1 still spreads over the SMs."""
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    if _interpreting():
        return 32, 32, 32, 4, 1
    if triton.cdiv(M, 128) * triton.cdiv(N, 256) >= 264:
        return 128, 256, 64, 8, 3
    return 128, 128, 64, 8, 3


def fused_linear(x, weight, bias=None, gelu=False, residual=None, clamp_fp16=False):
    """Triton version of `reference.fused_linear_reference` (see the module docstring for the contract)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"fused_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not chain")
    M, K = x.shape
    N = weight.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if residual is not None and (residual.shape != (M, N) or residual.stride(1) != 1):
        raise ValueError(f"fused_linear: residual must be ({M}, {N}) with unit column stride")
    block_m, block_n, block_k, num_warps, num_stages = _pick_config(M, N, K)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fused_linear_kernel[grid](
        x, weight, bias if bias is not None else y, residual if residual is not None else y, y,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        residual.stride(0) if residual is not None else 0, y.stride(0),
        float(torch.finfo(torch.float16).max - 1000),
        HAS_BIAS=bias is not None, GELU=gelu, HAS_RESIDUAL=residual is not None, CLAMP=clamp_fp16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y
