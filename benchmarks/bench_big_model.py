"""A model no process holds whole: a deep MLP of --hidden 15810 (1.0 billion parameters, 4.0 GB
in float32) trained under Downpour with the replica cut into P partitions and the server into K
shards aligned to them, the way a user trains it: momentum 0.9, weight decay, shard snapshots on
(written to disk by each shard, --snapshot-store disk; the shards apply momentum SGD, whose
one momentum vector is half the server's state: the staleness rules that keep one per replica
would not fit), evaluated through the partitions,
checkpointed piece by piece by the shards, then resumed from those pieces and trained on.

Reported per process (the driver, each shard, each partition, the replica's head) and per phase
(start, training, evaluation, checkpoint, resume, training after the resume): the peak private
memory, sampled every 0.2 s as the process's anonymous resident pages (RssAnon: its own tensors
and arrays; the pages of Ray's shared-memory object store a process maps are RssShmem, reported
apart as their peak over all processes), against the bound 1/P of the model's training state
(values and momentum in float32) + 1.5 GB. And the training loss, first and last records.

    python benchmarks/bench_big_model.py [--hidden 15810] [--partitions 4] [--shards 4]
        [--steps 200] [--resume-steps 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from distbelief.distributed import DownpourTrainer
from distbelief.distributed.runtime.startup import start_ray
from distbelief.engine.config import TrainConfig
from distbelief.engine.rundir import read_jsonl

GB = 1e9


class Sampler:
    """Every 0.2 s, each process's RssAnon and RssShmem (from /proc), kept as the peak per
    (phase, process). Processes: this one and Ray's workers (named by their pid once known)."""

    def __init__(self):
        self.phase, self.names = "start", {os.getpid(): "driver"}
        self.peaks: dict[str, dict[str, float]] = {}
        self.shm: dict[str, float] = {}
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid, title in [(os.getpid(), "driver"), *_ray_workers()]:
                anon, shm = _rss(pid)
                key = self.names.setdefault(pid, f"other Ray worker ({title})")
                row = self.peaks.setdefault(self.phase, {})
                row[key] = max(row.get(key, 0.0), anon)
                self.shm[self.phase] = max(self.shm.get(self.phase, 0.0), shm)
            time.sleep(0.2)

    def name(self, pid: int, name: str) -> None:
        """Name `pid`; what was sampled under its first name moves to this one."""
        before, self.names[pid] = self.names.get(pid), name
        for row in self.peaks.values():
            if before in row and before != name:
                row[name] = max(row.pop(before), row.get(name, 0.0))


def _ray_workers() -> list[tuple[int, str]]:
    """(pid, process title) of Ray's worker processes ("ray::Class.method")."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read(80).split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::"):
                out.append((int(entry), title.split(".")[0]))
    return out


def _rss(pid: int) -> tuple[float, float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return (int(fields["RssAnon"].split()[0]) * 1024 / GB,
                int(fields["RssShmem"].split()[0]) * 1024 / GB)
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


def phased(trainer, sampler: Sampler, start_phase: str, train_phase: str) -> None:
    """Switch the sampler's phase around the trainer's start, train, save and evaluation."""
    def wrap(obj, method: str, phase: str, after=None):
        original = getattr(obj, method)

        def call(*args, **kwargs):
            before, sampler.phase = sampler.phase, phase
            try:
                return original(*args, **kwargs)
            finally:
                if after is not None:
                    after()
                sampler.phase = before
        setattr(obj, method, call)

    wrap(trainer, "start", start_phase, lambda: name_actors(trainer, sampler))
    wrap(trainer, "train", train_phase)
    wrap(trainer, "save", "checkpoint")
    wrap(trainer.life, "evaluate", "evaluation")


def name_actors(trainer, sampler: Sampler) -> None:
    for st in ray.get([s.status.remote() for s in trainer.session.shards]):
        sampler.name(st["pid"], f"shard {st['shard']}")
    for info in ray.get([r.info.remote() for r in trainer.session.replicas]):
        sampler.name(info["pid"], f"head {info['replica']}")
        for part in info["partitions"]:
            sampler.name(part["pid"], f"partition {part['partition']}")


def report(sampler: Sampler, bound_gb: float, phases: list[str]) -> None:
    names = sorted({k for row in sampler.peaks.values() for k in row},
                   key=lambda n: (n != "driver", n))
    print(f"| process | {' | '.join(phases)} |")
    print(f"|---|{'---|' * len(phases)}")
    for name in names:
        cells = [sampler.peaks.get(p, {}).get(name) for p in phases]
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    print("| object store pages (max over processes) | "
          + " | ".join(f"{sampler.shm.get(p, 0.0):.2f}" for p in phases) + " |")
    worst = max(v for row in sampler.peaks.values() for v in row.values())
    print(f"largest private peak {worst:.2f} GB; bound {bound_gb:.2f} GB: "
          f"{'within' if worst <= bound_gb else 'EXCEEDED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=15810)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--resume-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    config = TrainConfig().replace(
        recipe="bench", model="deep_mlp", hidden=args.hidden, data="digits", mode="downpour",
        replicas=1, partitions=args.partitions, ps_shards=args.shards, iterations=args.steps,
        batch_size=32, lr=args.lr, momentum=0.9, weight_decay=1e-4, milestones=(10**9,),
        eval_every=0, checkpoint_every=0, log_every=10, device="cpu", snapshot_every_s=120.0,
        snapshot_store="disk", partition_dtype="bfloat16", ps_transfer_dtype="bfloat16",
        staleness_rule="momentum", max_in_flight=1)
    print(f"# {platform.node()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB RAM, "
          f"torch {torch.__version__}, ray {ray.__version__}; {time.strftime('%Y-%m-%d')}")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-big-")) / "run"
    start_ray()
    sampler = Sampler()
    first = DownpourTrainer(config, out)
    n_params = sum(p.params for p in first.plan.parts)
    bound = n_params * 8 / args.partitions / GB + 1.5
    print(f"deep_mlp --hidden {args.hidden}: {n_params:,} parameters ({n_params * 4 / GB:.2f} GB "
          f"float32; values and momentum {n_params * 8 / GB:.2f} GB), {args.partitions} "
          f"partitions, {args.shards} shards; run directory {out}")
    phased(first, sampler, "start", "training")
    begin = time.perf_counter()
    summary = first.fit()
    print(f"trained {args.steps} steps in {time.perf_counter() - begin:.0f} s (start, training, "
          f"checkpoint, evaluation); test accuracy {summary.get('test_accuracy')}")
    resumed = DownpourTrainer(config.replace(iterations=args.steps + args.resume_steps), out,
                              resume=True)
    phased(resumed, sampler, "resume", "training after resume")
    resumed.fit()
    sampler.stop.set()
    losses = [(r["iteration"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl")
              if r["kind"] == "train"]
    print(f"training loss by iteration: {losses}")
    report(sampler, bound, ["start", "training", "checkpoint", "evaluation", "resume",
                            "training after resume"])


if __name__ == "__main__":
    main()
