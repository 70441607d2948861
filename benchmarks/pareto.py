"""WER against encoder size for whisper-base compressed with lite_whisper.compress (the issue-3 Pareto sweep).

Calibration and scoring use disjoint halves of the dev set's short clips (manifest order: even positions calibrate,
odd positions are scored), so no score is measured on audio the compression saw. Each configuration is one
`compress()` call followed by greedy transcription of the scoring half.

    python benchmarks/pareto.py --output benchmarks/results/pareto            # the whole grid (hours on 2 CPUs)
    python benchmarks/pareto.py --targets 0.8 0.65 --thresholds --modes sequential --refine 0 200

Writes OUTPUT.json (every configuration: WER, size, compression report with timings), OUTPUT.md (the table) and
OUTPUT.png (WER against encoder size, the uncompressed model as the reference point). Results already in
OUTPUT.json are kept and skipped, so an interrupted sweep can be resumed.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_THRESHOLDS = ["0.95:0.99", "0.99:0.99", "0.99:0.999", "0.995:0.999"]
DEFAULT_TARGETS = [0.9, 0.8, 0.7, 0.65]
DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "eval" / "dev"

logger = logging.getLogger("pareto")


def dev_split(dev_dir=DEV):
    """(calibration rows, scoring rows): the dev short clips at even / odd manifest positions."""
    from lite_whisper.audio import list_audio

    rows = [r for r in list_audio(dev_dir) if not r.get("long_form")]
    return rows[0::2], rows[1::2]


def load(rows):
    from lite_whisper.audio import load_audio

    return [load_audio(r["audio"]) for r in rows]


@torch.no_grad()
def transcribe(model, processor, audio, batch_size=16, max_new_tokens=128):
    model.eval()
    texts = []
    for start in range(0, len(audio), batch_size):
        inputs = processor.feature_extractor(audio[start : start + batch_size], sampling_rate=16000, return_tensors="pt")
        ids = model.generate(
            input_features=inputs["input_features"].to(model.dtype), language="en", task="transcribe",
            max_new_tokens=max_new_tokens,
        )
        texts.extend(processor.tokenizer.batch_decode(ids, skip_special_tokens=True))
    return texts


def score(model, processor, rows, audio):
    from lite_whisper.modeling_lite_whisper import encoder_parameter_report
    from lite_whisper.text import wer_scores

    clock = time.perf_counter()
    hypotheses = transcribe(model, processor, audio)
    seconds = time.perf_counter() - clock
    result = wer_scores([r["text"] for r in rows], hypotheses)
    params = encoder_parameter_report(model)
    result.update({"encoder_params": params["encoder_params"], "encoder_fraction": params["fraction"],
                   "transcribe_s": round(seconds, 1)})
    return result, hypotheses


def config_name(cfg):
    size = f"target={cfg['target_size']}" if cfg.get("target_size") is not None else (
        f"threshold={cfg['attention_threshold']}:{cfg['mlp_threshold']}")
    extra = "".join(f" {k}={v}" for k, v in sorted(cfg.items())
                    if k not in ("target_size", "attention_threshold", "mlp_threshold", "mode", "refine_steps"))
    return f"{size} mode={cfg['mode']} refine={cfg['refine_steps']}{extra}"


def grid(args):
    configs = []
    sizes = [{"attention_threshold": float(a), "mlp_threshold": float(m)}
             for a, m in (t.split(":") if ":" in t else (t, t) for t in args.thresholds)]
    sizes += [{"target_size": float(t)} for t in args.targets]
    for size in sizes:
        for mode in args.modes:
            for steps in args.refine:
                cfg = dict(size, mode=mode, refine_steps=int(steps))
                for item in args.set or []:
                    key, value = item.split("=", 1)
                    cfg[key] = type_of(value)
                configs.append(cfg)
    return configs


def type_of(value):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def write_outputs(results, output):
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=1))
    base = results.get("baseline")
    lines = [
        "| configuration | encoder params | % of original | corpus WER | Δ rel. | mean utt. WER | convert time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    if base:
        lines.append(f"| whisper-base (uncompressed) | {base['encoder_params']:,} | 100.0 | {base['wer']:.2f} | – |"
                     f" {base['mean_utterance_wer']:.2f} | – |")
    rows = sorted(results["runs"].values(), key=lambda r: -r["score"]["encoder_fraction"])
    for run in rows:
        s = run["score"]
        rel = f"{100 * (s['wer'] / base['wer'] - 1):+.1f}%" if base else "–"
        lines.append(f"| {run['name']} | {s['encoder_params']:,} | {100 * s['encoder_fraction']:.1f} | {s['wer']:.2f} |"
                     f" {rel} | {s['mean_utterance_wer']:.2f} | {run['report']['timings_s']['total_s']:.0f} |")
    header = [f"Command: `{results['command']}`", ""] if results.get("command") else []
    header += [results["note"], ""] if results.get("note") else []
    output.with_suffix(".md").write_text("\n".join(header + lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        colours = {}
        standard = {"target_size", "attention_threshold", "mlp_threshold", "mode", "refine_steps"}
        for run in rows:
            cfg = run["config"]
            label = f"{cfg['mode']}, refine {cfg['refine_steps']}"
            colours.setdefault(label, f"C{len(colours)}")
        for label, colour in colours.items():
            group = [r for r in rows if f"{r['config']['mode']}, refine {r['config']['refine_steps']}" == label]
            targets = sorted((r for r in group if r["config"].get("target_size") is not None and set(r["config"]) <= standard),
                             key=lambda r: r["score"]["encoder_fraction"])
            thresholds = [r for r in group if r["config"].get("target_size") is None and set(r["config"]) <= standard]
            extra = [r for r in group if not set(r["config"]) <= standard]
            ax.plot([100 * r["score"]["encoder_fraction"] for r in targets], [r["score"]["wer"] for r in targets],
                    marker="o", color=colour, label=f"{label} (target size)")
            ax.scatter([100 * r["score"]["encoder_fraction"] for r in thresholds], [r["score"]["wer"] for r in thresholds],
                       marker="s", facecolors="none", edgecolors=colour, label=f"{label} (thresholds)" if thresholds else None)
            ax.scatter([100 * r["score"]["encoder_fraction"] for r in extra], [r["score"]["wer"] for r in extra],
                       marker="x", color=colour, label=f"{label} (other seeds/settings)" if extra else None)
        if base:
            ax.scatter([100], [base["wer"]], marker="*", s=180, color="black", zorder=5, label="whisper-base")
            ax.axhline(base["wer"], color="black", lw=0.6, ls=":")
        ax.set_xlabel("encoder parameters (% of whisper-base)")
        ax.set_ylabel("corpus WER (%) on held-out dev clips")
        if rows:
            ax.set_ylim(0, min(100, max(r["score"]["wer"] for r in rows) * 1.05))
        ax.set_title("whisper-base compressed with lite_whisper")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(output.with_suffix(".png"), dpi=130)
        plt.close(fig)
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/results/pareto", help="path without suffix")
    parser.add_argument("--thresholds", nargs="*", default=DEFAULT_THRESHOLDS, help="A:M pairs (none: skip)")
    parser.add_argument("--targets", nargs="*", type=float, default=DEFAULT_TARGETS, help="target sizes (none: skip)")
    parser.add_argument("--modes", nargs="+", default=["sequential", "one-shot"])
    parser.add_argument("--refine", nargs="+", type=int, default=[0, 200], help="refine_steps values")
    parser.add_argument("--set", nargs="*", help="extra CompressionSettings fields, key=value")
    parser.add_argument("--calibration-clips", type=int, default=None, help="use only the first N calibration clips")
    parser.add_argument("--scoring-clips", type=int, default=None, help="score only the first N held-out clips")
    parser.add_argument("--base-model", default=None, help="a local Whisper folder (default: the rebuilt whisper-base)")
    parser.add_argument("--dev-dir", default=str(DEV), help="the dev set (manifest.jsonl + audio)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-models", default=None, help="folder to save each compressed model in")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from lite_whisper.compress import CompressionSettings, compress
    from lite_whisper.whisper_base import whisper_base_path

    path = args.base_model or whisper_base_path()
    processor = WhisperProcessor.from_pretrained(path)
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    calibration_rows, scoring_rows = dev_split(args.dev_dir)
    calibration_rows = calibration_rows[: args.calibration_clips]
    scoring_rows = scoring_rows[: args.scoring_clips]
    calibration_audio, scoring_audio = load(calibration_rows), load(scoring_rows)
    logger.info("calibration: %d clips, scoring: %d held-out clips", len(calibration_audio), len(scoring_audio))

    output = Path(args.output)
    results = json.loads(output.with_suffix(".json").read_text()) if output.with_suffix(".json").is_file() else {}
    results.setdefault("runs", {})
    split = {"calibration": [r["id"] for r in calibration_rows], "scoring": [r["id"] for r in scoring_rows]}
    if results.get("split") not in (None, split):
        results = {"runs": {}}  # a different split: earlier numbers are not comparable
    results["split"] = split
    results["command"] = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    if "baseline" not in results:
        results["baseline"], _ = score(model, processor, scoring_rows, scoring_audio)
        logger.info("baseline: %s", results["baseline"])
        write_outputs(results, output)

    for cfg in grid(args):
        name = config_name(cfg)
        if name in results["runs"]:
            continue
        settings = CompressionSettings(**cfg)
        try:
            result = compress(model, calibration_audio, processor.feature_extractor, settings, device=args.device)
        except ValueError as error:
            logger.warning("%s: %s", name, error)
            continue
        s, hypotheses = score(result.model, processor, scoring_rows, scoring_audio)
        logger.info("%s: WER %.2f at %.1f%% (convert %.0f s)", name, s["wer"], 100 * s["encoder_fraction"],
                    result.report["timings_s"]["total_s"])
        results["runs"][name] = {"name": name, "config": cfg, "score": s, "report": result.report,
                                 "hypotheses": hypotheses}
        if args.save_models:
            result.model.save_pretrained(Path(args.save_models) / name.replace(" ", "_").replace(":", "-"))
        write_outputs(results, output)
    print(write_outputs(results, output))


if __name__ == "__main__":
    main()
