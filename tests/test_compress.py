"""Tests of lite_whisper.compress: statistics, rank rule, budget, settings, errors and a small end-to-end run."""

import json

import numpy as np
import pytest
import torch

from lite_whisper.compress import (
    CalibrationError,
    CompressionSettings,
    StreamingStatistics,
    allocate_ranks,
    allocate_ranks_by_threshold,
    choose_rank,
    compress,
    dense_params,
    explained_variance,
    low_rank_factors,
    low_rank_params,
    saving_rank_limit,
    spectrum_from_statistics,
)
from lite_whisper.modeling_lite_whisper import LowRankLinear, encoder_projection


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: the real whisper-base and a few dev clips (skipped when unavailable)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper_base(whisper_base_dir):
    # The real model is required (the test extra installs it): a missing package is an error, not a skip.
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(whisper_base_dir, dtype=torch.float32).eval()
    return model, WhisperProcessor.from_pretrained(whisper_base_dir)


@pytest.fixture(scope="module")
def clips():
    """Four short dev clips (or synthetic tones when the dev set is absent)."""
    from pathlib import Path

    from lite_whisper.audio import list_audio, load_audio

    dev = Path(__file__).resolve().parents[1] / ".." / "shared" / "eval" / "dev"
    if dev.is_dir():
        rows = [r for r in list_audio(dev) if not r.get("long_form")][:4]
        return [load_audio(r["audio"]) for r in rows]
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 3) / 16000
    return [(0.1 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32) for f in (220, 330, 440, 550)]


# ----------------------------------------------------------------------------------------------------------------
# Streaming statistics
# ----------------------------------------------------------------------------------------------------------------


def _direct_eigenvalues(rows):
    rows = np.asarray(rows, dtype=np.float64)
    centred = rows - rows.mean(axis=0)
    return np.sort(np.linalg.eigvalsh(centred.T @ centred / rows.shape[0]))[::-1]


def test_streaming_statistics_match_direct_pca():
    rng = np.random.default_rng(0)
    # Anisotropic data with one dominant channel, like whisper-base's layer 3 fc2.
    rows = rng.standard_normal((700, 24)) @ rng.standard_normal((24, 24)) * 0.5 + 3.0
    rows[:, 5] *= 40
    stats = StreamingStatistics(24)
    for start in range(0, 700, 97):  # uneven chunks
        stats.update(torch.tensor(rows[start : start + 97], dtype=torch.float32))
    assert stats.count == 700
    direct = _direct_eigenvalues(rows.astype(np.float32))
    streamed = spectrum_from_statistics(stats).eigenvalues.numpy()
    np.testing.assert_allclose(streamed, direct, rtol=1e-6, atol=1e-9 * direct[0])


def test_input_statistics_give_the_output_spectrum():
    """For wide projections the statistics are of the inputs; the spectrum must equal the outputs' one."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 40)
    x = torch.randn(500, 12) @ torch.randn(12, 12)
    with torch.no_grad():
        y = linear(x)
    inputs, outputs = StreamingStatistics(12), StreamingStatistics(40)
    inputs.update(x)
    outputs.update(y)
    from_inputs = spectrum_from_statistics(inputs, weight=linear.weight, bias=linear.bias)
    from_outputs = spectrum_from_statistics(outputs)
    direct = _direct_eigenvalues(y.numpy())
    # y is float32: eigenvalues far below the largest carry its rounding, hence the absolute tolerance.
    np.testing.assert_allclose(from_inputs.eigenvalues[:12].numpy(), direct[:12], rtol=1e-5, atol=1e-6 * direct[0])
    np.testing.assert_allclose(from_outputs.eigenvalues[:12].numpy(), direct[:12], rtol=1e-5, atol=1e-6 * direct[0])
    assert float(from_inputs.eigenvalues[12:].abs().max()) == 0.0  # rank at most in_features
    np.testing.assert_allclose(from_inputs.mean.numpy(), y.double().mean(0).numpy(), rtol=1e-5, atol=1e-6)
    # Same principal subspace: the projectors agree.
    a, b = from_inputs.eigenvectors[:, :6].double(), from_outputs.eigenvectors[:, :6].double()
    torch.testing.assert_close(a @ a.t(), b @ b.t(), atol=1e-4, rtol=0)


def test_streaming_statistics_on_whisper_base_activations(whisper_base, clips):
    """Hooked streaming statistics of a real projection vs a PCA of its stored outputs."""
    from lite_whisper.compress import _Recorder, _attention_block, _embed, _frame_mask, _prepare_features

    model, processor = whisper_base
    features, speech = _prepare_features(clips[:2], processor.feature_extractor)
    encoder = model.model.encoder
    layer = encoder.layers[0]
    masks = _frame_mask(speech, model.config.max_source_positions, True, "cpu")
    stored = []
    handle = layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: stored.append(o))
    recorder = _Recorder(layer, ["v_proj"], "cpu")
    recorder.mask = masks
    with torch.no_grad():
        _attention_block(layer, _embed(encoder, features))
    recorder.close()
    handle.remove()
    rows = stored[0][masks].numpy()
    assert recorder.stats["v_proj"].count == rows.shape[0] == int(masks.sum())
    direct = _direct_eigenvalues(rows)
    streamed = spectrum_from_statistics(recorder.stats["v_proj"]).eigenvalues.numpy()
    top = direct > 1e-6 * direct[0]  # the numerically meaningful part of the spectrum
    np.testing.assert_allclose(streamed[top], direct[top], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Rank rule and factors
# ----------------------------------------------------------------------------------------------------------------


def test_explained_variance_is_cumulative_share():
    np.testing.assert_allclose(explained_variance([4.0, 3.0, 2.0, 1.0]).numpy(), [0.4, 0.7, 0.9, 1.0])
    assert explained_variance([0.0, 0.0]).tolist() == [1.0, 1.0]  # a constant output


def test_rank_rule_on_constructed_spectrum():
    # 64 outputs: the top 20 directions hold 90% of the variance, the remaining 44 share 10%.
    eigenvalues = np.concatenate([np.full(20, 0.9 / 20), np.full(44, 0.1 / 44)])
    # 90% is reached at k = 20, so the smallest multiple of 16 that reaches it is 32.
    assert choose_rank(eigenvalues, 0.9, in_features=512, out_features=64) == 32
    assert choose_rank(eigenvalues, 0.5, in_features=512, out_features=64) == 16
    # At k = 32 the explained share is 0.9 + 12 * 0.1/44 = 0.927; just above it the rule goes to 48.
    assert choose_rank(eigenvalues, 0.93, in_features=512, out_features=64) == 48
    # Full rank when the factors would not be smaller: 48 * (64 + 64) >= 64 * 64.
    assert choose_rank(eigenvalues, 0.93, in_features=64, out_features=64) is None
    assert saving_rank_limit(64, 64) == 31
    # A threshold of 1 needs every direction: no saving, full rank.
    assert choose_rank(eigenvalues, 1.0, in_features=512, out_features=64) is None


def test_factors_reproduce_projection_on_its_subspace():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48)
    x = torch.randn(400, 8) @ torch.randn(8, 32)  # inputs of rank 8: outputs live in 8 dimensions
    with torch.no_grad():
        y = linear(x)
    stats = StreamingStatistics(48)
    stats.update(y)
    spectrum = spectrum_from_statistics(stats)
    w1, w2, b = low_rank_factors(linear.weight, linear.bias, spectrum, 16)
    assert w1.shape == (32, 16) and w2.shape == (16, 48) and b.shape == (48,)
    torch.testing.assert_close(x @ w1 @ w2 + b, y, atol=1e-4, rtol=1e-4)
    # The published formula: weight1 = W V_k, weight2 = V_k^T, bias = mu + (b - mu) V_k V_k^T.
    v = spectrum.eigenvectors[:, :16].double()
    mu = spectrum.mean.double()
    torch.testing.assert_close(w1.double(), linear.weight.detach().double().t() @ v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.double(), mu + (linear.bias.detach().double() - mu) @ v @ v.t(), atol=1e-5, rtol=1e-5)
    # With channel scaling the projection is oblique but still exact on the subspace.
    scaled = spectrum_from_statistics(stats, channel_scale_power=1.0)
    w1, w2, b = low_rank_factors(linear.weight, linear.bias, scaled, 16)
    torch.testing.assert_close(x @ w1 @ w2 + b, y, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Budget
# ----------------------------------------------------------------------------------------------------------------


def _synthetic_problem():
    rng = np.random.default_rng(1)
    spectra, shapes = {}, {}
    for layer in range(4):
        for key, (i, o, bias) in {"q": (256, 256, True), "k": (256, 256, False), "fc1": (256, 1024, True),
                                  "fc2": (1024, 256, True)}.items():
            d = o
            decay = rng.uniform(0.005, 0.05)
            values = np.exp(-decay * np.arange(d)) * rng.uniform(0.5, 2.0)
            if key == "fc2" and layer == 2:
                values[0] = values.sum() * 100  # one dominant channel
            if key == "fc1":
                values[i:] = 0  # wide projection: rank at most in_features
            spectra[f"{layer}.{key}"] = torch.tensor(np.sort(values)[::-1].copy())
            shapes[f"{layer}.{key}"] = (i, o, bias)
    return spectra, shapes


def _cost(ranks, shapes):
    return sum(dense_params(*shapes[n]) if r is None else low_rank_params(shapes[n][0], shapes[n][1], r)
               for n, r in ranks.items())


@pytest.mark.parametrize("allocate", [allocate_ranks, allocate_ranks_by_threshold])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.65, 0.8, 0.95])
def test_budget_hits_target_within_one_rank_step(allocate, fraction):
    spectra, shapes = _synthetic_problem()
    full = sum(dense_params(*s) for s in shapes.values())
    budget = fraction * full
    ranks = allocate(spectra, shapes, budget)
    spent = _cost(ranks, shapes)
    largest_step = max(16 * (i + o) for i, o, _ in shapes.values())
    assert spent <= budget
    assert budget - spent < largest_step
    for name, rank in ranks.items():
        if rank is not None:
            assert rank % 16 == 0 and rank <= saving_rank_limit(*shapes[name][:2])


def test_budget_prefers_variance_per_parameter():
    spectra, shapes = _synthetic_problem()
    full = sum(dense_params(*s) for s in shapes.values())
    ranks = allocate_ranks(spectra, shapes, 0.5 * full)
    # The projection with one dominant channel explains almost everything at rank 16.
    assert ranks["2.fc2"] == 16


def test_budget_below_minimum_is_an_error():
    spectra, shapes = _synthetic_problem()
    with pytest.raises(ValueError, match="below the smallest reachable"):
        allocate_ranks(spectra, shapes, 1000)


# ----------------------------------------------------------------------------------------------------------------
# Settings and errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention_threshold": 0.0}, "attention_threshold must be in"),
        ({"attention_threshold": 1.5}, "attention_threshold must be in"),
        ({"mlp_threshold": -0.1}, "mlp_threshold must be in"),
        ({"target_size": 0.0}, "target_size must be"),
        ({"target_size": 1.2}, "target_size must be"),
        ({"mode": "two-shot"}, "mode must be one of"),
        ({"refine_steps": -1}, "refine_steps must be a non-negative"),
        ({"statistics_frames": "padding"}, "statistics_frames must be one of"),
        ({"budget_rule": "random"}, "budget_rule must be one of"),
        ({"refine_batch_size": 0}, "refine_batch_size must be a positive"),
    ],
)
def test_settings_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionSettings(**kwargs).validate()


def test_default_settings_are_valid():
    settings = CompressionSettings().validate()
    assert settings.mode in ("sequential", "one-shot")
    CompressionSettings(attention_threshold=1.0, mlp_threshold=1.0, target_size=1.0, refine_steps=0).validate()


def test_compress_rejects_bad_settings_before_work(whisper_base, clips):
    model, processor = whisper_base
    with pytest.raises(ValueError, match="target_size"):
        compress(model, clips, processor.feature_extractor, CompressionSettings(target_size=2.0), device="cpu", progress=False)


def test_calibration_error_on_too_little_audio(whisper_base):
    model, processor = whisper_base
    tiny = [np.zeros(320, dtype=np.float32)]  # 20 ms: one encoder frame
    with pytest.raises(CalibrationError, match="calibration frames"):
        compress(model, tiny, processor.feature_extractor, CompressionSettings(refine_steps=0), device="cpu", progress=False)
    with pytest.raises(CalibrationError, match="no usable calibration audio"):
        compress(model, [np.zeros(0, dtype=np.float32)], processor.feature_extractor, device="cpu", progress=False)


def test_calibration_error_when_rank_needs_more_frames(whisper_base, clips):
    model, processor = whisper_base
    short = [clips[0][:16000]]  # 1 s: 50 speech frames; a 0.9999 threshold asks for rank 64 in layer 0
    with pytest.raises(CalibrationError, match="needs more than"):
        compress(model, short, processor.feature_extractor,
                 CompressionSettings(attention_threshold=0.9999, target_size=None, mode="one-shot", refine_steps=0), device="cpu",
                 progress=False)


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------


def _check_model_matches_config(lite):
    for i, layer in enumerate(lite.model.encoder.layers):
        ranks = lite.config.low_rank_config[i]
        for key in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
            module = encoder_projection(layer, key)
            if key in ranks:
                assert isinstance(module, LowRankLinear)
                assert module.weight1.shape[1] == module.weight2.shape[0] == ranks[key]
            else:
                assert isinstance(module, torch.nn.Linear)


@pytest.mark.slow
def test_compress_end_to_end(whisper_base, clips, tmp_path):
    """Sequential calibration, a parameter budget and two refinement steps; the one-shot path is covered below."""
    from transformers import AutoModelForSpeechSeq2Seq

    model, processor = whisper_base
    mode = "sequential"
    before = {k: v.clone() for k, v in model.model.encoder.layers[0].state_dict().items()}
    settings = CompressionSettings(target_size=0.8, mode=mode, refine_steps=2, refine_batch_size=2)
    result = compress(model, clips, processor.feature_extractor, settings, device="cpu", progress=False)
    lite, report = result.model, result.report
    # The base model is untouched.
    for k, v in model.model.encoder.layers[0].state_dict().items():
        assert torch.equal(v, before[k])
    assert next(lite.parameters()).dtype == torch.float32 and next(lite.parameters()).device.type == "cpu"
    assert lite.generation_config.max_length == model.generation_config.max_length
    _check_model_matches_config(lite)
    # Within one rank step (the largest: 16 * (512 + 2048)) of the target.
    original = report["encoder_params_before"]
    assert report["encoder_params_after"] <= 0.8 * original
    assert 0.8 * original - report["encoder_params_after"] < 16 * (512 + 2048)
    json.dumps(report)  # JSON-serialisable
    assert report["mode"] == mode and report["calibration"]["clips"] == len(clips)
    assert report["refinement"]["steps"] == 2 and report["refinement"]["final_loss"] is not None
    for layer in report["layers"]:
        for key in ("q_proj", "fc1", "fc2"):
            assert 0 < layer[key]["explained_variance"] <= 1.0 + 1e-9
    assert set(report["timings_s"]) >= {"statistics_s", "factorisation_s", "refinement_s", "total_s"}
    # It runs, and it round-trips through save/load.
    features = processor.feature_extractor(clips[:1], sampling_rate=16000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        hidden = lite.model.encoder(features).last_hidden_state
    assert torch.isfinite(hidden).all()
    lite.save_pretrained(tmp_path)
    loaded = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path)
    _check_model_matches_config(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encoder(features).last_hidden_state, hidden)


@pytest.mark.slow
def test_compress_thresholds_without_refinement(whisper_base, clips):
    model, processor = whisper_base
    settings = CompressionSettings(attention_threshold=0.9, mlp_threshold=0.95, target_size=None, mode="one-shot",
                                   refine_steps=0)
    result = compress(model, clips, processor.feature_extractor, settings, device="cpu", progress=False)
    _check_model_matches_config(result.model)
    for layer in result.report["layers"]:
        for key in ("q_proj", "k_proj", "v_proj", "out_proj"):
            entry = layer[key]
            if entry["rank"] is not None:
                assert entry["explained_variance"] >= 0.9 - 1e-9
                assert entry["rank"] % 16 == 0
    assert result.report["refinement"] == {"steps": 0}
    assert result.report["thresholds"] == {"attention": 0.9, "mlp": 0.95}


@pytest.mark.slow
def test_transcript_objective_teacher_forces_the_original_transcripts(whisper_base, clips):
    """The transcript distillation feeds the decoder <|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>
    and the original model's own tokens; on the original encoder's outputs its KL divergence is zero."""
    from lite_whisper.calibration import _encoder_forward, prepare_batches
    from lite_whisper.refine import TranscriptObjective

    model, processor = whisper_base
    batches, _ = prepare_batches(clips[:2], processor.feature_extractor, 1500, 2)
    with torch.no_grad():
        teacher = [_encoder_forward(model.model.encoder, b.features) for b in batches]
    objective = TranscriptObjective(model, batches, teacher, torch.device("cpu"), max_new_tokens=48)
    ids, keep = objective.tokens[0]
    config = model.generation_config
    assert (ids[:, 0] == config.decoder_start_token_id).all() and (ids[:, 2] == config.task_to_id["transcribe"]).all()
    assert (ids[:, 3] == config.no_timestamps_token_id).all() and keep.sum(dim=1).min() > 4
    text = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert all(len(t.split()) >= 2 for t in text), text
    assert float(objective(0, teacher[0], batches[0])) < 1e-6
    assert float(objective(0, teacher[0] + 0.5 * torch.randn_like(teacher[0]), batches[0])) > 1e-3
    with pytest.raises(ValueError, match="full 30 s windows"):
        CompressionSettings(refine_loss="transcripts", crop_padding=0.25).validate()
