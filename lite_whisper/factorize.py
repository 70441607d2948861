"""Factorisation: PCA factors of one projection, and a Whisper model plus per-projection factors -> LiteWhisper."""

import copy

import torch

from .common import ATTENTION_KEYS
from .configuration_lite_whisper import LOW_RANK_KEYS, LiteWhisperConfig, projection_shape
from .modeling_lite_whisper import LiteWhisperForConditionalGeneration, LowRankLinear, encoder_projection

# Keys of the config dict that describe the file rather than the model; they are rewritten for LiteWhisper.
_DROP_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "custom_pipelines", "low_rank_config", "transformers_version")


def projection_prefix(layer, key):
    """State-dict prefix of an encoder projection, e.g. `model.encoder.layers.3.self_attn.q_proj.`."""
    scope = "self_attn." if key in ("q_proj", "k_proj", "v_proj", "out_proj") else ""
    return f"model.encoder.layers.{layer}.{scope}{key}."


def dense_weight(module):
    """(weight as torch Linear stores it: out x in, bias or None) of an nn.Linear or LowRankLinear."""
    if isinstance(module, LowRankLinear):
        return (module.weight1 @ module.weight2).t(), module.bias
    return module.weight, module.bias


def factors_from_svd(weight, bias, rank):
    """Best rank-`rank` factors (Frobenius norm) of a Linear's weight (out x in): returns weight1, weight2, bias.

    At full rank the product reproduces the weight up to rounding, which is what the format tests rely on.
    """
    w = weight.detach().to(torch.float64).t()  # in x out, so that y = x @ w + b
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    weight1 = (u[:, :rank] * s[:rank]).to(weight.dtype)
    weight2 = vh[:rank].to(weight.dtype).contiguous()
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight1.contiguous(), weight2, bias.detach().clone()


def lite_config_from(config, low_rank_config):
    data = config.to_dict()
    for key in _DROP_CONFIG_KEYS:
        data.pop(key, None)
    data["low_rank_config"] = low_rank_config
    data["architectures"] = ["LiteWhisperForConditionalGeneration"]
    return LiteWhisperConfig(**data)


def build_lite_whisper(model, factors):
    """A LiteWhisperForConditionalGeneration from a Whisper (or LiteWhisper) model and encoder factors.

    Args:
        model: a `WhisperForConditionalGeneration` (a `LiteWhisperForConditionalGeneration` works too: its
            low-rank projections not named in `factors` are kept).
        factors: `{(layer_index, key): (weight1, weight2, bias)}` with weight1 (in x k), weight2 (k x out),
            bias (out,), key one of q_proj, k_proj, v_proj, out_proj, fc1, fc2.

    Returns the new model on the base model's device and dtype, with its generation config; the base is untouched.
    """
    config = model.config
    n_layers = config.encoder_layers
    previous = getattr(config, "low_rank_config", None) or [{} for _ in range(n_layers)]
    low_rank_config = [dict(ranks) for ranks in previous]
    for (layer, key), tensors in factors.items():
        if key not in LOW_RANK_KEYS:
            raise ValueError(f"factors[({layer}, {key!r})]: unknown projection; expected one of {', '.join(LOW_RANK_KEYS)}")
        if not 0 <= layer < n_layers:
            raise ValueError(f"factors[({layer}, {key!r})]: layer index out of range (encoder has {n_layers} layers)")
        weight1, weight2, bias = tensors
        in_features, out_features = projection_shape(config, key)
        rank = weight1.shape[1]
        expected = ((in_features, rank), (rank, out_features), (out_features,))
        got = (tuple(weight1.shape), tuple(weight2.shape), tuple(bias.shape))
        if got != expected:
            raise ValueError(
                f"factors for encoder layer {layer} {key}: shapes weight1/weight2/bias {got}, expected {expected}"
            )
        low_rank_config[layer][key] = int(rank)

    lite_config = lite_config_from(config, low_rank_config)
    lite_config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    reference = next(model.parameters())
    with torch.device("meta"):
        lite = LiteWhisperForConditionalGeneration(lite_config)

    state = {}
    base_state = model.state_dict()
    replaced = {projection_prefix(layer, key) for (layer, key) in factors}
    for name, tensor in base_state.items():
        if not any(name.startswith(prefix) for prefix in replaced):
            state[name] = tensor.detach().clone()
    for (layer, key), (weight1, weight2, bias) in factors.items():
        prefix = projection_prefix(layer, key)
        for name, tensor in (("weight1", weight1), ("weight2", weight2), ("bias", bias)):
            state[prefix + name] = tensor.detach().to(device=reference.device, dtype=reference.dtype).contiguous().clone()
    missing, unexpected = lite.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise RuntimeError(f"internal error building LiteWhisper: missing {missing}, unexpected {unexpected}")
    if "proj_out.weight" not in state:
        lite.proj_out.weight = lite.model.decoder.embed_tokens.weight
    lite.tie_weights()
    lite.generation_config = copy.deepcopy(model.generation_config)
    lite.eval()
    return lite


def exact_factors(model, rank=None):
    """Factors of every encoder projection by SVD (full rank when `rank` is None): for tests and baselines."""
    factors = {}
    for i, layer in enumerate(model.model.encoder.layers):
        for key in LOW_RANK_KEYS:
            weight, bias = dense_weight(encoder_projection(layer, key))
            k = min(weight.shape) if rank is None else min(rank, *weight.shape)
            factors[(i, key)] = factors_from_svd(weight, bias, k)
    return factors


def low_rank_factors(weight, bias, spectrum, rank):
    """Factors of y = x W^T + b projected onto the top-`rank` principal subspace of its outputs.

    weight is (out x in) as nn.Linear stores it; bias may be None (k_proj). With per-channel scale s (ones for the
    paper's method) the projection is oblique: y ~= mu + (y - mu) S^-1 V_k V_k^T S with S = diag(s), so
        weight1 = W^T S^-1 V_k (in x k),  weight2 = V_k^T S (k x out),  bias = mu + (b - mu) S^-1 V_k V_k^T S.
    Returns float32 tensors on the weight's device.
    """
    device = weight.device
    v = spectrum.eigenvectors[:, :rank].to(device=device, dtype=torch.float64)
    scale = spectrum.scale.to(device=device, dtype=torch.float64)
    mean = spectrum.mean.to(device=device, dtype=torch.float64)
    w = weight.detach().to(torch.float64).t()  # in x out
    b = torch.zeros(w.shape[1], dtype=torch.float64, device=device) if bias is None else bias.detach().to(torch.float64)
    down = v / scale[:, None]  # S^-1 V_k  (out x k)
    up = v.t() * scale[None, :]  # V_k^T S  (k x out)
    weight1 = w @ down
    weight2 = up
    new_bias = mean + ((b - mean) @ down) @ up
    return weight1.float().contiguous(), weight2.float().contiguous(), new_bias.float().contiguous()


def _low_rank_module(weight1, weight2, bias):
    in_features, rank = weight1.shape
    out_features = weight2.shape[1]
    module = LowRankLinear(in_features, out_features, rank, device=weight1.device, dtype=weight1.dtype)
    with torch.no_grad():
        module.weight1.copy_(weight1)
        module.weight2.copy_(weight2)
        module.bias.copy_(bias)
    return module


def _set_projection(layer, key, module):
    parent = layer.self_attn if key in ATTENTION_KEYS else layer
    setattr(parent, key, module)


__all__ = ["build_lite_whisper", "factors_from_svd", "exact_factors", "dense_weight", "lite_config_from",
           "low_rank_factors"]
