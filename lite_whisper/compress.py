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
  threshold on raw variance then keeps almost nothing of the other channels (measured: no better than raw
  variance once refined, so off by default);
* sequential calibration (layer i sees the audio through layers 0..i-1 already compressed), or the paper's one-shot;
* a parameter budget (`target_size`) spread over all layers and projections by maximising the total explained
  variance (a Lagrangian relaxation of the knapsack, then a greedy fill);
* a label-free refinement: a short distillation of the low-rank factors and biases toward the original encoder's
  last hidden state on the calibration audio, the loss split between speech and padding frames. This is what
  makes small models work: without it whisper-base collapses into repetition loops below ~90% of its encoder.
"""

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .configuration_lite_whisper import LOW_RANK_KEYS, projection_shape
from .factorize import build_lite_whisper
from .modeling_lite_whisper import LowRankLinear, encoder_parameter_report, encoder_projection
from .utils import get_logger

logger = get_logger(__name__)

ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_KEYS = ("fc1", "fc2")
MODES = ("sequential", "one-shot")
STATISTICS_FRAMES = ("speech", "all")
BUDGET_RULES = ("variance", "threshold")
RANK_MULTIPLE = 16


class CalibrationError(ValueError):
    """The calibration audio cannot support the factorisation asked for (e.g. too few frames for a rank)."""


@dataclass
class CompressionSettings:
    """How `compress` chooses ranks, gathers statistics and refines.

    The defaults are what measured best on whisper-base (benchmarks/results/levers.md and pareto.md; calibration on
    one half of the dev short clips, WER on the other half): one-shot statistics from speech frames, raw-variance
    ranks, the variance budget rule, and 200 refinement steps (batch 4, lr 2e-4) with the loss split evenly between
    speech and padding frames. Without refinement every setting below ~90% of the encoder lost 50% or more relative
    WER; with it, 80% was 4-11% better than the original and 65% 4-11% worse (three seeds). Refinement is seconds
    on a GPU and roughly 15 minutes for whisper-base on two CPU cores; `refine_steps=0` skips it.

    Args:
        attention_threshold: explained-variance threshold for q_proj, k_proj, v_proj and out_proj, in (0, 1].
        mlp_threshold: explained-variance threshold for fc1 and fc2, in (0, 1].
        target_size: fraction of the original encoder's parameters to keep, in (0, 1]; when set, the thresholds are
            ignored and ranks are spread over all layers and projections to fit the budget.
        mode: "sequential" (layer i is calibrated on the outputs of the already compressed layers 0..i-1) or
            "one-shot" (every layer on the original encoder, as in the paper).
        refine_steps: optimisation steps of the label-free refinement; 0 disables it.
        refine_batch_size: clips per refinement step.
        refine_lr: peak AdamW learning rate of the refinement (after a linear warm-up, then cosine decay).
        refine_warmup_steps: linear warm-up steps.
        refine_weight_decay: AdamW weight decay.
        statistics_frames: "speech" (only the encoder frames that cover the audio, not Whisper's 30 s padding) or
            "all" (every frame, as in the paper).
        channel_scale_power: 0 ranks and projects in the raw output space (the paper); p > 0 first divides each
            output channel by its standard deviation to the power p (1 = correlation PCA), so that a few very
            large channels cannot take the whole rank.
        rank_multiple: ranks are multiples of this (16 in the published checkpoints).
        batch_size: clips per forward pass during calibration.
        refine_speech_share: None weighs every frame alike in the refinement loss; a share s in (0, 1) gives
            the speech frames weight s and Whisper's padding frames 1 - s.
        refine_layer_norms: also train the encoder's layer norms during refinement.
        budget_rule: how `target_size` spreads parameters: "variance" maximises the summed explained-variance
            ratio of all projections; "threshold" finds one explained-variance threshold shared by all of them.
        seed: seed of the refinement's batch order.
    """

    attention_threshold: float = 0.99
    mlp_threshold: float = 0.999
    target_size: float | None = None
    mode: str = "one-shot"
    refine_steps: int = 200
    refine_batch_size: int = 4
    refine_lr: float = 2e-4
    refine_warmup_steps: int = 10
    refine_weight_decay: float = 0.0
    refine_speech_share: float | None = 0.5
    refine_layer_norms: bool = False
    budget_rule: str = "variance"
    statistics_frames: str = "speech"
    channel_scale_power: float = 0.0
    rank_multiple: int = RANK_MULTIPLE
    batch_size: int = 8
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
        for name in ("refine_steps", "refine_warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("refine_batch_size", "rank_multiple", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.refine_lr > 0:
            raise ValueError(f"refine_lr must be positive, got {self.refine_lr!r}")
        if self.refine_weight_decay < 0:
            raise ValueError(f"refine_weight_decay must be non-negative, got {self.refine_weight_decay!r}")
        if self.refine_speech_share is not None and not 0.0 < self.refine_speech_share < 1.0:
            raise ValueError(f"refine_speech_share must be None or in (0, 1), got {self.refine_speech_share!r}")
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
# Streaming statistics and spectra
# --------------------------------------------------------------------------------------------------------------


class StreamingStatistics:
    """Sum, sum of outer products and count of row vectors, accumulated in float64.

    Memory is O(dim^2) whatever the number of rows; the activations themselves are never kept.
    """

    def __init__(self, dim, device="cpu"):
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, rows):
        """Add rows of shape (n, dim) (any float dtype)."""
        if rows.numel() == 0:
            return
        rows = rows.reshape(-1, self.dim).to(device=self.sum.device, dtype=torch.float64)
        self.sum += rows.sum(dim=0)
        # addmm keeps the accumulation in float64 without a temporary (dim x dim) per batch.
        self.outer.addmm_(rows.t(), rows)
        self.count += rows.shape[0]

    def mean(self):
        return self.sum / max(self.count, 1)

    def covariance(self):
        """Centred covariance (population normalisation: the scale does not change explained-variance ratios)."""
        if self.count == 0:
            raise CalibrationError("no calibration frames reached this projection")
        mean = self.mean()
        cov = self.outer / self.count - torch.outer(mean, mean)
        return (cov + cov.t()) / 2  # exact symmetry for eigh


@dataclass
class Spectrum:
    """Principal directions of one projection's (optionally channel-scaled) output covariance."""

    eigenvalues: torch.Tensor  # (d,) descending, float64, clamped at 0
    eigenvectors: torch.Tensor  # (d, m) columns, the top m = d or fewer directions, float32 on CPU
    mean: torch.Tensor  # (d,) float64
    scale: torch.Tensor  # (d,) per-channel scale used before the PCA (ones for the paper's method), float64
    count: int

    def explained(self):
        return explained_variance(self.eigenvalues)


def spectrum_from_statistics(stats, channel_scale_power=0.0, keep=None, weight=None, bias=None):
    """Eigendecomposition of a projection's centred output covariance, optionally channel-scaled by std**-power.

    `stats` are of the projection's outputs, or -- when `weight` (out x in, as nn.Linear stores it) is given -- of
    its inputs: then the outputs y = x W^T + b have mean mu_x W^T + b and covariance W C_x W^T, whose nonzero
    eigenpairs come from a thin SVD of W C_x^(1/2) (out x in). For projections wider at the output than at the input
    (fc1: 4x) that is exact, needs 16x less memory for the statistics and avoids an out x out eigendecomposition.

    `keep` limits how many eigenvectors are kept (the largest rank that can still save parameters), which bounds
    memory when every layer's spectrum must be held at once (budget mode on large models).
    """
    cov = stats.covariance()
    if weight is not None:
        w = weight.detach().to(device=cov.device, dtype=torch.float64)
        mean = stats.mean() @ w.t()
        if bias is not None:
            mean = mean + bias.detach().to(device=cov.device, dtype=torch.float64)
        values_x, vectors_x = _eigh(cov)
        root = vectors_x * values_x.clamp_min(0).sqrt()[None, :]  # C_x = root root^T
        factor = w @ root  # out x in, C_y = factor factor^T
        d = w.shape[0]
        diagonal = (factor**2).sum(dim=1)
    else:
        mean = stats.mean()
        d = cov.shape[0]
        diagonal = cov.diagonal()
    if channel_scale_power > 0:
        std = diagonal.clamp_min(0).sqrt()
        # Channels that never move (std ~ 0) keep scale 1 so that they do not blow up after division.
        floor = std.max() * 1e-6 + 1e-12
        scale = torch.where(std > floor, std, torch.ones_like(std)) ** channel_scale_power
    else:
        scale = torch.ones(d, dtype=torch.float64, device=cov.device)
    if weight is not None:
        u, singular, _ = torch.linalg.svd(factor / scale[:, None], full_matrices=False)
        eigenvectors = u
        eigenvalues = torch.zeros(d, dtype=torch.float64, device=cov.device)
        eigenvalues[: singular.shape[0]] = singular**2
    else:
        cov = cov / torch.outer(scale, scale) if channel_scale_power > 0 else cov
        eigenvalues, eigenvectors = _eigh(cov)
        eigenvalues = eigenvalues.flip(0).clamp_min(0)
        eigenvectors = eigenvectors.flip(1)
    if keep is not None:
        eigenvectors = eigenvectors[:, : min(keep, eigenvectors.shape[1])]
    return Spectrum(
        eigenvalues=eigenvalues.cpu(),
        eigenvectors=eigenvectors.to(torch.float32).cpu(),
        mean=mean.cpu(),
        scale=scale.cpu(),
        count=stats.count,
    )


def records_inputs(in_features, out_features):
    """Whether a projection's statistics are taken on its inputs (cheaper and exact when in < out)."""
    return in_features < out_features


def _eigh(matrix):
    """Ascending eigenvalues and eigenvectors of a symmetric float64 matrix.

    On CPU this goes through NumPy's LAPACK: torch's CPU eigh was measured up to 50x slower on the rank-deficient
    covariances that short calibration sets give (3.5 s against 0.07 s for 512 x 512 of rank 50).
    """
    if matrix.device.type == "cpu":
        values, vectors = np.linalg.eigh(matrix.numpy())
        return torch.from_numpy(values), torch.from_numpy(vectors)
    return torch.linalg.eigh(matrix)


def explained_variance(eigenvalues):
    """Cumulative explained-variance ratio: element k-1 is the share of the variance in the top k directions."""
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp_min(0)
    total = eigenvalues.sum()
    if total <= 0:
        # A constant output: any rank explains everything.
        return torch.ones_like(eigenvalues)
    return torch.cumsum(eigenvalues, 0) / total


def saving_rank_limit(in_features, out_features):
    """Largest rank k for which a factorisation is smaller than the dense matrix: k * (in + out) < in * out."""
    return (in_features * out_features - 1) // (in_features + out_features)


def choose_rank(eigenvalues, threshold, in_features, out_features, multiple=RANK_MULTIPLE):
    """The paper's rank rule. Returns the rank, or None when the projection should stay full rank.

    k is the smallest multiple of `multiple` whose explained variance reaches `threshold`; the projection is kept
    full rank when k * (in + out) >= in * out, since the factors would then be no smaller than the weight.
    """
    explained = explained_variance(eigenvalues)
    d = explained.shape[0]
    rank = None
    for k in range(multiple, d + 1, multiple):
        # A tiny tolerance: a threshold of exactly 1.0 is reached at full dimension despite rounding.
        if explained[k - 1] >= threshold - 1e-12:
            rank = k
            break
    if rank is None or rank * (in_features + out_features) >= in_features * out_features:
        return None
    return rank


def low_rank_params(in_features, out_features, rank):
    return rank * (in_features + out_features) + out_features


def dense_params(in_features, out_features, has_bias):
    return in_features * out_features + (out_features if has_bias else 0)


def allocate_ranks(spectra, shapes, budget, multiple=RANK_MULTIPLE):
    """Choose ranks for all projections so that their parameters fit `budget` with the most explained variance.

    Args:
        spectra: {name: eigenvalues (descending)}.
        shapes: {name: (in_features, out_features, has_bias)}.
        budget: parameters allowed for all these projections together.

    Returns {name: rank or None (full rank)}. Each projection's value is its explained-variance ratio (1 at full
    rank), so the objective is the sum of ratios: a Lagrangian relaxation picks, for a price per parameter, the
    best option of every projection independently; bisection on the price finds the largest choice within budget,
    and a greedy pass then spends what is left on the best value-per-parameter upgrades. The result is within one
    rank step of the budget unless the budget is unreachable (then ValueError).
    """
    options = {}
    for name, eigenvalues in spectra.items():
        in_features, out_features, has_bias = shapes[name]
        explained = explained_variance(eigenvalues).numpy()
        limit = min(saving_rank_limit(in_features, out_features), explained.shape[0])
        choices = [(k, low_rank_params(in_features, out_features, k), float(explained[k - 1]))
                   for k in range(multiple, limit + 1, multiple)]
        choices.append((None, dense_params(in_features, out_features, has_bias), 1.0))
        options[name] = choices

    minimum = sum(choices[0][1] for choices in options.values())
    if budget < minimum:
        raise ValueError(
            f"a budget of {budget} projection parameters is below the smallest reachable ({minimum}, every projection"
            f" at rank {multiple}); ask for a larger target_size"
        )

    def pick(price):
        picked = {}
        for name, choices in options.items():
            picked[name] = max(range(len(choices)), key=lambda i: choices[i][2] - price * choices[i][1])
        return picked

    def cost(picked):
        return sum(options[name][i][1] for name, i in picked.items())

    # Higher price -> fewer parameters. Bisect in log space between a price that buys everything and one that
    # buys only the smallest options.
    low, high = 1e-14, 1.0
    best = pick(high)
    if cost(pick(low)) <= budget:
        best = pick(low)
    else:
        for _ in range(100):
            mid = math.sqrt(low * high)
            picked = pick(mid)
            if cost(picked) <= budget:
                high, best = mid, picked
            else:
                low = mid
            if high / low < 1 + 1e-9:
                break

    # Greedy fill: each upgrade moves one projection to its next option (next rank step, or full rank).
    spent = cost(best)
    while True:
        candidate, ratio = None, -1.0
        for name, i in best.items():
            choices = options[name]
            if i + 1 >= len(choices):
                continue
            extra = choices[i + 1][1] - choices[i][1]
            gain = choices[i + 1][2] - choices[i][2]
            if spent + extra <= budget and extra > 0 and gain / extra > ratio:
                candidate, ratio = name, gain / extra
        if candidate is None:
            break
        i = best[candidate]
        spent += options[candidate][i + 1][1] - options[candidate][i][1]
        best[candidate] = i + 1
    return {name: options[name][i][0] for name, i in best.items()}


def allocate_ranks_by_threshold(spectra, shapes, budget, multiple=RANK_MULTIPLE):
    """Like `allocate_ranks`, but with one explained-variance threshold for every projection (bisected to fit the
    budget), then the same greedy fill of what is left."""

    def ranks_for(threshold):
        return {name: choose_rank(spectra[name], threshold, shapes[name][0], shapes[name][1], multiple) for name in spectra}

    def cost(ranks):
        return sum(dense_params(*shapes[n]) if r is None else low_rank_params(shapes[n][0], shapes[n][1], r)
                   for n, r in ranks.items())

    low, high = 0.0, 1.0
    best = None
    for _ in range(60):
        mid = (low + high) / 2
        ranks = ranks_for(mid)
        if cost(ranks) <= budget:
            low, best = mid, ranks
        else:
            high = mid
    if best is None:
        return allocate_ranks(spectra, shapes, budget, multiple)  # raises if unreachable
    # Greedy fill by explained variance per parameter, one rank step at a time.
    spent = cost(best)
    explained = {n: explained_variance(spectra[n]).numpy() for n in spectra}
    while True:
        candidate, ratio = None, -1.0
        for name, rank in best.items():
            if rank is None:
                continue
            in_features, out_features, has_bias = shapes[name]
            nxt = rank + multiple
            if nxt > saving_rank_limit(in_features, out_features) or nxt > explained[name].shape[0]:
                extra, gain = dense_params(in_features, out_features, has_bias) - low_rank_params(in_features, out_features, rank), 1.0 - explained[name][rank - 1]
                nxt = None
            else:
                extra, gain = multiple * (in_features + out_features), explained[name][nxt - 1] - explained[name][rank - 1]
            if extra > 0 and spent + extra <= budget and gain / extra > ratio:
                candidate, ratio, step = name, gain / extra, (nxt, extra)
        if candidate is None:
            break
        best[candidate] = step[0]
        spent += step[1]
    return best


# --------------------------------------------------------------------------------------------------------------
# Factors
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Refinement
# --------------------------------------------------------------------------------------------------------------


def _encoder_forward(encoder, features):
    hidden = _embed(encoder, features)
    for layer in encoder.layers:
        hidden = layer(hidden, None)
        if isinstance(hidden, tuple):  # older transformers return (hidden_states,)
            hidden = hidden[0]
    return encoder.layer_norm(hidden)


def refine_encoder(encoder, features, targets, settings, device, progress=True, masks=None):
    """Distil the low-rank factors and biases of `encoder` toward `targets` (the original encoder's outputs).

    Only LowRankLinear parameters are trained; loss is the MSE of the last hidden state over all frames (the
    decoder attends to every frame, padding included). Returns (initial loss, final loss) as running averages over
    the first and last 10% of steps.
    """
    from tqdm.auto import tqdm

    params = []
    for p in encoder.parameters():
        p.requires_grad_(False)
    for module in encoder.modules():
        if isinstance(module, LowRankLinear) or (settings.refine_layer_norms and isinstance(module, nn.LayerNorm)):
            for p in module.parameters():
                p.requires_grad_(True)
                params.append(p)
    if not params:
        return None, None
    steps = settings.refine_steps
    optimizer = torch.optim.AdamW(params, lr=settings.refine_lr, weight_decay=settings.refine_weight_decay)

    def lr_factor(step):
        if step < settings.refine_warmup_steps:
            return (step + 1) / (settings.refine_warmup_steps + 1)
        progress_ = (step - settings.refine_warmup_steps) / max(1, steps - settings.refine_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(settings.seed)
    n = features.shape[0]
    batch = min(settings.refine_batch_size, n)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    losses = []
    encoder.train(False)  # dropout stays off: Whisper's is 0 anyway, and the targets come from eval mode
    with torch.enable_grad():
        for _step in tqdm(range(steps), desc="refine", disable=not progress):
            if cursor + batch > n:
                order = torch.randperm(n, generator=generator)
                cursor = 0
            index = order[cursor : cursor + batch]
            cursor += batch
            x = features[index].to(device)
            y = targets[index].to(device)
            if settings.refine_speech_share is None or masks is None:
                loss = nn.functional.mse_loss(_encoder_forward(encoder, x), y)
            else:
                error = ((_encoder_forward(encoder, x) - y) ** 2).mean(dim=-1)
                speech = masks[index].to(device)
                share = settings.refine_speech_share
                loss = share * error[speech].mean() + (1 - share) * error[~speech].mean() if (~speech).any() else error.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    for p in encoder.parameters():
        p.requires_grad_(False)
    window = max(1, steps // 10)
    return float(np.mean(losses[:window])), float(np.mean(losses[-window:]))


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
    timings = {}
    config = model.config
    shapes = _projection_shapes(config)
    n_layers = config.encoder_layers

    clock = time.perf_counter()
    features, speech_frames = _prepare_features(audio, feature_extractor)
    expected = config.max_source_positions * 2
    if features.shape[-1] != expected:
        raise CalibrationError(f"features have {features.shape[-1]} mel frames, the encoder expects {expected}")
    timings["features_s"] = time.perf_counter() - clock

    # A float32 working copy of the encoder on the calibration device; the caller's model is never modified.
    encoder = copy.deepcopy(model.model.encoder).to(device=device, dtype=torch.float32).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    original_layers = [copy.deepcopy(layer) for layer in encoder.layers] if settings.mode == "sequential" else None
    batch_size = settings.batch_size
    total_frames = config.max_source_positions
    masks = _frame_mask(speech_frames, total_frames, settings.statistics_frames == "speech", device)
    n_stat_frames = int(masks.sum())
    logger.info(
        "calibrating on %d inputs (%d statistics frames, %s), mode %s", features.shape[0], n_stat_frames,
        settings.statistics_frames, settings.mode,
    )
    if n_stat_frames <= settings.rank_multiple:
        raise CalibrationError(
            f"only {n_stat_frames} calibration frames: at least {settings.rank_multiple + 1} are needed for a rank of"
            f" {settings.rank_multiple}; give more or longer audio"
        )

    # Hidden states before layer 0, kept between layers (never re-running the prefix).
    clock = time.perf_counter()
    with torch.no_grad():
        hidden = torch.cat([_embed(encoder, features[s : s + batch_size].to(device)) for s in range(0, features.shape[0], batch_size)])
    timings["embed_s"] = time.perf_counter() - clock

    spectra = {}  # (layer, key) -> Spectrum
    ranks = {}  # (layer, key) -> rank or None
    factors = {}  # (layer, key) -> (weight1, weight2, bias)
    timings["calibration_s"] = 0.0
    timings["factorisation_s"] = 0.0

    def keep_limit(key):
        in_features, out_features, _ = shapes[key]
        return min(saving_rank_limit(in_features, out_features), out_features)

    def spectrum_of(layer, key, stats):
        module = encoder_projection(layer, key)
        in_features, out_features, _ = shapes[key]
        weights = (module.weight, module.bias) if records_inputs(in_features, out_features) else (None, None)
        return spectrum_from_statistics(stats, settings.channel_scale_power, keep_limit(key), *weights)

    def record(layer, keys, block, hidden_in):
        recorder = _Recorder(layer, keys, device)
        try:
            with torch.no_grad():
                out = _run_blocks(block, layer, hidden_in, masks, batch_size, recorder)
        finally:
            recorder.close()
        return out, recorder.stats

    def factorise(layer_index, key, stats):
        clock_ = time.perf_counter()
        spectrum = spectrum_of(original_layer(layer_index), key, stats[key])
        in_features, out_features, _ = shapes[key]
        if fixed_ranks is not None:  # budget mode: ranks were allocated from the one-shot spectra
            rank = fixed_ranks[(layer_index, key)]
        else:
            rank = choose_rank(spectrum.eigenvalues, settings.threshold(key), in_features, out_features, settings.rank_multiple)
        spectra[(layer_index, key)] = spectrum
        ranks[(layer_index, key)] = rank
        if rank is not None:
            _check_frames(rank, spectrum.count, layer_index, key)
            module = encoder_projection(original_layer(layer_index), key)
            factors[(layer_index, key)] = low_rank_factors(module.weight, module.bias, spectrum, rank)
        spectrum.eigenvectors = None  # only the eigenvalues are needed from here on (report)
        timings["factorisation_s"] += time.perf_counter() - clock_
        return rank

    def original_layer(i):
        return original_layers[i] if original_layers is not None else encoder.layers[i]

    def apply(layer, layer_index, keys):
        for key in keys:
            if ranks.get((layer_index, key)) is not None:
                _set_projection(layer, key, _low_rank_module(*factors[(layer_index, key)]))

    fixed_ranks = None
    if settings.target_size is not None:
        # Budget mode needs every layer's spectrum before any rank is chosen: one one-shot pass first.
        clock = time.perf_counter()
        h = hidden
        budget_spectra = {}
        for i in tqdm(range(n_layers), desc="calibrate (budget)", disable=not progress):
            layer = encoder.layers[i]
            mid, stats_a = record(layer, ATTENTION_KEYS, _attention_block, h)
            h, stats_m = record(layer, MLP_KEYS, _mlp_block, mid)
            for key, stats in {**stats_a, **stats_m}.items():
                budget_spectra[(i, key)] = spectrum_of(layer, key, stats)
            del stats_a, stats_m
        del h
        timings["calibration_s"] += time.perf_counter() - clock
        clock = time.perf_counter()
        fixed_ranks = _allocate_for_target(model, budget_spectra, shapes, settings)
        timings["allocation_s"] = time.perf_counter() - clock
        if settings.mode == "one-shot":
            clock = time.perf_counter()
            for (i, key), spectrum in budget_spectra.items():
                spectra[(i, key)] = spectrum
                rank = fixed_ranks[(i, key)]
                ranks[(i, key)] = rank
                if rank is not None:
                    _check_frames(rank, spectrum.count, i, key)
                    module = encoder_projection(encoder.layers[i], key)
                    factors[(i, key)] = low_rank_factors(module.weight, module.bias, spectrum, rank)
                spectrum.eigenvectors = None
            timings["factorisation_s"] += time.perf_counter() - clock
        del budget_spectra

    if settings.target_size is None or settings.mode == "sequential":
        for i in tqdm(range(n_layers), desc=f"calibrate ({settings.mode})", disable=not progress):
            clock = time.perf_counter()
            layer = encoder.layers[i]
            if settings.mode == "one-shot":
                # Statistics of all six projections from the original layer on the original hidden states.
                mid, stats_a = record(layer, ATTENTION_KEYS, _attention_block, hidden)
                hidden, stats_m = record(layer, MLP_KEYS, _mlp_block, mid)
                timings["calibration_s"] += time.perf_counter() - clock
                for key in LOW_RANK_KEYS:
                    stats = stats_a if key in ATTENTION_KEYS else stats_m
                    factorise(i, key, stats)
                del mid, stats_a, stats_m
            else:
                # Attention first (its inputs already went through the compressed layers 0..i-1) ...
                _, stats_a = record(layer, ATTENTION_KEYS, _attention_block, hidden)
                timings["calibration_s"] += time.perf_counter() - clock
                for key in ATTENTION_KEYS:
                    factorise(i, key, stats_a)
                apply(layer, i, ATTENTION_KEYS)
                # ... then the MLP, calibrated on the output of the compressed attention.
                clock = time.perf_counter()
                with torch.no_grad():
                    mid = _run_blocks(_attention_block, layer, hidden, masks, batch_size)
                _, stats_m = record(layer, MLP_KEYS, _mlp_block, mid)
                timings["calibration_s"] += time.perf_counter() - clock
                for key in MLP_KEYS:
                    factorise(i, key, stats_m)
                apply(layer, i, MLP_KEYS)
                clock = time.perf_counter()
                with torch.no_grad():
                    hidden = _run_blocks(_mlp_block, layer, mid, masks, batch_size)
                timings["calibration_s"] += time.perf_counter() - clock
                del mid, stats_a, stats_m
    del hidden

    refine_report = {"steps": settings.refine_steps}
    if settings.refine_steps > 0 and factors:
        clock = time.perf_counter()
        # The teacher's outputs: the original encoder on the calibration features, computed once. In one-shot mode
        # the working encoder is still the original here; in sequential mode its original layers are swapped in.
        compressed_layers = encoder.layers
        if original_layers is not None:
            encoder.layers = nn.ModuleList(original_layers)
        try:
            with torch.no_grad():
                targets = torch.cat([
                    _encoder_forward(encoder, features[s : s + batch_size].to(device))
                    for s in range(0, features.shape[0], batch_size)
                ])
        finally:
            encoder.layers = compressed_layers
        timings["teacher_s"] = time.perf_counter() - clock
        student = encoder
        for i, layer in enumerate(student.layers):
            apply(layer, i, [key for key in LOW_RANK_KEYS if not isinstance(encoder_projection(layer, key), LowRankLinear)])
        clock = time.perf_counter()
        speech_masks = _frame_mask(speech_frames, total_frames, True, "cpu")
        initial, final = refine_encoder(student, features, targets, settings, device, progress, speech_masks)
        timings["refinement_s"] = time.perf_counter() - clock
        for (i, key) in list(factors):
            module = encoder_projection(student.layers[i], key)
            factors[(i, key)] = (module.weight1.detach(), module.weight2.detach(), module.bias.detach())
        refine_report.update({"initial_loss": initial, "final_loss": final, "batch_size": settings.refine_batch_size,
                              "lr": settings.refine_lr})
        del targets

    clock = time.perf_counter()
    cpu_factors = {k: tuple(t.detach().float().cpu() for t in v) for k, v in factors.items()}
    lite = build_lite_whisper(model, cpu_factors).to(device="cpu", dtype=torch.float32)
    timings["build_s"] = time.perf_counter() - clock
    del encoder, original_layers

    report = _report(lite, settings, spectra, ranks, shapes, features.shape[0], len(audio), n_stat_frames, refine_report, timings)
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


def _report(lite, settings, spectra, ranks, shapes, n_inputs, n_clips, n_frames, refine_report, timings):
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
        "calibration": {"clips": n_clips, "inputs": n_inputs, "statistics_frames": n_frames,
                        "frames_kind": settings.statistics_frames},
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
