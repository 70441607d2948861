"""End-to-end transcription latency on CUDA: eager generate() vs the fast path (static KV cache + CUDA graphs).

Subcommands:
  floor     (anywhere) bytes and FLOPs of one decoder step per batch size and the ideal per-token time on a card.
  bench     (GPU) random weights at Whisper turbo shape (32 encoder / 4 decoder layers) and large-v3 shape (32 / 32),
            LiteWhisper at the ranks of benchmarks/large_v3_profile.json: original eager `generate()` vs original
            on the fast path vs LiteWhisper (kernels) on the fast path; batch 1/8/16/32, 30 s windows, a fixed number
            of new tokens (min_new_tokens = max_new_tokens), fp16/bf16. Seconds per batch, RTFx, encoder/decoder
            shares, per-step decoder time against the floor, peak GPU memory. JSON (+ PNG) under --out.
  prepare   (CPU) whisper-base (fp16 safetensors, split in parts that fit a device call) and dev audio into
            .bench_carry/ for `real`.
  real      (GPU) real whisper-base on dev clips: fast path vs eager, token for token (fp32) and transcript for
            transcript (fp16, WER), short clips and long-form; the ASR pipeline timed end to end (features included).

Timing: CUDA events / synchronised wall clock, median of --reps after warm-up (the first call captures the graphs).
"""

import argparse
import itertools
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("e2e_latency")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROFILE = HERE / "large_v3_profile.json"
CARRY = ROOT / ".bench_carry" / "e2e"
SHAPES = {"turbo": 4, "large-v3": 32}  # decoder layers; the encoder is large-v3's in both
WINDOW_S = 30.0
# whisper-base's generation config (ids of <|en|>, <|transcribe|>, ...), valid in the 51866-token v3 vocabulary
GENERATION_CONFIG = HERE / "whisper_generation_config.json"


# --- the floor ----------------------------------------------------------------------------------------------------


def decoder_step_cost(d_model, layers, ffn, vocab, batch, position, frames=1500, itemsize=2):
    """(bytes, flops) of one greedy decoder step: every weight read once, the self-attention cache up to `position`
    and the cross-attention keys/values of every row read once, logits written once."""
    per_layer = 4 * d_model * d_model + 2 * d_model * d_model + 2 * d_model * ffn  # self q/k/v/o, cross q/o, fc1/fc2
    weights = layers * per_layer + vocab * d_model
    cache = layers * 2 * (position + frames) * d_model * batch
    bytes_ = (weights + cache) * itemsize + batch * vocab * 4
    flops = 2 * batch * weights + 4 * batch * layers * d_model * (position + frames)
    return bytes_, flops


def floor_table(bandwidth, peak_flops, batches=(1, 8, 16, 32), position=52):
    rows = []
    for shape, layers in SHAPES.items():
        for batch in batches:
            bytes_, flops = decoder_step_cost(1280, layers, 5120, 51866, batch, position)
            ideal = max(bytes_ / bandwidth, flops / peak_flops)
            rows.append({"shape": shape, "batch": batch, "MB": bytes_ / 1e6, "GFLOP": flops / 1e9,
                         "ideal_us": ideal * 1e6, "bound": "bytes" if bytes_ / bandwidth > flops / peak_flops else "flops"})
    return rows


def measure_ceilings():
    """Achieved copy bandwidth (read + write) and fp16 matmul rate on this card."""
    n = 1 << 28  # 512 MiB of fp16
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    bw = 2 * a.numel() * 2 / (time_cuda(lambda: b.copy_(a), 3, 10) / 1e3)
    x = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    y = torch.randn_like(x)
    flops = 2 * 8192**3 / (time_cuda(lambda: x @ y, 3, 10) / 1e3)
    del a, b, x, y
    torch.cuda.empty_cache()
    return bw, flops


def time_cuda(fn, warmup, reps):
    """Median milliseconds of fn() with CUDA events (the encoder benchmark's timer)."""
    sys.path.insert(0, str(HERE))
    from encoder_latency import time_fn

    return time_fn(fn, warmup, reps)[0]


def card_name():
    name = torch.cuda.get_device_name()
    return "H200" if "H200" in name else "H100" if "H100" in name else name


# --- synthetic benchmark ------------------------------------------------------------------------------------------


def build(shape, dtype):
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    from lite_whisper import LiteWhisperConfig, LiteWhisperForConditionalGeneration, enable_fast_generation

    profile = json.loads(PROFILE.read_text())
    base = dict(profile["base"])
    common = dict(base, decoder_layers=SHAPES[shape], decoder_attention_heads=base["encoder_attention_heads"],
                  decoder_ffn_dim=base["encoder_ffn_dim"], vocab_size=51866, max_target_positions=448)
    generation_config = GenerationConfig.from_pretrained(GENERATION_CONFIG.parent, GENERATION_CONFIG.name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        original = WhisperForConditionalGeneration(WhisperConfig(**common)).to(dtype).eval()
        lite = LiteWhisperForConditionalGeneration(
            LiteWhisperConfig(low_rank_config=profile["low_rank_config"], **common)).to(dtype).eval()
    for model in (original, lite):
        model.generation_config = generation_config
    enable_fast_generation(original)
    return original, lite


def timed_generate(model, features, tokens, reps):
    def run():
        return model.generate(features, language="en", task="transcribe", min_new_tokens=tokens,
                              max_new_tokens=tokens)

    from lite_whisper import fast_generation

    first = time.perf_counter()
    out = run()  # captures graphs, compiles
    first = time.perf_counter() - first
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, steps = [], []
    for _ in range(reps):
        fast_generation.last_loop.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if fast_generation.last_loop:
            steps.append(fast_generation.last_loop["seconds"] / max(1, fast_generation.last_loop["steps"]))
    loop_step = statistics.median(steps) if steps else None
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30, out, loop_step, first


def encoder_time(model, features, fast):
    from lite_whisper import fast_generation

    model.set_fast_generation(fast)
    with torch.no_grad(), fast_generation.generation_context(model):
        return time_cuda(lambda: model.model.encoder(features), 2, 10) / 1e3


def bench(args):
    from lite_whisper.kernels import attention  # noqa: F401  (fail early if the kernels do not import)

    bandwidth, peak = measure_ceilings()
    card = card_name()
    results = {"card": card, "torch": torch.__version__, "bandwidth_TBps": bandwidth / 1e12,
               "matmul_TFLOPs": peak / 1e12, "runs": [], "floor": floor_table(bandwidth, peak)}
    import transformers

    results["transformers"] = transformers.__version__
    logger.info("%s: copy %.2f TB/s, fp16 matmul %.0f TFLOP/s", card, bandwidth / 1e12, peak / 1e12)
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            original, lite = build(shape, dtype)
            for batch in args.batches:
                features = torch.randn(batch, 128, 3000, device="cuda", dtype=dtype)
                encoder = {"original_eager": encoder_time(original, features, False),
                           "original_fast": encoder_time(original, features, True),
                           "lite_fast": encoder_time(lite, features, True)}
                encoder["original_fast_compiled"] = encoder["original_fast"]
                encoder["lite_fast_compiled"] = encoder["lite_fast"]
                for tokens in args.tokens:
                    compiles = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
                    steps = {"kernels": [True], "pytorch": [False], "both": [True, False]}[args.step]
                    variants = []
                    for compiled, kernels in itertools.product(compiles, steps):
                        suffix = "_compiled" if compiled and args.compile == "both" else ""
                        suffix += "_pytorch_step" if not kernels and args.step == "both" else ""
                        variants += [("original_fast" + suffix, original, True, compiled, kernels),
                                     ("lite_fast" + suffix, lite, True, compiled, kernels)]
                    if tokens in args.eager_tokens:
                        variants.insert(0, ("original_eager", original, False, False, False))
                    outputs = {}
                    for name, model, fast, compiled, kernels in variants:
                        model._lw_fast_compile = compiled
                        model._lw_decode_kernels = kernels
                        model.set_fast_generation(fast)
                        seconds, memory, outputs[name], loop_step, first = timed_generate(
                            model, features, tokens, args.reps)
                        row = {"shape": shape, "dtype": dtype_name, "batch": batch, "new_tokens": tokens,
                               "variant": name, "seconds": seconds, "rtfx": batch * WINDOW_S / seconds,
                               "encoder_s": encoder[name.replace("_pytorch_step", "")],
                               "encoder_share": encoder[name.replace("_pytorch_step", "")] / seconds,
                               "peak_GiB": memory, "first_call_s": first}
                        if loop_step is not None:
                            row["loop_step_us"] = loop_step * 1e6
                        if name == "original_fast" and "original_eager" in outputs:
                            # Same weights, same greedy rule: the fraction of rows whose tokens agree with eager.
                            a, b = outputs["original_eager"], outputs[name]
                            row["rows_equal_to_eager"] = (
                                float((a == b).all(dim=1).float().mean()) if a.shape == b.shape else 0.0)
                        results["runs"].append(row)
                        logger.info("%s", row)
                    torch.cuda.empty_cache()
            del original, lite
            torch.cuda.empty_cache()
    summarise(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"e2e_{card.lower()}.json"
    path.write_text(json.dumps(results, indent=1))
    print_table(results)
    try:
        plot(results, out / f"e2e_{card.lower()}.png")
    except ImportError:
        pass


def summarise(results):
    """Per-step decoder time from the slope between token counts, next to the floor; speedups."""
    runs = results["runs"]
    index = {(r["shape"], r["dtype"], r["batch"], r["new_tokens"], r["variant"]): r for r in runs}
    floors = {(f["shape"], f["batch"]): f["ideal_us"] for f in results["floor"]}
    summary = []
    for (shape, dtype, batch, tokens, variant), row in index.items():
        entry = {"shape": shape, "dtype": dtype, "batch": batch, "new_tokens": tokens, "variant": variant}
        counts = sorted(t for (s, d, b, t, v) in index if (s, d, b, v) == (shape, dtype, batch, variant))
        if len(counts) >= 2:
            lo, hi = index[(shape, dtype, batch, counts[0], variant)], index[(shape, dtype, batch, counts[-1], variant)]
            step = (hi["seconds"] - lo["seconds"]) / (counts[-1] - counts[0])
            entry["step_us"] = step * 1e6
            if (shape, batch) in floors:
                entry["floor_us"] = floors[(shape, batch)]
                entry["step_over_floor"] = step * 1e6 / floors[(shape, batch)]
        eager = index.get((shape, dtype, batch, tokens, "original_eager"))
        like = "original_fast" + variant[len("lite_fast"):] if variant.startswith("lite_fast") else "original_fast"
        like = variant if variant.startswith("original_fast") else like
        orig_fast = index.get((shape, dtype, batch, tokens, like))
        if eager:
            entry["vs_original_eager"] = eager["seconds"] / row["seconds"]
        if orig_fast:
            entry["vs_original_fast"] = orig_fast["seconds"] / row["seconds"]
        summary.append(entry)
    results["summary"] = summary


def print_table(results):
    print(f"card {results['card']}, torch {results['torch']}, transformers {results.get('transformers')}, "
          f"copy {results['bandwidth_TBps']:.2f} TB/s, matmul {results['matmul_TFLOPs']:.0f} TFLOP/s")
    print("shape     dtype     batch tokens variant          seconds   RTFx  enc%  step_us loop_us floor_us x_eager "
          "x_origfast first_s")
    rows = {(r["shape"], r["dtype"], r["batch"], r["new_tokens"], r["variant"]): r for r in results["runs"]}
    for s in results["summary"]:
        r = rows[(s["shape"], s["dtype"], s["batch"], s["new_tokens"], s["variant"])]
        print(f"{s['shape']:9} {s['dtype']:9} {s['batch']:5} {s['new_tokens']:6} {s['variant']:16} "
              f"{r['seconds']:7.4f} {r['rtfx']:6.0f} {100 * r['encoder_share']:4.0f} "
              f"{s.get('step_us', float('nan')):8.1f} {r.get('loop_step_us', float('nan')):7.1f} "
              f"{s.get('floor_us', float('nan')):8.1f} "
              f"{s.get('vs_original_eager', float('nan')):7.2f} {s.get('vs_original_fast', float('nan')):7.2f} "
              f"{r['first_call_s']:7.2f}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["shape"], r["dtype"], r["new_tokens"]) for r in results["runs"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, (shape, dtype, tokens) in zip(axes[0], keys):
        colors = {"original_eager": "tab:gray", "original_fast": "tab:blue", "lite_fast": "tab:orange",
                  "original_fast_compiled": "tab:cyan", "lite_fast_compiled": "tab:red"}
        for variant, color in colors.items():
            points = sorted((r["batch"], r["rtfx"]) for r in results["runs"]
                            if (r["shape"], r["dtype"], r["new_tokens"], r["variant"]) == (shape, dtype, tokens, variant))
            if points:
                ax.plot(*zip(*points), marker="o", label=variant, color=color)
        ax.set_title(f"{shape} {dtype} {tokens} tok", fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel("RTFx (audio s / wall s)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    for ax in axes[0]:
        ax.legend(fontsize=6)
    fig.suptitle(f"end-to-end generate(), {results['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- real weights -------------------------------------------------------------------------------------------------


def prepare(args):
    """whisper-base as fp16 safetensors split in `--parts`, its config/processor files, and dev audio."""
    from safetensors.torch import save_file
    from transformers import WhisperForConditionalGeneration

    from lite_whisper.whisper_base import whisper_base_path

    source = Path(whisper_base_path())
    CARRY.mkdir(parents=True, exist_ok=True)
    model = WhisperForConditionalGeneration.from_pretrained(source)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items() if k != "proj_out.weight"}
    blob_path = CARRY.parent / "whisper-base-fp16.safetensors"
    save_file(state, str(blob_path))
    blob = blob_path.read_bytes()
    size = -(-len(blob) // args.parts)
    for i in range(args.parts):
        (CARRY.parent / f"weights.part{i}").write_bytes(blob[i * size:(i + 1) * size])
    blob_path.unlink()
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "vocab.json", "merges.txt"):
        (CARRY / name).write_bytes((source / name).read_bytes())
    dev = Path(args.dev)
    rows = [json.loads(line) for line in (dev / "manifest.jsonl").read_text().splitlines() if line.strip()]
    audio_dir = CARRY.parent / "audio"
    audio_dir.mkdir(exist_ok=True)
    keep = []
    for row in rows:
        if row["id"].startswith("real_") or row.get("long_form") or (len(keep) < args.max_clips):
            (audio_dir / Path(row["audio"]).name).write_bytes((dev / row["audio"]).read_bytes())
            keep.append(dict(row, audio=Path(row["audio"]).name))
    (audio_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    print(f"wrote {args.parts} weight parts of {size / 2**20:.1f} MiB and {len(keep)} clips under {CARRY.parent}")


def real(args):
    import numpy as np
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

    from lite_whisper import enable_fast_generation

    folder = Path(args.model)
    processor = WhisperProcessor.from_pretrained(folder)
    manifest = Path(args.audio) / "manifest.jsonl"
    if not manifest.is_file():
        manifest = Path(args.audio) / "once.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    audio = {}
    for row in rows:
        path = Path(args.audio) / row["audio"]
        if path.suffix == ".npy":  # 16 kHz int16, as benchmarks/transcribe_throughput.py prepares it
            audio[row["id"]] = np.load(path).astype(np.float32) / 32768.0
            continue
        import soundfile

        data, rate = soundfile.read(str(path), dtype="float32")
        assert rate == 16000
        audio[row["id"]] = data
    short = [r for r in rows if not r.get("long_form") and r["duration_s"] <= 30]
    long = [r for r in rows if r.get("long_form") or r["duration_s"] > 30]
    results = {"card": card_name(), "clips_short": len(short), "clips_long": len(long)}

    def transcribe(model, clip_rows, batch=args.batch_size, **kwargs):
        out = []
        for i in range(0, len(clip_rows), batch):
            chunk = [audio[r["id"]] for r in clip_rows[i:i + batch]]
            feats = processor(chunk, sampling_rate=16000, return_tensors="pt")
            ids = model.generate(feats.input_features.to("cuda", model.dtype), language="en", task="transcribe",
                                 **kwargs)
            out.extend(ids.cpu().tolist())
        return out

    for dtype_name in ("float32", "float16"):
        dtype = getattr(torch, dtype_name)
        model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=dtype).to("cuda").eval()
        enable_fast_generation(model)
        entry = {}
        for name, kwargs in (() if args.pipeline_only else (("short", {}), ("short_timestamps", {"return_timestamps": True}))):
            model.set_fast_generation(False)
            eager = transcribe(model, short, **kwargs)
            model.set_fast_generation(True)
            fast = transcribe(model, short, **kwargs)
            same = sum(a == b for a, b in zip(eager, fast))
            texts_e = processor.batch_decode(eager, skip_special_tokens=True)
            texts_f = processor.batch_decode(fast, skip_special_tokens=True)
            refs = [r["text"] for r in short]
            # WER is scored afterwards on the CPU machine (`score`), which has jiwer.
            entry[name] = {"identical_tokens": same, "of": len(short),
                           "identical_text": sum(a == b for a, b in zip(texts_e, texts_f)),
                           "refs": refs, "texts_eager": texts_e, "texts_fast": texts_f}
        # Long-form: sequential decoding with timestamps over whole clips.
        longs = {False: [], True: []}
        for fast in (() if args.pipeline_only else (False, True)):
            model.set_fast_generation(fast)
            outs = []
            for r in long:
                feats = processor(audio[r["id"]], sampling_rate=16000, return_tensors="pt", truncation=False,
                                  padding="longest", return_attention_mask=True)
                res = model.generate(feats.input_features.to("cuda", dtype), attention_mask=feats.attention_mask.to("cuda"),
                                     language="en", task="transcribe", return_timestamps=True, return_segments=True)
                segs = [(round(float(s["start"]), 2), round(float(s["end"]), 2), processor.decode(s["tokens"], skip_special_tokens=True))
                        for s in res["segments"][0]]
                outs.append(segs)
            longs[fast] = outs
        entry["long_form_identical"] = sum(a == b for a, b in zip(longs[False], longs[True]))
        entry["long_form_of"] = len(long)
        # The pipeline, end to end (features included), eager vs fast, on every clip; interleaved, best of 3.
        arrays = [audio[r["id"]] for r in rows]
        asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                       feature_extractor=processor.feature_extractor, device="cuda", dtype=dtype)
        # num_beams=1: for Whisper the ASR pipeline defaults to 5 beams, which always decode eagerly.
        kw = dict(batch_size=16, chunk_length_s=30,
                  generate_kwargs={"language": "en", "task": "transcribe", "num_beams": 1})
        timing = {"eager": {"seconds": float("inf")}, "fast": {"seconds": float("inf")}}
        for fast in (False, True):
            model.set_fast_generation(fast)
            asr(arrays[:16], **kw)  # warm-up (graph capture)
        for _ in range(3):
            for fast in (False, True):
                model._lw_fast_generation = fast  # switch without dropping the captured graphs
                torch.cuda.synchronize()
                start = time.perf_counter()
                texts = [o["text"] for o in asr(arrays, **kw)]
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                name = "fast" if fast else "eager"
                if seconds < timing[name]["seconds"]:
                    timing[name] = {"seconds": seconds, "rtfx": sum(r["duration_s"] for r in rows) / seconds,
                                    "texts": texts}
        entry["pipeline_same_text"] = sum(a == b for a, b in zip(timing["eager"]["texts"], timing["fast"]["texts"]))
        entry["pipeline_of"] = len(rows)
        entry["pipeline_eager_s"] = timing["eager"]["seconds"]
        entry["pipeline_fast_s"] = timing["fast"]["seconds"]
        entry["pipeline_speedup"] = timing["eager"]["seconds"] / timing["fast"]["seconds"]
        entry["pipeline_rtfx_fast"] = timing["fast"]["rtfx"]
        results[dtype_name] = entry
        print(dtype_name, json.dumps(entry, indent=1))
        del model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"e2e_real_{results['card'].lower()}.json").write_text(json.dumps(results, indent=1))


def score(args):
    from lite_whisper.text import wer_scores

    results = json.loads(Path(args.json).read_text())
    for dtype_name in ("float32", "float16"):
        for name in ("short", "short_timestamps"):
            entry = results.get(dtype_name, {}).get(name)
            if not entry:
                continue
            eager = wer_scores(entry["refs"], entry["texts_eager"])["wer"]
            fast = wer_scores(entry["refs"], entry["texts_fast"])["wer"]
            print(f"{dtype_name} {name}: identical tokens {entry['identical_tokens']}/{entry['of']}, identical text "
                  f"{entry['identical_text']}/{entry['of']}, corpus WER eager {eager:.2f} fast {fast:.2f}")


def profile(args):
    """Kernel table of one decoder step (run eagerly, so the profiler sees each kernel) and the graph replay time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from lite_whisper import fast_generation

    dtype = getattr(torch, args.dtype)
    original, lite = build(args.shape, dtype)
    del lite
    model = original
    model.set_fast_generation(True)
    for batch in args.batches:
        features = torch.randn(batch, 128, 3000, device="cuda", dtype=dtype)
        model.generate(features, language="en", task="transcribe", min_new_tokens=40, max_new_tokens=40)
        state = next(iter(model._lw_decoder_states.values()))
        program = next(iter(state.programs.values()))
        span, graph = next((key[0], g) for key, g in state.graphs.items() if key[1] == program.signature)
        replay_ms = time_cuda(graph.replay, 5, 50)
        with torch.no_grad():
            for _ in range(3):
                state._step_body(program, span)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    state._step_body(program, span)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
        total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 10
        count = sum(e.count for e in events) / 10
        print(f"batch {batch}: graph replay {replay_ms * 1e3:.0f} us; eager body: {count:.0f} kernels, "
              f"{total:.0f} us of kernel time per step")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
        fast_generation.set_fast_generation(model, True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("floor", help="bytes/FLOPs floor of a decoder step")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s (default: H100 3.0e12)")
    p.add_argument("--flops", type=float, default=790e12, help="FLOP/s (default: 790e12)")
    p = sub.add_parser("bench", help="synthetic end-to-end benchmark (GPU)")
    p.add_argument("--shapes", nargs="+", default=["turbo", "large-v3"], choices=sorted(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 32])
    p.add_argument("--tokens", nargs="+", type=int, default=[32, 96, 224])
    p.add_argument("--eager-tokens", nargs="+", type=int, default=[96], help="token counts that also time eager")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile", choices=["on", "off", "both"], default="off",
                   help="torch.compile the decoder layer inside the graph (with 'both', a _compiled suffix)")
    p.add_argument("--step", choices=["kernels", "pytorch", "both"], default="kernels",
                   help="decoder step on lite_whisper.kernels.decode (half precision) or on PyTorch ops")
    p.add_argument("--out", default="benchmarks/results/cuda")
    p = sub.add_parser("prepare", help="carry whisper-base and dev audio to the device (CPU)")
    p.add_argument("--parts", type=int, default=3)
    p.add_argument("--dev", default=str(ROOT.parent / "shared" / "eval" / "dev"))
    p.add_argument("--max-clips", type=int, default=160, help="dev clips to carry besides the real and long ones")
    p = sub.add_parser("profile", help="kernel table of one decoder step (GPU)")
    p.add_argument("--shape", default="turbo", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--rows", type=int, default=25)
    p = sub.add_parser("plot", help="PNG from a JSON written by `bench`")
    p.add_argument("json")
    p = sub.add_parser("score", help="WER of the transcripts a `real` run saved (CPU)")
    p.add_argument("json")
    p = sub.add_parser("real", help="real whisper-base: exactness and pipeline timing (GPU)")
    p.add_argument("--model", required=True)
    p.add_argument("--audio", required=True)
    p.add_argument("--pipeline-only", action="store_true", help="skip the exactness checks")
    p.add_argument("--batch-size", type=int, default=16, help="generate() batch of the exactness checks")
    p.add_argument("--out", default="benchmarks/results/cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "floor":
        for row in floor_table(args.bandwidth, args.flops):
            print(row)
    elif args.command == "bench":
        bench(args)
    elif args.command == "prepare":
        prepare(args)
    elif args.command == "profile":
        profile(args)
    elif args.command == "plot":
        plot(json.loads(Path(args.json).read_text()), Path(args.json).with_suffix(".png"))
    elif args.command == "score":
        score(args)
    else:
        real(args)


if __name__ == "__main__":
    sys.exit(main())
