"""The real CIFAR-10 through the real pipeline; skipped where the data set is absent.

Looks in $DISTBELIEF_CIFAR10, then ../shared/data/cifar-10-batches-py beside the checkout.
"""

import os
from pathlib import Path

import pytest
import torch

from distbelief.data import load_cifar10
from distbelief.engine import Trainer
from distbelief.recipes import get_recipe

CANDIDATES = [os.environ.get("DISTBELIEF_CIFAR10", ""),
              Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar-10-batches-py"]
ROOT = next((Path(p) for p in CANDIDATES if p and (Path(p) / "test_batch").is_file()), None)
pytestmark = pytest.mark.skipif(ROOT is None, reason="the real CIFAR-10 is not available")


def test_official_counts_and_classes():
    train, test, classes = load_cifar10(ROOT)
    assert (len(train), len(test), classes) == (50000, 10000, 10)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10


@pytest.mark.slow  # ~35 s; make test-all
def test_paper_recipe_runs_with_the_45k_5k_split():
    config = get_recipe("cifar10-paper").replace(
        data_dir=str(ROOT), val_split=5000, iterations=4, log_every=2, eval_batch_size=1000)
    trainer = Trainer(config)
    data = trainer.data
    assert data.train_size == 45000 and data.splits["val"].size == 5000
    # Per-pixel mean of the training split, in [0, 1]: CIFAR's is about 0.47 overall.
    assert 0.4 < float(data.stats["mean"].mean()) < 0.55
    summary = trainer.fit()
    assert summary["iterations"] == 4 and 0 <= summary["val_error"] <= 1
