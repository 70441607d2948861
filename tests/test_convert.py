"""lite-whisper-convert: every user error fails fast with nothing written; a real conversion of whisper-base writes
a complete folder that loads through the ASR pipeline and transcribes dev audio."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lite_whisper.cli import convert_main
from lite_whisper.convert import (
    ConversionError,
    bundled_calibration_dir,
    bundled_clips_dir,
    convert,
    load_calibration_audio,
    parse_rank_threshold,
)
from lite_whisper.export import choose_license, read_card_metadata, write_generation_config

from conftest import load, short_clips


def _nothing_written(output):
    output = Path(output)
    assert not output.exists() or not any(output.iterdir())
    # no temporary folder left beside it either
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.tmp-")]


# --------------------------------------------------------------------------------------------------------------
# Validation: before any heavy work, nothing written
# --------------------------------------------------------------------------------------------------------------


def test_rank_threshold_parsing():
    assert parse_rank_threshold("0.99:0.999") == (0.99, 0.999)
    assert parse_rank_threshold("0.95") == (0.95, 0.95)
    assert parse_rank_threshold(1) == (1.0, 1.0)
    for bad, words in (("0", "(0, 1]"), ("1.5", "(0, 1]"), ("0.9:-0.1", "MLP"), ("abc", "not a number"),
                       ("0.9:0.9:0.9", "ATTENTION:MLP")):
        with pytest.raises(ConversionError, match=None) as info:
            parse_rank_threshold(bad)
        assert words in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank_threshold": "1.2"}, "rank threshold must be in (0, 1]"),
        ({"rank_threshold": "0:0.99"}, "rank threshold must be in (0, 1]"),
        ({"target_encoder_size": 0}, "(0, 1]"),
        ({"target_encoder_size": 1.5}, "(0, 1]"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"mode": "sideways"}, "mode must be one of"),
        ({"refine_steps": -1}, "non-negative"),
        ({"num_calibration_samples": 0}, "positive integer"),
        ({"calibration": "/nonexistent/audio/folder"}, "not found"),
    ],
)
def test_invalid_options_fail_before_work(tmp_path, whisper_base_dir, kwargs, message):
    output = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert(whisper_base_dir, output, progress=False, **kwargs)
    assert message in str(info.value)
    _nothing_written(output)


def test_existing_output_folder_is_refused(tmp_path, whisper_base_dir):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert(whisper_base_dir, output, progress=False)
    assert (output / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]


def test_base_model_that_is_not_whisper(tmp_path):
    base = tmp_path / "bert"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    output = tmp_path / "out"
    with pytest.raises(ConversionError, match="model_type 'bert'"):
        convert(base, output, progress=False)
    _nothing_written(output)
    # the CLI: one line on stderr, exit status 2
    assert convert_main(["--base-model", str(base), "--output-dir", str(output)]) == 2
    _nothing_written(output)


def test_base_model_that_is_already_lite_whisper(tmp_path):
    base = tmp_path / "lite"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "lite-whisper"}))
    with pytest.raises(ConversionError, match="already a LiteWhisper"):
        convert(base, tmp_path / "out", progress=False)


def test_cli_reports_errors(tmp_path, whisper_base_dir, capsys):
    output = tmp_path / "out"
    # a bad option value is an argument error (argparse: usage + one error line, exit status 2), before any work
    with pytest.raises(SystemExit) as info:
        convert_main(["--base-model", str(whisper_base_dir), "--output-dir", str(output), "--rank-threshold", "2"])
    assert info.value.code == 2
    assert "rank threshold must be in (0, 1]" in capsys.readouterr().err
    _nothing_written(output)


def _write_clip(path, seconds=1.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)


def test_unreadable_and_empty_files_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    _write_clip(folder / "a.wav")
    _write_clip(folder / "b.flac", rate=44100)  # resampled
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav file")
    sf.write(str(folder / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    result = load_calibration_audio(folder, num_samples=10)
    assert len(result.audio) == 2
    assert all(a.dtype == np.float32 and a.ndim == 1 for a in result.audio)
    assert abs(len(result.audio[1]) - 16000) < 20
    assert sorted(Path(s["audio"]).name for s in result.skipped) == ["broken.wav", "empty.wav"]
    assert result.summary()["available"] == 4


def test_no_usable_audio_is_an_error(tmp_path, whisper_base_dir):
    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "broken.wav").write_bytes(b"nope")
    sf.write(str(folder / "empty.flac"), np.zeros(0, dtype=np.float32), 16000)
    output = tmp_path / "out"
    with pytest.raises(ConversionError, match="no usable calibration audio"):
        convert(whisper_base_dir, output, calibration=folder, progress=False)
    _nothing_written(output)


def test_dataset_source_needs_the_extra(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ConversionError, match=r"lite-whisper\[datasets\]"):
            load_calibration_audio("someone/speech:train:audio")
    else:
        pytest.skip("datasets is installed")


def test_bundled_audio_is_disjoint_from_dev(dev_rows):
    calibration = load_calibration_audio(None, num_samples=100)
    assert calibration.kind == "bundled" and len(calibration.audio) >= 10 and calibration.seconds > 90
    clips = [json.loads(l) for l in (bundled_clips_dir() / "manifest.jsonl").read_text().splitlines()]
    assert clips and all(c["text"] for c in clips)
    assert not {c["id"] for c in clips} & set(calibration.ids)
    # no dev source in the bundled sets (dev: LibriSpeech test-clean, pocketsphinx test data, TTS voices)
    dev_sources = {r["source"] for r in dev_rows}
    bundled_sources = {json.loads(l)["source"].split(" ")[0] for d in (bundled_calibration_dir(), bundled_clips_dir())
                       for l in (d / "manifest.jsonl").read_text().splitlines()}
    assert not dev_sources & bundled_sources
    assert (bundled_calibration_dir().parent / "ATTRIBUTION.md").is_file()


def test_generation_config_gets_max_length(tmp_path, whisper_base_dir, whisper_model):
    base = tmp_path / "base"
    base.mkdir()
    generation = json.loads((whisper_base_dir / "generation_config.json").read_text())
    generation.pop("max_length", None)
    (base / "generation_config.json").write_text(json.dumps(generation))
    target = tmp_path / "target"
    target.mkdir()
    note = write_generation_config(base, target, whisper_model.config)
    assert "max_length=448" in note
    written = json.loads((target / "generation_config.json").read_text())
    assert written["max_length"] == 448
    assert written["lang_to_id"] == generation["lang_to_id"]
    # a base that has it is copied verbatim
    assert write_generation_config(whisper_base_dir, target, whisper_model.config) is None
    assert (target / "generation_config.json").read_bytes() == (whisper_base_dir / "generation_config.json").read_bytes()


def test_license_choice(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# card\n")
    metadata = read_card_metadata(tmp_path)
    assert choose_license(None, metadata, "x/y") == ("apache-2.0", "base model card")
    assert choose_license("cc-by-4.0", metadata, "x/y")[0] == "cc-by-4.0"
    assert choose_license(None, {}, "openai/whisper-large-v3-turbo")[0] == "mit"
    assert choose_license(None, {}, "someone/finetune")[0] == "unknown"


# --------------------------------------------------------------------------------------------------------------
# A real conversion (few clips, no refinement: structure, not quality)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory, whisper_base_dir):
    output = tmp_path_factory.mktemp("convert") / "lite-whisper-base"
    # Through the CLI, on the bundled calibration set. A high threshold keeps the model close to the original so
    # the transcription check below is about the folder working, not about compression quality (the benchmarks
    # measure that); few clips and no refinement keep it quick.
    code = convert_main(["--base-model", str(whisper_base_dir), "--output-dir", str(output),
                         "--num-calibration-samples", "6", "--rank-threshold", "0.999", "--refine-steps", "0",
                         "--base-model-name", "openai/whisper-base", "--no-progress"])
    assert code == 0
    return output


@pytest.mark.slow
def test_output_folder_contents(converted, whisper_base_dir):
    names = {p.name for p in converted.iterdir()}
    for required in ("model.safetensors", "config.json", "generation_config.json", "preprocessor_config.json",
                     "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "README.md",
                     "compression_report.json", "configuration_lite_whisper.py", "modeling_lite_whisper.py"):
        assert required in names, required
    assert not [n for n in converted.parent.iterdir() if n.name.startswith(".")]

    from safetensors import safe_open

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "lite-whisper"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForSpeechSeq2Seq"}
    low_rank = config["low_rank_config"]
    assert len(low_rank) == config["encoder_layers"] and any(low_rank)
    with safe_open(str(converted / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
        assert dtypes == {torch.float16}
        for i, ranks in enumerate(low_rank):
            for key in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
                prefix = f"model.encoder.layers.{i}.{'self_attn.' if key.endswith('_proj') else ''}{key}."
                if key in ranks:
                    w1 = handle.get_slice(prefix + "weight1").get_shape()
                    w2 = handle.get_slice(prefix + "weight2").get_shape()
                    assert w1[1] == ranks[key] == w2[0] and ranks[key] % 16 == 0
                else:
                    assert prefix + "weight" in handle.keys()

    generation = json.loads((converted / "generation_config.json").read_text())
    base_generation = json.loads((whisper_base_dir / "generation_config.json").read_text())
    assert generation["max_length"] == 448
    assert generation["lang_to_id"] == base_generation["lang_to_id"]

    card = (converted / "README.md").read_text()
    front = card.split("---")[1]
    import yaml

    metadata = yaml.safe_load(front)
    assert metadata["base_model"] == "openai/whisper-base"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "automatic-speech-recognition"
    assert metadata["license"] == "mit"
    assert {"lite-whisper", "liteasr"} <= set(metadata["tags"])
    assert "| layer | q_proj |" in card and "trust_remote_code=True" in card

    report = json.loads((converted / "compression_report.json").read_text())
    conversion = report["conversion"]
    assert conversion["dtype"] == "float16"
    assert conversion["calibration"]["kind"] == "bundled" and conversion["calibration"]["clips"] == 6
    assert conversion["versions"]["transformers"] and conversion["versions"]["torch"]
    assert conversion["timings_s"]["total_s"] > 0
    assert 0 < report["encoder_params_after"] < report["encoder_params_before"]
    for row, ranks in zip(report["layers"], low_rank):
        for key, entry in row.items():
            if key != "layer":
                assert entry["rank"] == ranks.get(key)


@pytest.mark.slow
def test_output_transcribes_through_the_pipeline(converted, dev_rows):
    from transformers import pipeline

    from lite_whisper.text import wer_scores

    asr = pipeline("automatic-speech-recognition", model=str(converted), trust_remote_code=True,
                   **({"dtype": torch.float32} if _transformers_major() >= 5 else {"torch_dtype": torch.float32}))
    rows = [r for r in short_clips(dev_rows) if r["condition"] == "real"][:4]
    hyps = [asr({"raw": load(r), "sampling_rate": 16000}, generate_kwargs={"language": "en"})["text"] for r in rows]
    wer = wer_scores([r["text"] for r in rows], hyps)["wer"]
    # whisper-base itself scores about 5-10 on these clips; the 0.999-threshold model stays close
    assert wer < 25, (wer, hyps)


def test_overwrite_still_validates_first(tmp_path, whisper_base_dir):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="rank threshold"):
        convert(whisper_base_dir, output, rank_threshold="7", overwrite=True, progress=False)
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]


def _transformers_major():
    import transformers

    return int(transformers.__version__.split(".")[0])


@pytest.mark.slow
def test_model_card_usage_needs_no_ffmpeg_and_says_what_it_measured(converted):
    card = (converted / "README.md").read_text()
    usage = card.split("## Usage", 1)[1].split("## Ranks", 1)[0]
    # numpy input read with soundfile (a file name would need ffmpeg), and an install line that works
    assert 'sf.read("audio.flac", dtype="float32")' in usage and '{"raw": audio, "sampling_rate": rate}' in usage
    assert 'asr("audio.flac"' not in usage and "no ffmpeg is needed" in usage
    assert "pip install torch transformers soundfile" in usage and "pip install lite-whisper" not in card
    # the calibration line reads as a sentence, and the card says what its numbers were measured on
    assert "bundled: bundled" not in card
    assert "calibration on 6 clips (" in card and "s of audio) from the calibration set bundled with lite-whisper" in card
    assert "What the numbers on this card are" in card and "No accuracy (WER) was measured" in card
    assert "- Label-free refinement: 0 steps" in card  # converted with --refine-steps 0
    # the usage snippet runs as written (soundfile + pipeline, remote code), on a bundled clip
    clip = sorted(bundled_clips_dir().glob("*.flac"))[0]
    code = usage.split("```python", 1)[1].split("```", 1)[0]
    code = code.replace('"audio.flac"', repr(str(clip))).replace("path/to/this/folder", str(converted))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "card-usage", "exec"), {})
    assert len(out.getvalue().split()) >= 3, out.getvalue()
