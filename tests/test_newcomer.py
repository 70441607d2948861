"""What a new user trips on first (issue 10): missing local paths, undecodable audio, truncated weights, dtype on
CPU, truthful messages (Ctrl-C, where results went), no deprecation noise from our own calls, the MLX BLAS hint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lite_whisper.cli import convert_main, eval_main
from lite_whisper.convert import ConversionError, convert

from conftest import short_clips

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lite_folder(tmp_path_factory, whisper_model, whisper_base_dir):
    """A LiteWhisper checkpoint saved in float16 (as lite-whisper-convert saves them), with processor files: the
    q/fc1 projections of two layers at rank 64 (best factors by SVD; quality is not what these tests check)."""
    from lite_whisper import build_lite_whisper
    from lite_whisper.export import copy_processor_files
    from lite_whisper.factorize import dense_weight, factors_from_svd
    from lite_whisper.modeling_lite_whisper import encoder_projection

    factors = {}
    for layer in (0, 1):
        for key in ("q_proj", "fc1"):
            weight, bias = dense_weight(encoder_projection(whisper_model.model.encoder.layers[layer], key))
            factors[(layer, key)] = factors_from_svd(weight, bias, 64)
    folder = tmp_path_factory.mktemp("newcomer") / "lite-fp16"
    lite = build_lite_whisper(whisper_model, factors).to(torch.float16)
    lite.save_pretrained(str(folder))
    copy_processor_files(whisper_base_dir, folder)
    return folder


def _truncated_copy(folder, target):
    shutil.copytree(folder, target)
    weights = Path(target) / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return Path(target)


# --- 3: a local path that does not exist ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["./whisper-bsae", "/abs/missing/whisper-base", "~/no-such-whisper"])
def test_missing_local_base_model_is_named(tmp_path, path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match=f"model folder {path} does not exist") as info:
        convert(path, tmp_path / "out", progress=False)
    assert "Repo id" not in str(info.value)
    assert convert_main(["--base-model", path, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_missing_local_model_in_eval(tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    _write_clip(tmp_path / "a.wav")
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "a"}) + "\n")
    assert eval_main(["--model", "./whisper-bsae", "--data", str(manifest), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model folder ./whisper-bsae does not exist" in err and "Repo id" not in err


# --- 4: undecodable audio, truncated weights --------------------------------------------------------------------


def _write_clip(path, seconds=1.0):
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)


def test_decode_error_has_a_reason_and_no_warning_spam(tmp_path, recwarn):
    from lite_whisper.audio import AudioError, load_audio

    fake = tmp_path / "fake.wav"
    fake.write_text("this is not audio")
    with pytest.raises(AudioError) as info:
        load_audio(fake)
    message = str(info.value)
    assert message.startswith(f"cannot decode {fake}: not a readable audio file (soundfile: ")
    assert "audioread: " in message and not message.rstrip().endswith(":")
    assert "\n" not in message
    assert not [w for w in recwarn if "audioread" in str(w.message) or "PySoundFile" in str(w.message)]


@pytest.mark.slow
def test_eval_reports_every_bad_file_and_scores_the_rest(tmp_path, whisper_base_dir, dev_rows, capfd):
    row = [r for r in short_clips(dev_rows) if r["condition"] == "real"][0]
    (tmp_path / "fake.wav").write_text("not audio")
    (tmp_path / "empty.flac").write_bytes(b"")
    lines = [{"id": "fake", "audio": "fake.wav", "text": "x"}, {"id": row["id"], "audio": row["path"], "text": row["text"]},
             {"id": "empty", "audio": "empty.flac", "text": "y"}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out_json, out_md = tmp_path / "res" / "results.json", tmp_path / "res" / "results.md"
    code = eval_main(["--model", str(whisper_base_dir), "--data", str(tmp_path / "manifest.jsonl"), "--no-progress",
                      "--json", str(out_json), "--markdown", str(out_md)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    for name in ("fake.wav", "empty.flac"):
        assert f"skipping {tmp_path / name}: cannot decode" in captured.err or f"skipping {tmp_path / name}:" in captured.err
    results = json.loads(out_json.read_text())
    assert results["clips"] == 1 and [s["id"] for s in results["skipped"]] == ["fake", "empty"]
    assert all(s["reason"] for s in results["skipped"])
    assert "2 undecodable file(s) not scored: fake.wav, empty.flac" in out_md.read_text()
    # 6: it says where the results went, and our generate calls raise no deprecation warning of transformers'
    assert f"wrote {out_json}" in captured.out and f"wrote {out_md}" in captured.out
    assert "together with generation-related arguments" not in captured.err


def test_all_files_undecodable_names_them(tmp_path, whisper_base_dir, capsys):
    for name in ("a.wav", "b.wav"):
        (tmp_path / name).write_text("not audio")
    lines = [{"audio": n, "text": "x"} for n in ("a.wav", "b.wav")]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert eval_main(["--model", str(whisper_base_dir), "--data", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: none of the 2 clips") and "a.wav" in err and "b.wav" in err


def test_truncated_safetensors_is_named(lite_folder, whisper_base_dir, tmp_path):
    from transformers import AutoModelForSpeechSeq2Seq

    from lite_whisper.evaluate import EvaluationError, load_model

    broken = _truncated_copy(lite_folder, tmp_path / "broken-lite")
    with pytest.raises(OSError) as info:
        AutoModelForSpeechSeq2Seq.from_pretrained(broken)
    message = str(info.value)
    assert f"{broken / 'model.safetensors'} is incomplete or corrupt" in message and "download it again" in message
    plain = _truncated_copy(whisper_base_dir, tmp_path / "broken-plain")
    with pytest.raises(EvaluationError, match=r"model.safetensors is incomplete or corrupt .*download it again"):
        load_model(plain)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("mlx_whisper"), reason="needs the mlx extra")
def test_mlx_truncated_safetensors_is_one_line(lite_folder, tmp_path):
    broken = _truncated_copy(lite_folder, tmp_path / "broken")
    _write_clip(tmp_path / "a.wav")
    code = "import sys, lite_whisper_cli; sys.exit(lite_whisper_cli.mlx_main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=str(REPO), LITE_WHISPER_MLX_BLAS="off")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.wav"), "--model", str(broken)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{broken / 'model.safetensors'} is incomplete or corrupt" in proc.stderr


# --- 5: float32 on CPU unless asked ------------------------------------------------------------------------------


def test_checkpoints_load_in_float32_on_cpu(lite_folder):
    from transformers import AutoModel, AutoModelForSpeechSeq2Seq, pipeline

    with open(lite_folder / "config.json") as handle:
        assert json.load(handle).get("torch_dtype", json.load(open(lite_folder / "config.json")).get("dtype")) == "float16"
    assert AutoModel.from_pretrained(lite_folder).dtype == torch.float32
    assert AutoModelForSpeechSeq2Seq.from_pretrained(lite_folder, device_map="cpu").dtype == torch.float32
    assert pipeline("automatic-speech-recognition", model=str(lite_folder)).model.dtype == torch.float32
    # asked for: honoured
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    assert AutoModel.from_pretrained(lite_folder, **{key: torch.float16}).dtype == torch.float16
    assert AutoModel.from_pretrained(lite_folder, **{key: torch.bfloat16}).dtype == torch.bfloat16


# --- 6: the Ctrl-C message is true ---------------------------------------------------------------------------------


def test_interrupt_message_says_what_was_written(tmp_path, capsys):
    import argparse

    from lite_whisper.cli import _run

    def written_then_interrupted(args):
        args.written.append(str(tmp_path / "demo"))
        raise KeyboardInterrupt

    def interrupted(args):
        raise KeyboardInterrupt

    assert _run(written_then_interrupted, argparse.Namespace(verbose=False)) == 130
    err = capsys.readouterr().err
    assert f"{tmp_path / 'demo'} had been written completely" in err and "nothing was written" not in err
    assert _run(interrupted, argparse.Namespace(verbose=False)) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    # interrupted after the folder was swapped in (e.g. while pushing it to the Hub): it says so
    from lite_whisper.utils import atomic_output_dir

    def pushed_then_interrupted(args):
        with atomic_output_dir(args.output_dir) as tmp:
            (tmp / "model.safetensors").write_text("weights")
        raise KeyboardInterrupt

    assert _run(pushed_then_interrupted, argparse.Namespace(verbose=False, output_dir=str(tmp_path / "out"))) == 130
    assert f"{tmp_path / 'out'} had been written completely" in capsys.readouterr().err


# --- 10: MLX without OpenBLAS says so once, without -v -------------------------------------------------------------


def test_mlx_slow_blas_warning_once_without_verbose():
    code = ("import logging; from lite_whisper.mlx_port import backend; backend._find_openblas = lambda: None;"
            " backend.preload_blas(); backend.preload_blas()")
    env = {k: v for k, v in os.environ.items() if k != "LITE_WHISPER_MLX_BLAS"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if not sys.platform.startswith("linux"):
        return
    assert proc.stderr.count("slow reference BLAS") == 1, proc.stderr
    assert "apt-get install libopenblas0-pthread" in proc.stderr
