"""Label-free refinement: distil the low-rank factors toward the original encoder's outputs.

The teacher's outputs are computed once, on exactly the tensors the student is trained on (the calibration batches,
cropped and augmented the same way), so teacher and student always see the same input.
"""

import copy
import math

import numpy as np
import torch
from torch import nn

from .calibration import _attention_block, _encoder_forward, _mlp_block
from .modeling_lite_whisper import LowRankLinear


def _trainable(encoder, layer_norms):
    params = []
    for p in encoder.parameters():
        p.requires_grad_(False)
    for module in encoder.modules():
        if isinstance(module, LowRankLinear) or (layer_norms and isinstance(module, nn.LayerNorm)):
            for p in module.parameters():
                p.requires_grad_(True)
                params.append(p)
    return params


def lr_factor(step, steps, warmup):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def decoder_metric(model):
    """A (d x d) factor L with |e L|^2 = what the decoder's cross-attention reads of an encoder-output error e.

    The decoder sees the encoder only through the keys and values of its cross-attention layers, k = h Wk^T and
    v = h Wv^T + b, so an error e in the last hidden state costs sum_l |e Wk_l^T|^2 + |e Wv_l^T|^2 = e M e^T with
    M = sum_l Wk_l^T Wk_l + Wv_l^T Wv_l, where plain MSE weighs every channel alike. L is scaled so that
    trace(M) = d (the same scale as MSE). Measured on whisper-base's real dev speech at 0.8, it did no better than
    MSE (15.8 WER both; benchmarks/results/defaults_gpu.md), so it is an option, not the default.
    """
    metric = None
    for layer in model.model.decoder.layers:
        for projection in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj):
            weight = projection.weight.detach().double().cpu()
            metric = weight.T @ weight if metric is None else metric + weight.T @ weight
    metric = metric * (metric.shape[0] / torch.trace(metric))
    eigenvalues, eigenvectors = torch.linalg.eigh(metric)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()).float()


def standardizing_metric(targets):
    """A diagonal factor that divides each output channel by its standard deviation over the teacher's outputs."""
    rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in targets]).double()
    scale = 1.0 / rows.std(dim=0).clamp(min=1e-6)
    scale = scale * (scale.numel() / (scale ** 2).sum()).sqrt()  # trace = d, the scale of MSE
    return torch.diag(scale).float()


def frame_loss(output, target, speech, speech_share, metric=None):
    """Squared error of the last hidden state per frame, averaged; `metric` (a d x d factor L) measures |e L|^2.

    With `speech_share` s, speech frames weigh s and padding frames 1 - s. The decoder attends to every frame,
    padding included, so padding frames are never left out; but a short clip is mostly padding, and without the
    split its speech frames would hardly count.
    """
    difference = output - target
    if metric is not None:
        difference = difference @ metric
    return weighted_frames((difference ** 2).mean(dim=-1), speech, speech_share)


def weighted_frames(error, speech, speech_share):
    """Mean of a per-frame error, speech frames weighing `speech_share` (None: every frame alike)."""
    if speech_share is None:
        return error.mean()
    if not (~speech).any() or not speech.any():
        return error.mean()
    return speech_share * error[speech].mean() + (1 - speech_share) * error[~speech].mean()


class TranscriptObjective:
    """Distillation through the decoder: KL divergence between the original and the compressed model's next-token
    distributions, teacher-forced on the original model's own greedy transcripts of the calibration inputs.

    Label-free like the hidden-state loss (the original model writes the transcripts), but it measures the encoder
    error the way the decoder reads it: through cross-attention, over the tokens it actually emits. Needs full 30 s
    windows (the decoder was trained on them). The teacher's distributions are recomputed each step from its stored
    hidden states (the decoder is small next to the encoder), so nothing vocabulary-sized is kept. Measured on
    whisper-base's real dev speech with the bundled calibration set it did worse than no refinement at 0.8 (13.1-14.3
    against 11.7 WER), so it is an option for users with much more calibration audio, not the default.
    """

    def __init__(self, model, batches, targets, device, max_new_tokens=128):
        self.model = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.targets = targets
        self.tokens = []
        eos = self.model.generation_config.eos_token_id
        with torch.no_grad():
            for batch, target in zip(batches, targets):
                if batch.features.shape[-1] != 2 * self.model.config.max_source_positions:
                    raise ValueError("refine_loss='transcripts' needs full 30 s windows (crop_padding=None)")
                # The original model transcribes (and detects the language) from the features themselves.
                features = batch.features.to(device)
                ids = self.model.generate(input_features=features, task="transcribe", max_new_tokens=max_new_tokens)
                if not bool((ids[:, 0] == self.model.generation_config.decoder_start_token_id).all()):
                    ids = torch.cat([self._prompt(features), ids], dim=1)  # transformers 5 returns new tokens only
                # Positions whose next token is part of the transcript, up to and including the first EOS.
                finished = (ids[:, 1:] == eos).int().cumsum(dim=1)
                keep = (finished == 0) | ((finished == 1) & (ids[:, 1:] == eos))
                self.tokens.append((ids[:, :-1].contiguous(), keep))

    def _prompt(self, features):
        """<|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>, the language detected per input."""
        config = self.model.generation_config
        languages = self.model.detect_language(input_features=features).reshape(-1, 1).to(features.device)
        fixed = lambda token: torch.full_like(languages, token)  # noqa: E731
        return torch.cat([fixed(config.decoder_start_token_id), languages,
                          fixed(config.task_to_id["transcribe"]), fixed(config.no_timestamps_token_id)], dim=1)

    def _log_probs(self, hidden, ids):
        out = self.model.model.decoder(input_ids=ids, encoder_hidden_states=hidden)
        return torch.log_softmax(self.model.proj_out(out.last_hidden_state).float(), dim=-1)

    def __call__(self, index, output, batch):
        ids, keep = self.tokens[index]
        with torch.no_grad():
            teacher = self._log_probs(self.targets[index].to(output.device), ids)[keep]
        student = self._log_probs(output, ids)[keep]
        return (teacher.exp() * (teacher - student)).sum(dim=-1).mean()


def refinement_objective(settings, model, batches, targets, device):
    """The loss `settings.refine_loss` names, as a callable (batch index, student output, batch) -> loss."""
    if settings.refine_loss == "transcripts":
        return TranscriptObjective(model, batches, targets, device)
    metric = {"mse": lambda: None, "decoder": lambda: decoder_metric(model),
              "standardized": lambda: standardizing_metric(targets)}[settings.refine_loss]()
    metric = metric.to(device) if metric is not None else None

    def hidden_state_loss(index, output, batch):
        return frame_loss(output, targets[index].to(device), batch.speech.to(device), settings.refine_speech_share,
                          metric)

    return hidden_state_loss


def refine_encoder(encoder, batches, objective, settings, device, progress=True):
    """Distil the low-rank factors and biases of `encoder` toward the original model on `batches`.

    `batches` are `CalibrationBatch`es; `objective(i, output, batches[i])` is the loss of the student's last hidden
    state on batch i (`refinement_objective`: against the original encoder's outputs, or through the decoder).
    Only LowRankLinear parameters (and, with `settings.refine_layer_norms`, layer norms) are trained. Each step takes
    the next batch of a seeded shuffled order. Returns (initial loss, final loss) as running averages over the first
    and last 10% of steps.
    """
    return _optimise(encoder, lambda index: _encoder_forward(encoder, batches[index].features.to(device)), objective,
                     len(batches), batches, settings, device, progress)


def _optimise(module, forward, objective, n_batches, batches, settings, device, progress, bar=None):
    """`settings.refine_steps` AdamW steps on the low-rank factors of `module`, one batch a step (seeded order).

    `bar`: a tqdm bar to advance a step at a time instead of a bar of its own."""
    from tqdm.auto import tqdm

    params = _trainable(module, settings.refine_layer_norms)
    if not params or not n_batches:
        return None, None
    steps = settings.refine_steps
    warmup = min(settings.refine_warmup_steps, steps // 4)
    optimizer = torch.optim.AdamW(params, lr=settings.refine_lr, weight_decay=settings.refine_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup))
    generator = torch.Generator().manual_seed(settings.seed)
    order, cursor = [], 0
    losses = []
    module.train(False)  # dropout stays off: Whisper's is 0 anyway, and the targets come from eval mode
    with torch.enable_grad():
        for _step in tqdm(range(steps), desc="refine", unit="step", disable=not progress or bar is not None):
            if cursor >= len(order):
                order, cursor = torch.randperm(n_batches, generator=generator).tolist(), 0
            index = order[cursor]
            cursor += 1
            # bfloat16 autocast roughly halves a step on CPUs with AVX512-BF16 / AMX and on GPUs; the factors, the
            # optimiser state and the loss stay float32.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.refine_precision == "bfloat16"):
                output = forward(index)
            loss = objective(index, output.float(), batches[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
    for p in module.parameters():
        p.requires_grad_(False)
    window = max(1, steps // 10)
    return float(np.mean(losses[:window])), float(np.mean(losses[-window:]))


def layer_loss(output, target, speech, speech_share):
    """Squared error of one layer's output per frame, relative to the frame's mean square in the original.

    The residual stream's scale differs from frame to frame (and a few channels are very large), and the next layer
    norm divides each frame by its own scale: the relative error is what the next layer sees.
    """
    error = ((output - target) ** 2).mean(dim=-1) / target.pow(2).mean(dim=-1).clamp_min(1e-12)
    return weighted_frames(error, speech, speech_share)


def refine_layers(original_layers, layers, hidden, batches, settings, device, progress=True):
    """Layer-wise reconstruction: train each compressed layer to reproduce the original layer's output.

    `original_layers[i]` and `layers[i]` (its compressed copy, trained in place) are encoder layers; `hidden` are the
    original encoder's hidden states entering layer 0 (one tensor per batch of `batches`). With `settings.refine_mode`
    "layer" every layer learns from the original's inputs (independent problems); with "layer-sequential" from the
    outputs of the already refined compressed layers before it, so it also learns to undo their error. The targets
    are recomputed layer by layer, so only one layer boundary is held at a time (as in the statistics pass). Each
    layer takes `settings.refine_steps` steps. Returns (initial, final) mean losses over the layers.
    """
    from tqdm.auto import tqdm

    def forward(layer, x):
        return _mlp_block(layer, _attention_block(layer, x))

    firsts, lasts = [], []
    original_in, student_in = hidden, hidden
    bar = tqdm(total=len(layers) * settings.refine_steps, desc=f"refine ({len(layers)} layers)", unit="step",
               disable=not progress)
    for original, layer in zip(original_layers, layers):
        with torch.no_grad():
            targets = [forward(original, x) for x in original_in]
        inputs = original_in if settings.refine_mode == "layer" else student_in

        def objective(index, output, batch, targets=targets):
            return layer_loss(output, targets[index], batch.speech.to(device), settings.refine_speech_share)

        first, last = _optimise(layer, lambda index, layer=layer, inputs=inputs: forward(layer, inputs[index]),
                                objective, len(batches), batches, settings, device, progress, bar)
        if first is not None:
            firsts.append(first)
            lasts.append(last)
        if settings.refine_mode == "layer-sequential":
            with torch.no_grad():
                student_in = [forward(layer, x) for x in student_in]
        original_in = targets
    bar.close()
    if not firsts:
        return None, None
    return float(np.mean(firsts)), float(np.mean(lasts))


__all__ = ["TranscriptObjective", "refinement_objective", "refine_encoder", "frame_loss", "layer_loss", "refine_layers", "lr_factor", "decoder_metric", "standardizing_metric"]
