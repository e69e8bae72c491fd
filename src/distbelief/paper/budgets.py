"""What one run of an experiment trains: the recipe, scaled by the budget.

- `full`: the paper's schedules unchanged (CIFAR-10: `cifar10-paper`, 64k iterations of 128,
  lr / 10 at 32k and 48k; ResNet-110 warms up). Hours per network on a GPU, days on a CPU.
- `short`: minutes on a laptop CPU. On the 8x8 digits (the default for short, built in, no
  download) the `digits` recipe cut to 600 iterations of 64 (lr / 10 at 400 and 500), with the
  paper's warm-up for ResNet-110 and deeper; on
  CIFAR-10 the paper's recipe cut to 2,000 iterations (lr / 10 at 1,000 and 1,500), 1/32 of the
  schedule. It shows orderings (deeper plain nets train worse, residual responses are smaller),
  not the paper's error rates.
- `medium`: the nets trained until their training error has stopped falling, on data a laptop
  fits. On the digits the `digits` recipe at 3,000 iterations of 64 (~134 epochs, lr / 10 at
  2,000 and 2,500): the ResNets' and plain-20's training errors are flat (within 0.05 points
  over the last 500 iterations, near 0); plain-56 still creeps down at the last lr (~1 point per
  250 iterations, 45-71% by seed), the degradation the paper reports. So Fig. 6's and Fig. 7's
  orderings are measured where training has ended, not where the deep nets are still
  starting; ~12 min per seed for the five nets of Fig. 7 on 2 CPU cores. On CIFAR-10 the
  paper's recipe at 1/4 of its schedule (16,000 iterations, lr / 10 at 8,000 and 12,000): a
  GPU's minutes, a CPU's hours.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from distbelief.engine.config import TrainConfig
from distbelief.errors import ConfigError, check_choice
from distbelief.recipes import get_recipe

BUDGETS = ("short", "medium", "full")
# iterations, milestones, log / eval / checkpoint cadences of the reduced budgets, per data.
SCHEDULES = {
    ("short", "digits"): (600, (400, 500), 20, 100, 300),
    ("medium", "digits"): (3000, (2000, 2500), 50, 500, 500),
    ("short", "cifar10"): (2000, (1000, 1500), 50, 500, 500),
    ("medium", "cifar10"): (16000, (8000, 12000), 100, 2000, 2000),
}
DATASETS = ("digits", "cifar10")


@dataclass(frozen=True)
class Options:
    """How an experiment's runs are trained. `data` None: the budget's (short and medium:
    digits, full: cifar10). `models` None: the experiment's own list. Each run has its `seed`;
    an experiment trains `seeds` runs of each net (seeds `seed` .. `seed + seeds - 1`)."""

    budget: str = "short"
    data: str | None = None
    data_dir: str = "data/cifar-10-batches-py"
    device: str = "auto"
    models: tuple[str, ...] | None = None
    seed: int = 0
    seeds: int = 1
    compile: bool = False
    bf16: bool = False

    def __post_init__(self):
        check_choice("budget", self.budget, BUDGETS)
        if self.data is not None:
            check_choice("data", self.data, DATASETS)
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or not (
                1 <= self.seeds <= 100):
            raise ConfigError(f"--seeds must be a number of runs per net from 1 to 100, got "
                              f"{self.seeds!r}")

    def each_seed(self) -> list["Options"]:
        """One Options per seed, each with `seeds` 1."""
        return [replace(self, seed=self.seed + k, seeds=1) for k in range(self.seeds)]

    @property
    def dataset(self) -> str:
        return self.data or ("cifar10" if self.budget == "full" else "digits")

    @property
    def tag(self) -> str:
        """What a run directory's name says about its schedule and seed: 'short-digits',
        'full-cifar10-seed2'."""
        return f"{self.budget}-{self.dataset}" + (f"-seed{self.seed}" if self.seed else "")


def run_config(model: str, options: Options) -> TrainConfig:
    """The config of one run of `model` under `options`."""
    if options.dataset == "cifar10":
        config = get_recipe("cifar10-paper", model).replace(data_dir=options.data_dir)
    else:
        # The paper's warm-up for ResNet-110 and deeper (lr 0.01 until the training error is
        # below 80%) applies on any data: at 0.1 from the start they barely move for a while.
        paper = get_recipe("cifar10-paper", model)
        config = get_recipe("digits", model).replace(
            warmup_until_error=paper.warmup_until_error, warmup_lr=paper.warmup_lr)
    if options.budget != "full":
        iterations, milestones, log, every, save = SCHEDULES[options.budget, options.dataset]
        config = config.replace(iterations=iterations, milestones=milestones, log_every=log,
                                eval_every=every, checkpoint_every=save)
    # The fast path is compiled steps on channels-last tensors (the layout tensor cores want);
    # without it the recipe's own layout stays, so the CPU numbers in docs/ are reproduced.
    return config.replace(recipe=f"reproduce-{options.tag}", device=options.device,
                          seed=options.seed, compile=options.compile, bf16=options.bf16,
                          channels_last=config.channels_last or options.compile)


def check_models(models, allowed: tuple[str, ...], experiment: str) -> tuple[str, ...]:
    """`models` (default `allowed`), each one of `allowed`, each once."""
    if models is None:
        return allowed
    models = tuple(dict.fromkeys(models))
    wrong = [m for m in models if m not in allowed]
    if wrong or not models:
        raise ConfigError(f"{experiment} trains {', '.join(allowed)}; --models "
                          f"{','.join(models) or '(none)'} is not among them")
    return tuple(models)
