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


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_cuda_graph_step_learns_like_the_eager_one(bf16):
    """--compile on CUDA: forward and backward as CUDA graphs (reduce-overhead), the update
    compiled with a tensor lr; it must learn as well as eager and follow the lr schedule."""
    config = get_recipe("digits").replace(device="cuda", bf16=bf16, channels_last=True,
                                          iterations=400, milestones=(300,), compile=True)
    trainer = Trainer(config)
    summary = trainer.fit()
    assert summary["test_accuracy"] >= 0.95
    assert float(trainer.optimizer.param_groups[0]["lr"]) == pytest.approx(0.01)
