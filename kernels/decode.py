"""Decoder-step kernels: one greedy token of Whisper's decoder for a batch of at most a few dozen rows.

Why: a decoder step at batch 1-32 reads every decoder weight once and does almost no arithmetic, so its floor is
bytes / bandwidth (turbo shape: 348 MB, ~120 us on an H100). Built from cuBLAS and PyTorch ops the step is ~125
kernels, each with a fixed cost of 1-6 us (cuBLAS's skinny GEMMs reach about half the bandwidth, layer norms and
the logits processors are separate passes), about 4x the floor. These kernels fold the layer norm into the GEMV
that reads its output, the bias, GELU, residual add and the K/V cache write into the GEMV's epilogue, attend over
the self-attention cache without a mask tensor, and fold the logits processors' token masks and a first argmax
pass into the output-embedding GEMV, leaving one tiny kernel for the bookkeeping. A layer is 8 kernels instead of
~25. Everything reads the step's position and state from device tensors, so the step can be replayed from a CUDA
graph.

Contracts (references: `reference.decode_*_reference`; every function writes into the buffers it is given):

* `decode_embed(tokens, embed, positions, length, out, scale)`:
  out[m] = embed[tokens[m]] * scale + positions[length - 1]. tokens (M, 1) int64, embed (V, D), positions (P, D),
  length a 0-d int64 tensor (the sequence length after the token was appended), out (M, D).
* `decode_linear(x, weight, bias, out, norm=None, gelu=False, residual=None, kv=None, length=None)`:
  y = [residual +] act(LN(x) @ weight.T + bias), LN = layer norm with (weight, bias, eps) when `norm` is given.
  x (M, K) with unit column stride, weight (N, K) as nn.Linear stores it (contiguous), bias (N,), residual and out
  (M, N) (out may be the residual tensor itself: each element is read before it is written by the same program).
  With `kv = (k_cache, v_cache)` the output is q|k|v of width 3D: q goes to out (M, D), k and v into the caches
  (M, H, max_len, D/H) at position length - 1.
* `decode_self_attention(q, k_cache, v_cache, length, out, scale)`: per row and head,
  softmax(scale * q k^T) v over cache positions 0 .. length - 1. q and out (M, H*d), caches (M, H, max_len, d).
* `decode_cross_attention(q, k, v, out, scale, workspace)`: per row and head, softmax(scale * q k^T) v over all
  frames of the encoder's keys/values k, v (M, H, T, d), split over programs of CROSS_BLOCK_T frames and merged in
  a fixed order; `workspace` as for split-K. Used at batch 1 where PDL is on (`cross_attention_kernel`); SDPA
  otherwise.
* `decode_logits(x, norm, embed, raw, scores, partial_v, partial_i, codes, length, begin, below)`:
  raw = (LN(x) @ embed.T rounded to embed's dtype) in float32; with `codes` also scores = raw with -inf where
  the token mask says so (code bit 1: always; bit 2: when length == begin; bit 4: while length < below) and, per
  row and block of BLOCK_N tokens, the block's maximum score and its first index (partial_v, partial_i).
* `decode_finish(partial_v, partial_i, sequences, tokens, unfinished, length, done_len, eos, pad_id)`: the argmax
  of every row from the partials (first index of the maximum, as torch.argmax), padding for finished rows, append
  at position `length`, EOS bookkeeping, length += 1, and done_len = length once no row is unfinished.

On compute capability 9.0 and newer every kernel is launched with programmatic dependent launch (`_chain`): it
may start while the previous kernel runs and waits before touching anything an earlier kernel writes. What never
changes during a step -- the weights, the cross-attention keys and values -- is loaded before that wait: at batch 1
the GEMVs take a one-row kernel that holds its whole weight slab in registers, so the weight traffic of the next
projection overlaps the previous kernel (H100, turbo, batch 1: 305 -> 230 us a step with the split-KV
cross-attention; `benchmarks/NOTES_e2e.md`, v3).

Half precision only (float16, bfloat16): float32 models keep the PyTorch step, whose GEMVs are exact.
"""

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.3: programmatic dependent launch (Hopper and newer)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None

# (BLOCK_N, BLOCK_K, num_warps, num_stages[, split-K]) per kind of GEMV; the benchmark may override them.
CONFIG_OVERRIDE = {}
# One-row GEMVs with K up to ROW_KERNEL_MAX_K take `_decode_row_kernel` where programmatic dependent launch is on
# (without it the slab's loads cannot start before the previous kernel ends, and the tiled kernel measured faster);
# each program holds at most ROW_KERNEL_SLAB weights (BLOCK_N x next_pow2(K)) in registers.
ROW_KERNEL_MAX_K = 8192
ROW_KERNEL_SLAB = 32768
# Frames per program of the split-KV cross-attention.
CROSS_BLOCK_T = 128
# Block sizes under Triton's interpreter (CPU tests), whose cost is per program: one-row GEMV columns, frames.
INTERPRETER_BLOCKS = {"row": 512, "cross": 512}


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _row_stats(X, rows, row_ok, stride_xm, K: tl.constexpr, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # One unrolled pass of sums and sums of squares about a per-row shift (the row's first element): the loads are
    # independent, so their L2 latencies overlap (a loop of dependent passes cost ~2 us per GEMV at batch 1), and
    # the shift keeps E[x^2] - E[x]^2 from cancelling when a row's mean is large against its spread.
    shift = tl.load(X + rows * stride_xm, mask=row_ok, other=0.0).to(tl.float32)
    ks = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        kk = k0 + ks
        ok = row_ok[:, None] & (kk < K)[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + kk[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.where(ok, x - shift[:, None], 0.0)
        total += tl.sum(x, axis=1)
        squares += tl.sum(x * x, axis=1)
    mean = total / K
    var = tl.maximum(squares / K - mean * mean, 0.0)
    return mean + shift, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output tile: program ids over (N, M) and its rows / columns with their bounds."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    return pid_n, pid_m, rows, row_ok, cols, col_ok


@triton.jit
def _chain(PDL: tl.constexpr):
    """Programmatic dependent launch: a step is ~40 small kernels back to back, and each pays a launch and a ramp
    of a few microseconds. With PDL the next kernel is launched as soon as every program of this one has started
    (launch_dependents), and each kernel waits here until all earlier kernels have finished and their writes are
    visible (wait), before it touches anything they write or read. Every kernel calls this first."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def _norm_matmul(X, W, LNW, LNB, rows, row_ok, cols, col_ok, stride_xm, K: tl.constexpr, eps,
                 HAS_LN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 k_start=0, K_SPAN: tl.constexpr = 0):
    """acc (BLOCK_M, BLOCK_N) = LN(x[rows]) @ W[cols].T in float32 over k_start .. k_start + K_SPAN (all of K when
    K_SPAN is 0); LN's statistics are over the whole row, and its output is rounded to W's dtype first, as the
    PyTorch step rounds the layer norm's output before its GEMM."""
    if HAS_LN:
        mean, rstd = _row_stats(X, rows, row_ok, stride_xm, K, eps, BLOCK_M, BLOCK_K)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    span: tl.constexpr = K if K_SPAN == 0 else K_SPAN
    for k0 in range(0, span, BLOCK_K):
        kk = k_start + k0 + ks
        k_ok = kk < K
        x = tl.load(X + rows[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_LN:
            gamma = tl.load(LNW + kk, mask=k_ok, other=0.0).to(tl.float32)
            beta = tl.load(LNB + kk, mask=k_ok, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        x = x.to(W.dtype.element_ty)
        w = tl.load(W + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _linear_epilogue(acc, rows, row_ok, cols, col_ok, ok, BIAS, RES, Y, KC, VC, LEN, N, stride_rm, stride_ym,
                     stride_cm, stride_ch, stride_cp, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                     HAS_RES: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        # Exact GELU, as Whisper's "gelu" activation (not the tanh approximation).
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if HAS_RES:
        acc += tl.load(RES + rows[:, None] * stride_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    out = acc.to(Y.dtype.element_ty)
    if KV:
        pos = tl.load(LEN) - 1
        section = cols // D
        within = cols % D
        cache = rows[:, None] * stride_cm + (within // HEAD_DIM)[None, :] * stride_ch + pos * stride_cp \
            + (within % HEAD_DIM)[None, :]
        tl.store(Y + rows[:, None] * stride_ym + within[None, :], out, mask=ok & (section == 0)[None, :])
        tl.store(KC + cache, out, mask=ok & (section == 1)[None, :])
        tl.store(VC + cache, out, mask=ok & (section == 2)[None, :])
    else:
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], out, mask=ok)


@triton.jit
def _decode_linear_kernel(
    X, W, BIAS, LNW, LNB, RES, Y, KC, VC, LEN, PARTS, COUNTERS,
    M, N, K: tl.constexpr, stride_xm, stride_rm, stride_ym, stride_cm, stride_ch, stride_cp, eps,
    HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr, KV: tl.constexpr,
    D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    _chain(PDL)
    pid_n, pid_m, rows, row_ok, cols, col_ok = _tile(M, N, BLOCK_M, BLOCK_N)
    ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT == 1:
        acc = _norm_matmul(X, W, LNW, LNB, rows, row_ok, cols, col_ok, stride_xm, K, eps,
                           HAS_LN, BLOCK_M, BLOCK_N, BLOCK_K)
        _linear_epilogue(acc, rows, row_ok, cols, col_ok, ok, BIAS, RES, Y, KC, VC, LEN, N, stride_rm, stride_ym,
                         stride_cm, stride_ch, stride_cp, HAS_BIAS, GELU, HAS_RES, KV, D, HEAD_DIM)
    else:
        # Split-K: SPLIT programs per output tile, each over a slice of K, which shortens each program's chain of
        # loads on a long reduction (fc2, K = 4 d). Each writes its float32 partial; the last to arrive (atomic
        # counter) sums them in split order, so the result does not depend on timing.
        pid_k = tl.program_id(2)
        span: tl.constexpr = ((K + SPLIT * BLOCK_K - 1) // (SPLIT * BLOCK_K)) * BLOCK_K
        acc = _norm_matmul(X, W, LNW, LNB, rows, row_ok, cols, col_ok, stride_xm, K, eps,
                           HAS_LN, BLOCK_M, BLOCK_N, BLOCK_K, pid_k * span, span)
        tl.store(PARTS + (pid_k * M + rows)[:, None] * N + cols[None, :], acc, mask=ok)
        tile = pid_m * tl.num_programs(0) + pid_n
        tl.debug_barrier()  # every thread's partial is stored before the counter moves
        arrived = tl.atomic_add(COUNTERS + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for part in tl.static_range(SPLIT):
                total += tl.load(PARTS + (part * M + rows)[:, None] * N + cols[None, :], mask=ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(COUNTERS + tile, 0)  # ready for the next launch (and graph replay)
            _linear_epilogue(total, rows, row_ok, cols, col_ok, ok, BIAS, RES, Y, KC, VC, LEN, N, stride_rm,
                             stride_ym, stride_cm, stride_ch, stride_cp, HAS_BIAS, GELU, HAS_RES, KV, D, HEAD_DIM)


@triton.jit
def _decode_row_kernel(
    X, W, BIAS, LNW, LNB, RES, Y, KC, VC, LEN,
    N, K: tl.constexpr, stride_cm, stride_ch, stride_cp, eps,
    HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr, KV: tl.constexpr,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    """`_decode_linear_kernel` for one row and K <= K_PAD: each program loads its whole weight slab (BLOCK_N x K)
    at once, before waiting for the previous kernel (the weights never depend on it), so the step's chain of
    dependent loads is one round trip for x instead of one per K tile plus one for the layer-norm statistics."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kk = tl.arange(0, K_PAD)
    k_ok = kk < K
    w = tl.load(W + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    _chain(PDL)
    x = tl.load(X + kk, mask=k_ok, other=0.0).to(tl.float32)
    if HAS_LN:
        mean = tl.sum(x, axis=0) / K
        centred = tl.where(k_ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
        gamma = tl.load(LNW + kk, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(LNB + kk, mask=k_ok, other=0.0).to(tl.float32)
        x = centred * rstd * gamma + beta
    x = x.to(W.dtype.element_ty).to(tl.float32)
    acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    rows = tl.arange(0, 1)
    row_ok = rows < 1
    ok = row_ok[:, None] & col_ok[None, :]
    _linear_epilogue(acc[None, :], rows, row_ok, cols, col_ok, ok, BIAS, RES, Y, KC, VC, LEN, N, 0, 0,
                     stride_cm, stride_ch, stride_cp, HAS_BIAS, GELU, HAS_RES, KV, D, HEAD_DIM)


@triton.jit
def _decode_logits_kernel(
    X, W, LNW, LNB, RAW, SCORES, PART_V, PART_I, CODES, LEN,
    M, N, K: tl.constexpr, stride_xm, stride_om, stride_pm, eps, begin, below,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    _chain(PDL)
    pid_n, pid_m, rows, row_ok, cols, col_ok = _tile(M, N, BLOCK_M, BLOCK_N)
    acc = _norm_matmul(X, W, LNW, LNB, rows, row_ok, cols, col_ok, stride_xm, K, eps, True, BLOCK_M, BLOCK_N, BLOCK_K)
    # The model computes its logits in its own dtype and the processors see them as float32.
    logits = acc.to(W.dtype.element_ty).to(tl.float32)
    ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * stride_om + cols[None, :]
    tl.store(RAW + offsets, logits, mask=ok)
    if MASKED:
        code = tl.load(CODES + cols, mask=col_ok, other=0).to(tl.int32)
        length = tl.load(LEN)
        off = ((code & 1) != 0) | (((code & 2) != 0) & (length == begin)) | (((code & 4) != 0) & (length < below))
        scores = tl.where(off[None, :], float("-inf"), logits)
        tl.store(SCORES + offsets, scores, mask=ok)
        # Columns past the vocabulary must never win; -inf ties resolve to the first index, as torch.argmax.
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        best = tl.max(scores, axis=1)
        first = tl.min(tl.where(scores == best[:, None], cols[None, :], N), axis=1)
        first = tl.where(best == float("-inf"), pid_n * BLOCK_N, first)
        tl.store(PART_V + rows * stride_pm + pid_n, best, mask=row_ok)
        tl.store(PART_I + rows * stride_pm + pid_n, first, mask=row_ok)


@triton.jit
def _decode_finish_kernel(
    PART_V, PART_I, SEQ, TOKENS, UNFINISHED, LEN, DONE, EOS,
    B, P, stride_pm, stride_sm, stride_tm, n_eos, pad_id,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr,
):
    _chain(PDL)
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < B
    best_v = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    best_i = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = row_ok[:, None] & (ps < P)[None, :]
        v = tl.load(PART_V + rows[:, None] * stride_pm + ps[None, :], mask=ok, other=float("-inf"))
        i = tl.load(PART_I + rows[:, None] * stride_pm + ps[None, :], mask=ok, other=2147483647)
        top = tl.max(v, axis=1)
        at = tl.min(tl.where((v == top[:, None]) & ok, i, 2147483647), axis=1)
        # Strictly greater: an equal maximum in a later block keeps the earlier (smaller) index.
        better = top > best_v
        best_i = tl.where(better, at, best_i)
        best_v = tl.where(better, top, best_v)
    length = tl.load(LEN)
    alive = tl.load(UNFINISHED + rows, mask=row_ok, other=0) != 0
    token = tl.where(alive, best_i.to(tl.int64), pad_id)
    tl.store(SEQ + rows * stride_sm + length, token, mask=row_ok)
    tl.store(TOKENS + rows * stride_tm, token, mask=row_ok)
    is_eos = token < 0
    for e in range(0, n_eos):
        is_eos = is_eos | (token == tl.load(EOS + e))
    alive = alive & ~is_eos
    tl.store(UNFINISHED + rows, alive.to(tl.uint8), mask=row_ok)
    length += 1
    tl.store(LEN, length)
    left = tl.sum(tl.where(row_ok & alive, 1, 0), axis=0)
    done = tl.load(DONE)
    tl.store(DONE, tl.where((left == 0) & (done == 0), length, done))


@triton.jit
def _decode_embed_kernel(TOKENS, E, P, LEN, OUT, stride_tm, stride_om, scale,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    _chain(PDL)
    m = tl.program_id(0)
    token = tl.load(TOKENS + m * stride_tm)
    pos = tl.load(LEN) - 1
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    e = tl.load(E + token * D + d, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(P + pos * D + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + m * stride_om + d, (e * scale + p).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _decode_self_attention_kernel(Q, KC, VC, LEN, OUT, stride_qm, stride_om, stride_cm, stride_ch, stride_cp,
                                  scale, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    _chain(PDL)
    m = tl.program_id(0)
    h = tl.program_id(1)
    count = tl.load(LEN)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + m * stride_qm + h * HEAD_DIM + d).to(tl.float32) * scale
    base = m * stride_cm + h * stride_ch
    best = tl.full((1,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((1,), dtype=tl.float32)
    acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    for p0 in range(0, count, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = ps < count
        k = tl.load(KC + base + ps[:, None] * stride_cp + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        new_best = tl.maximum(best, tl.max(s, axis=0))
        alpha = tl.exp(best - new_best)
        p = tl.exp(s - new_best)
        v = tl.load(VC + base + ps[:, None] * stride_cp + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        total = total * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        best = new_best
    tl.store(OUT + m * stride_om + h * HEAD_DIM + d, (acc / total).to(OUT.dtype.element_ty))


@triton.jit
def _decode_cross_attention_kernel(Q, KC, VC, OUT, PARTS, COUNTERS, T, stride_qm, stride_om, stride_cm, stride_ch,
                                   stride_cp, scale, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                                   SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, PDL: tl.constexpr):
    """Split-KV attention of one query row over the encoder frames: SPLITS programs per (row, head), each over
    BLOCK_T frames, write (max, sum, unnormalised output); the last to arrive merges them in split order."""
    mh = tl.program_id(0)
    split = tl.program_id(1)
    m = mh // H
    h = mh % H
    ps = split * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = ps < T
    d = tl.arange(0, HEAD_DIM)
    cache = m * stride_cm + h * stride_ch + ps[:, None] * stride_cp + d[None, :]
    # The cross-attention keys and values are written once per window, before any step: load them before waiting.
    k = tl.load(KC + cache, mask=ok[:, None], other=0.0)
    v = tl.load(VC + cache, mask=ok[:, None], other=0.0)
    _chain(PDL)
    q = tl.load(Q + m * stride_qm + h * HEAD_DIM + d).to(tl.float32) * scale
    s = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
    best = tl.max(s, axis=0)
    p = tl.exp(s - best)
    part = PARTS + (mh * SPLITS + split) * (HEAD_DIM + 2)
    tl.store(part + d, tl.sum(p[:, None] * v.to(tl.float32), axis=0))
    tl.store(part + HEAD_DIM, best)
    tl.store(part + HEAD_DIM + 1, tl.sum(p, axis=0))
    tl.debug_barrier()  # every thread's partial is stored before the counter moves
    arrived = tl.atomic_add(COUNTERS + mh, 1, sem="acq_rel")
    if arrived == SPLITS - 1:
        sp = tl.arange(0, SPLITS_P2)
        s_ok = sp < SPLITS
        parts = PARTS + (mh * SPLITS + sp) * (HEAD_DIM + 2)
        bests = tl.load(parts + HEAD_DIM, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        sums = tl.load(parts + HEAD_DIM + 1, mask=s_ok, other=0.0, cache_modifier=".cg")
        accs = tl.load(parts[:, None] + d[None, :], mask=s_ok[:, None], other=0.0, cache_modifier=".cg")
        weight = tl.where(s_ok, tl.exp(bests - tl.max(bests, axis=0)), 0.0)
        out = tl.sum(accs * weight[:, None], axis=0) / tl.sum(sums * weight, axis=0)
        tl.store(OUT + m * stride_om + h * HEAD_DIM + d, out.to(OUT.dtype.element_ty))
        tl.store(COUNTERS + mh, 0)  # ready for the next launch (and graph replay)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def _block_m(M):
    # tl.dot needs 16 rows; the padding rows are masked and cost no memory traffic.
    return 16 if M <= 16 else 32


def _config(kind, N, K, M=1):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, split-K). Small output tiles and split-K so that a 1280-wide
    projection still spreads over the SMs: at batch 1 the step is the weights' bytes, and a GEMV that leaves SMs
    idle leaves bandwidth unused."""
    if kind in CONFIG_OVERRIDE:
        config = CONFIG_OVERRIDE[kind]
        return tuple(config) + (1,) * (5 - len(config))
    if _interpreting():
        # The interpreter's cost is per operation, not per element: the largest tiles it allows.
        return (2048, 256, 4, 1, 1) if kind == "logits" else (512, 256, 4, 1, 1)
    # From `benchmarks/decode_kernels.py --sweep` on an H100 (turbo shapes, batch 1 and 16): narrow tiles for the
    # 1280-wide outputs (80 programs), wider ones where N alone gives enough programs; split-K only pays for the
    # long reduction of fc2 (K = 4 d: 11.8 -> 8.6 us at batch 1); at K = 1280 the fixed cost of a launch dominates.
    if kind == "logits":
        return (32, 256, 4, 4, 1) if M <= 1 else (64, 256, 4, 4, 1)
    if K >= 4096:
        return 64, 256, 4, 4, 4
    return (16 if N < 2048 else 32 if N < 4096 else 64), 256, 4, 4, 1


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _pdl(tensor):
    """Launch options and flag for programmatic dependent launch: on CUDA devices of compute capability 9.0 and
    newer with a Triton that has it; LITE_WHISPER_DECODE_PDL=0 turns it off."""
    on = (gdc_wait is not None and not _interpreting() and tensor.device.type == "cuda"
          and os.environ.get("LITE_WHISPER_DECODE_PDL", "1") != "0" and _capability(tensor.device.index or 0)[0] >= 9)
    return ({"launch_pdl": True} if on else {}), on


def _row_kernel(M, K, pdl):
    """Whether a GEMV takes the one-row kernel: LITE_WHISPER_DECODE_ROW=auto (default: with PDL), 1 or 0."""
    mode = os.environ.get("LITE_WHISPER_DECODE_ROW", "auto")
    return M == 1 and K <= ROW_KERNEL_MAX_K and mode != "0" and (pdl or mode == "1")


def _check_half(*tensors):
    for t in tensors:
        if t is not None and t.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"decode kernels take float16/bfloat16 tensors, got {t.dtype}")


def decode_embed(tokens, embed, positions, length, out, scale=1.0):
    M, D = out.shape
    if embed.shape[1] != D or positions.shape[1] != D or not embed.is_contiguous() or not positions.is_contiguous():
        raise ValueError("decode_embed: embed and positions must be contiguous (rows, D) with the output's D")
    launch, pdl = _pdl(out)
    _decode_embed_kernel[(M,)](tokens, embed, positions, length, out, tokens.stride(0), out.stride(0), float(scale),
                               D=D, BLOCK_D=triton.next_power_of_2(D), PDL=pdl, **launch)
    return out


def decode_linear(x, weight, bias, out, norm=None, gelu=False, residual=None, kv=None, length=None, kind=None,
                  workspace=None):
    """See the module docstring. `workspace = (parts, counters)` (float32 of at least split * M * N elements,
    int32 zeros of at least one per output tile, left zero by every call) enables split-K; without it the GEMV
    runs unsplit. Calls that share a workspace must run one after another (one stream)."""
    _check_half(x, weight, out)
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or not weight.is_contiguous() or x.stride(1) != 1:
        raise ValueError(f"decode_linear: x {tuple(x.shape)} (unit column stride) and weight {tuple(weight.shape)} "
                         "(contiguous, out x in) do not chain")
    if kv is None and tuple(out.shape) != (M, N):
        raise ValueError(f"decode_linear: out must be ({M}, {N}), got {tuple(out.shape)}")
    if residual is not None and (tuple(residual.shape) != (M, N) or residual.stride(1) != 1):
        raise ValueError(f"decode_linear: residual must be ({M}, {N}) with unit column stride")
    if kv is not None:
        k_cache, v_cache = kv
        if N % 3 or tuple(out.shape) != (M, N // 3) or length is None or k_cache.stride() != v_cache.stride():
            raise ValueError("decode_linear: with kv, weight is q|k|v (3D, K), out (M, D), and length is given")
        head_dim = k_cache.shape[-1]
        cache_strides = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
    else:
        k_cache = v_cache = out
        head_dim, cache_strides = 1, (0, 0, 0)
    ln_w, ln_b, eps = norm if norm is not None else (weight, weight, 0.0)
    launch, pdl = _pdl(out)
    if _row_kernel(M, K, pdl):
        k_pad = triton.next_power_of_2(K)
        # The interpreter's cost is per program and operation: wide blocks there.
        block_n = INTERPRETER_BLOCKS["row"] if _interpreting() else max(1, min(16, ROW_KERNEL_SLAB // k_pad))
        _decode_row_kernel[(triton.cdiv(N, block_n),)](
            x, weight, bias if bias is not None else weight, ln_w, ln_b, residual if residual is not None else out,
            out, k_cache, v_cache, length if length is not None else out,
            N, K, *cache_strides, float(eps),
            HAS_LN=norm is not None, HAS_BIAS=bias is not None, GELU=gelu, HAS_RES=residual is not None,
            KV=kv is not None, D=N // 3 if kv is not None else 1, HEAD_DIM=head_dim,
            K_PAD=k_pad, BLOCK_N=block_n, PDL=pdl, num_warps=8, **launch,
        )
        return out
    block_n, block_k, warps, stages, split = _config(kind or ("kv" if kv else "linear"), N, K, M)
    block_m = _block_m(M)
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    if workspace is None or split * M * N > workspace[0].numel() or tiles > workspace[1].numel():
        split = 1
    parts, counters = workspace if split > 1 else (out, out)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split)
    _decode_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, ln_w, ln_b, residual if residual is not None else out, out,
        k_cache, v_cache, length if length is not None else out, parts, counters,
        M, N, K, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), *cache_strides,
        float(eps),
        HAS_LN=norm is not None, HAS_BIAS=bias is not None, GELU=gelu, HAS_RES=residual is not None,
        KV=kv is not None, D=N // 3 if kv is not None else 1, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, num_warps=warps, num_stages=stages,
        PDL=pdl, **launch,
    )
    return out


def decode_workspace(rows, widest, device, tiles=4096, split=4):
    """(parts, counters) for `decode_linear`'s split-K, for outputs up to `widest` columns at `rows` rows."""
    return (torch.empty(split * rows * widest, dtype=torch.float32, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device))


def decode_self_attention(q, k_cache, v_cache, length, out, scale):
    M, width = q.shape
    heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    if heads * head_dim != width or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("decode_self_attention: q (M, H*d) and caches (M, H, max_len, d) with unit last stride")
    launch, pdl = _pdl(out)
    _decode_self_attention_kernel[(M, heads)](
        q, k_cache, v_cache, length, out, q.stride(0), out.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), float(scale),
        HEAD_DIM=head_dim, BLOCK_P=16 if _interpreting() else 64, num_warps=4, PDL=pdl, **launch,
    )
    return out


def cross_attention_kernel(rows, tensor):
    """Whether `decode_cross_attention` should replace SDPA for a step of `rows` rows on `tensor`'s device:
    LITE_WHISPER_DECODE_CROSS=auto (default: one row, with programmatic dependent launch; from 8 rows SDPA already
    runs at the memory floor), 1 or 0."""
    mode = os.environ.get("LITE_WHISPER_DECODE_CROSS", "auto")
    return mode == "1" or (mode != "0" and rows == 1 and _pdl(tensor)[1])


def cross_attention_workspace(rows, heads, frames, head_dim):
    """float32 elements of `workspace[0]` that `decode_cross_attention` needs."""
    return rows * heads * triton.cdiv(frames, _cross_block_t()) * (head_dim + 2)


def _cross_block_t():
    return INTERPRETER_BLOCKS["cross"] if _interpreting() else CROSS_BLOCK_T


def decode_cross_attention(q, k, v, out, scale, workspace):
    """softmax(scale q k^T) v per row and head over all frames of the cross-attention keys/values k, v (M, H, T, d),
    q and out (M, H*d); `workspace = (parts, counters)` as `decode_workspace` makes them (counters left zero)."""
    _check_half(q, k, out)
    M, width = q.shape
    heads, frames, head_dim = k.shape[1], k.shape[2], k.shape[3]
    if heads * head_dim != width or k.stride() != v.stride() or k.stride(3) != 1 or tuple(out.shape) != (M, width):
        raise ValueError("decode_cross_attention: q and out (M, H*d), k and v (M, H, T, d) alike, unit last stride")
    parts, counters = workspace
    if parts.numel() < cross_attention_workspace(M, heads, frames, head_dim) or counters.numel() < M * heads:
        raise ValueError("decode_cross_attention: workspace too small for "
                         f"{cross_attention_workspace(M, heads, frames, head_dim)} partials and {M * heads} counters")
    block_t = _cross_block_t()
    splits = triton.cdiv(frames, block_t)
    launch, pdl = _pdl(out)
    _decode_cross_attention_kernel[(M * heads, splits)](
        q, k, v, out, parts, counters, frames, q.stride(0), out.stride(0), k.stride(0), k.stride(1), k.stride(2),
        float(scale), H=heads, HEAD_DIM=head_dim, BLOCK_T=block_t, SPLITS=splits,
        SPLITS_P2=triton.next_power_of_2(splits), PDL=pdl, num_warps=4, **launch,
    )
    return out


def logits_blocks(vocab, rows):
    """Number of partial-argmax blocks `decode_logits` writes per row (the partials' second dimension)."""
    block_n = _config("logits", vocab, 0, rows)[0]
    return triton.cdiv(vocab, block_n)


def decode_logits(x, norm, embed, raw, scores=None, partial_v=None, partial_i=None, codes=None, length=None,
                  begin=-1, below=-1):
    _check_half(x, embed)
    M, K = x.shape
    N = embed.shape[0]
    if embed.shape[1] != K or not embed.is_contiguous() or raw.dtype != torch.float32 or raw.stride(1) != 1:
        raise ValueError("decode_logits: embed (vocab, K) contiguous, raw float32 (M, vocab)")
    masked = codes is not None
    if masked and (scores.stride() != raw.stride() or tuple(partial_v.shape) != (M, logits_blocks(N, M))):
        raise ValueError("decode_logits: scores like raw, partials (M, logits_blocks(vocab, M))")
    block_n, block_k, warps, stages, _ = _config("logits", N, K, M)
    block_m = _block_m(M)
    ln_w, ln_b, eps = norm
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    launch, pdl = _pdl(raw)
    _decode_logits_kernel[grid](
        x, embed, ln_w, ln_b, raw, scores if masked else raw, partial_v if masked else raw,
        partial_i if masked else raw, codes if masked else raw, length if masked else raw,
        M, N, K, x.stride(0), raw.stride(0), partial_v.stride(0) if masked else 0, float(eps), int(begin), int(below),
        MASKED=masked, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        PDL=pdl, **launch,
    )
    return raw


def decode_finish(partial_v, partial_i, sequences, tokens, unfinished, length, done_len, eos, pad_id):
    B, P = partial_v.shape
    if unfinished.dtype != torch.uint8:
        raise ValueError("decode_finish: pass the unfinished flags as uint8 (bool_tensor.view(torch.uint8))")
    # One program reads every row's partials: wide blocks, so that a batch-1 row (1,621 partials) takes one pass
    # of independent loads instead of a chain of dependent ones (17 us at 64 a pass on an H100).
    block_b = max(2, triton.next_power_of_2(B))
    launch, pdl = _pdl(sequences)
    _decode_finish_kernel[(1,)](
        partial_v, partial_i, sequences, tokens, unfinished, length, done_len, eos if eos.numel() else length,
        B, P, partial_v.stride(0), sequences.stride(0), tokens.stride(0), eos.numel(), int(pad_id),
        BLOCK_B=block_b, BLOCK_P=max(16, min(triton.next_power_of_2(P), 4096 // block_b)), num_warps=8,
        PDL=pdl, **launch,
    )
