"""The compiled training step (`--compile`, engine/fast.py) on the CPU: the same code path a
GPU runs as CUDA graphs, checked against the eager trainer step for step, across lr changes
and a resume."""

import pytest
import torch

from distbelief.engine import Trainer
from distbelief.engine.fast import compile_mode
from distbelief.errors import ConfigError
from distbelief.recipes import get_recipe

pytestmark = pytest.mark.filterwarnings("ignore")


def _config(**changes):
    # A dense net keeps inductor's compile time to seconds; the step is the trainer's own.
    settings = dict(device="cpu", deterministic=True, iterations=30, milestones=(10, 20),
                    log_every=5, eval_every=0, checkpoint_every=0)
    return get_recipe("digits", "mlp").replace(**{**settings, **changes})


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.subprocess  # inductor runs the C++ compiler: ~15 s the first time on a machine
def test_compiled_steps_follow_the_eager_ones_across_lr_changes_and_a_resume(tmp_path):
    eager = Trainer(_config())
    eager.fit()
    compiled = Trainer(_config(compile=True))
    assert compiled.compiled is not None and isinstance(
        compiled.optimizer.param_groups[0]["lr"], torch.Tensor)
    compiled.fit()
    for a, b in zip(_params(eager), _params(compiled)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # The lr the compiled step read was the schedule's, after both milestones.
    assert float(compiled.optimizer.param_groups[0]["lr"]) == pytest.approx(0.001)

    run = tmp_path / "run"
    Trainer(_config(compile=True, iterations=15, checkpoint_every=15), run).fit()
    resumed = Trainer(_config(compile=True), run, resume=True)
    assert resumed.iteration == 15
    resumed.fit()
    for a, b in zip(_params(eager), _params(resumed)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_compile_is_single_mode_and_cuda_graphs_only_on_cuda():
    with pytest.raises(ConfigError, match="--compile applies to --mode single"):
        _config(compile=True, mode="downpour")
    assert compile_mode(torch.device("cpu")) == "default"
    assert compile_mode(torch.device("cuda")) == "reduce-overhead"
