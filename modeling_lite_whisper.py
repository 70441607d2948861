# coding=utf-8
"""LiteWhisper: Whisper with low-rank encoder projections (LiteASR, Kamahori et al., EMNLP 2025).

Like configuration_lite_whisper.py, this is a Hugging Face remote-code file copied beside every converted
checkpoint: it needs only torch and transformers. When the `lite_whisper` package is installed it also is
`lite_whisper.modeling_lite_whisper`, and on CUDA it swaps in the package's Triton kernels (optional, guarded).

Checkpoint format (the published `efficient-speech/lite-whisper-*` one): a low-rank projection of encoder layer i
stores `model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight1,weight2,bias}` or
`model.encoder.layers.{i}.{fc1,fc2}.{weight1,weight2,bias}` with weight1 (in x k), weight2 (k x out), bias (out),
and computes y = (x @ weight1) @ weight2 + bias. A projection absent from `low_rank_config` keeps nn.Linear.
"""

import os
import shutil

import torch
from torch import nn
from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration
from transformers.pipelines.automatic_speech_recognition import AutomaticSpeechRecognitionPipeline
from transformers.utils import logging

from .configuration_lite_whisper import LOW_RANK_KEYS, LiteWhisperConfig, projection_shape

try:  # transformers >= 5: these skip tensors already loaded from a checkpoint (`_is_hf_initialized`)
    from transformers import initialization as _init
except ImportError:  # transformers 4.x only initialises modules whose weights were missing
    _init = nn.init

logger = logging.get_logger(__name__)

REMOTE_CODE_FILES = ("configuration_lite_whisper.py", "modeling_lite_whisper.py")


class LowRankLinear(nn.Module):
    """y = (x @ weight1) @ weight2 + bias, the factorised form of nn.Linear(in_features, out_features)."""

    def __init__(self, in_features, out_features, rank, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.weight1 = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=dtype))
        self.weight2 = nn.Parameter(torch.empty(rank, out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, std=0.02):
        if self.weight1.is_meta:
            return
        with torch.no_grad():
            # Scaled so that weight1 @ weight2 has entries of about `std`, like the nn.Linear it replaces.
            factor_std = (std / self.rank**0.5) ** 0.5
            _init.normal_(self.weight1, mean=0.0, std=factor_std)
            _init.normal_(self.weight2, mean=0.0, std=factor_std)
            _init.zeros_(self.bias)

    def forward(self, x):
        return nn.functional.linear(torch.matmul(x, self.weight1), self.weight2.t(), self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _projection_parent(layer, key):
    return layer.self_attn if key in ("q_proj", "k_proj", "v_proj", "out_proj") else layer


def encoder_projection(layer, key):
    """The module of projection `key` in a Whisper encoder layer (nn.Linear or LowRankLinear)."""
    return getattr(_projection_parent(layer, key), key)


def _kernels_module():
    try:
        from lite_whisper import kernels
    except ImportError:
        return None
    return kernels


def _fast_generation_module():
    try:
        from lite_whisper import fast_generation
    except ImportError:  # remote code without the package: the eager loop
        return None
    return fast_generation


class LiteWhisperForConditionalGeneration(WhisperForConditionalGeneration):
    config_class = LiteWhisperConfig
    _lw_fast_generation_builtin = True

    def __init__(self, config):
        super().__init__(config)
        reference = next(self.model.encoder.parameters())
        for i, layer in enumerate(self.model.encoder.layers):
            for key, rank in config.low_rank_config[i].items():
                in_features, out_features = projection_shape(config, key)
                module = LowRankLinear(in_features, out_features, rank, device=reference.device, dtype=reference.dtype)
                module.reset_parameters(config.init_std)
                setattr(_projection_parent(layer, key), key, module)
        self._kernels_checked = False
        self.model.encoder.register_forward_pre_hook(self._maybe_enable_kernels)

    def _init_weights(self, module):
        if isinstance(module, LowRankLinear):
            module.reset_parameters(self.config.init_std)
            return
        super()._init_weights(module)

    # --- checkpoint loading -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        # float32 on CPU unless a dtype is asked for: checkpoints are saved in float16, which on CPU is slower and
        # less accurate. "auto" (pipeline()'s default in transformers 5) counts as not asking; an explicit
        # torch.float16 is honoured.
        def loads_on_cpu(device_map):
            if device_map is None:
                return True
            if isinstance(device_map, dict):
                return all(str(v) in ("cpu", "disk") for v in device_map.values())
            if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
                return not torch.cuda.is_available()
            try:
                return torch.device(device_map).type == "cpu"
            except (RuntimeError, TypeError):
                return False

        dtype_key = "torch_dtype" if "torch_dtype" in kwargs else "dtype"
        if kwargs.get(dtype_key) in (None, "auto") and loads_on_cpu(kwargs.get("device_map")):
            import transformers

            kwargs.pop(dtype_key, None)
            kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = torch.float32
        # Load with mismatches allowed so that we see which tensors disagree, then raise our own error naming the
        # layers (transformers' own error only points at a log table).
        try:
            model, info = super().from_pretrained(
                *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            where = os.path.join(source, "model.safetensors") if os.path.isdir(str(source)) else f"model.safetensors of {source}"
            raise OSError(f"{where} is incomplete or corrupt ({error}); download it again") from None
        mismatched = []
        for entry in info.get("mismatched_keys", []) or []:
            key, shapes = (entry[0], entry[1:]) if isinstance(entry, (tuple, list)) else (entry, ())
            mismatched.append(f"{key} (checkpoint {tuple(shapes[0])} vs model {tuple(shapes[1])})" if len(shapes) == 2 else key)
        # transformers only warns about missing/unexpected keys and then initialises them randomly; for the
        # encoder projections that means a checkpoint whose tensors disagree with low_rank_config would run with
        # random weights, so refuse it.
        absent = sorted(
            k for k in list(info.get("missing_keys", [])) + list(info.get("unexpected_keys", []))
            if ".encoder.layers." in k and any(f".{p}." in k for p in LOW_RANK_KEYS)
        )
        problems = absent + ([] if ignore_mismatched else sorted(mismatched))
        if problems:
            layers = sorted({int(k.split(".encoder.layers.")[1].split(".")[0]) for k in problems if ".encoder.layers." in k})
            where = f"encoder layer(s) {', '.join(map(str, layers))}" if layers else "the model"
            raise ValueError(
                f"checkpoint tensors do not match the config (low_rank_config) for {where}: "
                + "; ".join(problems[:8])
                + (f" and {len(problems) - 8} more" if len(problems) > 8 else "")
                + ". A low-rank projection stores weight1 (in x rank), weight2 (rank x out) and bias; a full-rank one "
                "stores weight (and bias)."
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        # The remote-code files travel with the weights so that trust_remote_code works from the folder alone.
        here = os.path.dirname(os.path.abspath(__file__))
        for name in REMOTE_CODE_FILES:
            source = os.path.join(here, name)
            target = os.path.join(save_directory, name)
            if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)

    # --- generation ---------------------------------------------------------------------------------------------

    def _prepare_decoder_input_ids_for_generation(self, batch_size, model_input_name, model_kwargs, *args, **kwargs):
        # Whisper's generate() builds the complete decoder prompt (<|startofprev|> prompts included) and
        # GenerationMixin leaves it untouched only when config.model_type == "whisper"; do the same here.
        if model_kwargs is not None and "decoder_input_ids" in model_kwargs:
            return model_kwargs.pop("decoder_input_ids"), model_kwargs
        return super()._prepare_decoder_input_ids_for_generation(
            batch_size, model_input_name, model_kwargs, *args, **kwargs
        )

    # --- fast generation (CUDA, optional): static KV cache + CUDA graphs, see lite_whisper.fast_generation --------

    def generate(self, *args, **kwargs):
        fast = _fast_generation_module()
        if fast is None:
            return super().generate(*args, **kwargs)
        with fast.generation_context(self):
            return super().generate(*args, **kwargs)

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        fast = _fast_generation_module()
        if fast is not None:
            result = fast.sample(self, input_ids, logits_processor, stopping_criteria, generation_config,
                                 synced_gpus, streamer, **model_kwargs)
            if result is not NotImplemented:
                return result
        return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    def set_fast_generation(self, enabled):
        """Turn the CUDA fast greedy decoding path on or off (on by default; used only on CUDA when installed)."""
        fast = _fast_generation_module()
        if fast is None:
            if enabled:
                logger.warning("lite_whisper is not installed; generate() uses the eager loop")
            return
        fast.set_fast_generation(self, enabled)

    # --- Triton kernels (CUDA, optional) -------------------------------------------------------------------------

    def _maybe_enable_kernels(self, module, args):
        if self._kernels_checked:
            return
        features = args[0] if args else None
        if not isinstance(features, torch.Tensor) or features.device.type != "cuda":
            return
        self._kernels_checked = True
        if not getattr(self.config, "use_triton_kernels", True):
            return
        kernels = _kernels_module()
        if kernels is not None:
            kernels.enable(self)

    def set_triton_kernels(self, enabled):
        """Turn lite_whisper's Triton kernels on or off (they are used only on CUDA, when installed)."""
        self.config.use_triton_kernels = bool(enabled)
        kernels = _kernels_module()
        if kernels is None:
            if enabled:
                logger.warning("lite_whisper is not installed (or has no kernels); the plain PyTorch path is used")
            return
        if enabled:
            self._kernels_checked = False
        else:
            kernels.disable(self)
            self._kernels_checked = True

    # --- reporting ----------------------------------------------------------------------------------------------

    def encoder_parameter_report(self):
        """Per encoder layer: parameters of the six projections as they are now and as full-rank Whisper."""
        return encoder_parameter_report(self)


def encoder_parameter_report(model):
    """Encoder parameter counts (now vs. the full-rank original) per layer and in total, as a dict."""
    config = model.config
    encoder = model.model.encoder
    layers = []
    projection_now = projection_full = 0
    for i, layer in enumerate(encoder.layers):
        row = {"layer": i, "ranks": {}, "params": 0, "full_rank_params": 0}
        for key in LOW_RANK_KEYS:
            module = encoder_projection(layer, key)
            in_features, out_features = projection_shape(config, key)
            has_bias = key != "k_proj"
            full = in_features * out_features + (out_features if has_bias else 0)
            now = sum(p.numel() for p in module.parameters())
            if isinstance(module, LowRankLinear):
                row["ranks"][key] = module.rank
            row["params"] += now
            row["full_rank_params"] += full
        projection_now += row["params"]
        projection_full += row["full_rank_params"]
        layers.append(row)
    total_now = sum(p.numel() for p in encoder.parameters())
    total_full = total_now - projection_now + projection_full
    return {
        "encoder_params": total_now,
        "original_encoder_params": total_full,
        "fraction": total_now / total_full,
        "layers": layers,
    }


def _is_lite_whisper(model):
    config = getattr(model, "config", None)
    return config is not None and type(config).model_type == "lite-whisper"


class LiteWhisperSpeechRecognitionPipeline(AutomaticSpeechRecognitionPipeline):
    """The stock ASR pipeline, running LiteWhisper models the way it runs Whisper (timestamps, long-form chunks).

    The stock class decides from `config.model_type == "whisper"`; for every other model this class behaves exactly
    like its parent.
    """

    def __init__(self, model, *args, **kwargs):
        if _is_lite_whisper(model) and not args:
            # transformers 4.x's pipeline() loads no tokenizer/feature extractor for a custom pipeline whose config
            # class it does not know; take them from the model's folder as 5.x does.
            source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            if source and kwargs.get("feature_extractor") is None:
                kwargs["feature_extractor"] = AutoFeatureExtractor.from_pretrained(source)
            if source and kwargs.get("tokenizer") is None:
                kwargs["tokenizer"] = AutoTokenizer.from_pretrained(source)
        super().__init__(model, *args, **kwargs)
        if _is_lite_whisper(self.model):
            self.type = "seq2seq_whisper"


__all__ = [
    "LiteWhisperConfig",
    "LiteWhisperForConditionalGeneration",
    "LiteWhisperSpeechRecognitionPipeline",
    "LowRankLinear",
    "encoder_parameter_report",
    "encoder_projection",
]
