"""`lite_whisper.evaluate`: WER, real-time factor and encoder size of one or several models, side by side.

Models are folders or Hub ids, LiteWhisper or plain Whisper. Clips up to 30 s go through `generate` in batches
(greedy, language and task forced); longer clips go through the ASR pipeline with 30 s chunks, the way Whisper's
long-form audio is transcribed in practice. WER is scored after Whisper's English normaliser: corpus WER (errors /
reference words) and the mean per-utterance WER that the LiteASR paper reports.
"""

import contextlib
import json
import logging
import platform
import re
import time
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, list_audio, load_audio
from .utils import get_logger, install_command

logger = get_logger(__name__)

LONG_FORM_S = 30.0
EVAL_HINT = install_command("eval")


class EvaluationError(ValueError):
    pass


def _device_and_dtype(device, dtype):
    import torch

    if device is None:
        from .distributed import default_device

        device = default_device()  # under accelerate launch / torchrun: this process's GPU
    device = torch.device(device)
    if dtype is None:
        # fp16 checkpoints are upcast on CPU: half-precision matmuls there are slow or unsupported.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        from .convert import parse_dtype

        dtype = getattr(torch, parse_dtype(dtype))
    return device, dtype


def load_model(model_id, processor=None, device=None, dtype=None):
    """(model, processor) for a folder or Hub id; `processor` names where the tokenizer/feature extractor come from.

    LiteWhisper models load through the Auto classes registered by `import lite_whisper` (no remote code runs).
    """
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    from . import register
    from .convert import _dtype_kwargs

    register()
    device, dtype = _device_and_dtype(device, dtype)
    from .utils import missing_local_path

    missing = missing_local_path(model_id)
    if missing:
        raise EvaluationError(missing)
    try:
        model = AutoModelForSpeechSeq2Seq.from_pretrained(str(model_id), **_dtype_kwargs(dtype))
    except Exception as error:
        if type(error).__name__ == "SafetensorError":  # plain Whisper checkpoints (LiteWhisper ones say it themselves)
            where = Path(str(model_id)) / "model.safetensors" if Path(str(model_id)).is_dir() else model_id
            raise EvaluationError(f"{where} is incomplete or corrupt ({error}); download it again") from None
        if not isinstance(error, (OSError, ValueError)):
            raise
        raise EvaluationError(f"cannot load model {model_id!r}: {' '.join(str(error).split())}") from error
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ("whisper", "lite-whisper"):
        raise EvaluationError(f"{model_id} is a {model_type!r} model; lite-whisper-eval scores Whisper and LiteWhisper models")
    model = model.to(device).eval()
    source = processor or model_id
    try:
        proc = AutoProcessor.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as error:
        raise EvaluationError(
            f"cannot load a processor (tokenizer + feature extractor) from {source!r}: {error}. Published LiteWhisper"
            " checkpoints ship none: pass the base Whisper model as --processor (e.g. openai/whisper-large-v3-turbo)"
        ) from error
    if not hasattr(proc, "feature_extractor") or not hasattr(proc, "tokenizer"):
        raise EvaluationError(f"{source!r} did not give a Whisper processor (got {type(proc).__name__}); pass --processor")
    return model, proc


def encoder_size(model):
    from .modeling_lite_whisper import encoder_parameter_report

    report = encoder_parameter_report(model)
    return {"encoder_params": report["encoder_params"], "original_encoder_params": report["original_encoder_params"],
            "encoder_fraction": report["fraction"]}


def load_rows(data, limit=None):
    """Rows with audio and reference text from a manifest/folder; rows without text are skipped with a warning."""
    try:
        rows = list_audio(data)
    except (FileNotFoundError, ValueError) as error:
        raise EvaluationError(f"evaluation data {data}: {error}") from error
    scored = [r for r in rows if (r.get("text") or "").strip()]
    if len(scored) < len(rows):
        logger.warning("%d of %d clips have no reference text and are not scored", len(rows) - len(scored), len(rows))
    if limit is not None:
        scored = scored[: int(limit)]
    if not scored:
        raise EvaluationError(
            f"no clips with reference text in {data} (a manifest.jsonl with 'text', or audio files with .txt beside them)"
        )
    return scored


def decode_rows(rows, data):
    """Decode every clip up front: (rows, arrays, skipped). A file that cannot be decoded is reported (name and
    reason, each one) and left out, and the rest is scored; none decodable is an error naming them all."""
    from .audio import AudioError

    kept, arrays, skipped = [], [], []
    for row in rows:
        try:
            arrays.append(load_audio(row["audio"]))
        except (AudioError, OSError, RuntimeError, ValueError) as error:
            skipped.append({"id": row.get("id"), "audio": str(row["audio"]), "reason": str(error)})
            logger.warning("skipping %s: %s", row["audio"], error)
            continue
        kept.append(row)
    if skipped:
        logger.warning("%d of %d clips could not be decoded and are not scored: %s", len(skipped), len(rows),
                       ", ".join(Path(s["audio"]).name for s in skipped))
    if not kept:
        raise EvaluationError(f"none of the {len(rows)} clips in {data} could be decoded: "
                              + "; ".join(s["reason"] for s in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return kept, arrays, skipped


class _WhisperOwnGenerateWarning(logging.Filter):
    """Drops transformers' "Passing `generation_config` together with generation-related arguments" warning when
    the arguments are only suppress_tokens/begin_suppress_tokens: Whisper's own generate() (transformers 5) passes
    those itself on every call, even a bare `model.generate(features)`; our calls pass no generation_config."""

    def filter(self, record):
        message = record.getMessage()
        if not message.startswith("Passing `generation_config` together with generation-related"):
            return True
        named = set(re.findall(r"'(\w+)'", message.split("arguments=", 1)[-1].split(")", 1)[0]))
        return not named <= {"suppress_tokens", "begin_suppress_tokens"}


@contextlib.contextmanager
def _quiet_whisper_generate():
    log = logging.getLogger("transformers.generation.utils")
    quiet = _WhisperOwnGenerateWarning()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def _synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transcribe_short(model, processor, arrays, batch_size=8, language="en", task="transcribe", progress=False):
    """Greedy transcripts of clips of at most 30 s, batched through generate."""
    import torch
    from tqdm.auto import tqdm

    texts = []
    starts = range(0, len(arrays), batch_size)
    for start in tqdm(starts, desc="short clips", disable=not progress, leave=False):
        batch = arrays[start : start + batch_size]
        inputs = processor.feature_extractor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                             return_attention_mask=True)
        features = inputs.input_features.to(model.device, model.dtype)
        with torch.no_grad(), _quiet_whisper_generate():
            ids = model.generate(features, attention_mask=inputs.attention_mask.to(model.device), language=language,
                                 task=task, num_beams=1, do_sample=False)
        texts.extend(t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True))
    return texts


def transcribe_long(model, processor, arrays, batch_size=8, language="en", task="transcribe", progress=False):
    """Transcripts of clips over 30 s through the ASR pipeline, in 30 s chunks batched `batch_size` at a time."""
    from tqdm.auto import tqdm
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                   feature_extractor=processor.feature_extractor, device=model.device)
    texts = []
    for audio in tqdm(arrays, desc="long clips", disable=not progress, leave=False):
        with _quiet_whisper_generate():
            out = asr({"raw": audio, "sampling_rate": SAMPLE_RATE}, chunk_length_s=30, batch_size=batch_size,
                      generate_kwargs={"language": language, "task": task, "num_beams": 1, "do_sample": False})
        texts.append(out["text"].strip())
    return texts


def evaluate_model(model_id, rows, arrays, processor=None, batch_size=8, device=None, dtype=None, language="en",
                   progress=True):
    """Score one model on decoded clips; returns a JSON-serialisable dict."""
    from .text import normalize, wer_scores

    device, dtype = _device_and_dtype(device, dtype)
    clock = time.perf_counter()
    model, proc = load_model(model_id, processor, device, dtype)
    load_s = time.perf_counter() - clock
    durations = [len(a) / SAMPLE_RATE for a in arrays]
    short = [i for i, d in enumerate(durations) if d <= LONG_FORM_S]
    long = [i for i, d in enumerate(durations) if d > LONG_FORM_S]
    hypotheses = [None] * len(arrays)
    # Under accelerate launch / torchrun each process transcribes its share; WER is scored on the gathered whole.
    from .distributed import gather, gather_by_index, shard

    short, long = shard(short), shard(long)

    # Warm-up on one short clip so one-off costs (kernel selection, lazy init) do not count in the RTF.
    if short:
        transcribe_short(model, proc, [arrays[short[0]]], 1, language)
    _synchronize(device)
    clock = time.perf_counter()
    for i, text in zip(short, transcribe_short(model, proc, [arrays[i] for i in short], batch_size, language,
                                               progress=progress)):
        hypotheses[i] = text
    _synchronize(device)
    short_s = time.perf_counter() - clock
    clock = time.perf_counter()
    for i, text in zip(long, transcribe_long(model, proc, [arrays[i] for i in long], batch_size, language,
                                             progress=progress)):
        hypotheses[i] = text
    _synchronize(device)
    long_s = time.perf_counter() - clock
    hypotheses = gather_by_index(hypotheses, short + long)
    short = [i for i, d in enumerate(durations) if d <= LONG_FORM_S]
    long = [i for i, d in enumerate(durations) if d > LONG_FORM_S]
    short_s, long_s = (max(t) for t in zip(*gather([(short_s, long_s)])))  # wall time: the slowest process

    references = [r["text"] for r in rows]
    scores = wer_scores(references, hypotheses)
    result = {
        "model": str(model_id),
        "model_type": model.config.model_type,
        **encoder_size(model),
        "wer": scores["wer"],
        "mean_utterance_wer": scores["mean_utterance_wer"],
        "errors": scores["errors"],
        "words": scores["words"],
        "clips": len(arrays),
        "audio_s": float(sum(durations)),
        "transcribe_s": short_s + long_s,
        "rtf": (short_s + long_s) / max(sum(durations), 1e-9),
        "load_s": load_s,
        "short_form": None,
        "long_form": None,
        "utterances": [],
    }
    for name, indices, seconds in (("short_form", short, short_s), ("long_form", long, long_s)):
        if indices and any(normalize(references[i]).split() for i in indices):
            part = wer_scores([references[i] for i in indices], [hypotheses[i] for i in indices])
            audio = sum(durations[i] for i in indices)
            result[name] = {"clips": len(indices), "wer": part["wer"], "mean_utterance_wer": part["mean_utterance_wer"],
                            "audio_s": audio, "transcribe_s": seconds, "rtf": seconds / max(audio, 1e-9)}
    for row, hyp, duration in zip(rows, hypotheses, durations):
        ref_words = normalize(row["text"]).split()
        utterance = {"id": row.get("id"), "duration_s": round(duration, 3), "reference": row["text"], "hypothesis": hyp}
        if ref_words:
            utterance["wer"] = wer_scores([row["text"]], [hyp])["wer"]
        result["utterances"].append(utterance)
    del model
    return result


def evaluate(models, data, processor=None, limit=None, batch_size=8, device=None, dtype=None, language="en",
             progress=True):
    """Evaluate each of `models` (folders or Hub ids) on `data` (manifest.jsonl or folder) and return a dict.

    Args:
        models: list of model folders / Hub ids (LiteWhisper or Whisper).
        data: a manifest.jsonl (`audio`, `text`), a folder holding one, or a folder of audio with .txt transcripts.
        processor: folder or Hub id of the tokenizer/feature extractor for models that ship none.
        limit: score only the first `limit` clips.
        batch_size: clips per generate call (short clips) or chunks per pipeline call (long clips).
        device, dtype: default CUDA + fp16 when available, else CPU + fp32.
        language: forced language token ("en").
    """
    try:
        import jiwer  # noqa: F401
    except ImportError as error:
        raise EvaluationError(f"WER needs jiwer: {EVAL_HINT}") from error
    if isinstance(models, (str, Path)):
        models = [models]
    if not models:
        raise EvaluationError("give at least one model")
    rows, arrays, skipped = decode_rows(load_rows(data, limit), data)
    device, dtype = _device_and_dtype(device, dtype)
    results = []
    for model_id in models:
        logger.info("evaluating %s on %d clips", model_id, len(rows))
        results.append(evaluate_model(model_id, rows, arrays, processor, batch_size, device, dtype, language,
                                      progress))
    import torch
    import transformers

    from . import __version__

    return {
        "data": str(data),
        "clips": len(rows),
        "audio_s": float(sum(len(a) for a in arrays) / SAMPLE_RATE),
        "long_form_clips": sum(1 for a in arrays if len(a) / SAMPLE_RATE > LONG_FORM_S),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "language": language,
        "normaliser": "Whisper EnglishTextNormalizer",
        "skipped": skipped,
        "versions": {"lite_whisper": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "models": results,
    }


def to_markdown(results):
    """A Markdown table of the models side by side."""
    skipped = results.get("skipped") or []
    lines = [
        f"Data: `{results['data']}`: {results['clips']} clips, {results['audio_s']:.0f} s"
        f" ({results['long_form_clips']} over 30 s); {results['device']}, {results['dtype']}, greedy,"
        f" WER after Whisper's English normaliser."
        + (f" {len(skipped)} undecodable file(s) not scored: {', '.join(Path(s['audio']).name for s in skipped)}."
           if skipped else ""),
        "",
        "| model | encoder params | % of original | WER | mean utt. WER | short WER | long WER | RTF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["models"]:
        short = f"{r['short_form']['wer']:.2f}" if r.get("short_form") else "-"
        long = f"{r['long_form']['wer']:.2f}" if r.get("long_form") else "-"
        lines.append(
            f"| {r['model']} | {r['encoder_params'] / 1e6:.2f}M | {100 * r['encoder_fraction']:.1f}% | {r['wer']:.2f}"
            f" | {r['mean_utterance_wer']:.2f} | {short} | {long} | {r['rtf']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(results, json_path=None, markdown_path=None):
    """Write the JSON and/or Markdown results (each complete or not at all); returns the absolute paths written."""
    written = []
    for path, text in ((json_path, lambda: json.dumps(results, indent=2, default=_json_default) + "\n"),
                       (markdown_path, lambda: to_markdown(results))):
        if not path:
            continue
        path = Path(path).expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text(), encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = ["EvaluationError", "evaluate", "evaluate_model", "load_model", "to_markdown", "write_results"]
