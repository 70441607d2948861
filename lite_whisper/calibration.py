"""Running the encoder for calibration: features, speech masks, the encoder stem and blocks, statistics hooks."""

import numpy as np
import torch
from torch import nn

from .common import CalibrationError
from .modeling_lite_whisper import encoder_projection
from .statistics import StreamingStatistics, records_inputs
from .utils import get_logger

logger = get_logger(__name__)


def _prepare_features(audio, feature_extractor):
    """Log-mel features (N x mels x frames) and the number of encoder frames covering audio in each input.

    Clips longer than the feature extractor's window (30 s) are cut into windows, so no audio is thrown away.
    """
    window = int(feature_extractor.n_samples)
    pieces = []
    for i, clip in enumerate(audio):
        clip = np.asarray(clip, dtype=np.float32).reshape(-1)
        if clip.size == 0:
            logger.warning("calibration clip %d is empty; skipped", i)
            continue
        for start in range(0, clip.size, window):
            piece = clip[start : start + window]
            if piece.size >= 160:  # at least one mel frame
                pieces.append(piece)
    if not pieces:
        raise CalibrationError("no usable calibration audio (every clip was empty)")
    features, speech_frames = [], []
    for start in range(0, len(pieces), 32):
        chunk = pieces[start : start + 32]
        out = feature_extractor(
            chunk, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt", return_attention_mask=True
        )
        features.append(out["input_features"].float())
        # The encoder's second convolution has stride 2: encoder frame j covers mel frames 2j and 2j+1.
        mel_frames = out["attention_mask"].sum(dim=1)
        speech_frames.extend(((mel_frames + 1) // 2).tolist())
    return torch.cat(features), speech_frames


def _frame_mask(speech_frames, total_frames, use_speech, device):
    lengths = torch.tensor(speech_frames, device=device).clamp(max=total_frames)
    if not use_speech:
        return torch.ones(len(speech_frames), total_frames, dtype=torch.bool, device=device)
    return torch.arange(total_frames, device=device)[None, :] < lengths[:, None]


def _embed(encoder, features):
    """Whisper's encoder stem: two convolutions with GELU, plus positions (what the first layer sees)."""
    x = nn.functional.gelu(encoder.conv1(features))
    x = nn.functional.gelu(encoder.conv2(x))
    x = x.permute(0, 2, 1)
    positions = encoder.embed_positions.weight[: x.shape[1]]
    return x + positions


def _attention_block(layer, hidden):
    out = layer.self_attn(hidden_states=layer.self_attn_layer_norm(hidden), attention_mask=None)[0]
    return hidden + out


def _mlp_block(layer, hidden):
    x = layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden)))
    return hidden + layer.fc2(x)


class _Recorder:
    """Forward hooks that stream the outputs (or, for wide projections, inputs) of projections into statistics."""

    def __init__(self, layer, keys, device):
        self.stats = {}
        self.mask = None
        self.handles = []
        for key in keys:
            module = encoder_projection(layer, key)
            use_input = records_inputs(module.in_features, module.out_features)
            self.stats[key] = StreamingStatistics(module.in_features if use_input else module.out_features, device=device)
            self.handles.append(module.register_forward_hook(self._hook(key, use_input)))

    def _hook(self, key, use_input):
        def hook(module, inputs, output):
            values = inputs[0] if use_input else output
            rows = values[self.mask] if self.mask is not None else values.reshape(-1, values.shape[-1])
            self.stats[key].update(rows)

        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _run_blocks(block, layer, hidden, masks, batch_size, recorder=None, keep_output=True):
    """Apply `block` to all clips' hidden states in batches; optionally record statistics; return the outputs."""
    outputs = []
    for start in range(0, hidden.shape[0], batch_size):
        if recorder is not None:
            recorder.mask = masks[start : start + batch_size]
        out = block(layer, hidden[start : start + batch_size])
        if keep_output:
            outputs.append(out)
    return torch.cat(outputs) if keep_output else None


def _encoder_forward(encoder, features):
    hidden = _embed(encoder, features)
    for layer in encoder.layers:
        hidden = layer(hidden, None)
        if isinstance(hidden, tuple):  # older transformers return (hidden_states,)
            hidden = hidden[0]
    return encoder.layer_norm(hidden)
