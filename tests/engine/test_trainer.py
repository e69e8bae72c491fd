"""The single-process trainer on real data: learning, exact resume, run directory, failures."""

import json

import pytest
import torch
import yaml

from distbelief.engine import Diverged, Trainer, TrainingInterrupted, evaluate, load_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.errors import CheckpointError, ConfigError


def digits_config(**kw):
    settings = dict(recipe="test", model="resnet20", data="digits", batch_size=32, iterations=20,
                    lr=0.05, milestones=(12,), pad=1, flip=False, log_every=5, eval_every=10,
                    checkpoint_every=10, deterministic=True)
    return TrainConfig().replace(**{**settings, **kw})


def test_a_partitioned_config_is_sent_to_the_pipelines_trainer(tmp_path):
    from distbelief.distributed.pipeline import PipelineTrainer

    with pytest.raises(ConfigError, match="--partitions trains with .*PipelineTrainer"):
        Trainer(digits_config(partitions=2), tmp_path / "run")
    with pytest.raises(ConfigError, match="a pipeline needs --partitions 2 or more"):
        PipelineTrainer(digits_config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_resnet20_learns_digits():
    summary = Trainer(digits_config(iterations=250, batch_size=64, lr=0.1, milestones=(200,),
                                    channels_last=True, deterministic=False, log_every=50,
                                    eval_every=0)).fit()
    assert summary["test_accuracy"] >= 0.9
    assert summary["iterations"] == 250 and summary["images_per_s"] > 0


def test_run_directory_contents(tmp_path):
    run = tmp_path / "run"
    summary = Trainer(digits_config(val_split=200), run).fit()
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["config"]["model"] == "resnet20" and "git_revision" in record
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["iteration"] for m in train] == [5, 10, 15, 20]
    assert {(m["split"], m["iteration"]) for m in evals} == {
        ("val", 10), ("test", 10), ("val", 20), ("test", 20)}
    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    for key in ("test_error", "test_accuracy", "train_error", "iterations", "wall_s",
                "images_per_s", "val_error"):
        assert key in saved
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 20


def test_refuses_to_overwrite_a_run(tmp_path):
    Trainer(digits_config(iterations=5), tmp_path).fit()
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(digits_config(iterations=5), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def _state(trainer):
    return {**{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
            **{f"momentum.{i}": s["momentum_buffer"]
               for i, s in enumerate(trainer.optimizer.state.values())}}


@pytest.mark.parametrize("stop_at", [10, 13])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, stop_at):
    """Stop at a checkpoint boundary or between two; the resumed run must not drift by a bit."""
    config = digits_config()
    straight = Trainer(config)
    straight.fit()

    interrupted = Trainer(config, tmp_path)
    lr_at = interrupted.schedule.lr_at

    def lr_at_and_stop(iteration):  # what a Ctrl-C during step `stop_at` does
        if iteration == stop_at - 1:
            interrupted.request_stop()
        return lr_at(iteration)

    interrupted.schedule.lr_at = lr_at_and_stop
    with pytest.raises(TrainingInterrupted, match=f"stopped at iteration {stop_at}"):
        interrupted.fit()
    resumed = Trainer(config, tmp_path, resume=True)
    assert resumed.iteration == stop_at
    summary = resumed.fit()

    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert summary["iterations"] == 20
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_iterations = [m["iteration"] for m in metrics if m["kind"] == "train"]
    assert train_iterations == sorted(set(train_iterations))  # no duplicates after the resume


def test_resume_extends_a_finished_run(tmp_path):
    Trainer(digits_config(iterations=10), tmp_path).fit()
    summary = Trainer(digits_config(iterations=15), tmp_path, resume=True).fit()
    assert summary["iterations"] == 15
    record = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert record["config"]["iterations"] == 15 and "resumed" in record


def test_nothing_written_before_training_and_a_run_killed_before_a_checkpoint_starts_over(
        tmp_path):
    Trainer(digits_config(), tmp_path / "run")  # built, never trained: no run directory yet
    assert not (tmp_path / "run").exists()
    Trainer(digits_config(iterations=5), tmp_path / "run").fit()
    # As if killed outright before its first checkpoint: records, but no checkpoint.
    (tmp_path / "run/checkpoints/last.pt").unlink()
    summary = Trainer(digits_config(iterations=5), tmp_path / "run", resume=True).fit()
    assert summary["iterations"] == 5
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"kind": "resume", "iteration": 0}  # a clean history
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [5]


def test_resume_with_another_model_is_refused(tmp_path):
    Trainer(digits_config(iterations=5), tmp_path).fit()
    with pytest.raises(CheckpointError, match="was trained with --model resnet20, not resnet32"):
        Trainer(digits_config(model="resnet32"), tmp_path, resume=True)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    Trainer(digits_config(iterations=10), tmp_path).fit()
    good = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(Diverged):
        Trainer(digits_config(iterations=40, lr=1e30, milestones=(100,), log_every=20,
                              checkpoint_every=5), tmp_path, resume=True).fit()
    kept = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert kept["iteration"] == 10
    assert all(torch.equal(good["model"][k], kept["model"][k]) for k in good["model"])


def test_epochs_convert_to_iterations():
    trainer = Trainer(digits_config(epochs=0.5, batch_size=64))
    assert trainer.config.iterations == 12  # ceil(0.5 * 1437 / 64)


def test_error_triggered_warmup_ends_during_training():
    trainer = Trainer(digits_config(iterations=60, warmup_until_error=0.8, warmup_lr=0.01,
                                    milestones=(1000,), eval_every=0))
    trainer.fit()
    assert trainer.schedule.warmup_ended_at is not None and trainer.schedule.warmup_ended_at <= 60


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_evaluate_averages_softmax_over_views():
    model = _Linear()
    x = torch.randn(6, 2, 4, 1, 1)  # 6 images, 2 views each
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    result = evaluate(model, [(x, y)], views=True)
    with torch.no_grad():
        probs = model(x.flatten(0, 1)).softmax(1).view(6, 2, 3).mean(1)
    assert result["error"] == pytest.approx(float((probs.argmax(1) != y).float().mean()))
    assert result["loss"] == pytest.approx(float(-probs[range(6), y].log().mean()), rel=1e-5)
    as_list = evaluate(model, [([x[:1, 0], x[:1, 1]], y[:1])])
    assert as_list["loss"] == pytest.approx(float(-probs[0, 0].log()), rel=1e-5)
    assert result["top5_error"] == 0.0 and model.training


def test_bn_recalibrate_re_estimates_before_evaluations_and_checkpoints(tmp_path):
    """--bn-recalibrate: the evaluations and the checkpoint's model use statistics re-estimated
    at the final weights from the batches at the run's position; the weights' path is the
    plain run's (training never reads the running statistics)."""
    from distbelief.engine.evaluate import recalibrate_for

    plain = Trainer(digits_config(), tmp_path / "plain")
    plain.fit()
    config = digits_config(bn_recalibrate=3)
    trainer = Trainer(config, tmp_path / "run")
    summary = trainer.fit()
    ours = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"]
    theirs = load_checkpoint(tmp_path / "plain/checkpoints/last.pt")["model"]
    weights = [k for k in ours if "running" not in k and "tracked" not in k]
    assert all(torch.equal(ours[k], theirs[k]) for k in weights)
    assert not torch.allclose(ours["bn1.running_var"], theirs["bn1.running_var"])
    torch.manual_seed(0)
    model = plain.model
    recalibrate_for(model, config, plain.data, 20)
    torch.testing.assert_close(ours["bn1.running_var"], model.state_dict()["bn1.running_var"])
    records = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["bn_recalibrated"] for r in evals] == [3, 3]
    assert summary["test_error"] == evals[-1]["error"]
