"""The paper, reproduced: `distbelief reproduce EXPERIMENT` and `distbelief.reproduce(...)`.

    OUT/runs/MODEL-BUDGET-DATA/   every run's directory (shared by the experiments)
    OUT/EXPERIMENT/report.md      our numbers and figures beside the paper's, with the gaps
    OUT/EXPERIMENT/results.json   the same for programs; OUT/EXPERIMENT/*.png the figures

Experiments: table1 (parameters and multiply-adds), table6 (CIFAR-10 ResNets), fig6 (error
curves of plain nets and ResNets), fig7 (layer responses), downpour (DistBelief Fig. 4 at
reduced scale), fig4 (DistBelief Fig. 4, 1 to 64 replicas on a virtual cluster).
Interrupting and rerunning continues the unfinished runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from distbelief.errors import ConfigError, check_choice
from distbelief.paper.budgets import BUDGETS, Options
from distbelief.paper.experiments import EXPERIMENTS
from distbelief.paper.responses import layer_responses
from distbelief.paper.runner import Runner

__all__ = ["reproduce", "layer_responses", "EXPERIMENTS", "BUDGETS", "Options"]


def reproduce(experiment: str, out: str | os.PathLike = "reproduction", *,
              budget: str = "short", data: str | None = None,
              data_dir: str = "data/cifar-10-batches-py", device: str = "auto",
              models=None, parallel: int = 1, compile: bool = False, bf16: bool = False,
              seed: int = 0, seeds: int = 1, say: Callable[[str], None] = print,
              progress: bool = False) -> dict:
    """Train what `experiment` needs into OUT/runs (skipping finished runs, resuming
    unfinished ones), then write OUT/EXPERIMENT/report.md, results.json and the figures.
    Returns results.json's content plus "report" (the report's path).

    Args:
        budget: "short" (minutes on a laptop CPU; digits by default), "medium" (until the
            training errors stop falling; digits by default, ~12 min per seed for Fig. 7's
            nets on 2 cores) or "full" (the paper's schedule; CIFAR-10).
        data: "digits" or "cifar10" (default: the budget's); data_dir: the CIFAR-10 folder.
        models: a subset of the experiment's models (names), default all of them.
        parallel: trainings side by side (processes; several small nets on one GPU).
        seed, seeds: the first seed and how many runs of each net (seeds seed .. seed +
            seeds - 1; table6, fig6 and fig7 report mean +- std and the best run).
        compile, bf16: the GPU fast path (`--compile`, bfloat16 autocast) for every run.

    Raises:
        ConfigError: an unknown experiment, budget, data or model (nothing is written).
        TrainingInterrupted: Ctrl-C or SIGTERM (the runs are checkpointed; call again).
    """
    check_choice("experiment", experiment, tuple(EXPERIMENTS))
    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"--parallel must be a positive number of runs, got {parallel}")
    models = tuple(models) if models is not None else None
    options = Options(budget=budget, data=data, data_dir=data_dir, device=device,
                      models=models, seed=seed, seeds=seeds, compile=compile, bf16=bf16)
    kind = EXPERIMENTS[experiment]
    if options.seeds > 1 and experiment in ("table1", "downpour", "fig4"):
        raise ConfigError(f"--seeds applies to table6, fig6 and fig7; {experiment} has one run "
                          f"per scheme")
    specs = kind.specs(options)  # every config is built, and so validated, before any run
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if specs and options.dataset == "cifar10" and not Path(data_dir).is_dir():
        raise ConfigError(f"CIFAR-10 folder {data_dir} does not exist; give --data-dir (the "
                          f"official cifar-10-batches-py folder; 'distbelief train --data "
                          f"cifar10 --download' fetches it)")
    Runner(out / "runs", parallel, say, progress).run(specs)
    report = kind.report(options, out / "runs", out / experiment)
    path = report.write(out / experiment)
    results = {"report": str(path), "title": report.title, "rows": report.rows,
               "checks": report.check_dicts(), "figures": report.figures}
    return results
