"""Is fp16 transcription deterministic run to run? (issue 8/9: 11-16 of 2,002 files differed between identical
fp16 runs of `lite-whisper transcribe` on one GPU, fp32 never did.)

One process = one run: whisper-base in fp16 on CUDA, N inputs (the dev clips, then seeded speed/noise copies of
them), greedy batches of 32 in a fixed order, token ids written to JSON. Each arm runs in its own process, twice,
because a process's first CUDA setup (allocator addresses, cuBLAS handles, graph capture) is what can differ:

    python benchmarks/fp16_determinism.py run --arm default --out OUT/default_1.json
    python benchmarks/fp16_determinism.py compare OUT/*.json

The same inputs through `lite-whisper transcribe` (timestamps on, languages detected, the tool's own batching):

    python benchmarks/fp16_determinism.py files --out /tmp/inputs     # the N inputs as .npy files
    python -m lite_whisper.cli transcribe /tmp/inputs/manifest.jsonl --model M --output-dir /tmp/a --format jsonl  # twice
    python benchmarks/fp16_determinism.py compare-transcripts /tmp/a /tmp/b

Arms: default (fast path); workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts); noreduced
(torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False); eager (no fast path).
"""

import argparse
import json
import os
import sys
from pathlib import Path

ARMS = ("default", "workspace", "noreduced", "eager")


def inputs(dev_dir, count):
    import numpy as np

    from lite_whisper.audio import list_audio, load_audio
    from lite_whisper.augment import augment_waveform

    clips = [load_audio(r["audio"]) for r in list_audio(dev_dir) if not r.get("long_form")]
    out = list(clips)
    rng = np.random.default_rng(0)
    while len(out) < count:
        out.append(augment_waveform(clips[len(out) % len(clips)], ("speed", "noise"), rng))
    return out[:count]


def run(args):
    if args.arm == "workspace":
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from lite_whisper import enable_fast_generation
    from lite_whisper.whisper_base import whisper_base_path

    if args.arm == "noreduced":
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    path = whisper_base_path()
    processor = WhisperProcessor.from_pretrained(path)
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float16).to("cuda").eval()
    if args.arm != "eager":
        model = enable_fast_generation(model)
    audio = inputs(args.dev_dir, args.inputs)
    tokens = []
    with torch.no_grad():
        for start in range(0, len(audio), args.batch_size):
            features = processor.feature_extractor(audio[start:start + args.batch_size], sampling_rate=16000,
                                                   return_tensors="pt").input_features.to("cuda", torch.float16)
            ids = model.generate(input_features=features, language="en", task="transcribe", max_new_tokens=128)
            tokens.extend(row[row != processor.tokenizer.pad_token_id].tolist() for row in ids.cpu())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"arm": args.arm, "inputs": len(audio), "tokens": tokens,
                                          "device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    print(f"{args.arm}: {len(tokens)} transcripts -> {args.out}")


def files(args):
    import numpy as np

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, clip in enumerate(inputs(args.dev_dir, args.inputs)):
        np.save(out / f"input{i:05d}.npy", clip)
        rows.append(json.dumps({"id": f"input{i:05d}", "audio": f"input{i:05d}.npy"}))
    (out / "manifest.jsonl").write_text("\n".join(rows) + "\n")  # .npy inputs are taken from manifests
    print(f"{args.inputs} inputs -> {out}/manifest.jsonl")


def compare_transcripts(args):
    def texts(folder):
        rows = [json.loads(line) for line in (Path(folder) / "transcripts.jsonl").read_text().splitlines() if line]
        return {r.get("key") or r.get("file"): r.get("text") for r in rows}

    a, b = texts(args.a), texts(args.b)
    differ = sorted(k for k in a if a[k] != b.get(k))
    print(json.dumps({"files": len(a), "differ": len(differ), "examples": differ[:10]}, indent=1))


def compare(args):
    runs = [json.loads(Path(p).read_text()) | {"path": p} for p in args.files]
    by_arm = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    result = {}
    for arm, rs in by_arm.items():
        for a, b in zip(rs, rs[1:]):
            differ = sum(x != y for x, y in zip(a["tokens"], b["tokens"]))
            result[f"{arm}: {Path(a['path']).name} vs {Path(b['path']).name}"] = f"{differ}/{len(a['tokens'])} differ"
    base = by_arm.get("default", [None])[0]
    for arm, rs in by_arm.items():
        if base is not None and arm != "default":
            differ = sum(x != y for x, y in zip(base["tokens"], rs[0]["tokens"]))
            result[f"default vs {arm}"] = f"{differ}/{len(base['tokens'])} differ"
    print(json.dumps(result, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--arm", choices=ARMS, default="default")
    p.add_argument("--inputs", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dev-dir", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "eval" / "dev"))
    p.add_argument("--out", required=True)
    p = sub.add_parser("compare")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("files")
    p.add_argument("--inputs", type=int, default=1024)
    p.add_argument("--dev-dir", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "eval" / "dev"))
    p.add_argument("--out", required=True)
    p = sub.add_parser("compare-transcripts")
    p.add_argument("a")
    p.add_argument("b")
    args = parser.parse_args(argv)
    return {"run": run, "compare": compare, "files": files, "compare-transcripts": compare_transcripts}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
