"""Batch augmentation on the training device: whole batches at once, no per-image Python.

All functions take a float batch B x C x H x W and a `torch.Generator` on the batch's device,
so that the augmentation of iteration i is a pure function of (seed, i): exact resumes need no
augmentation state. With `rows`, the batch is only some rows of a larger one (a synchronous
rank's share of the global batch): the random draws are made for the whole batch and the rows'
own are used, so each row is augmented exactly as it is in the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rows(NamedTuple):
    """Rows lo..hi (exclusive) of a batch of `of` images."""

    lo: int
    hi: int
    of: int


def _mine(draws: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    """The rows' share of draws made for the whole batch."""
    return draws if rows is None else draws[rows.lo:rows.hi]


def _count(x: torch.Tensor, rows: Rows | None) -> int:
    return x.shape[0] if rows is None else rows.of


def step_generator(device: torch.device, seed: int, iteration: int, stream: int = 0
                   ) -> torch.Generator:
    """A generator for one iteration: distinct (seed, iteration, stream) give distinct draws."""
    # Large odd multipliers keep nearby seeds and iterations from colliding.
    mixed = (seed * 0x9E3779B1 + iteration * 0x85EBCA77 + stream * 0xC2B2AE3D) % (2**63)
    return torch.Generator(device=device).manual_seed(mixed)


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training split in `epoch`: a seeded permutation of range(size)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator,
                rows: Rows | None = None) -> torch.Tensor:
    """Zero-pad by `pad` px on each side, then take a random H x W crop per image.

    Padding happens after mean subtraction, so a padded pixel equals the mean image there.
    """
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    n = _count(x, rows)
    dy = _mine(torch.randint(0, 2 * pad + 1, (n, 1), generator=g, device=x.device), rows)
    dx = _mine(torch.randint(0, 2 * pad + 1, (n, 1), generator=g, device=x.device), rows)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # B x 1 x H x 1
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # B x 1 x 1 x W
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, g: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = _mine(torch.rand(_count(x, rows), generator=g, device=x.device), rows) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def pca_lighting(x: torch.Tensor, std: float, eigval: torch.Tensor, eigvec: torch.Tensor,
                 g: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
    """AlexNet's colour augmentation: add eigvec @ (alpha * eigval), alpha ~ N(0, std^2),
    one alpha per image, to every RGB pixel. eigval: 3, eigvec: 3 x 3 (columns = components)."""
    if std == 0:
        return x
    alpha = _mine(torch.randn(_count(x, rows), 3, generator=g, device=x.device), rows) * std
    shift = (alpha * eigval.to(x.device)) @ eigvec.to(x.device).T  # B x 3
    return x + shift[:, :, None, None]


def colour_pca(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (variances, descending, 3) and eigenvectors (3 x 3, columns) of the RGB
    covariance of `pixels` (N x 3, values in [0, 1])."""
    centred = pixels.double() - pixels.double().mean(0)
    cov = centred.T @ centred / max(1, len(pixels) - 1)
    eigval, eigvec = torch.linalg.eigh(cov)
    order = eigval.argsort(descending=True)
    return eigval[order].clamp_min(0).float(), eigvec[:, order].float()
