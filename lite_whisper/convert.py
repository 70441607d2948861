"""`lite_whisper.convert`: a Whisper checkpoint in, a complete LiteWhisper checkpoint folder out.

Everything that can be checked cheaply (thresholds, target size, dtype, output folder, the base model's type, the
calibration audio, a token for the push) is checked before the model is loaded, so a mistake costs seconds and
leaves nothing on disk. The folder is written atomically (`atomic_output_dir`): Ctrl-C or a failure leaves no
partial output. The compression itself is `lite_whisper.compress.compress`; this module is the plumbing around it.
"""

import json
import random
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, AudioError, list_audio, load_audio
from .common import PROCESSOR_FILES, ConversionError  # noqa: F401 (re-exported: lite_whisper.convert.ConversionError)
from .common import DEFAULT_RANK_THRESHOLD, DEFAULT_TARGET_SIZE
from .utils import check_output_dir, get_logger

logger = get_logger(__name__)

DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "float32": "float32", "fp32": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
DATASETS_HINT = 'pip install "lite-whisper[datasets]"'
# What `snapshot_download` fetches for a Hub base model: config, weights, generation config, processor, card.
BASE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "README.md"]
# Below this much calibration audio the converter warns (the statistics and the refinement then fit a few voices).
SMALL_CALIBRATION_S = 180.0


# --------------------------------------------------------------------------------------------------------------
# Option parsing and validation (cheap, before any heavy work)
# --------------------------------------------------------------------------------------------------------------


def parse_rank_threshold(value):
    """'A:M' -> (A, M); a single value applies to both. Each must be in (0, 1]; every bad half is reported."""
    if isinstance(value, (tuple, list)):
        parts = list(value)
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = [p.strip() for p in str(value).split(":")]
    single = len(parts) == 1
    if single:
        parts = parts * 2
    if len(parts) != 2:
        raise ConversionError(f"rank threshold must be 'ATTENTION:MLP' or one value, got {value!r}")
    numbers, problems = [], []
    for part, what in zip(parts, ("attention", "MLP")):
        what = "the" if single else what
        try:
            number = float(part)
        except (TypeError, ValueError):
            problems.append(f"{what} rank threshold {part!r} is not a number")
            continue
        if not 0.0 < number <= 1.0:
            problems.append(f"{what} rank threshold must be in (0, 1], got {number:g}")
        numbers.append(number)
    if problems:
        raise ConversionError(problems[0].replace("the ", "", 1) if single else "; ".join(problems) + f" (in {value!r})")
    return tuple(numbers)


def parse_target_size(value):
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConversionError(f"target encoder size must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < number <= 1.0:
        raise ConversionError(
            f"target encoder size is a fraction of the original encoder's parameters and must be in (0, 1], got {number:g}"
        )
    return number


def parse_dtype(value):
    name = DTYPES.get(str(value).lower().replace("torch.", ""))
    if name is None:
        raise ConversionError(f"dtype must be one of float16, bfloat16, float32 (fp16, bf16, fp32), got {value!r}")
    return name


def resolve_base_model(base_model, revision=None):
    """A local folder as is; otherwise a Hub id fetched (config, weights, processor, card) into the HF cache."""
    from .utils import missing_local_path

    path = Path(str(base_model)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConversionError(f"model folder {path} has no config.json")
        return path
    if path.exists():
        raise ConversionError(f"{base_model} is a file; give a model folder or a Hub id")
    missing = missing_local_path(base_model)
    if missing:
        raise ConversionError(missing)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(base_model), revision=revision, allow_patterns=BASE_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated, ...
        raise ConversionError(
            f"{base_model!r} is not a local folder and cannot be fetched from the Hub: {' '.join(str(error).split())}"
        ) from error


def check_base_config(folder):
    """The base's config, refused unless it is a plain Whisper model."""
    config_path = Path(folder) / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"cannot read {config_path}: {error}") from error
    model_type = raw.get("model_type")
    if model_type == "lite-whisper":
        raise ConversionError(
            f"{folder} is already a LiteWhisper checkpoint (model_type 'lite-whisper'); convert the original Whisper model"
        )
    if model_type != "whisper":
        raise ConversionError(
            f"base model must be a Whisper model (model_type 'whisper'), but {folder} has model_type {model_type!r}"
        )
    return raw


def check_push_target(repo_id):
    """Validate the repo id and that a token is available, before the conversion runs."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConversionError(f"invalid Hub repo id {repo_id!r}: {error}") from error
    if get_token() is None:
        raise ConversionError(
            "pushing to the Hub needs a token: run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
        )


# --------------------------------------------------------------------------------------------------------------
# Calibration audio
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CalibrationAudio:
    audio: list
    source: str
    kind: str  # "bundled", "folder", "manifest", "file", "dataset"
    ids: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # [{"id"/"path", "reason"}]
    available: int = 0

    @property
    def seconds(self):
        return float(sum(len(a) for a in self.audio)) / SAMPLE_RATE

    def summary(self):
        return {
            "source": self.source,
            "kind": self.kind,
            "clips": len(self.audio),
            "available": self.available,
            "seconds": round(self.seconds, 2),
            "ids": self.ids,
            "skipped": self.skipped,
        }


def bundled_calibration_dir():
    return Path(str(resources.files("lite_whisper") / "data" / "calibration"))


def bundled_clips_dir():
    return Path(str(resources.files("lite_whisper") / "data" / "clips"))


def _dataset_spec(source):
    """'name[:config]:split:column' -> (name, config, split, column), or None when it is not such a spec."""
    parts = str(source).split(":")
    if len(parts) == 3:
        return parts[0], None, parts[1], parts[2]
    if len(parts) == 4:
        return parts[0], parts[1], parts[2], parts[3]
    return None


def load_calibration_audio(calibration=None, num_samples=100, seed=0):
    """Decode up to `num_samples` usable clips (16 kHz mono float32).

    `calibration` is None (the bundled set), a folder of audio (or one holding manifest.jsonl), a manifest.jsonl,
    an audio file, or a Hugging Face dataset `name[:config]:split:column` (needs the `datasets` extra).
    Unreadable or empty files are skipped with a warning and counted; no usable audio is an error.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConversionError(f"number of calibration samples must be a positive integer, got {num_samples!r}")
    if calibration is None:
        source, kind = bundled_calibration_dir(), "bundled"
    else:
        source = Path(str(calibration)).expanduser()
        kind = None
        if not source.exists():
            spec = _dataset_spec(calibration)
            if spec is None:
                raise ConversionError(
                    f"calibration source {calibration!r} not found: give a folder of audio, a manifest.jsonl, an audio"
                    " file or a Hugging Face dataset as name[:config]:split:column"
                )
            return _load_dataset_audio(str(calibration), spec, num_samples, seed)
    try:
        rows = list_audio(source)
    except (FileNotFoundError, ValueError) as error:
        raise ConversionError(f"calibration source {source}: {error}") from error
    if kind is None:
        kind = "manifest" if source.suffix == ".jsonl" or (source / "manifest.jsonl").is_file() else (
            "folder" if source.is_dir() else "file")
    if not rows:
        raise ConversionError(f"no audio files found in calibration source {source}")

    result = CalibrationAudio(audio=[], source=str(source), kind=kind, available=len(rows))
    # Shuffle with a fixed seed so a large folder contributes a spread of files rather than its first few, then
    # keep decoding until num_samples usable clips are found (skipped files do not reduce the count).
    order = list(range(len(rows)))
    if len(rows) > num_samples:
        random.Random(seed).shuffle(order)
    for index in order:
        if len(result.audio) >= num_samples:
            break
        row = rows[index]
        try:
            audio = load_audio(row["audio"])
            if not np.isfinite(audio).all():
                raise AudioError(f"{row['audio']} holds non-finite samples")
            if not np.any(audio):
                raise AudioError(f"{row['audio']} is all silence")
        except (AudioError, OSError, RuntimeError, ValueError) as error:
            logger.warning("calibration: skipping %s (%s)", row["audio"], error)
            result.skipped.append({"audio": str(row["audio"]), "reason": str(error)})
            continue
        result.audio.append(audio)
        result.ids.append(row.get("id", Path(row["audio"]).stem))
    if result.skipped:
        logger.warning("calibration: skipped %d unreadable or empty file(s)", len(result.skipped))
    if not result.audio:
        raise ConversionError(
            f"no usable calibration audio in {source}: {len(result.skipped)} file(s) were unreadable or empty"
        )
    logger.info("calibration: %d clip(s), %.1f s of audio from %s", len(result.audio), result.seconds, source)
    return result


def warn_if_little_audio(calibration_audio, num_samples, minimum_s=SMALL_CALIBRATION_S):
    """Warn when the calibration audio is short: the statistics and the refinement then fit a few voices."""
    if calibration_audio.seconds >= minimum_s:
        return False
    more = (f"pass --calibration with more audio of your domain (a folder, manifest or dataset; at least"
            f" {minimum_s / 60:.0f} minutes, ideally 10+)")
    if calibration_audio.available > len(calibration_audio.audio) + len(calibration_audio.skipped):
        more += f" or raise --num-calibration-samples (now {num_samples}; {calibration_audio.available} clips available)"
    logger.warning("calibration: only %d clip(s), %.0f s of audio were used (%s); compression quality on other"
                   " speech may suffer: %s", len(calibration_audio.audio), calibration_audio.seconds,
                   calibration_audio.source, more)
    return True


def _decode_dataset_value(value):
    """One value of a dataset's audio column (decode=False dict, decoded dict, or path) -> 16 kHz mono float32."""
    import io

    if isinstance(value, dict):
        if value.get("array") is not None:
            data = np.asarray(value["array"], dtype=np.float32)
            if data.ndim > 1:
                data = data.mean(axis=0 if data.shape[0] < data.shape[-1] else 1)
            rate = int(value.get("sampling_rate") or SAMPLE_RATE)
            if rate != SAMPLE_RATE:
                import librosa

                data = librosa.resample(data, orig_sr=rate, target_sr=SAMPLE_RATE)
            if data.size == 0:
                raise AudioError("no samples")
            return np.ascontiguousarray(data, dtype=np.float32)
        if value.get("bytes"):
            import soundfile as sf

            try:
                data, rate = sf.read(io.BytesIO(value["bytes"]), dtype="float32", always_2d=True)
            except Exception as error:
                raise AudioError(f"cannot decode audio bytes: {error}") from error
            return _decode_dataset_value({"array": data.mean(axis=1), "sampling_rate": rate})
        if value.get("path"):
            return load_audio(value["path"])
        raise AudioError("audio value has neither array, bytes nor path")
    if isinstance(value, str):
        return load_audio(value)
    raise AudioError(f"unsupported audio value of type {type(value).__name__}")


def _load_dataset_audio(text, spec, num_samples, seed):
    try:
        import datasets
    except ImportError as error:
        raise ConversionError(
            f"calibration source {text!r} looks like a Hugging Face dataset, which needs the `datasets` package: "
            f"{DATASETS_HINT}"
        ) from error
    name, config, split, column = spec
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as error:
        raise ConversionError(f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {error}") from error
    features = getattr(dataset, "features", None) or {}
    if features and column not in features:
        raise ConversionError(f"dataset {name!r} has no column {column!r} (columns: {', '.join(features)})")
    if isinstance(features.get(column), datasets.Audio):
        # Decode ourselves (soundfile/librosa) so no particular audio backend of `datasets` is needed.
        dataset = dataset.cast_column(column, datasets.Audio(decode=False))
    result = CalibrationAudio(audio=[], source=text, kind="dataset")
    for index, example in enumerate(dataset):
        if len(result.audio) >= num_samples:
            break
        result.available += 1
        if column not in example:
            raise ConversionError(f"dataset {name!r} has no column {column!r} (columns: {', '.join(example)})")
        try:
            audio = _decode_dataset_value(example[column])
            if not np.any(audio):
                raise AudioError("all silence")
        except (AudioError, OSError, RuntimeError, ValueError) as error:
            logger.warning("calibration: skipping dataset row %d (%s)", index, error)
            result.skipped.append({"audio": f"{name}[{index}]", "reason": str(error)})
            continue
        result.audio.append(audio)
        result.ids.append(f"{name}[{index}]")
    if not result.audio:
        raise ConversionError(f"no usable calibration audio in dataset {text!r}")
    logger.info("calibration: %d clip(s), %.1f s of audio from dataset %s", len(result.audio), result.seconds, text)
    return result


# --------------------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------------------


def convert(
    base_model,
    output_dir,
    calibration=None,
    num_calibration_samples=100,
    rank_threshold=None,
    target_encoder_size=None,
    mode=None,
    refine_steps=None,
    refine_mode=None,
    dtype="float16",
    overwrite=False,
    push_to_hub=None,
    private=False,
    revision=None,
    device=None,
    progress=True,
    base_model_name=None,
    license=None,
    processor=None,
):
    """Compress a Whisper checkpoint into a LiteWhisper checkpoint folder (and optionally push it to the Hub).

    Args:
        base_model: Hub id or local folder of a Whisper model (any size, any mel count).
        output_dir: the folder to write; must not exist or be empty unless `overwrite`.
        calibration: None (the bundled calibration set), a folder of audio, a manifest.jsonl, an audio file, or a
            Hugging Face dataset `name[:config]:split:column`.
        num_calibration_samples: at most this many calibration clips (default 100).
        rank_threshold: "ATTENTION:MLP" explained-variance thresholds, or one value for both; each in (0, 1]: ranks
            by the paper's threshold rule instead of a target size.
        target_encoder_size: fraction of the original encoder's parameters to keep, in (0, 1]; overrides the
            thresholds. When neither is given: 0.8 (`DEFAULT_TARGET_SIZE`), the default everywhere.
        mode: "sequential" or "one-shot" calibration (None: the library default).
        refine_steps: steps of the label-free refinement, per layer in the layer-wise modes (None: the library
            default; 0 disables it).
        refine_mode: "layer", "layer-sequential" or "encoder" (None: the library default, layer-wise; see
            `CompressionSettings.refine_mode`).
        dtype: dtype of the saved weights: float16 (default), bfloat16 or float32.
        overwrite: replace a non-empty `output_dir`.
        push_to_hub: a Hub repo id to create (if needed) and upload the folder to.
        private: create the Hub repo private.
        revision: branch to push to (created if needed).
        device: where calibration and refinement run (None: CUDA when available, else CPU).
        progress: tqdm progress bars.
        base_model_name: Hub id to name as `base_model` in the model card when `base_model` is a local folder.
        license: license for the model card; default: the base's model card, else "mit" for openai/whisper-*.
        processor: folder or Hub id to take the tokenizer and feature extractor from, when the base has none.

    Returns the output folder (a `Path`).
    """
    from . import export

    started = time.perf_counter()
    timings = {}
    # --- cheap checks first: nothing heavy runs and nothing is written until all of these pass ---
    attention_threshold, mlp_threshold = parse_rank_threshold(rank_threshold if rank_threshold is not None else
                                                              DEFAULT_RANK_THRESHOLD)
    target = parse_target_size(target_encoder_size)
    if target is None and rank_threshold is None:
        target = DEFAULT_TARGET_SIZE
    elif target is not None and rank_threshold is not None:
        logger.warning("both a rank threshold and a target encoder size were given: the target size %g is used", target)
    dtype = parse_dtype(dtype)
    settings = _settings(attention_threshold, mlp_threshold, target, mode, refine_steps, refine_mode)
    output_dir = Path(output_dir).expanduser()
    try:
        check_output_dir(output_dir, overwrite)
    except FileExistsError as error:
        raise ConversionError(str(error)) from error
    if push_to_hub:
        check_push_target(push_to_hub)

    clock = time.perf_counter()
    base_folder = resolve_base_model(base_model)
    base_config = check_base_config(base_folder)
    processor_folder = resolve_base_model(processor) if processor else base_folder
    export.check_processor_files(processor_folder)
    timings["resolve_base_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    calibration_audio = load_calibration_audio(calibration, num_calibration_samples)
    warn_if_little_audio(calibration_audio, num_calibration_samples)
    timings["decode_s"] = time.perf_counter() - clock

    # --- heavy work ---
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from .compress import compress

    clock = time.perf_counter()
    model = WhisperForConditionalGeneration.from_pretrained(str(base_folder), **_dtype_kwargs(torch.float32)).eval()
    feature_extractor = WhisperFeatureExtractor.from_pretrained(str(processor_folder))
    if feature_extractor.feature_size != base_config.get("num_mel_bins", feature_extractor.feature_size):
        raise ConversionError(
            f"the feature extractor makes {feature_extractor.feature_size} mel bins but the model expects"
            f" {base_config.get('num_mel_bins')}"
        )
    timings["load_base_s"] = time.perf_counter() - clock
    logger.info(
        "compressing %s (%d encoder layers, d_model %d) with %s", base_model, model.config.encoder_layers,
        model.config.d_model, _describe(settings),
    )
    clock = time.perf_counter()
    result = compress(model, calibration_audio.audio, feature_extractor, settings=settings, device=device,
                      progress=progress)
    timings["compress_s"] = time.perf_counter() - clock
    del model

    # A compressed encoder that is too weak makes the decoder loop; say so rather than write it as a success.
    clock = time.perf_counter()
    from transformers import WhisperProcessor

    from .quality import check_loops

    quality = check_loops(result.model, WhisperProcessor.from_pretrained(str(processor_folder)), calibration_audio.audio,
                          calibration_audio.ids)
    result.report["quality_check"] = quality
    if not quality["ok"]:
        logger.warning(
            "the compressed model LOOPS on %d of %d calibration clips (%s): it is too compressed for this audio; use a"
            " larger --target-encoder-size, more refinement steps or more calibration audio",
            len(quality["looping"]), quality["clips"], "; ".join(f"{x['id']}: {x['loop']}" for x in quality["looping"]))
    timings["quality_check_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    info = {
        "base_model": str(base_model),
        "base_model_name": base_model_name or (None if Path(str(base_model)).expanduser().is_dir() else str(base_model)),
        "base_folder": str(base_folder),
        "processor_folder": str(processor_folder),
        "calibration": calibration_audio.summary(),
        "dtype": dtype,
        "license": license,
        "timings_s": timings,
        "started": started,
    }
    folder = export.write_checkpoint(result, output_dir, base_folder, processor_folder, info, overwrite=overwrite)
    logger.info("wrote %s", folder)
    if push_to_hub:
        url = export.push_folder(folder, push_to_hub, private=private, revision=revision)
        logger.info("pushed %s to %s", folder, url)
    return folder


def _settings(attention_threshold, mlp_threshold, target, mode, refine_steps, refine_mode=None):
    from .compress import CompressionSettings

    kwargs = {"attention_threshold": attention_threshold, "mlp_threshold": mlp_threshold, "target_size": target}
    if mode is not None:
        kwargs["mode"] = mode
    if refine_steps is not None:
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
            raise ConversionError(f"refine steps must be a non-negative integer, got {refine_steps!r}")
        kwargs["refine_steps"] = refine_steps
    if refine_mode is not None:
        kwargs["refine_mode"] = refine_mode
    settings = CompressionSettings(**kwargs)
    try:
        settings.validate()
    except ValueError as error:
        raise ConversionError(str(error)) from error
    return settings


def _describe(settings):
    size = (f"target encoder size {settings.target_size:g}" if settings.target_size is not None
            else f"rank threshold {settings.attention_threshold:g}:{settings.mlp_threshold:g}")
    refinement = f"{settings.refine_steps} refinement steps"
    if settings.refine_steps and settings.refine_mode != "encoder":
        refinement = f"{settings.refine_steps} refinement steps per layer ({settings.refine_mode})"
    return f"{size}, {settings.mode} calibration, {refinement}"


def _dtype_kwargs(torch_dtype):
    """`dtype=` on transformers 5, `torch_dtype=` on 4.x (5 deprecates the old name)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch_dtype} if major >= 5 else {"torch_dtype": torch_dtype}


__all__ = [
    "CalibrationAudio",
    "ConversionError",
    "bundled_calibration_dir",
    "bundled_clips_dir",
    "check_base_config",
    "convert",
    "load_calibration_audio",
    "parse_rank_threshold",
    "parse_target_size",
]
