"""MLX port: parity with the PyTorch model on the real whisper-base (plain and compressed), shapes, errors, CLI.

The parity tests run both frameworks on the CPU. On Linux, MLX's matrix products go through OpenBLAS when the
system has it (see lite_whisper/mlx_port/backend.py; Debian: libopenblas0-pthread); without it they still pass,
only several times slower.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HAVE_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_whisper") is not None
needs_mlx = pytest.mark.skipif(not HAVE_MLX, reason='mlx / mlx-whisper not importable (pip install "lite-whisper[mlx]")')

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "dev"
N_CLIPS = 20
PROMPT = [50258, 50259, 50359, 50363]  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>


def _compression_factors(model):
    """A mixed truncated factorisation: q/k rank 128 in every layer, fc1 rank 256 in layers 0-3, the rest full rank.

    Mixed on purpose (low-rank and full-rank projections side by side, layers 4-5 partly full), and mild enough that
    transcripts stay sensible: harsher truncations of whisper-base loop until the length limit.
    """
    from lite_whisper.factorize import exact_factors

    r128 = exact_factors(model, rank=128)
    r256 = exact_factors(model, rank=256)
    factors = {key: value for key, value in r128.items() if key[1] in ("q_proj", "k_proj")}
    factors.update({key: value for key, value in r256.items() if key[1] == "fc1" and key[0] < 4})
    return factors


# --- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_path():
    from lite_whisper.whisper_base import whisper_base_path

    return whisper_base_path()


@pytest.fixture(scope="module")
def clips():
    """The N_CLIPS shortest dev clips (the encoder always sees 30 s; short clips keep decoding short)."""
    from lite_whisper.audio import list_audio, load_audio

    rows = sorted((r for r in list_audio(DEV) if not r.get("long_form")), key=lambda r: (r["duration_s"], r["id"]))
    return [(row["audio"], load_audio(row["audio"])) for row in rows[:N_CLIPS]]


@pytest.fixture(scope="module")
def torch_models(base_path):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from lite_whisper.factorize import build_lite_whisper

    torch.manual_seed(0)
    processor = WhisperProcessor.from_pretrained(base_path)
    plain = WhisperForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32).eval()
    compressed = build_lite_whisper(plain, _compression_factors(plain)).eval()
    return {"processor": processor, "plain": plain, "compressed": compressed}


@pytest.fixture(scope="module")
def compressed_folder(torch_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lite-whisper-base")
    torch_models["compressed"].save_pretrained(folder)
    torch_models["processor"].save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mlx_models(base_path, compressed_folder):
    from lite_whisper.mlx_port import load_model

    return {"plain": load_model(base_path, dtype="float32"), "compressed": load_model(compressed_folder, dtype="float32")}


def _features(torch_models, waveforms):
    return torch_models["processor"].feature_extractor(waveforms, sampling_rate=16000, return_tensors="pt").input_features


# --- parity ----------------------------------------------------------------------------------------------------------


@needs_mlx
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "compressed"])
def test_encoder_and_decoder_logits_match_pytorch(variant, torch_models, mlx_models, clips):
    import mlx.core as mx
    import torch

    hf, mlx_model = torch_models[variant], mlx_models[variant]
    features = _features(torch_models, [clips[0][1], clips[-1][1]])  # (2, 80, 3000), the same input for both
    with torch.no_grad():
        hf_encoded = hf.model.encoder(features).last_hidden_state.numpy()
    mlx_encoded = mlx_model.encoder(mx.array(features.numpy().transpose(0, 2, 1)))
    mx.eval(mlx_encoded)
    relative = np.linalg.norm(np.array(mlx_encoded) - hf_encoded) / np.linalg.norm(hf_encoded)
    assert relative < 1e-4, f"{variant}: encoder relative error {relative:.2e}"

    # Same prefix (prompt plus real text tokens) through each framework's own decoder on its own encoder output.
    prefix = PROMPT + [634, 727, 1699, 572, 2854, 13]  # " He could wait no longer."
    tokens = np.array([prefix, prefix])
    with torch.no_grad():
        hf_logits = hf(input_features=features, decoder_input_ids=torch.tensor(tokens)).logits.numpy()
    mlx_logits = np.array(mlx_model.logits(mx.array(tokens), mlx_encoded))
    difference = np.abs(mlx_logits - hf_logits).max()
    assert difference < 1e-3, f"{variant}: decoder logits differ by up to {difference:.2e}"


@needs_mlx
@pytest.mark.slow
def test_log_mel_front_end_matches_feature_extractor(torch_models, mlx_models, clips):
    from lite_whisper.mlx_port import log_mel

    for _, waveform in clips[:3]:
        hf = _features(torch_models, [waveform])[0].numpy().T
        ours = np.array(log_mel(mlx_models["plain"], waveform))
        assert ours.shape == hf.shape
        assert np.abs(ours - hf).max() < 2e-3


@needs_mlx
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "compressed"])
def test_greedy_transcripts_match_pytorch(variant, torch_models, mlx_models, clips):
    import torch

    from lite_whisper.mlx_port import greedy_decode

    hf, processor = torch_models[variant], torch_models["processor"]
    waveforms = [waveform for _, waveform in clips]
    expected_tokens, expected_texts = [], []
    for start in range(0, len(waveforms), 10):
        batch = waveforms[start : start + 10]
        with torch.no_grad():
            generated = hf.generate(_features(torch_models, batch), language="en", task="transcribe", max_new_tokens=224)
        for row in generated.tolist():
            body = row[row.index(PROMPT[-1]) + 1 :] if PROMPT[-1] in row else row
            body = body[: body.index(50257)] if 50257 in body else body
            expected_tokens.append(body)
        expected_texts.extend(t.strip() for t in processor.batch_decode(generated, skip_special_tokens=True))

    results = greedy_decode(mlx_models[variant], waveforms, language="en", batch_size=10)
    mismatches = [
        (Path(path).name, want, got.text)
        for (path, _), want, want_tokens, got in zip(clips, expected_texts, expected_tokens, results)
        if got.text != want or list(got.tokens) != want_tokens
    ]
    assert len(results) == N_CLIPS >= 20
    assert not mismatches, f"{variant}: {len(mismatches)} of {N_CLIPS} transcripts differ: {mismatches[:5]}"
    assert sum(bool(text) for text in expected_texts) >= N_CLIPS - 2  # real transcripts, not empty strings


# --- structure: the factors are never multiplied out ----------------------------------------------------------------


@needs_mlx
@pytest.mark.slow
def test_low_rank_projections_keep_factor_shapes(torch_models, mlx_models):
    from lite_whisper.mlx_port import LowRankLinear, encoder_projection
    from lite_whisper.modeling_lite_whisper import encoder_parameter_report
    from mlx.utils import tree_flatten

    model = mlx_models["compressed"]
    config = torch_models["compressed"].config
    low_rank = 0
    for layer, ranks in enumerate(config.low_rank_config):
        for key in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
            module = encoder_projection(model, layer, key)
            out_features = config.encoder_ffn_dim if key == "fc1" else config.d_model
            in_features = config.encoder_ffn_dim if key == "fc2" else config.d_model
            if key in ranks:
                low_rank += 1
                rank = ranks[key]
                assert isinstance(module, LowRankLinear)
                shapes = {name: tuple(value.shape) for name, value in tree_flatten(module.parameters())}
                assert shapes == {"weight1": (in_features, rank), "weight2": (rank, out_features), "bias": (out_features,)}
            else:
                assert not isinstance(module, LowRankLinear)
                assert tuple(module.weight.shape) == (out_features, in_features)
    assert low_rank == 6 * 2 + 4
    # Same parameter count as the PyTorch LiteWhisper encoder and the compression report (the position table,
    # a constant in MLX, counted in both): a materialised W1.W2 anywhere would add in*out parameters.
    report = encoder_parameter_report(torch_models["compressed"])
    assert model.encoder_parameter_count() == report["encoder_params"]
    assert model.encoder_parameter_count() < mlx_models["plain"].encoder_parameter_count()


# --- CLI -------------------------------------------------------------------------------------------------------------


@needs_mlx
@pytest.mark.slow
def test_cli_prints_one_json_line_per_file_in_order(compressed_folder, mlx_models, clips, capsys):
    from lite_whisper.mlx_port import greedy_decode
    from lite_whisper.mlx_port.cli import main

    files = [clips[5][0], clips[2][0]]
    assert main([*files, "--model", str(compressed_folder), "--language", "en", "--json", "--greedy"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["file"] for row in rows] == files
    expected = greedy_decode(mlx_models["compressed"], files, language="en")
    assert [row["text"] for row in rows] == [result.text for result in expected]

    # Default mode: mlx-whisper's transcribe (timestamp tokens, temperature fallback), plain text lines. Its text
    # may differ from the greedy one: sampling timestamps changes the search.
    assert main([*files, "--model", str(compressed_folder), "--language", "en", "--temperature", "0"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 3 and lines[2] == "" and all(line.strip() for line in lines[:2])


@needs_mlx
@pytest.mark.slow
def test_transcribe_returns_timestamped_segments(mlx_models, clips):
    from lite_whisper.mlx_port import transcribe

    path, waveform = clips[-1]
    result = transcribe(mlx_models["plain"], path, language="en", temperature=0.0)
    assert result["language"] == "en" and result["text"].strip()
    segment = result["segments"][0]
    assert 0.0 <= segment["start"] < segment["end"] <= len(waveform) / 16000 + 0.5


# --- errors ----------------------------------------------------------------------------------------------------------


def _folder_like(source, target, config_edit=None, weights=True):
    """A model folder beside `source`, sharing its weights by symlink, with an edited config.json."""
    target.mkdir()
    config = json.loads((Path(source) / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (target / "config.json").write_text(json.dumps(config))
    if weights:
        os.symlink(Path(source) / "model.safetensors", target / "model.safetensors")
    return target


@needs_mlx
def test_error_folder_without_weights(base_path, tmp_path):
    from lite_whisper.mlx_port import load_model

    folder = _folder_like(base_path, tmp_path / "no-weights", weights=False)
    with pytest.raises(FileNotFoundError, match="no model weights: expected model.safetensors"):
        load_model(folder)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(tmp_path / "missing")


@needs_mlx
def test_error_unknown_model_type(base_path, tmp_path):
    from lite_whisper.mlx_port import load_model

    folder = _folder_like(base_path, tmp_path / "bert", lambda c: c.update(model_type="bert"))
    with pytest.raises(ValueError, match="unknown model_type 'bert'"):
        load_model(folder)


@needs_mlx
@pytest.mark.slow
def test_error_low_rank_config_not_matching_tensors(compressed_folder, tmp_path):
    from lite_whisper.mlx_port import load_model

    def wrong_rank(config):
        config["low_rank_config"][2]["q_proj"] = 64

    folder = _folder_like(compressed_folder, tmp_path / "wrong-rank", wrong_rank)
    with pytest.raises(ValueError, match=r"encoder layer 2: q_proj: low_rank_config says low-rank \(rank 64\)"):
        load_model(folder)

    def forgotten(config):
        del config["low_rank_config"][1]["fc1"]

    folder = _folder_like(compressed_folder, tmp_path / "forgotten", forgotten)
    with pytest.raises(ValueError, match="encoder layer 1: fc1: low_rank_config says full-rank"):
        load_model(folder)

    def plain_whisper_config(config):
        config["model_type"] = "whisper"  # low_rank_config ignored, so every factorised layer mismatches

    folder = _folder_like(compressed_folder, tmp_path / "as-whisper", plain_whisper_config)
    with pytest.raises(ValueError, match="encoder layer 0, encoder layer 1"):
        load_model(folder)


@needs_mlx
def test_error_hub_unreachable_names_the_repo(monkeypatch):
    from lite_whisper.mlx_port.modeling import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="no-such-org/no-such-model: not a local folder"):
        resolve_model_path("no-such-org/no-such-model")


@needs_mlx
def test_error_custom_vocabulary_is_refused(base_path, tmp_path):
    from lite_whisper.mlx_port.tokenizer import check_vocabulary, read_vocabulary

    class Dims:  # check_vocabulary needs only the dimensions and the two properties mlx-whisper derives from them
        n_vocab = 51865

    class Model:
        dims = Dims()
        is_multilingual = True
        num_languages = 99

    vocabulary = read_vocabulary(base_path)
    check_vocabulary(Model(), vocabulary, base_path)  # the real whisper-base vocabulary passes
    vocabulary["Ġhello"] = 5
    with pytest.raises(ValueError, match="differs from the Whisper vocabulary"):
        check_vocabulary(Model(), vocabulary, "custom")


def test_missing_mlx_names_the_extra():
    # A fresh interpreter in which `import mlx` fails, whether or not MLX is installed here.
    code = (
        "import sys\n"
        "sys.modules['mlx'] = None\n"
        "sys.modules['mlx.core'] = None\n"
        "import lite_whisper.mlx_port as port\n"
        "try:\n"
        "    port.load_model('anything')\n"
        "except ImportError as error:\n"
        "    print('ERROR', error)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    repo = Path(__file__).resolve().parents[1]
    hint = f'the MLX port needs the "mlx" extra (MLX, and mlx[cpu] on Linux): python -m pip install -e "{repo}[mlx]"'
    assert f"ERROR {hint}" in output.stdout, output.stderr

    cli = subprocess.run(
        [sys.executable, "-c", code.split("import lite_whisper")[0] + "from lite_whisper.mlx_port.cli import main\n"
         "sys.exit(main(['x.flac', '--model', 'm']))"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 2 and hint in cli.stderr
