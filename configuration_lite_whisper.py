# coding=utf-8
"""LiteWhisper configuration (LiteASR, Kamahori et al., EMNLP 2025).

This file is a Hugging Face "remote code" file: `lite-whisper-convert` copies it beside the weights of every
checkpoint, where transformers loads it with `trust_remote_code=True`. It must therefore work with nothing but
torch and transformers installed, and it is also the module `lite_whisper.configuration_lite_whisper` of the
installed package (one source, so the Hub copy and the package can never drift apart).
"""

import copy

from transformers import WhisperConfig

LOW_RANK_KEYS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# auto_map entries written into every saved config: the published checkpoints carry only the first two, which is
# why `pipeline()` and `AutoModelForSpeechSeq2Seq` could not find the class from their folders alone.
AUTO_MAP = {
    "AutoConfig": "configuration_lite_whisper.LiteWhisperConfig",
    "AutoModel": "modeling_lite_whisper.LiteWhisperForConditionalGeneration",
    "AutoModelForSpeechSeq2Seq": "modeling_lite_whisper.LiteWhisperForConditionalGeneration",
}

# The stock ASR pipeline picks its decoding path from `config.model_type == "whisper"`, so a "lite-whisper" model
# would be run as CTC. Transformers' mechanism for remote code is a custom pipeline declared in config.json; the
# pipeline class lives in modeling_lite_whisper.py and only fixes that dispatch.
CUSTOM_PIPELINES = {
    "automatic-speech-recognition": {
        "impl": "modeling_lite_whisper.LiteWhisperSpeechRecognitionPipeline",
        "pt": ["AutoModelForSpeechSeq2Seq"],
        "tf": [],
        "type": "multimodal",
    }
}


def projection_shape(config, key):
    """(in_features, out_features) of an encoder projection of a Whisper config."""
    if key in ("q_proj", "k_proj", "v_proj", "out_proj"):
        return config.d_model, config.d_model
    if key == "fc1":
        return config.d_model, config.encoder_ffn_dim
    if key == "fc2":
        return config.encoder_ffn_dim, config.d_model
    raise ValueError(f"unknown projection {key!r}; expected one of {', '.join(LOW_RANK_KEYS)}")


def validate_low_rank_config(low_rank_config, encoder_layers, d_model, encoder_ffn_dim):
    """`low_rank_config` checked and normalised: one {key: int rank} dict per encoder layer (None -> all full rank).

    Raises ValueError naming the layer and key for anything else. Shared by the MLX port, which reads config.json
    without transformers' config classes.
    """
    if low_rank_config is None:
        return [{} for _ in range(encoder_layers)]
    if not isinstance(low_rank_config, (list, tuple)):
        raise ValueError(
            f"low_rank_config must be a list with one dict per encoder layer, got {type(low_rank_config).__name__}"
        )
    if len(low_rank_config) != encoder_layers:
        raise ValueError(
            f"low_rank_config has {len(low_rank_config)} entries but the encoder has {encoder_layers} layers "
            "(encoder_layers); give one dict per layer ({} for a layer kept full rank)"
        )
    dims = {"d_model": d_model, "encoder_ffn_dim": encoder_ffn_dim}
    dims = type("Dims", (), dims)
    validated = []
    for i, ranks in enumerate(low_rank_config):
        if ranks is None:
            ranks = {}
        if not isinstance(ranks, dict):
            raise ValueError(f"low_rank_config[{i}] (encoder layer {i}) must be a dict, got {type(ranks).__name__}")
        layer = {}
        for key, rank in ranks.items():
            if key not in LOW_RANK_KEYS:
                raise ValueError(
                    f"low_rank_config[{i}] (encoder layer {i}) has unknown key {key!r}; "
                    f"expected any of {', '.join(LOW_RANK_KEYS)}"
                )
            if isinstance(rank, float) and rank.is_integer():
                rank = int(rank)
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise ValueError(
                    f"low_rank_config[{i}][{key!r}] (encoder layer {i}) must be an integer rank, got {rank!r}"
                )
            in_features, out_features = projection_shape(dims, key)
            if not 0 < rank <= min(in_features, out_features):
                raise ValueError(
                    f"low_rank_config[{i}][{key!r}] (encoder layer {i}) is {rank}, but a rank must satisfy "
                    f"0 < rank <= min(in, out) = {min(in_features, out_features)} for a {in_features}x{out_features} "
                    "projection"
                )
            layer[key] = rank
        validated.append(dict(sorted(layer.items())))
    return validated


class LiteWhisperConfig(WhisperConfig):
    r"""
    Configuration of a Whisper model whose encoder projections may be low-rank.

    Args:
        low_rank_config (`list[dict[str, int]]`, *optional*):
            One dict per encoder layer mapping any of `q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2` to the
            rank of that projection's factorisation. A key that is absent means the projection is full rank.
            `None` (or only empty dicts) is plain Whisper.
        use_triton_kernels (`bool`, *optional*, defaults to `True`):
            Use lite_whisper's Triton kernels on CUDA when the package and triton are installed. Ignored elsewhere.
        kwargs: everything `WhisperConfig` takes.
    """

    model_type = "lite-whisper"

    # lite_whisper sets this on its own copy of the class once it has taught the stock ASR pipeline about
    # LiteWhisper; the copy that transformers loads as remote code keeps it False and relies on `custom_pipelines`.
    _package_pipeline_registered = False

    def __init__(self, low_rank_config=None, use_triton_kernels=True, **kwargs):
        custom = kwargs.get("custom_pipelines")
        if type(self)._package_pipeline_registered and isinstance(custom, dict):
            # Keeping our own entry would make pipeline() demand trust_remote_code although the installed package
            # already handles the task; to_dict() writes it back when saving.
            custom = {k: v for k, v in custom.items() if v != CUSTOM_PIPELINES.get(k)}
            kwargs["custom_pipelines"] = custom or None
            if not custom:
                kwargs.pop("custom_pipelines")
        super().__init__(**kwargs)
        self.use_triton_kernels = bool(use_triton_kernels)
        self.low_rank_config = self._validated_low_rank_config(low_rank_config)

    def _validated_low_rank_config(self, low_rank_config):
        return validate_low_rank_config(low_rank_config, self.encoder_layers, self.d_model, self.encoder_ffn_dim)

    @property
    def is_low_rank(self):
        return any(self.low_rank_config)

    def _with_hub_fields(self, output):
        # Always written: a folder saved by us must load through AutoModelForSpeechSeq2Seq and pipeline() alone.
        auto_map = dict(output.get("auto_map") or {})
        auto_map.update(AUTO_MAP)
        output["auto_map"] = auto_map
        custom = dict(output.get("custom_pipelines") or {})
        custom.update(copy.deepcopy(CUSTOM_PIPELINES))
        output["custom_pipelines"] = custom
        if "low_rank_config" in self.__dict__:  # to_dict() also runs inside super().__init__(), before it is set
            output["low_rank_config"] = copy.deepcopy(self.__dict__["low_rank_config"])
        return output

    def to_dict(self):
        return self._with_hub_fields(super().to_dict())

    def to_diff_dict(self):
        return self._with_hub_fields(super().to_diff_dict())


__all__ = ["LiteWhisperConfig", "LOW_RANK_KEYS", "projection_shape", "validate_low_rank_config"]
