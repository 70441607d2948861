"""Kernel-backed forward for Whisper encoder layers, and the per-layer plan that decides what runs where.

`enable_encoder(model)` gives each `WhisperEncoderLayer` an instance-level `forward` (the class method is untouched,
so `disable_encoder` restores the stock path exactly by deleting the attribute) and a `_LayerPlan` holding the only
derived tensors: the concatenated q/k/v first factors, the per-head score matrices M_h where attention runs in the
reduced dimension, and the padded factors that fold bias + residual into cuBLAS. They are rebuilt whenever a
parameter they come from changes in place or moves (tracked through version counters and data pointers), and on
every `enable`.

What a planned layer runs (fp16/bf16, CUDA, inference only), eagerly or under CUDA-graph capture or torch.compile:
  LN -> one GEMM for the q, k and v first factors -> attention: SDPA on strided views of the second factors, or
  the reduced-dimension Triton kernel (attention.py) where the FLOP/byte rule in `plan_layer` says it is cheaper
  -> out_proj: first factor with a ones column, second factor with the bias row, beta=1 residual (two cuBLAS GEMMs,
  no elementwise pass) -> LN -> fc1 with bias + GELU in the cuBLASLt epilogue -> fc2 like out_proj (full-rank fc2:
  beta=1 residual, then the bias) -> fp16 clamp as the stock layer does.
The Triton fused-epilogue GEMM (linear.py) replaces a cuBLAS path only where the same rule says it pays
(`_LayerPlan._triton_pays`); on Hopper it runs at about half of cuBLAS's rate, so for Whisper's shapes it does not.
Anything else (training, grad enabled, an attention mask, head masks, output_attentions, hooks on self_attn that
capture attention weights, another dtype or device) falls back to the stock forward for that call.
"""

import inspect
import logging

import torch
from torch.nn import functional as F

from .attention import lowrank_attention
from .linear import fused_linear
from .reference import next_power_of_two, qk_matrices

logger = logging.getLogger(__name__)

ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj")
# The fused Triton GEMM (linear.py) reaches about half of cuBLAS's rate on these shapes (H200, fp16, batch 8:
# 318 against 624 TFLOP/s; benchmarks/NOTES_cuda.md), so the rule charges its FLOPs twice: with cuBLAS doing the
# GEMMs and the epilogues folded into cuBLAS (below), the rule never picks it for Whisper's shapes.
TRITON_GEMM_SLOWDOWN = 2.0
# Our Triton attention against PyTorch's SDPA (cuDNN backend) at equal FLOPs, charged to all of the kernel's T x T
# products. Measured on an H200, fp16, d=64: 1.15x at batch 8 and 1.25x at batch 1 for the attention alone; 1.35
# also reproduces the per-layer measurement (layers with q/k ranks padded to 64 ran 1-2% faster on SDPA, layer 0
# with q/k 32 and v 48 ran 7% faster on the kernel; benchmarks/NOTES_cuda.md).
ATTENTION_KERNEL_SLOWDOWN = 1.35
# (qk_reduced, v_reduced) to use for every layer whose ranks the kernel takes, instead of the rule: for tests and
# for the real-weights check, which has no layer where the rule picks the kernel.
ATTENTION_PLAN_OVERRIDE = None
# Where fc1's GELU runs when cuBLAS does the GEMM: "cublaslt" (the GEMM's epilogue, tanh-form GELU) or "torch"
# (a separate exact-GELU pass).
GELU_EPILOGUE = "cublaslt" if hasattr(torch, "_addmm_activation") else "torch"
# Low-rank out_proj/fc2 + bias + residual as two plain cuBLAS GEMMs (ones column / bias row, beta=1).
AUGMENT_RESIDUAL = True
# Width added to a rank for the ones column, so rows stay 16-byte aligned.
_AUGMENT = 8
# Cost rule constants (H100 class): only their ratio matters for the decisions.
PEAK_FLOPS = 790e12
PEAK_BYTES = 3.0e12

_GELU_CLASS_NAMES = ("GELUActivation",)


def _is_low_rank(module):
    return hasattr(module, "weight1") and hasattr(module, "weight2")


def _roofline(flops, nbytes):
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES)


def plan_layer(ranks, num_heads, head_dim, length=1500, itemsize=2):
    """FLOP/byte rule (per token, analytic; no measurement) for the attention of one layer.

    ranks: dict of q_proj/k_proj/v_proj ranks (all three low-rank). Returns (qk_reduced, v_reduced).
    Compares the four ways to run the attention: SDPA on materialised q, k, v (three second-factor GEMMs, each the
    larger of its FLOP and byte time), or our Triton kernel with the q/k side, the v side or both in the reduced
    dimension. The kernel runs the whole attention whenever either side is reduced, so all its T x T products are
    charged ATTENTION_KERNEL_SLOWDOWN; a reduced side costs its padded rank instead of d in those products, plus its
    prologue (xq M_h) or epilogue (. Wv2_h), and saves its second-factor GEMMs.
    """
    width = num_heads * head_dim
    rq, rk, rv = ranks["q_proj"], ranks["k_proj"], ranks["v_proj"]
    if head_dim & (head_dim - 1) or not 32 <= head_dim <= 128:
        return False, False

    def product(inner):  # one T x T product per head, over `inner`
        return 2 * length * num_heads * inner / PEAK_FLOPS

    def second_factor(r):
        return _roofline(2 * r * width, itemsize * (r + 2 * width))

    def padded(r):
        return max(16, next_power_of_two(r))

    qk_ok = all(r % 16 == 0 and r <= 256 for r in (rq, rk))
    v_ok = rv % 16 == 0 and rv <= 256
    best, choice = None, (False, False)
    for qk_reduced in (False, True):
        for v_reduced in (False, True):
            if (qk_reduced and not qk_ok) or (v_reduced and not v_ok):
                continue
            cost = 0.0
            if qk_reduced:
                products = product(padded(rk))
                cost += _roofline(2 * rq * rk * num_heads, 0)
            else:
                products = product(head_dim)
                cost += second_factor(rq) + second_factor(rk)
            if v_reduced:
                products += product(padded(rv))
                cost += _roofline(2 * padded(rv) * width, 0)
            else:
                products += product(head_dim)
                cost += second_factor(rv)
            uses_kernel = qk_reduced or v_reduced
            cost += products * (ATTENTION_KERNEL_SLOWDOWN if uses_kernel else 1.0)
            if best is None or cost < best:
                best, choice = cost, (qk_reduced, v_reduced)
    return choice


class _LayerPlan:
    """Derived tensors and decisions for one encoder layer."""

    def __init__(self, layer, returns_tuple):
        attn = layer.self_attn
        self.returns_tuple = returns_tuple
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.fused_qkv = all(_is_low_rank(getattr(attn, key)) for key in ATTENTION_KEYS)
        self.gelu = type(layer.activation_fn).__name__ in _GELU_CLASS_NAMES
        self.qk_reduced = self.v_reduced = False
        if self.fused_qkv:
            ranks = {key: getattr(attn, key).rank for key in ATTENTION_KEYS}
            self.ranks = ranks
            self.qk_reduced, self.v_reduced = plan_layer(ranks, self.num_heads, self.head_dim)
            if ATTENTION_PLAN_OVERRIDE is not None:
                qk_ok = all(r % 16 == 0 and r <= 256 for r in (ranks["q_proj"], ranks["k_proj"]))
                v_ok = ranks["v_proj"] % 16 == 0 and ranks["v_proj"] <= 256
                head_ok = 32 <= self.head_dim <= 128 and not self.head_dim & (self.head_dim - 1)
                self.qk_reduced = ATTENTION_PLAN_OVERRIDE[0] and qk_ok and head_ok
                self.v_reduced = ATTENTION_PLAN_OVERRIDE[1] and v_ok and head_ok
        self.gelu_epilogue = GELU_EPILOGUE
        self.triton_epilogue = {key: self._triton_pays(layer, key) for key in ("out_proj", "fc1", "fc2")}
        self.augmented = {}
        self.sources = self._source_tensors(layer)
        self.versions = None
        self.refresh(layer)

    def _triton_pays(self, layer, key, itemsize=2):
        """FLOP/byte rule, per token: fused Triton GEMM vs cuBLAS GEMM plus whatever epilogue pass remains."""
        module = layer.fc1 if key == "fc1" else layer.fc2 if key == "fc2" else layer.self_attn.out_proj
        low_rank = _is_low_rank(module)
        k_in, n_out = (module.weight2.shape if low_rank else module.weight.t().shape)
        gemm_flops = 2 * k_in * n_out
        gemm_bytes = itemsize * (k_in + n_out)
        if key == "fc1":
            if not self.gelu:
                return False
            extra = 0 if self.gelu_epilogue == "cublaslt" else 2 * itemsize * n_out
        else:
            extra = 0 if (low_rank and AUGMENT_RESIDUAL) else 2 * itemsize * n_out
            gemm_bytes += itemsize * n_out  # the residual is read either way
        cublas = _roofline(gemm_flops, gemm_bytes) + extra / PEAK_BYTES
        triton = _roofline(gemm_flops * TRITON_GEMM_SLOWDOWN, gemm_bytes)
        return triton < cublas

    def _source_tensors(self, layer):
        attn = layer.self_attn
        if not self.fused_qkv:
            return tuple(t for m in self._augmentable(layer).values() for t in (m.weight1, m.weight2, m.bias))
        tensors = [getattr(attn, key).weight1 for key in ATTENTION_KEYS]
        if self.qk_reduced:
            tensors += [attn.q_proj.weight2, attn.q_proj.bias, attn.k_proj.weight2]
        for module in self._augmentable(layer).values():
            tensors += [module.weight1, module.weight2, module.bias]
        return tuple(tensors)

    def _augmentable(self, layer):
        if not AUGMENT_RESIDUAL:
            return {}
        found = {"out_proj": layer.self_attn.out_proj, "fc2": layer.fc2}
        return {k: m for k, m in found.items() if _is_low_rank(m) and not self.triton_epilogue.get(k)}

    def _current_versions(self):
        # data_ptr catches .to()/.half(), which swap a parameter's storage without bumping its version.
        return tuple((t.data_ptr(), t._version) for t in self.sources)

    def refresh(self, layer):
        """(Re)build the derived tensors from the layer's parameters."""
        attn = layer.self_attn
        with torch.no_grad():
            if self.fused_qkv:
                self.w1_qkv = torch.cat([getattr(attn, key).weight1 for key in ATTENTION_KEYS], dim=1).contiguous()
                if self.qk_reduced:
                    m, u = qk_matrices(attn.q_proj.weight2, attn.q_proj.bias, attn.k_proj.weight2, self.num_heads)
                    dtype = attn.q_proj.weight2.dtype
                    self.qk_matrix, self.qk_bias = m.to(dtype).contiguous(), u.to(dtype).contiguous()
            self.augmented = {}
            for key, module in self._augmentable(layer).items():
                w1, w2 = module.weight1, module.weight2
                rank = w1.shape[1]
                w1_aug = torch.zeros(w1.shape[0], rank + _AUGMENT, dtype=w1.dtype, device=w1.device)
                w1_aug[:, :rank] = w1
                ones = torch.zeros(rank + _AUGMENT, dtype=w1.dtype, device=w1.device)
                ones[rank] = 1
                w2_aug = torch.zeros(rank + _AUGMENT, w2.shape[1], dtype=w2.dtype, device=w2.device)
                w2_aug[:rank] = w2
                w2_aug[rank] = module.bias
                self.augmented[key] = (w1_aug, ones, w2_aug)
        self.sources = self._source_tensors(layer)
        self.versions = self._current_versions()

    def describe(self):
        triton = [k for k, v in self.triton_epilogue.items() if v]
        epilogues = f"GELU in {self.gelu_epilogue}" + (f", Triton GEMM for {'/'.join(triton)}" if triton else "")
        epilogues += f", bias+residual folded into cuBLAS for {'/'.join(self.augmented) or 'none'}"
        if not self.fused_qkv:
            return "stock attention; " + epilogues
        sides = ("q/k reduced" if self.qk_reduced else "q/k SDPA") + ", " + ("v reduced" if self.v_reduced else "v SDPA")
        return f"fused q/k/v first factors, {sides}; {epilogues}"


def _use_custom_ops():
    return torch.compiler.is_compiling()


def _triton_linear(x, weight, bias, gelu=False, residual=None, clamp_fp16=False):
    if _use_custom_ops():
        from . import ops

        return ops.fused_linear_op(x, weight, bias, gelu, residual, clamp_fp16)
    return fused_linear(x, weight, bias, gelu=gelu, residual=residual, clamp_fp16=clamp_fp16)


def _gelu_linear(x, weight, bias, epilogue):
    """act(x @ weight + bias) with the GELU where `epilogue` says (see GELU_EPILOGUE)."""
    if epilogue == "triton":
        return _triton_linear(x, weight, bias, gelu=True)
    if epilogue == "cublaslt":
        # cuBLASLt's GELU+bias epilogue (tanh form of GELU, at most 4.7e-4 from the exact one, under a quarter of
        # an fp16 ulp where it peaks) saves a full pass over the (M, ffn) activation.
        return torch._addmm_activation(bias, x, weight, use_gelu=True)
    return F.gelu(torch.addmm(bias, x, weight))


def _projection(plan, key, module, x, gelu=False, residual=None, clamp_fp16=False):
    """One encoder projection, its epilogue (bias, GELU, residual add, fp16 clamp) as fused as the plan allows."""
    low_rank = _is_low_rank(module)
    if plan.triton_epilogue.get(key):
        if low_rank:
            x = torch.mm(x, module.weight1)
        weight = module.weight2 if low_rank else module.weight.t()
        return _triton_linear(x, weight, module.bias, gelu, residual, clamp_fp16)
    if gelu:
        if low_rank:
            x = torch.mm(x, module.weight1)
        weight = module.weight2 if low_rank else module.weight.t()
        return _gelu_linear(x, weight, module.bias, plan.gelu_epilogue)
    if residual is None:
        return module(x)
    augmented = plan.augmented.get(key)
    if augmented is not None:
        # residual + x W1 W2 + b as two cuBLAS GEMMs and no elementwise pass: the first GEMM's bias epilogue writes
        # a column of ones after x W1, the second GEMM's extra row is b, and beta=1 adds the residual.
        w1, ones, w2 = augmented
        out = torch.addmm(residual, torch.addmm(ones, x, w1), w2)
    else:
        weight = module.weight2 if low_rank else module.weight.t()
        if low_rank:
            x = torch.mm(x, module.weight1)
        out = torch.addmm(residual, x, weight).add_(module.bias)
    if clamp_fp16:
        limit = torch.finfo(torch.float16).max - 1000
        out = out.clamp_(-limit, limit)
    return out


def _attention(plan, attn, x, batch):
    """Self-attention output before out_proj, (B*T, width)."""
    length = x.shape[0] // batch
    width = plan.num_heads * plan.head_dim
    if not plan.fused_qkv:
        # transformers 4.x returns (out, weights, past), 5.x (out, weights); out_proj is already applied.
        out = attn(hidden_states=x.view(batch, length, -1), attention_mask=None)[0]
        return None, out
    rq, rk = plan.ranks["q_proj"], plan.ranks["k_proj"]
    xqkv = torch.mm(x, plan.w1_qkv)
    xq, xk, xv = xqkv[:, :rq], xqkv[:, rq : rq + rk], xqkv[:, rq + rk :]
    if plan.qk_reduced:
        q_src, k_src = xq, xk
    else:
        # The k bias is left out: it adds a constant to every score of a row, which softmax cancels.
        q_src = torch.addmm(attn.q_proj.bias, xq, attn.q_proj.weight2)
        k_src = torch.mm(xk, attn.k_proj.weight2)
    v_src = xv if plan.v_reduced else torch.addmm(attn.v_proj.bias, xv, attn.v_proj.weight2)
    if plan.qk_reduced or plan.v_reduced:
        args = (q_src, k_src, v_src, batch, plan.num_heads, plan.head_dim, plan.scaling,
                plan.qk_matrix if plan.qk_reduced else None, plan.qk_bias if plan.qk_reduced else None,
                attn.v_proj.weight2 if plan.v_reduced else None, attn.v_proj.bias if plan.v_reduced else None)
        if _use_custom_ops():
            from . import ops

            return ops.lowrank_attention_op(*args), None
        return lowrank_attention(*args), None

    def heads(t):
        return t.view(batch, length, plan.num_heads, plan.head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q_src), heads(k_src), heads(v_src), scale=plan.scaling)
    return out.transpose(1, 2).reshape(batch * length, width), None


def _fast_path_ok(layer, plan, hidden_states, attention_mask, args, kwargs):
    if layer.training or torch.is_grad_enabled():
        return False
    if attention_mask is not None or not hidden_states.is_cuda or hidden_states.dim() != 3:
        return False
    if hidden_states.dtype not in (torch.float16, torch.bfloat16):
        return False
    if hidden_states.dtype != layer.fc1.bias.dtype or hidden_states.device != layer.fc1.bias.device:
        return False
    head_mask = kwargs.get("layer_head_mask", args[0] if args else None)
    if head_mask is not None or kwargs.get("output_attentions") or (len(args) > 1 and args[1]):
        return False
    # transformers 5 records attention weights through hooks on the attention module (output_attentions).
    if layer.self_attn._forward_hooks or layer.self_attn._forward_pre_hooks:
        return False
    return True


def kernel_forward(layer, hidden_states, attention_mask=None, *args, **kwargs):
    """Drop-in `WhisperEncoderLayer.forward` (transformers 4.49 and 5.x signatures and return structures)."""
    plan = layer._lite_whisper_plan
    if not _fast_path_ok(layer, plan, hidden_states, attention_mask, args, kwargs):
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
    if not _use_custom_ops() and not torch.cuda.is_current_stream_capturing():
        if plan._current_versions() != plan.versions:
            plan.refresh(layer)

    batch, length, width = hidden_states.shape
    # At batch 1 the encoder's first hidden state is a permuted view; the GEMM epilogues want unit column stride.
    residual = hidden_states.reshape(batch * length, width).contiguous()
    x = layer.self_attn_layer_norm(hidden_states).reshape(batch * length, width)
    attn_out, stock_out = _attention(plan, layer.self_attn, x, batch)
    if stock_out is not None:
        hidden = residual + stock_out.reshape(batch * length, width)
    else:
        hidden = _projection(plan, "out_proj", layer.self_attn.out_proj, attn_out, residual=residual)

    x = layer.final_layer_norm(hidden)
    if plan.gelu:
        x = _projection(plan, "fc1", layer.fc1, x, gelu=True)
    else:
        x = layer.activation_fn(layer.fc1(x))
    out = _projection(plan, "fc2", layer.fc2, x, residual=hidden, clamp_fp16=hidden.dtype == torch.float16)
    out = out.view(batch, length, width)
    return (out,) if plan.returns_tuple else out


def _stock_returns_tuple(layer):
    # transformers 4.x: forward(hidden_states, attention_mask, layer_head_mask, output_attentions) -> tuple;
    # transformers 5.x: forward(hidden_states, attention_mask, **kwargs) -> tensor.
    return "output_attentions" in inspect.signature(type(layer).forward).parameters


def _supported(layer):
    attn = getattr(layer, "self_attn", None)
    needed = ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2", "activation_fn")
    if attn is None or not all(hasattr(layer, name) for name in needed):
        return False
    return getattr(attn, "head_dim", 0) > 0


def enable_encoder(model):
    encoder = model.model.encoder
    first = next(encoder.parameters())
    if first.device.type != "cuda":
        return 0
    changed = 0
    for index, layer in enumerate(encoder.layers):
        if not _supported(layer):
            continue
        layer._lite_whisper_plan = _LayerPlan(layer, _stock_returns_tuple(layer))
        layer.forward = kernel_forward.__get__(layer)
        logger.info("encoder layer %d: %s", index, layer._lite_whisper_plan.describe())
        changed += 1
    return changed


def disable_encoder(model):
    restored = 0
    for layer in model.model.encoder.layers:
        if "forward" in layer.__dict__:
            del layer.forward
            restored += 1
        layer.__dict__.pop("_lite_whisper_plan", None)
    return restored
