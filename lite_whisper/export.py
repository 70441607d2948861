"""Writing a converted LiteWhisper checkpoint folder (weights, configs, processor, model card, report) and pushing it.

The folder is what a user uploads to the Hub, so it must work from itself alone:

* `model.safetensors` + `config.json` (`low_rank_config`, auto_map, custom pipeline) and the two remote-code files,
  written by `LiteWhisperForConditionalGeneration.save_pretrained`;
* `generation_config.json` copied from the base, with `max_length` added when the base lacks it (the published
  turbo checkpoints lacked it, and the ASR pipeline then stopped decoding early: WER ~10 -> 40+);
* the processor files (tokenizer and feature extractor), including `preprocessor_config.json`, which transformers
  4.x needs and 5.x's `WhisperProcessor.save_pretrained` no longer writes;
* `README.md` (model card with Hub metadata and a table of ranks and sizes) and `compression_report.json`.
"""

import json
import platform
import shutil
import time
from pathlib import Path

from .common import DEFAULT_TARGET_SIZE, PROCESSOR_FILES, ConversionError, describe_refinement
from .utils import OUTPUT_MARKER, atomic_output_dir, get_logger

logger = get_logger(__name__)

TAGS = ["lite-whisper", "liteasr", "whisper", "low-rank", "audio", "automatic-speech-recognition"]
DTYPE_NAMES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


# --------------------------------------------------------------------------------------------------------------
# Processor files
# --------------------------------------------------------------------------------------------------------------


def check_processor_files(folder):
    """Fail early when `folder` holds no tokenizer or feature extractor to copy."""
    folder = Path(folder)
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json"))
    has_features = any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))
    if not (has_tokenizer and has_features):
        missing = ", ".join(n for n, ok in (("tokenizer", has_tokenizer), ("feature extractor", has_features)) if not ok)
        raise ConversionError(
            f"{folder} has no {missing} files; the converted folder must carry them so AutoProcessor and the pipeline"
            " work from it alone. Pass the original Whisper model as processor= / --processor"
        )


def copy_processor_files(source, target):
    """Copy the tokenizer and feature-extractor files, then fill in what either transformers major needs."""
    from transformers import WhisperFeatureExtractor

    source, target = Path(source), Path(target)
    copied = []
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    # transformers 4.x reads the feature extractor from preprocessor_config.json only.
    if not (target / "preprocessor_config.json").is_file():
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(source))
        feature_extractor.to_json_file(str(target / "preprocessor_config.json"))
        copied.append("preprocessor_config.json (written)")
    # transformers 4.x's WhisperProcessor loads the slow tokenizer, which needs vocab.json and merges.txt.
    if (target / "tokenizer.json").is_file() and not (target / "vocab.json").is_file():
        try:
            from .whisper_base import write_slow_tokenizer_files

            write_slow_tokenizer_files(target, target / "tokenizer.json")
            copied.append("vocab.json, merges.txt (written)")
        except (ImportError, KeyError, ValueError, OSError) as error:
            logger.warning("could not write vocab.json/merges.txt for transformers 4.x: %s", error)
    return copied


# --------------------------------------------------------------------------------------------------------------
# Generation config
# --------------------------------------------------------------------------------------------------------------


def write_generation_config(base_folder, target, model_config):
    """Copy the base's generation_config.json; add max_length = max_target_positions when it is missing.

    Returns a short note of what was changed (None when the copy is verbatim).
    """
    base_file = Path(base_folder) / "generation_config.json"
    max_length = int(getattr(model_config, "max_target_positions", 448) or 448)
    if base_file.is_file():
        generation = json.loads(base_file.read_text(encoding="utf-8"))
        if generation.get("max_length"):
            shutil.copyfile(base_file, Path(target) / "generation_config.json")
            return None
        generation["max_length"] = max_length
        note = f"max_length={max_length} (max_target_positions) added: the base's generation_config.json has none"
    else:
        # No generation config at all: the saved one (built from the model config) lacks Whisper's language and
        # task tables, so language=/task= will not work. Say so loudly.
        generation = json.loads((Path(target) / "generation_config.json").read_text(encoding="utf-8"))
        generation.setdefault("max_length", max_length)
        note = "the base has no generation_config.json; one was derived from its config (no language/task tables)"
    (Path(target) / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n",
                                                         encoding="utf-8")
    logger.warning("generation config: %s", note)
    return note


# --------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------


def read_card_metadata(folder):
    """The YAML front matter of `folder`/README.md as a dict ({} when absent or unreadable)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml

    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def choose_license(explicit, base_metadata, base_name):
    """The license for the card: explicit > the base card's > MIT for openai/whisper-* > "unknown".

    OpenAI's Whisper weights are MIT (every openai/whisper-* card says so); for any other base without a card we do
    not guess, and the Hub's "unknown" value makes the gap visible.
    """
    if explicit:
        return str(explicit), "given"
    if base_metadata.get("license"):
        return str(base_metadata["license"]), "base model card"
    if base_name and str(base_name).startswith("openai/whisper"):
        return "mit", "OpenAI Whisper (MIT)"
    logger.warning("the base model has no model card license; the card says 'unknown' (pass license= / --license)")
    return "unknown", "not found"


def _rank_cell(layer_row, key):
    entry = layer_row.get(key) or {}
    if entry.get("full_rank") or entry.get("rank") is None:
        return "full"
    explained = entry.get("explained_variance")
    return f"{entry['rank']}" + (f" ({100 * explained:.1f}%)" if explained is not None else "")


def calibration_description(calibration):
    """Where the calibration audio came from, as a phrase: "the calibration set bundled with lite-whisper", ..."""
    kind, source = calibration.get("kind"), calibration.get("source")
    return {
        "bundled": "the calibration set bundled with lite-whisper (English: a LibriVox reading of two Shakespeare"
                   " sonnets by one reader, and two CMU ARCTIC sentences)",
        "folder": f"the audio files in `{Path(str(source)).name}`",
        "manifest": f"the manifest `{Path(str(source)).name}`",
        "file": f"the file `{Path(str(source)).name}`",
        "dataset": f"the Hugging Face dataset `{source}`",
    }.get(kind, f"`{source}`")


def model_card(report, repo_name=None, title=None):
    """README.md text: Hub metadata, what the model is, a table of ranks and sizes, and usage.

    `repo_name` is the Hub id the usage code names (a placeholder when the folder is not pushed yet).
    """
    import yaml

    conversion = report["conversion"]
    base_name = conversion.get("base_model_name")
    metadata = {}
    if base_name:
        metadata["base_model"] = base_name
    metadata["library_name"] = "transformers"
    metadata["pipeline_tag"] = "automatic-speech-recognition"
    metadata["license"] = conversion["license"]
    if conversion.get("language"):
        metadata["language"] = conversion["language"]
    metadata["tags"] = TAGS
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()

    model_id = repo_name or "path/to/this/folder"
    before, after = report["encoder_params_before"], report["encoder_params_after"]
    settings = report.get("settings", {})
    if report.get("target_size") is not None:
        how = f"a target encoder size of {report['target_size']:g} of the original parameters" + (
            " (the lite-whisper default)" if report["target_size"] == DEFAULT_TARGET_SIZE else "")
    else:
        thresholds = report.get("thresholds") or {}
        how = f"explained-variance thresholds {thresholds.get('attention')}:{thresholds.get('mlp')} (attention:MLP)"
    calibration = conversion["calibration"]
    calibration_text = calibration_description(calibration)

    lines = [
        "---", front, "---", "",
        f"# {title or Path(str(model_id)).name}", "",
        f"A LiteWhisper (LiteASR) compression of [{base_name or conversion['base_model']}]"
        + (f"(https://huggingface.co/{base_name})" if base_name else "") + ": every encoder projection"
        " (q, k, v, out, fc1, fc2) is replaced by a low-rank factorisation chosen from the principal components of"
        " its outputs on calibration audio. The decoder is untouched.", "",
        f"- Encoder parameters: {after:,} of {before:,} ({100 * after / before:.1f}% of the original)",
        f"- Ranks chosen with {how}, {report.get('mode', settings.get('mode'))} calibration on"
        f" {calibration['clips']} clips ({calibration['seconds']:.0f} s of audio) from {calibration_text}",
        f"- Label-free refinement: {describe_refinement(report.get('refinement'))}",
        f"- Weights: {conversion['dtype']}; converted with lite-whisper {conversion['versions'].get('lite_whisper')}"
        f" and transformers {conversion['versions'].get('transformers')}", "",
        "What the numbers on this card are: parameter counts of this checkpoint and of the original encoder, and"
        " explained variance measured on the calibration audio above. No accuracy (WER) was measured when it was"
        " converted; measure it on your own audio (e.g. with `lite-whisper-eval`).", "",
        "## Usage", "",
        "Needs `pip install torch transformers soundfile` (the model code comes with the checkpoint, hence"
        " `trust_remote_code=True`). Audio is passed as a numpy array read with soundfile, so no ffmpeg is needed"
        " (passing a file name to the pipeline makes transformers decode it with ffmpeg). Whisper expects 16 kHz mono;"
        " resample other audio first (e.g. `librosa.load(path, sr=16000)`). On CPU the model loads in float32 unless"
        " you pass `dtype`.", "",
        "```python",
        "import soundfile as sf",
        "from transformers import pipeline",
        "",
        f'asr = pipeline("automatic-speech-recognition", model="{model_id}", trust_remote_code=True)',
        'audio, rate = sf.read("audio.flac", dtype="float32")  # 16 kHz',
        "if audio.ndim > 1:",
        "    audio = audio.mean(axis=1)  # to mono",
        'print(asr({"raw": audio, "sampling_rate": rate}, generate_kwargs={"language": "en"})["text"])',
        "```", "",
        "Or with the model classes (with the lite-whisper package installed from its repository, `import lite_whisper`"
        " registers them and `trust_remote_code` is not needed):", "",
        "```python",
        "import soundfile as sf",
        "from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor",
        "",
        f'model = AutoModelForSpeechSeq2Seq.from_pretrained("{model_id}", trust_remote_code=True)',
        f'processor = AutoProcessor.from_pretrained("{model_id}")',
        'audio, rate = sf.read("audio.flac", dtype="float32")  # 16 kHz mono',
        'features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features',
        'ids = model.generate(features.to(model.dtype), language="en")',
        "print(processor.batch_decode(ids, skip_special_tokens=True)[0])",
        "```", "",
        "## Ranks per encoder layer", "",
        "Rank of each projection (and the share of its output variance on the calibration audio that the rank keeps);"
        " `full` = kept full rank.", "",
        "| layer | q_proj | k_proj | v_proj | out_proj | fc1 | fc2 | params | % of original |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    params_by_layer = {row["layer"]: row for row in conversion.get("layer_params", [])}
    for row in report["layers"]:
        cells = [_rank_cell(row, key) for key in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")]
        p = params_by_layer.get(row["layer"], {})
        now, full = p.get("params"), p.get("full_rank_params")
        share = f"{100 * now / full:.1f}%" if now and full else ""
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + f" | {now if now is not None else ''} | {share} |")
    lines += [
        "", "Sizes:", "",
        "| | parameters |", "|---|---:|",
        f"| encoder, original | {before:,} |",
        f"| encoder, compressed | {after:,} |",
        f"| whole model, compressed | {conversion['model_params']:,} |",
        f"| model.safetensors | {conversion['file_bytes'] / 1e6:.1f} MB ({conversion['dtype']}) |",
        "",
        "`compression_report.json` beside the weights holds the full report (per-projection ranks and explained"
        " variance, settings, calibration source, library versions, timings).", "",
        "## Method", "",
        "LiteASR: Kamahori et al., *LiteASR: Efficient Automatic Speech Recognition with Low-Rank Approximation*"
        " (EMNLP 2025). Converted with the `lite-whisper-convert` command of the lite-whisper package.", "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------------------


def _versions():
    import huggingface_hub
    import numpy
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {
        "lite_whisper": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def verify_folder(folder):
    """Cheap structural checks of a written folder: config ranks match the tensors; the processor loads."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from .configuration_lite_whisper import LiteWhisperConfig

    folder = Path(folder)
    config = LiteWhisperConfig.from_pretrained(str(folder))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        for i, ranks in enumerate(config.low_rank_config or []):
            for key, rank in ranks.items():
                parent = "self_attn." if key.endswith("_proj") else ""
                name = f"model.encoder.layers.{i}.{parent}{key}.weight1"
                if name not in keys or handle.get_slice(name).get_shape()[1] != rank:
                    raise RuntimeError(f"written checkpoint: {name} does not match low_rank_config rank {rank}")
    WhisperFeatureExtractor.from_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(folder))


def write_checkpoint(result, output_dir, base_folder, processor_folder, info, overwrite=False):
    """Write `result` (a compress() CompressionResult) as a complete checkpoint folder, atomically."""
    import torch

    from .modeling_lite_whisper import encoder_parameter_report

    dtype = getattr(torch, info["dtype"])
    base_metadata = read_card_metadata(base_folder)
    license_name, license_source = choose_license(info.get("license"), base_metadata, info.get("base_model_name"))
    clock = time.perf_counter()
    # Absolute before anything is written (a relative path must not depend on the folder state afterwards).
    output_dir = Path(output_dir).expanduser().absolute()
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        model = result.model.to(dtype=dtype)
        model.save_pretrained(str(tmp), safe_serialization=True)
        generation_note = write_generation_config(base_folder, tmp, model.config)
        processor_files = copy_processor_files(processor_folder, tmp)

        params = encoder_parameter_report(model)
        report = dict(result.report)
        calibration = dict(info["calibration"])
        calibration["source_name"] = calibration_description(calibration)
        timings = dict(info["timings_s"])
        timings["write_s"] = time.perf_counter() - clock
        timings["total_s"] = time.perf_counter() - info["started"]
        report["conversion"] = {
            "base_model": info["base_model"],
            "base_model_name": info.get("base_model_name"),
            "license": license_name,
            "license_source": license_source,
            "language": base_metadata.get("language"),
            "dtype": info["dtype"],
            "calibration": calibration,
            "generation_config": generation_note or "copied from the base",
            "processor_files": processor_files,
            "processor_source": info.get("processor_folder"),
            "model_params": sum(p.numel() for p in model.parameters()),
            "file_bytes": (tmp / "model.safetensors").stat().st_size,
            "layer_params": [{k: row[k] for k in ("layer", "params", "full_rank_params")} for row in params["layers"]],
            "versions": _versions(),
            "timings_s": {k: round(float(v), 3) for k, v in timings.items()},
        }
        (tmp / "compression_report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n",
                                                      encoding="utf-8")
        (tmp / "README.md").write_text(model_card(report, title=Path(output_dir).name), encoding="utf-8")
        verify_folder(tmp)
        _make_readable(tmp)
    return output_dir


def _make_readable(folder):
    """The temporary folder (and files some writers create) are private (0700/0600); a checkpoint folder is not."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in Path(folder).iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
    except ImportError:
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Hub push
# --------------------------------------------------------------------------------------------------------------


def push_folder(folder, repo_id, private=False, revision=None, token=None, commit_message=None):
    """Create `repo_id` (if needed) and upload `folder` to it (on branch `revision`, created if needed).

    The endpoint and token come from the usual places (HF_ENDPOINT, HF_TOKEN, the login cache). The model card's
    usage code names `repo_id`, so README.md is rewritten for it before the upload.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    report_file = folder / "compression_report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text(encoding="utf-8"))
        if "conversion" in report:
            (folder / "README.md").write_text(model_card(report, repo_name=repo_id, title=repo_id.split("/")[-1]),
                                              encoding="utf-8")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload LiteWhisper checkpoint (lite-whisper-convert)",
        ignore_patterns=[OUTPUT_MARKER],  # our local bookkeeping (which files --overwrite may replace)
    )
    url = getattr(commit, "commit_url", None) or str(repo)
    return url


__all__ = [
    "check_processor_files",
    "choose_license",
    "copy_processor_files",
    "model_card",
    "push_folder",
    "read_card_metadata",
    "verify_folder",
    "write_checkpoint",
    "write_generation_config",
]
