"""PyTorch references for the Triton kernels of lite_whisper.kernels (torch only: importable without triton).

Each function states the contract its kernel implements; the tests compare kernel and reference on random inputs.
They compute in float32 and return the input dtype, so they are also the slow path on machines without a GPU.
"""

import math

import torch
from torch.nn import functional as F


def fused_linear_reference(x, weight, bias=None, gelu=False, residual=None, clamp_fp16=False):
    """y = [clamp](residual + act(x @ weight + bias)), act = exact (erf) GELU when `gelu`, else identity.

    Shapes: x (M, K), weight (K, N) (any strides: pass `linear.weight.t()` for an nn.Linear), bias (N,),
    residual (M, N). Returns (M, N) in x's dtype. `clamp_fp16` clamps to +-(fp16 max - 1000), as Whisper's
    encoder layer does after its last residual add in float16.
    """
    y = x.float() @ weight.float()
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y)
    if residual is not None:
        y = y + residual.float()
    if clamp_fp16:
        limit = torch.finfo(torch.float16).max - 1000
        y = y.clamp(-limit, limit)
    return y.to(x.dtype)


def qk_matrices(q_weight2, q_bias, k_weight2, num_heads):
    """Per-head score matrices of a low-rank q/k pair: M_h = Wq2_h @ Wk2_h^T and u_h = bq_h @ Wk2_h^T.

    With q_h = xq @ Wq2_h + bq_h and k_h = xk @ Wk2_h + bk_h, the scores are
    q_h k_h^T = (xq @ M_h + u_h) @ xk^T + (terms constant along each score row, which softmax cancels),
    so attention never needs q_h or k_h, and the k bias drops out exactly.

    Shapes: q_weight2 (rq, H*d), q_bias (H*d,), k_weight2 (rk, H*d). Returns M (H, rq, rk) and u (H, rk) in
    float32 (the caller casts them once).
    """
    rq, width = q_weight2.shape
    rk = k_weight2.shape[0]
    head_dim = width // num_heads
    wq = q_weight2.float().reshape(rq, num_heads, head_dim).permute(1, 0, 2)  # H, rq, d
    wk = k_weight2.float().reshape(rk, num_heads, head_dim).permute(1, 0, 2)  # H, rk, d
    m = wq @ wk.transpose(1, 2)
    u = (q_bias.float().reshape(num_heads, 1, head_dim) @ wk.transpose(1, 2)).reshape(num_heads, rk)
    return m, u


def lowrank_attention_reference(xq, xk, xv, q_weight2, q_bias, k_weight2, v_weight2, v_bias, num_heads, scaling=None):
    """Softmax self-attention of low-rank projections, heads concatenated, before the output projection.

    q = xq @ q_weight2 + q_bias, k = xk @ k_weight2 (a k bias would cancel), v = xv @ v_weight2 + v_bias, split
    into `num_heads` heads of d = width / num_heads; out_h = softmax(scaling * q_h k_h^T) v_h, no mask.

    Shapes: xq (B, T, rq), xk (B, T, rk), xv (B, T, rv); q_weight2 (rq, H*d), k_weight2 (rk, H*d),
    v_weight2 (rv, H*d); biases (H*d,). Returns (B, T, H*d) in xq's dtype. scaling defaults to d**-0.5.
    """
    batch, length, _ = xq.shape
    width = q_weight2.shape[1]
    head_dim = width // num_heads
    scaling = head_dim**-0.5 if scaling is None else scaling
    q = xq.float() @ q_weight2.float() + q_bias.float()
    k = xk.float() @ k_weight2.float()
    v = xv.float() @ v_weight2.float() + v_bias.float()

    def heads(t):
        return t.reshape(batch, length, num_heads, head_dim).transpose(1, 2)

    scores = (heads(q) * scaling) @ heads(k).transpose(-1, -2)
    out = torch.softmax(scores, dim=-1) @ heads(v)
    return out.transpose(1, 2).reshape(batch, length, width).to(xq.dtype)


def next_power_of_two(n):
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


# --------------------------------------------------------------------------------------------------------------
# Decoder-step kernels (`decode.py`): one greedy token per row; the state tensors are updated in place.
# --------------------------------------------------------------------------------------------------------------


def decode_embed_reference(tokens, embed, positions, length, scale=1.0):
    """embed[tokens[:, 0]] * scale + positions[length - 1], in float32, returned in embed's dtype."""
    pos = int(length) - 1
    return (embed[tokens[:, 0]].float() * scale + positions[pos].float()).to(embed.dtype)


def decode_linear_reference(x, weight, bias=None, norm=None, gelu=False, residual=None):
    """y = [residual +] act(LN(x) @ weight.T + bias); LN's output rounded to the weight's dtype before the GEMV.

    weight (N, K) as nn.Linear stores it; norm = (ln_weight, ln_bias, eps) or None. Returns (M, N) in x's dtype.
    """
    if norm is not None:
        ln_w, ln_b, eps = norm
        x = F.layer_norm(x.float(), (x.shape[-1],), ln_w.float(), ln_b.float(), eps).to(weight.dtype)
    return fused_linear_reference(x, weight.t(), bias, gelu=gelu, residual=residual)


def decode_self_attention_reference(q, k_cache, v_cache, length, scale):
    """softmax(scale q k^T) v over cache positions 0..length-1, per row and head; q (M, H*d) -> (M, H*d)."""
    rows, width = q.shape
    heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    count = int(length)
    qh = q.float().view(rows, heads, 1, head_dim)
    k = k_cache[:, :, :count].float()
    v = v_cache[:, :, :count].float()
    out = torch.softmax(scale * qh @ k.transpose(-1, -2), dim=-1) @ v
    return out.reshape(rows, width).to(q.dtype)


def decode_cross_attention_reference(q, k, v, scale):
    """softmax(scale q k^T) v over all frames, per row and head; q (M, H*d), k and v (M, H, T, d) -> (M, H*d)."""
    rows, width = q.shape
    heads, head_dim = k.shape[1], k.shape[3]
    qh = q.float().view(rows, heads, 1, head_dim)
    out = torch.softmax(scale * qh @ k.float().transpose(-1, -2), dim=-1) @ v.float()
    return out.reshape(rows, width).to(q.dtype)


def token_mask_codes(vocab, always=(), at_begin=(), below=()):
    """The int8 token-mask code `decode_logits` reads: bit 1 always masked, bit 2 at length == begin, bit 4 while
    length < below."""
    codes = torch.zeros(vocab, dtype=torch.int8)
    for bit, ids in ((1, always), (2, at_begin), (4, below)):
        ids = [i for i in ids if 0 <= i < vocab]
        if ids:
            codes[torch.tensor(ids)] |= bit
    return codes


def decode_logits_reference(x, norm, embed, codes=None, length=None, begin=-1, below=-1):
    """raw = float32(LN(x) @ embed.T rounded to embed's dtype); scores = raw masked by the codes; and the argmax of
    the scores per row (first index of the maximum). Returns (raw, scores, argmax)."""
    ln_w, ln_b, eps = norm
    h = F.layer_norm(x.float(), (x.shape[-1],), ln_w.float(), ln_b.float(), eps).to(embed.dtype)
    raw = (h.float() @ embed.float().t()).to(embed.dtype).float()
    if codes is None:
        return raw, None, None
    n = int(length)
    c = codes.to(torch.int32)
    off = (c & 1).bool() | ((c & 2).bool() & (n == begin)) | ((c & 4).bool() & (n < below))
    scores = raw.masked_fill(off, float("-inf"))
    return raw, scores, scores.argmax(dim=-1)


def decode_finish_reference(best, sequences, tokens, unfinished, length, done_len, eos, pad_id):
    """The bookkeeping after the argmax `best` (rows,): pads finished rows, appends at `length`, clears rows that
    emitted an EOS id, increments length and sets done_len (once) when no row is left. Updates the tensors."""
    n = int(length)
    token = torch.where(unfinished, best, torch.full_like(best, pad_id))
    sequences[:, n] = token
    tokens[:, 0] = token
    if eos.numel():
        unfinished &= ~torch.isin(token, eos)
    length += 1
    if not bool(unfinished.any()) and int(done_len) == 0:
        done_len.fill_(n + 1)
