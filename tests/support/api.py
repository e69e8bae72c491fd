"""Tabular data for the Python API's tests: scikit-learn's wine (178 examples, 13 features,
3 classes), standardized, split 140 / 38 by a fixed permutation."""

import functools

import torch


@functools.cache
def wine():
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:140], perm[140:]
    return (x[train], y[train]), (x[test], y[test])
