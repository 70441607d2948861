"""`lite-whisper transcribe`: many audio files to transcripts, subtitles and JSON on CPU, a GPU or many GPUs.

Output folder: `<key>.srt|.vtt|.txt` per input file, `transcripts.jsonl` (input order), `errors.jsonl`, and
`.lite-whisper/` (the run's settings, one record per finished file, per-process parts). A file counts as done
when its record exists and was made with the same settings; every file is written to a temporary name and
`os.replace`d, so a killed run leaves only complete files and a rerun picks up where it stopped.

Rank 0 plans the whole run (inputs, resume, length-sorted batches) and broadcasts it; batches, not files, are
dealt to processes, so a file is decoded in the same batch whatever the number of processes and the merged output
does not depend on it.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .audio import AUDIO_SUFFIXES, SAMPLE_RATE, read_manifest
from .utils import get_logger

logger = get_logger(__name__)

FORMATS = ("jsonl", "srt", "vtt", "txt")
STATE_DIR = ".lite-whisper"
WINDOW_S = 30.0
TMP_SUFFIX = ".lwtmp"
# Pre-decoded 16 kHz mono arrays; accepted as files and in manifests (not picked up from folders).
ARRAY_SUFFIXES = (".npy",)


class TranscribeError(ValueError):
    """A problem with the inputs, options or output folder: reported in one line, nothing transcribed."""


@dataclass
class Item:
    index: int
    file: str
    key: str
    duration: float = None


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------


def _safe_key(key):
    key = key.replace("\\", "/").strip("/")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or parts[0] == STATE_DIR or "\0" in key:
        return None
    return "/".join(parts)


def discover(inputs):
    """Items for audio files, folders (recursive, by extension) and manifest.jsonl files, in input order.

    Keys name the per-file outputs: the path relative to the folder without its extension, the manifest `id`, or
    the file's stem. Files given twice are transcribed once; keys that collide get the extension, then `~N`.
    """
    found = []  # (file, key)
    for raw in inputs:
        source = Path(raw).expanduser()
        if source.is_dir():
            manifest = source / "manifest.jsonl"
            if manifest.is_file():
                found += [(r["audio"], str(r.get("id") or Path(r["audio"]).stem)) for r in _manifest(manifest)]
                continue
            files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                raise TranscribeError(f"{source}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this folder")
            found += [(os.path.abspath(p), p.relative_to(source).with_suffix("").as_posix()) for p in files]
        elif source.is_file() and source.suffix.lower() == ".jsonl":
            found += [(r["audio"], str(r.get("id") or Path(r["audio"]).stem)) for r in _manifest(source)]
        elif source.is_file():
            if source.suffix.lower() not in AUDIO_SUFFIXES + ARRAY_SUFFIXES:
                raise TranscribeError(f"{source}: not an audio file ({', '.join(AUDIO_SUFFIXES + ARRAY_SUFFIXES)}),"
                                      " a folder or a manifest.jsonl")
            found.append((os.path.abspath(source), source.stem))
        else:
            raise TranscribeError(f"{source}: no such file or folder")
    if not found:
        raise TranscribeError("no input files")

    seen, unique = set(), []
    for file, key in found:
        if file in seen:
            logger.warning("%s is given more than once; transcribing it once", file)
            continue
        seen.add(file)
        safe = _safe_key(key)
        if safe is None:
            raise TranscribeError(f"{file}: its output name {key!r} would be written outside the output folder;"
                                  " give it another manifest id")
        unique.append([file, safe])
    counts = {}
    for entry in unique:
        counts[entry[1]] = counts.get(entry[1], 0) + 1
    for entry in unique:
        if counts[entry[1]] > 1:
            entry[1] += Path(entry[0]).suffix.lower()
    taken = set()
    for entry in unique:
        key, n = entry[1], 1
        while key.lower() in taken:  # case-insensitive file systems
            n += 1
            key = f"{entry[1]}~{n}"
        entry[1] = key
        taken.add(key.lower())
    return [Item(i, file, key) for i, (file, key) in enumerate(unique)]


def _manifest(path):
    try:
        return read_manifest(path)
    except (OSError, ValueError) as error:
        raise TranscribeError(f"{path}: {error}") from error


def probe_duration(file):
    """Duration in seconds from the file header (no decoding), or None when unknown."""
    try:
        if file.lower().endswith(ARRAY_SUFFIXES):
            return float(np.load(file, mmap_mode="r").shape[-1]) / SAMPLE_RATE
        import soundfile as sf

        return float(sf.info(file).duration)
    except Exception:
        return None


def read_audio(file):
    """16 kHz mono float32; `.npy` files hold such an array already (float, or int16 PCM)."""
    if file.lower().endswith(ARRAY_SUFFIXES):
        try:
            data = np.load(file)
        except Exception as error:
            raise ValueError(f"cannot read {file}: {error}") from error
        if data.ndim != 1:
            raise ValueError(f"{file}: expected a 1-D array of 16 kHz samples, got shape {data.shape}")
        data = data.astype(np.float32) / 32768.0 if data.dtype == np.int16 else data.astype(np.float32)
        if data.size == 0:
            raise ValueError(f"{file} holds no samples")
        return np.ascontiguousarray(data)
    from .audio import AudioError, load_audio

    if os.path.getsize(file) == 0:
        raise ValueError(f"{file} is empty (0 bytes)")
    try:
        return load_audio(file)
    except AudioError as error:
        reason = str(error)
        if reason.rstrip().endswith(":"):  # librosa's last resort failed without a message: give soundfile's
            try:
                import soundfile as sf

                sf.info(file)
            except Exception as sf_error:
                reason = f"{reason.rstrip()} {sf_error}"
        raise ValueError(reason) from error


# --------------------------------------------------------------------------------------------------------------
# output folder
# --------------------------------------------------------------------------------------------------------------


def atomic_write(path, text):
    """Write `text` to a temporary file beside `path`, then rename it over `path`: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class OutputDir:
    def __init__(self, root, formats):
        self.root = Path(root).expanduser().absolute()
        self.formats = formats
        self.state = self.root / STATE_DIR

    def output(self, key, fmt):
        path = (self.root / f"{key}.{fmt}").resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise TranscribeError(f"refusing to write {path}: outside the output folder {self.root}")
        return path

    def record_path(self, key):
        return self.state / "records" / f"{key}.json"

    def read_record(self, key, file, settings_id):
        try:
            record = json.loads(self.record_path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if record.get("settings_id") != settings_id or record.get("file") != file:
            return None
        return record

    def write_outputs(self, key, record):
        """Per-file outputs first, the record last: a record means every output of the file is complete."""
        for fmt in self.formats:
            if fmt != "jsonl":
                atomic_write(self.output(key, fmt), render(record, fmt))
        atomic_write(self.record_path(key), json.dumps(record, ensure_ascii=False) + "\n")

    def sweep_temporaries(self):
        for tmp in self.root.rglob(f"*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# subtitle and text formats
# --------------------------------------------------------------------------------------------------------------


def _clock(seconds, separator):
    millis = int(round(max(seconds, 0.0) * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cue_text(text):
    # A blank line ends a cue and "-->" starts a timing line in both formats.
    return " ".join(text.split()).replace("-->", "->")


def render(record, fmt):
    if fmt == "txt":
        return record["text"] + "\n"
    cues = [s for s in record["segments"] or [] if _cue_text(s["text"])]
    if fmt == "srt":
        return "".join(f"{n}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{_cue_text(s['text'])}\n\n"
                       for n, s in enumerate(cues, 1))
    if fmt == "vtt":
        body = "".join(f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{_cue_text(s['text'])}\n\n"
                       for s in cues)
        return f"WEBVTT\n\nNOTE transcribed by lite-whisper with {_cue_text(record['model'])}\n\n{body}"
    raise ValueError(f"unknown format {fmt!r}")


# --------------------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Options:
    model: str
    output_dir: str
    formats: tuple = FORMATS
    processor: str = None
    language: str = None
    task: str = "transcribe"
    batch_size: int = None
    dtype: str = None
    device: str = None
    return_timestamps: bool = True
    chunk_length: float = None
    max_new_tokens: int = None
    num_workers: int = None
    overwrite: bool = False
    progress: bool = True


def _parse_formats(value):
    formats = tuple(dict.fromkeys(f.strip().lower() for f in str(value).split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise TranscribeError(f"--format takes a comma-separated list of {', '.join(FORMATS)}; got {value!r}")
    return formats


def _check_options(opts):
    if opts.batch_size is not None and opts.batch_size < 1:
        raise TranscribeError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.chunk_length is not None and not 0 < opts.chunk_length <= WINDOW_S:
        raise TranscribeError(f"--chunk-length must be in (0, 30] seconds, got {opts.chunk_length}")
    if opts.num_workers is not None and opts.num_workers < 0:
        raise TranscribeError(f"--num-workers must be 0 or more, got {opts.num_workers}")
    if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
        raise TranscribeError(f"--max-new-tokens must be at least 1, got {opts.max_new_tokens}")
    if opts.task not in ("transcribe", "translate"):
        raise TranscribeError(f"--task must be transcribe or translate, got {opts.task!r}")
    if not opts.return_timestamps and {"srt", "vtt"} & set(opts.formats):
        raise TranscribeError("srt and vtt subtitles need timestamps: drop --no-return-timestamps or use"
                              " --format jsonl,txt")
    if opts.language is not None:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

        code = opts.language.lower().strip("<|>")
        code = TO_LANGUAGE_CODE.get(code, code)
        if code not in LANGUAGES:
            raise TranscribeError(f"--language {opts.language!r} is not a Whisper language (e.g. en, de, english)")
        opts.language = code


def _resolve_device(opts):
    import torch

    from .distributed import default_device

    if opts.device is None:
        device = default_device()
    else:
        try:
            device = torch.device(opts.device)
        except RuntimeError as error:
            raise TranscribeError(f"--device {opts.device!r}: {error}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TranscribeError(f"--device {opts.device}: CUDA is not available here")
    if opts.dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        from .convert import ConversionError, parse_dtype

        try:
            dtype = getattr(torch, parse_dtype(opts.dtype))
        except ConversionError as error:
            raise TranscribeError(f"--dtype: {error}") from error
    return device, dtype


def settings_for(opts, dtype):
    """What decides a file's transcript; a record made under other settings is never reused."""
    model = os.path.abspath(opts.model) if Path(opts.model).is_dir() else opts.model
    processor = opts.processor and (os.path.abspath(opts.processor) if Path(opts.processor).is_dir() else opts.processor)
    return {"model": model, "processor": processor, "language": opts.language, "task": opts.task,
            "return_timestamps": opts.return_timestamps, "chunk_length": opts.chunk_length,
            "max_new_tokens": opts.max_new_tokens, "dtype": str(dtype).replace("torch.", ""), "decoding": "greedy"}


def _settings_id(settings):
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# planning (rank 0)
# --------------------------------------------------------------------------------------------------------------


def plan_run(inputs, opts, settings, batch_size, world):
    """Check the output folder, find what is left to do and cut it into length-sorted batches, dealt to ranks."""
    from concurrent.futures import ThreadPoolExecutor

    from .distributed import deal

    items = discover(inputs)
    out = OutputDir(opts.output_dir, opts.formats)
    if out.root.exists() and not out.root.is_dir():
        raise TranscribeError(f"--output-dir {out.root} exists and is not a folder")
    for item in items:  # every target must resolve inside the output folder (symlinks included)
        for fmt in opts.formats:
            if fmt != "jsonl":
                out.output(item.key, fmt)
    settings_id = _settings_id(settings)
    settings_file = out.state / "settings.json"
    previous = None
    if settings_file.is_file():
        try:
            previous = json.loads(settings_file.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
    if previous is not None and previous != settings and not opts.overwrite:
        changed = ", ".join(f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in settings.items() if previous.get(k) != v)
        raise TranscribeError(f"{out.root} holds transcripts made with other settings ({changed}); pass --overwrite"
                              " to replace them or choose another --output-dir")
    if previous is None and not opts.overwrite:
        targets = [out.root / "transcripts.jsonl", out.root / "errors.jsonl"]
        targets += [out.output(i.key, f) for i in items for f in opts.formats if f != "jsonl"]
        existing = [t for t in targets if t.exists()]
        if existing:
            raise TranscribeError(f"{existing[0]} exists and was not written by lite-whisper transcribe"
                                  f" ({len(existing)} such files); pass --overwrite to replace them or choose another"
                                  " --output-dir")
    out.state.mkdir(parents=True, exist_ok=True)
    out.sweep_temporaries()
    atomic_write(settings_file, json.dumps(settings, indent=2) + "\n")

    pending, resumed = [], 0
    for item in items:
        record = out.read_record(item.key, item.file, settings_id)
        if record is None:
            pending.append(item)
            continue
        resumed += 1
        for fmt in opts.formats:  # a format asked for now but not last time: write it from the record
            if fmt != "jsonl" and not out.output(item.key, fmt).is_file():
                atomic_write(out.output(item.key, fmt), render(record, fmt))

    with ThreadPoolExecutor(16) as pool:
        for item, duration in zip(pending, pool.map(probe_duration, [i.file for i in pending])):
            item.duration = duration
    known = sorted((i for i in pending if i.duration is not None), key=lambda i: (-i.duration, i.index))
    batches = []
    for group in ([i for i in known if i.duration > WINDOW_S], [i for i in known if i.duration <= WINDOW_S]):
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    batches += [[i] for i in pending if i.duration is None]  # unreadable headers: decoded alone
    owners = deal(batches, world)
    return {"run_id": f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", "items": items,
            "resumed": resumed, "settings_id": settings_id,
            "batches": [[asdict(i) for i in b] for b in batches], "owners": owners}


# --------------------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------------------


class AudioBatches:
    """Map-style dataset of planned batches: decoding and feature extraction run in DataLoader workers."""

    def __init__(self, batches, feature_extractor, keep_long_audio):
        self.batches = batches
        self.feature_extractor = feature_extractor
        self.keep_long_audio = keep_long_audio

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        import torch

        entries = []
        for item in self.batches[k]:
            entry = {"item": item, "error": None}
            try:
                with warnings.catch_warnings():  # librosa's fallback chatter; the failure itself is reported
                    warnings.simplefilter("ignore")
                    audio = read_audio(item["file"])
            except Exception as error:  # unreadable, empty, wrong format: reported, the run goes on
                entry["error"] = str(error) or type(error).__name__
                entries.append(entry)
                continue
            entry["duration"] = len(audio) / SAMPLE_RATE
            entry["long"] = len(audio) > WINDOW_S * SAMPLE_RATE
            if entry["long"]:
                # one item at a time, so its frames never depend on its batch (padding changes the last frames)
                feats = self.feature_extractor(audio, sampling_rate=SAMPLE_RATE, truncation=False, padding="longest",
                                               return_attention_mask=True, return_tensors="np")
                entry["features"] = torch.from_numpy(feats["input_features"][0])
                if self.keep_long_audio:
                    entry["audio"] = torch.from_numpy(audio)
            else:
                feats = self.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                                               return_tensors="np")
                entry["features"] = torch.from_numpy(feats["input_features"][0])
                entry["mask"] = torch.from_numpy(feats["attention_mask"][0])
            entries.append(entry)
        return entries


def _unbatched(entries):
    return entries


class Decoder:
    def __init__(self, model, processor, opts):
        import torch

        self.torch = torch
        self.model, self.processor, self.opts = model, processor, opts
        self.tokenizer = processor.tokenizer
        self.multilingual = getattr(model.generation_config, "is_multilingual", True)
        self._pipeline = None

    def languages(self, features):
        """One language code per item: --language, or detected on the first 30 s window."""
        if self.opts.language is not None or not self.multilingual:
            return [self.opts.language or "en"] * len(features)
        with self.torch.no_grad():
            ids = self.model.detect_language(features[..., :3000])
        return [t.strip("<|>") for t in self.tokenizer.convert_ids_to_tokens(ids.tolist())]

    def _generate_kwargs(self, languages, timestamps):
        kwargs = {"num_beams": 1, "do_sample": False, "return_timestamps": timestamps}
        if timestamps:
            kwargs["return_segments"] = True
        if self.multilingual:
            kwargs.update(language=languages, task=self.opts.task)
        if self.opts.max_new_tokens:
            kwargs["max_new_tokens"] = self.opts.max_new_tokens
        return kwargs

    def generate(self, entries):
        """Whisper's own short-form (<= 30 s, padded to 30 s) or sequential long-form decoding of one batch."""
        torch, model = self.torch, self.model
        long = entries[0]["long"]
        frames = [e["features"].shape[-1] for e in entries]
        width = max(frames)
        features = torch.zeros(len(entries), entries[0]["features"].shape[0], width)
        mask = torch.zeros(len(entries), width, dtype=torch.long)
        for row, (entry, n) in enumerate(zip(entries, frames)):
            features[row, :, :n] = entry["features"]
            mask[row, :n] = 1 if long else entry["mask"]
        features = features.to(model.device, model.dtype, non_blocking=True)
        mask = mask.to(model.device)
        languages = self.languages(features)
        timestamps = self.opts.return_timestamps or long  # long-form decoding needs timestamps to seek
        with torch.no_grad():
            out = model.generate(features, attention_mask=mask, **self._generate_kwargs(languages, timestamps))
        sequences = out["sequences"] if isinstance(out, dict) else getattr(out, "sequences", out)
        results = []
        for row, entry in enumerate(entries):
            text = self.tokenizer.decode(sequences[row], skip_special_tokens=True).strip()
            segments = None
            if timestamps and isinstance(out, dict):
                segments = [(float(s["start"]), float(s["end"]),
                             self.tokenizer.decode(s["tokens"], skip_special_tokens=True))
                            for s in out["segments"][row]]
            if segments is not None and not self.opts.return_timestamps:
                segments = None
            results.append((text, segments, languages[row]))
        return results

    def chunked(self, entry):
        """--chunk-length: the ASR pipeline's chunked mode (faster, less exact at chunk borders)."""
        if self._pipeline is None:
            from transformers import pipeline

            self._pipeline = pipeline("automatic-speech-recognition", model=self.model, tokenizer=self.tokenizer,
                                      feature_extractor=self.processor.feature_extractor, device=self.model.device)
        features = entry["features"][None, :, :3000].to(self.model.device, self.model.dtype)
        language = self.languages(features)[0]
        kwargs = self._generate_kwargs([language], False)
        for key in ("return_timestamps", "return_segments"):
            kwargs.pop(key, None)
        if self.multilingual:
            kwargs["language"] = language
        out = self._pipeline({"raw": entry["audio"].numpy(), "sampling_rate": SAMPLE_RATE},
                             chunk_length_s=self.opts.chunk_length, batch_size=self.opts.batch_size,
                             return_timestamps=True if self.opts.return_timestamps else False, generate_kwargs=kwargs)
        segments = None
        if self.opts.return_timestamps:
            segments = [(c["timestamp"][0] or 0.0, entry["duration"] if c["timestamp"][1] is None else c["timestamp"][1],
                         c["text"]) for c in out.get("chunks", [])]
        return out["text"].strip(), segments, language


def make_record(entry, result, settings, settings_id):
    text, segments, language = result
    duration = entry["duration"]
    clean = None
    if segments is not None:
        clean, last = [], 0.0
        for start, end, seg_text in segments:
            # Whisper may put the last end token past the end of the audio; the audio stops there.
            start = min(max(start, last), duration)
            end = min(max(end, start), duration)
            clean.append({"start": round(start, 3), "end": round(end, 3), "text": seg_text.strip()})
            last = start
    item = entry["item"]
    return {"file": item["file"], "id": item["key"], "text": text, "segments": clean, "language": language,
            "duration": round(duration, 3), "model": settings["model"], "task": settings["task"],
            "settings_id": settings_id}


def load_model(opts, device, dtype):
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    from . import register
    from .convert import _dtype_kwargs

    register()
    try:
        model = AutoModelForSpeechSeq2Seq.from_pretrained(str(opts.model), **_dtype_kwargs(dtype))
    except (OSError, ValueError) as error:
        raise TranscribeError(f"cannot load model {opts.model!r}: {error}") from error
    if getattr(model.config, "model_type", None) not in ("whisper", "lite-whisper"):
        raise TranscribeError(f"{opts.model} is a {model.config.model_type!r} model, not Whisper or LiteWhisper")
    model = model.to(device).eval()
    if getattr(device, "type", str(device)) == "cuda":
        from .fast_generation import enable_fast_generation

        # Plain Whisper too: the static-cache CUDA-graph decoding loop (LiteWhisper models have it built in).
        enable_fast_generation(model)
    source = opts.processor or opts.model
    try:
        processor = AutoProcessor.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as error:
        raise TranscribeError(f"cannot load a tokenizer + feature extractor from {source!r} ({error}); checkpoints"
                              " that ship none need --processor BASE (e.g. openai/whisper-large-v3-turbo)") from error
    if not hasattr(processor, "feature_extractor") or not hasattr(processor, "tokenizer"):
        raise TranscribeError(f"{source!r} gave no Whisper processor; pass --processor")
    multilingual = getattr(model.generation_config, "is_multilingual", True)
    if not multilingual and (opts.language not in (None, "en") or opts.task != "transcribe"):
        raise TranscribeError(f"{opts.model} is English-only: it takes no --language other than en and no translate")
    return model, processor


# --------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------


def transcribe(inputs, opts):
    """Transcribe `inputs` into `opts.output_dir`; returns the summary dict (on every rank; totals on rank 0)."""
    from .distributed import broadcast, launched, process_state

    started = time.perf_counter()
    opts.formats = _parse_formats(opts.formats if isinstance(opts.formats, str) else ",".join(opts.formats))
    _check_options(opts)
    device, dtype = _resolve_device(opts)
    if launched():
        state = process_state(cpu=device.type == "cpu")
        rank, world = state.process_index, state.num_processes
        if opts.device is None:
            device = state.device
    else:
        rank, world = 0, 1
    # On CPU a batch only adds padded decoder rows (compute-bound): batch 1 measured no slower than 8 on 2 cores.
    batch_size = opts.batch_size or (16 if device.type == "cuda" else 1)
    opts.batch_size = batch_size
    settings = settings_for(opts, dtype)

    plan = None
    if rank == 0:
        try:
            plan = plan_run(inputs, opts, settings, batch_size, world)
        except Exception as error:
            if world > 1:  # the other ranks are waiting for the plan: give them the reason instead
                broadcast({"error": str(error)})
            raise
    plan = broadcast(plan)
    if "error" in plan:
        raise TranscribeError(plan["error"])
    out = OutputDir(opts.output_dir, opts.formats)
    mine = [b for b, owner in zip(plan["batches"], plan["owners"]) if owner == rank]
    n_pending = sum(len(b) for b in plan["batches"])
    if rank == 0:
        logger.info("%d files: %d already done, %d to transcribe in %d batches on %d process(es)", len(plan["items"]),
                    plan["resumed"], n_pending, len(plan["batches"]), world)

    load_s = 0.0
    errors, done, audio_s = [], [], 0.0
    clock = time.perf_counter()
    if mine:
        clock = time.perf_counter()
        model, processor = load_model(opts, device, dtype)
        load_s = time.perf_counter() - clock
        decoder = Decoder(model, processor, opts)
        clock = time.perf_counter()
        audio_s = _run_batches(mine, decoder, out, settings, plan["settings_id"], opts, device, rank, errors, done)
    transcribe_s = time.perf_counter() - clock
    part = {"rank": rank, "done": done, "errors": errors, "audio_s": audio_s, "transcribe_s": transcribe_s,
            "load_s": load_s}
    atomic_write(out.state / "parts" / f"{plan['run_id']}.rank{rank:05d}.json", json.dumps(part) + "\n")
    if rank != 0:
        return {"rank": rank, **part}
    parts = _wait_for_parts(out, plan["run_id"], world)
    return _merge(out, plan, parts, world, device, dtype, time.perf_counter() - started)


def _run_batches(batches, decoder, out, settings, settings_id, opts, device, rank, errors, done):
    import torch
    from tqdm.auto import tqdm

    workers = opts.num_workers
    if workers is None:
        from .distributed import rank_and_world

        workers = max(1, min(4, (os.cpu_count() or 2) // rank_and_world()[1] - 1))
    dataset = AudioBatches(batches, decoder.processor.feature_extractor, opts.chunk_length is not None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_unbatched, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    total_h = sum(i["duration"] or 0.0 for b in batches for i in b) / 3600
    bar = tqdm(total=round(total_h, 4), unit="audio-h", disable=not opts.progress or rank != 0, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} audio-h [{elapsed}<{remaining}{postfix}]")
    start = time.perf_counter()
    audio_s = 0.0
    try:
        for entries in loader:
            good = [e for e in entries if e["error"] is None]
            for e in entries:
                if e["error"] is not None:
                    errors.append({"file": e["item"]["file"], "id": e["item"]["key"], "error": e["error"]})
            # a planned batch holds one kind; a header that misreported the length makes a batch of its own
            groups = [g for g in ([e for e in good if not e["long"]], [e for e in good if e["long"]]) if g]
            for group in groups:
                for entry, result in _decode_group(decoder, group, errors):
                    record = make_record(entry, result, settings, settings_id)
                    out.write_outputs(entry["item"]["key"], record)
                    done.append(entry["item"]["index"])
                    audio_s += entry["duration"]
            bar.update(round(sum(e.get("duration", 0.0) for e in good) / 3600, 6))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"RTFx {audio_s / max(elapsed, 1e-9):.1f}, {len(done)} files", refresh=False)
    finally:
        bar.close()
    return audio_s


def _decode_group(decoder, group, errors):
    """(entry, result) pairs; a batch that fails is retried file by file and a file that still fails is an error."""
    try:
        if group[0]["long"] and decoder.opts.chunk_length is not None:
            return [(e, decoder.chunked(e)) for e in group]
        return list(zip(group, decoder.generate(group)))
    except Exception as error:
        if len(group) > 1:
            logger.warning("a batch of %d failed (%s); retrying its files one by one", len(group), error)
            return [pair for e in group for pair in _decode_group(decoder, [e], errors)]
        logger.warning("%s: transcription failed: %s", group[0]["item"]["file"], error)
        errors.append({"file": group[0]["item"]["file"], "id": group[0]["item"]["key"],
                       "error": f"transcription failed: {error}"})
        return []


def _wait_for_parts(out, run_id, world, poll_s=0.2):
    # File-system rendezvous rather than a collective: ranks may finish far apart (no NCCL timeout to hit), and the
    # launcher stops every rank if one dies.
    paths = [out.state / "parts" / f"{run_id}.rank{r:05d}.json" for r in range(world)]
    while not all(p.is_file() for p in paths):
        time.sleep(poll_s)
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def _merge(out, plan, parts, world, device, dtype, wall_s):
    items = [Item(**i) if isinstance(i, dict) else i for i in plan["items"]]
    pending = [i["index"] for b in plan["batches"] for i in b]
    seen = {}
    for part in parts:
        for index in part["done"]:
            seen[index] = seen.get(index, 0) + 1
    errors = [e for part in parts for e in part["errors"]]
    failed = {e["id"] for e in errors}
    duplicated = [i for i, n in seen.items() if n > 1]
    if duplicated:
        raise RuntimeError(f"internal error: {len(duplicated)} files were transcribed by more than one process")
    lines, missing = [], []
    for item in items:
        record = out.read_record(item.key, item.file, plan["settings_id"])
        if record is None:
            if item.key not in failed:
                missing.append(item)
            continue
        record.pop("settings_id", None)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    for item in missing:  # a process stopped before finishing its share: say so, a rerun does the rest
        errors.append({"file": item.file, "id": item.key, "error": "no result (its process stopped early); rerun"})
    order = {i.key: i.index for i in items}
    errors.sort(key=lambda e: order.get(e["id"], 0))
    if "jsonl" in out.formats:
        atomic_write(out.root / "transcripts.jsonl", "".join(lines))
    atomic_write(out.root / "errors.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    audio_s = sum(p["audio_s"] for p in parts)
    transcribe_s = max(p["transcribe_s"] for p in parts)
    summary = {
        "files": len(items), "transcribed": sum(len(p["done"]) for p in parts), "resumed": plan["resumed"],
        "failed": len(errors), "pending": len(pending), "audio_s": audio_s, "audio_h": audio_s / 3600,
        "transcribe_s": transcribe_s, "wall_s": wall_s, "load_s": max(p["load_s"] for p in parts),
        "rtfx": audio_s / transcribe_s if transcribe_s > 0 else None, "processes": world, "device": device.type,
        "dtype": str(dtype).replace("torch.", ""), "output_dir": str(out.root),
    }
    atomic_write(out.state / "summary.json", json.dumps(summary, indent=2) + "\n")
    for stale in (out.state / "parts").glob("*.json"):  # earlier runs' parts (this run's stay, for inspection)
        if not stale.name.startswith(plan["run_id"] + "."):
            stale.unlink(missing_ok=True)
    return summary


def format_summary(s):
    rtfx = f"RTFx {s['rtfx']:.1f}" if s["rtfx"] else "RTFx -"
    line = (f"{s['transcribed']} of {s['files']} files transcribed ({s['resumed']} already done, {s['failed']} failed),"
            f" {s['audio_h']:.3f} audio-hours in {s['transcribe_s']:.1f} s: {rtfx}; wall {s['wall_s']:.1f} s,"
            f" model load {s['load_s']:.1f} s; {s['processes']} process(es), {s['device']} {s['dtype']}")
    if s["failed"]:
        line += f"\nfailures are listed in {Path(s['output_dir']) / 'errors.jsonl'}"
    return line


# --------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------


def add_transcribe_arguments(parser):
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="audio files, folders (searched recursively) or manifest.jsonl files")
    parser.add_argument("--model", required=True,
                        help="LiteWhisper or Whisper checkpoint: folder or Hub id (required)")
    parser.add_argument("--output-dir", required=True, help="where the outputs go; a rerun resumes (required)")
    parser.add_argument("--format", default=",".join(FORMATS),
                        help="comma-separated: jsonl (transcripts.jsonl), srt, vtt, txt (default: all)")
    parser.add_argument("--language", default=None, help="e.g. en (default: detected per file)")
    parser.add_argument("--task", default="transcribe", choices=("transcribe", "translate"),
                        help="transcribe, or translate to English (default: transcribe)")
    parser.add_argument("--batch-size", type=int, default=None, help="files per batch (default: 16 on CUDA, 1 on CPU)")
    parser.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: this process's GPU, else CPU)")
    parser.add_argument("--return-timestamps", action=argparse.BooleanOptionalAction, default=True,
                        help="segment timestamps; srt/vtt need them (default: on)")
    parser.add_argument("--chunk-length", type=float, default=None, metavar="SECONDS",
                        help="audio over 30 s through the pipeline's chunked mode with chunks this long (default:"
                             " Whisper's sequential long-form decoding)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on tokens per 30 s window (default: the model's generation config)")
    parser.add_argument("--processor", default=None, help="tokenizer/feature extractor source for checkpoints without one (default: --model)")
    parser.add_argument("--num-workers", type=int, default=None, help="audio-decoding worker processes per process (default: chosen from the CPU count)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs in --output-dir made by another model/settings or by something else"
                             " (default: refuse)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (default: warnings only)")


def run_transcribe(args):
    opts = Options(model=args.model, output_dir=args.output_dir, formats=args.format, processor=args.processor,
                   language=args.language, task=args.task, batch_size=args.batch_size, dtype=args.dtype,
                   device=args.device, return_timestamps=args.return_timestamps, chunk_length=args.chunk_length,
                   max_new_tokens=args.max_new_tokens, num_workers=args.num_workers, overwrite=args.overwrite,
                   progress=not args.no_progress)
    try:
        summary = transcribe(args.inputs, opts)
    except KeyboardInterrupt:
        print(f"interrupted: the files finished so far are complete in {args.output_dir}; run the same command again"
              " to resume", file=sys.stderr)
        return 130
    finally:
        _shutdown_process_group()
    if summary.get("rank", 0) == 0:
        print(format_summary(summary))
    return 1 if summary.get("failed") else 0


def _shutdown_process_group():
    from .distributed import launched

    if launched():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Options", "TranscribeError", "add_transcribe_arguments", "discover", "render", "run_transcribe",
           "transcribe"]
