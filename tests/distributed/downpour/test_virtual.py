"""Downpour on a virtual cluster (--virtual): the real replicas and shards on a simulated clock.
Simulated time follows the cost model, a run repeats bit for bit and replays, records carry
both clocks, stop and resume lose nothing. No Ray."""

import pytest
import torch

from distbelief.api import trainer_for
from distbelief.cli import main
from distbelief.distributed.downpour.generation import DIVERGED, load_snapshot
from distbelief.distributed.downpour.replay import replay_run
from distbelief.distributed.downpour.virtual import VirtualTrainer
from distbelief.engine import Diverged, TrainingInterrupted, load_checkpoint
from distbelief.engine.rundir import RunDir, read_jsonl
from distbelief.plot import plot_runs
from distbelief.recipes import get_recipe

FAST_LINK = "1000gb,0us"  # a megabyte in a microsecond: time is compute alone


def virtual_config(**kw):
    settings = dict(mode="downpour", virtual=True, replicas=4, ps_shards=2, iterations=48,
                    batch_size=32, milestones=(32,), deterministic=True, device="cpu",
                    channels_last=False, log_every=16, eval_every=24, checkpoint_every=24,
                    virtual_step_ms=5.0, virtual_shard_ms=0.5)
    return get_recipe("digits").replace(**{**settings, **kw})


def final_vector(run):
    model = load_checkpoint(run / "checkpoints/last.pt")["model"]
    return torch.cat([t.reshape(-1).float() for t in model.values()])


def test_a_virtual_run_repeats_bit_for_bit_and_its_record_replays(tmp_path):
    config = virtual_config(virtual_spread=0.5, record_order=True)
    a, b = tmp_path / "a", tmp_path / "b"
    summary = trainer_for(config, a).fit()
    trainer_for(config, b).fit()
    assert torch.equal(final_vector(a), final_vector(b))
    # Log-normal step times: the replicas drift, and staleness is what the timing gives (a
    # spread around N - 1 = 3), not --lockstep's fixed 3.
    assert len(summary["staleness"]) >= 3 and summary["iterations"] == 48
    _, report = replay_run(a)
    assert report["equal"], report


def test_one_replica_without_overlap_is_lockstep_s_sgd_in_the_model_s_time(tmp_path):
    """One replica that waits for every fetch and push is sequential SGD, as --lockstep's; on
    a network of no cost and shards of no cost, simulated time is the steps' compute alone."""
    virtual = virtual_config(replicas=1, overlap=False, virtual_link=FAST_LINK,
                             virtual_shard_ms=0.0, virtual_spread=0.0, eval_every=0)
    summary = trainer_for(virtual, tmp_path / "v").fit()
    lockstep = virtual.replace(virtual=False, lockstep=True, virtual_step_ms=None,
                               virtual_shard_ms=None)
    trainer_for(lockstep, tmp_path / "l").fit()
    assert torch.equal(final_vector(tmp_path / "v"), final_vector(tmp_path / "l"))
    assert summary["wall_s"] == pytest.approx(48 * 0.005, rel=1e-3)
    assert summary["staleness"] == {0: 96}


def test_simulated_time_divides_the_steps_among_replicas_and_charges_the_network(tmp_path):
    # Four replicas on free links: 48 steps of 5 ms in about 12 x 5 ms.
    fast = trainer_for(virtual_config(virtual_link=FAST_LINK, virtual_shard_ms=0.0,
                                      virtual_spread=0.0, eval_every=0), None).fit()
    assert 12 * 0.005 <= fast["wall_s"] <= 13 * 0.005
    # On 100 Mbit/s links every push and fetch costs its bytes: at least what the busiest
    # shard's link receives, in sequence.
    slow = trainer_for(virtual_config(virtual_link="100mbit,0us", virtual_shard_ms=0.0,
                                      virtual_spread=0.0, eval_every=0), None).fit()
    # A shard's link carries its pushes in and its pulls out, each at 12.5 MB/s.
    moved = max(rate * slow["wall_s"] for rate in slow["shard_bytes_per_s"])
    assert slow["wall_s"] >= moved / 2 / 12.5e6 and slow["wall_s"] > 2 * fast["wall_s"]
    assert slow["shard_updates"] == [48, 48]
    # Shards slower than the replicas on free links: a shard serves one push at a time, so
    # its 48 pushes take 48 x 8 ms at least (they would overlap in ~12 steps' time if not).
    queued = trainer_for(virtual_config(virtual_link=FAST_LINK, virtual_shard_ms=8.0,
                                        virtual_spread=0.0, eval_every=0), None).fit()
    assert 48 * 0.008 <= queued["wall_s"] < 48 * 0.008 + 0.05


def test_a_straggler_trains_fewer_steps_in_simulated_time(tmp_path):
    trainer = trainer_for(virtual_config(straggler_delay=0.015, virtual_spread=0.0,
                                         eval_every=0), None)
    summary = trainer.fit()
    positions = trainer.progress.positions
    # Replica 0 takes 20 ms a step and the others 5 (and about 1 ms more each on the
    # network and the shards): it trains about a third of their steps.
    assert positions[0] * 2.5 <= min(positions[1:]) and sum(positions) == 48
    assert summary["replica_images_per_s"][0] < summary["replica_images_per_s"][1] / 2.5


def test_records_carry_simulated_and_real_wall_time_and_plot_by_simulated_time(tmp_path):
    run = tmp_path / "run"
    summary = trainer_for(virtual_config(), run).fit()
    records = read_jsonl(run / "metrics.jsonl")
    costs = [r for r in records if r["kind"] == "virtual"][0]
    assert costs["step_s"] == 0.005 and not costs["step_measured"]
    assert costs["shard_push_s"] == [0.0005, 0.0005] and costs["link"] == "10gbit,50us"
    train = [r for r in records if r["kind"] == "train"]
    walls = [r["wall_s"] for r in train]
    assert walls == sorted(walls) and 0.05 < walls[-1] < 0.2  # 12 steps of 5 ms and more
    assert all(r["real_wall_s"] > 0 for r in train)
    # The run ends when the last pushes have landed, a few milliseconds after the last step.
    assert walls[-1] <= summary["wall_s"] < walls[-1] + 0.01
    assert "real_wall_s" in summary and summary["virtual"]["step_s"] == 0.005
    plot_runs([run], tmp_path / "wall.png", x="wall")  # plots wall_s: the simulated time
    assert (tmp_path / "wall.png").stat().st_size > 0


def test_a_measured_cost_model_is_this_machine_s(tmp_path):
    summary = trainer_for(virtual_config(virtual_step_ms=None, virtual_shard_ms=None,
                                         iterations=8, eval_every=0), None).fit()
    costs = summary["virtual"]
    assert costs["step_measured"] and costs["shard_measured"]
    assert 1e-5 < costs["step_s"] < 1.0 and all(0 < s < 0.1 for s in costs["shard_push_s"])


def test_stop_and_resume_continue_the_records_and_the_simulated_clock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = virtual_config(log_every=8, checkpoint_every=16, eval_every=0)
    saves, real_save = [], VirtualTrainer.save

    def save_then_stop(self):
        real_save(self)
        saves.append(self.steps)
        if len(saves) == 1:
            self.request_stop()

    monkeypatch.setattr(VirtualTrainer, "save", save_then_stop)
    with pytest.raises(TrainingInterrupted, match="stopped at iteration 1"):
        trainer_for(config, run).fit()
    monkeypatch.setattr(VirtualTrainer, "save", real_save)
    summary = trainer_for(config, run, resume=True).fit()
    assert summary["iterations"] == 48 and summary["shard_updates"] == [48, 48]
    train = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [8, 16, 24, 32, 40, 48]
    walls = [r["wall_s"] for r in train]
    assert walls == sorted(walls)  # the simulated clock goes on from where it stopped


@pytest.mark.parametrize("flags, message", [
    (["--lockstep"], "without --lockstep"),
    (["--partitions", "2", "--ps-shards", "2", "--record-order"], "--partitions 1"),
    (["--ssp-bound", "1"], "without --ssp-bound"),
    (["--virtual-link", "fast"], "--virtual-link"),
    (["--virtual-straggle", "2,2"], "--virtual-straggle"),
])
def test_the_cli_refuses_what_a_virtual_cluster_cannot_simulate(tmp_path, capsys, flags,
                                                                 message):
    argv = ["train", "--recipe", "digits", "--mode", "downpour", "--virtual", "--iterations",
            "4", "--out", str(tmp_path / "run"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()
    assert main(["train", "--recipe", "digits", "--virtual-step-ms", "5", "--iterations", "4",
                 "--out", str(tmp_path / "run")]) == 2


def test_queued_shards_and_slow_links_still_replay_bit_for_bit(tmp_path):
    """Shards slower than the replicas (8 ms a push against 5 ms steps) queue the pushes, and
    100 Mbit/s links deliver a push's two slices tens of milliseconds apart: each push must be
    applied as it was sent (the replica reuses its memory), and the shards' versions differ
    when a fetch reads them. The replay, from clean copies, ends where the run did."""
    run = tmp_path / "run"
    summary = trainer_for(virtual_config(virtual_shard_ms=8.0, virtual_link="100mbit,1ms",
                                         record_order=True, eval_every=0), run).fit()
    assert summary["staleness_mean"] > 3  # the queues add staleness beyond N - 1
    _, report = replay_run(run)
    assert report["equal"], report


def test_a_warmstart_trains_replica_0_alone_first_in_simulated_time(tmp_path):
    run = tmp_path / "run"
    trainer = trainer_for(virtual_config(warmstart_steps=8, record_order=True, eval_every=0),
                          run)
    trainer.fit()
    from distbelief.distributed.downpour.generation import load_snapshot
    from distbelief.engine.rundir import RunDir

    history = load_snapshot(RunDir(run), 0)["history"]
    pushers = [op[1] for op in history if op[0] == "push"]
    assert pushers[:8] == [0] * 8 and set(pushers[8:]) == {0, 1, 2, 3}
    assert sum(trainer.progress.positions) == 48


# --- partitioned replicas (--partitions): each partition a node of its own, its passes
# charged by the cost model, activations and their gradients crossing the links.
def cut_config(**kw):
    return virtual_config(**{**dict(replicas=1, partitions=2, ps_shards=3, overlap=False,
                                    virtual_link=FAST_LINK, virtual_shard_ms=0.0,
                                    virtual_spread=0.0, eval_every=0, micro_batches=1), **kw})


def test_one_partitioned_replica_is_the_whole_replica_s_sgd_in_the_model_s_time(tmp_path):
    """Without overlap a partitioned replica is sequential SGD, as a whole one: the same
    parameters; on free links and shards a step takes the step's time, its parts' passes
    adding up to it exactly."""
    config = cut_config()
    parts = trainer_for(config, tmp_path / "p").fit()
    trainer_for(config.replace(partitions=1, ps_shards=1), tmp_path / "w").fit()
    torch.testing.assert_close(final_vector(tmp_path / "p"), final_vector(tmp_path / "w"),
                               rtol=0, atol=1e-5)
    assert parts["virtual"]["partitions"] == 2
    assert sum(parts["virtual"]["part_shares"]) == pytest.approx(1, abs=1e-3)
    assert parts["wall_s"] == pytest.approx(48 * 0.005, rel=1e-3)
    assert parts["staleness"] == {0: 48 * 3}  # every shard, every push


def test_micro_batches_overlap_the_partitions_in_simulated_time():
    one = trainer_for(cut_config(), None).fit()
    four = trainer_for(cut_config(micro_batches=4, pipeline_schedule="gpipe"), None).fit()
    busiest = max(four["virtual"]["part_shares"]) * 48 * 0.005
    # Stage 1 works on micro-batch m while stage 0 works on m + 1: shorter than one
    # micro-batch (every pass in sequence), never shorter than the busiest part's passes.
    assert busiest <= four["wall_s"] < 0.9 * one["wall_s"]


def test_activations_and_their_gradients_cross_the_links(tmp_path):
    config = cut_config(virtual_link="1gbit,0us")
    parts = trainer_for(config, tmp_path / "p").fit()
    whole = trainer_for(config.replace(partitions=1, ps_shards=1), None).fit()
    record = [r for r in read_jsonl(tmp_path / "p/metrics.jsonl") if r["kind"] == "train"][-1]
    handed = 48 * sum(record["partitions"]["bytes_per_step"])  # forward, then backward
    assert handed > 0
    # The pushes and fetches move the same values either way; the rest is the calls' and
    # the shards' replies' messages (256 bytes each).
    extra = parts["network_bytes"] - whole["network_bytes"]
    assert handed <= extra <= handed + 48 * 40 * 256
    # On links of 1 ms latency, a step is the compute and at least six latencies: stage 0's
    # call, the activation to stage 1, its gradient back, the push's round trip and stage
    # 0's metrics back at the head (a stage that did not wait for its arguments would
    # compute as soon as its call was queued).
    late = trainer_for(cut_config(virtual_link="1000gb,1ms"), None).fit()
    assert 48 * (0.005 + 0.006) <= late["wall_s"] <= 48 * (0.005 + 0.008)


def test_a_diverged_run_replays_from_its_histories_to_where_the_server_stopped_being_finite(
        tmp_path):
    # 24 sane warmup minibatches (one checkpoint), then an lr that overflows at once.
    config = virtual_config(record_order=True, warmup_iterations=24, warmup_lr=0.05, lr=1e30,
                            eval_every=0)
    run = tmp_path / "run"
    with pytest.raises(Diverged):
        trainer_for(config, run).fit()
    assert (run / DIVERGED).is_file()
    checkpoint = load_checkpoint(run / "checkpoints/last.pt")
    assert checkpoint["iteration"] == 24  # the last good one
    replay, report = replay_run(run)
    assert report["source"] == "diverged" and "equal" not in report
    assert 24 < report["diverged_at"] <= report["recorded_minibatches"]
    # The histories kept at the divergence are the checkpoint's, continued: replayed up to
    # the minibatches each shard had at the checkpoint, they give its values bit for bit.
    for k in range(2):
        snapshot = load_snapshot(RunDir(run), k)
        replay, _ = replay_run(run, until=snapshot["steps"])
        assert replay.shards[k].steps == snapshot["steps"] < 24 + 4
        assert torch.equal(replay.shards[k].w, torch.as_tensor(snapshot["w"]))
    # Resumed with a sane lr, the run goes past the divergence: its next generation makes
    # the kept histories stale, and they go.
    trainer_for(config.replace(lr=0.05), run, resume=True).fit()
    assert not (run / DIVERGED).exists()
    _, report = replay_run(run)
    assert report["source"] == "checkpoint" and report["equal"], report
