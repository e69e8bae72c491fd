"""The training losses (`--loss`): what a model's outputs are scored by, in every mode.

    cross_entropy  classification: N x classes scores against class indices; error rates
                   (top-1, top-5) are reported alongside the loss
    mse            regression (through `distbelief.fit`): N x D outputs against real targets of
                   N or N x D values; the loss of an example is the mean of its D squared
                   errors; no error rate exists, so records and summaries carry the loss only

`reduction="sum"` sums the examples' losses (Sandblaster's portions and evaluation add them up
over batches and divide once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "mse")


class CrossEntropy:
    name, classifies = "cross_entropy", True

    @staticmethod
    def __call__(scores: torch.Tensor, targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(scores, targets, reduction=reduction)

    @staticmethod
    def wrong(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many rows' highest score is not their class (a 0-d tensor)."""
        return (scores.argmax(1) != targets).sum()


class MeanSquared:
    name, classifies = "mse", False

    @staticmethod
    def __call__(scores: torch.Tensor, targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        # float32 at least (bf16 autocast outputs), float64 kept (Sandblaster's dtype).
        scores = scores if scores.dtype == torch.float64 else scores.float()
        squared = (scores - targets.to(scores.dtype).view_as(scores)).pow(2)
        per_example = squared.flatten(1).mean(1) if squared.dim() > 1 else squared
        return per_example.sum() if reduction == "sum" else per_example.mean()

    @staticmethod
    def wrong(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.long, device=scores.device)


def get_loss(name: str):
    """The loss called `name` (one of `LOSSES`; the config validated it)."""
    return MeanSquared() if name == "mse" else CrossEntropy()


def error_text(record: dict, what: str) -> str:
    """"`what` error 12.34%" for a classification record, "`what` loss 0.0123" otherwise."""
    if record.get("error") is not None:
        return f"{what} error {record['error']:.2%}"
    return f"{what} loss {record.get('loss', float('nan')):.4g}"
