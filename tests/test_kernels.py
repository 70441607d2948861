"""Tests of lite_whisper.kernels: each Triton kernel against its PyTorch reference, and enable/disable.

On a CPU machine the kernel tests run through Triton's interpreter (TRITON_INTERPRET=1, set below before triton is
imported, small shapes); they are skipped when triton is not installed. Tests marked `gpu` need CUDA.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is first imported anywhere in this process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'lite-whisper[triton]')")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
DEVICE = "cuda" if HAS_CUDA else "cpu"


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm()).item()


def dtypes():
    # Triton's CPU interpreter (checked with triton 3.9) returns garbage for tl.dot on bfloat16 operands, so bf16
    # is covered by the GPU run only.
    return [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# --- import hygiene and CPU behaviour (no triton needed) --------------------------------------------------------


def test_package_init_does_not_import_triton():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('lw_kernels_probe', r'{KERNELS_DIR / '__init__.py'}')\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert callable(module.enable) and callable(module.disable)\n"
        "assert 'triton' not in sys.modules, 'kernels/__init__.py imported triton'\n"
        "import lite_whisper.kernels\n"
        "loaded = [m for m in sys.modules if m.startswith('lite_whisper.kernels.')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _tiny_lite_whisper():
    from lite_whisper import LiteWhisperConfig, LiteWhisperForConditionalGeneration

    config = LiteWhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=8, max_source_positions=20, max_target_positions=16,
        vocab_size=100, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
        low_rank_config=[{"q_proj": 16, "k_proj": 16, "v_proj": 16, "fc1": 32}, {"fc2": 32}],
    )
    return LiteWhisperForConditionalGeneration(config).eval()


def test_enable_is_noop_on_cpu_model():
    from lite_whisper import kernels

    model = _tiny_lite_whisper()
    assert kernels.enable(model) == 0
    assert all("forward" not in layer.__dict__ for layer in model.model.encoder.layers)
    assert kernels.disable(model) == 0
    features = torch.randn(1, 8, 40)
    with torch.no_grad():
        model.model.encoder(features)  # the forward pre-hook must leave a CPU model alone


# --- fused linear ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize(
    "m,k,n,gelu,residual,transposed",
    [(37, 48, 80, True, False, False), (64, 96, 40, False, True, True), (20, 16, 24, False, False, False),
     (50, 160, 64, True, True, False)],
)
def test_fused_linear_matches_reference(dtype, m, k, n, gelu, residual, transposed):
    from lite_whisper.kernels.linear import fused_linear
    from lite_whisper.kernels.reference import fused_linear_reference

    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    if transposed:  # nn.Linear layout, passed as weight.t()
        weight = (torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5).t()
    else:
        weight = torch.randn(k, n, device=DEVICE, dtype=dtype) / k**0.5
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    res = torch.randn(m, n, device=DEVICE, dtype=dtype) if residual else None
    out = fused_linear(x, weight, bias, gelu=gelu, residual=res, clamp_fp16=residual and dtype == torch.float16)
    ref = fused_linear_reference(x, weight, bias, gelu=gelu, residual=res, clamp_fp16=residual and dtype == torch.float16)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


# --- low-rank attention ---------------------------------------------------------------------------------------


def _attention_case(batch, length, heads, head_dim, rq, rk, rv, dtype, generator_seed):
    g = torch.Generator().manual_seed(generator_seed)
    width = heads * head_dim

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)

    xqkv = rnd(batch * length, rq + rk + rv)  # one fused first-factor output, sliced like the encoder does
    xq, xk, xv = xqkv[:, :rq], xqkv[:, rq : rq + rk], xqkv[:, rq + rk :]
    wq, wk, wv = rnd(rq, width, scale=rq**-0.5), rnd(rk, width, scale=rk**-0.5), rnd(rv, width, scale=rv**-0.5)
    bq, bv = rnd(width, scale=0.5), rnd(width, scale=0.5)
    return xq, xk, xv, wq, bq, wk, wv, bv


ATTENTION_CASES = [
    (1, 37, 2, 32, 32, 32, 48, True, True),
    (2, 50, 3, 32, 16, 48, 32, True, True),
    (1, 45, 2, 32, 80, 64, 96, True, False),
    (2, 33, 2, 32, 48, 32, 16, False, True),
    (1, 40, 4, 32, 32, 32, 32, False, False),
]
if HAS_CUDA:  # Whisper's head width (64) at longer lengths, too slow for the interpreter
    ATTENTION_CASES += [
        (2, 300, 4, 64, 32, 32, 48, True, True),
        (1, 1500, 3, 64, 64, 48, 128, True, False),
        (3, 257, 2, 64, 96, 96, 256, False, True),
        (1, 130, 2, 64, 32, 32, 32, False, False),
    ]


@needs_triton
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("batch,length,heads,head_dim,rq,rk,rv,qk_reduced,v_reduced", ATTENTION_CASES)
def test_lowrank_attention_matches_reference(dtype, batch, length, heads, head_dim, rq, rk, rv, qk_reduced, v_reduced):
    from lite_whisper.kernels.attention import lowrank_attention
    from lite_whisper.kernels.reference import lowrank_attention_reference, qk_matrices

    xq, xk, xv, wq, bq, wk, wv, bv = _attention_case(batch, length, heads, head_dim, rq, rk, rv, dtype, 7 * length + rq)
    ref = lowrank_attention_reference(
        xq.reshape(batch, length, rq), xk.reshape(batch, length, rk), xv.reshape(batch, length, rv),
        wq, bq, wk, wv, bv, heads,
    ).reshape(batch * length, -1)
    kwargs = {}
    if qk_reduced:
        m, u = qk_matrices(wq, bq, wk, heads)
        q_src, k_src = xq, xk
        kwargs.update(qk_matrix=m.to(dtype), qk_bias=u.to(dtype))
    else:
        q_src = (xq.float() @ wq.float() + bq.float()).to(dtype)
        k_src = (xk.float() @ wk.float()).to(dtype)
    if v_reduced:
        v_src = xv
        kwargs.update(v_weight=wv, v_bias=bv)
    else:
        v_src = (xv.float() @ wv.float() + bv.float()).to(dtype)
    out = lowrank_attention(q_src, k_src, v_src, batch, heads, head_dim, **kwargs)
    assert out.shape == (batch * length, heads * head_dim)
    assert rel_err(out, ref) < TOL[dtype] * 2


@needs_triton
def test_lowrank_attention_rejects_unsupported_shapes():
    from lite_whisper.kernels.attention import lowrank_attention

    x = torch.randn(20, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="head width"):
        lowrank_attention(x, x, x, 1, 4, 16)
    odd = torch.randn(20, 40, device=DEVICE, dtype=torch.float16)
    w = torch.randn(40, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 16"):
        lowrank_attention(x, x, odd, 1, 2, 32, v_weight=w, v_bias=torch.zeros(64, device=DEVICE, dtype=torch.float16))


def test_plan_layer_rule():
    from lite_whisper.kernels.encoder import plan_layer

    # Small q/k/v ranks (the first layer of lite-whisper-large-v3): both sides in the reduced dimension.
    assert plan_layer({"q_proj": 32, "k_proj": 32, "v_proj": 48}, 20, 64) == (True, True)
    # Ranks padded to the head width or beyond: plain SDPA on the second factors.
    assert plan_layer({"q_proj": 64, "k_proj": 64, "v_proj": 128}, 20, 64) == (False, False)
    assert plan_layer({"q_proj": 96, "k_proj": 96, "v_proj": 320}, 20, 64) == (False, False)
    # Ranks the kernel cannot take, or head widths outside 32..128.
    assert plan_layer({"q_proj": 40, "k_proj": 40, "v_proj": 40}, 20, 64) == (False, False)
    assert plan_layer({"q_proj": 16, "k_proj": 16, "v_proj": 16}, 4, 16) == (False, False)


def test_qk_matrices_reproduce_scores():
    from lite_whisper.kernels.reference import qk_matrices

    heads, head_dim, rq, rk, length = 3, 8, 16, 32, 10
    wq, wk = torch.randn(rq, heads * head_dim, dtype=torch.float64), torch.randn(rk, heads * head_dim, dtype=torch.float64)
    bq, bk = torch.randn(heads * head_dim, dtype=torch.float64), torch.randn(heads * head_dim, dtype=torch.float64)
    xq, xk = torch.randn(length, rq, dtype=torch.float64), torch.randn(length, rk, dtype=torch.float64)
    m, u = qk_matrices(wq, bq, wk, heads)
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        full = torch.softmax((xq @ wq[:, cols] + bq[cols]) @ (xk @ wk[:, cols] + bk[cols]).t(), -1)
        reduced = torch.softmax((xq @ m[h].double() + u[h].double()) @ xk.t(), -1)
        torch.testing.assert_close(reduced, full, rtol=1e-4, atol=1e-5)  # M_h is built in float32


# --- GPU: the patched encoder ---------------------------------------------------------------------------------


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_enable_matches_stock_encoder_and_disable_restores(dtype):
    from lite_whisper import LiteWhisperConfig, LiteWhisperForConditionalGeneration, kernels

    ranks = [
        {"q_proj": 32, "k_proj": 32, "v_proj": 48, "out_proj": 32, "fc1": 96, "fc2": 96},
        {"q_proj": 48, "k_proj": 64, "v_proj": 128, "out_proj": 64, "fc1": 128},
        {"q_proj": 96, "k_proj": 96, "v_proj": 160},
        {},
    ]
    config = LiteWhisperConfig(
        d_model=256, encoder_layers=4, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=1024, decoder_ffn_dim=256, num_mel_bins=16, max_source_positions=300,
        max_target_positions=16, vocab_size=100, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=0, low_rank_config=ranks, use_triton_kernels=False,
    )
    with torch.device("cuda"):
        model = LiteWhisperForConditionalGeneration(config).to(dtype).eval()
    features = torch.randn(3, 16, 600, device="cuda", dtype=dtype)
    encoder = model.model.encoder
    with torch.inference_mode():
        stock = encoder(features).last_hidden_state
        assert kernels.enable(model) == 4
        plans = [layer._lite_whisper_plan for layer in encoder.layers]
        assert plans[0].qk_reduced and plans[0].v_reduced
        fast = encoder(features).last_hidden_state
        assert kernels.disable(model) == 4
        again = encoder(features).last_hidden_state
    assert all("forward" not in layer.__dict__ for layer in encoder.layers)
    assert torch.equal(stock, again)
    assert rel_err(fast, stock) < TOL[dtype] * 2
    # grad mode falls back to the stock path (no backward through the kernels)
    kernels.enable(model)
    with torch.no_grad():
        fast2 = encoder(features).last_hidden_state
    with torch.enable_grad():
        slow = encoder(features).last_hidden_state
    assert torch.equal(fast2, fast)
    assert torch.allclose(slow.float(), stock.float(), atol=0, rtol=0) or rel_err(slow, stock) < 1e-6
    kernels.disable(model)


@gpu
@needs_cuda
@needs_triton
def test_plan_refreshes_after_in_place_weight_change():
    from lite_whisper import LiteWhisperConfig, LiteWhisperForConditionalGeneration, kernels

    config = LiteWhisperConfig(
        d_model=128, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=256, decoder_ffn_dim=128, num_mel_bins=8, max_source_positions=100,
        max_target_positions=16, vocab_size=100, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=0, low_rank_config=[{"q_proj": 32, "k_proj": 32, "v_proj": 32}], use_triton_kernels=False,
    )
    with torch.device("cuda"):
        model = LiteWhisperForConditionalGeneration(config).half().eval()
    features = torch.randn(2, 8, 200, device="cuda", dtype=torch.float16)
    kernels.enable(model)
    attn = model.model.encoder.layers[0].self_attn
    with torch.inference_mode():
        attn.q_proj.weight2.mul_(3.0)
        attn.k_proj.weight1.mul_(0.5)
        fast = model.model.encoder(features).last_hidden_state
        kernels.disable(model)
        stock = model.model.encoder(features).last_hidden_state
    assert rel_err(fast, stock) < 4e-3
