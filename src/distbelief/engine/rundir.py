"""The run directory: config.yaml, metrics.jsonl, checkpoints/, summary.json.

    RUN_DIR/config.yaml          resolved config, git revision, versions, device
    RUN_DIR/metrics.jsonl        one JSON object per logged step ("train") and evaluation ("eval")
    RUN_DIR/checkpoints/last.pt  the latest checkpoint (atomically replaced)
    RUN_DIR/checkpoints/gen-N/   a distributed run's latest consistent checkpoint: the
                                 driver's state, every shard's snapshot, the model
    RUN_DIR/checkpoints/manifest.json   names gen-N; written last, so it only names whole ones
    RUN_DIR/summary.json         written once training ends
    RUN_DIR/.lock                held (flock) by the one process writing the run: its pid, host

Every reader here is defensive: a file that is not what this module writes is one
`ConfigError` or `CheckpointError` naming it, never a traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import yaml

from distbelief import __version__
from distbelief.engine.checkpoint import TMP_SUFFIX, atomic_write_text, save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.errors import CheckpointError, ConfigError, StorageError, storage_error


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
        names. None before the first one.

        Raises:
            CheckpointError: manifest.json exists but is not what `write_generation` writes."""
        manifest = self._manifest()
        if manifest is None:
            return None
        folder = self.checkpoints / str(manifest.get("folder", ""))
        if not (isinstance(manifest.get("folder"), str) and folder.is_dir()):
            raise CheckpointError(f"{self.manifest} names no checkpoint folder here "
                                  f"({manifest.get('folder')!r})")
        return folder

    def write_generation(self, files: dict[str, dict], iteration: int) -> Path:
        """One consistent checkpoint of several files (a distributed run's driver state, its
        shards' snapshots, its model): each is written atomically into a new folder
        checkpoints/gen-N/, then manifest.json, written last and atomically, publishes it, and
        older generations are removed. A crash at any moment leaves the previous generation
        published and whole; files of two generations are never mixed.

        Raises:
            StorageError: a file cannot be written; the previous generation stays published."""
        return self.publish_generation(self.new_generation(), files, iteration)

    def new_generation(self) -> Path:
        """A new, empty, unpublished generation folder, checkpoints/gen-N/, for the processes
        that hold a run's pieces to write them into (`publish_generation` then publishes it,
        `discard` drops it).

        Raises:
            StorageError: it cannot be made."""
        number = 1 + max([_generation_number(f.name) for f in self.checkpoints.glob("gen-*")]
                         + [0], default=0)
        folder = self.checkpoints / f"gen-{number:06d}"
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            raise storage_error("write", folder, e) from None
        return folder

    def publish_generation(self, folder: Path, files: dict[str, dict], iteration: int,
                           pieces: tuple[str, ...] = ()) -> Path:
        """Write `files` into `folder` (from `new_generation`), where the files `pieces` were
        already written by others, then publish it (`write_generation`)."""
        missing = [name for name in pieces if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder} lacks {', '.join(missing)}: not published")
        for name, state in files.items():
            save_checkpoint(folder / f"{name}.pt", state)
        _fsync_directory(folder)
        atomic_write_text(self.manifest, json.dumps(
            {"generation": _generation_number(folder.name), "folder": folder.name,
             "iteration": iteration,
             "files": sorted([f"{name}.pt" for name in files] + list(pieces))}, indent=2) + "\n")
        for old in self.checkpoints.glob("gen-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def drop_generations(self) -> None:
        """Unpublish and remove every generation: checkpoints/STATE.pt, written after them,
        is newer (manifest.json goes first, so a crash on the way leaves no stale generation
        published)."""
        if self.manifest.exists():
            self.manifest.unlink()
            _fsync_directory(self.checkpoints)
        for old in self.checkpoints.glob("gen-*"):
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def discard(folder: Path) -> None:
        """Drop an unpublished generation folder (the published one stays)."""
        shutil.rmtree(folder, ignore_errors=True)

    def _manifest(self) -> dict | None:
        """manifest.json's contents; None when there is none.

        Raises:
            CheckpointError: it cannot be read or is not a JSON object."""
        try:
            data = self.manifest.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CheckpointError(f"cannot read {self.manifest}: {e.strerror}") from None
        try:
            manifest = json.loads(data)
        except ValueError:  # JSON errors and undecodable bytes
            manifest = None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{self.manifest} is not a checkpoint manifest (it is "
                                  f"damaged; the generations under {self.checkpoints} are "
                                  f"kept)")
        return manifest

    def holds_run(self) -> bool:
        return self.config_file.exists() or self.checkpoint.exists()

    def refuse_if_occupied(self) -> None:
        """Raise `ConfigError` if the folder already holds a run: runs are never overwritten."""
        if self.holds_run():
            raise ConfigError(f"{self.path} already holds a run; pass --resume to continue it "
                              f"or choose another --out")

    def check_writable(self) -> None:
        """Raise `StorageError` unless the run folder can be created (or, if it exists, written
        in): checked before a run starts, so that a path below a regular file, a read-only
        disk or a folder without permission fails at once. Writes nothing."""
        target = self.path.absolute()
        existing = next((p for p in (target, *target.parents) if p.exists()), None)
        if existing is None:
            return
        if not existing.is_dir():
            raise StorageError(f"cannot create {self.path}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            reason = "read-only file system" if _read_only(existing) else "permission denied"
            raise StorageError(f"cannot write in {existing}: {reason}")

    def create(self, config: TrainConfig, device: str) -> None:
        """Start a new run; refuses a folder that already holds one (never overwrites)."""
        self.refuse_if_occupied()
        record = {"distbelief_version": __version__, "git_revision": git_revision(),
                  "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "device": device, "config": config.to_dict()}
        atomic_write_text(self.config_file, yaml.safe_dump(record, sort_keys=False))
        self._append(self.metrics_file, "")

    def update_config(self, config: TrainConfig) -> None:
        """Record the config a resumed run continues with (e.g. more iterations)."""
        record = self._config_record()
        if record.get("config") != config.to_dict():
            record["config"] = config.to_dict()
            record["resumed"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            record["git_revision"] = git_revision()
            atomic_write_text(self.config_file, yaml.safe_dump(record, sort_keys=False))

    def read_config(self) -> TrainConfig:
        """The config the run was written with.

        Raises:
            ConfigError: no config.yaml, or one that is not what `create` writes."""
        self.require_run()
        config = self._config_record().get("config")
        if not isinstance(config, dict):
            raise ConfigError(f"{self.config_file} is malformed (no config mapping)")
        try:
            return TrainConfig.from_dict(config)
        except ConfigError as e:
            raise ConfigError(f"{self.config_file} is malformed: {e}") from None

    def require_run(self) -> None:
        """Raise `ConfigError` unless the folder holds a run (its config.yaml)."""
        if not self.config_file.is_file():
            raise ConfigError(f"{self.path} holds no run to resume (no config.yaml)")

    def _config_record(self) -> dict:
        try:
            record = yaml.safe_load(self.config_file.read_bytes().decode())
        except OSError as e:
            raise storage_error("read", self.config_file, e) from None
        except (yaml.YAMLError, ValueError) as e:  # ValueError: bytes that are not UTF-8
            raise ConfigError(f"{self.config_file} is malformed ({type(e).__name__})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{self.config_file} is malformed (not a mapping)")
        return record

    def log(self, record: dict) -> None:
        """Append one JSON line and flush it: a crash loses at most the line being written."""
        self._append(self.metrics_file, json.dumps(record) + "\n")

    @staticmethod
    def _append(path: Path, text: str) -> None:
        try:
            with open(path, "a") as f:
                f.write(text)
        except OSError as e:
            raise storage_error("write", path, e) from None

    def truncate_metrics(self, iteration: int) -> None:
        """Drop records after `iteration` (their steps will be redone by a resumed run)."""
        kept = [line for line in read_jsonl(self.metrics_file)
                if (record_number(line.get("iteration")) or 0) <= iteration]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    def read_summary(self) -> dict:
        """summary.json's contents.

        Raises:
            ConfigError: it is missing (the run has not ended) or damaged."""
        try:
            summary = json.loads(self.summary_file.read_bytes())
        except (OSError, ValueError):
            summary = None
        if not isinstance(summary, dict):
            raise ConfigError(f"{self.summary_file} is missing or damaged; --resume the run "
                              f"to write it again")
        return summary

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_file, json.dumps(summary, indent=2) + "\n")

    # --- one writer -----------------------------------------------------------------------

    def lock(self) -> "RunLock":
        """Hold the run folder (`RunLock`) and remove the temporary files a killed writer left.

        Raises:
            StorageError: another process holds it, or the folder cannot be written."""
        held = RunLock(self.path / ".lock")
        for folder in (self.path, self.checkpoints, *self.checkpoints.glob("gen-*")):
            for tmp in folder.glob(f".*{TMP_SUFFIX}"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return held


class RunLock:
    """An advisory lock (`flock`) on a run folder's lock file, held from construction until
    `release` or the process's end (the kernel drops it when the process dies, so a killed
    run never leaves it held). The file names the holder, "PID on HOST".

    Raises:
        StorageError: another process holds it (naming the holder), or it cannot be created."""

    def __init__(self, path: Path):
        try:
            self.file = open(path, "a+")
        except OSError as e:
            raise storage_error("write", path, e) from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise StorageError(f"{path.parent} is in use by another distbelief run "
                               f"({holder}); wait for it to end or choose another "
                               f"--out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics file. Lines that are not JSON objects (a torn last line from a
    crash mid-write, damaged bytes) are skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise storage_error("read", path, e) from None
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def record_number(value) -> float | None:
    """A record's field as a finite number; None for anything else (a damaged record)."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value if real and math.isfinite(value) else None


def _generation_number(name: str) -> int:
    digits = name.removeprefix("gen-")
    return int(digits) if digits.isdigit() else 0


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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
