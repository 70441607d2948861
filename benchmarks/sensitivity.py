"""Where does compression hurt? Real-speech WER with only some encoder projections low-rank.

One conversion (given settings, default target 0.8 without refinement), then for each variant the projections
outside the variant are put back to the original dense weights and the model is scored on the dev set's real and
synthetic clips (as benchmarks/defaults.py scores them). Variants: one encoder layer at a time, one projection
kind across all layers, attention only, MLP only, early and late halves. Each row also gives the share of the
encoder that variant keeps, so a row says how much accuracy a given saving costs where.

    python benchmarks/sensitivity.py --device cuda --set target_size=0.8 refine_steps=0 --output OUT/sensitivity
"""

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defaults import DEV, dev_groups, load_group, parse_value, score  # noqa: E402

logger = logging.getLogger("sensitivity")


def variants(n_layers):
    from lite_whisper.configuration_lite_whisper import LOW_RANK_KEYS

    every = [(i, k) for i in range(n_layers) for k in LOW_RANK_KEYS]
    out = {"all": every}
    for i in range(n_layers):
        out[f"layer{i}"] = [(i, k) for k in LOW_RANK_KEYS]
    for k in LOW_RANK_KEYS:
        out[k] = [(i, k) for i in range(n_layers)]
    out["attention"] = [(i, k) for (i, k) in every if k not in ("fc1", "fc2")]
    out["mlp"] = [(i, k) for (i, k) in every if k in ("fc1", "fc2")]
    for i in range(n_layers):
        out[f"all_but_layer{i}"] = [(j, k) for (j, k) in every if j != i]
    half = n_layers // 2
    out["early_half"] = [(i, k) for (i, k) in every if i < half]
    out["late_half"] = [(i, k) for (i, k) in every if i >= half]
    return out


def partial(lite, base, keep):
    """A copy of `lite` whose low-rank projections outside `keep` are the base model's dense ones again."""
    from lite_whisper.factorize import _set_projection
    from lite_whisper.modeling_lite_whisper import LowRankLinear, encoder_projection

    model = copy.deepcopy(lite)
    for i, layer in enumerate(model.model.encoder.layers):
        for key in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
            if (i, key) not in keep and isinstance(encoder_projection(layer, key), LowRankLinear):
                _set_projection(layer, key, copy.deepcopy(encoder_projection(base.model.encoder.layers[i], key)))
    return model


def encoder_fraction(model, base):
    count = lambda m: sum(p.numel() for p in m.model.encoder.parameters())  # noqa: E731
    return count(model) / count(base)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", nargs="*", default=["target_size=0.8", "refine_steps=0"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dev-dir", default=str(DEV))
    parser.add_argument("--synthetic-stride", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument("--output", default="benchmarks/results/sensitivity")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from lite_whisper.compress import CompressionSettings, compress
    from lite_whisper.convert import load_calibration_audio
    from lite_whisper.whisper_base import whisper_base_path

    device = torch.device(args.device)
    base_path = whisper_base_path()
    processor = WhisperProcessor.from_pretrained(base_path)
    base = WhisperForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32).eval()
    groups = dev_groups(args.dev_dir, 60, args.synthetic_stride)
    audio = {g: load_group(rows) for g, rows in groups.items()}
    overrides = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    calibration = load_calibration_audio(None, 100)
    result = compress(base, calibration.audio, processor.feature_extractor, CompressionSettings(**overrides), device=device)
    results = {"settings": overrides, "device": str(device), "baseline": {}, "variants": {},
               "ranks": [{k: v["rank"] for k, v in row.items() if k != "layer"} for row in result.report["layers"]]}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    scored = base.to(device)
    for group in groups:
        results["baseline"][group] = score(scored, processor, groups[group], audio[group])[0]["wer"]
    base.to("cpu")
    for name, keep in variants(base.config.encoder_layers).items():
        if args.only and name not in args.only:
            continue
        model = partial(result.model, base, set(keep)).to(device)
        model.config.use_triton_kernels = False  # mixed dense / low-rank attention: the plain PyTorch path
        row = {"encoder_fraction": encoder_fraction(model, base)}
        for group in groups:
            row[group] = score(model, processor, groups[group], audio[group])[0]["wer"]
        results["variants"][name] = row
        logger.info("%s: %s", name, {k: round(v, 3) for k, v in row.items()})
        Path(str(output) + ".json").write_text(json.dumps(results, indent=1))
        del model


if __name__ == "__main__":
    main()
