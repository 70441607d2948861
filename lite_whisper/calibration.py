"""Running the encoder for calibration: features, speech masks, the encoder stem and blocks, statistics hooks."""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .common import CalibrationError
from .modeling_lite_whisper import encoder_projection
from .statistics import StreamingStatistics, records_inputs
from .utils import get_logger

logger = get_logger(__name__)


def _split_windows(audio, window):
    """Clips cut into pieces of at most one window (30 s), so no audio is thrown away; empty clips skipped."""
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
    return pieces


def _features(pieces, feature_extractor):
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


def _prepare_features(audio, feature_extractor):
    """Log-mel features (N x mels x frames) and the number of encoder frames covering audio in each input."""
    return _features(_split_windows(audio, int(feature_extractor.n_samples)), feature_extractor)


@dataclass
class CalibrationBatch:
    """Inputs that the teacher and the student both see, cropped to `frames` encoder frames from the start.

    `features` is (B x mels x 2*frames): Whisper's own log-mel of the 30 s window, cut after frame `frames`, so every
    kept value is what the full window has. `speech` marks the frames that cover audio; the rest of the crop is
    Whisper's padding.
    """

    features: torch.Tensor
    speech: torch.Tensor  # (B x frames) bool
    augmented: bool = False

    @property
    def frames(self):
        return self.speech.shape[1]


def crop_length(speech_frames, total_frames, crop_padding, min_padding=64, multiple=16):
    """Encoder frames kept for an input with `speech_frames` of audio: all of it plus a share of the padding.

    None keeps Whisper's whole 30 s window. Otherwise max(min_padding, crop_padding * speech) padding frames are kept,
    rounded up to a multiple of 16, so the crop still shows the encoder speech followed by silence, the pattern of
    every short input at inference.
    """
    if crop_padding is None:
        return total_frames
    padding = max(min_padding, int(np.ceil(crop_padding * speech_frames)))
    length = int(np.ceil((speech_frames + padding) / multiple) * multiple)
    return min(total_frames, length)


def prepare_batches(audio, feature_extractor, total_frames, batch_size, crop_padding=None, augmentations=(),
                    augment_copies=0, seed=0, piece_s=None):
    """Calibration inputs as batches of similar crop length: the clips, then `augment_copies` augmented copies.

    Returns (batches, n_clips_inputs): the first inputs are the clips themselves, cut into pieces of at most
    `piece_s` seconds (None: Whisper's 30 s window). Each piece is one input, as a clip of that length would be at
    inference: audio, then padding. Batches are grouped by crop length (with a seeded shuffle among equal lengths),
    so a batch wastes few frames.
    """
    from .augment import FEATURE_AUGMENTATIONS, WAVEFORM_AUGMENTATIONS, augment_waveform, parse_augmentations, spec_augment

    augmentations = parse_augmentations(augmentations)
    window = int(feature_extractor.n_samples)
    pieces = _split_windows(audio, window if piece_s is None else min(window, int(piece_s * feature_extractor.sampling_rate)))
    features, speech_frames = _features(pieces, feature_extractor)
    augmented = [False] * len(pieces)
    if augment_copies and augmentations:
        rng = np.random.default_rng(seed)
        wave = [a for a in augmentations if a in WAVEFORM_AUGMENTATIONS]
        extra = [augment_waveform(p, wave, rng, others=pieces, max_samples=window) for _ in range(augment_copies)
                 for p in pieces] if wave else [p for _ in range(augment_copies) for p in pieces]
        extra_features, extra_frames = _features(extra, feature_extractor)
        if any(a in FEATURE_AUGMENTATIONS for a in augmentations):
            generator = torch.Generator().manual_seed(seed)
            extra_features = spec_augment(extra_features, extra_frames, generator)
        features = torch.cat([features, extra_features])
        speech_frames = speech_frames + extra_frames
        augmented += [True] * len(extra)
    lengths = [crop_length(min(s, total_frames), total_frames, crop_padding) for s in speech_frames]
    tiebreak = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tiebreak[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        frames = max(lengths[i] for i in index)
        speech = torch.arange(frames)[None, :] < torch.tensor([speech_frames[i] for i in index])[:, None]
        batches.append(CalibrationBatch(features=features[index, :, : 2 * frames].contiguous(), speech=speech,
                                        augmented=any(augmented[i] for i in index)))
    return batches, len(pieces)


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


def _run_batches(block, layer, hiddens, masks, recorder=None):
    """Apply `block` to each batch's hidden states (a list: crops differ in length); optionally record statistics."""
    outputs = []
    for hidden, mask in zip(hiddens, masks):
        if recorder is not None:
            recorder.mask = mask
        outputs.append(block(layer, hidden))
    return outputs
