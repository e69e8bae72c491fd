"""The Ray side of `--mode sync`: the hub in an actor, rank 0's client of it, and the function
each Ray Train worker runs. The logic lives in `sync.hub` and `sync.worker`, tested without Ray.

Ray Train (`TorchTrainer`) places the workers, sets up their torch.distributed process group
(gloo on CPUs, NCCL on GPUs) and, when a worker dies, restarts the whole group up to
--max-restarts times; each restarted worker asks the hub for the last checkpointed state.
"""

from __future__ import annotations

import os

import ray
import torch
import torch.distributed as dist

from distbelief.distributed.sync.hub import SyncHub
from distbelief.distributed.sync.worker import SyncWorker


@ray.remote(num_cpus=0)
class HubActor:
    """A `SyncHub` in its own process (on the driver's node)."""

    def __init__(self, state: dict | None = None):
        self.hub = SyncHub(state)

    def join(self, rank: int, pid: int) -> dict | None:
        return self.hub.join(rank, pid)

    def put(self, event: dict) -> None:
        self.hub.put(event)

    def take(self) -> list[dict]:
        return self.hub.take()

    def request_stop(self) -> None:
        self.hub.request_stop()

    def stop_requested(self) -> bool:
        return self.hub.stop_requested()

    def status(self) -> dict:
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


def train_loop(args: dict) -> None:
    """What each Ray Train worker runs: `args` holds the config, the hub's actor name, the
    data statistics and the CPU threads per worker."""
    from ray import train
    from ray.train.torch import get_device

    config = args["config"]
    torch.set_num_threads(args["threads"])
    context = train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    hub = ray.get_actor(args["hub"])
    state = ray.get(hub.join.remote(rank, os.getpid()))
    device = get_device()
    worker = SyncWorker(config, rank, world, device, args["stats"],
                        hub=HubClient(hub) if rank == 0 else None,
                        wrap=_ddp(device) if world > 1 else None,
                        control=dist.new_group(backend="gloo") if world > 1 else None)
    if state is not None:
        worker.load(state)
    worker.run()
    if rank == 0:
        worker.hub.flush()


def _ddp(device: torch.device):
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return wrap


def fit_workers(config, hub_name: str, stats: dict, shape, storage: str) -> None:
    """Run `train_loop` on config.cluster.replicas Ray Train workers of `shape`
    (`placement.ReplicaShape`) until they finish; Ray Train keeps its own files in `storage`.

    Raises:
        ray.train.TrainingFailedError: a worker failed more than --max-restarts times."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
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
    TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "hub": hub_name, "stats": stats,
                           "threads": shape.threads},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.cluster.replicas, use_gpu=gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage, name="sync", failure_config=FailureConfig(
            max_failures=config.cluster.max_restarts), **quiet)).fit()
