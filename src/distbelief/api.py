"""The Python API: your own model on your own data, in any mode.

    import distbelief
    summary = distbelief.fit(model, (x_train, y_train), test_data=(x_test, y_test),
                             mode="downpour", replicas=2, ps_shards=2, iterations=500,
                             batch_size=32, lr=0.05)

`fit` runs exactly what `distbelief train` runs (the same lifecycle, run directory, records,
checkpoints, resume and signal handling), with the model and data given as objects instead of
by name. Every `TrainConfig` field is a keyword (`distbelief train --help` lists them;
`lr`, `iterations` or `epochs`, `batch_size`, `replicas`, `ps_shards`, `n_fetch`, ...).
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import torch

from distbelief.data.tensors import TensorSplit, as_split
from distbelief.engine.checkpoint import load_checkpoint, load_model_state
from distbelief.engine.config import CUSTOM, TrainConfig
from distbelief.engine.user import UserParts
from distbelief.errors import CheckpointError, ConfigError, StorageError


def fit(model, train_data, *, test_data=None, mode: str = "single",
        run_dir: str | os.PathLike | None = None, resume: bool = False,
        address: str | None = None, progress: bool = False, **settings) -> dict:
    """Train `model` on `train_data` and return the run's summary (as summary.json holds it).

    Args:
        model: a `torch.nn.Module` (training starts from its weights, and it ends holding the
            trained ones) or a function of no arguments returning a fresh module (called after
            `torch.manual_seed(seed)`). Its output is N x classes scores (N x D values with
            `loss="mse"`).
        train_data, test_data: map-style `torch.utils.data.Dataset`s of (input, label) pairs,
            or (inputs, labels) pairs of tensors; labels are class indices (real targets of
            N or N x D values with `loss="mse"`). Without `test_data` the training data is
            evaluated (summary keys `train_error`, `train_loss`); with it, `test_loss` and for
            a classifier `test_error`, `test_accuracy`, `test_top5_error`.
        mode: "single", "downpour", "sandblaster" (a model without BatchNorm) or "sync"
            (synchronous data parallelism on Ray Train; `batch_size` per worker).
        run_dir: where the run's config, metrics and checkpoints go (None: nowhere).
        resume: continue the run in `run_dir` (same model and data).
        address: a Ray cluster to join (distributed modes); default a local Ray.
        progress: print progress lines to stderr.
        **settings: `TrainConfig` fields by their flat names.

    On Ray every process rebuilds the model from `model`, so it must be picklable there (a
    module or function defined in the calling script, or importable on every node), and the
    data travels with each replica.

    Raises:
        ConfigError: a bad model, data or setting (nothing is written).
        TrainingInterrupted: Ctrl-C or SIGTERM (checkpointed; `resume=True` continues).
    """
    config = make_config(model, train_data, test_data, mode=mode, **settings)
    if config.distributed or config.cluster.partitions > 1:  # the model travels to actors
        _ship_by_value(type(model) if isinstance(model, torch.nn.Module) else model)
    trainer = trainer_for(config, run_dir, resume=resume, progress=progress, address=address)
    summary = trainer.fit()
    if isinstance(model, torch.nn.Module):
        trained = trainer.trained_model().state_dict()
        model.load_state_dict({k: v.detach().to("cpu") for k, v in trained.items()})
    return summary


def make_config(model, train_data, test_data=None, *, mode: str = "single",
                **settings) -> TrainConfig:
    """The `TrainConfig` `fit` runs: `settings` applied, the model and data attached.

    Raises:
        ConfigError: see `fit`."""
    reserved = sorted({"model", "data", "user"} & settings.keys())
    if reserved:
        raise ConfigError(f"{', '.join(reserved)}: given by fit's arguments, not as settings")
    build = _factory(model)
    classify = settings.get("loss", "cross_entropy") == "cross_entropy"
    train = as_split(train_data, "train_data", classify)
    test = None if test_data is None else as_split(test_data, "test_data", classify)
    classes = _outputs(build, train, test)
    for name, split in (("train_data", train), ("test_data", test)):
        if split is not None:
            (_check_labels if classify else _check_targets)(name, split, classes)
    parts = UserParts(build=build, train=train, test=test, num_classes=classes)
    settings.setdefault("recipe", "python")
    return TrainConfig().replace(model=CUSTOM, data=CUSTOM, user=parts, mode=mode, **settings)


def trainer_for(config: TrainConfig, run_dir, *, resume: bool = False, progress: bool = False,
                address: str | None = None, dashboard: bool = False):
    """The trainer of `config`'s scheme (`Trainer`, `PipelineTrainer` for --partitions,
    `DownpourTrainer` (`LockstepTrainer` with --lockstep, `VirtualTrainer` with --virtual),
    `SandblasterTrainer`, `SyncTrainer`), ready to `fit()`. Nothing is written.

    Raises:
        ConfigError, DataError, CheckpointError: the run cannot start or continue."""
    if config.mode == "single" and config.cluster.partitions == 1:
        if address or dashboard:
            raise ConfigError("--address and --dashboard apply to --mode downpour, sandblaster "
                              "and sync, and to --partitions")
        from distbelief.engine import Trainer

        return Trainer(config, run_dir, resume=resume, progress=progress)
    if config.mode == "downpour" and config.downpour.lockstep:
        if address or dashboard:
            raise ConfigError("--lockstep runs every replica in this process: drop --address "
                              "and --dashboard")
        from distbelief.distributed.downpour.lockstep import LockstepTrainer

        return LockstepTrainer(config, run_dir, resume=resume, progress=progress)
    if config.mode == "downpour" and config.downpour.virtual:
        if address or dashboard:
            raise ConfigError("--virtual simulates the cluster in this process: drop --address "
                              "and --dashboard")
        from distbelief.distributed.downpour.virtual import VirtualTrainer

        return VirtualTrainer(config, run_dir, resume=resume, progress=progress)
    from distbelief.distributed import (DownpourTrainer, PipelineTrainer, SandblasterTrainer,
                                        SyncTrainer)

    kind = {"single": PipelineTrainer, "downpour": DownpourTrainer,
            "sandblaster": SandblasterTrainer, "sync": SyncTrainer}[config.mode]
    return kind(config, run_dir, resume=resume, progress=progress, address=address,
                dashboard=dashboard)


def _factory(model):
    if isinstance(model, torch.nn.Module):
        # Every process starts from a copy of this module's weights, kept on the CPU: that is
        # what travels to Ray's actors (placed on their own devices by the run).
        return functools.partial(copy.deepcopy, copy.deepcopy(model).cpu())
    if callable(model):
        return model
    raise ConfigError(f"model must be a torch.nn.Module or a function returning one, got "
                      f"{type(model).__name__}")


def _ship_by_value(obj) -> None:
    """Ray pickles a class or function by reference to its module, which every worker must
    then import; a user's own module (a file outside the installed packages, say models.py
    beside the script) is shipped by value instead, as the script itself (__main__) is."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    file = getattr(module, "__file__", None)
    if module is None or file is None or module.__name__.split(".")[0] in ("distbelief",
                                                                          "torch"):
        return
    installed = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    if not any(Path(file).resolve().is_relative_to(Path(p).resolve()) for p in installed if p):
        from distbelief.distributed.runtime.startup import pickle_by_value

        pickle_by_value(module)


def _outputs(build, train: TensorSplit, test: TensorSplit | None) -> int:
    """The model's number of outputs, from a forward pass on two inputs of each split (so that
    test inputs the model cannot take fail here, before anything is trained or written)."""
    model = UserParts(build, train, None, 0).model()
    model.eval()  # leaves BatchNorm statistics alone
    classes = _forward(model, train, "train_data")
    if test is not None:
        _forward(model, test, "test_data")
    return classes


def _forward(model, split: TensorSplit, name: str) -> int:
    try:
        with torch.no_grad():
            out = model(split.inputs[:2])
    except Exception as e:  # whatever the user's forward raises, said in one line
        raise ConfigError(f"the model cannot take {name}'s inputs of shape "
                          f"{tuple(split.inputs.shape[1:])} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"the model must return N x classes scores, got "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)}"
                          f" on {name}")
    return out.shape[1]


def _check_labels(name: str, split: TensorSplit, classes: int) -> None:
    lo, hi = int(split.labels.min()), int(split.labels.max())
    if lo < 0 or hi >= classes:
        raise ConfigError(f"{name} has labels {lo}..{hi} but the model has {classes} outputs "
                          f"(labels are class indices 0..{classes - 1})")


def _check_targets(name: str, split: TensorSplit, outputs: int) -> None:
    values = split.labels.view(len(split), -1).shape[1]
    if values != outputs:
        raise ConfigError(f"{name} has {values} target value(s) per example but the model has "
                          f"{outputs} outputs")


def evaluate(model, data, *, loss: str = "cross_entropy", batch_size: int = 500) -> dict:
    """Top-1 and top-5 error, mean cross-entropy loss and accuracy of `model` (a module, or a
    run directory or checkpoint as `load` takes) on `data` (as `fit` takes), on the device
    the model is on; with `loss="mse"` the mean squared error as "loss" (errors None, no
    accuracy). The module is left as it was (device, train or eval mode)."""
    from distbelief.engine.evaluate import evaluate as run_evaluation

    module = model if isinstance(model, torch.nn.Module) else load(model)
    split = as_split(data, "data", classes=loss == "cross_entropy")
    where = next(module.parameters(), torch.empty(0)).device
    batches = ((split.inputs[i:i + batch_size].to(where), split.labels[i:i + batch_size].to(where))
               for i in range(0, len(split), batch_size))
    result = run_evaluation(module, batches, loss=loss)
    return result if result["error"] is None else {**result, "accuracy": 1 - result["error"]}


def replay(run_dir: str | os.PathLike, until: int | None = None,
           out: str | os.PathLike | None = None) -> dict:
    """Re-execute a Downpour run recorded with --record-order (`record_order=True`) in this
    process, up to `until` minibatches per shard (None: all); `out` writes the replayed model
    as a checkpoint. A run that diverged replays from the histories it kept then, up to
    where its server stopped being finite. Returns the report of
    `downpour.replay.replay_run`: "minibatches", "pushes", "incarnations", "threads",
    "diverged_at", "source" ("checkpoint" or "diverged"), "recorded_minibatches" and,
    replayed whole from a checkpoint, "equal" (the shards end bit for bit as the run's
    checkpoint) and "max_abs_diff".

    Raises:
        ConfigError, CheckpointError, StorageError, ReplayError: one line each, nothing
            written."""
    from distbelief.distributed.downpour.replay import replay_run, write_model

    if until is not None and until < 1:
        raise ConfigError(f"until must be a positive number of minibatches, got {until}")
    if out is not None and os.path.exists(out):
        raise StorageError(f"{out} exists: replay never overwrites a file")
    replayed, report = replay_run(run_dir, until)
    if out is not None:
        write_model(replayed, out, report["minibatches"])
    return report


def load(path: str | os.PathLike, model=None) -> torch.nn.Module:
    """The trained model of a run directory (its checkpoints/last.pt) or of a checkpoint file,
    in eval mode (a named model on the CPU). A run trained through `fit` needs its `model` (a
    module or the factory) to load the weights into; a named model is rebuilt from the
    checkpoint.

    Raises:
        CheckpointError: no checkpoint there, or it does not fit the model."""
    path = Path(path)
    file = path / "checkpoints" / "last.pt" if path.is_dir() else path
    ckpt = load_checkpoint(file)
    try:
        saved = ckpt["config"]
        if saved.get("model") == CUSTOM:
            if model is None:
                raise CheckpointError(f"{file} holds a model given to distbelief.fit; pass it "
                                      f"as load(path, model=...)")
            module = UserParts(_factory(model), None, None, 0).model()
        else:
            from distbelief.engine.setup import build_model

            config = TrainConfig.from_dict(saved)
            shape = SimpleNamespace(num_classes=ckpt["num_classes"], in_chans=ckpt["in_chans"],
                                    stats=ckpt["data_stats"])
            module = build_model(config, shape)
    except KeyError as e:
        raise CheckpointError(f"{file} lacks {e}; not a training checkpoint") from None
    return load_model_state(module, ckpt, file, "the model").eval()
