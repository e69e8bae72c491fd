"""What one run of an experiment trains: the recipe, scaled by the budget.

- `full`: the paper's schedules unchanged (CIFAR-10: `cifar10-paper`, 64k iterations of 128,
  lr / 10 at 32k and 48k; ResNet-110 warms up). Hours per network on a GPU, days on a CPU.
- `short`: minutes on a laptop CPU. On the 8x8 digits (the default for short, built in, no
  download) the `digits` recipe cut to 600 iterations of 64 (lr / 10 at 400 and 500), with the
  paper's warm-up for ResNet-110 and deeper; on
  CIFAR-10 the paper's recipe cut to 2,000 iterations (lr / 10 at 1,000 and 1,500), 1/32 of the
  schedule. It shows orderings (deeper plain nets train worse, residual responses are smaller),
  not the paper's error rates.
"""

from __future__ import annotations

from dataclasses import dataclass

from distbelief.engine.config import TrainConfig
from distbelief.errors import ConfigError, check_choice
from distbelief.recipes import get_recipe

BUDGETS = ("short", "full")
DATASETS = ("digits", "cifar10")


@dataclass(frozen=True)
class Options:
    """How an experiment's runs are trained. `data` None: the budget's (short: digits, full:
    cifar10). `models` None: the experiment's own list."""

    budget: str = "short"
    data: str | None = None
    data_dir: str = "data/cifar-10-batches-py"
    device: str = "auto"
    models: tuple[str, ...] | None = None
    seed: int = 0
    compile: bool = False
    bf16: bool = False

    def __post_init__(self):
        check_choice("budget", self.budget, BUDGETS)
        if self.data is not None:
            check_choice("data", self.data, DATASETS)

    @property
    def dataset(self) -> str:
        return self.data or ("digits" if self.budget == "short" else "cifar10")

    @property
    def tag(self) -> str:
        """What a run directory's name says about its schedule and seed: 'short-digits',
        'full-cifar10-seed2'."""
        return f"{self.budget}-{self.dataset}" + (f"-seed{self.seed}" if self.seed else "")


def run_config(model: str, options: Options) -> TrainConfig:
    """The config of one run of `model` under `options`."""
    if options.dataset == "cifar10":
        config = get_recipe("cifar10-paper", model).replace(data_dir=options.data_dir)
        if options.budget == "short":
            config = config.replace(iterations=2000, milestones=(1000, 1500), log_every=50,
                                    eval_every=500, checkpoint_every=500)
    else:
        # The paper's warm-up for ResNet-110 and deeper (lr 0.01 until the training error is
        # below 80%) applies on any data: at 0.1 from the start they barely move for a while.
        paper = get_recipe("cifar10-paper", model)
        config = get_recipe("digits", model).replace(
            warmup_until_error=paper.warmup_until_error, warmup_lr=paper.warmup_lr)
        if options.budget == "short":
            config = config.replace(iterations=600, milestones=(400, 500), log_every=20,
                                    eval_every=100, checkpoint_every=300)
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
