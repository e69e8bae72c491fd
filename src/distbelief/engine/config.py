"""The training configuration: a frozen dataclass in sections that validates itself.

    TrainConfig            what every mode uses: model, data, optimization, running
      .imagenet            ImageNetConfig: ImageNet-style folders' augmentation and decoding
      .synthetic           SyntheticConfig: random images' size, shape and classes
      .cluster             ClusterConfig: the distributed modes' replicas, shards, restarts
      .downpour            DownpourConfig: Downpour SGD's replicas and parameter server
      .sandblaster         SandblasterConfig: Sandblaster L-BFGS's portions and history

A recipe (`distbelief.recipes`) returns a `TrainConfig`; the CLI and `replace` set fields by
their flat names (`replace(lr=0.05, n_fetch=4)`: every name is unique across the sections, and
each is a `--flag`). `to_dict` / `from_dict` carry it through `config.yaml` and checkpoints;
`from_dict` also reads the flat layout written before the sections existed. Every field's help
text is its CLI help, units included, and its range (`check`) is declared beside it.

All validation lives in this module: `validate` (run by the constructor) checks each value and
every rule that ties fields together; `resolve` applies the rules that need the data (how many
images) and `check_model` those that need the model (how many values, whether it has
BatchNorm) once they are known.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field

from distbelief.errors import ConfigError, check_choice

DATASETS = ("digits", "cifar10", "imagenet", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
WARMUP_MODES = ("constant", "linear")
OPTIMIZERS = ("sgd", "adagrad")
# distributed.downpour.rules
STALENESS_RULES = ("none", "lr", "momentum", "dc", "dana", "dana-slim")
TRANSFER_DTYPES = ("float32", "bfloat16", "float16")  # distributed.wire
SNAPSHOT_STORES = ("memory", "disk")
BN_STATS = ("batch", "delta")  # distributed.downpour.statistics
PIPELINE_SCHEDULES = ("1f1b", "gpipe")  # distributed.pipeline.schedule
PIPELINE_HANDOFFS = ("direct", "collective", "driver")  # distributed.pipeline.schedule
PARTITION_DTYPES = ("float32", "bfloat16")  # distributed.downpour.partitioned
MODES = ("single", "downpour", "sandblaster", "sync")
DISTRIBUTED_MODES = ("downpour", "sandblaster", "sync")
LINE_SEARCHES = ("strong_wolfe", "none")
DTYPES = ("float32", "float64")
CUSTOM = "custom"  # model and data given through the Python API (engine.user)
PORTIONS_PER_REPLICA = 16  # default --portions: many more portions than replicas
MAX_ITERATIONS = 10**12  # far beyond any run; a bound that keeps every count a plain integer


# --- ranges: each field declares its own (`_opt(check=...)`); a value None always passes ----

def positive(name: str, value) -> None:
    if not (value > 0 and _finite(value)):
        noun = "a positive number" if isinstance(value, float) else "positive"
        raise ConfigError(f"{_flag(name)} must be {noun}, got {value}")


def non_negative(name: str, value) -> None:
    if not (value >= 0 and _finite(value)):
        raise ConfigError(f"{_flag(name)} must be >= 0, got {value}")


def fraction(name: str, value) -> None:
    if not 0 < value <= 1:
        raise ConfigError(f"{_flag(name)} is a fraction in (0, 1], got {value}")


def increasing(name: str, value) -> None:
    if list(value) != sorted(value) or any(v <= 0 for v in value):
        raise ConfigError(f"{_flag(name)} must be increasing positive iterations, "
                          f"got {','.join(map(str, value))}")


def image_shape(name: str, value) -> None:
    if len(value) != 3 or min(value) <= 0:
        raise ConfigError(f"{_flag(name)} must be three positive sizes C,H,W")


def iteration_count(name: str, value) -> None:
    positive(name, value)
    if value > MAX_ITERATIONS:
        raise ConfigError(f"{_flag(name)} {value} is more than {MAX_ITERATIONS:,} iterations")


def seed_value(name: str, value) -> None:
    if not 0 <= value < 2**63:  # what torch, numpy and Python's generators all take
        raise ConfigError(f"{_flag(name)} must be an integer in 0 .. 2**63 - 1, got {value}")


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _opt(help: str, *, check=None, **kwargs):
    """A settable field: its CLI help (units included) and its range, `check(name, value)`
    raising `ConfigError` (None: any value of its type)."""
    return field(metadata={"help": help, "check": check}, **kwargs)


@dataclass(frozen=True)
class ClusterConfig:
    """The distributed modes' actors: how many, how big, how often they may be restarted."""

    replicas: int = _opt("downpour: model replicas, each with its own slice of the training "
                         "data; sandblaster: replicas computing batch portions; sync: "
                         "workers, each computing --batch-size rows of every step's global "
                         "batch", check=positive, default=1)
    ps_shards: int = _opt("downpour, sandblaster: parameter-server shards, each owning a slice "
                          "of the parameters (sandblaster: of every L-BFGS vector)",
                          check=positive, default=1)
    max_restarts: int = _opt("downpour, sandblaster: restarts allowed per replica (downpour: and "
                             "per shard) after a failure; sync: restarts of the worker group",
                             check=non_negative, default=3)
    ps_threads: int = _opt("downpour: threads each parameter-server shard updates its slice "
                           "with. Shards reserve no CPUs (they work between the replicas' "
                           "steps), so more than 1 pays where the replicas leave cores free",
                           check=positive, default=1)
    replica_cpus: int | None = _opt("downpour, sandblaster, sync, --partitions: CPU threads per "
                                    "replica or partition actor (default: as many as they can "
                                    "each have on the cluster's nodes)", check=positive,
                                    default=None)
    partitions: int = _opt("single, downpour: model parallelism, each replica's model cut into "
                           "P parts, each a Ray actor computing its layers (see 'distbelief "
                           "models NAME --partitions P')", check=positive, default=1)
    partition_at: str = _opt("with --partitions: the units where parts 2 .. P begin, "
                             "comma-separated (e.g. layer2.1; their names: 'distbelief models "
                             "NAME --partitions P'); empty: the cut balanced by cost",
                             default="")
    micro_batches: int = _opt("with --partitions: micro-batches per batch, pipelined through "
                              "the partitions (each normalised on its own by BatchNorm)",
                              check=positive, default=1)
    pipeline_schedule: str = _opt("with --partitions: the order of each step's passes on a "
                                  "partition: 1f1b (one forward, one backward: at most P "
                                  "micro-batches' activations per partition) or gpipe "
                                  "(fill-drain: all M); the same arithmetic",
                                  default="1f1b")
    pipeline_ahead: int = _opt("with --partitions, 1f1b: forward passes each partition but "
                               "the last runs ahead of 1f1b's fill, so that the gradients it "
                               "waits for have a hand-off's time to arrive; each holds as many "
                               "more micro-batches' activations", check=non_negative, default=1)
    pipeline_handoff: str = _opt("with --partitions: how activations and gradients reach the "
                                 "next partition: direct (each partition sends them to its "
                                 "neighbour itself, a Ray call), collective (the same as "
                                 "messages of a Ray collective group, gloo, without the object "
                                 "store; --mode single) or driver (every pass a call from the "
                                 "driver, or from a Downpour replica's head)",
                                 default="direct")
    partition_dtype: str = _opt("downpour with --partitions: the dtype of each partition's "
                                "weights, activations and gradients: float32 or bfloat16 (half "
                                "the memory and bytes; the shards keep and update float32)",
                                default="float32")
    recompute: bool = _opt("with --partitions: each partition keeps only its input per "
                           "micro-batch and runs its forward again in the backward pass "
                           "(activation memory for compute: about one forward more)",
                           default=False)
    train_storage: str | None = _opt("sync: where Ray Train keeps the run's checkpoints, in a "
                                     "folder of its own under this one: a folder every node "
                                     "sees, or a URI such as s3://bucket/path (default: "
                                     "RUN_DIR/ray-train, enough when the workers share the "
                                     "driver's disk)", default=None)
    connect_timeout_s: float = _opt("with --address: seconds the cluster's address has to "
                                    "answer as a Ray cluster (its GCS) before the run gives up",
                                    check=positive, default=10.0)


@dataclass(frozen=True)
class DownpourConfig:
    """Downpour SGD: how replicas talk to the parameter server, and its snapshots."""

    n_fetch: int = _opt("downpour: a replica fetches fresh parameters every N of its steps",
                        check=positive, default=1)
    n_push: int = _opt("downpour: a replica pushes its accumulated gradient every N of its "
                       "steps", check=positive, default=1)
    local_steps: int | None = _opt("downpour: each replica takes N plain SGD steps on its own "
                                   "copy (the recipe's lr and weight decay), then pushes the "
                                   "change of its parameters, which the shards apply as one "
                                   "outer step with the recipe's momentum (EASGD / DiLoCo); "
                                   "fetches and pushes every N steps (default: a gradient per "
                                   "push, every --n-push steps)", check=positive, default=None)
    outer_lr: float = _opt("downpour with --local-steps: the shards' step size for a pushed "
                           "change (1: the change itself, with the recipe's momentum; one "
                           "replica with --local-steps 1 is then the recipe's SGD)",
                           check=positive, default=1.0)
    async_warmup: int = _opt("downpour: the shards' lr rises linearly from lr / replicas to lr "
                             "over the first N minibatches (over all replicas): Goyal et al.'s "
                             "warmup for the step of replicas minibatches that a round of "
                             "pushes under --staleness-rule dana amounts to (0: off)",
                             check=non_negative, default=0)
    ssp_bound: int | None = _opt("downpour: stale synchronous parallel replicas (Ho 2013): a "
                                 "replica more than S of its steps ahead of the slowest replica "
                                 "at work waits for it, so that no gradient falls more than "
                                 "about (replicas - 1) x (S + 1) versions behind; 0 keeps their "
                                 "steps level (default: never wait, Downpour's replicas)",
                                 check=non_negative, default=None)
    overlap: bool = _opt("downpour: fetch and push in the background while computing (off: "
                         "every fetch and push waits, as in the parity tests)", default=True)
    max_in_flight: int = _opt("downpour: pushes a replica may have outstanding before it waits",
                              check=positive, default=2)
    fetch_wait_s: float | None = _opt("downpour: with overlap, seconds a replica waits for the "
                                      "fetch in flight before it computes on the parameters it "
                                      "has (default: up to half its step time, and not after a "
                                      "wait that timed out; 0: never, the paper's replica)",
                                      check=non_negative, default=None)
    staleness_rule: str = _opt("downpour: how shards apply a stale gradient: dana (a momentum "
                               "per replica and fetches looked ahead by them, Hakimi 2019; "
                               "Nesterov's momentum with one replica), lr (lr / staleness, "
                               "Zhang 2016), momentum (the recipe's momentum less the ~1-1/N "
                               "asynchrony adds, Mitliagkas 2016), dc (delay compensation, "
                               "Zheng 2017), none (Dean 2012); combined with +, as dana+lr "
                               "(the default: dana, and lr for staleness beyond 1)",
                               default="dana+lr")
    dc_lambda: float = _opt("downpour: lambda_0 of --staleness-rule dc (adaptive: lambda_t = "
                            "lambda_0 / sqrt(MeanSquare(g)), Zheng 2017's DC-ASGD-a)",
                            check=non_negative, default=2.0)
    bn_stats: str = _opt("downpour: how the server's BatchNorm running statistics follow the "
                         "replicas: batch (replicas push their batches' statistics, the shard "
                         "runs the moving average: no delayed feedback) or delta (replicas push "
                         "the change of their own running statistics)", default="batch")
    lockstep: bool = _opt("downpour: run the replicas in one process, one step each in turn "
                          "against the real shards and rules (staleness exactly replicas - 1, "
                          "repeatable bit for bit; no Ray)", default=False)
    virtual: bool = _opt("downpour: a virtual cluster in this process: the real replicas, "
                         "shards and rules, on a simulated clock that times every compute, "
                         "transfer and shard update by a cost model (--virtual-*); records "
                         "carry the simulated wall time (wall_s) beside the real one",
                         default=False)
    virtual_step_ms: float | None = _opt("downpour --virtual: a replica's compute time per "
                                         "minibatch (default: measured on this machine at the "
                                         "start)", check=positive, default=None)
    virtual_spread: float = _opt("downpour --virtual: the spread of a step's compute time (the "
                                 "sigma of a log-normal factor of mean 1; 0: every step the "
                                 "same)", check=non_negative, default=0.1)
    virtual_straggle: str = _opt("downpour --virtual: P,X makes each step X times slower with "
                                 "probability P (none: never); --straggler-delay slows replica "
                                 "0 for good", default="none")
    virtual_link: str = _opt("downpour --virtual: every node's network link, BANDWIDTH,LATENCY "
                             "(e.g. 10gbit,50us or 1gbit,0.2ms); each replica and each shard "
                             "has a node of its own, as in the paper", default="10gbit,50us")
    virtual_shard_ms: float | None = _opt("downpour --virtual: the time a shard takes to apply "
                                          "a push (default: measured on this machine at the "
                                          "start)", check=non_negative, default=None)
    record_order: bool = _opt("downpour: record, on every shard and in its checkpoints, the "
                              "order it served pulls and applied pushes in, and with each "
                              "push the steps it holds and the fetch each was computed on "
                              "(`distbelief replay RUN_DIR` re-executes that order in one "
                              "process, bit for bit)", default=False)
    ps_transfer_dtype: str = _opt("downpour: the dtype pushes and pulls travel in: float32, "
                                  "bfloat16 or float16 (half the bytes; the shards keep and "
                                  "update float32)", default="float32")
    warmstart_steps: int = _opt("downpour: steps trained by one replica before the others "
                                "start", check=non_negative, default=0)
    snapshot_every_s: float = _opt("downpour: seconds between a shard's snapshots to the keeper "
                                   "on the driver's node, from which Ray restarts a dead shard; "
                                   "single with --partitions: between the partitions' "
                                   "snapshots, to which they all go back when one is "
                                   "restarted (0: none, for a server too large to copy; a "
                                   "shard or partition that dies then ends the run)",
                                   check=non_negative, default=5.0)
    snapshot_store: str = _opt("downpour: where a shard keeps its snapshots: memory (sent to the "
                               "keeper on the driver's node: a restart on any node finds it) or "
                               "disk (written by the shard from its live state to a file on its "
                               "own node: no copy of the server in memory, a restart on the same "
                               "node only)", default="memory")


@dataclass(frozen=True)
class SandblasterConfig:
    """Sandblaster L-BFGS: how batches are cut and scheduled, and the L-BFGS settings."""

    portions: int | None = _opt("sandblaster: portions each batch is cut into, handed to "
                                "replicas one at a time (default: 16 per replica)",
                                check=positive, default=None)
    push_every: int = _opt("sandblaster: a replica pushes its summed gradient every N portions",
                           check=positive, default=4)
    history: int = _opt("sandblaster: L-BFGS history size m (curvature pairs kept)",
                        check=positive, default=10)
    line_search: str = _opt("sandblaster: strong_wolfe or none (fixed step --lr)",
                            default="strong_wolfe")
    dtype: str = _opt("sandblaster: float32 or float64 arithmetic for the replicas' models, the "
                      "gradients and the L-BFGS vectors", default="float32")
    backup_tasks: bool = _opt("sandblaster: near the end of a batch give idle replicas copies "
                              "of unfinished portions; the first result wins", default=True)
    straggler_delay: float = _opt("sandblaster, downpour: replica 0 sleeps this many seconds "
                                  "after each portion (sandblaster) or step (downpour): "
                                  "experiments with stragglers", check=non_negative,
                                  default=0.0)


@dataclass(frozen=True)
class ImageNetConfig:
    """ImageNet-style folders (--data imagenet): the paper's scale augmentation and test views
    (Sec. 3.4), and how images are decoded."""

    crop_size: int = _opt("imagenet: training and test crop side in px", check=positive,
                          default=224)
    scale_min: int = _opt("imagenet: smallest random shorter side in px", check=positive,
                          default=256)
    scale_max: int = _opt("imagenet: largest random shorter side in px", check=positive,
                          default=480)
    test_size: int = _opt("imagenet: shorter side in px before the test crops", check=positive,
                          default=256)
    lighting: float = _opt("imagenet: std of the PCA lighting noise (0: off)",
                           check=non_negative, default=0.1)
    stats_samples: int = _opt("imagenet: training images sampled for the mean image and the "
                              "colour PCA", check=positive, default=1000)
    num_workers: int = _opt("imagenet: image decoding worker processes", check=non_negative,
                            default=4)


@dataclass(frozen=True)
class SyntheticConfig:
    """Random images (--data synthetic): benchmarks and tests that need no download."""

    synthetic_size: int = _opt("synthetic: number of training images", check=positive,
                               default=2048)
    synthetic_shape: tuple[int, ...] = _opt("synthetic: image shape C,H,W", check=image_shape,
                                            default=(3, 32, 32))
    synthetic_classes: int = _opt("synthetic: number of classes", check=positive, default=10)


SECTIONS = {"imagenet": ImageNetConfig, "synthetic": SyntheticConfig, "cluster": ClusterConfig,
            "downpour": DownpourConfig, "sandblaster": SandblasterConfig}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run, in any mode.

    Iteration counts are optimizer steps (one batch each; Downpour: minibatch gradients over
    all replicas; Sandblaster: L-BFGS iterations). Learning-rate milestones are iterations, as in
    the paper ("divided by 10 at 32k and 48k iterations").
    """

    recipe: str = _opt("recipe this config came from", default="custom")
    # Model
    model: str = _opt("registered model name (see 'distbelief models')", default="resnet20")
    shortcut: str | None = _opt("shortcut option A, B or C (default: the family's)", default=None)
    hidden: int | None = _opt("mlp, deep_mlp: hidden units (default 256, 1024)",
                              check=positive, default=None)
    variant: str | None = _opt("ImageNet ResNets: where a bottleneck strides, 'paper' (the "
                               "first 1x1 conv, the default) or 'v1.5' (the 3x3 conv, as "
                               "torchvision's resnet50 ... 152)", default=None)
    init_from: str | None = _opt("start from the weights in this file: a torchvision-format "
                                 "state dict (names to tensors, as 'distbelief export' writes), "
                                 "loaded strictly", default=None)
    # Data
    data: str = _opt("dataset: digits, cifar10, imagenet or synthetic", default="digits")
    data_dir: str | None = _opt("dataset folder (cifar10: cifar-10-batches-py, imagenet: the "
                                "folder holding train/ and val/)", default=None)
    download: bool = _opt("cifar10: download and verify the official archive into --data-dir",
                          default=False)
    val_split: int = _opt("training images held out as a validation split (0: none)",
                          check=non_negative, default=0)
    augment: bool = _opt("training augmentation on or off", default=True)
    pad: int = _opt("array data: zero padding in px before the random crop", check=non_negative,
                    default=4)
    flip: bool = _opt("random horizontal flips", default=True)
    # Optimization
    loss: str = _opt("training loss: cross_entropy (classification) or mse (regression, mean "
                     "squared error: only for a model and data given to distbelief.fit)",
                     default="cross_entropy")
    optimizer: str = _opt("update rule: sgd (with --momentum) or adagrad (per-parameter lr = "
                          "--lr / sqrt(sum of squared gradients); momentum unused)", default="sgd")
    batch_size: int = _opt("images per iteration (per replica and step with --mode downpour; "
                           "per L-BFGS batch with --mode sandblaster, where 0 is the whole "
                           "training split)", check=positive, default=128)
    iterations: int = _opt("optimizer steps to train for (downpour: minibatch gradients over all "
                           "replicas together; sandblaster: L-BFGS iterations)",
                           check=iteration_count, default=64000)
    epochs: float | None = _opt("train for this many passes over the training split instead of "
                                "--iterations", check=positive, default=None)
    lr: float = _opt("base learning rate", check=positive, default=0.1)
    momentum: float = _opt("SGD momentum", check=non_negative, default=0.9)
    nesterov: bool = _opt("Nesterov momentum", default=False)
    weight_decay: float = _opt("L2 weight decay", check=non_negative, default=1e-4)
    milestones: tuple[int, ...] = _opt("iterations at which the lr is multiplied by --lr-decay",
                                       check=increasing, default=(32000, 48000))
    lr_decay: float = _opt("lr factor at each milestone", check=non_negative, default=0.1)
    warmup_iterations: int = _opt("length of the warmup in iterations (0: none; with "
                                  "--warmup-until-error: its upper bound)",
                                  check=non_negative, default=0)
    warmup_lr: float | None = _opt("lr during a constant warmup, start of a linear one "
                                   "(default: lr/10)", check=non_negative, default=None)
    warmup_mode: str = _opt("warmup shape: constant or linear", default="constant")
    warmup_until_error: float | None = _opt(
        "warm up until the training error (mean of the last 20 iterations) is below this "
        "fraction, as for the paper's ResNet-110 (0.8)", check=fraction, default=None)
    # Running
    device: str = _opt("auto, cpu or cuda", default="auto")
    channels_last: bool = _opt("channels-last memory format (faster on CPU and on tensor cores)",
                               default=False)
    bf16: bool = _opt("bfloat16 autocast for forward and loss", default=False)
    compile: bool = _opt("single mode: compile the training step with torch.compile (on CUDA "
                         "as CUDA graphs, mode reduce-overhead: the small CIFAR nets are "
                         "launch-bound); the first steps pay the compilation", default=False)
    deterministic: bool = _opt("deterministic algorithms: repeatable run to run on CPU",
                               default=False)
    seed: int = _opt("seed of initialization, data order and augmentation", check=seed_value,
                     default=0)
    log_every: int = _opt("iterations between training-metric records", check=positive,
                          default=100)
    eval_every: int = _opt("iterations between test evaluations (0: only at the end)",
                           check=non_negative, default=2000)
    eval_interval_s: float = _opt("also evaluate every this many seconds of wall time (0: only "
                                  "every --eval-every)", check=non_negative, default=0.0)
    checkpoint_every: int = _opt("iterations between checkpoints (0: only at the end)",
                                 check=non_negative, default=2000)
    checkpoint_interval_s: float = _opt("also checkpoint every this many seconds of wall time "
                                        "(0: only every --checkpoint-every), so that a run "
                                        "killed outright loses at most this window",
                                        check=non_negative, default=300.0)
    eval_batch_size: int = _opt("images per evaluation batch", check=positive, default=500)
    bn_recalibrate: int = _opt("before every evaluation (and the checkpoint's model) re-estimate "
                               "BatchNorm's running statistics as the plain average over this "
                               "many training batches at the current weights ('precise BN'; 0: "
                               "off)", check=non_negative, default=0)
    tensorboard: bool = _opt("also write TensorBoard event files into RUN_DIR/tensorboard "
                             "(loss, error, lr, images/s, staleness, per-shard updates/s)",
                             default=False)
    mode: str = _opt("single (one process), downpour (asynchronous replicas and a sharded "
                     "parameter server on Ray) or sandblaster (L-BFGS driven from a coordinator, "
                     "batch gradients from replicas, vectors on the shards) or sync (synchronous "
                     "data parallelism on Ray Train: --replicas workers, gradients averaged "
                     "every step)", default="single")
    # Sections: the data sets' own settings, then the distributed modes'
    imagenet: ImageNetConfig = field(default_factory=ImageNetConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    downpour: DownpourConfig = field(default_factory=DownpourConfig)
    sandblaster: SandblasterConfig = field(default_factory=SandblasterConfig)
    # A model and data given to distbelief.fit (engine.user.UserParts); with model and data
    # "custom". Not a setting: never a flag, never in config.yaml, not compared.
    user: object = field(default=None, compare=False, repr=False, metadata={"internal": True})

    def __post_init__(self):
        validate(self)

    @property
    def warmup_start_lr(self) -> float:
        return self.warmup_lr if self.warmup_lr is not None else self.lr / 10

    @property
    def distributed(self) -> bool:
        return self.mode in DISTRIBUTED_MODES

    def get(self, name: str):
        """The value of field `name` (a flat name, as on the command line)."""
        section = section_of(name)
        return getattr(getattr(self, section) if section else self, name)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with `changes` (flat field names, or whole sections by their names) applied
        and validated; unknown names are a `ConfigError`."""
        unknown = sorted(set(changes) - set(field_types()) - set(SECTIONS) - {"user"})
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        top = {k: v for k, v in changes.items() if k in SECTIONS or section_of(k) is None}
        for name in SECTIONS:
            mine = {k: v for k, v in changes.items() if section_of(k) == name}
            if mine:
                top[name] = dataclasses.replace(top.get(name, getattr(self, name)), **mine)
        return dataclasses.replace(self, **top)

    def to_dict(self) -> dict:
        """Plain YAML/JSON-safe values (tuples become lists), one nested dict per section."""
        def plain(values: dict) -> dict:
            return {k: plain(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple)
                    else v for k, v in values.items()}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if not f.metadata.get("internal")}
        return plain({k: dataclasses.asdict(v) if k in SECTIONS else v
                      for k, v in values.items()})

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Inverse of `to_dict`, and of the flat layout written before the config had sections;
        type-checks every value, so a hand-edited file fails clearly."""
        if not isinstance(values, dict):
            raise ConfigError(f"the config is not a mapping of settings (a "
                              f"{type(values).__name__})")
        flat = {}
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        unknown = sorted(set(flat) - set(field_types()))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        user = MissingParts() if flat.get("model") == CUSTOM else None
        return cls().replace(**{k: coerce(k, v) for k, v in flat.items()}, user=user)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def section_of(name: str) -> str | None:
    """The section holding flat field `name` (None: the top level). Unknown names: None."""
    return _fields().get(name, (None,))[0]


def option_fields() -> list[tuple[str | None, dataclasses.Field]]:
    """(section, field) of every settable field in declaration order, sections last."""
    return [(section, f) for section, f, _, _ in _fields().values()]


def field_types() -> dict[str, tuple[type, bool]]:
    """Flat field name -> (base type, whether None is allowed). tuple[int, ...] has base
    `tuple`."""
    return {name: (base, optional) for name, (_, _, base, optional) in _fields().items()}


@functools.cache
def _fields() -> dict[str, tuple[str | None, dataclasses.Field, type, bool]]:
    out = {}
    for section, cls in ((None, TrainConfig), *SECTIONS.items()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if (section is None and f.name in SECTIONS) or f.metadata.get("internal"):
                continue
            hint = hints[f.name]
            args = typing.get_args(hint)
            optional = isinstance(hint, types.UnionType) and type(None) in args
            base = next(a for a in args if a is not type(None)) if optional else hint
            out[f.name] = (section, f, typing.get_origin(base) or base, optional)
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


# --- validation: every rule in one place ----------------------------------------------------

def validate(c: TrainConfig) -> None:
    """Raise `ConfigError` naming the first impossible value or combination in `c`."""
    _check_user(c)
    if c.data != CUSTOM:
        check_choice("dataset", c.data, DATASETS)
    check_choice("device", c.device, DEVICES)
    check_choice("warmup mode", c.warmup_mode, WARMUP_MODES)
    check_choice("optimizer", c.optimizer, OPTIMIZERS)
    check_choice("loss", c.loss, ("cross_entropy", "mse"))
    check_choice("mode", c.mode, MODES)
    check_choice("line search", c.sandblaster.line_search, LINE_SEARCHES)
    check_choice("dtype", c.sandblaster.dtype, DTYPES)
    for rule in c.downpour.staleness_rule.split("+"):
        check_choice("staleness rule", rule, STALENESS_RULES)
    check_choice("transfer dtype", c.downpour.ps_transfer_dtype, TRANSFER_DTYPES)
    check_choice("BatchNorm statistics", c.downpour.bn_stats, BN_STATS)
    check_choice("snapshot store", c.downpour.snapshot_store, SNAPSHOT_STORES)
    if c.shortcut is not None:
        check_choice("shortcut option", c.shortcut, ("A", "B", "C"))
    if c.variant is not None:
        check_choice("bottleneck variant", c.variant, ("paper", "v1.5"))
    _check_ranges(c)
    _check_rules(c)


class MissingParts:
    """The model and data of a run made through `distbelief.fit`, read back from disk without
    them: the config reads (plots, mode checks); building the model or data says what to do."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ConfigError(MISSING_PARTS)


MISSING_PARTS = ("this run's model and data were given to distbelief.fit; resume or evaluate it "
                 "through the Python API with the same model (fit(..., resume=True), "
                 "load(run, model=...))")


def _check_user(c: TrainConfig) -> None:
    """Model and data "custom" are exactly those of a config that carries them (`user`)."""
    custom = (c.model == CUSTOM, c.data == CUSTOM, c.user is not None)
    if any(custom) and not all(custom):
        raise ConfigError("model and data 'custom' are the ones given to distbelief.fit(model, "
                          "train_data, ...); the command line trains the named ones")
    if c.loss == "mse" and c.user is None:
        raise ConfigError("--loss mse needs real-valued targets: the named datasets have class "
                          "labels; give distbelief.fit a model and data")
    if c.loss == "mse" and c.warmup_until_error is not None:
        raise ConfigError("--warmup-until-error needs an error rate: --loss cross_entropy")
    if c.user is not None and c.val_split:
        raise ConfigError("--val-split applies to the named datasets; give distbelief.fit a "
                          "test_data")


def _check_ranges(c: TrainConfig) -> None:
    """Each field's value against the range declared with it."""
    for _, f in option_fields():
        check, value = f.metadata["check"], c.get(f.name)
        if check is None or value is None:
            continue
        if f.name == "batch_size" and c.mode == "sandblaster" and value == 0:
            continue  # the whole training split
        check(f.name, value)


def _check_rules(c: TrainConfig) -> None:
    """Rules that tie fields together."""
    i = c.imagenet
    if i.scale_min > i.scale_max:
        raise ConfigError(f"--scale-min {i.scale_min} exceeds --scale-max {i.scale_max}")
    if c.data == "imagenet" and min(i.scale_min, i.test_size) < i.crop_size:
        raise ConfigError(f"--crop-size {i.crop_size} exceeds --scale-min or --test-size")
    if c.downpour.warmstart_steps >= c.iterations:
        raise ConfigError(f"--warmstart-steps {c.downpour.warmstart_steps} must be below "
                          f"--iterations {c.iterations}")
    if c.data in ("cifar10", "imagenet") and not c.data_dir:
        raise ConfigError(f"dataset {c.data} needs --data-dir")
    _check_staleness_rule(c)
    _check_local_steps(c)
    _check_async_warmup(c)
    _check_ssp_bound(c)
    _check_virtual(c)
    if c.downpour.record_order and c.mode != "downpour":
        raise ConfigError("--record-order applies to --mode downpour")
    if c.downpour.record_order and c.cluster.partitions > 1:
        raise ConfigError("--record-order records whole replicas (distbelief replay re-executes "
                          "them): --partitions 1")
    if c.compile and c.mode != "single":
        raise ConfigError("--compile applies to --mode single")
    if c.cluster.train_storage and c.mode != "sync":
        raise ConfigError("--train-storage applies to --mode sync")
    _check_partitions(c)
    if c.mode == "sandblaster" and c.data == "imagenet":
        raise ConfigError("--mode sandblaster needs an in-memory dataset (digits, cifar10 or "
                          "synthetic): portions index the training split")


def _check_staleness_rule(c: TrainConfig) -> None:
    rules = set(c.downpour.staleness_rule.split("+"))
    if c.downpour.lockstep and c.mode == "downpour" and c.cluster.partitions > 1:
        raise ConfigError("--lockstep runs whole replicas in one process: --partitions 1")
    dana = rules & {"dana", "dana-slim"}
    if not dana:
        return
    if len(dana) > 1:
        raise ConfigError("--staleness-rule: dana and dana-slim are one algorithm; name one")
    name = dana.pop()
    if rules & {"momentum", "dc"}:
        raise ConfigError(f"--staleness-rule {name} combines with lr only (it replaces the "
                          f"momentum correction, and dc would compensate from the wrong "
                          f"values)")
    if name == "dana-slim" and c.nesterov:
        raise ConfigError("--staleness-rule dana-slim is Nesterov-shaped by construction: "
                          "drop --nesterov")


def _check_virtual(c: TrainConfig) -> None:
    d = c.downpour
    given = [f"--{f.replace('_', '-')}" for f in ("virtual_step_ms", "virtual_shard_ms")
             if getattr(d, f) is not None]
    if not d.virtual:
        if given:
            raise ConfigError(f"{given[0]} applies with --virtual")
        return
    if c.mode != "downpour":
        raise ConfigError("--virtual applies to --mode downpour")
    for flag, on in (("--lockstep", d.lockstep), ("--ssp-bound", d.ssp_bound is not None)):
        if on:
            raise ConfigError(f"--virtual simulates Downpour's timing without {flag}")
    parse_link(d.virtual_link)
    parse_straggle(d.virtual_straggle)


_RATE = {"gbit": 1e9 / 8, "mbit": 1e6 / 8, "gb": 1e9, "mb": 1e6}
_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_link(text: str) -> tuple[float, float]:
    """--virtual-link "10gbit,50us" -> (bytes per second, latency seconds).

    Raises:
        ConfigError: not BANDWIDTH,LATENCY with units gbit, mbit, gb, mb and us, ms, s."""
    number = r"(\d+(?:\.\d*)?|\.\d+)"
    m = re.fullmatch(rf"\s*{number}\s*(gbit|mbit|gb|mb)\s*,\s*{number}\s*(us|ms|s)\s*",
                     text.lower())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--virtual-link {text!r}: give BANDWIDTH,LATENCY, e.g. 10gbit,50us "
                          f"or 1gbit,0.2ms (units gbit, mbit, gb, mb; us, ms, s)")
    return float(m.group(1)) * _RATE[m.group(2)], float(m.group(3)) * _TIME[m.group(4)]


def parse_straggle(text: str) -> tuple[float, float]:
    """--virtual-straggle "0.02,5" -> (probability, factor); "none" -> (0, 1).

    Raises:
        ConfigError: not P,X with 0 <= P <= 1 and X >= 1."""
    if text.strip().lower() == "none":
        return 0.0, 1.0
    try:
        p, x = (float(v) for v in text.split(","))
    except ValueError:
        p, x = -1.0, 0.0
    if not (0 <= p <= 1 and x >= 1):
        raise ConfigError(f"--virtual-straggle {text!r}: give P,X (probability 0..1, factor "
                          f">= 1), e.g. 0.02,5, or none")
    return p, x


def _check_ssp_bound(c: TrainConfig) -> None:
    if c.downpour.ssp_bound is None:
        return
    if c.mode != "downpour":
        raise ConfigError("--ssp-bound applies to --mode downpour")
    if c.downpour.lockstep:
        raise ConfigError("--ssp-bound bounds how far replicas drift apart; in --lockstep they "
                          "take one step each in turn and never do")


def _check_async_warmup(c: TrainConfig) -> None:
    d = c.downpour
    if d.async_warmup and c.mode != "downpour":
        raise ConfigError("--async-warmup applies to --mode downpour")
    if d.async_warmup and d.local_steps is not None:
        raise ConfigError("--async-warmup ramps the shards' gradient steps; under --local-steps "
                          "they apply changes at --outer-lr (the replicas follow the schedule)")


def _check_local_steps(c: TrainConfig) -> None:
    d = c.downpour
    if d.local_steps is None:
        if d.outer_lr != 1.0:
            raise ConfigError("--outer-lr applies with --local-steps")
        return
    if c.mode != "downpour":
        raise ConfigError("--local-steps applies to --mode downpour")
    if c.optimizer != "sgd":
        raise ConfigError("--local-steps takes plain SGD steps on the replicas: --optimizer sgd")
    if (d.n_push, d.n_fetch) != (1, 1):
        raise ConfigError("--local-steps N fetches and pushes every N steps: leave --n-push and "
                          "--n-fetch at 1")
    if c.cluster.partitions > 1:
        raise ConfigError("--local-steps trains whole replicas: --partitions 1")
    rules = set(d.staleness_rule.split("+"))
    if rules & {"dc", "dana-slim"}:
        raise ConfigError("--local-steps pushes parameter changes: --staleness-rule dc and "
                          "dana-slim apply to gradients (use dana, lr, momentum or none)")


def _check_partitions(c: TrainConfig) -> None:
    parts = c.cluster.partitions
    check_choice("pipeline schedule", c.cluster.pipeline_schedule, PIPELINE_SCHEDULES)
    check_choice("pipeline hand-off", c.cluster.pipeline_handoff, PIPELINE_HANDOFFS)
    if c.cluster.micro_batches > 1 and parts == 1:
        raise ConfigError("--micro-batches applies with --partitions 2 or more")
    if c.cluster.recompute and parts == 1:
        raise ConfigError("--recompute applies with --partitions 2 or more")
    if c.cluster.partition_at and parts == 1:
        raise ConfigError("--partition-at applies with --partitions 2 or more")
    check_choice("partition dtype", c.cluster.partition_dtype, PARTITION_DTYPES)
    if c.cluster.partition_dtype != "float32" and (parts == 1 or c.mode != "downpour"):
        raise ConfigError(f"--partition-dtype {c.cluster.partition_dtype} applies under --mode "
                          f"downpour with --partitions 2 or more (the shards keep float32)")
    if parts == 1:
        return
    if c.mode in ("sandblaster", "sync"):
        raise ConfigError("--partitions applies to --mode single and downpour")
    if c.cluster.pipeline_handoff == "collective" and c.mode != "single":
        raise ConfigError("--pipeline-handoff collective applies under --mode single (a "
                          "Downpour replica's partitions hand on with direct or driver)")
    if c.compile:
        raise ConfigError("--compile applies to an unpartitioned model (--partitions 1)")
    if c.cluster.micro_batches > c.batch_size:
        raise ConfigError(f"--micro-batches {c.cluster.micro_batches} exceeds --batch-size "
                          f"{c.batch_size}")


def batch_images(c: TrainConfig, train_size: int) -> int:
    """Images per iteration: the batch, or the whole split for Sandblaster's batch size 0 (or
    any batch at least as large)."""
    if c.mode == "sandblaster" and (c.batch_size == 0 or c.batch_size >= train_size):
        return train_size
    if c.mode == "sync":  # --batch-size is per worker
        return c.batch_size * c.cluster.replicas
    return c.batch_size


def resolve(c: TrainConfig, train_size: int) -> TrainConfig:
    """The config a run uses once its data (`train_size` training images) is known: `--epochs`
    turned into iterations, Sandblaster's default portions; raises `ConfigError` for what the
    data cannot satisfy. The model's own rules are `check_model`'s."""
    images = batch_images(c, train_size)
    if c.epochs is not None:
        steps = c.epochs * train_size / images
        if not steps <= MAX_ITERATIONS:  # also inf
            raise ConfigError(f"--epochs {c.epochs} is more than {MAX_ITERATIONS:,} iterations "
                              f"of {images} images")
        c = c.replace(iterations=max(1, math.ceil(steps)))
    if c.mode == "sync" and images > train_size:
        raise ConfigError(f"{c.cluster.replicas} workers with batches of {c.batch_size} "
                          f"need more than the {train_size} training images")
    if c.mode == "downpour" and c.cluster.replicas > train_size // c.batch_size:
        raise ConfigError(f"{c.cluster.replicas} replicas with batches of {c.batch_size} "
                          f"need more than the {train_size} training images")
    if c.mode == "sandblaster":
        if c.sandblaster.portions is None:
            c = c.replace(portions=min(images, PORTIONS_PER_REPLICA * c.cluster.replicas))
        if c.sandblaster.portions > images:
            raise ConfigError(f"--portions {c.sandblaster.portions} exceeds the {images} "
                              f"images of a batch")
    return c


def check_model(c: TrainConfig, values: int, batchnorm: bool = False) -> None:
    """Raise `ConfigError` for what the model (`values` elements in the server's vector,
    whether it has BatchNorm) cannot satisfy in `c`'s mode."""
    if c.mode in ("downpour", "sandblaster") and c.cluster.ps_shards > values:
        noun = "parameters" if c.mode == "sandblaster" else "values"
        raise ConfigError(f"--ps-shards {c.cluster.ps_shards} exceeds the model's {values} "
                          f"{noun}")
    if c.mode == "sandblaster" and batchnorm:
        raise ConfigError(f"--mode sandblaster needs a model without BatchNorm (softmax or "
                          f"mlp): batch statistics would make the batch objective depend "
                          f"on how it is cut into portions; {c.model} has BatchNorm")
