"""What the Downpour driver records: what the replicas have done (`ReplicaProgress`), their chunk
metrics since the last record (`ChunkWindow`), what it reads from the shards' statuses
(`ShardMonitor`: restarts and the updates they lost, per-shard rates, staleness) and the
summary's Downpour entries. No Ray here."""

from __future__ import annotations

import time
from collections import Counter

from distbelief.engine.lifecycle import Diverged

# Where a replica's time goes: computing, waiting for a fetch, for the in-flight push bound,
# and for the slowest replica (--ssp-bound).
TIME_PARTS = ("compute_s", "fetch_wait_s", "push_wait_s", "bound_wait_s")
FAILURE_COUNTS = ("replica_failures", "replica_restarts", "replica_steps_lost",
                  "shard_failures", "shard_updates_lost")


class ReplicaProgress:
    """The replicas' completed work, which the driver checkpoints: each one's completed steps
    (`positions`), all of them (`steps`), images and seconds per replica, and where their time
    went (`time_split`, TIME_PARTS summed). `saved`: the driver state of a resumed run."""

    def __init__(self, replicas: int, saved: dict | None = None):
        self.positions, self.steps = [0] * replicas, 0
        self.replica_images, self.replica_seconds = [0] * replicas, [0.0] * replicas
        self.time_split = Counter()
        if saved:
            self.positions, self.steps = list(saved["positions"]), saved["steps"]
            self.replica_images = list(saved["replica_images"])
            self.replica_seconds = list(saved["replica_seconds"])
            self.time_split.update(saved["time_split"])

    def finished(self, work, chunk: tuple, m: dict) -> None:
        """Replica chunk[0] finished `chunk` with metrics `m`: `work` (a `WorkQueue`) says
        where every replica stands now. Raises `Diverged` if its loss became NaN or Inf."""
        r = chunk[0]
        if m.get("diverged"):
            raise Diverged(f"training diverged (loss {m['loss_sum']}) on replica {r} after "
                           f"{self.steps} steps; lower --lr (the last checkpoint is kept)")
        work.finished(chunk)
        self.positions, self.steps = list(work.positions), work.completed
        self.replica_images[r] += m["images"]
        self.replica_seconds[r] += m["seconds"]
        self.time_split.update({k: m[k] for k in TIME_PARTS})

    def state(self) -> dict:
        """What `ReplicaProgress(replicas, saved=...)` restores."""
        return {"positions": self.positions, "steps": self.steps,
                "replica_images": self.replica_images, "replica_seconds": self.replica_seconds,
                "time_split": dict(self.time_split)}


class ChunkWindow:
    """The replicas' chunk metrics since the last training record."""

    def __init__(self, replicas: int, classifies: bool = True):
        self.sums, self.per_replica = Counter(), [(0, 0.0)] * replicas
        self.classifies = classifies  # else (--loss mse) there is no error rate
        self.start = time.perf_counter()
        self.partitions: list[Counter] = []  # partitioned replicas: sums per partition

    def add(self, r: int, m: dict) -> None:
        images, seconds = self.per_replica[r]
        self.per_replica[r] = (images + m["images"], seconds + m["seconds"])
        self.sums.update({k: v for k, v in m.items()
                          if k not in ("replica", "start", "diverged", "partitions")})
        for p, stage in enumerate(m.get("partitions", [])):
            if p == len(self.partitions):
                self.partitions.append(Counter())
            peak = stage.get("peak_activation_bytes", 0)  # a peak: the largest, not a sum
            self.partitions[p].update({k: v for k, v in stage.items()
                                       if k != "peak_activation_bytes"})
            self.partitions[p]["peak_activation_bytes"] = max(
                self.partitions[p]["peak_activation_bytes"], peak)

    def partition_record(self) -> dict:
        """Per partition over the window (all replicas together): compute, fetch and push
        waits, bytes handed on per step, peak activation bytes held; and the bubble, the
        share of the partitions' time (replica seconds x partitions) not spent computing."""
        steps = max(self.sums["steps"], 1)
        compute = [c["compute_s"] for c in self.partitions]
        busy = sum(s for _, s in self.per_replica) * len(compute)
        return {"compute_s": [round(c, 3) for c in compute],
                "fetch_wait_s": [round(c["fetch_wait_s"], 3) for c in self.partitions],
                "push_wait_s": [round(c["push_wait_s"], 3) for c in self.partitions],
                "bytes_per_step": [c["bytes_out"] // steps for c in self.partitions],
                "peak_activation_bytes": [c["peak_activation_bytes"] for c in self.partitions],
                "bubble": round(1 - sum(compute) / max(busy, 1e-9), 4)}

    def record(self, statuses: list[dict], shards: list[dict]) -> dict:
        """The training record's window entries: mean loss and error, images/s, the replicas'
        time split and throughput, the shards' rows and mean staleness."""
        sums, images = self.sums, max(self.sums["images"], 1)
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {"loss": sums["loss_sum"] / images,
                "error": sums["wrong"] / images if self.classifies else None,
                "lr": statuses[0]["lr"], "momentum": statuses[0]["momentum"],
                "images_per_s": round(sums["images"] / seconds, 1),
                **{k: round(sums[k], 3) for k in TIME_PARTS}, "rejected": sums["rejected"],
                "shards": shards,
                "replica_images_per_s": [round(i / s, 1) if s else 0.0
                                         for i, s in self.per_replica],
                "staleness_mean": mean_staleness(staleness(statuses)),
                **({"partitions": self.partition_record()} if self.partitions else {})}


class ShardMonitor:
    """Follows the shards' statuses (`ParameterShard.stats` plus the actor's incarnation and
    restored version) from poll to poll. A shard whose incarnation changed was restarted by Ray
    from its snapshot: `book.shard_restarted` records it with the updates lost (the versions
    seen at the last poll beyond the restored one: a lower bound, as updates after the last
    poll are unseen)."""

    def __init__(self, book):
        self.book = book
        self.seen: dict[int, tuple[str, int]] = {}  # shard -> (incarnation, version)
        self.previous: tuple[float, dict] | None = None  # the last `rates` poll

    def observe(self, statuses: list[dict], position: int) -> list[dict]:
        for st in statuses:
            k = st["shard"]
            seen = self.seen.get(k)
            if seen is not None and seen[0] != st["incarnation"]:
                lost = max(0, seen[1] - (st["restored_version"] or 0))
                self.book.shard_restarted(k, position, st["restored_version"], lost)
            self.seen[k] = (st["incarnation"], st["version"])
        return statuses

    def rates(self, statuses: list[dict], now: float) -> list[dict]:
        """Per shard: version, rejected pushes, and since the last call (same incarnation)
        updates/s and bytes/s."""
        rows = []
        before = self.previous[1] if self.previous else {}
        for st in statuses:
            row = {"shard": st["shard"], "version": st["version"], "rejected": st["rejected"]}
            old = before.get(st["shard"])
            if old is not None and old["incarnation"] == st["incarnation"]:
                dt = max(now - self.previous[0], 1e-9)
                row["updates_per_s"] = round((st["version"] - old["version"]) / dt, 2)
                row["bytes_per_s"] = round((st["bytes_in"] + st["bytes_out"]
                                            - old["bytes_in"] - old["bytes_out"]) / dt, 1)
            rows.append(row)
        self.previous = (now, {st["shard"]: st for st in statuses})
        return rows


def staleness(statuses: list[dict]) -> Counter:
    """All shards' staleness histograms added up: versions behind -> pushes."""
    total = Counter()
    for st in statuses:
        total.update({int(k): v for k, v in st["staleness"].items()})
    return total


def mean_staleness(histogram: Counter) -> float:
    count = sum(histogram.values())
    return round(sum(k * v for k, v in histogram.items()) / count, 3) if count else 0.0


def summary_entries(statuses: list[dict], counters: Counter, replica_images: list[int],
                    replica_seconds: list[float], time_split: Counter, wall_s: float) -> dict:
    """The summary's Downpour entries: per-replica throughput, failures, the shards' updates,
    rates and staleness, and where the replicas' time went."""
    wall_s = max(wall_s, 1e-9)
    histogram = staleness(statuses)
    waits = sum(time_split[k] for k in TIME_PARTS)
    return {
        "replica_images_per_s": [round(i / max(s, 1e-9), 1)
                                 for i, s in zip(replica_images, replica_seconds)],
        **{k: counters[k] for k in FAILURE_COUNTS},
        "rejected_pushes": sum(st["rejected"] for st in statuses),
        "shard_updates": [st["version"] for st in statuses],
        "momentum_in_force": [st["momentum"] for st in statuses],
        "shard_updates_per_s": [round(st["version"] / wall_s, 2) for st in statuses],
        "shard_bytes_per_s": [round((st["bytes_in"] + st["bytes_out"]) / wall_s, 1)
                              for st in statuses],
        "staleness": dict(sorted(histogram.items())),
        "staleness_mean": mean_staleness(histogram),
        # dana: the replicas whose momentum the look-ahead holds (a retired one is gone).
        "lookahead_sources": sorted({r for st in statuses for r in st["lookahead_sources"]}),
        # TIME_PARTS, and the rest (sending, installing parameters, flattening gradients).
        "replica_time_s": {**{k: round(time_split[k], 3) for k in TIME_PARTS},
                           "other_s": round(sum(replica_seconds) - waits, 3)}}


def partition_summary(statuses: list[dict], slots: list, parts: int) -> dict:
    """The summary's model-parallel entries: which partition each shard serves, and the mean
    staleness of each partition's pushes (measured by its shards)."""
    return {"partitions": parts, "shard_partitions": [s.part for s in slots],
            "partition_staleness_mean": [
                mean_staleness(staleness([st for st in statuses
                                          if slots[st["shard"]].part == p]))
                for p in range(parts)]}
