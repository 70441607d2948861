"""Low-rank self-attention in the reduced dimension: one flash-attention style Triton kernel.

Contract (reference: `reference.lowrank_attention_reference`), per batch item and head h of width d:
    out_h = softmax(scaling * q_h k_h^T) v_h,  q = xq Wq2 + bq,  k = xk Wk2,  v = xv Wv2 + bv
Two independent options choose where each side is computed:
  * reduced q/k (`qk_matrix` M (H, rq, rk) and `qk_bias` u (H, rk) from `reference.qk_matrices`): each query tile
    computes q'_h = xq M_h + u_h in registers and the scores are q'_h xk^T over the key rank rk, reading the
    shared (B*T, rk) xk; no q_h or k_h is ever written. Otherwise q_src/k_src hold q and k, (B*T, H*d).
  * reduced v (`v_weight` Wv2 (rv, H*d), `v_bias`): the kernel accumulates P xv over the value rank rv and
    multiplies by Wv2_h (and adds bv_h, exact because each row of P sums to 1) in its epilogue. Otherwise v_src
    holds v, (B*T, H*d).
Sources are 2-D (B*T, width) with unit column stride and any row stride, so they may be column slices of one
fused first-factor GEMM output. Ranks: any multiple of 16 up to 256 (padded inside to the next power of two, with
zeros, so results are exact); head width d a power of two from 32 to 128 (Whisper: 64; with d = 16 and both
sides reduced, Triton 3.6 on an H200 produced wrong results, so 16 is refused); fp16 or bf16; no attention mask (Whisper's
encoder has none). Output (B*T, H*d), heads concatenated, in the sources' dtype. Softmax is online (exp2, float32
statistics), so the (T, T) scores never reach memory.

When it pays (the FLOP rule in `encoder.plan_layer`): the score and value products cost T^2 * (rk_pad + rv_pad)
per head instead of T^2 * 2d, and the second-factor GEMMs plus the q/k/v round trip through memory disappear.
So each side is taken reduced when its padded rank is at most d.
"""

import torch
import triton
import triton.language as tl

from .reference import next_power_of_two

LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N, num_warps, num_stages) to use instead of the defaults; the benchmark sweeps it.
CONFIG_OVERRIDE = None


@triton.jit
def _lowrank_attention_kernel(
    Q, K, V, QKM, QKU, WV, BV, O,
    T, H, RQ, DK, DV, qk_scale,
    stride_q, stride_k, stride_v, stride_o,
    RQ_P: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    QK_REDUCED: tl.constexpr, V_REDUCED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T
    row_m = b * T + offs_m
    offs_dk = tl.arange(0, DK_P)
    offs_dv = tl.arange(0, DV_P)
    offs_d = tl.arange(0, HEAD_DIM)

    if QK_REDUCED:
        offs_r = tl.arange(0, RQ_P)
        xq = tl.load(Q + row_m[:, None] * stride_q + offs_r[None, :],
                     mask=m_mask[:, None] & (offs_r[None, :] < RQ), other=0.0)
        mat = tl.load(QKM + h * RQ * DK + offs_r[:, None] * DK + offs_dk[None, :],
                      mask=(offs_r[:, None] < RQ) & (offs_dk[None, :] < DK), other=0.0)
        u = tl.load(QKU + h * DK + offs_dk, mask=offs_dk < DK, other=0.0)
        q = (tl.dot(xq, mat) + u.to(tl.float32)[None, :]).to(xq.dtype)
        k_col = 0
    else:
        q = tl.load(Q + row_m[:, None] * stride_q + h * HEAD_DIM + offs_dk[None, :],
                    mask=m_mask[:, None] & (offs_dk[None, :] < DK), other=0.0)
        k_col = h * HEAD_DIM
    if V_REDUCED:
        v_col = 0
    else:
        v_col = h * HEAD_DIM

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DV_P), dtype=tl.float32)
    for start in range(0, T, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < T
        row_n = b * T + offs_n
        k = tl.load(K + row_n[None, :] * stride_k + k_col + offs_dk[:, None],
                    mask=n_mask[None, :] & (offs_dk[:, None] < DK), other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + row_n[:, None] * stride_v + v_col + offs_dv[None, :],
                    mask=n_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]

    if V_REDUCED:
        w = tl.load(WV + offs_dv[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :],
                    mask=offs_dv[:, None] < DV, other=0.0)
        bias = tl.load(BV + h * HEAD_DIM + offs_d).to(tl.float32)
        out = tl.dot(acc.to(w.dtype), w) + bias[None, :]
    else:
        out = acc
    tl.store(O + row_m[:, None] * stride_o + h * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None])


def _check_source(name, t, rows):
    if t.dim() != 2 or t.shape[0] != rows or t.stride(1) != 1:
        raise ValueError(f"lowrank_attention: {name} must be ({rows}, width) with unit column stride, got "
                         f"{tuple(t.shape)} strides {t.stride()}")


def lowrank_attention(q_src, k_src, v_src, batch, num_heads, head_dim, scaling=None,
                      qk_matrix=None, qk_bias=None, v_weight=None, v_bias=None, block_m=None, block_n=None):
    """Triton version of the contract in the module docstring; returns (B*T, H*d)."""
    rows = q_src.shape[0]
    if rows % batch:
        raise ValueError(f"lowrank_attention: {rows} rows do not split into batch {batch}")
    length = rows // batch
    for name, t in (("q_src", q_src), ("k_src", k_src), ("v_src", v_src)):
        _check_source(name, t, rows)
    if head_dim & (head_dim - 1) or not 32 <= head_dim <= 128:
        raise ValueError(f"lowrank_attention: head width {head_dim} must be a power of two from 32 to 128")
    qk_reduced = qk_matrix is not None
    v_reduced = v_weight is not None
    width = num_heads * head_dim
    if qk_reduced:
        rq, rk = qk_matrix.shape[1], qk_matrix.shape[2]
        if q_src.shape[1] != rq or k_src.shape[1] != rk:
            raise ValueError("lowrank_attention: xq/xk widths do not match qk_matrix (H, rq, rk)")
        qk_matrix = qk_matrix.contiguous()
        qk_bias = qk_bias.contiguous()
    else:
        rq, rk = head_dim, head_dim
        if q_src.shape[1] != width or k_src.shape[1] != width:
            raise ValueError(f"lowrank_attention: q/k must be (rows, {width}) when qk_matrix is None")
    if v_reduced:
        rv = v_weight.shape[0]
        if v_src.shape[1] != rv or v_weight.shape[1] != width or v_weight.stride(1) != 1:
            raise ValueError("lowrank_attention: xv/v_weight shapes do not match (rv, H*d)")
    else:
        rv = head_dim
        if v_src.shape[1] != width:
            raise ValueError(f"lowrank_attention: v must be (rows, {width}) when v_weight is None")
    for r in (rq, rk, rv):
        if r % 16 or r > 256:
            raise ValueError(f"lowrank_attention: rank {r} must be a multiple of 16 and at most 256")
    scaling = head_dim**-0.5 if scaling is None else scaling
    out = torch.empty((rows, width), dtype=q_src.dtype, device=q_src.device)
    interpreting = not q_src.is_cuda
    # 128 x 64 tiles, 8 warps, 3 stages: the fastest of the configurations swept on an H200 (NOTES_cuda.md).
    num_warps = 4 if interpreting else 8
    num_stages = 1 if interpreting else 3
    if CONFIG_OVERRIDE is not None and not interpreting:
        block_m, block_n, num_warps, num_stages = CONFIG_OVERRIDE
    block_m = block_m or (16 if interpreting else 128)
    block_n = block_n or (16 if interpreting else 64)
    grid = (triton.cdiv(length, block_m), batch * num_heads)
    dummy = out
    _lowrank_attention_kernel[grid](
        q_src, k_src, v_src,
        qk_matrix if qk_reduced else dummy, qk_bias if qk_reduced else dummy,
        v_weight if v_reduced else dummy, v_bias if v_reduced else dummy, out,
        length, num_heads, rq, rk, rv, scaling * LOG2E,
        q_src.stride(0), k_src.stride(0), v_src.stride(0), out.stride(0),
        RQ_P=max(16, next_power_of_two(rq)), DK_P=max(16, next_power_of_two(rk)), DV_P=max(16, next_power_of_two(rv)),
        HEAD_DIM=head_dim, QK_REDUCED=qk_reduced, V_REDUCED=v_reduced,
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
