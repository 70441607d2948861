"""Throughput of `lite-whisper transcribe` (1 and N processes) against `pipeline()` called in a Python loop.

The GPU machine has no internet, soundfile, librosa or whisper-base, and carries at most 64 MiB a call, so
`prepare` (run here, with the dev audio and whisper-base available) writes everything it needs under
`.cache/transcribe_bench/` (git-ignored): the 4 long-form and every other short dev clip decoded to 16 kHz int16 `.npy` (read by `transcribe` and the
baseline without soundfile), manifests (`once.jsonl`: each clip once; `workload.jsonl`: repeated to >= 2,000
clips), and whisper-base in float16 (what runs on the GPU anyway). These are packed into one tar split into parts
small enough to carry one per device call; `run` unpacks them on the device machine.

    python benchmarks/transcribe_throughput.py prepare          # here; prints the device calls to make

Then, on a 2-GPU machine (nvidia-h100-x2), one device call per part, back to back (the machine stays warm 30 s
and keeps carried files between calls), the last one running the measurement:

    carry [.cache/transcribe_bench/parts/bundle.tar.00]  command: true
    ...
    carry [.cache/transcribe_bench/parts/bundle.tar.NN]  command:
        PYTHONUNBUFFERED=1 python benchmarks/transcribe_throughput.py run --out $OUT

`run` does, on the same machine: (1) `pipeline()` in a Python loop over `once.jsonl`, (2) `lite-whisper transcribe`
on the same files (1 process), (3) `transcribe` on `workload.jsonl` with 1 process, (4) the same with
`accelerate launch --multi_gpu --num_processes 2` (skipped with fewer GPUs), and checks the merged outputs of (3) and
(4) are identical. Results: `$OUT/transcribe_throughput.json` and `.md`. On CPU (this machine):

    python benchmarks/transcribe_throughput.py run --device cpu --short-only --limit 16 --gpus "" --out /tmp/tb
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".cache" / "transcribe_bench"
PARTS = BENCH / "parts"
DATA = BENCH / "data"
PART_MIB = 56  # + the repository (~5 MiB) stays under the 64 MiB a device call carries


def prepare(args):
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from lite_whisper.audio import load_audio
    from lite_whisper.whisper_base import whisper_base_path

    dev = Path(args.dev)
    rows = [json.loads(line) for line in (dev / "manifest.jsonl").read_text().splitlines() if line.strip()]
    # every long-form clip and every `--every`-th short one: the bundle must fit 3 device calls
    short = [r for r in rows if r["duration_s"] <= 30]
    rows = [r for r in rows if r["duration_s"] > 30] + short[:: args.every]
    stage = BENCH / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "audio").mkdir(parents=True)
    once = []
    for row in rows:
        audio = load_audio(dev / row["audio"])
        pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)
        np.save(stage / "audio" / f"{row['id']}.npy", pcm)
        once.append({"id": row["id"], "audio": f"audio/{row['id']}.npy", "text": row.get("text", ""),
                     "duration_s": round(len(pcm) / 16000, 3)})
    repeat = math.ceil(args.clips / len(once))
    workload = [{**r, "id": f"{r['id']}~{k}"} for k in range(repeat) for r in once]
    for name, manifest in (("once.jsonl", once), ("workload.jsonl", workload)):
        (stage / name).write_text("".join(json.dumps(r) + "\n" for r in manifest))

    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    base = whisper_base_path()
    model = WhisperForConditionalGeneration.from_pretrained(base, dtype=torch.float16)
    model.save_pretrained(stage / "whisper-base-fp16")
    WhisperProcessor.from_pretrained(base).save_pretrained(stage / "whisper-base-fp16")

    shutil.rmtree(PARTS, ignore_errors=True)
    PARTS.mkdir(parents=True)
    bundle = BENCH / "bundle.tar"
    with tarfile.open(bundle, "w") as tar:
        tar.add(stage, arcname="data")
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    names = []
    with open(bundle, "rb") as handle:
        while chunk := handle.read(PART_MIB << 20):
            names.append(f"bundle.tar.{len(names):02d}")
            (PARTS / names[-1]).write_bytes(chunk)
    (PARTS / "bundle.json").write_text(json.dumps({"sha256": digest, "parts": names}) + "\n")
    bundle.unlink()
    shutil.rmtree(stage)
    print(f"{len(once)} clips ({sum(r['duration_s'] for r in once) / 60:.1f} min), workload {len(workload)} clips;"
          f" bundle {digest[:12]} in {len(names)} parts under {PARTS.relative_to(ROOT)}")
    print("device calls, back to back on one nvidia-h100-x2 machine:")
    for k, name in enumerate(names):
        carry = [f".cache/transcribe_bench/parts/{name}"] + (
            [".cache/transcribe_bench/parts/bundle.json"] if k == len(names) - 1 else [])
        command = ("PYTHONUNBUFFERED=1 python benchmarks/transcribe_throughput.py run --out $OUT"
                   if k == len(names) - 1 else "ls -la .cache/transcribe_bench/parts")
        print(f"  {k + 1}. kind nvidia-h100-x2, carry {json.dumps(carry)}, command: {command}")


def unpack():
    if (DATA / "once.jsonl").is_file():
        return
    meta = json.loads((PARTS / "bundle.json").read_text())
    missing = [n for n in meta["parts"] if not (PARTS / n).is_file()]
    if missing:
        sys.exit(f"missing bundle parts {missing}: carry each part in its own call, back to back on one machine")
    bundle = BENCH / "bundle.tar"
    with open(bundle, "wb") as out:
        for name in meta["parts"]:
            out.write((PARTS / name).read_bytes())
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    if digest != meta["sha256"]:
        sys.exit(f"bundle checksum mismatch ({digest} != {meta['sha256']}): a part is stale; prepare again")
    with tarfile.open(bundle) as tar:
        tar.extractall(BENCH, filter="data")
    bundle.unlink()


def _rows(manifest, limit=None):
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def _limited_manifest(name, limit, short_only=False):
    if not limit and not short_only:
        return DATA / name
    rows = [r for r in _rows(DATA / name) if not short_only or r["duration_s"] <= 30]
    rows = rows[:limit] if limit else rows
    path = DATA / f"{Path(name).stem}-{'short-' if short_only else ''}first{len(rows)}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _distinct_files(manifest):
    """The workload repeats clips; transcribe keys its outputs by file, so give every row a file of its own
    (hard links: no extra disk)."""
    rows = _rows(manifest)
    folder = DATA / "workload_audio"
    folder.mkdir(exist_ok=True)
    for row in rows:
        target = folder / (row["id"].replace("~", "__") + ".npy")
        if not target.exists():
            os.link(DATA / row["audio"], target)
        row["audio"] = str(target.relative_to(DATA))
    path = manifest.with_name(manifest.stem + "-distinct.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _first_difference(a, b):
    for x, y in zip(a, b):
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            return {k: (x.get(k), y.get(k)) for k in keys}
    return None if len(a) == len(b) else {"lengths": (len(a), len(b))}


def pipeline_loop(model_dir, manifest, device, language):
    """The baseline: the ASR pipeline called once per file, as a user would write it."""
    import numpy as np
    import torch
    from transformers import pipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        asr = pipeline("automatic-speech-recognition", model=str(model_dir), device=device, dtype=dtype)
    except TypeError:  # transformers 4.x
        asr = pipeline("automatic-speech-recognition", model=str(model_dir), device=device, torch_dtype=dtype)
    rows = _rows(manifest)
    # greedy like `transcribe`: the ASR pipeline's own default for Whisper is 5 beams
    kwargs = {"return_timestamps": True,
              "generate_kwargs": {"language": language, "task": "transcribe", "num_beams": 1, "do_sample": False}}

    def load(row):
        pcm = np.load(manifest.parent / row["audio"])
        return {"raw": pcm.astype(np.float32) / 32768.0, "sampling_rate": 16000}

    asr(load(rows[0]), **kwargs)  # warm-up, not timed
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    texts = {}
    for row in rows:
        texts[row["id"]] = asr(load(row), **kwargs)["text"].strip()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    audio_s = sum(r["duration_s"] for r in rows)
    return {"files": len(rows), "audio_s": audio_s, "seconds": seconds, "rtfx": audio_s / seconds, "texts": texts,
            "load_average_after": os.getloadavg()[0]}


def transcribe_cli(model_dir, manifest, out_dir, processes, args):
    shutil.rmtree(out_dir, ignore_errors=True)
    command = ["-m", "lite_whisper.cli", "transcribe", str(manifest), "--model", str(model_dir), "--output-dir",
               str(out_dir), "--language", args.language, "--batch-size", str(args.batch_size), "--format", "jsonl",
               "--no-progress"]
    if args.device == "cpu":
        command += ["--device", "cpu"]
    if processes == 1:
        command = [sys.executable, *command]
    elif args.device == "cpu":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   *command]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=str(ROOT), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:], file=sys.stderr)
        raise SystemExit(f"transcribe failed ({processes} processes)")
    summary = json.loads((out_dir / ".lite-whisper" / "summary.json").read_text())
    records = [json.loads(line) for line in (out_dir / "transcripts.jsonl").read_text().splitlines()]
    shown = " ".join(c if " " not in c else repr(c) for c in command[command.index("-m"):])
    return {"command": shown, "processes": processes, "files": summary["files"], "audio_s": summary["audio_s"],
            "seconds": summary["transcribe_s"], "rtfx": summary["rtfx"], "process_wall_s": wall,
            "load_s": summary["load_s"], "failed": summary["failed"], "records": records,
            "load_average_after": os.getloadavg()[0]}


def run(args):
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    unpack()
    model_dir = DATA / "whisper-base-fp16"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = BENCH / "runs"
    results = {"device": args.device, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
               "gpus_visible": torch.cuda.device_count(), "cpu_count": os.cpu_count(), "batch_size": args.batch_size,
               "load_average": os.getloadavg()}
    import transformers

    results["transformers"] = transformers.__version__
    once = _limited_manifest("once.jsonl", args.limit, args.short_only)
    base = pipeline_loop(model_dir, once, args.device, args.language)
    mine = transcribe_cli(model_dir, once, work / "once-1", 1, args)
    texts = {r["id"]: r["text"] for r in mine["records"]}
    same = sum(texts.get(k) == v for k, v in base["texts"].items())
    results["compare"] = {
        "files": base["files"], "audio_s": base["audio_s"],
        "pipeline_loop": {k: base[k] for k in ("seconds", "rtfx", "load_average_after")},
        "transcribe": {k: mine[k] for k in ("command", "seconds", "rtfx", "load_s", "process_wall_s",
                                            "load_average_after")},
        "speedup": mine["rtfx"] / base["rtfx"], "identical_texts": same,
        "different_texts": [{"id": k, "pipeline": v, "transcribe": texts.get(k)} for k, v in base["texts"].items()
                            if texts.get(k) != v],
    }
    print(json.dumps(results["compare"], indent=1), flush=True)

    workload = _distinct_files(_limited_manifest("workload.jsonl", args.workload_limit))
    scale = {}
    for n in [int(g) for g in args.gpus.split(",") if g]:
        if args.device.startswith("cuda") and n > torch.cuda.device_count():
            scale[n] = {"skipped": f"{torch.cuda.device_count()} GPU(s) visible"}
            continue
        scale[n] = transcribe_cli(model_dir, workload, work / f"workload-{n}", n, args)
        print(n, "process(es):", {k: v for k, v in scale[n].items() if k != "records"}, flush=True)
    ran = {n: r for n, r in scale.items() if "records" in r}
    if 1 in ran:
        for n, r in ran.items():
            r["speedup_vs_1"] = r["rtfx"] / ran[1]["rtfx"]
            r["identical_to_1"] = r["records"] == ran[1]["records"]
            if not r["identical_to_1"]:
                r["first_difference"] = str(_first_difference(ran[1]["records"], r["records"]))[:2000]
                print(n, "processes: first difference", r["first_difference"], flush=True)
    results["scale"] = {n: {k: v for k, v in r.items() if k != "records"} for n, r in scale.items()}
    (out / "transcribe_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "transcribe_throughput.md").write_text(to_markdown(results))
    print(to_markdown(results))


def to_markdown(r):
    c = r["compare"]
    where = f"{r['gpu']}" if r["gpu"] else f"CPU ({r['cpu_count']} cores, load average {r['load_average'][0]:.1f})"
    lines = [f"whisper-base, greedy, English, timestamps on; {where}, {r['device']}, batch {r['batch_size']};"
             f" torch {r['torch']}, transformers {r['transformers']}", "",
             f"Same {c['files']} files ({c['audio_s'] / 60:.1f} min of audio):", "",
             "| | seconds | RTFx |", "|---|---:|---:|",
             f"| pipeline() in a Python loop | {c['pipeline_loop']['seconds']:.1f} | {c['pipeline_loop']['rtfx']:.1f} |",
             f"| lite-whisper transcribe | {c['transcribe']['seconds']:.1f} | {c['transcribe']['rtfx']:.1f} |", "",
             f"Speedup {c['speedup']:.2f}x; identical texts {c['identical_texts']}/{c['files']}.", ""]
    if r["scale"]:
        lines += ["| processes | files | audio h | seconds | RTFx | vs 1 | merged output = 1 process |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for n, s in r["scale"].items():
            if "skipped" in s:
                lines.append(f"| {n} | skipped: {s['skipped']} | | | | | |")
                continue
            lines.append(f"| {n} | {s['files']} | {s['audio_s'] / 3600:.2f} | {s['seconds']:.1f} | {s['rtfx']:.1f} |"
                         f" {s.get('speedup_vs_1', 1):.2f}x | {s.get('identical_to_1', '-')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: decode the dev clips, save whisper-base fp16, split into parts")
    p.add_argument("--dev", default=str(ROOT.parent / "shared" / "eval" / "dev"))
    p.add_argument("--clips", type=int, default=2000, help="at least this many clips in the workload")
    p.add_argument("--every", type=int, default=2, help="take every N-th short dev clip (2)")
    r = sub.add_parser("run", help="on the device: baseline, 1 process and N processes")
    r.add_argument("--out", required=True)
    r.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    r.add_argument("--gpus", default="1,2", help="process counts for the workload runs")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--language", default="en")
    r.add_argument("--limit", type=int, default=None, help="baseline comparison on the first N clips only")
    r.add_argument("--short-only", action="store_true", help="baseline comparison on clips up to 30 s only")
    r.add_argument("--workload-limit", type=int, default=None, help="scaling runs on the first N workload clips")
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
