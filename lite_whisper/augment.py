"""Label-free augmentation of calibration audio.

The original encoder labels any input (its outputs are the refinement targets), so augmented audio needs no
transcript: each augmented clip is turned into features once, and that one tensor is what both the original
encoder (teacher) and the compressed one (student) see. Nothing here ever runs on one side only.

Waveform levers (16 kHz mono float32 in, same out):
  speed   resampling by 0.9-1.1 (tempo and pitch together, as Kaldi's speed perturbation);
  noise   white or pink noise at 10-30 dB SNR;
  reverb  a synthetic room impulse response (exponentially decaying noise, RT60 0.2-0.7 s);
  concat  the clip followed by another calibration clip (longer inputs, a speaker change inside one window).
Feature lever:
  specaugment  two frequency masks (up to 10 mel bins) and two time masks (up to 5% of the speech frames) on the
               log-mel features, filled with the padding value.
"""

import numpy as np
import torch

WAVEFORM_AUGMENTATIONS = ("speed", "noise", "reverb", "concat")
FEATURE_AUGMENTATIONS = ("specaugment",)
AUGMENTATIONS = WAVEFORM_AUGMENTATIONS + FEATURE_AUGMENTATIONS
SAMPLE_RATE = 16000


def parse_augmentations(value):
    """A tuple of augmentation names from a comma-separated string, a sequence, or None / "" / "none"."""
    if value is None:
        return ()
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip() and v.strip().lower() != "none"]
    else:
        names = [str(v) for v in value]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
    return tuple(dict.fromkeys(names))


def speed(clip, rng, low=0.9, high=1.1):
    factor = rng.uniform(low, high)
    n = max(1, int(round(clip.size / factor)))
    positions = np.linspace(0, clip.size - 1, n)
    return np.interp(positions, np.arange(clip.size), clip).astype(np.float32)


def _pink(n, rng):
    # 1/f spectrum by shaping white noise in the frequency domain.
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(freqs), n)
    return noise / (noise.std() + 1e-12)


def noise(clip, rng, snr_db=(10.0, 30.0)):
    snr = rng.uniform(*snr_db)
    signal_power = float(np.mean(clip.astype(np.float64) ** 2)) + 1e-12
    raw = _pink(clip.size, rng) if rng.random() < 0.5 else rng.standard_normal(clip.size)
    raw = raw / (np.sqrt(np.mean(raw**2)) + 1e-12)
    return (clip + raw * np.sqrt(signal_power / 10 ** (snr / 10))).astype(np.float32)


def reverb(clip, rng, rt60=(0.2, 0.7)):
    t60 = rng.uniform(*rt60)
    length = int(t60 * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    response = rng.standard_normal(length) * np.exp(-6.9 * t / t60)  # -60 dB at t60
    response[0] = 1.0  # the direct path
    response /= np.sqrt(np.sum(response**2))
    from scipy.signal import fftconvolve

    wet = fftconvolve(clip, response)[: clip.size]
    peak = np.abs(wet).max()
    if peak > 0:
        wet = wet * (np.abs(clip).max() / peak)  # same peak level: reverberation must not change loudness much
    return wet.astype(np.float32)


def concat(clip, rng, others, max_samples):
    if not others:
        return clip
    other = others[int(rng.integers(len(others)))]
    gap = np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), dtype=np.float32)
    return np.concatenate([clip, gap, other])[:max_samples].astype(np.float32)


def augment_waveform(clip, names, rng, others=(), max_samples=30 * SAMPLE_RATE):
    """One augmented copy of `clip`: every named waveform augmentation, in a fixed order, with draws from `rng`."""
    clip = np.asarray(clip, dtype=np.float32)
    if "concat" in names:
        clip = concat(clip, rng, list(others), max_samples)
    if "speed" in names:
        clip = speed(clip, rng)
    if "reverb" in names:
        clip = reverb(clip, rng)
    if "noise" in names:
        clip = noise(clip, rng)
    peak = float(np.abs(clip).max()) if clip.size else 0.0
    if peak > 1.0:
        clip = clip / peak
    return clip[:max_samples]


def spec_augment(features, speech_frames, generator, freq_masks=2, freq_width=10, time_masks=2, time_share=0.05):
    """SpecAugment-style masks on log-mel features (N x mels x mel frames), in place of a copy; returns the copy.

    Masked cells get the features' padding value (the minimum, which is what silence becomes after Whisper's
    clamping), so a mask looks like a dropout of the signal rather than a new kind of input.
    """
    out = features.clone()
    n, mels, _ = out.shape
    for i in range(n):
        fill = out[i].min()
        for _ in range(freq_masks):
            width = int(torch.randint(0, freq_width + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, mels - width), (1,), generator=generator))
            out[i, start : start + width, :] = fill
        speech_mel = max(2, 2 * int(speech_frames[i]))
        for _ in range(time_masks):
            width = int(torch.randint(0, max(1, int(time_share * speech_mel)) + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, speech_mel - width), (1,), generator=generator))
            out[i, :, start : start + width] = fill
    return out


__all__ = [
    "AUGMENTATIONS",
    "FEATURE_AUGMENTATIONS",
    "WAVEFORM_AUGMENTATIONS",
    "augment_waveform",
    "parse_augmentations",
    "spec_augment",
]
