"""FLOP estimate of the default conversion for a Whisper encoder size (an estimate, not a measurement).

    python benchmarks/flops_estimate.py --model large-v3 --frames 58624 --tflops 30

`--frames` is the number of encoder frames of the calibration inputs after cutting and cropping (the report's
`calibration.encoder_frames`; 58624 for the bundled set with the defaults); `--tflops` the sustained fp32 matmul rate
assumed (an H100 does ~60 TFLOP/s dense fp32 without TF32; 30 allows for small GEMMs and overheads). Counts the
statistics pass (forward + float64 moment accumulation), the refinement (forward and backward of the student, ~3x a
forward, on `steps x batch` inputs of the average crop length) and the eigendecompositions (rough, 10 n^3 each).
"""

import argparse

SIZES = {  # d_model, layers, ffn
    "base": (512, 6, 2048),
    "small": (768, 12, 3072),
    "medium": (1024, 24, 4096),
    "large-v3": (1280, 32, 5120),
}


def estimate(d, layers, ffn, frames, inputs, steps, batch, size=0.8, mels=128):
    crop = frames / inputs
    projections = 2 * (4 * d * d + 2 * d * ffn)  # FLOPs per frame per layer
    attention = 2 * 2 * crop * d  # QK^T and AV per frame per layer
    stem = 2 * 3 * mels * d * 2 + 2 * 3 * d * d  # conv1 (2 mel frames per encoder frame) and conv2
    forward = layers * (projections + attention) + stem
    statistics = frames * (forward + layers * 6 * 2 * d * d)  # + sum of outer products per recorded projection
    refinement = steps * batch * crop * 3 * (layers * (size * projections + attention) + stem)
    eigh = layers * 7 * 10 * d**3  # 6 spectra per layer, fc1 through two d x d problems
    return {"statistics": statistics, "refinement": refinement, "eigh": eigh}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="large-v3", choices=sorted(SIZES))
    parser.add_argument("--frames", type=int, default=58624)
    parser.add_argument("--inputs", type=int, default=116)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tflops", type=float, default=30.0)
    args = parser.parse_args()
    d, layers, ffn = SIZES[args.model]
    parts = estimate(d, layers, ffn, args.frames, args.inputs, args.steps, args.batch,
                     mels=128 if args.model == "large-v3" else 80)
    total = sum(parts.values())
    for name, flops in parts.items():
        print(f"{name:>12}: {flops / 1e12:8.1f} TFLOP  ~{flops / (args.tflops * 1e12):6.1f} s")
    print(f"{'total':>12}: {total / 1e12:8.1f} TFLOP  ~{total / (args.tflops * 1e12):6.1f} s at {args.tflops:g} TFLOP/s"
          " (estimate; plus model download/load, audio decoding and writing)")


if __name__ == "__main__":
    main()
