"""Errors and constants shared by the compression, conversion and export modules (imported by all, imports none)."""

ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_KEYS = ("fc1", "fc2")
RANK_MULTIPLE = 16
# The one default of the converter, the demo, `CompressionSettings` and the model card: 80% of the encoder's
# parameters. Thresholds (the paper's rule) apply only when asked for; these are the values used then.
DEFAULT_TARGET_SIZE = 0.8
DEFAULT_RANK_THRESHOLD = "0.99:0.999"
# Files that make up a Whisper processor (tokenizer + feature extractor), across transformers 4.x and 5.x.
PROCESSOR_FILES = (
    "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "normalizer.json", "added_tokens.json", "special_tokens_map.json",
)


def describe_refinement(refinement):
    """'N steps', or 'N steps per layer (mode)' for layer-wise refinement, from a report's `refinement` entry."""
    refinement = refinement or {}
    if refinement.get("steps_per_layer"):
        return f"{refinement['steps_per_layer']} steps per layer ({refinement.get('mode', 'layer')})"
    return f"{refinement.get('steps', 0)} steps"


class CalibrationError(ValueError):
    """The calibration audio cannot support the factorisation asked for (e.g. too few frames for a rank)."""


class ConversionError(ValueError):
    """A conversion request that cannot be carried out (bad option, wrong base model, no usable audio, ...)."""


__all__ = ["ATTENTION_KEYS", "MLP_KEYS", "RANK_MULTIPLE", "DEFAULT_TARGET_SIZE", "DEFAULT_RANK_THRESHOLD", "PROCESSOR_FILES", "describe_refinement", "CalibrationError", "ConversionError"]
