"""lite_whisper.kernels.decode (the decoder-step kernels) against their PyTorch references.

On a CPU machine they run through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported, small
shapes with ragged edges); the GPU run covers bfloat16 and the model-sized shapes.
"""

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if HAS_CUDA else "cpu"
# The interpreter's tl.dot is wrong for bfloat16 operands (see test_kernels.py).
DTYPES = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def small_tiles(request, monkeypatch):
    """Small tiles for the small shapes, so that edges and several blocks per launch are exercised."""
    if "whisper_base_dir" in request.fixturenames:
        return
    from lite_whisper.kernels import decode

    # Split-K 2 where a workspace is passed (the tests pass one to some calls and not to others).
    monkeypatch.setattr(decode, "CONFIG_OVERRIDE", {"linear": (16, 32, 4, 1, 2), "kv": (16, 32, 4, 1, 3),
                                                    "logits": (16, 32, 4, 1)})
    monkeypatch.setattr(decode, "INTERPRETER_BLOCKS", {"row": 16, "cross": 32})


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output (an element was not written?)"
    return ((out - ref).norm() / ref.norm()).item()


def rnd(*shape, dtype=torch.float16, scale=1.0, g=None):
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,norm,gelu,residual,split,row_kernel", [
    (1, 80, 40, True, False, False, True, False),   # batch 1, K and N not multiples of the tiles, split-K
    (1, 80, 40, True, False, False, True, True),    # the same through the one-row kernel
    (1, 64, 48, True, True, True, False, True),     # one row: layer norm, GELU and residual
    (1, 3000, 24, False, False, True, True, True),  # one row, long K: a narrower slab (fc2)
    (3, 64, 48, True, True, False, False, True),    # fc1: layer norm + GELU (several rows: tiled kernel)
    (17, 96, 32, False, False, True, True, True),   # out_proj / fc2: residual add, rows over one tile, split-K
])
def test_decode_linear_matches_reference(dtype, m, k, n, norm, gelu, residual, split, row_kernel, monkeypatch):
    from lite_whisper.kernels.decode import decode_linear, decode_workspace
    from lite_whisper.kernels.reference import decode_linear_reference

    monkeypatch.setenv("LITE_WHISPER_DECODE_ROW", "1" if row_kernel else "0")

    g = torch.Generator().manual_seed(m * 1000 + k)
    # A large offset and one outlier channel, as Whisper's decoder residual stream has: the layer norm must
    # centre before it squares.
    x = rnd(m, k, dtype=dtype, g=g) + 30.0
    x[:, 3] += 200.0
    weight = rnd(n, k, dtype=dtype, scale=k**-0.5, g=g)
    bias = rnd(n, dtype=dtype, g=g)
    ln = (1.0 + rnd(k, dtype=dtype, scale=0.1, g=g), rnd(k, dtype=dtype, scale=0.1, g=g), 1e-5) if norm else None
    res = rnd(m, n, dtype=dtype, g=g) if residual else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    workspace = decode_workspace(m, n, DEVICE) if split else None
    for _ in range(2):  # twice: the split-K counters must be left ready for the next call
        decode_linear(x, weight, bias, out, norm=ln, gelu=gelu, residual=res, workspace=workspace)
        ref = decode_linear_reference(x, weight, bias, norm=ln, gelu=gelu, residual=res)
        assert rel_err(out, ref) < TOL[dtype]
    if split:
        assert not workspace[1].any()


@pytest.mark.parametrize("rows", [2, 1])  # 1: the one-row kernel
def test_decode_linear_residual_in_place(rows, monkeypatch):
    monkeypatch.setenv("LITE_WHISPER_DECODE_ROW", "1")
    from lite_whisper.kernels.decode import decode_linear
    from lite_whisper.kernels.reference import decode_linear_reference

    g = torch.Generator().manual_seed(5)
    x, weight, bias = rnd(rows, 48, g=g), rnd(32, 48, scale=0.15, g=g), rnd(32, g=g)
    hidden = rnd(rows, 32, g=g)
    ref = decode_linear_reference(x, weight, bias, residual=hidden)
    decode_linear(x, weight, bias, hidden, residual=hidden)
    assert rel_err(hidden, ref) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [3, 1])  # 1: the one-row kernel
def test_decode_linear_writes_q_and_the_kv_cache(dtype, rows, monkeypatch):
    monkeypatch.setenv("LITE_WHISPER_DECODE_ROW", "1")
    from lite_whisper.kernels.decode import decode_linear, decode_workspace
    from lite_whisper.kernels.reference import decode_linear_reference

    g = torch.Generator().manual_seed(7)
    d, heads, max_len, k = 32, 2, 10, 48
    head_dim = d // heads
    x = rnd(rows, k, dtype=dtype, g=g)
    weight, bias = rnd(3 * d, k, dtype=dtype, scale=k**-0.5, g=g), rnd(3 * d, dtype=dtype, g=g)
    ln = (1.0 + rnd(k, dtype=dtype, scale=0.1, g=g), rnd(k, dtype=dtype, scale=0.1, g=g), 1e-5)
    k_cache = rnd(rows, heads, max_len, head_dim, dtype=dtype, g=g)
    v_cache = rnd(rows, heads, max_len, head_dim, dtype=dtype, g=g)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    length = torch.tensor(6, device=DEVICE)  # the token sits at position 5
    q = torch.full((rows, d), float("nan"), dtype=dtype, device=DEVICE)
    decode_linear(x, weight, bias, q, norm=ln, kv=(k_cache, v_cache), length=length,
                  workspace=decode_workspace(rows, 3 * d, DEVICE))  # split-K 3
    ref = decode_linear_reference(x, weight, bias, norm=ln).view(rows, 3, heads, head_dim)
    assert rel_err(q, ref[:, 0].reshape(rows, d)) < TOL[dtype]
    assert rel_err(k_cache[:, :, 5], ref[:, 1]) < TOL[dtype]
    assert rel_err(v_cache[:, :, 5], ref[:, 2]) < TOL[dtype]
    others = [p for p in range(max_len) if p != 5]
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others])
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 5, 37])
def test_decode_self_attention_matches_reference(dtype, count):
    from lite_whisper.kernels.decode import decode_self_attention
    from lite_whisper.kernels.reference import decode_self_attention_reference

    g = torch.Generator().manual_seed(count)
    rows, heads, head_dim, max_len = 2, 3, 16, 40
    q = rnd(rows, heads * head_dim, dtype=dtype, g=g)
    k_cache = rnd(rows, heads, max_len, head_dim, dtype=dtype, g=g)
    v_cache = rnd(rows, heads, max_len, head_dim, dtype=dtype, g=g)
    k_cache[:, :, count:] = 1000.0  # stale positions past the length must not leak in
    length = torch.tensor(count, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    decode_self_attention(q, k_cache, v_cache, length, out, head_dim**-0.5)
    ref = decode_self_attention_reference(q, k_cache, v_cache, length, head_dim**-0.5)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,frames", [(1, 150), (3, 64)])
def test_decode_cross_attention_matches_reference(dtype, rows, frames):
    from lite_whisper.kernels.decode import cross_attention_workspace, decode_cross_attention, decode_workspace
    from lite_whisper.kernels.reference import decode_cross_attention_reference

    g = torch.Generator().manual_seed(frames)
    heads, head_dim = 2, 16
    q = rnd(rows, heads * head_dim, dtype=dtype, g=g)
    k = rnd(rows, heads, frames, head_dim, dtype=dtype, g=g)
    v = rnd(rows, heads, frames, head_dim, dtype=dtype, g=g)
    # One frame in the last split dominates row 0's first head: the merge must rescale the earlier splits.
    k[0, 0, frames - 3] = q[0, :head_dim] * 4
    out = torch.full((rows, heads * head_dim), float("nan"), dtype=dtype, device=DEVICE)
    workspace = decode_workspace(rows, cross_attention_workspace(rows, heads, frames, head_dim), DEVICE, split=1)
    for _ in range(2):  # twice: the counters must be left ready for the next call
        decode_cross_attention(q, k, v, out, head_dim**-0.5, workspace)
        assert rel_err(out, decode_cross_attention_reference(q, k, v, head_dim**-0.5)) < TOL[dtype]
    assert not workspace[1].any()
    with pytest.raises(ValueError, match="workspace too small"):
        decode_cross_attention(q, k, v, out, 1.0, (workspace[0][:10], workspace[1]))


def test_decode_embed_matches_reference():
    from lite_whisper.kernels.decode import decode_embed
    from lite_whisper.kernels.reference import decode_embed_reference

    g = torch.Generator().manual_seed(3)
    embed, positions = rnd(50, 40, g=g), rnd(12, 40, g=g)
    tokens = torch.tensor([[4], [49], [0]], device=DEVICE)
    length = torch.tensor(7, device=DEVICE)
    out = torch.full((3, 40), float("nan"), dtype=torch.float16, device=DEVICE)
    decode_embed(tokens, embed, positions, length, out, scale=1.0)
    assert torch.equal(out, decode_embed_reference(tokens, embed, positions, length, 1.0))


@pytest.mark.parametrize("length_value,expect_begin,expect_below", [(4, True, True), (5, False, True), (9, False, False)])
def test_decode_logits_and_finish_match_reference(length_value, expect_begin, expect_below):
    from lite_whisper.kernels.decode import decode_finish, decode_logits, logits_blocks
    from lite_whisper.kernels.reference import (
        decode_finish_reference,
        decode_logits_reference,
        token_mask_codes,
    )

    g = torch.Generator().manual_seed(length_value)
    rows, k, vocab, max_len = 3, 48, 70, 12
    x = rnd(rows, k, g=g) + 5.0
    norm = (1.0 + rnd(k, scale=0.1, g=g), rnd(k, scale=0.1, g=g), 1e-5)
    embed = rnd(vocab, k, scale=0.3, g=g)
    raw_ref, _, _ = decode_logits_reference(x, norm, embed)
    winners = []  # each row's best token not yet taken, so the three rules mask three different tokens
    for row in raw_ref:
        row = row.clone()
        row[winners] = float("-inf")
        winners.append(int(row.argmax()))
    # Mask each row's best token in turn by one rule, so the argmax must move exactly when the rule applies.
    codes = token_mask_codes(vocab, always=[winners[0]], at_begin=[winners[1]], below=[winners[2]]).to(DEVICE)
    length = torch.tensor(length_value, device=DEVICE)
    raw = torch.full((rows, vocab), float("nan"), device=DEVICE)
    scores = torch.full_like(raw, float("nan"))
    blocks = logits_blocks(vocab, rows)
    part_v = torch.empty(rows, blocks, device=DEVICE)
    part_i = torch.empty(rows, blocks, dtype=torch.int32, device=DEVICE)
    decode_logits(x, norm, embed, raw, scores, part_v, part_i, codes, length, begin=4, below=6)
    raw_ref, scores_ref, best_ref = decode_logits_reference(x, norm, embed, codes, length, begin=4, below=6)
    assert rel_err(raw, raw_ref) < 2e-3
    assert torch.equal(torch.isinf(scores), torch.isinf(scores_ref))
    assert torch.isinf(scores[0, winners[0]])
    assert torch.isinf(scores[1, winners[1]]) == expect_begin
    assert torch.isinf(scores[2, winners[2]]) == expect_below

    # finish: row 1 already finished (gets padding), row 2's token is declared EOS.
    sequences = torch.full((rows, max_len), -7, dtype=torch.long, device=DEVICE)
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=DEVICE)
    unfinished = torch.tensor([True, False, True], device=DEVICE)
    done = torch.zeros((), dtype=torch.long, device=DEVICE)
    best = scores.argmax(dim=-1)
    assert torch.equal(best.cpu(), best_ref.cpu())
    eos = torch.tensor([int(best[2]), 1000], device=DEVICE)
    state = [t.clone() for t in (sequences, tokens, unfinished, length, done)]
    decode_finish(part_v, part_i, sequences, tokens, unfinished.view(torch.uint8), length, done, eos, pad_id=99)
    decode_finish_reference(best, *state, eos, 99)
    for got, want in zip((sequences, tokens, unfinished, length, done), state):
        assert torch.equal(got, want), (got, want)
    assert int(sequences[1, length_value]) == 99
    assert not bool(unfinished[2])


def test_decode_finish_sets_done_when_every_row_stopped_and_ties_take_the_first_index():
    from lite_whisper.kernels.decode import decode_finish

    # Two rows, three blocks; row 0's maximum appears in two blocks (the first index must win).
    part_v = torch.tensor([[1.0, 3.0, 3.0], [float("-inf")] * 3], device=DEVICE)
    part_i = torch.tensor([[0, 70, 130], [0, 64, 128]], dtype=torch.int32, device=DEVICE)
    sequences = torch.zeros(2, 8, dtype=torch.long, device=DEVICE)
    tokens = torch.zeros(2, 1, dtype=torch.long, device=DEVICE)
    unfinished = torch.tensor([True, True], device=DEVICE)
    length, done = torch.tensor(3, device=DEVICE), torch.zeros((), dtype=torch.long, device=DEVICE)
    decode_finish(part_v, part_i, sequences, tokens, unfinished.view(torch.uint8), length, done,
                  torch.tensor([70, 0], device=DEVICE), pad_id=5)
    assert sequences[:, 3].tolist() == [70, 0]  # all -inf: index 0, as torch.argmax
    assert not unfinished.any() and int(length) == 4 and int(done) == 4


def test_decode_kernels_refuse_float32():
    from lite_whisper.kernels.decode import decode_linear

    x = torch.randn(1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        decode_linear(x, torch.randn(16, 16, device=DEVICE), None, torch.empty(1, 16, device=DEVICE))


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter check; on CUDA test_fast_generation's GPU tests cover the step")
def test_kernel_step_gives_the_pytorch_steps_tokens(whisper_base_dir, processor, dev_rows, monkeypatch):
    """The whole decoder step on the kernels (real whisper-base, float16) against the PyTorch step of the same
    static-cache loop: same tokens, with the fused processors (suppress, begin-suppress, min new tokens: the
    logits/finish kernels) and with the timestamp rules (kernels for the layers, PyTorch processors)."""
    from transformers import WhisperForConditionalGeneration

    from lite_whisper import enable_fast_generation, fast_generation
    from lite_whisper.audio import load_audio

    model = WhisperForConditionalGeneration.from_pretrained(whisper_base_dir, dtype=torch.float16).eval()
    enable_fast_generation(model)
    rows = [r for r in dev_rows if r["id"].startswith("real_") and r["duration_s"] <= 30][:2]
    features = processor([load_audio(r["path"]) for r in rows], sampling_rate=16000,
                         return_tensors="pt").input_features.half()
    steps = []
    original = fast_generation._DecoderState._kernel_step

    def counting(self, program):
        steps.append(program.codes is not None)
        return original(self, program)

    monkeypatch.setattr(fast_generation._DecoderState, "_kernel_step", counting)
    def run(kernels, row_and_cross, batches, timestamps):
        monkeypatch.setenv("LITE_WHISPER_DECODE_KERNELS", kernels)
        monkeypatch.setenv("LITE_WHISPER_DECODE_ROW", row_and_cross)
        monkeypatch.setenv("LITE_WHISPER_DECODE_CROSS", row_and_cross)
        enable_fast_generation(model)  # drops the cached decoder states
        with fast_generation.eager_loop_on_any_device():
            out = [model.generate(batch, language="en", task="transcribe", min_new_tokens=4, max_new_tokens=8)
                   for batch in batches]
            if timestamps:
                out.append(model.generate(features, language="en", task="transcribe", return_timestamps=True,
                                          max_new_tokens=5))
        return out

    torch_step = run("0", "0", (features, features[:1]), True)
    kernels = run("1", "0", (features,), True)
    # The one-row GEMV and the split-KV cross-attention, which a GPU takes with programmatic dependent launch;
    # counted, so that a silent fallback to the tiled GEMV or SDPA fails the test.
    from lite_whisper.kernels import decode

    taken = {"row": 0, "cross": 0}
    row_kernel, cross_attention = decode._row_kernel, decode.decode_cross_attention

    def counting_row(*args):
        chosen = row_kernel(*args)
        taken["row"] += chosen
        return chosen

    def counting_cross(*args, **kwargs):
        taken["cross"] += 1
        return cross_attention(*args, **kwargs)

    monkeypatch.setattr(decode, "_row_kernel", counting_row)
    monkeypatch.setattr(decode, "decode_cross_attention", counting_cross)
    row_and_cross = run("1", "1", (features[:1],), False)
    assert taken["row"] > 0 and taken["cross"] > 0, taken
    assert any(steps) and not all(steps)  # both the fused-processor and the timestamp variants ran
    assert torch.equal(torch_step[0], kernels[0]) and torch.equal(torch_step[2], kernels[1])
    assert torch.equal(torch_step[1], row_and_cross[0])
