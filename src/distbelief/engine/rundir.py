"""The run directory: config.yaml, metrics.jsonl, checkpoints/, summary.json.

    RUN_DIR/config.yaml          resolved config, git revision, versions, device
    RUN_DIR/metrics.jsonl        one JSON object per logged step ("train") and evaluation ("eval")
    RUN_DIR/checkpoints/last.pt  the latest checkpoint (atomically replaced)
    RUN_DIR/checkpoints/gen-N/   a distributed run's latest consistent checkpoint: the
                                 driver's state, every shard's snapshot, the model
    RUN_DIR/checkpoints/manifest.json   names gen-N; written last, so it only names whole ones
    RUN_DIR/summary.json         written once training ends
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from distbelief import __version__
from distbelief.engine.checkpoint import atomic_write_text, save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.errors import ConfigError


def git_revision() -> str | None:
    """The commit of the distbelief source tree that is running, with '-dirty' if it has
    uncommitted changes; None when it is not a git checkout (an installed wheel)."""
    src = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10)
        if top.returncode or not (Path(top.stdout.strip()) / "src" / "distbelief").is_dir():
            return None
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}-dirty" if dirty else rev or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunDir:
    """The files of one run directory (module doc); nothing is written until `create`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_file = self.path / "config.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.summary_file = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"
        self.checkpoint = self.checkpoints / "last.pt"
        self.manifest = self.checkpoints / "manifest.json"

    def state_file(self, name: str) -> Path:
        """NAME.pt of the newest published checkpoint generation (`write_generation`), or
        checkpoints/NAME.pt where there is none (the single-process checkpoint, and runs
        written before generations)."""
        folder = self.generation()
        return (folder or self.checkpoints) / f"{name}.pt"

    def generation(self) -> Path | None:
        """The folder of the newest complete checkpoint generation: the one manifest.json
        names. None before the first one."""
        try:
            manifest = json.loads(self.manifest.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        folder = self.checkpoints / manifest.get("folder", "")
        return folder if manifest.get("folder") and folder.is_dir() else None

    def write_generation(self, files: dict[str, dict], iteration: int) -> Path:
        """One consistent checkpoint of several files (a distributed run's driver state, its
        shards' snapshots, its model): each is written atomically into a new folder
        checkpoints/gen-N/, then manifest.json, written last and atomically, publishes it, and
        older generations are removed. A crash at any moment leaves the previous generation
        published and whole; files of two generations are never mixed."""
        number = int(self._manifest().get("generation", 0)) + 1
        folder = self.checkpoints / f"gen-{number:06d}"
        shutil.rmtree(folder, ignore_errors=True)  # a torn attempt of a crashed run
        folder.mkdir(parents=True)
        for name, state in files.items():
            save_checkpoint(folder / f"{name}.pt", state)
        _fsync_directory(folder)
        atomic_write_text(self.manifest, json.dumps(
            {"generation": number, "folder": folder.name, "iteration": iteration,
             "files": sorted(f"{name}.pt" for name in files)}, indent=2) + "\n")
        for old in self.checkpoints.glob("gen-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def _manifest(self) -> dict:
        try:
            return json.loads(self.manifest.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def holds_run(self) -> bool:
        return self.config_file.exists() or self.checkpoint.exists()

    def refuse_if_occupied(self) -> None:
        """Raise `ConfigError` if the folder already holds a run: runs are never overwritten."""
        if self.holds_run():
            raise ConfigError(f"{self.path} already holds a run; pass --resume to continue it "
                              f"or choose another --out")

    def create(self, config: TrainConfig, device: str) -> None:
        """Start a new run; refuses a folder that already holds one (never overwrites)."""
        self.refuse_if_occupied()
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"distbelief_version": __version__, "git_revision": git_revision(),
                  "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "device": device, "config": config.to_dict()}
        atomic_write_text(self.config_file, yaml.safe_dump(record, sort_keys=False))
        self.metrics_file.touch()

    def update_config(self, config: TrainConfig) -> None:
        """Record the config a resumed run continues with (e.g. more iterations)."""
        record = yaml.safe_load(self.config_file.read_text())
        if record.get("config") != config.to_dict():
            record["config"] = config.to_dict()
            record["resumed"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            record["git_revision"] = git_revision()
            atomic_write_text(self.config_file, yaml.safe_dump(record, sort_keys=False))

    def read_config(self) -> TrainConfig:
        if not self.config_file.is_file():
            raise ConfigError(f"{self.path} holds no run to resume (no config.yaml)")
        try:
            record = yaml.safe_load(self.config_file.read_text())
            return TrainConfig.from_dict(record["config"])
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.config_file} is malformed ({type(e).__name__})") from None

    def log(self, record: dict) -> None:
        """Append one JSON line and flush it: a crash loses at most the line being written."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, iteration: int) -> None:
        """Drop records after `iteration` (their steps will be redone by a resumed run)."""
        kept = [line for line in read_jsonl(self.metrics_file)
                if line.get("iteration", 0) <= iteration]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    def read_summary(self) -> dict:
        return json.loads(self.summary_file.read_text())

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_file, json.dumps(summary, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics file; a torn last line (a crash mid-write) is skipped."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _fsync_directory(folder: Path) -> None:
    """Make the directory entries of `folder` durable before the manifest names it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
