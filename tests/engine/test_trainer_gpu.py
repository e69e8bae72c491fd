"""The trainer on CUDA with channels-last and bf16 autocast; skipped without a GPU."""

import pytest

from distbelief.engine import Trainer
from distbelief.recipes import get_recipe

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bf16", [False, True])
def test_digits_on_cuda(bf16):
    config = get_recipe("digits").replace(device="cuda", bf16=bf16, channels_last=True,
                                          iterations=400, milestones=(300,))
    summary = Trainer(config).fit()
    assert summary["device"].startswith("cuda") and summary["test_accuracy"] >= 0.95
