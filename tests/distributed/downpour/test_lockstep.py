"""Downpour in lockstep (--lockstep): N replicas in turn in one process, staleness exactly
N - 1, repeatable bit for bit; records, checkpoints and resume as a Ray run's. No Ray."""

import pytest
import torch

from distbelief.api import trainer_for
from distbelief.distributed.downpour.lockstep import LockstepTrainer
from distbelief.engine import TrainingInterrupted, load_checkpoint
from distbelief.engine.rundir import read_jsonl
from distbelief.errors import ConfigError
from distbelief.recipes import get_recipe


def lockstep_config(**kw):
    settings = dict(mode="downpour", lockstep=True, replicas=16, ps_shards=2, iterations=48,
                    batch_size=32, milestones=(32,), deterministic=True, device="cpu",
                    channels_last=False, log_every=16, eval_every=24, checkpoint_every=24)
    return get_recipe("digits").replace(**{**settings, **kw})


def test_sixteen_replicas_are_exactly_fifteen_stale_and_repeat_bit_for_bit(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    summaries = [trainer_for(lockstep_config(), run).fit() for run in runs]
    a, b = (load_checkpoint(run / "checkpoints/last.pt")["model"] for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    s = summaries[0]
    # The first round fetches fresh; after it every push is 15 versions late, on both shards.
    assert s["staleness"] == {0: 16 * 2, 15: (48 - 16) * 2} and s["lockstep"]
    assert s["iterations"] == 48 and s["shard_updates"] == [48, 48]
    assert s["lookahead_sources"] == list(range(16))
    records = read_jsonl(runs[0] / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [16, 32, 48]
    assert train[-1]["staleness_mean"] == pytest.approx(15 * 32 / 48)
    assert train[-1]["lr"] == pytest.approx(0.01)  # the schedule's, past milestone 32
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [24, 48] and evals[-1]["error"] < 0.9


def test_stop_and_resume_continue_the_records_and_the_shards(tmp_path, monkeypatch):
    """A stop (a signal's request) after the checkpoint at 16: the run resumes from it and
    logs every record once."""
    run = tmp_path / "run"
    config = lockstep_config(replicas=4, iterations=48, log_every=8, checkpoint_every=16)
    saves = []
    real_save = LockstepTrainer.save

    def save_then_stop(self):
        real_save(self)
        saves.append(self.steps)
        if len(saves) == 1:
            self.request_stop()

    monkeypatch.setattr(LockstepTrainer, "save", save_then_stop)
    with pytest.raises(TrainingInterrupted, match="stopped at iteration 16"):
        trainer_for(config, run).fit()
    monkeypatch.setattr(LockstepTrainer, "save", real_save)
    summary = trainer_for(config, run, resume=True).fit()
    assert summary["iterations"] == 48 and summary["shard_updates"] == [48, 48]
    records = read_jsonl(run / "metrics.jsonl")
    train = [r["iteration"] for r in records if r["kind"] == "train"]
    assert train == [8, 16, 24, 32, 40, 48]  # none repeated, none lost
    assert {"kind": "resume", "iteration": 16} in records


def test_bn_recalibrate_re_estimates_the_evaluated_and_checkpointed_statistics(tmp_path):
    from distbelief.engine.evaluate import recalibrate

    run = tmp_path / "run"
    config = lockstep_config(replicas=2, iterations=16, eval_every=0, checkpoint_every=0,
                             bn_recalibrate=3)
    trainer = trainer_for(config, run)
    summary = trainer.fit()
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["bn_recalibrated"] == 3
    saved = load_checkpoint(run / "checkpoints/last.pt")["model"]
    # The shards keep their own moving average; the checkpoint's model has the re-estimate.
    model = trainer.server.load(torch.cat([s.pull()[0] for s in trainer.shards]))
    shards_mean = model.state_dict()["bn1.running_mean"].clone()
    recalibrate(model, trainer.data.train.batches(16), 3)  # the batches at its position
    torch.testing.assert_close(saved["bn1.running_mean"], model.state_dict()["bn1.running_mean"])
    assert not torch.allclose(saved["bn1.running_mean"], shards_mean)
    assert summary["test_error"] == evals[-1]["error"]


@pytest.mark.parametrize("settings, message", [
    ({"partitions": 2}, "--lockstep runs whole replicas in one process"),
])
def test_lockstep_refuses_what_it_cannot_run(settings, message):
    with pytest.raises(ConfigError, match=message):
        lockstep_config(**settings)


def test_lockstep_refuses_a_cluster_address(tmp_path):
    with pytest.raises(ConfigError, match="drop --address"):
        trainer_for(lockstep_config(), tmp_path / "run", address="127.0.0.1:6379")
    assert not (tmp_path / "run").exists()


def test_async_warmup_ramps_the_shards_lr_over_the_first_minibatches(tmp_path):
    # --async-warmup 12 at 4 replicas: the shards' lr is lr x (1/4 + 3/4 x minibatches / 12)
    # until 12 minibatches, then the schedule's, as each training record reports it.
    config = lockstep_config(replicas=4, iterations=16, log_every=4, milestones=(),
                             async_warmup=12, eval_every=16, checkpoint_every=16)
    trainer_for(config, tmp_path / "run").fit()
    train = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "train"]
    lr = config.lr
    assert [r["lr"] for r in train] == pytest.approx([lr * f for f in (0.5, 0.75, 1, 1)])
