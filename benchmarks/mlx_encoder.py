"""Time the MLX Whisper encoder, original vs low-rank, in one run, and print the speed-up as a ratio.

Two comparisons:

* whisper-base (real weights, `lite_whisper.whisper_base`): the original encoder against the same encoder with every
  projection truncated by SVD to `--rank` (default 128), factors computed here with numpy, so no torch is needed.
* `--large-v3` (optional, needs about 4.5 GB of memory): a Whisper large-v3-shaped encoder with random weights,
  full rank against the rank profile in ../shared/bench/large_v3_profile.json (shaped like the published
  lite-whisper-large-v3 encoder).

The encoder always takes a 30 s window (3000 log-mel frames), so its cost does not depend on the audio; the input
is random. Runs of the two models alternate (A B A B ...) so that a busy machine slows both alike, and the median
of `--repeats` runs after `--warmup` unmeasured ones is reported.

    python benchmarks/mlx_encoder.py --repeats 5
    python benchmarks/mlx_encoder.py --skip-base --large-v3 --repeats 2 --warmup 0
"""

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("benchmarks.mlx_encoder")

DEFAULT_PROFILE = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "large_v3_profile.json"
KEYS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def truncate_encoder(model, rank):
    """Replace every encoder projection of an MLX model by its rank-`rank` SVD factors (in place)."""
    import mlx.core as mx

    from lite_whisper.mlx_port.modeling import LowRankLinear, _set_encoder_projection, encoder_projection

    for layer in range(len(model.encoder.blocks)):
        for key in KEYS:
            linear = encoder_projection(model, layer, key)
            weight = np.array(linear.weight, dtype=np.float64).T  # in x out, so that y = x @ weight + b
            u, s, vh = np.linalg.svd(weight, full_matrices=False)
            k = min(rank, len(s))
            module = LowRankLinear(weight.shape[0], weight.shape[1], k)
            module.weight1 = mx.array((u[:, :k] * s[:k]).astype(np.float32))
            module.weight2 = mx.array(vh[:k].astype(np.float32))
            bias = linear.bias if "bias" in linear else mx.zeros((weight.shape[1],))
            module.bias = bias
            _set_encoder_projection(model, layer, key, module)
    model.encoder.set_dtype(model.dtype)
    mx.eval(model.encoder.parameters())
    return model


def random_encoder(base, low_rank_config, dtype):
    """A Whisper encoder of the profile's dimensions with random weights (decoder kept tiny: it is not timed)."""
    import mlx.core as mx
    from mlx_whisper.whisper import ModelDimensions

    from lite_whisper.mlx_port.modeling import LiteWhisperMLX, LowRankLinear

    dims = ModelDimensions(
        n_mels=base["num_mel_bins"],
        n_audio_ctx=base["max_source_positions"],
        n_audio_state=base["d_model"],
        n_audio_head=base["encoder_attention_heads"],
        n_audio_layer=base["encoder_layers"],
        n_vocab=51866,
        n_text_ctx=8,
        n_text_state=64,
        n_text_head=1,
        n_text_layer=1,
    )
    model = LiteWhisperMLX(dims, low_rank_config, encoder_ffn_dim=base["encoder_ffn_dim"], dtype=dtype)
    for block in model.encoder.blocks:
        for module in (block.attn.query, block.attn.key, block.attn.value, block.attn.out, block.mlp1, block.mlp2):
            if isinstance(module, LowRankLinear):
                # Factors whose product has entries of about 0.02, like the full-rank init.
                scale = (0.02 / module.rank**0.5) ** 0.5
                module.weight1 = mx.random.normal(module.weight1.shape) * scale
                module.weight2 = mx.random.normal(module.weight2.shape) * scale
    model.encoder.set_dtype(dtype)
    mx.eval(model.encoder.parameters())
    return model


def time_pair(models, n_mels, repeats, warmup, dtype):
    """Median seconds per encoder forward for each model, runs interleaved."""
    import mlx.core as mx

    mx.random.seed(0)
    mel = mx.random.normal((1, 3000, n_mels)).astype(dtype)
    mx.eval(mel)
    times = {name: [] for name in models}
    for step in range(warmup + repeats):
        for name, model in models.items():
            start = time.perf_counter()
            mx.eval(model.encoder(mel))
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[name].append(elapsed)
            logger.info(f"{name}: {elapsed:.2f} s{' (warm-up)' if step < warmup else ''}")
    return {name: statistics.median(values) for name, values in times.items()}, times


def machine_description():
    import mlx.core as mx

    from lite_whisper.mlx_port.backend import _blas_state

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    version = getattr(mx, "__version__", "?")
    return {
        "device": str(mx.default_device()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "mlx": version,
        "blas": _blas_state["library"] or "bundled",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=128, help="truncation rank for whisper-base (default 128)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--skip-base", action="store_true", help="skip the whisper-base comparison")
    parser.add_argument("--large-v3", action="store_true", help="also time the large-v3-shaped random encoder")
    parser.add_argument("--profile", default=str(DEFAULT_PROFILE), help="rank profile JSON for --large-v3")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from lite_whisper.mlx_port.modeling import load_model, parse_dtype

    dtype = parse_dtype(args.dtype)
    results = {"machine": machine_description(), "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup}

    if not args.skip_base:
        from lite_whisper.whisper_base import whisper_base_path

        original = load_model(whisper_base_path(), dtype=dtype)
        low_rank = truncate_encoder(load_model(whisper_base_path(), dtype=dtype), args.rank)
        medians, runs = time_pair({"original": original, "low_rank": low_rank}, original.dims.n_mels, args.repeats, args.warmup, dtype)
        results["whisper_base"] = {
            "rank": args.rank,
            "encoder_params": {"original": original.encoder_parameter_count(), "low_rank": low_rank.encoder_parameter_count()},
            "seconds": medians,
            "runs": runs,
            "speedup": medians["original"] / medians["low_rank"],
        }
        del original, low_rank

    if args.large_v3:
        with open(args.profile, encoding="utf-8") as handle:
            profile = json.load(handle)
        base = profile["base"]
        models = {
            "original": random_encoder(base, None, dtype),
            "low_rank": random_encoder(base, profile["low_rank_config"], dtype),
        }
        medians, runs = time_pair(models, base["num_mel_bins"], args.repeats, args.warmup, dtype)
        results["large_v3_shape"] = {
            "profile": str(args.profile),
            "encoder_params": {name: model.encoder_parameter_count() for name, model in models.items()},
            "seconds": medians,
            "runs": runs,
            "speedup": medians["original"] / medians["low_rank"],
        }

    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    machine = results["machine"]
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['os']}, mlx {machine['mlx']} "
        f"({machine['device']}, BLAS: {machine['blas']}), {args.dtype}, median of {args.repeats}"
    )
    for name in ("whisper_base", "large_v3_shape"):
        if name in results:
            row = results[name]
            params = row["encoder_params"]
            print(
                f"{name}: original {row['seconds']['original']:.2f} s, low-rank {row['seconds']['low_rank']:.2f} s "
                f"per 30 s window -> {row['speedup']:.2f}x faster "
                f"(encoder params {params['original'] / 1e6:.1f}M -> {params['low_rank'] / 1e6:.1f}M)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
