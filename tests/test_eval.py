"""lite-whisper-eval on a handful of real dev clips (short and one long-form): JSON + Markdown with sane numbers."""

import json
from pathlib import Path

import pytest
import torch

from lite_whisper.cli import eval_main
from lite_whisper.evaluate import EvaluationError, evaluate, to_markdown

from conftest import short_clips


@pytest.fixture(scope="module")
def lite_folder(tmp_path_factory, whisper_model, whisper_base_dir):
    """A LiteWhisper checkpoint without running the compressor: exact (full-rank) SVD factors of whisper-base's
    encoder, so its transcripts must match the base model's."""
    from lite_whisper import build_lite_whisper
    from lite_whisper.export import copy_processor_files
    from lite_whisper.factorize import exact_factors

    folder = tmp_path_factory.mktemp("eval") / "lite-exact"
    lite = build_lite_whisper(whisper_model, exact_factors(whisper_model))
    lite.save_pretrained(str(folder))
    copy_processor_files(whisper_base_dir, folder)
    return folder


@pytest.fixture(scope="module")
def eval_manifest(tmp_path_factory, dev_rows):
    """Four real short clips and the shortest long-form clip, as a manifest pointing into dev."""
    rows = [r for r in short_clips(dev_rows) if r["condition"] == "real"][:4]
    rows.append(min((r for r in dev_rows if r.get("long_form")), key=lambda r: r["duration_s"]))
    manifest = tmp_path_factory.mktemp("data") / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": r["id"], "audio": r["path"], "text": r["text"]}) + "\n" for r in rows))
    return manifest


@pytest.mark.slow
def test_eval_side_by_side(lite_folder, whisper_base_dir, eval_manifest, tmp_path):
    json_path, md_path = tmp_path / "out" / "results.json", tmp_path / "out" / "results.md"
    code = eval_main(["--models", str(whisper_base_dir), str(lite_folder), "--data", str(eval_manifest),
                      "--json", str(json_path), "--markdown", str(md_path), "--batch-size", "4", "--no-progress"])
    assert code == 0
    results = json.loads(json_path.read_text())
    assert results["clips"] == 5 and results["long_form_clips"] == 1
    base, lite = results["models"]
    for r in (base, lite):
        assert 0 <= r["wer"] < 40, r["wer"]
        assert 0 <= r["mean_utterance_wer"] < 60
        assert r["short_form"]["clips"] == 4 and r["long_form"]["clips"] == 1
        assert 0 < r["rtf"] < 5
        assert len(r["utterances"]) == 5 and all(u["hypothesis"] for u in r["utterances"])
    assert base["model_type"] == "whisper" and lite["model_type"] == "lite-whisper"
    assert base["encoder_fraction"] == pytest.approx(1.0)
    # full-rank factors store in x k + k x out > in x out: more parameters, same function
    assert lite["encoder_params"] > base["encoder_params"]
    assert lite["original_encoder_params"] == base["encoder_params"]
    same = sum(a["hypothesis"] == b["hypothesis"] for a, b in zip(base["utterances"], lite["utterances"]))
    assert same >= 4
    assert abs(lite["wer"] - base["wer"]) < 3
    markdown = md_path.read_text()
    assert markdown.count("\n| ") == 3 and "| WER |" in markdown and str(lite_folder) in markdown


@pytest.mark.slow
def test_eval_api_limit(whisper_base_dir, eval_manifest):
    results = evaluate([str(whisper_base_dir)], eval_manifest, limit=2, progress=False)
    assert results["clips"] == 2 and results["long_form_clips"] == 0
    assert results["models"][0]["long_form"] is None
    assert "| model |" in to_markdown(results)


def test_eval_errors(tmp_path, whisper_base_dir, capsys):
    assert eval_main(["--models", str(whisper_base_dir), "--data", str(tmp_path / "missing")]) == 2
    assert "evaluation data" in capsys.readouterr().err
    # clips without reference text cannot be scored
    (tmp_path / "a.flac").write_bytes(b"")
    with pytest.raises(EvaluationError, match="no clips with reference text"):
        evaluate([str(whisper_base_dir)], tmp_path)


@pytest.mark.slow
def test_eval_model_without_processor_names_the_option(tmp_path, whisper_base_dir, whisper_model, dev_rows):
    folder = tmp_path / "no-processor"
    whisper_model.save_pretrained(str(folder))
    manifest = tmp_path / "m.jsonl"
    row = short_clips(dev_rows)[0]
    manifest.write_text(json.dumps({"audio": row["path"], "text": row["text"]}) + "\n")
    with pytest.raises(EvaluationError, match="--processor"):
        evaluate([str(folder)], manifest, progress=False)
    # and with --processor it works
    results = evaluate([str(folder)], manifest, processor=str(whisper_base_dir), progress=False)
    assert results["models"][0]["wer"] < 50
