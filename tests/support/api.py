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


@functools.cache
def diabetes():
    """scikit-learn's diabetes regression (442 examples, 10 features, one target), features
    and target standardized, split 350 / 92 by a fixed permutation."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:350], perm[350:]
    return (x[train], y[train]), (x[test], y[test])


def regressor():
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
