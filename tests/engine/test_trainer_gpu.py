"""The trainer on CUDA with channels-last and bf16 autocast; skipped without a GPU."""

import pytest
import torch

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


def test_cuda_graph_steps_follow_the_eager_ones_across_an_lr_milestone():
    """Parameter for parameter against eager over an lr drop, an evaluation and a checkpoint:
    a frozen lr, a buffer overwritten by a replay or a graph recorded again would show here
    (the accuracy test above passes with any of them)."""
    config = get_recipe("digits", "mlp").replace(
        device="cuda", iterations=60, milestones=(30,), log_every=10, eval_every=20,
        checkpoint_every=0)
    eager = Trainer(config)
    eager.fit()
    compiled = Trainer(config.replace(compile=True))
    summary = compiled.fit()
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    assert float(compiled.optimizer.param_groups[0]["lr"]) == pytest.approx(0.01)
    events = summary["compile_events"]
    assert events["recordings"] >= 1  # CUDA graphs did record
    assert events["after_warmup"] == {"compiles": 0, "recordings": 0}
