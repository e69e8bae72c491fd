"""Evaluation: loss and top-1 / top-5 error over single or multiple test views."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from distbelief.engine.losses import get_loss


def topk_wrong(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Number of rows whose label is not among the `k` highest scores (a 0-d tensor)."""
    k = min(k, scores.shape[1])
    hit = (scores.topk(k, dim=1).indices == labels[:, None]).any(1)
    return (~hit).sum()


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums over a whole split: float64, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _forward(model, x, channels_last: bool, bf16: bool) -> torch.Tensor:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x).float()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, *, channels_last: bool = False,
             bf16: bool = False, loss: str = "cross_entropy", views: bool = False) -> dict:
    """Mean cross-entropy, top-1 and top-5 error (fractions) and the image count; with
    `loss="mse"` (regression) the mean squared error as "loss", and errors None.

    A batch's x is B x C x H x W (one view), with `views` B x V x C x H x W (V views of each
    image; without it a 5-d x is one input each, say a clip), or a list of views of one image
    in different sizes. Several views are combined by averaging their
    softmax (Sec. 3.4), and the loss is the negative log of that average. The model is put in
    eval mode and restored to its previous mode afterwards.
    """
    if loss != "cross_entropy":
        return _evaluate_regression(model, batches, channels_last, bf16, get_loss(loss))
    was_training = model.training
    model.eval()
    # Sums stay on the device until the end: one host sync per evaluation, not per batch.
    sums, count = [], 0
    try:
        for x, y in batches:
            if isinstance(x, list) or (views and x.dim() == 5):
                scores = _view_probs(model, x, channels_last, bf16)
                batch_loss = F.nll_loss(scores.clamp_min(1e-12).log(), y, reduction="sum")
            else:
                scores = _forward(model, x, channels_last, bf16)
                batch_loss = F.cross_entropy(scores, y, reduction="sum")
            dtype = sum_dtype(y.device)
            sums.append(torch.stack([t.to(dtype) for t in (
                batch_loss, topk_wrong(scores, y, 1), topk_wrong(scores, y, 5))]))
            count += len(y)
    finally:
        model.train(was_training)
    loss, wrong1, wrong5 = (torch.stack(sums).sum(0).tolist() if sums else (0.0, 0.0, 0.0))
    count = max(count, 1)
    return {"loss": loss / count, "error": wrong1 / count, "top5_error": wrong5 / count,
            "images": count}


def _view_probs(model, x, channels_last: bool, bf16: bool) -> torch.Tensor:
    """The softmax averaged over the views of each image (a list of differently sized views,
    or B x V x C x H x W)."""
    if isinstance(x, list):
        return torch.stack([_forward(model, v, channels_last, bf16).softmax(1)
                            for v in x]).mean(0)
    b, v = x.shape[:2]
    out = _forward(model, x.flatten(0, 1), channels_last, bf16)
    return out.softmax(1).view(b, v, -1).mean(1)


def _evaluate_regression(model, batches, channels_last: bool, bf16: bool, loss_fn) -> dict:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in batches:
            total += float(loss_fn(_forward(model, x, channels_last, bf16), y, reduction="sum"))
            count += len(y)
    finally:
        model.train(was_training)
    return {"loss": total / max(count, 1), "error": None, "top5_error": None, "images": count}


@torch.no_grad()
def recalibrate(model: torch.nn.Module, batches: Iterable, count: int, *,
                channels_last: bool = False, bf16: bool = False) -> int:
    """'Precise BN' (--bn-recalibrate): every BatchNorm's running mean and variance become the
    plain average, over `count` training batches at the model's current weights, of the
    batch means and (unbiased) batch variances, as torch's cumulative moving average
    (momentum None) computes it. The moving averages of training lag the weights by about
    1 / momentum steps; at a high lr that lag costs test error (the single process loses
    points to it at 2,000 minibatches of CIFAR-10). Weights, momenta, num_batches_tracked
    and the model's train/eval mode are left as they were. Returns the BatchNorm layers
    re-estimated (0: the model has none, nothing ran)."""
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or count <= 0:
        return 0
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for _, (x, _y) in zip(range(count), batches):
            _forward(model, x, channels_last, bf16)
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        model.train(training)
    return len(norms)


def recalibrate_for(model: torch.nn.Module, config, data, position: int) -> int:
    """`recalibrate` over --bn-recalibrate training batches of `data` from step `position` on
    (a pure function of the seed and the position, so a resumed run re-estimates from the same
    batches); returns the batches used (0: off, or no BatchNorm)."""
    count = config.bn_recalibrate
    if not count:
        return 0
    layers = recalibrate(model, data.train.batches(position), count,
                         channels_last=config.channels_last, bf16=config.bf16)
    return count if layers else 0
