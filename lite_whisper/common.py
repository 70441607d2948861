"""Errors and constants shared by the compression, conversion and export modules (imported by all, imports none)."""

ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_KEYS = ("fc1", "fc2")
RANK_MULTIPLE = 16
# Files that make up a Whisper processor (tokenizer + feature extractor), across transformers 4.x and 5.x.
PROCESSOR_FILES = (
    "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "normalizer.json", "added_tokens.json", "special_tokens_map.json",
)


class CalibrationError(ValueError):
    """The calibration audio cannot support the factorisation asked for (e.g. too few frames for a rank)."""


class ConversionError(ValueError):
    """A conversion request that cannot be carried out (bad option, wrong base model, no usable audio, ...)."""


__all__ = ["ATTENTION_KEYS", "MLP_KEYS", "RANK_MULTIPLE", "PROCESSOR_FILES", "CalibrationError", "ConversionError"]
