"""Wall time of a default conversion at large-v3's shape on one GPU (issue 11: "large-v3 in under 10 minutes").

Random weights at large-v3's encoder/decoder shape (128 mel bins, d_model 1280, 32 + 32 layers): accuracy means
nothing here, but every stage does the same work as on the real checkpoint (the statistics pass over the bundled
calibration set and its augmented copies, 192 eigendecompositions, the refinement when the size asks for it).
Model loading from disk is not included (a few seconds for 3 GB of fp16 safetensors).

    python benchmarks/convert_time.py --device cuda --target 0.8 0.65 --output OUT/convert_time_large_v3.json
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def large_v3(dtype=torch.float32):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
                           encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
                           decoder_ffn_dim=5120, vocab_size=51866, max_source_positions=1500, max_target_positions=448)
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).to(dtype).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--target", type=float, nargs="+", default=[0.8])
    parser.add_argument("--output", default="benchmarks/results/convert_time_large_v3.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import WhisperFeatureExtractor

    from lite_whisper.compress import CompressionSettings, compress
    from lite_whisper.convert import load_calibration_audio

    device = torch.device(args.device)
    model = large_v3()
    feature_extractor = WhisperFeatureExtractor(feature_size=128)
    calibration = load_calibration_audio(None, 100)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "shape": "large-v3 (random weights)", "runs": []}
    for target in args.target:
        clock = time.perf_counter()
        result = compress(model, calibration.audio, feature_extractor, CompressionSettings(target_size=target),
                          device=device, progress=False)
        wall = time.perf_counter() - clock
        run = {"target_size": target, "wall_s": round(wall, 1), "timings_s": result.report["timings_s"],
               "refine_steps": result.report["refinement"]["steps"], "encoder_fraction": result.report["encoder_fraction"]}
        results["runs"].append(run)
        logging.info("%s", run)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
        del result
        torch.cuda.empty_cache() if device.type == "cuda" else None


if __name__ == "__main__":
    main()
