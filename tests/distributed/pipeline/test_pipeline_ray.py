"""Single mode with --partitions on a local Ray: each partition a Stage actor. The pipeline
equals the single-process trainer (M = 1 with BatchNorm; M = 4 on a BatchNorm-free model), its
checkpoints are ordinary ones (resumable with another --partitions), each actor holds only its
part, and a partition that dies stops the run with one line."""

import threading

import pytest
import torch

import distbelief

from distbelief.distributed.pipeline import PipelineTrainer
from distbelief.engine import Trainer, load_checkpoint
from distbelief.engine.rundir import read_jsonl
from distbelief.errors import DistbeliefError
from support.downpour import digits_config


def config(**kw):
    # One thread per partition, and the reference on one thread: CPU kernels sum in an order
    # that depends on the thread count, and 12 steps amplify a last-bit difference to 1e-4.
    settings = dict(mode="single", iterations=12, milestones=(6,), log_every=4, eval_every=0,
                    checkpoint_every=0, channels_last=False, replica_cpus=1)
    return digits_config(**{**settings, **kw})


def reference_run(c, until=12) -> Trainer:
    """The single-process trainer of `c` (unpartitioned) after `until` steps, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = Trainer(c.replace(partitions=1, micro_batches=1, partition_at=""))
        reference.train_until(until)
    finally:
        torch.set_num_threads(threads)
    return reference


def assert_same_model(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name].float(), a[name].float(), rtol=0, atol=atol,
                                   msg=name)


# Three cuts of ResNet-20 into 3 parts: make test-all; make test cuts it into 2 (BatchNorm, M = 1)
# and an MLP into 3 with 4 micro-batches.
@pytest.mark.parametrize("parts,micro,model,handoff,at", [
    (2, 1, "resnet20", "direct", ""),
    pytest.param(3, 1, "resnet20", "direct", "", marks=pytest.mark.slow),
    (3, 4, "mlp", "direct", ""), (3, 4, "mlp", "collective", "1,3")])
def test_partitioned_replica_equals_the_trainer(ray_cluster, tmp_path, parts, micro, model,
                                                handoff, at):
    c = config(model=model, partitions=parts, micro_batches=micro, pipeline_handoff=handoff,
               partition_at=at)
    summary = PipelineTrainer(c, tmp_path / "run").fit()
    reference = reference_run(c)
    saved = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert saved["iteration"] == 12
    assert_same_model(reference.model.state_dict(), saved["model"])
    # The optimizer state is the whole model's, as the trainer writes it.
    ref_opt, opt = reference.optimizer.state_dict(), saved["optimizer"]
    assert sorted(opt["state"]) == sorted(ref_opt["state"])
    for i in ref_opt["state"]:
        torch.testing.assert_close(opt["state"][i]["momentum_buffer"],
                                   ref_opt["state"][i]["momentum_buffer"], rtol=0, atol=1e-6)
    records = read_jsonl(tmp_path / "run/metrics.jsonl")
    cluster = next(r for r in records if r["kind"] == "cluster")
    params = [p["params"] for p in cluster["partitions"]]
    if at:  # the parts begin where asked
        assert [p["units"].split(" ..")[0] for p in cluster["partitions"][1:]] == at.split(",")
    assert len(params) == parts and sum(params) == sum(
        p.numel() for p in reference.model.parameters())
    train = [r for r in records if r["kind"] == "train"]
    pipe = train[-1]["pipeline"]
    assert pipe["partitions"] == parts and 0 <= pipe["bubble"] < 1
    assert (pipe["schedule"], pipe["ahead"], pipe["handoff"]) == ("1f1b", 1, handoff)
    assert all(b > 0 for b in pipe["bytes_per_step"][:-1])  # every stage but the last sends
    assert summary["iterations"] == 12
    assert (summary["partitions"], summary["micro_batches"]) == (parts, micro)


def stop_at(c, run, until):
    """A partitioned run of `c` in `run`, stopped after `until` steps (checkpointed there)."""
    stopper = PipelineTrainer(c, run)
    stopper.start()
    stopper.life.begin(stopper)
    stopper.train_until(until)
    stopper.close()
    stopper.life.release()  # as its process's end would: the run folder has one writer


def unseen(monkeypatch, *modules):
    """The partitions told they do not see the run directory (every test cluster shares one
    filesystem): the driver's fingerprints of its files are of no file."""
    for module in modules:
        monkeypatch.setattr(module, "fingerprint", lambda path: (-1, -1))


# Each part reads its own tensors by name, whatever the cut; or through the driver (make
# test-all; make test writes through the driver below).
@pytest.mark.parametrize("through_driver", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_partitioned_checkpoint_resumes_with_other_partitions(ray_cluster, tmp_path,
                                                                monkeypatch, through_driver):
    from distbelief.distributed.pipeline import runner

    c = config(checkpoint_every=6)
    stop_at(c.replace(partitions=2), tmp_path / "run", 6)
    last = load_checkpoint(tmp_path / "run/checkpoints/last.pt", assemble=False)
    assert "model" not in last and "optimizer" not in last  # pieces, one per part
    assert last["pieces"]["parts"] == ["part-0.pt", "part-1.pt"]
    if through_driver:
        unseen(monkeypatch, runner)
    PipelineTrainer(c.replace(partitions=3), tmp_path / "run", resume=True).fit()
    reference = reference_run(c)
    assert_same_model(reference.model.state_dict(),
                      load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"])


def test_a_partitioned_checkpoint_resumes_bitwise_with_the_same_cut(ray_cluster, tmp_path):
    # Stopped at 6 (each part writing its piece) and resumed with the same cut, each part
    # reading its own: the same run as one never stopped, to the bit (model and optimizer).
    c = config(checkpoint_every=6, partitions=2)
    PipelineTrainer(c, tmp_path / "straight").fit()
    stop_at(c, tmp_path / "run", 6)
    PipelineTrainer(c, tmp_path / "run", resume=True).fit()
    straight, resumed = (load_checkpoint(tmp_path / run / "checkpoints/last.pt")
                         for run in ("straight", "run"))
    assert resumed["iteration"] == straight["iteration"] == 12
    assert_same_model(straight["model"], resumed["model"], atol=0)
    for i, state in straight["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][i]["momentum_buffer"],
                           state["momentum_buffer"]), i


def test_pieces_written_through_the_driver_resume_in_one_process(ray_cluster, tmp_path,
                                                                  monkeypatch):
    # The parts' pieces written by the driver (the parts do not see the run directory), then
    # the run resumed without partitions: the model and optimizer assembled from them, and
    # the whole checkpoint it writes replaces the generation of pieces.
    from distbelief.engine import pieces
    from distbelief.engine.rundir import RunDir

    c = config(checkpoint_every=6)
    with monkeypatch.context() as patch:
        unseen(patch, pieces)
        stop_at(c.replace(partitions=2), tmp_path / "run", 6)
    assert RunDir(tmp_path / "run").generation() is not None
    Trainer(c, tmp_path / "run", resume=True).fit()
    assert RunDir(tmp_path / "run").generation() is None  # last.pt is the state again
    saved = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    reference = reference_run(c)
    assert saved["iteration"] == 12
    assert_same_model(reference.model.state_dict(), saved["model"])
    for i, state in reference.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(saved["optimizer"]["state"][i]["momentum_buffer"],
                                   state["momentum_buffer"], rtol=0, atol=1e-6)


def test_init_from_a_partitioned_run_reaches_the_parts_then_leaves_the_driver(ray_cluster,
                                                                             tmp_path):
    # --init-from's file is read here (a partitioned run's last.pt: assembled from its
    # pieces), handed to the parts of another cut, and dropped.
    import ray

    c = config(iterations=2, checkpoint_every=2)
    PipelineTrainer(c.replace(partitions=2), tmp_path / "first").fit()
    source = distbelief.load(tmp_path / "first").state_dict()
    trainer = PipelineTrainer(c.replace(partitions=3, seed=9, init_from=str(
        tmp_path / "first/checkpoints/last.pt")), tmp_path / "run")
    trainer.start()
    try:
        states = ray.get([a.state.remote() for a in trainer.runner.session.replicas])
        assert all(t.is_meta for t in trainer.model.parameters()) and trainer.optimizer is None
    finally:
        trainer.close()
        trainer.life.release()
    values = [v for s in states for v in s["module"].values()]
    assert len(values) == len(source)
    for (name, expected), value in zip(source.items(), values):
        assert torch.equal(value, expected), name


def test_the_driver_never_holds_the_model(ray_cluster, tmp_path):
    # A 38M-parameter MLP (152 MB of weights, 303 MB with momentum): the driver's private
    # memory, sampled through start, training, a checkpoint and an evaluation, grows by far
    # less than one part; each partition holds its part's parameters only, and its memory
    # at start grows by its part.
    import os
    import time

    from distbelief.distributed.runtime.cluster import memory

    c = config(model="deep_mlp", hidden=3072, partitions=2, iterations=3, eval_every=3,
               checkpoint_every=3, lr=0.01, milestones=())
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], memory()["private"])
            time.sleep(0.005)

    # What a first trainer in a process allocates once (the data, torch's own pools) is not
    # the model's: a small one runs first, and its partitions' peaks are the baseline of a
    # partition process.
    small = PipelineTrainer(c.replace(hidden=16), tmp_path / "small")
    small.fit()
    before = memory()["private"]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        trainer = PipelineTrainer(c, tmp_path / "run")
        summary = trainer.fit()
    finally:
        done.set()
        sampler.join()
    whole = 37_991_434 * 4
    assert sum(p["params"] for p in trainer.placed) == whole // 4
    assert all(p["params"] < 0.6 * whole // 4 for p in trainer.placed)
    assert all(p["pid"] != os.getpid() for p in trainer.placed)
    assert peak[0] - before < whole / 4, (peak[0] - before) / 2**20
    # Each partition's own peak (VmHWM, through its start: the values drawn there) grew by
    # its part, not by the model (measured: 76 MB each for parts of 76 MB; whole, 152).
    for part, base in zip(trainer.placed, small.placed):
        grown = part["memory"]["peak"] - base["memory"]["peak"]
        assert grown < 1.25 * 4 * part["params"], (grown / 2**20, part["params"])
    assert all(t.is_meta for t in trainer.model.parameters()) and trainer.optimizer is None
    assert summary["iterations"] == 3 and summary["test_error"] is not None


# The last partition dying: make test-all; make test kills the first.
@pytest.mark.parametrize("victim", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_partition_that_dies_stops_the_run_with_one_line(ray_cluster, tmp_path, victim):
    import ray

    trainer = PipelineTrainer(config(partitions=2, iterations=400), tmp_path / "run")

    def kill_one():
        while trainer.iteration < 3:
            threading.Event().wait(0.05)
        ray.kill(trainer.runner.session.replicas[victim], no_restart=True)

    killer = threading.Thread(target=kill_one)
    killer.start()
    with pytest.raises(DistbeliefError, match=rf"partition actor\(s\) {victim} died.*--resume"):
        trainer.fit()
    killer.join()
    assert trainer.iteration < 400
    assert trainer.runner.session.replicas == []  # released


@pytest.mark.parametrize("handoff", ["direct", "collective"])
def test_a_killed_partition_is_restarted_in_place_and_the_run_completes(ray_cluster, tmp_path,
                                                                        handoff):
    # Partition 1 killed between steps 5 and 6, with a snapshot after every step: Ray restarts
    # it, every partition goes back to the snapshot of step 5 (none lost), step 6 runs again,
    # and the run ends where an uninterrupted one ends. Collective hand-offs: the survivor's
    # group has lost a member; all join a new one.
    import ray

    c = config(partitions=2, snapshot_every_s=1e-6, checkpoint_every=0, pipeline_handoff=handoff)
    trainer = PipelineTrainer(c, tmp_path / "run")
    step = trainer.runner.step

    def step_then_kill(x, y, lr, iteration):
        out = step(x, y, lr, iteration)
        if iteration == 4:  # the fifth step
            ray.kill(trainer.runner.session.replicas[1], no_restart=False)
        return out

    trainer.runner.step = step_then_kill
    summary = trainer.fit()
    failures = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "failure"]
    assert [(f["actor"], f["iteration"], f["restored_step"], f["steps_lost"])
            for f in failures] == [("partition 1", 5, 5, 0)]
    assert summary["partition_failures"] == 1 and summary["partition_steps_lost"] == 0
    reference = reference_run(c)
    assert_same_model(reference.model.state_dict(),
                      load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"])


def test_every_partition_goes_back_to_the_same_snapshot(ray_cluster, tmp_path):
    # Only the start's snapshot: after partition 1 dies at step 4, partition 0 (alive, 3 steps
    # further) goes back to the start too, so that the parts are of one model.
    import copy

    import ray

    c = config(partitions=2, snapshot_every_s=3600.0, iterations=6)
    trainer = PipelineTrainer(c, tmp_path / "run")
    # The whole model at the start, as one process builds it: the parts draw theirs alone.
    start = copy.deepcopy(reference_run(c, until=0).model.state_dict())
    step, restore, restored = trainer.runner.step, trainer.runner._restore, []

    def step_then_kill(x, y, lr, iteration):
        out = step(x, y, lr, iteration)
        if iteration == 2:
            ray.kill(trainer.runner.session.replicas[1], no_restart=False)
        return out

    def restore_and_look(lost):
        at = restore(lost)
        states = ray.get([a.state.remote() for a in trainer.runner.session.replicas])
        restored.append((at, [v for s in states for v in s["module"].values()]))
        return at

    trainer.runner.step, trainer.runner._restore = step_then_kill, restore_and_look
    summary = trainer.fit()
    assert summary["partition_steps_lost"] == 3
    (at, values), = restored
    assert at == 0
    # The parts' state dicts, in order, are the whole model's entries in order.
    assert len(values) == len(start)
    for (name, expected), value in zip(start.items(), values):
        assert torch.equal(value, expected), name


@pytest.mark.slow  # a second run; make test kills between steps (above)
def test_a_partition_killed_during_a_step_is_restarted(ray_cluster, tmp_path):
    import ray

    trainer = PipelineTrainer(config(partitions=2, snapshot_every_s=1e-6), tmp_path / "run")

    def kill_one():
        while trainer.iteration < 4:
            threading.Event().wait(0.005)
        ray.kill(trainer.runner.session.replicas[0], no_restart=False)

    killer = threading.Thread(target=kill_one)
    killer.start()
    summary = trainer.fit()
    killer.join()
    assert summary["iterations"] == 12 and summary["partition_failures"] == 1
    # The snapshot taken as it died, if it was, is skipped for the one before.
    assert summary["partition_steps_lost"] <= 1


def sleepers(count, pass_s, die_at=None, handoff="direct", raises=False):
    """`count` stage actors over `SleepStage`s: the real actor's methods (`StageHost`'s, its
    direct and collective hand-offs included), the stage's work a sleep."""
    import os
    import time

    import ray

    from distbelief.distributed.pipeline.actors import RELAY, StageHost

    # Defined here, so that Ray ships them by value (this test module's imports are not on
    # the workers' path).
    class SleepStage:
        """A stage whose every pass sleeps `pass_s` (the last stage's forward of micro-batch
        `die_at` ends its process instead, or with `raises` raises)."""

        def __init__(self, index, count, pass_s, die_at=None):
            self.index, self.count, self.pass_s, self.die_at = index, count, pass_s, die_at

        def zero_grad(self):
            pass

        def forward(self, micro, x, train=True):
            time.sleep(self.pass_s)
            return x

        def forward_loss(self, micro, x, y, weight):
            if micro == self.die_at:
                if raises:
                    raise RuntimeError("the stage failed")
                os._exit(1)
            time.sleep(self.pass_s)
            return float(weight), 0

        def backward(self, micro, grad=None):
            time.sleep(self.pass_s)
            return None if self.index == 0 else torch.zeros(1)

        def forward_loss_backward(self, micro, x, y, weight):
            return self.forward_loss(micro, x, y, weight), self.backward(micro)

        def update(self, lr):
            pass

    class SleeperHost(StageHost):
        def __init__(self, index):
            self.stage = SleepStage(index, count, pass_s, die_at if index == count - 1 else None)
            self.open_mailbox()

        def ping(self):
            return "here"

    actor = ray.remote(num_cpus=0, max_restarts=0, concurrency_groups=RELAY)(SleeperHost)
    actors = [actor.remote(p) for p in range(count)]
    if handoff == "collective":
        group = f"sleepers-{os.urandom(4).hex()}"
        ray.get([a.join.remote(count, group) for a in actors])
    return actors


@pytest.mark.parametrize("schedule,handoff", [("1f1b", "driver"), ("gpipe", "driver"),
                                              ("1f1b", "direct"), ("gpipe", "direct"),
                                              ("1f1b", "collective")])
def test_stages_overlap(ray_cluster, schedule, handoff):
    # Stages whose every pass sleeps 40 ms: run one after the other, a step of 2 stages x 8
    # micro-batches x 2 passes takes 1.28 s; pipelined, each stage's 0.64 s of passes plus the
    # one pass of fill and drain, 0.72 s. A schedule that waited for each call before the next
    # (or stages that could not run at once) would take the serial sum.
    import time

    import ray

    from distbelief.distributed.pipeline.actors import caller, watcher
    from distbelief.distributed.pipeline.schedule import Pipeline

    stages = sleepers(2, 0.04, handoff=handoff)
    pipeline = Pipeline(caller(stages), ray.get, 2, 8, schedule, 0, handoff, watcher(stages))
    x, y = torch.zeros(16, 4), torch.zeros(16, dtype=torch.long)
    pipeline.step(x, y, 0.1)  # warm-up: the actors' processes start
    start = time.perf_counter()
    loss, _ = pipeline.step(x, y, 0.1)
    wall = time.perf_counter() - start
    assert loss == pytest.approx(1.0)  # every micro-batch's weight, once
    serial, pipelined = 2 * 8 * 2 * 0.04, (8 + 1) * 2 * 0.04
    assert wall < (serial + pipelined) / 2, (wall, serial, pipelined)


@pytest.mark.parametrize("handoff,raises", [("direct", False), ("collective", False),
                                            ("collective", True)])
def test_a_stage_dying_mid_step_releases_the_others(ray_cluster, handoff, raises):
    # The last stage dies (or raises) at its fourth micro-batch while the first waits for
    # that micro-batch's gradient (in its mailbox, or in the collective group). The step fails
    # with the death or the error (not with the survivor's abandonment, nor its lost
    # connection), soon, and the survivor answers calls again.
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from distbelief.distributed.pipeline.actors import caller, watcher
    from distbelief.distributed.pipeline.schedule import Pipeline

    stages = sleepers(2, 0.01, die_at=3, handoff=handoff, raises=raises)
    pipeline = Pipeline(caller(stages), ray.get, 2, 8, "1f1b", 1, handoff, watcher(stages))
    x, y = torch.zeros(16, 4), torch.zeros(16, dtype=torch.long)
    raised = []

    def step():
        try:
            pipeline.step(x, y, 0.1)
        except Exception as e:  # noqa: BLE001 - what it raised is the point
            raised.append(e)

    stepper = threading.Thread(target=step, daemon=True)
    stepper.start()
    stepper.join(30)
    assert not stepper.is_alive(), "the surviving stage still waits for the failed one"
    assert len(raised) == 1, raised
    if raises:
        assert isinstance(raised[0], RayTaskError) and "the stage failed" in str(raised[0])
    else:
        assert isinstance(raised[0], RayActorError), raised
    assert ray.get(stages[0].ping.remote(), timeout=10) == "here"


def test_evaluations_run_through_the_partitions(ray_cluster, tmp_path):
    # The driver sends images and gets logits: no weights come home for an evaluation, and
    # the numbers are those of the whole model evaluated at the partitions' weights.
    from distbelief.engine.evaluate import evaluate

    trainer = PipelineTrainer(config(partitions=2, micro_batches=2), tmp_path / "run")
    trainer.start()
    try:
        trainer.life.begin(trainer)
        trainer.train_until(5)
        gathers = []
        trainer.runner.gather = lambda optimizer: gathers.append(1)  # would bring weights
        trainer._gathered_at = None
        results = trainer.life.evaluate(trainer)
        trainer.save()  # each part writes its piece: nothing comes home either
        assert gathers == []
        expected = evaluate(distbelief.load(tmp_path / "run"),
                            trainer.data.splits["test"].batches())
    finally:
        trainer.close()
        trainer.life.release()
    got = results["test"]
    assert got["images"] == expected["images"] > 0
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert got["error"] == pytest.approx(expected["error"], abs=1e-9)
