"""The Ray side of `--mode sync`: the hub in an actor, rank 0's client of it, Ray Train's
checkpoints, and the function each Ray Train worker runs. The logic lives in `sync.hub` and
`sync.worker`, tested without Ray.

Ray Train (`TorchTrainer`) places the workers, sets up their torch.distributed process group
(gloo on CPUs, NCCL on GPUs), keeps the checkpoints they report (`ray.train.report`, in its
storage: RUN_DIR/ray-train, or --train-storage) and, when a worker dies, restarts the whole
group up to --max-restarts times; each restarted worker continues from the latest checkpoint
(`ray.train.get_checkpoint`), and so does a run resumed later with the same storage.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from distbelief.distributed.sync.hub import SyncHub
from distbelief.distributed.sync.worker import SyncWorker
from distbelief.engine.checkpoint import load_checkpoint, save_checkpoint

STATE_FILE = "state.pt"  # in each Ray Train checkpoint: the training state and its records


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class HubActor:
    """A `SyncHub` in its own process. Ray restarts it if it dies, and retries the calls that
    were in flight (what a restart loses: `sync.hub`). `take(timeout)` waits up to `timeout`
    seconds for an event, so the driver hears of one at once without polling."""

    def __init__(self):
        self.hub = SyncHub()
        self.arrived = asyncio.Event()

    async def joined(self, rank: int, pid: int) -> None:
        self.hub.joined(rank, pid)

    async def put(self, event: dict) -> None:
        self.hub.put(event)
        self.arrived.set()

    async def take(self, timeout: float) -> list[dict]:
        if not self.hub.events:
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        self.arrived.clear()
        return self.hub.take()

    async def request_stop(self) -> None:
        self.hub.request_stop()

    async def stop_requested(self) -> bool:
        return self.hub.stop_requested()

    async def status(self) -> dict:
        return self.hub.status()


class HubClient:
    """Rank 0's side of the hub: events are sent without waiting (Ray keeps one caller's calls
    in order); whether a stop was requested is asked in the background and read when the
    answer is there, so a step never waits for the hub. `flush()` waits until every event has
    arrived: a call still in flight when the worker's process ends would be lost."""

    def __init__(self, hub):
        self.hub, self.asked, self.sent = hub, None, []

    def put(self, event: dict) -> None:
        self.sent.append(self.hub.put.remote(event))
        _, self.sent = ray.wait(self.sent, num_returns=len(self.sent), timeout=0)

    def flush(self) -> None:
        ray.get(self.sent)
        self.sent = []

    def stop_requested(self) -> bool:
        if self.asked is None:
            self.asked = self.hub.stop_requested.remote()
        ready, _ = ray.wait([self.asked], timeout=0)
        if not ready:
            return False
        answer, self.asked = ray.get(self.asked), None
        return answer


class TrainReport:
    """`SyncWorker`'s `report` on Ray Train: rank 0 writes the state and the run's records so
    far into a checkpoint folder, which Ray Train copies into its storage
    before `ray.train.report` returns; the other ranks report without one (the call is
    collective)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, iteration: int, state: dict | None, records: list[dict]) -> None:
        from ray import train

        if self.rank != 0:
            train.report({"iteration": iteration}, checkpoint=None)
            return
        folder = tempfile.mkdtemp(prefix="distbelief-sync-checkpoint-")
        try:
            save_checkpoint(Path(folder) / STATE_FILE, {**state, "records": records})
            train.report({"iteration": iteration},
                         checkpoint=train.Checkpoint.from_directory(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def restored(checkpoint, initial: dict | None) -> tuple[dict | None, list[dict]]:
    """(the state to continue from, the run's training records up to it): Ray Train's latest
    `checkpoint` when there is one, else `initial` (a run resumed from its run directory
    alone, or a new run: None) without records."""
    if checkpoint is None:
        return initial, []
    with checkpoint.as_directory() as folder:
        state = load_checkpoint(Path(folder) / STATE_FILE)
    return state, state.pop("records")


def train_loop(args: dict) -> None:
    """What each Ray Train worker runs: `args` holds the config, the hub's actor name, the
    data statistics, the CPU threads per worker and the state to start from when Ray Train
    has no checkpoint."""
    from ray import train
    from ray.train.torch import get_device

    config = args["config"]
    torch.set_num_threads(args["threads"])
    context = train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    hub = ray.get_actor(args["hub"])
    hub.joined.remote(rank, os.getpid())
    state, records = restored(train.get_checkpoint(), args["initial"])
    device = get_device()
    worker = SyncWorker(config, rank, world, device, args["stats"],
                        hub=HubClient(hub) if rank == 0 else None,
                        wrap=_ddp(device) if world > 1 else None,
                        control=dist.new_group(backend="gloo") if world > 1 else None,
                        report=TrainReport(rank))
    if state is not None:
        worker.load(state, records)
    if rank == 0:
        worker.hub.put({"kind": "attempt", "iteration": worker.iteration, "records": records})
    worker.run()
    if rank == 0:
        worker.hub.flush()


def _ddp(device: torch.device):
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return wrap


def fit_workers(config, hub_name: str, stats: dict, shape, storage: str,
                initial: dict | None) -> None:
    """Run `train_loop` on config.cluster.replicas Ray Train workers of `shape`
    (`placement.ReplicaShape`) until they finish; Ray Train keeps its checkpoints and its own
    files in the folder `storage` (a path or a URI), where a later call finds them to continue
    from; `initial` is the state to start from when it holds none.

    Raises:
        ray.train.TrainingFailedError: a worker failed more than --max-restarts times."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    try:  # Ray Train's progress lines at INFO would drown ours (Ray >= 2.50 has the setting)
        from ray.train import LoggingConfig
        quiet = {"logging_config": LoggingConfig(log_level="WARNING")}
    except ImportError:
        quiet = {}

    # Workers stay in the driver's working directory (Ray Train would move them into its own
    # run folder), so that relative paths in the config (--data-dir) mean what they say.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    gpu = shape.device == "cuda"
    resources = {"CPU": shape.num_cpus, **({"GPU": shape.num_gpus} if gpu else {})}
    parent, name = storage.rstrip("/").rsplit("/", 1)
    TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "hub": hub_name, "stats": stats,
                           "threads": shape.threads, "initial": initial},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.cluster.replicas, use_gpu=gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            storage_path=parent, name=name,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=config.cluster.max_restarts),
            **quiet)).fit()
