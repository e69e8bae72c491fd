"""The training configuration: one frozen dataclass that validates itself.

A recipe (`distbelief.recipes`) returns a `TrainConfig`; the CLI overrides fields by name;
`to_dict` / `from_dict` carry it through `config.yaml` and checkpoints. Every field's help text
is its CLI help, units included.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from distbelief.errors import ConfigError, check_choice

DATASETS = ("digits", "cifar10", "imagenet", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
WARMUP_MODES = ("constant", "linear")
OPTIMIZERS = ("sgd", "adagrad")
MODES = ("single", "downpour", "sandblaster")
LINE_SEARCHES = ("strong_wolfe", "none")


def _opt(help: str, **kwargs):
    return field(metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a single-process training run.

    Iteration counts are optimizer steps (one batch each). Learning-rate milestones are
    iterations, as in the paper ("divided by 10 at 32k and 48k iterations").
    """

    recipe: str = _opt("recipe this config came from", default="custom")
    # Model
    model: str = _opt("registered model name (see 'distbelief models')", default="resnet20")
    shortcut: str | None = _opt("shortcut option A, B or C (default: the family's)", default=None)
    hidden: int | None = _opt("mlp: hidden units (default 256)", default=None)
    # Data
    data: str = _opt("dataset: digits, cifar10, imagenet or synthetic", default="digits")
    data_dir: str | None = _opt("dataset folder (cifar10: cifar-10-batches-py, imagenet: the "
                                "folder holding train/ and val/)", default=None)
    download: bool = _opt("cifar10: download and verify the official archive into --data-dir",
                          default=False)
    val_split: int = _opt("training images held out as a validation split (0: none)", default=0)
    augment: bool = _opt("training augmentation on or off", default=True)
    pad: int = _opt("array data: zero padding in px before the random crop", default=4)
    flip: bool = _opt("random horizontal flips", default=True)
    crop_size: int = _opt("imagenet: training and test crop side in px", default=224)
    scale_min: int = _opt("imagenet: smallest random shorter side in px", default=256)
    scale_max: int = _opt("imagenet: largest random shorter side in px", default=480)
    test_size: int = _opt("imagenet: shorter side in px before the test crops", default=256)
    lighting: float = _opt("imagenet: std of the PCA lighting noise (0: off)", default=0.1)
    stats_samples: int = _opt("imagenet: training images sampled for the mean image and the "
                              "colour PCA", default=1000)
    num_workers: int = _opt("imagenet: image decoding worker processes", default=4)
    synthetic_size: int = _opt("synthetic: number of training images", default=2048)
    synthetic_shape: tuple[int, ...] = _opt("synthetic: image shape C,H,W", default=(3, 32, 32))
    synthetic_classes: int = _opt("synthetic: number of classes", default=10)
    # Optimization
    optimizer: str = _opt("update rule: sgd (with --momentum) or adagrad (per-parameter lr = "
                          "--lr / sqrt(sum of squared gradients); momentum unused)", default="sgd")
    batch_size: int = _opt("images per iteration (per replica and step with --mode downpour; "
                           "per L-BFGS batch with --mode sandblaster, where 0 is the whole "
                           "training split)", default=128)
    iterations: int = _opt("optimizer steps to train for (downpour: minibatch gradients over all "
                           "replicas together; sandblaster: L-BFGS iterations)", default=64000)
    epochs: float | None = _opt("train for this many passes over the training split instead of "
                                "--iterations", default=None)
    lr: float = _opt("base learning rate", default=0.1)
    momentum: float = _opt("SGD momentum", default=0.9)
    nesterov: bool = _opt("Nesterov momentum", default=False)
    weight_decay: float = _opt("L2 weight decay", default=1e-4)
    milestones: tuple[int, ...] = _opt("iterations at which the lr is multiplied by --lr-decay",
                                       default=(32000, 48000))
    lr_decay: float = _opt("lr factor at each milestone", default=0.1)
    warmup_iterations: int = _opt("length of the warmup in iterations (0: none; with "
                                  "--warmup-until-error: its upper bound)", default=0)
    warmup_lr: float | None = _opt("lr during a constant warmup, start of a linear one "
                                   "(default: lr/10)", default=None)
    warmup_mode: str = _opt("warmup shape: constant or linear", default="constant")
    warmup_until_error: float | None = _opt(
        "warm up until the training error (mean of the last 20 iterations) is below this "
        "fraction, as for the paper's ResNet-110 (0.8)", default=None)
    # Running
    device: str = _opt("auto, cpu or cuda", default="auto")
    channels_last: bool = _opt("channels-last memory format (faster on CPU and on tensor cores)",
                               default=False)
    bf16: bool = _opt("bfloat16 autocast for forward and loss", default=False)
    deterministic: bool = _opt("deterministic algorithms: repeatable run to run on CPU",
                               default=False)
    seed: int = _opt("seed of initialization, data order and augmentation", default=0)
    log_every: int = _opt("iterations between training-metric records", default=100)
    eval_every: int = _opt("iterations between test evaluations (0: only at the end)",
                           default=2000)
    checkpoint_every: int = _opt("iterations between checkpoints (0: only at the end)",
                                 default=2000)
    eval_batch_size: int = _opt("images per evaluation batch", default=500)
    # Distributed training (DistBelief)
    mode: str = _opt("single (one process), downpour (asynchronous replicas and a sharded "
                     "parameter server on Ray) or sandblaster (L-BFGS driven from a coordinator, "
                     "batch gradients from replicas, vectors on the shards)", default="single")
    replicas: int = _opt("downpour: model replicas, each with its own slice of the training data; "
                         "sandblaster: replicas computing batch portions", default=1)
    ps_shards: int = _opt("downpour, sandblaster: parameter-server shards, each owning a slice "
                          "of the parameters (sandblaster: of every L-BFGS vector)", default=1)
    n_fetch: int = _opt("downpour: a replica fetches fresh parameters every N of its steps",
                        default=1)
    n_push: int = _opt("downpour: a replica pushes its accumulated gradient every N of its steps",
                       default=1)
    overlap: bool = _opt("downpour: fetch and push in the background while computing (off: "
                         "every fetch and push waits, as in the parity tests)", default=True)
    max_in_flight: int = _opt("downpour: pushes a replica may have outstanding before it waits",
                              default=2)
    warmstart_steps: int = _opt("downpour: steps trained by one replica before the others start",
                                default=0)
    eval_interval_s: float = _opt("downpour: also evaluate the server's parameters every this "
                                  "many seconds of wall time (0: only every --eval-every)",
                                  default=0.0)
    snapshot_every_s: float = _opt("downpour: seconds between a shard's snapshots to the run "
                                   "directory", default=5.0)
    max_restarts: int = _opt("downpour, sandblaster: restarts allowed per replica (downpour: and "
                             "per shard) after a failure", default=3)
    portions: int | None = _opt("sandblaster: portions each batch is cut into, handed to replicas "
                                "one at a time (default: 16 per replica)", default=None)
    push_every: int = _opt("sandblaster: a replica pushes its summed gradient every N portions",
                           default=4)
    history: int = _opt("sandblaster: L-BFGS history size m (curvature pairs kept)", default=10)
    line_search: str = _opt("sandblaster: strong_wolfe or none (fixed step --lr)",
                            default="strong_wolfe")
    dtype: str = _opt("sandblaster: float32 or float64 arithmetic for the replicas' models, the "
                      "gradients and the L-BFGS vectors", default="float32")
    backup_tasks: bool = _opt("sandblaster: near the end of a batch give idle replicas copies of "
                              "unfinished portions; the first result wins", default=True)
    straggler_delay: float = _opt("sandblaster: replica 0 sleeps this many seconds after each "
                                  "portion (experiments with stragglers)", default=0.0)
    replica_cpus: int | None = _opt("downpour, sandblaster: CPU threads per replica (default: the "
                                    "cluster's CPUs divided among the replicas)", default=None)

    def __post_init__(self):
        check_choice("dataset", self.data, DATASETS)
        check_choice("device", self.device, DEVICES)
        check_choice("warmup mode", self.warmup_mode, WARMUP_MODES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("mode", self.mode, MODES)
        check_choice("line search", self.line_search, LINE_SEARCHES)
        check_choice("dtype", self.dtype, ("float32", "float64"))
        if self.shortcut is not None:
            check_choice("shortcut option", self.shortcut, ("A", "B", "C"))
        positive = ("batch_size", "iterations", "eval_batch_size", "log_every", "crop_size",
                    "scale_min", "scale_max", "test_size", "synthetic_size", "synthetic_classes",
                    "stats_samples", "replicas", "ps_shards", "n_fetch", "n_push",
                    "max_in_flight", "push_every", "history")
        non_negative = ("val_split", "pad", "momentum", "weight_decay", "warmup_iterations",
                        "eval_every", "checkpoint_every", "lighting", "num_workers", "lr_decay",
                        "warmstart_steps", "eval_interval_s", "max_restarts", "straggler_delay")
        for name in positive:
            if name == "batch_size" and self.mode == "sandblaster" and self.batch_size == 0:
                continue  # the whole training split
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.warmup_lr is not None and not (self.warmup_lr >= 0 and math.isfinite(self.warmup_lr)):
            raise ConfigError(f"--warmup-lr must be >= 0, got {self.warmup_lr}")
        for name in ("lr", "epochs"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{_flag(name)} must be a positive number, got {value}")
        if self.warmup_until_error is not None and not 0 < self.warmup_until_error <= 1:
            raise ConfigError("--warmup-until-error is a fraction in (0, 1], "
                              f"got {self.warmup_until_error}")
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ConfigError(f"--milestones must be increasing positive iterations, "
                              f"got {','.join(map(str, self.milestones))}")
        if self.scale_min > self.scale_max:
            raise ConfigError(f"--scale-min {self.scale_min} exceeds --scale-max {self.scale_max}")
        if self.data == "imagenet" and min(self.scale_min, self.test_size) < self.crop_size:
            raise ConfigError(f"--crop-size {self.crop_size} exceeds --scale-min or --test-size")
        if len(self.synthetic_shape) != 3 or min(self.synthetic_shape) <= 0:
            raise ConfigError("--synthetic-shape must be three positive sizes C,H,W")
        if not (self.snapshot_every_s > 0 and math.isfinite(self.snapshot_every_s)):
            raise ConfigError(f"--snapshot-every-s must be positive, got {self.snapshot_every_s}")
        if self.portions is not None and self.portions < 1:
            raise ConfigError(f"--portions must be positive, got {self.portions}")
        if not math.isfinite(self.straggler_delay):
            raise ConfigError(f"--straggler-delay must be a number of seconds, "
                              f"got {self.straggler_delay}")
        if self.replica_cpus is not None and self.replica_cpus < 1:
            raise ConfigError(f"--replica-cpus must be positive, got {self.replica_cpus}")
        if self.warmstart_steps >= self.iterations:
            raise ConfigError(f"--warmstart-steps {self.warmstart_steps} must be below "
                              f"--iterations {self.iterations}")
        if self.data in ("cifar10", "imagenet") and not self.data_dir:
            raise ConfigError(f"dataset {self.data} needs --data-dir")

    @property
    def warmup_start_lr(self) -> float:
        return self.warmup_lr if self.warmup_lr is not None else self.lr / 10

    def resolve_epochs(self, train_size: int) -> "TrainConfig":
        """With `epochs` set, the config whose `iterations` are that many passes over a training
        split of `train_size` images: ceil(epochs * images / batch) steps. Otherwise itself."""
        if self.epochs is None:
            return self
        return self.replace(iterations=max(1, math.ceil(
            self.epochs * train_size / self.batch_size)))

    def replace(self, **changes) -> "TrainConfig":
        """A copy with `changes` applied and validated; unknown names are a `ConfigError`."""
        unknown = sorted(set(changes) - set(field_types()))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain YAML/JSON-safe values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Inverse of `to_dict`; type-checks every value, so a hand-edited file fails clearly."""
        types_ = field_types()
        unknown = sorted(set(values) - set(types_))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**{k: coerce(k, v) for k, v in values.items()})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, whether None is allowed). tuple[int, ...] has base `tuple`."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        out[f.name] = (typing.get_origin(base) or base, optional)
    return out


def coerce(name: str, value):
    """Convert `value` (from YAML or the command line) to field `name`'s type or raise."""
    base, optional = field_types()[name]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{_flag(name)} cannot be empty")
    try:
        if base is tuple:
            items = value.split(",") if isinstance(value, str) else value
            return tuple(int(v) for v in items if str(v).strip())
        if base is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{_flag(name)}: cannot read {value!r} as {base.__name__}") from None
