"""The static-cache decoding loop (lite_whisper.fast_generation) against transformers' own generate(), token for token.

On the CPU the loop runs without CUDA graphs (`eager_loop_on_any_device`): the decoder step, Whisper's logits
processors on tensors (suppress tokens, timestamp rules, min new tokens), stopping and padding are the same code the
graphs capture on CUDA. The `gpu` tests compare the captured graphs with eager generate() on the device.
"""

import copy

import pytest
import torch
from transformers import WhisperForConditionalGeneration

from lite_whisper import LiteWhisperForConditionalGeneration, enable_fast_generation, fast_generation
from lite_whisper.audio import load_audio


@pytest.fixture(scope="module")
def fast_model(whisper_base_dir):
    model = WhisperForConditionalGeneration.from_pretrained(whisper_base_dir).eval()
    return enable_fast_generation(model)


@pytest.fixture(scope="module")
def clips(dev_rows):
    # A fixed spread of real and synthetic short clips (not tuned: every 9th short row, then the first real ones).
    short = [r for r in dev_rows if not r.get("long_form") and r["duration_s"] <= 30]
    picked = short[::27][:6] + [r for r in short if r["id"].startswith("real_")][:4]
    return [load_audio(r["path"]) for r in picked]


@pytest.fixture(scope="module")
def features(processor, clips):
    return processor(clips, sampling_rate=16000, return_tensors="pt").input_features


class _Counter:
    def __init__(self, monkeypatch):
        self.calls = 0
        self.fast = 0
        original = fast_generation.sample

        def counting(*args, **kwargs):
            self.calls += 1
            result = original(*args, **kwargs)
            self.fast += result is not NotImplemented
            return result

        monkeypatch.setattr(fast_generation, "sample", counting)


def _both(model, features, **kwargs):
    model.set_fast_generation(False)
    eager = model.generate(features, language="en", task="transcribe", **kwargs)
    model.set_fast_generation(True)
    with fast_generation.eager_loop_on_any_device():
        fast = model.generate(features, language="en", task="transcribe", **kwargs)
    return eager, fast


def _assert_same(eager, fast):
    if isinstance(eager, dict) or hasattr(eager, "keys"):
        eager, fast = eager["sequences"], fast["sequences"]
    assert eager.shape == fast.shape
    assert torch.equal(eager, fast)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"return_timestamps": True}, {"min_new_tokens": 12, "max_new_tokens": 16}],
    ids=["plain", "timestamps", "min-max-new-tokens"],
)
def test_same_tokens_as_transformers(fast_model, features, monkeypatch, kwargs):
    counter = _Counter(monkeypatch)
    eager, fast = _both(fast_model, features, **kwargs)
    assert counter.fast >= 1, "the static-cache loop did not run"
    _assert_same(eager, fast)
    if "min_new_tokens" in kwargs:
        assert fast.shape[1] >= 12


@pytest.mark.slow
def test_prompt_and_scores(fast_model, processor, features, monkeypatch):
    prompt_ids = processor.get_prompt_ids("Sonnets, Harvard sentences and LibriSpeech.", return_tensors="pt")
    counter = _Counter(monkeypatch)
    eager, fast = _both(fast_model, features[:3], prompt_ids=prompt_ids, return_dict_in_generate=True,
                        output_scores=True)
    assert counter.fast >= 1
    _assert_same(eager, fast)
    assert len(eager["scores"]) == len(fast["scores"])
    for a, b in zip(eager["scores"], fast["scores"]):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b))  # the same tokens suppressed at every step
        assert torch.allclose(a[finite], b[finite], atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_long_form_same_segments(fast_model, processor, dev_rows, monkeypatch):
    row = next(r for r in dev_rows if r.get("long_form") or r["duration_s"] > 30)
    audio = load_audio(row["path"])
    inputs = processor(audio, sampling_rate=16000, return_tensors="pt", truncation=False, padding="longest",
                       return_attention_mask=True)
    counter = _Counter(monkeypatch)
    kwargs = dict(attention_mask=inputs.attention_mask, return_timestamps=True, return_segments=True)
    eager, fast = _both(fast_model, inputs.input_features, **kwargs)
    assert counter.fast >= 2  # one call per 30 s window
    segments = [[(float(s["start"]), float(s["end"]), s["tokens"].tolist()) for s in out["segments"][0]]
                for out in (eager, fast)]
    assert len(segments[0]) >= 3
    assert segments[0] == segments[1]


def test_falls_back_for_beam_search_and_sampling(fast_model, features, monkeypatch):
    counter = _Counter(monkeypatch)
    fast_model.set_fast_generation(True)
    with fast_generation.eager_loop_on_any_device():
        fast_model.generate(features[:1], language="en", task="transcribe", num_beams=2, max_new_tokens=4)
        # Whisper decides sampling from the temperature (do_sample alone is overridden by its fallback logic).
        fast_model.generate(features[:1], language="en", task="transcribe", temperature=0.7, max_new_tokens=4)
    assert counter.calls == 1 and counter.fast == 0  # beam search never reaches _sample; sampling is declined


def test_off_cuda_without_opt_in_is_eager(fast_model, features, monkeypatch):
    counter = _Counter(monkeypatch)
    fast_model.set_fast_generation(True)
    fast_model.generate(features[:1], language="en", task="transcribe", max_new_tokens=4)
    assert counter.calls == 1 and counter.fast == 0


def test_unknown_processor_runs_eagerly_between_steps(fast_model, features, monkeypatch):
    from transformers import LogitsProcessor, LogitsProcessorList

    class BanWordThe(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 262] = -float("inf")  # " the"
            return scores

    counter = _Counter(monkeypatch)
    eager, fast = _both(fast_model, features[:2], logits_processor=LogitsProcessorList([BanWordThe()]),
                        max_new_tokens=20)
    assert counter.fast >= 1
    _assert_same(eager, fast)
    assert not (fast == 262).any()


def test_lite_whisper_has_it_built_in(whisper_model, whisper_base_dir, features, monkeypatch, tmp_path):
    from lite_whisper import build_lite_whisper
    from lite_whisper.factorize import exact_factors

    lite = build_lite_whisper(copy.deepcopy(whisper_model), exact_factors(whisper_model, rank=256)).eval()
    assert isinstance(lite, LiteWhisperForConditionalGeneration)
    counter = _Counter(monkeypatch)
    lite.set_fast_generation(False)
    eager = lite.generate(features[:2], language="en", task="transcribe", max_new_tokens=24)
    lite.set_fast_generation(True)
    with fast_generation.eager_loop_on_any_device():
        fast = lite.generate(features[:2], language="en", task="transcribe", max_new_tokens=24)
    assert counter.fast == 1
    assert torch.equal(eager, fast)


# --- CUDA ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graphs_match_eager(whisper_base_dir, features, dtype, monkeypatch):
    model = WhisperForConditionalGeneration.from_pretrained(whisper_base_dir, dtype=dtype).cuda().eval()
    enable_fast_generation(model)
    feats = features.to("cuda", dtype)
    results = {}
    for fast in (False, True):
        model.set_fast_generation(fast)
        results[fast] = [model.generate(feats, language="en", task="transcribe", **kw).cpu()
                         for kw in ({}, {"return_timestamps": True})]
    for eager, fast in zip(results[False], results[True]):
        if dtype == torch.float32:
            assert torch.equal(eager, fast)
        else:
            same = sum(torch.equal(a, b) for a, b in zip(eager, fast))
            assert same >= 0.9 * len(eager)
