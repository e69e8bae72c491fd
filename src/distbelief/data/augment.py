"""Batch augmentation on the training device: whole batches at once, no per-image Python.

All functions take a float batch B x C x H x W and a `torch.Generator` on the batch's device,
so that the augmentation of iteration i is a pure function of (seed, i): exact resumes need no
augmentation state. With `rows`, the batch is only some rows of a larger one (a synchronous
rank's share of the global batch): the random draws are made for the whole batch and the rows'
own are used, so each row is augmented exactly as it is in the whole batch.
"""

from __future__ import annotations

import functools
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


def step_seed(seed: int, iteration: int, stream: int = 0) -> int:
    """The seed of one iteration's draws: distinct (seed, iteration, stream) give distinct
    draws."""
    # Large odd multipliers keep nearby seeds and iterations from colliding.
    return (seed * 0x9E3779B1 + iteration * 0x85EBCA77 + stream * 0xC2B2AE3D) % (2**63)


def step_generator(device: torch.device, seed: int, iteration: int, stream: int = 0
                   ) -> torch.Generator:
    """A new generator for one iteration (a stream that reseeds one generator per iteration
    with `step_seed` draws the same numbers without making one per step)."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, iteration, stream))


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training split in `epoch`: a seeded permutation of range(size)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


@functools.lru_cache(maxsize=32)
def _windows(pad: int, flip: bool, b: int, c: int, h: int, w: int, device: torch.device):
    """For each of the R = S * S * F outcomes of `crop_flip`'s draw (S = 2 pad + 1, F = 2 with
    flips): its window's row indices (R x H) and column indices (R x W, mirrored for a flip),
    and the batch and channel indices of a B x C batch. Made once per shape: per batch, only
    the draw and the gathers run."""
    side = 2 * pad + 1
    r = torch.arange(side * side * (2 if flip else 1), device=device)
    dy, dx, mirrored = r % side, r // side % side, r // (side * side)
    across = torch.arange(w, device=device)
    # A mirrored crop's column j is the crop's column w - 1 - j.
    cols = dx[:, None] + torch.where(mirrored[:, None].bool(), w - 1 - across, across)
    rows = dy[:, None] + torch.arange(h, device=device)
    batch = torch.arange(b, device=device)[:, None, None, None]
    chan = torch.arange(c, device=device)[None, :, None, None]
    return rows, cols, batch, chan


def crop_flip(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator,
              rows: Rows | None = None) -> torch.Tensor:
    """`random_crop` by `pad`, then with `flip` a left-right mirror with probability 1/2, as
    one gather from one draw per image: five kernels per batch (the draw, two table lookups,
    the pad, the gather) and one pass over the images, where a crop, a flip and a select were
    about fifteen and three passes.

    One integer per image in [0, S * S * F) (S = 2 pad + 1 offsets per axis, F = 2 with flips)
    encodes the row offset (r % S), the column offset (r // S % S) and the flip (r // S^2)."""
    if pad == 0 and not flip:
        return x
    b, c, h, w = x.shape
    at_rows, at_cols, batch, chan = _windows(pad, flip, b, c, h, w, x.device)
    r = _mine(torch.randint(0, len(at_rows), (_count(x, rows),), generator=g,
                            device=x.device), rows)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    return padded[batch, chan, at_rows[r][:, None, :, None], at_cols[r][:, None, None, :]]


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
