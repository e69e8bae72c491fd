"""TensorBoard event files beside metrics.jsonl (`--tensorboard`), written through torch's
standard `SummaryWriter` into RUN_DIR/tensorboard; `tensorboard --logdir runs` shows them.

Tags, at the record's iteration:
    train/loss, train/error, train/lr, train/images_per_s, train/staleness_mean, ... every
        number of a training record (train/replica_images_per_s/R for lists);
    shard/K/updates_per_s, shard/K/bytes_per_s, shard/K/version: Downpour's shards;
    partition/bubble, partition/P/compute_s, partition/P/bytes_per_step, ...: --partitions;
    test/loss, test/error, test/top5_error (val/..., train/... for the other splits
        evaluated; their names differ from the running training averages': eval_loss, ...).

A resumed run purges the events after its checkpoint's iteration, as metrics.jsonl drops its
records there, so that no step is shown twice.
"""

from __future__ import annotations

import numbers
from pathlib import Path

from distbelief.errors import ConfigError

POSITION = {"kind", "iteration", "epoch", "examples", "wall_s"}  # axes, not scalars


def scalars(record: dict) -> list[tuple[str, float]]:
    """The (tag, value) pairs of a metrics record; none for records that are not measurements
    over time (cluster, failure, resume)."""
    kind = record.get("kind")
    if kind == "eval":
        split = record["split"]
        return [(f"{split}/eval_{k}" if split == "train" else f"{split}/{k}", float(record[k]))
                for k in ("loss", "error", "top5_error") if _number(record.get(k))]
    if kind != "train":
        return []
    out = []
    for key, value in record.items():
        if key in POSITION:
            continue
        if _number(value):
            out.append((f"train/{key}", float(value)))
        elif key == "shards" and isinstance(value, list):
            out += [(f"shard/{row['shard']}/{k}", float(v)) for row in value
                    for k, v in row.items() if k != "shard" and _number(v)]
        elif key in ("pipeline", "partitions") and isinstance(value, dict):
            out += _partition_scalars(value)
        elif isinstance(value, list) and all(_number(v) for v in value):
            out += [(f"train/{key}/{i}", float(v)) for i, v in enumerate(value)]
    return out


def _partition_scalars(value: dict) -> list[tuple[str, float]]:
    """partition/bubble, and partition/P/compute_s ... for each partition P."""
    out = []
    for k, v in value.items():
        if _number(v):
            out.append((f"partition/{k}", float(v)))
        elif isinstance(v, list):
            out += [(f"partition/{i}/{k}", float(x)) for i, x in enumerate(v) if _number(x)]
    return out


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_available() -> None:
    """Raises ConfigError when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install "
                          "tensorboard (or the project's [tensorboard] extra)") from None


class EventWriter:
    """Writes the scalars of each record to `folder`; `purge_step` hides the events of a
    previous attempt from that step on (a resumed run)."""

    def __init__(self, folder: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def write(self, record: dict) -> None:
        step = record.get("iteration")
        if step is None:
            return
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()
