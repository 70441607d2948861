"""Compressing a Whisper encoder into LiteWhisper: calibration, rank choice, factorisation and refinement.

The method is LiteASR's (Kamahori et al., EMNLP 2025): run calibration audio through the encoder, record the
outputs of every encoder projection (q_proj, k_proj, v_proj, out_proj, fc1 before its GELU, fc2), and replace each
projection by its projection onto the principal subspace of those outputs:

    y = x W + b  ~=  mu + (x W + b - mu) V_k V_k^T
      = x (W V_k) V_k^T + [mu + (b - mu) V_k V_k^T]

so weight1 = W V_k (in x k), weight2 = V_k^T (k x out) and bias = mu + (b - mu) V_k V_k^T, the layout of the
published `efficient-speech/lite-whisper-*` checkpoints.

What this module adds to the paper, each measured on whisper-base (see `benchmarks/pareto.py`):

* statistics are streamed (sum, sum of outer products and count in float64, per projection), one encoder layer at
  a time, so memory is O(d^2) per projection whatever the amount of audio; hidden states are kept between layers.
  fc1 (4x wider at its output) is recorded at its input and its output spectrum derived exactly from W C_x W^T;
* statistics can come from the frames that hold speech only (Whisper pads every clip to 30 s, so a 4 s clip is
  87% padding) -- `statistics_frames`;
* ranks can be chosen in a per-channel-scaled space (`channel_scale_power`): on small models a few output channels
  can hold nearly all of a projection's variance (whisper-base layer 3 fc2, channel 388: 99% of it), and an energy
  threshold on raw variance then keeps almost nothing of the other channels. Sensitivity runs on real speech
  (benchmarks/sensitivity.py) found that layer the main source of error; half-standardising (power 0.5, the
  default) took whisper-base at 0.8 from 15.9 to 12.6 real-speech WER;
* sequential calibration (layer i sees the audio through layers 0..i-1 already compressed), or the paper's one-shot;
* a parameter budget (`target_size`) spread over all layers and projections by maximising the total explained
  variance (a Lagrangian relaxation of the knapsack, then a greedy fill);
* label-free augmentation of the calibration audio (speed and noise; the original encoder labels any input);
* a label-free refinement: a distillation of the low-rank factors and biases toward the original encoder's last
  hidden state on the calibration audio, the loss split between speech and padding frames. At 0.8 it lowered its
  loss but not the real-speech WER, so by default it runs only below 0.75, where it keeps whisper-base from
  collapsing into repetition loops.
"""

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .calibration import (  # noqa: F401 (_frame_mask, _prepare_features, _run_blocks: used by tests and benchmarks)
    CalibrationBatch, _attention_block, _embed, _encoder_forward, _frame_mask, _mlp_block, _prepare_features,
    _Recorder, _run_batches, _run_blocks, prepare_batches,
)
from .common import ATTENTION_KEYS, DEFAULT_TARGET_SIZE, MLP_KEYS, RANK_MULTIPLE, CalibrationError
from .configuration_lite_whisper import LOW_RANK_KEYS, projection_shape
from .factorize import _low_rank_module, _set_projection, build_lite_whisper, low_rank_factors
from .modeling_lite_whisper import LowRankLinear, encoder_parameter_report, encoder_projection
from .ranks import (
    allocate_ranks, allocate_ranks_by_threshold, choose_rank, dense_params, low_rank_params, saving_rank_limit,
)
from .refine import refine_encoder, refine_layers, refinement_objective
from .statistics import Spectrum, StreamingStatistics, explained_variance, records_inputs, spectrum_from_statistics
from .utils import get_logger

logger = get_logger(__name__)

MODES = ("sequential", "one-shot")
STATISTICS_FRAMES = ("speech", "all")
BUDGET_RULES = ("variance", "threshold")
REFINE_PRECISIONS = ("float32", "bfloat16")
REFINE_LOSSES = ("mse", "decoder", "standardized", "transcripts")
REFINE_MODES = ("encoder", "layer", "layer-sequential")
# Below this target size the default refines (AUTO_REFINE_STEPS steps per layer); at and above it, refinement did
# not lower real-speech WER (see CompressionSettings).
AUTO_REFINE_BELOW = 0.75
AUTO_REFINE_STEPS = 300
# Peak learning rates by refinement mode: layer-wise problems are small and well conditioned, and took 5x the
# end-to-end rate best (benchmarks/results/defaults_gpu.md, plans j, k, m); end-to-end at 5e-4 diverged from the PCA start.
REFINE_LRS = {"encoder": 1e-4, "layer": 5e-4, "layer-sequential": 5e-4}


@dataclass
class CompressionSettings:
    """How `compress` chooses ranks, gathers statistics and refines.

    The defaults are what measured best on the real human speech of the dev set (benchmarks/results/defaults_gpu.md,
    whisper-base, 99 real clips, uncompressed 9.15 WER): 80% of the encoder's parameters spread over all projections
    by explained variance in a half-standardised output space (`channel_scale_power` 0.5: whisper-base's layer-3 fc2
    has one output channel holding 99% of the raw variance, and raw PCA kept that channel and little else: 15.9 WER
    at 0.8, 12.6 with the scaling), one-shot statistics from speech frames of the bundled clips plus one speed- and
    noise-perturbed copy of each (11.2-11.7 over three seeds, +22% to +28%), and no refinement at 0.8 and above:
    the label-free refinement lowered its loss but not the real-speech WER there (200 steps: 15.8, 800: 15.0, vs
    15.9 without; layer-wise, 800 steps per layer: 10.9-11.3, for more CPU time than the default may take), while
    below 0.75 it is what keeps the model from looping (0.5 without refinement: 71-147 WER; 300 layer-wise steps per
    layer: 30.7-31.4), so `refine_steps=None` means 0 at `AUTO_REFINE_BELOW` and above, else `AUTO_REFINE_STEPS`
    layer-wise steps per layer (0.65: 15.7-17.5 over three seeds, against 18.5 for the earlier end-to-end default).

    Args:
        attention_threshold: explained-variance threshold for q_proj, k_proj, v_proj and out_proj, in (0, 1]; used
            only when `target_size` is None.
        mlp_threshold: explained-variance threshold for fc1 and fc2, in (0, 1]; used only when `target_size` is None.
        target_size: fraction of the original encoder's parameters to keep, in (0, 1] (default 0.8); ranks are spread
            over all layers and projections to fit it. None chooses ranks by the thresholds (the paper's rule).
        mode: "sequential" (layer i is calibrated on the outputs of the already compressed layers 0..i-1) or
            "one-shot" (every layer on the original encoder, as in the paper).
        refine_steps: optimisation steps of the label-free refinement (per layer in the layer-wise modes); 0
            disables it; None (default) chooses by size: 0 when `target_size` is None or at least
            `AUTO_REFINE_BELOW`, else `AUTO_REFINE_STEPS`.
        refine_batch_size: inputs per batch; statistics, teacher outputs and refinement steps share the batches.
        refine_lr: peak AdamW learning rate of the refinement (after a linear warm-up, then cosine decay); None:
            `REFINE_LRS[refine_mode]` (5e-4 layer-wise, 1e-4 end to end).
        refine_warmup_steps: linear warm-up steps (at most a quarter of the steps).
        refine_weight_decay: AdamW weight decay.
        refine_speech_share: None weighs every frame alike in the refinement loss; a share s in (0, 1) gives
            the speech frames weight s and Whisper's padding frames 1 - s.
        refine_layer_norms: also train the encoder's layer norms during refinement.
        refine_loss: how the refinement measures the error of the last hidden state: "mse" (every channel alike),
            "decoder" (as the decoder's cross-attention keys and values read it; `refine.decoder_metric`) or
            "standardized" (each channel divided by its standard deviation) or "transcripts" (KL divergence of the
            decoder's next-token distributions on the original model's own transcripts; `refine.TranscriptObjective`;
            full windows only).
        refine_mode: "layer" trains each layer alone to reproduce the original layer's output from the original's
            inputs (`refine.refine_layers`; `refine_steps` steps per layer); "layer-sequential" the same from the
            outputs of the compressed layers before it; "encoder" trains all factors together against the
            original encoder's last hidden state (`refine_loss`). None (default): "layer" with one-shot statistics
            and the "mse" loss, else "encoder". At 0.65 layer-wise measured 15.7-17.5 real-speech WER against
            17.3-18.7 end to end, at 0.5 30.7-31.4 against 31.3, and cost less per step.
        refine_precision: "float32", or "bfloat16" to run the refinement's forward and backward passes under
            bfloat16 autocast (weights, optimiser and loss stay float32).
        crop_padding: None runs every input as Whisper's full 30 s window; a share p keeps only the speech frames plus
            max(64, p * speech) frames of the padding after them (see `calibration.crop_length`), for statistics,
            teacher and refinement alike.
        piece_s: calibration clips are cut into inputs of at most this many seconds (None: 30 s windows); shorter
            inputs make shorter crops, so a refinement step costs less.
        augmentations: label-free augmentations of the calibration audio (names from `lite_whisper.augment`);
            `augment_copies` augmented copies of every clip are added to the calibration inputs.
        augment_copies: augmented copies per clip (0: none).
        budget_rule: how `target_size` spreads parameters: "variance" maximises the summed explained-variance
            ratio of all projections; "threshold" finds one explained-variance threshold shared by all of them.
        statistics_frames: "speech" (only the encoder frames that cover the audio, not Whisper's 30 s padding) or
            "all" (every frame of the input, as in the paper).
        channel_scale_power: 0 ranks and projects in the raw output space (the paper); p > 0 first divides each
            output channel by its standard deviation to the power p (1 = correlation PCA), so that a few very
            large channels cannot take the whole rank.
        rank_multiple: ranks are multiples of this (16 in the published checkpoints).
        seed: seed of the batch grouping, augmentation and refinement order.
    """

    attention_threshold: float = 0.99
    mlp_threshold: float = 0.999
    target_size: float | None = DEFAULT_TARGET_SIZE
    mode: str = "one-shot"
    refine_steps: int | None = None
    refine_batch_size: int = 4
    refine_lr: float | None = None
    refine_warmup_steps: int = 10
    refine_weight_decay: float = 0.0
    refine_speech_share: float | None = 0.5
    refine_layer_norms: bool = False
    refine_precision: str = "float32"
    refine_loss: str = "mse"
    refine_mode: str | None = None
    # Crops (0.25, 10 s) cost about a quarter per refinement step but measured +194 % relative WER on real speech at
    # 0.8 (benchmarks/results/defaults.md); the default stays on full 30 s windows until crops measure as well.
    crop_padding: float | None = None
    piece_s: float | None = None
    augmentations: tuple = ("speed", "noise")
    augment_copies: int = 1
    budget_rule: str = "variance"
    statistics_frames: str = "speech"
    channel_scale_power: float = 0.5
    rank_multiple: int = RANK_MULTIPLE
    seed: int = 0

    def validate(self):
        for name in ("attention_threshold", "mlp_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.target_size is not None:
            if not isinstance(self.target_size, (int, float)) or not 0.0 < float(self.target_size) <= 1.0:
                raise ValueError(
                    f"target_size must be a fraction of the original encoder's parameters in (0, 1], got {self.target_size!r}"
                )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.statistics_frames not in STATISTICS_FRAMES:
            raise ValueError(f"statistics_frames must be one of {', '.join(STATISTICS_FRAMES)}, got {self.statistics_frames!r}")
        if self.refine_steps is None:
            small = self.target_size is not None and float(self.target_size) < AUTO_REFINE_BELOW
            self.refine_steps = AUTO_REFINE_STEPS if small else 0
        for name in ("refine_steps", "refine_warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.crop_padding is not None and not (isinstance(self.crop_padding, (int, float)) and self.crop_padding >= 0):
            raise ValueError(f"crop_padding must be None or a non-negative share, got {self.crop_padding!r}")
        if self.piece_s is not None and not (isinstance(self.piece_s, (int, float)) and 1.0 <= self.piece_s <= 30.0):
            raise ValueError(f"piece_s must be None or in [1, 30] seconds, got {self.piece_s!r}")
        from .augment import parse_augmentations

        self.augmentations = parse_augmentations(self.augmentations)
        if not isinstance(self.augment_copies, int) or self.augment_copies < 0:
            raise ValueError(f"augment_copies must be a non-negative integer, got {self.augment_copies!r}")
        for name in ("refine_batch_size", "rank_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.refine_mode is None:
            self.refine_mode = "layer" if self.mode == "one-shot" and self.refine_loss == "mse" else "encoder"
        if self.refine_lr is None:
            self.refine_lr = REFINE_LRS.get(self.refine_mode, REFINE_LRS["encoder"])
        if not self.refine_lr > 0:
            raise ValueError(f"refine_lr must be positive, got {self.refine_lr!r}")
        if self.refine_weight_decay < 0:
            raise ValueError(f"refine_weight_decay must be non-negative, got {self.refine_weight_decay!r}")
        if self.refine_speech_share is not None and not 0.0 < self.refine_speech_share < 1.0:
            raise ValueError(f"refine_speech_share must be None or in (0, 1), got {self.refine_speech_share!r}")
        if self.refine_loss not in REFINE_LOSSES:
            raise ValueError(f"refine_loss must be one of {', '.join(REFINE_LOSSES)}, got {self.refine_loss!r}")
        if self.refine_loss == "transcripts" and self.crop_padding is not None:
            raise ValueError("refine_loss='transcripts' needs full 30 s windows: set crop_padding=None")
        if self.refine_mode not in REFINE_MODES:
            raise ValueError(f"refine_mode must be one of {', '.join(REFINE_MODES)}, got {self.refine_mode!r}")
        if self.refine_mode != "encoder" and (self.mode != "one-shot" or self.refine_loss != "mse"):
            raise ValueError(f"refine_mode={self.refine_mode!r} needs mode='one-shot' and refine_loss='mse'")
        if self.refine_precision not in REFINE_PRECISIONS:
            raise ValueError(f"refine_precision must be one of {', '.join(REFINE_PRECISIONS)}, got {self.refine_precision!r}")
        if self.budget_rule not in BUDGET_RULES:
            raise ValueError(f"budget_rule must be one of {', '.join(BUDGET_RULES)}, got {self.budget_rule!r}")
        if not 0.0 <= self.channel_scale_power <= 1.0:
            raise ValueError(f"channel_scale_power must be in [0, 1], got {self.channel_scale_power!r}")
        return self

    def threshold(self, key):
        return self.attention_threshold if key in ATTENTION_KEYS else self.mlp_threshold


@dataclass
class CompressionResult:
    model: object  # LiteWhisperForConditionalGeneration, on CPU, fp32
    report: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def _resolve_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _projection_shapes(config):
    shapes = {}
    for key in LOW_RANK_KEYS:
        in_features, out_features = projection_shape(config, key)
        shapes[key] = (in_features, out_features, key != "k_proj")
    return shapes


def compress(model, audio, feature_extractor, settings=None, device=None, progress=True):
    """Compress the encoder of a Whisper model into a LiteWhisper model.

    Stages, each timed in the report (`timings_s`): features (log-mel, crops, augmentation), statistics (one pass
    through the encoder, layer by layer), factorisation (spectra, rank allocation, factors), teacher (the original
    encoder's outputs; taken from the statistics pass in one-shot mode), refinement, build.

    Args:
        model: a transformers `WhisperForConditionalGeneration` (any size, any dtype; left untouched).
        audio: list of 1-D float32 numpy arrays at the feature extractor's sampling rate (16 kHz).
        feature_extractor: the model's `WhisperFeatureExtractor`.
        settings: a `CompressionSettings` (defaults when None).
        device: where calibration and refinement run; None picks CUDA when available, else CPU. Statistics are
            always float32 activations accumulated in float64.
        progress: show tqdm progress bars.

    Returns a `CompressionResult` with the LiteWhisper model (CPU, fp32, the base's generation config) and a
    JSON-serialisable report.
    """
    from tqdm.auto import tqdm

    settings = copy.deepcopy(settings) if settings is not None else CompressionSettings()
    settings.validate()
    _check_model(model)
    device = _resolve_device(device)
    timings = {"features_s": 0.0, "statistics_s": 0.0, "factorisation_s": 0.0, "teacher_s": 0.0,
               "refinement_s": 0.0, "build_s": 0.0}
    config = model.config
    shapes = _projection_shapes(config)
    n_layers = config.encoder_layers
    total_frames = config.max_source_positions

    clock = time.perf_counter()
    if int(feature_extractor.nb_max_frames) != total_frames * 2:
        raise CalibrationError(
            f"the feature extractor makes {feature_extractor.nb_max_frames} mel frames, the encoder expects {total_frames * 2}")
    batches, n_inputs = prepare_batches(
        audio, feature_extractor, total_frames, settings.refine_batch_size, settings.crop_padding,
        settings.augmentations, settings.augment_copies, settings.seed, settings.piece_s)
    masks = [b.speech.to(device) if settings.statistics_frames == "speech" else torch.ones_like(b.speech, device=device)
             for b in batches]
    n_stat_frames = int(sum(int(m.sum()) for m in masks))
    n_frames = sum(b.features.shape[0] * b.frames for b in batches)
    timings["features_s"] = time.perf_counter() - clock
    logger.info(
        "calibrating on %d inputs (%d with augmentation), %d encoder frames (%.0f%% of full windows), %d statistics"
        " frames (%s), mode %s", sum(b.features.shape[0] for b in batches), sum(b.features.shape[0] for b in batches)
        - n_inputs, n_frames, 100 * n_frames / (total_frames * sum(b.features.shape[0] for b in batches)),
        n_stat_frames, settings.statistics_frames, settings.mode,
    )
    if n_stat_frames <= settings.rank_multiple:
        raise CalibrationError(
            f"only {n_stat_frames} calibration frames: at least {settings.rank_multiple + 1} are needed for a rank of"
            f" {settings.rank_multiple}; give more or longer audio"
        )

    # A float32 working copy of the encoder on the calibration device; the caller's model is never modified.
    encoder = copy.deepcopy(model.model.encoder).to(device=device, dtype=torch.float32).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    original_layers = [copy.deepcopy(layer) for layer in encoder.layers] if settings.mode == "sequential" else None

    # Hidden states before layer 0, one tensor per batch, kept between layers (never re-running the prefix).
    clock = time.perf_counter()
    with torch.no_grad():
        hidden = [_embed(encoder, b.features.to(device)) for b in batches]
    timings["statistics_s"] += time.perf_counter() - clock

    spectra = {}  # (layer, key) -> Spectrum
    ranks = {}  # (layer, key) -> rank or None
    factors = {}  # (layer, key) -> (weight1, weight2, bias)

    def keep_limit(key):
        in_features, out_features, _ = shapes[key]
        return min(saving_rank_limit(in_features, out_features), out_features)

    def spectrum_of(layer, key, stats):
        clock_ = time.perf_counter()
        module = encoder_projection(layer, key)
        in_features, out_features, _ = shapes[key]
        weights = (module.weight, module.bias) if records_inputs(in_features, out_features) else (None, None)
        spectrum = spectrum_from_statistics(stats, settings.channel_scale_power, keep_limit(key), *weights)
        timings["factorisation_s"] += time.perf_counter() - clock_
        return spectrum

    def record(layer, keys, block, hidden_in):
        clock_ = time.perf_counter()
        recorder = _Recorder(layer, keys, device)
        try:
            with torch.no_grad():
                out = _run_batches(block, layer, hidden_in, masks, recorder)
        finally:
            recorder.close()
        timings["statistics_s"] += time.perf_counter() - clock_
        return out, recorder.stats

    def run(block, layer, hidden_in):
        clock_ = time.perf_counter()
        with torch.no_grad():
            out = _run_batches(block, layer, hidden_in, masks)
        timings["statistics_s"] += time.perf_counter() - clock_
        return out

    def set_factors(layer_index, key, spectrum, rank):
        clock_ = time.perf_counter()
        spectra[(layer_index, key)] = spectrum
        ranks[(layer_index, key)] = rank
        if rank is not None:
            _check_frames(rank, spectrum.count, layer_index, key)
            module = encoder_projection(original_layer(layer_index), key)
            factors[(layer_index, key)] = low_rank_factors(module.weight, module.bias, spectrum, rank)
        spectrum.eigenvectors = None  # only the eigenvalues are needed from here on (report)
        timings["factorisation_s"] += time.perf_counter() - clock_

    def factorise(layer_index, key, stats):
        spectrum = spectrum_of(original_layer(layer_index), key, stats[key])
        in_features, out_features, _ = shapes[key]
        if fixed_ranks is not None:  # budget mode: ranks were allocated from the one-shot spectra
            rank = fixed_ranks[(layer_index, key)]
        else:
            rank = choose_rank(spectrum.eigenvalues, settings.threshold(key), in_features, out_features, settings.rank_multiple)
        set_factors(layer_index, key, spectrum, rank)

    def original_layer(i):
        return original_layers[i] if original_layers is not None else encoder.layers[i]

    def apply(layer, layer_index, keys):
        for key in keys:
            if ranks.get((layer_index, key)) is not None:
                _set_projection(layer, key, _low_rank_module(*factors[(layer_index, key)]))

    # In one-shot mode the statistics pass runs the original encoder over every batch: its last hidden states,
    # after the final layer norm, are exactly the teacher's outputs, so no second pass is needed.
    teacher = None
    fixed_ranks = None
    # Layer-wise refinement starts again from the stem's outputs (the statistics pass replaces `hidden` in threshold
    # mode).
    stem = hidden if settings.refine_steps > 0 and settings.refine_mode != "encoder" else None
    if settings.target_size is not None:
        # Budget mode needs every layer's spectrum before any rank is chosen: one one-shot pass first.
        h = hidden
        budget_spectra = {}
        for i in tqdm(range(n_layers), desc="statistics (encoder layers)", disable=not progress):
            layer = encoder.layers[i]
            mid, stats_a = record(layer, ATTENTION_KEYS, _attention_block, h)
            h, stats_m = record(layer, MLP_KEYS, _mlp_block, mid)
            for key, stats in {**stats_a, **stats_m}.items():
                budget_spectra[(i, key)] = spectrum_of(layer, key, stats)
            del stats_a, stats_m, mid
        if settings.mode == "one-shot":
            with torch.no_grad():
                teacher = [encoder.layer_norm(x) for x in h]
        del h
        clock = time.perf_counter()
        fixed_ranks = _allocate_for_target(model, budget_spectra, shapes, settings)
        timings["factorisation_s"] += time.perf_counter() - clock
        if settings.mode == "one-shot":
            for (i, key), spectrum in budget_spectra.items():
                set_factors(i, key, spectrum, fixed_ranks[(i, key)])
        del budget_spectra

    if settings.target_size is None or settings.mode == "sequential":
        for i in tqdm(range(n_layers), desc=f"statistics ({settings.mode}, encoder layers)", disable=not progress):
            layer = encoder.layers[i]
            if settings.mode == "one-shot":
                # Statistics of all six projections from the original layer on the original hidden states.
                mid, stats_a = record(layer, ATTENTION_KEYS, _attention_block, hidden)
                hidden, stats_m = record(layer, MLP_KEYS, _mlp_block, mid)
                for key in LOW_RANK_KEYS:
                    factorise(i, key, stats_a if key in ATTENTION_KEYS else stats_m)
                del mid, stats_a, stats_m
            else:
                # Attention first (its inputs already went through the compressed layers 0..i-1) ...
                _, stats_a = record(layer, ATTENTION_KEYS, _attention_block, hidden)
                for key in ATTENTION_KEYS:
                    factorise(i, key, stats_a)
                apply(layer, i, ATTENTION_KEYS)
                # ... then the MLP, calibrated on the output of the compressed attention.
                mid = run(_attention_block, layer, hidden)
                _, stats_m = record(layer, MLP_KEYS, _mlp_block, mid)
                for key in MLP_KEYS:
                    factorise(i, key, stats_m)
                apply(layer, i, MLP_KEYS)
                hidden = run(_mlp_block, layer, mid)
                del mid, stats_a, stats_m
        if settings.mode == "one-shot":
            with torch.no_grad():
                teacher = [encoder.layer_norm(x) for x in hidden]
    del hidden

    refine_report = {"steps": settings.refine_steps}
    if stem is not None and factors:
        teacher = None  # layer-wise: the targets are each original layer's outputs, recomputed as it goes
        layers = [copy.deepcopy(layer) for layer in encoder.layers]
        for i, layer in enumerate(layers):
            apply(layer, i, LOW_RANK_KEYS)
        clock = time.perf_counter()
        initial, final = refine_layers(encoder.layers, layers, stem, batches, settings, device, progress)
        timings["refinement_s"] = time.perf_counter() - clock
        for (i, key) in list(factors):
            module = encoder_projection(layers[i], key)
            factors[(i, key)] = (module.weight1.detach(), module.weight2.detach(), module.bias.detach())
        refine_report.update({"mode": settings.refine_mode, "steps_per_layer": settings.refine_steps,
                              "initial_loss": initial, "final_loss": final, "batch_size": settings.refine_batch_size,
                              "lr": settings.refine_lr})
        del layers
    elif settings.refine_steps > 0 and factors:
        if teacher is None:
            # Sequential mode: the working encoder's layers are already compressed; swap the originals in.
            clock = time.perf_counter()
            compressed_layers = encoder.layers
            encoder.layers = nn.ModuleList(original_layers)
            try:
                with torch.no_grad():
                    teacher = [_encoder_forward(encoder, b.features.to(device)) for b in batches]
            finally:
                encoder.layers = compressed_layers
            timings["teacher_s"] = time.perf_counter() - clock
        student = encoder
        for i, layer in enumerate(student.layers):
            apply(layer, i, [key for key in LOW_RANK_KEYS if not isinstance(encoder_projection(layer, key), LowRankLinear)])
        clock = time.perf_counter()
        objective = refinement_objective(settings, model, batches, teacher, device)
        initial, final = refine_encoder(student, batches, objective, settings, device, progress)
        del objective
        timings["refinement_s"] = time.perf_counter() - clock
        for (i, key) in list(factors):
            module = encoder_projection(student.layers[i], key)
            factors[(i, key)] = (module.weight1.detach(), module.weight2.detach(), module.bias.detach())
        refine_report.update({"mode": "encoder", "initial_loss": initial, "final_loss": final,
                              "batch_size": settings.refine_batch_size, "lr": settings.refine_lr,
                              "teacher": "statistics pass" if settings.mode == "one-shot" else "separate pass"})
    del teacher

    clock = time.perf_counter()
    cpu_factors = {k: tuple(t.detach().float().cpu() for t in v) for k, v in factors.items()}
    lite = build_lite_whisper(model, cpu_factors).to(device="cpu", dtype=torch.float32)
    timings["build_s"] = time.perf_counter() - clock
    del encoder, original_layers

    calibration = {"clips": len(audio), "inputs": sum(b.features.shape[0] for b in batches),
                   "augmented_inputs": sum(b.features.shape[0] for b in batches) - n_inputs,
                   "encoder_frames": n_frames, "full_window_frames": total_frames * sum(b.features.shape[0] for b in batches)}
    report = _report(lite, settings, spectra, ranks, shapes, calibration, n_stat_frames, refine_report, timings)
    return CompressionResult(model=lite, report=report)


def _check_model(model):
    from transformers import WhisperForConditionalGeneration

    if not isinstance(model, WhisperForConditionalGeneration):
        raise ValueError(f"compress needs a WhisperForConditionalGeneration, got {type(model).__name__}")
    for i, layer in enumerate(model.model.encoder.layers):
        for key in LOW_RANK_KEYS:
            if isinstance(encoder_projection(layer, key), LowRankLinear):
                raise ValueError(
                    f"encoder layer {i} {key} is already low-rank: compress an uncompressed Whisper model instead"
                )


def _check_frames(rank, count, layer, key):
    # A covariance of n frames has rank at most n - 1: more directions than that would be arbitrary.
    if count <= rank:
        raise CalibrationError(
            f"encoder layer {layer} {key}: rank {rank} needs more than {rank} calibration frames, only {count} were"
            " seen; give more or longer calibration audio (or use statistics_frames='all')"
        )


def _allocate_for_target(model, spectra, shapes, settings):
    """Per-(layer, key) ranks for `settings.target_size` of the original encoder's parameters."""
    report = encoder_parameter_report(model)
    original = report["original_encoder_params"]
    projections_full = sum(row["full_rank_params"] for row in report["layers"])
    if any(row["ranks"] for row in report["layers"]):
        raise ValueError("target_size needs an uncompressed Whisper model as the base")
    fixed = original - projections_full  # convolutions, positions, layer norms: not compressed
    budget = settings.target_size * original - fixed
    if budget <= 0:
        raise ValueError(
            f"target_size {settings.target_size} leaves no room for the projections: the parts that are not"
            f" compressed already take {fixed / original:.1%} of the encoder"
        )
    names = {f"{i}.{key}": (i, key) for (i, key) in spectra}
    allocate = allocate_ranks if settings.budget_rule == "variance" else allocate_ranks_by_threshold
    allocation = allocate(
        {name: spectra[ik].eigenvalues for name, ik in names.items()},
        {name: shapes[ik[1]] for name, ik in names.items()},
        budget,
        settings.rank_multiple,
    )
    return {names[name]: rank for name, rank in allocation.items()}


def _report(lite, settings, spectra, ranks, shapes, calibration, n_frames, refine_report, timings):
    params = encoder_parameter_report(lite)
    layers = []
    for i in range(lite.config.encoder_layers):
        row = {"layer": i}
        for key in LOW_RANK_KEYS:
            spectrum = spectra.get((i, key))
            rank = ranks.get((i, key))
            in_features, out_features, _ = shapes[key]
            explained = 1.0 if rank is None or spectrum is None else float(spectrum.explained()[rank - 1])
            row[key] = {"rank": rank, "full_rank": rank is None, "explained_variance": explained,
                        "in_features": in_features, "out_features": out_features}
        layers.append(row)
    timings = {k: round(float(v), 3) for k, v in timings.items()}
    timings["total_s"] = round(sum(v for k, v in timings.items()), 3)
    return {
        "settings": asdict(settings),
        "thresholds": None if settings.target_size is not None else {
            "attention": settings.attention_threshold, "mlp": settings.mlp_threshold},
        "target_size": settings.target_size,
        "mode": settings.mode,
        "encoder_params_before": params["original_encoder_params"],
        "encoder_params_after": params["encoder_params"],
        "encoder_fraction": params["fraction"],
        "calibration": {**calibration, "statistics_frames": n_frames, "frames_kind": settings.statistics_frames},
        "refinement": refine_report,
        "layers": layers,
        "timings_s": timings,
    }


__all__ = [
    "CalibrationError",
    "CompressionResult",
    "CompressionSettings",
    "Spectrum",
    "StreamingStatistics",
    "allocate_ranks",
    "choose_rank",
    "compress",
    "explained_variance",
    "low_rank_factors",
    "refine_encoder",
    "allocate_ranks_by_threshold",
    "dense_params",
    "low_rank_params",
    "records_inputs",
    "saving_rank_limit",
    "spectrum_from_statistics",
]
