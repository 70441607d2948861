"""Label-free refinement: distil the low-rank factors toward the original encoder's outputs."""

import math

import numpy as np
import torch
from torch import nn

from .calibration import _encoder_forward
from .modeling_lite_whisper import LowRankLinear


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


__all__ = ["refine_encoder"]
