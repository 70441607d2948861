"""Shared fixtures: the real whisper-base (rebuilt from its PyPI packages) and the dev audio."""

import json
import os
from pathlib import Path

# Without a GPU the Triton kernel tests run through Triton's interpreter, which must be chosen before anything
# imports triton (transformers and torch may do so while other test modules load).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("LITE_WHISPER_DEV_DATA", REPO.parent / "shared" / "eval" / "dev"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def whisper_base_dir():
    from lite_whisper.whisper_base import whisper_base_path

    return whisper_base_path()


@pytest.fixture(scope="session")
def processor(whisper_base_dir):
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(whisper_base_dir)


@pytest.fixture(scope="session")
def whisper_model(whisper_base_dir):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(whisper_base_dir).eval()


@pytest.fixture(scope="session")
def dev_rows():
    manifest = DEV / "manifest.jsonl"
    if not manifest.is_file():
        pytest.fail(f"dev audio not found at {DEV} (set LITE_WHISPER_DEV_DATA)")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for row in rows:
        row["path"] = str(DEV / row["audio"])
    return rows


def load(row):
    from lite_whisper.audio import load_audio

    return load_audio(row["path"])


def short_clips(rows, n=None, seed=0):
    """Short-form clips, a deterministic spread over sources (real first)."""
    short = [r for r in rows if not r.get("long_form") and r["duration_s"] <= 30]
    real = [r for r in short if r["condition"] == "real"]
    synthetic = [r for r in short if r["condition"] != "real"]
    rng = np.random.default_rng(seed)
    synthetic = [synthetic[i] for i in rng.permutation(len(synthetic))]
    chosen = real + synthetic
    return chosen if n is None else chosen[:n]


def greedy_transcripts(model, processor, arrays, batch_size=8, max_new_tokens=128, **generate_kwargs):
    """Greedy English transcripts of short clips. `max_new_tokens` caps repetition loops (a 30 s window holds far
    fewer than 128 tokens of speech), which would otherwise hold a whole batch to 448 tokens."""
    texts = []
    for start in range(0, len(arrays), batch_size):
        batch = arrays[start : start + batch_size]
        features = processor.feature_extractor(batch, sampling_rate=16000, return_tensors="pt").input_features
        features = features.to(model.dtype)
        with torch.no_grad():
            ids = model.generate(features, language="en", task="transcribe", num_beams=1, do_sample=False,
                                 max_new_tokens=max_new_tokens, **generate_kwargs)
        texts.extend(processor.batch_decode(ids, skip_special_tokens=True))
    return [t.strip() for t in texts]
