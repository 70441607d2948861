"""Transcription with a LiteWhisper MLX model, through mlx-whisper's own decoding and `transcribe`.

Two entry points:

* `transcribe(model, audio, ...)`: mlx-whisper's `transcribe` (any length: 30 s windows with timestamp-driven
  seeking, temperature fallback, optional word timestamps, language detection). mlx-whisper loads its model by path
  through `ModelHolder`; the model is handed to it by filling that cache for the duration of the call.
* `greedy_decode(model, audios, ...)`: one 30 s window per input, temperature 0, no timestamps: the same search as
  Transformers' `generate()` without timestamps, which the parity tests compare against. Inputs are batched.
"""

import contextlib
import importlib
import threading
from pathlib import Path

import numpy as np

from lite_whisper.utils import get_logger

from .backend import import_mlx

logger = get_logger(__name__)

mx, _ = import_mlx()

from mlx_whisper import audio as mlx_audio  # noqa: E402
from mlx_whisper.decoding import DecodingOptions  # noqa: E402

# The package's `transcribe` attribute is the function; the module (holding ModelHolder) is reached by name.
mlx_transcribe = importlib.import_module("mlx_whisper.transcribe")

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
SAMPLE_RATE = mlx_audio.SAMPLE_RATE

# ModelHolder is process-wide state in mlx-whisper; calls that borrow it must not interleave.
_holder_lock = threading.Lock()


def load_audio_array(audio):
    """16 kHz mono float32 numpy array from a path (any format lite_whisper.audio reads) or an array."""
    if isinstance(audio, (str, Path)):
        from lite_whisper.audio import load_audio

        return load_audio(audio)
    array = np.asarray(audio, dtype=np.float32)
    if array.ndim != 1:
        raise ValueError(f"audio must be a mono waveform (1-D), got shape {array.shape}")
    return array


def log_mel(model, audio):
    """Log-mel features of the first 30 s of `audio` as the encoder takes them: (3000, n_mels), model dtype.

    Computed exactly as mlx-whisper's `transcribe` does for its first window (the audio followed by 30 s of silence,
    then cut to 3000 frames), so `greedy_decode` and `transcribe` see the same features.
    """
    waveform = load_audio_array(audio)
    mel = mlx_audio.log_mel_spectrogram(waveform, n_mels=model.dims.n_mels, padding=mlx_audio.N_SAMPLES)
    return mlx_audio.pad_or_trim(mel, mlx_audio.N_FRAMES, axis=-2).astype(model.dtype)


def _fp16(model):
    # mlx-whisper's decoding checks that the encoder output has the dtype its `fp16` option names.
    return model.dtype == mx.float16


def greedy_decode(model, audios, language="en", task="transcribe", sample_len=None, batch_size=8):
    """Greedy transcripts without timestamps of the first 30 s of each input.

    Args:
        audios: a path or waveform, or a list of them (then a list of results is returned).
        language: language code, or None to detect it per input.
        sample_len: most tokens to generate (mlx-whisper's default: half the text context, 224).
    Returns mlx-whisper `DecodingResult`s (`text`, `tokens`, `language`, `avg_logprob`, `no_speech_prob`, ...).
    """
    single = not isinstance(audios, (list, tuple))
    audios = [audios] if single else list(audios)
    options = DecodingOptions(
        task=task,
        language=language,
        temperature=0.0,
        sample_len=sample_len,
        without_timestamps=True,
        fp16=_fp16(model),
    )
    results = []
    for start in range(0, len(audios), batch_size):
        mels = []
        for audio in audios[start : start + batch_size]:
            waveform = load_audio_array(audio)
            if len(waveform) > mlx_audio.N_SAMPLES:
                logger.warning("greedy_decode reads the first 30 s only; use transcribe() for longer audio")
            mels.append(log_mel(model, waveform))
        results.extend(model.decode(mx.stack(mels), options))
    return results[0] if single else results


@contextlib.contextmanager
def _lent_to_mlx_whisper(model):
    """Let mlx_whisper.transcribe use `model`: it fetches models from ModelHolder by path, so fill that cache."""
    holder = mlx_transcribe.ModelHolder
    with _holder_lock:
        saved = holder.model, holder.model_path
        key = f"<lite_whisper.mlx_port model {id(model)}>"
        holder.model, holder.model_path = model, key
        try:
            yield key
        finally:
            holder.model, holder.model_path = saved


def transcribe(
    model,
    audio,
    *,
    language=None,
    task="transcribe",
    temperature=DEFAULT_TEMPERATURES,
    word_timestamps=False,
    condition_on_previous_text=True,
    initial_prompt=None,
    **decode_options,
):
    """Transcribe audio of any length with mlx-whisper's `transcribe` (timestamps, temperature fallback).

    Args:
        audio: a path or a 16 kHz mono waveform.
        language: language code or name; None detects it from the first 30 s (English-only models use "en").
        temperature: one value, or the fallback sequence tried when a window's output is too repetitive or
            improbable (compression-ratio and log-probability thresholds, as in OpenAI Whisper).
        word_timestamps: add per-word timings (cross-attention alignment, uses the checkpoint's alignment heads).
        decode_options: further mlx_whisper.transcribe / DecodingOptions arguments (e.g. `no_speech_threshold`).
    Returns mlx-whisper's result dict: `text`, `segments` (with `start`, `end`, `text`, ...), `language`.
    """
    waveform = load_audio_array(audio)
    with _lent_to_mlx_whisper(model) as key:
        return mlx_transcribe.transcribe(
            waveform,
            path_or_hf_repo=key,
            verbose=None,
            temperature=temperature,
            word_timestamps=word_timestamps,
            condition_on_previous_text=condition_on_previous_text,
            initial_prompt=initial_prompt,
            language=language,
            task=task,
            fp16=_fp16(model),
            **decode_options,
        )


__all__ = ["DEFAULT_TEMPERATURES", "greedy_decode", "load_audio_array", "log_mel", "transcribe"]
