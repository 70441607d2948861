"""Tests of the fast default pipeline: crops, augmentation pairing, loop detector, small-data warning, module layout.

Everything here runs on a tiny random Whisper (no download, seconds on 2 CPU cores) or on no model at all.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from lite_whisper.augment import augment_waveform, parse_augmentations, spec_augment
from lite_whisper.calibration import crop_length, prepare_batches
from lite_whisper.compress import CompressionSettings, compress
from lite_whisper.quality import find_repetition, looping_transcripts


@pytest.fixture(scope="module")
def tiny_whisper():
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128,
                           max_source_positions=1500, max_target_positions=64, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1)
    return WhisperForConditionalGeneration(config).eval(), WhisperFeatureExtractor()


def _clips(n=6, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(16000 * 3) / 16000
    return [(0.1 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)[
        : 16000 * (1 + i % 3)] for i in range(n)]


# ------------------------------------------------------------------------------------------------------------
# Augmentation: deterministic per seed, and the teacher and the student always see the same tensor
# ------------------------------------------------------------------------------------------------------------


def test_augmentation_is_seeded_and_changes_audio():
    clip = _clips(1)[0]
    names = parse_augmentations("speed,noise,reverb,concat")
    a = augment_waveform(clip, names, np.random.default_rng(3), others=_clips(3, seed=1))
    b = augment_waveform(clip, names, np.random.default_rng(3), others=_clips(3, seed=1))
    c = augment_waveform(clip, names, np.random.default_rng(4), others=_clips(3, seed=1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and np.isfinite(a).all()
    features = torch.randn(2, 80, 3000)
    one = spec_augment(features, [100, 200], torch.Generator().manual_seed(0))
    two = spec_augment(features, [100, 200], torch.Generator().manual_seed(0))
    assert torch.equal(one, two) and not torch.equal(one, features)
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_augmentations("speed,wobble")


def test_prepare_batches_crops_are_prefixes_of_whispers_window(tiny_whisper):
    _, feature_extractor = tiny_whisper
    clips = _clips(5)
    full = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")["input_features"]
    batches, n = prepare_batches(clips, feature_extractor, 1500, batch_size=2, crop_padding=0.5)
    assert n == 5 and sum(b.features.shape[0] for b in batches) == 5
    for batch in batches:
        speech = batch.speech.sum(dim=1)
        assert batch.frames >= int(speech.max()) + 64  # every crop keeps some of Whisper's padding
        for row, frames in zip(batch.features, speech):
            # Identify the clip by its speech length: the crop is exactly the start of Whisper's own features.
            matches = [i for i in range(5) if torch.equal(full[i, :, : row.shape[-1]], row)]
            assert matches, "a crop is not a prefix of the full-window features"
    assert crop_length(100, 1500, None) == 1500
    assert crop_length(100, 1500, 0.25) == 176  # 100 speech + max(64, 25) padding, rounded up to 16
    assert crop_length(1490, 1500, 0.5) == 1500


def test_augmentation_keeps_teacher_student_pairing(tiny_whisper, monkeypatch):
    """The teacher's targets and the student's inputs come from one tensor per batch, augmented or not."""
    import lite_whisper.calibration as calibration

    compress_module = sys.modules["lite_whisper.compress"]  # the package exports a function of the same name

    model, feature_extractor = tiny_whisper
    teacher_inputs, student_inputs = [], []
    original_embed = calibration._embed

    def teacher_embed(encoder, features):
        teacher_inputs.append(features.clone())
        return original_embed(encoder, features)

    def student_embed(encoder, features):
        student_inputs.append(features.clone())
        return original_embed(encoder, features)

    monkeypatch.setattr(compress_module, "_embed", teacher_embed)  # the statistics pass, whose output is the teacher
    monkeypatch.setattr(calibration, "_embed", student_embed)  # the refinement's encoder forward
    settings = CompressionSettings(target_size=0.9, refine_steps=4, refine_batch_size=2, augmentations="speed,noise,"
                                   "specaugment", augment_copies=1, seed=5, refine_mode="encoder")
    result = compress(model, _clips(4), feature_extractor, settings, device="cpu", progress=False)
    assert result.report["calibration"]["augmented_inputs"] == 4
    assert len(teacher_inputs) == 4 and len(student_inputs) == 4  # 8 inputs in batches of 2; 4 steps
    for student in student_inputs:
        assert any(torch.equal(student, teacher) for teacher in teacher_inputs)
    # The same seed gives the same augmented inputs, hence the same teacher targets.
    again, _ = prepare_batches(_clips(4), feature_extractor, 1500, 2, settings.crop_padding, settings.augmentations, 1,
                               seed=5, piece_s=settings.piece_s)
    assert all(any(torch.equal(b.features, t) for t in teacher_inputs) for b in again)


def test_compress_reports_each_stage(tiny_whisper):
    model, feature_extractor = tiny_whisper
    # Crops are not the default (they measured worse on real speech) but must keep working when asked for.
    settings = CompressionSettings(refine_steps=2, refine_batch_size=2, rank_multiple=8, crop_padding=0.25, piece_s=10.0)
    result = compress(model, _clips(4), feature_extractor, settings, device="cpu", progress=False)
    timings = result.report["timings_s"]
    for stage in ("features_s", "statistics_s", "factorisation_s", "teacher_s", "refinement_s", "build_s"):
        assert stage in timings
    calibration = result.report["calibration"]
    assert calibration["encoder_frames"] < calibration["full_window_frames"] / 5  # 1-3 s clips: crops, not 30 s
    assert result.report["target_size"] == 0.8 and abs(result.report["encoder_fraction"] - 0.8) < 0.05
    # refine_steps given, refine_mode left alone: layer-wise, 2 steps per layer, and the loss was measured
    refinement = result.report["refinement"]
    assert (refinement["mode"], refinement["steps_per_layer"], refinement["lr"]) == ("layer", 2, 5e-4)
    assert np.isfinite(refinement["initial_loss"]) and refinement["initial_loss"] > 0


def test_refinement_losses_and_bfloat16_change_the_refinement(tiny_whisper):
    model, feature_extractor = tiny_whisper

    def run(**kwargs):
        settings = CompressionSettings(refine_steps=3, refine_batch_size=2, rank_multiple=8, augment_copies=0,
                                       refine_mode="encoder", **kwargs)
        result = compress(model, _clips(4), feature_extractor, settings, device="cpu", progress=False)
        refinement = result.report["refinement"]
        assert refinement["steps"] == 3 and np.isfinite(refinement["initial_loss"]) and np.isfinite(refinement["final_loss"])
        return refinement["initial_loss"], result.model.model.encoder.layers[0].fc1.weight1.detach()

    mse_loss, mse_weight = run()
    # Each loss measures the same student error differently: a loss that fell back to MSE would match it exactly.
    for refine_loss in ("decoder", "standardized"):
        loss, _ = run(refine_loss=refine_loss)
        assert loss != pytest.approx(mse_loss, rel=1e-3), refine_loss
    # bfloat16 autocast changes the arithmetic (a flag that did nothing would give identical factors), not the result.
    _, bf16_weight = run(refine_precision="bfloat16")
    assert not torch.equal(bf16_weight, mse_weight)
    torch.testing.assert_close(bf16_weight, mse_weight, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="refine_loss must be one of"):
        CompressionSettings(refine_loss="l1").validate()
    with pytest.raises(ValueError, match="refine_precision must be one of"):
        CompressionSettings(refine_precision="float16").validate()


def test_decoder_metric_measures_what_cross_attention_reads(tiny_whisper):
    from lite_whisper.refine import decoder_metric, frame_loss

    model, _ = tiny_whisper
    factor = decoder_metric(model)
    d = model.config.d_model
    assert factor.shape == (d, d)
    error = torch.randn(3, 5, d)
    expected = 0.0
    for layer in model.model.decoder.layers:
        for projection in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj):
            expected = expected + (error @ projection.weight.T).pow(2).sum(-1)
    total = sum(float((p.weight.detach().double() ** 2).sum()) for layer in model.model.decoder.layers
                for p in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj))
    measured = (error @ factor).pow(2).sum(-1)
    # |e L|^2 = e M e^T with trace(M) scaled to d: the cross-attention energy times d / trace.
    torch.testing.assert_close(measured, expected * (d / total), rtol=1e-3, atol=1e-4)
    speech = torch.zeros(3, 5, dtype=torch.bool)
    speech[:, :2] = True
    loss = frame_loss(error, torch.zeros_like(error), speech, None, factor)
    torch.testing.assert_close(loss, measured.mean() / d, rtol=1e-4, atol=1e-6)


def test_default_refinement_depends_on_size():
    from lite_whisper.compress import AUTO_REFINE_STEPS, REFINE_LRS

    assert CompressionSettings().validate().refine_steps == 0  # 0.8: refinement did not help real speech
    assert CompressionSettings(target_size=0.5).validate().refine_steps == AUTO_REFINE_STEPS
    assert CompressionSettings(target_size=0.5, refine_steps=7).validate().refine_steps == 7
    # Layer-wise by default (it measured better below 0.75), end to end where layer-wise cannot run.
    settings = CompressionSettings(target_size=0.65).validate()
    assert (settings.refine_mode, settings.refine_lr) == ("layer", REFINE_LRS["layer"])
    settings = CompressionSettings(target_size=0.65, mode="sequential").validate()
    assert (settings.refine_mode, settings.refine_lr) == ("encoder", REFINE_LRS["encoder"])
    assert CompressionSettings(refine_loss="decoder").validate().refine_mode == "encoder"
    assert CompressionSettings(refine_mode="layer", refine_lr=3e-3).validate().refine_lr == 3e-3
    with pytest.raises(ValueError, match="refine_mode must be one of"):
        CompressionSettings(refine_mode="block").validate()
    with pytest.raises(ValueError, match="needs mode='one-shot'"):
        CompressionSettings(refine_mode="layer", mode="sequential").validate()
    with pytest.raises(ValueError, match="needs mode='one-shot'"):
        CompressionSettings(refine_mode="layer-sequential", refine_loss="decoder").validate()


@pytest.mark.parametrize("mode", ["layer", "layer-sequential"])
def test_layer_refinement_pairs_each_input_with_the_original_layers_output(tiny_whisper, mode):
    """Exact (full-rank) factors reproduce every original layer: the layer-wise loss starts at zero only if each
    batch's inputs meet that same batch's targets, in both modes. Then it trains the layers it is given."""
    import copy

    from lite_whisper.calibration import _embed
    from lite_whisper.factorize import _low_rank_module, _set_projection, exact_factors
    from lite_whisper.modeling_lite_whisper import encoder_projection
    from lite_whisper.refine import refine_layers

    model, feature_extractor = tiny_whisper
    # Crops make every batch a different length (1, 2 and 3 s clips): a mixed-up pairing could not even subtract.
    batches, _ = prepare_batches(_clips(6), feature_extractor, 1500, batch_size=2, crop_padding=0.5)
    assert len({b.frames for b in batches}) == 3
    encoder = model.model.encoder.eval()
    with torch.no_grad():
        stem = [_embed(encoder, b.features) for b in batches]
    layers = [copy.deepcopy(layer) for layer in encoder.layers]
    for (i, key), factors in exact_factors(model).items():
        _set_projection(layers[i], key, _low_rank_module(*factors))
    settings = CompressionSettings(refine_steps=4, refine_mode=mode, refine_batch_size=2).validate()
    initial, final = refine_layers(encoder.layers, layers, stem, batches, settings, torch.device("cpu"), progress=False)
    # (Sequentially, layer 1 starts from layer 0 after its steps: Adam moves even at zero gradient, a little.)
    assert initial < 1e-5
    # A perturbed start has a real error, and the steps lower it.
    layers = [copy.deepcopy(layer) for layer in encoder.layers]
    generator = torch.Generator().manual_seed(0)
    for (i, key), (w1, w2, b) in exact_factors(model).items():
        _set_projection(layers[i], key, _low_rank_module(w1 + 0.05 * torch.randn(w1.shape, generator=generator), w2, b))
    before = encoder_projection(layers[0], "fc1").weight1.detach().clone()
    settings = CompressionSettings(refine_steps=20, refine_mode=mode, refine_batch_size=2, refine_lr=1e-3).validate()
    initial, final = refine_layers(encoder.layers, layers, stem, batches, settings, torch.device("cpu"), progress=False)
    assert initial > 1e-4 and final < 0.7 * initial
    assert not torch.equal(encoder_projection(layers[0], "fc1").weight1, before)


# ------------------------------------------------------------------------------------------------------------
# Loop detector
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "I am going to the store. " * 6,
    "the " * 30,
    "And then he said, and then he said, and then he said, and then he said, and then he said.",
    "Thank you. Thank you. Thank you. Thank you. Thank you. Thank you. Thank you. Thank you. Thank you.",
])
def test_loop_detector_fires_on_loops(text):
    assert find_repetition(text)


@pytest.mark.parametrize("text", [
    "He hoped there would be stew for dinner, turnips and carrots and bruised potatoes and fat mutton pieces to be"
    " ladled out in thick peppered flour fattened sauce.",
    "Yes, yes, yes. I know.",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
    "",
])
def test_loop_detector_quiet_on_clean_text(text):
    assert find_repetition(text) is None


def test_looping_transcripts_names_the_clips():
    found = looping_transcripts(["a", "b"], ["a clean sentence here", "so so so so so so so so so so"])
    assert [x["id"] for x in found] == ["b"]


# ------------------------------------------------------------------------------------------------------------
# Small calibration sets warn, saying how much was used and how to pass more
# ------------------------------------------------------------------------------------------------------------


def test_small_calibration_warns(tmp_path, caplog, monkeypatch):
    import logging

    import soundfile as sf

    # An in-process CLI run (test_cli) gives the "lite_whisper" logger its own handler and stops propagation;
    # caplog listens at the root.
    monkeypatch.setattr(logging.getLogger("lite_whisper"), "propagate", True)

    from lite_whisper.convert import load_calibration_audio, warn_if_little_audio

    for i, clip in enumerate(_clips(3)):
        sf.write(tmp_path / f"clip{i}.wav", clip, 16000)
    audio = load_calibration_audio(str(tmp_path), num_samples=2)
    with caplog.at_level("WARNING"):
        assert warn_if_little_audio(audio, 2)
    message = caplog.text
    assert "only 2 clip(s)" in message and "--calibration" in message and "--num-calibration-samples" in message
    caplog.clear()
    audio.audio = audio.audio * 200  # about 10 minutes: no warning
    with caplog.at_level("WARNING"):
        assert not warn_if_little_audio(audio, 400)
    assert "only" not in caplog.text


# ------------------------------------------------------------------------------------------------------------
# Module layout: no import cycle between the stages, convert and export
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [
    ("convert", "export", "compress"),
    ("export", "convert", "refine", "calibration", "statistics", "ranks", "factorize", "augment", "quality"),
])
def test_modules_import_cleanly_in_any_order(order):
    code = "; ".join(f"import lite_whisper.{name}" for name in order)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
