"""The compiled training step (`--compile`, engine/fast.py) on the CPU: the same code path a
GPU runs as CUDA graphs, checked against the eager trainer step for step, across lr changes
and a resume, with the hazards CUDA graphs bring shown where a CPU can show them: optimizer
state born before anything compiles, a step's values copied before a replay can overwrite
them, and no compile or recording after the warm-up steps."""

import json
import math

import pytest
import torch

from distbelief.engine import Trainer
from distbelief.engine.fast import WARMUP_STEPS, CompileEvents, compile_mode, prepare_state
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


def _train_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def _overwrite_outputs_after_each_update(step):
    """Make `step` behave as CUDA graphs may: the outputs of its forward call are overwritten
    (NaN, -1) once the update has run, as the next replay would."""
    outputs, forward, update = [], step.forward_loss, step.update

    def forward_loss(x, y):
        outputs[:] = forward(x, y)
        return tuple(outputs)

    def update_then_overwrite(lr):
        update(lr)
        for t in outputs:
            t.detach().fill_(math.nan if t.is_floating_point() else -1)

    step.forward_loss, step.update = forward_loss, update_then_overwrite


def test_momentum_buffers_exist_before_anything_compiles():
    trainer = Trainer(_config(compile=True))  # torch.compile is lazy: nothing compiled yet
    for p in trainer.model.parameters():
        assert torch.equal(trainer.optimizer.state[p]["momentum_buffer"], torch.zeros_like(p))
    trainer.close()
    # A resumed run's buffers are its own, not replaced by zeros; no momentum, no buffers.
    model = torch.nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    sgd.step()
    kept = [sgd.state[p]["momentum_buffer"] for p in model.parameters()]
    prepare_state(sgd)
    assert all(sgd.state[p]["momentum_buffer"] is b for p, b in zip(model.parameters(), kept))
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    prepare_state(plain)
    assert not plain.state


@pytest.mark.subprocess  # inductor runs the C++ compiler: ~15 s the first time on a machine
def test_compiled_steps_follow_the_eager_ones_across_lr_changes_and_a_resume(tmp_path):
    eager = Trainer(_config(eval_every=12, checkpoint_every=12), tmp_path / "eager")
    eager.fit()
    compiled = Trainer(_config(compile=True, eval_every=12, checkpoint_every=12),
                       tmp_path / "compiled")
    assert compiled.compiled is not None and isinstance(
        compiled.optimizer.param_groups[0]["lr"], torch.Tensor)
    _overwrite_outputs_after_each_update(compiled.compiled)
    summary = compiled.fit()
    for a, b in zip(_params(eager), _params(compiled)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # The lr the compiled step read was the schedule's, after both milestones.
    assert float(compiled.optimizer.param_groups[0]["lr"]) == pytest.approx(0.001)
    # Each record's loss and error were copied before the outputs were overwritten.
    want, got = _train_records(tmp_path / "eager"), _train_records(tmp_path / "compiled")
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for a, b in zip(want, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["error"] == a["error"]
    # Compiled in the warm-up steps, never again: not at the lr drops, the evaluations or
    # the checkpoints.
    events = summary["compile_events"]
    assert events["compiles"] >= 2 and events["after_warmup"] == {"compiles": 0,
                                                                  "recordings": 0}

    run = tmp_path / "run"
    Trainer(_config(compile=True, iterations=15, checkpoint_every=15), run).fit()
    resumed = Trainer(_config(compile=True), run, resume=True)
    assert resumed.iteration == 15
    resumed.fit()
    for a, b in zip(_params(eager), _params(resumed)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.subprocess  # inductor: seconds
def test_compile_events_count_a_recompile_after_the_warm_up():
    """The counter the checks above rely on: the compiled forward called with a batch of
    another size after the warm-up recompiles, and is counted as after it."""
    trainer = Trainer(_config(compile=True, iterations=WARMUP_STEPS))
    trainer.fit()
    events = CompileEvents()
    try:
        x, y = next(trainer.data.train.batches(0))
        trainer.compiled.forward_loss(x, y)  # as trained: no compile
        events.mark_warm()
        assert events.after_warmup() == {"compiles": 0, "recordings": 0}
        trainer.compiled.forward_loss(x[:5], y[:5])
        assert events.after_warmup()["compiles"] >= 1 and events.recordings == 0
    finally:
        events.close()
    assert events._seen not in torch._dynamo.callback.callback_handler.start_callbacks


def test_compile_is_single_mode_and_cuda_graphs_only_on_cuda():
    with pytest.raises(ConfigError, match="--compile applies to --mode single"):
        _config(compile=True, mode="downpour")
    assert compile_mode(torch.device("cpu")) == "default"
    assert compile_mode(torch.device("cuda")) == "reduce-overhead"
