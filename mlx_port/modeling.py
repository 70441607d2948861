"""LiteWhisper in MLX: mlx-whisper's Whisper with low-rank encoder projections, loaded from HF checkpoints.

The model is `mlx_whisper.whisper.Whisper` (its decoder, decoding loop and `transcribe` are used unchanged); only the
encoder projections named in `low_rank_config` are swapped for `LowRankLinear`, which keeps the two factors and
never forms weight1 @ weight2. Weights are read straight from the folder's `model.safetensors` (HF Whisper names)
and mirrored onto mlx-whisper's names; there is no conversion step and nothing is written.
"""

import json
import os
from pathlib import Path

import numpy as np

from lite_whisper.configuration_lite_whisper import LOW_RANK_KEYS, validate_low_rank_config
from lite_whisper.configuration_lite_whisper import projection_shape as _projection_shape
from lite_whisper.utils import get_logger

from .backend import import_mlx

logger = get_logger(__name__)

mx, nn = import_mlx()

from mlx_whisper import whisper as mlx_whisper_model  # noqa: E402  (after import_mlx: BLAS first, clear errors)

SUPPORTED_MODEL_TYPES = ("whisper", "lite-whisper")

# HF projection name -> (attribute path inside an mlx-whisper ResidualAttentionBlock).
_ATTENTION_NAMES = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "out_proj": "out"}
_LAYER_NAMES = {
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "final_layer_norm": "mlp_ln",
    "fc1": "mlp1",
    "fc2": "mlp2",
}
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
]


class LowRankLinear(nn.Module):
    """y = (x @ weight1) @ weight2 + bias: a factorised nn.Linear whose full weight is never formed.

    Parameter names and layouts are those of the PyTorch checkpoint (weight1: in x rank, weight2: rank x out), so
    the tensors load as they are, without transposes.
    """

    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        # Zeros, not a random init: a checkpoint always supplies the factors (load is strict).
        self.weight1 = mx.zeros((in_features, rank))
        self.weight2 = mx.zeros((rank, out_features))
        self.bias = mx.zeros((out_features,))

    def _extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def __call__(self, x):
        # addmm fuses the bias into the second product (one pass over the output instead of two).
        return mx.addmm(self.bias, x @ self.weight1, self.weight2)


def projection_shape(config, key):
    """(in_features, out_features) of an encoder projection for a config dict."""
    dims = type("Dims", (), {"d_model": config["d_model"],
                             "encoder_ffn_dim": config.get("encoder_ffn_dim", 4 * config["d_model"])})
    return _projection_shape(dims, key)


def encoder_projection(model, layer, key):
    """The MLX module of projection `key` (HF name) of encoder layer `layer` (nn.Linear or LowRankLinear)."""
    block = model.encoder.blocks[layer]
    if key in _ATTENTION_NAMES:
        return getattr(block.attn, _ATTENTION_NAMES[key])
    return getattr(block, _LAYER_NAMES[key])


def _set_encoder_projection(model, layer, key, module):
    block = model.encoder.blocks[layer]
    if key in _ATTENTION_NAMES:
        setattr(block.attn, _ATTENTION_NAMES[key], module)
    else:
        setattr(block, _LAYER_NAMES[key], module)


class LiteWhisperMLX(mlx_whisper_model.Whisper):
    """mlx-whisper's Whisper whose encoder projections follow `low_rank_config` (one dict per encoder layer).

    Attributes set by `load_model`: `config` (the checkpoint's config.json as a dict), `low_rank_config`,
    `source` (the folder it came from), `tokenizer_source` (what the vocabulary was checked against, or None).
    """

    def __init__(self, dims, low_rank_config=None, encoder_ffn_dim=None, decoder_ffn_dim=None, dtype=None):
        dtype = mx.float32 if dtype is None else dtype
        super().__init__(dims, dtype)
        # Underscore names: MLX keeps lists/dicts assigned to a module in its parameter tree unless they start
        # with "_", and these are metadata, not parameters.
        self._low_rank_config = low_rank_config or [{} for _ in range(dims.n_audio_layer)]
        self._config = {}
        # mlx-whisper sizes every MLP as 4 * d_model, which is true of all OpenAI checkpoints; follow the config
        # anyway so that a checkpoint with another width loads instead of failing on shapes.
        for blocks, ffn, state in (
            (self.encoder.blocks, encoder_ffn_dim, dims.n_audio_state),
            (self.decoder.blocks, decoder_ffn_dim, dims.n_text_state),
        ):
            if ffn and ffn != 4 * state:
                for block in blocks:
                    block.mlp1 = nn.Linear(state, ffn)
                    block.mlp2 = nn.Linear(ffn, state)
        config = {"d_model": dims.n_audio_state, "encoder_ffn_dim": encoder_ffn_dim or 4 * dims.n_audio_state}
        for layer, ranks in enumerate(self._low_rank_config):
            for key, rank in ranks.items():
                in_features, out_features = projection_shape(config, key)
                _set_encoder_projection(self, layer, key, LowRankLinear(in_features, out_features, rank))

    @property
    def low_rank_config(self):
        return self._low_rank_config

    @property
    def config(self):
        """The checkpoint's config.json as a dict."""
        return self._config

    @property
    def dtype(self):
        return self.decoder.token_embedding.weight.dtype

    def encoder_parameter_count(self):
        """Number of encoder parameters, counted as PyTorch's `encoder_parameter_report` and the compression report
        count them: the positional-embedding table included (mlx-whisper keeps it as a constant, not a parameter)."""
        positions = getattr(self.encoder, "_positional_embedding", None)
        return sum(v.size for _, v in _flatten(self.encoder.parameters())) + (positions.size if positions is not None else 0)


def _flatten(tree, prefix=""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix=prefix)


# --- configuration ------------------------------------------------------------------------------------------------


def dims_from_config(config):
    """mlx-whisper ModelDimensions from an HF Whisper config dict."""
    try:
        return mlx_whisper_model.ModelDimensions(
            n_mels=config["num_mel_bins"],
            n_audio_ctx=config["max_source_positions"],
            n_audio_state=config["d_model"],
            n_audio_head=config["encoder_attention_heads"],
            n_audio_layer=config["encoder_layers"],
            n_vocab=config["vocab_size"],
            n_text_ctx=config["max_target_positions"],
            n_text_state=config["d_model"],
            n_text_head=config["decoder_attention_heads"],
            n_text_layer=config["decoder_layers"],
        )
    except KeyError as error:
        raise ValueError(f"config.json lacks {error.args[0]!r}, which a Whisper config has") from None


def parse_low_rank_config(config):
    """Validated `low_rank_config` of a config dict: a list of {key: rank}, one per encoder layer."""
    raw = config.get("low_rank_config") if config.get("model_type") == "lite-whisper" else None
    return validate_low_rank_config(raw, config["encoder_layers"], config["d_model"], config["encoder_ffn_dim"])


# --- locating and reading a checkpoint ----------------------------------------------------------------------------


def resolve_model_path(path_or_repo, allow_patterns=None):
    """A local folder for a folder path or a Hub repo id (downloaded with huggingface_hub.snapshot_download)."""
    path = Path(os.path.expanduser(str(path_or_repo)))
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; --model takes a model folder or a Hub repo id")
        return path
    text = str(path_or_repo)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and "\\" not in text
    if not looks_like_repo:
        raise FileNotFoundError(f"{text}: no such folder (and not a Hub repo id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns or _HUB_PATTERNS))
    except Exception as error:  # network, auth, missing repo: all mean "cannot get this model"
        raise OSError(f"{text}: not a local folder, and downloading it from the Hugging Face Hub failed: {error}") from error


def read_config(folder):
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a (Lite)Whisper model folder?")
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{config_file}: unknown model_type {model_type!r}; the MLX port loads "
            f"{' and '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    if config.get("activation_function", "gelu") != "gelu":
        raise ValueError(f"{config_file}: activation_function {config['activation_function']!r} is not supported (gelu only)")
    return config


def weight_files(folder):
    """The safetensors files of a folder: model.safetensors, or the shards named by model.safetensors.index.json."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shard(s) {', '.join(missing)} named in model.safetensors.index.json are missing")
        return [folder / name for name in shards]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.npz"))
    hint = f" (found {', '.join(others)}; only safetensors checkpoints are read)" if others else ""
    raise FileNotFoundError(f"{folder} has no model weights: expected model.safetensors{hint}")


def read_weights(folder):
    weights = {}
    for file in weight_files(folder):
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as error:
            raise OSError(f"{file} is incomplete or corrupt ({' '.join(str(error).split())}); download it again") from None
    # Some exports prefix everything with "model." twice or not at all; HF Whisper names start with "model.".
    if weights and not any(name.startswith("model.") for name in weights):
        weights = {f"model.{name}" if not name.startswith("proj_out.") else name: value for name, value in weights.items()}
    return weights


# --- HF names -> mlx-whisper names --------------------------------------------------------------------------------


def _mirror_layer_name(rest, side):
    """mlx-whisper name (inside a block) of an HF layer parameter name such as `self_attn.q_proj.weight`."""
    parts = rest.split(".")
    if parts[0] in ("self_attn", "encoder_attn") and parts[1] in _ATTENTION_NAMES:
        attention = "attn" if parts[0] == "self_attn" else "cross_attn"
        return ".".join([attention, _ATTENTION_NAMES[parts[1]], *parts[2:]])
    if parts[0] in _LAYER_NAMES:
        return ".".join([_LAYER_NAMES[parts[0]], *parts[1:]])
    return None


def mirror_name(name):
    """mlx-whisper parameter name for an HF Whisper state-dict name (None: not a model parameter here)."""
    if not name.startswith("model."):
        return None  # proj_out.weight: tied to the token embedding (checked by the caller)
    parts = name.split(".")
    side = parts[1]
    if side == "encoder":
        fixed = {
            "conv1": "encoder.conv1",
            "conv2": "encoder.conv2",
            "layer_norm": "encoder.ln_post",
        }
        if parts[2] in fixed:
            return ".".join([fixed[parts[2]], *parts[3:]])
        if parts[2] == "layers":
            inner = _mirror_layer_name(".".join(parts[4:]), side)
            return None if inner is None else f"encoder.blocks.{parts[3]}.{inner}"
    elif side == "decoder":
        if parts[2] == "embed_tokens":
            return "decoder.token_embedding." + ".".join(parts[3:])
        if parts[2:] == ["embed_positions", "weight"]:
            return "decoder.positional_embedding"
        if parts[2] == "layer_norm":
            return "decoder.ln." + ".".join(parts[3:])
        if parts[2] == "layers":
            inner = _mirror_layer_name(".".join(parts[4:]), side)
            return None if inner is None else f"decoder.blocks.{parts[3]}.{inner}"
    return None


def check_low_rank_tensors(weights, config, low_rank_config):
    """Raise ValueError naming the layer when the checkpoint's projection tensors disagree with low_rank_config."""
    problems = {}
    for layer, ranks in enumerate(low_rank_config):
        for key in LOW_RANK_KEYS:
            scope = "self_attn." if key in _ATTENTION_NAMES else ""
            prefix = f"model.encoder.layers.{layer}.{scope}{key}."
            in_features, out_features = projection_shape(config, key)
            present = {name[len(prefix):]: tuple(weights[name].shape) for name in weights if name.startswith(prefix)}
            if key in ranks:
                rank = ranks[key]
                expected = {"weight1": (in_features, rank), "weight2": (rank, out_features), "bias": (out_features,)}
                form = f"low-rank (rank {rank})"
            else:
                expected = {"weight": (out_features, in_features)}
                if key != "k_proj":  # Whisper's key projection has no bias
                    expected["bias"] = (out_features,)
                form = "full-rank"
            if present != expected:
                found = ", ".join(f"{n} {list(s)}" for n, s in sorted(present.items())) or "nothing"
                want = ", ".join(f"{n} {list(s)}" for n, s in expected.items())
                problems.setdefault(layer, []).append(f"{key}: low_rank_config says {form}, expecting {want}; found {found}")
    if problems:
        lines = [f"encoder layer {layer}: " + "; ".join(items) for layer, items in sorted(problems.items())]
        raise ValueError(
            "checkpoint tensors do not match low_rank_config in config.json for "
            + ", ".join(f"encoder layer {layer}" for layer in sorted(problems))
            + ":\n  "
            + "\n  ".join(lines[:8])
            + (f"\n  ... and {len(lines) - 8} more layers" if len(lines) > 8 else "")
        )


def mirror_weights(weights, model):
    """[(mlx name, array)] for `model.load_weights`, plus the encoder's stored positional embedding (or None)."""
    mirrored = []
    unused = []
    encoder_positions = None
    for name, value in weights.items():
        if name == "model.encoder.embed_positions.weight":
            encoder_positions = value
            continue
        if name == "proj_out.weight":
            embedding = weights.get("model.decoder.embed_tokens.weight")
            # Whisper ties the output projection to the token embedding and mlx-whisper relies on that.
            if embedding is None or value.shape != embedding.shape or not mx.array_equal(value, embedding).item():
                raise ValueError("proj_out.weight differs from the token embedding: untied output heads are not supported")
            continue
        target = mirror_name(name)
        if target is None:
            unused.append(name)
            continue
        if target.endswith(("conv1.weight", "conv2.weight")):
            value = value.transpose(0, 2, 1)  # torch Conv1d (out, in, k) -> MLX Conv1d (out, k, in)
        mirrored.append((target, value))
    if unused:
        raise ValueError(f"checkpoint holds tensors that are not part of a Whisper model: {', '.join(unused[:8])}")
    return mirrored, encoder_positions


def _alignment_heads(folder, model):
    generation_config = Path(folder) / "generation_config.json"
    if not generation_config.is_file():
        return False
    with open(generation_config, encoding="utf-8") as handle:
        heads = json.load(handle).get("alignment_heads")
    if not heads:
        return False
    mask = np.zeros((model.dims.n_text_layer, model.dims.n_text_head), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    model.set_alignment_heads(mask)
    return True


# --- public entry point ---------------------------------------------------------------------------------------------


def parse_dtype(dtype):
    if dtype is None:
        # float16 on Apple GPUs (what mlx-whisper does); the CPU backend has no fast float16 path.
        return mx.float16 if mx.default_device() == mx.gpu else mx.float32
    if isinstance(dtype, str):
        names = {"float16": mx.float16, "fp16": mx.float16, "float32": mx.float32, "fp32": mx.float32}
        if dtype.lower() not in names:
            raise ValueError(f"dtype {dtype!r} is not supported; use float16 or float32")
        return names[dtype.lower()]
    if dtype not in (mx.float16, mx.float32):
        raise ValueError(f"dtype {dtype} is not supported; use mx.float16 or mx.float32")
    return dtype


def load_model(path_or_repo, dtype=None, tokenizer=None):
    """Load a Whisper or LiteWhisper checkpoint (folder or Hub repo id) as a `LiteWhisperMLX`.

    Args:
        path_or_repo: a folder holding config.json and model.safetensors (HF Whisper tensor names), or a Hub repo id.
        dtype: "float32", "float16" (or mx dtypes); default float16 on the GPU, float32 on the CPU.
        tokenizer: a base model (folder or repo id) whose tokenizer files check the vocabulary when the model
            folder has none; decoding itself uses mlx-whisper's bundled tiktoken vocabulary (see tokenizer.py).
    """
    from .tokenizer import resolve_tokenizer

    dtype = parse_dtype(dtype)
    folder = resolve_model_path(path_or_repo)
    config = read_config(folder)
    low_rank_config = parse_low_rank_config(config)
    weights = read_weights(folder)
    check_low_rank_tensors(weights, config, low_rank_config)

    dims = dims_from_config(config)
    model = LiteWhisperMLX(
        dims,
        low_rank_config,
        encoder_ffn_dim=config.get("encoder_ffn_dim"),
        decoder_ffn_dim=config.get("decoder_ffn_dim"),
        dtype=dtype,
    )
    mirrored, encoder_positions = mirror_weights(weights, model)
    # alignment_heads is an (integer) parameter of mlx-whisper's model that checkpoints do not carry.
    mirrored.append(("alignment_heads", model.alignment_heads))
    # strict: every parameter of the model must come from the checkpoint, with the right shape.
    try:
        model.load_weights(mirrored, strict=True)
    except ValueError as error:
        raise ValueError(f"{folder}: the checkpoint does not fit a Whisper model of its config.json: {error}") from None
    if encoder_positions is not None:
        # Use the stored table rather than mlx-whisper's recomputed sinusoids: identical in principle, and exact.
        if tuple(encoder_positions.shape) != (dims.n_audio_ctx, dims.n_audio_state):
            raise ValueError(f"model.encoder.embed_positions.weight has shape {list(encoder_positions.shape)}")
        model.encoder._positional_embedding = encoder_positions.astype(dtype)
    model.set_dtype(dtype)
    mx.eval(model.parameters(), model.encoder._positional_embedding)

    model._config = config
    model.source = str(folder)
    model.tokenizer_source = resolve_tokenizer(model, folder, tokenizer)
    if not _alignment_heads(folder, model) and model.tokenizer_source and Path(model.tokenizer_source).is_dir():
        _alignment_heads(model.tokenizer_source, model)
    ranks = sum(len(r) for r in low_rank_config)
    logger.info(
        f"loaded {folder} ({config['model_type']}, {ranks} low-rank encoder projections, {dtype}, "
        f"{model.encoder_parameter_count() / 1e6:.1f}M encoder parameters)"
    )
    return model


__all__ = [
    "LiteWhisperMLX",
    "LowRankLinear",
    "check_low_rank_tensors",
    "dims_from_config",
    "encoder_projection",
    "load_model",
    "mirror_name",
    "parse_dtype",
    "parse_low_rank_config",
    "read_config",
    "resolve_model_path",
]
