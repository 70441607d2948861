"""`lite-whisper-mlx`: transcribe audio files with a LiteWhisper (or Whisper) checkpoint on MLX.

Prints one line per input, in the order given: the transcript, or with --json an object with `file`, `text`,
`language` and `segments` (start/end/text; words too with --word-timestamps). A file that cannot be read gives an
empty line (a JSON object with `error`) so that lines stay aligned with inputs, and the exit status is then 1.
"""

import argparse
import json
import logging
import sys

from .backend import MLXUnavailableError

logger = logging.getLogger(__name__)


def add_mlx_arguments(parser):
    """The options of `lite-whisper-mlx` / `lite-whisper mlx` (light: argparse only)."""
    from lite_whisper.cli import add_common_arguments, dtype_name

    parser.add_argument("audio", nargs="+", help="audio files (any format soundfile/librosa reads; resampled to 16 kHz)")
    parser.add_argument("--model", required=True,
                        help="model folder (config.json + model.safetensors) or Hub repo id (required)")
    parser.add_argument("--language", default=None, help="language code such as en (default: detect per file)")
    parser.add_argument("--task", default="transcribe", choices=("transcribe", "translate"),
                        help="(default: %(default)s)")
    parser.add_argument(
        "--dtype", type=dtype_name, default=None, choices=("float16", "float32"),
        help="inference dtype, as for lite-whisper-eval; bfloat16 is not offered because mlx-whisper's decoding is"
        " float16/float32 only (default: float16 on the Apple GPU, float32 on the CPU)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per file (default: plain text)")
    parser.add_argument(
        "--processor",
        default=None,
        metavar="BASE",
        help="folder or Hub id of the base Whisper model whose tokenizer files check the vocabulary when the model"
        " folder has none; decoding uses mlx-whisper's bundled Whisper vocabulary either way (default: the model's own"
        " files)",
    )
    parser.add_argument("--tokenizer", dest="processor", help=argparse.SUPPRESS)  # old spelling
    parser.add_argument(
        "--temperature",
        type=_temperatures,
        default="0,0.2,0.4,0.6,0.8,1.0",
        help="temperature, or comma-separated fallback sequence; 0 = greedy only (default: %(default)s)",
    )
    parser.add_argument("--word-timestamps", action="store_true", help="add word timings to --json output (default: off)")
    parser.add_argument(
        "--greedy",
        action="store_true",
        help="plain greedy decoding of the first 30 s without timestamps or fallback, what the parity tests check"
        " (default: off)",
    )
    add_common_arguments(parser, progress=False)


def build_parser():
    from lite_whisper import __version__

    parser = argparse.ArgumentParser(
        prog="lite-whisper-mlx",
        description="Transcribe audio with a LiteWhisper or Whisper checkpoint on MLX (Apple GPU, or CPU).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_mlx_arguments(parser)
    return parser


def _temperatures(text):
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma-separated list of numbers") from None
    if not values:
        raise argparse.ArgumentTypeError("empty")
    return values[0] if len(values) == 1 else values


def _segments(result, with_words):
    segments = []
    for segment in result.get("segments", []):
        item = {"start": round(segment["start"], 2), "end": round(segment["end"], 2), "text": segment["text"].strip()}
        if with_words and segment.get("words"):
            item["words"] = [
                {"start": round(w["start"], 2), "end": round(w["end"], 2), "word": w["word"], "probability": w["probability"]}
                for w in segment["words"]
            ]
        segments.append(item)
    return segments


def main(argv=None):
    return run_mlx(build_parser().parse_args(argv))


def run_mlx(args):
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    temperature = args.temperature

    try:
        from .inference import greedy_decode, transcribe
        from .modeling import load_model

        model = load_model(args.model, dtype=args.dtype, tokenizer=args.processor)
    except MLXUnavailableError as error:
        print(f"lite-whisper-mlx: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"lite-whisper-mlx: error: {error}", file=sys.stderr)
        return 2

    failed = False
    for path in args.audio:
        try:
            if args.greedy:
                decoded = greedy_decode(model, path, language=args.language, task=args.task)
                result = {"text": decoded.text, "language": decoded.language, "segments": []}
            else:
                result = transcribe(
                    model,
                    path,
                    language=args.language,
                    task=args.task,
                    temperature=temperature,
                    word_timestamps=args.word_timestamps,
                )
        except (OSError, ValueError) as error:
            failed = True
            print(f"lite-whisper-mlx: error: {path}: {error}", file=sys.stderr)
            print(json.dumps({"file": path, "text": None, "error": str(error)}) if args.json else "", flush=True)
            continue
        text = result["text"].strip()
        if args.json:
            line = {"file": path, "text": text, "language": result.get("language")}
            if not args.greedy:
                line["segments"] = _segments(result, args.word_timestamps)
            print(json.dumps(line, ensure_ascii=False), flush=True)
        else:
            print(text, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
