"""Compression defaults on CPU: convert whisper-base with given settings, time each stage, score real vs synthetic.

Scored on `../shared/eval/dev`, which is never used for calibration: the 99 real human speech clips (ids `real_*`;
they decide) and a fixed subset of 60 synthetic short clips (every third synthetic short clip in manifest order,
the first 60), greedy decoding, at most 128 new tokens, Whisper's English normaliser, corpus WER. The uncompressed
whisper-base is scored once and kept in the results file as the reference.

    python benchmarks/defaults.py --name default-t0.8 --set target_size=0.8
    python benchmarks/defaults.py --name crop-off --set target_size=0.8 crop_padding=None
    python benchmarks/defaults.py --name aug --set augmentations=speed,noise augment_copies=1
    python benchmarks/defaults.py --plan benchmarks/defaults_plan.json --device cuda --output OUT/defaults_gpu

A plan is a JSON list of runs, {"name": ..., "set": {field: value}, "calibration": path or null}, converted and
scored one after the other in one process (on a GPU a whole-window conversion takes seconds, so a plan sweeps the
levers that decide the CPU defaults; their CPU cost is timed separately with --device cpu).

Each run adds one entry to OUTPUT.json (settings, stage timings, machine load, WER per group, loops found,
hypotheses) and rewrites OUTPUT.md. A run whose name is already in OUTPUT.json is skipped (resume), unless --force.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "eval" / "dev"
logger = logging.getLogger("defaults")


def dev_groups(dev_dir=DEV, synthetic_clips=60, synthetic_stride=3):
    from lite_whisper.audio import list_audio

    rows = [r for r in list_audio(dev_dir) if not r.get("long_form")]
    real = [r for r in rows if r["id"].startswith("real_")]
    synthetic = [r for r in rows if not r["id"].startswith("real_")][::synthetic_stride][:synthetic_clips]
    return {"real": real, "synthetic": synthetic}


def load_group(rows):
    from lite_whisper.audio import load_audio

    return [load_audio(r["audio"]) for r in rows]


def score(model, processor, rows, audio):
    from lite_whisper.quality import greedy_transcripts, looping_transcripts
    from lite_whisper.text import wer_scores

    clock = time.perf_counter()
    hypotheses = greedy_transcripts(model, processor, audio, batch_size=16)
    result = wer_scores([r["text"] for r in rows], hypotheses)
    result["transcribe_s"] = round(time.perf_counter() - clock, 1)
    result["looping"] = [x["id"] for x in looping_transcripts([r["id"] for r in rows], hypotheses)]
    return result, hypotheses


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def parse_value(value):
    from pareto import type_of  # benchmarks/ is on sys.path when this runs as a script

    return None if value in ("None", "none") else type_of(value)


def to_markdown(results):
    base = results["baseline"]
    lines = [
        "| run | % encoder | real WER | Δ real | synthetic WER | Δ synth. | loops (real/synth.) | convert wall (s) | "
        "stages: features / statistics / factorisation / teacher / refinement (s) | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        f"| whisper-base (uncompressed) | 100.0 | {base['real']['wer']:.2f} | – | {base['synthetic']['wer']:.2f} | – |"
        f" {len(base['real']['looping'])}/{len(base['synthetic']['looping'])} | – | – | – |",
    ]
    def cell(run, group, what):
        if group not in run:
            return "not scored"
        if what == "wer":
            return f"{run[group]['wer']:.2f}"
        return f"{100 * (run[group]['wer'] / base[group]['wer'] - 1):+.1f}%"

    for run in results["runs"].values():
        t = run["report"]["timings_s"]
        stages = " / ".join(f"{t.get(k, 0):.0f}" for k in ("features_s", "statistics_s", "factorisation_s", "teacher_s",
                                                          "refinement_s"))
        lines.append(
            f"| {run['name']} | {100 * run['report']['encoder_fraction']:.1f} | {cell(run, 'real', 'wer')} |"
            f" {cell(run, 'real', 'rel')} | {cell(run, 'synthetic', 'wer')} | {cell(run, 'synthetic', 'rel')} |"
            f" {len(run.get('real', {}).get('looping', []))}/{len(run.get('synthetic', {}).get('looping', []))} |"
            f" {run['convert_s']:.0f}"
            f" ({run.get('convert_cpu_s', float('nan')):.0f} CPU s) | {stages} |"
            f" {run['load_average']} |")
    notes = [
        "", "Real: the 99 real human speech clips of the dev set; synthetic: 60 fixed synthetic short clips. Corpus WER",
        "(Whisper English normaliser), greedy, max 128 new tokens. convert = decode + compress (without loading the",
        "base and writing the folder), wall seconds and CPU seconds of the process (all threads; on an idle 2-core",
        "machine the wall time is about CPU / 2). Timings on 2 shared CPU cores: `load avg` is the 1/5/15-minute",
        "load average when the conversion ended (2.0 = the two cores fully busy); above ~2.5 other jobs slowed it.",
        "Settings of each run (diff to the defaults): see OUTPUT.json `runs.NAME.settings_diff`.",
    ]
    return "\n".join(lines + notes) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="name of the run (required without --plan)")
    parser.add_argument("--plan", help="JSON list of runs: {name, set, calibration}")
    parser.add_argument("--device", default="cpu", help="where conversion and scoring run (cpu, cuda)")
    parser.add_argument("--set", nargs="*", default=[], help="CompressionSettings fields, key=value")
    parser.add_argument("--calibration", default=None, help="calibration source (default: the bundled set)")
    parser.add_argument("--num-calibration-samples", type=int, default=100)
    parser.add_argument("--output", default="benchmarks/results/defaults", help="path without suffix")
    parser.add_argument("--dev-dir", default=str(DEV))
    parser.add_argument("--synthetic-clips", type=int, default=60)
    parser.add_argument("--synthetic-stride", type=int, default=3,
                        help="every n-th synthetic short clip (1 for a copy that holds only the scored clips)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="redo a run already in the results")
    parser.add_argument("--baseline-last", action="store_true",
                        help="score the uncompressed model after the run (if no other run has by then)")
    args = parser.parse_args(argv)
    if not args.plan and not args.name:
        parser.error("give --name (one run) or --plan (several)")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    torch.set_num_threads(args.threads)
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from lite_whisper.compress import CompressionSettings, compress
    from lite_whisper.convert import load_calibration_audio
    from lite_whisper.whisper_base import whisper_base_path

    output = Path(args.output)
    path = output.with_suffix(".json")
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    if args.plan:
        plan = json.loads(Path(args.plan).read_text())
    else:
        plan = [{"name": args.name, "set": {k: parse_value(v) for k, v in (i.split("=", 1) for i in args.set)},
                 "calibration": args.calibration}]
    todo = [p for p in plan if args.force or p["name"] not in results["runs"]]
    for p in plan:
        if p not in todo:
            print(f"{p['name']}: already in {path}")
    if not todo:
        return
    device = torch.device(args.device)
    base_path = whisper_base_path()
    processor = WhisperProcessor.from_pretrained(base_path)
    model = WhisperForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32).eval()
    groups = dev_groups(args.dev_dir, args.synthetic_clips, args.synthetic_stride)
    audio = {g: load_group(rows) for g, rows in groups.items()}
    dev_ids = {r["id"] for rows in groups.values() for r in rows}

    def ensure_baseline(results):
        # Another run may have scored the baseline meanwhile: read the file again before scoring it here.
        results = json.loads(path.read_text()) if path.is_file() else results
        if "baseline" not in results:
            scored = model.to(device)
            results["baseline"] = {g: score(scored, processor, groups[g], audio[g])[0] for g in groups}
            model.to("cpu")
            logger.info("baseline: %s", {g: round(results["baseline"][g]["wer"], 2) for g in groups})
            output.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))  # kept even if the run below is interrupted
        return results

    def save(run):
        # After the conversion and after each group: a slow machine still leaves the numbers measured so far.
        results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}  # other runs may have finished
        results.setdefault("runs", {})[run["name"]] = run
        output.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        if "baseline" in results:
            output.with_suffix(".md").write_text(to_markdown(results))
        return results

    if not args.baseline_last:
        results = ensure_baseline(results)

    for item in todo:
        overrides = dict(item.get("set", {}))
        settings = CompressionSettings(**overrides)
        clock, cpu = time.perf_counter(), time.process_time()
        calibration = load_calibration_audio(item.get("calibration"), args.num_calibration_samples)
        decode_s = time.perf_counter() - clock
        if set(calibration.ids) & dev_ids:
            raise SystemExit("calibration audio overlaps the scored dev clips")
        result = compress(model, calibration.audio, processor.feature_extractor, settings, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        convert_s = time.perf_counter() - clock
        # CPU seconds of this process (all threads): on an otherwise idle 2-core machine the wall time is about half.
        convert_cpu_s = time.process_time() - cpu
        run = {"name": item["name"], "command": command, "device": _device_name(device), "settings_diff": overrides,
               "calibration": calibration.summary() | {"ids": None},
               "decode_s": round(decode_s, 1), "convert_s": round(convert_s, 1),
               "convert_cpu_s": round(convert_cpu_s, 1), "load_average": load_average(),
               "report": {k: v for k, v in result.report.items() if k != "layers"}}
        save(run)
        lite = result.model.to(device)
        for group in groups:  # real speech first: it decides
            run[group], run[f"{group}_hypotheses"] = score(lite, processor, groups[group], audio[group])
            logger.info("%s: %s WER %.2f", item["name"], group, run[group]["wer"])
            save(run)
        del lite, result
    results = ensure_baseline(save(run))
    print(to_markdown(results))


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
