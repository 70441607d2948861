"""Reading audio and manifests: 16 kHz mono float32, as Whisper's feature extractor wants it."""

import json
from pathlib import Path

import numpy as np

from .utils import get_logger

logger = get_logger(__name__)

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif")


class AudioError(ValueError):
    pass


def load_audio(path, sampling_rate=SAMPLE_RATE):
    """Decode a file to mono float32 at `sampling_rate` (soundfile first, librosa/audioread for other formats)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    try:
        import soundfile as sf

        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        data = data.mean(axis=1)
    except Exception as sf_error:
        # Formats libsndfile does not read (mp3 on old versions, m4a, ...) go through librosa/audioread. Its
        # fallback warnings ("PySoundFile failed. Trying audioread instead.", deprecations) are noise here: the
        # error below says what happened.
        import warnings

        try:
            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data, rate = librosa.load(str(path), sr=None, mono=True)
        except Exception as error:
            reason = " ".join(str(sf_error).split()) or type(sf_error).__name__
            fallback = " ".join(str(error).split()) or type(error).__name__
            raise AudioError(f"cannot decode {path}: not a readable audio file (soundfile: {reason};"
                             f" audioread: {fallback})") from None
    if rate != sampling_rate:
        import librosa

        data = librosa.resample(data, orig_sr=rate, target_sr=sampling_rate)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.size == 0:
        raise AudioError(f"{path} holds no samples")
    return data


def read_manifest(path):
    """Rows of a manifest.jsonl (`audio` relative to the manifest's folder, optional `text`), audio made absolute."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
            if "audio" not in row:
                raise ValueError(f"{path}:{number}: no 'audio' field")
            row["audio"] = str((path.parent / row["audio"]).resolve())
            row.setdefault("id", Path(row["audio"]).stem)
            rows.append(row)
    return rows


def list_audio(source):
    """Rows ({id, audio, text?}) from a manifest.jsonl, a folder holding one, or a folder of audio files."""
    source = Path(source)
    if source.is_file() and source.suffix == ".jsonl":
        return read_manifest(source)
    if source.is_dir():
        manifest = source / "manifest.jsonl"
        if manifest.is_file():
            return read_manifest(manifest)
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        rows = []
        for file in files:
            row = {"id": file.stem, "audio": str(file.resolve())}
            transcript = file.with_suffix(".txt")
            if transcript.is_file():
                row["text"] = transcript.read_text(encoding="utf-8").strip()
            rows.append(row)
        return rows
    if source.is_file() and source.suffix.lower() in AUDIO_SUFFIXES:
        return [{"id": source.stem, "audio": str(source.resolve())}]
    raise FileNotFoundError(f"{source}: not a manifest.jsonl, a folder of audio, or an audio file")


__all__ = ["SAMPLE_RATE", "AudioError", "load_audio", "read_manifest", "list_audio"]
