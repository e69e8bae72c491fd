"""The paper's experiments: which runs each trains, and what its report compares.

Each experiment has `specs(options)` (the runs to train; shared between experiments through
their names, so `fig6` after `table6` in the same --out trains only the plain nets) and
`report(options, runs, folder)` (a `Report` from the finished runs).
"""

from __future__ import annotations

import json
from pathlib import Path

from distbelief.engine.checkpoint import atomic_write_text
from distbelief.engine.rundir import RunDir
from distbelief.models import summarize
from distbelief.plot import plot_runs
from distbelief.paper.budgets import Options, check_models, run_config
from distbelief.paper.report import (Check, Report, Stat, above, below, final_train_error,
                                     plot_responses)
from distbelief.paper.runner import RunSpec

# Table 1 / Sec. 3.3: torchvision's parameter counts (the paper prints none) and the paper's
# multiply-adds ("FLOPs"), printed with one decimal.
PAPER_TABLE1 = {"resnet18": (11_689_512, 1.8e9), "resnet34": (21_797_672, 3.6e9),
                "resnet50": (25_557_032, 3.8e9), "resnet101": (44_549_160, 7.6e9),
                "resnet152": (60_192_808, 11.3e9), "plain34": (None, 3.6e9)}
# Table 6: parameters (as printed) and CIFAR-10 test error in %.
PAPER_TABLE6 = {"resnet20": ("0.27M", 8.75), "resnet32": ("0.46M", 7.51),
                "resnet44": ("0.66M", 7.17), "resnet56": ("0.85M", 6.97),
                "resnet110": ("1.7M", 6.43), "resnet1202": ("19.4M", 7.93)}
MAC_TOLERANCE = 0.02  # the paper prints one decimal of GMACs (3.66 is printed 3.6)

SHORT_NOTE = ("Budget short: {schedule}. It shows orderings (what trains better than what), "
              "not the paper's error rates, which need the full schedule (--budget full) on "
              "CIFAR-10.")
MEDIUM_NOTE = ("Budget medium: {schedule}, long enough that the training errors of the nets "
               "that train have stopped falling (on the digits: the ResNets and plain-20, near "
               "0; ~12 min per seed for Fig. 7's five nets on 2 CPU cores). It shows the "
               "orderings at the end of training (degradation, the residual cure, the layer "
               "responses), not the paper's error rates, which need the full schedule "
               "(--budget full) on CIFAR-10.")
FULL_NOTE = "Budget full: {schedule}, the paper's schedule."
NOTES = {"short": SHORT_NOTE, "medium": MEDIUM_NOTE, "full": FULL_NOTE}


def budget_note(options: Options) -> str:
    c = run_config("resnet20", options)
    schedule = (f"{c.data}, {c.iterations:,} iterations of {c.batch_size}, lr {c.lr} / 10 at "
                f"{' and '.join(f'{m:,}' for m in c.milestones)}")
    return NOTES[options.budget].format(schedule=schedule)


def model_specs(models, options: Options) -> list[RunSpec]:
    """One run per model and seed."""
    return [RunSpec(f"{m}-{o.tag}", run_config(m, o)) for o in options.each_seed()
            for m in models]


def seed_runs(runs: Path, model: str, options: Options) -> list[Path]:
    """The run directories of `model`, one per seed."""
    return [runs / f"{model}-{o.tag}" for o in options.each_seed()]


def over_seeds(runs: Path, model: str, options: Options, measure) -> Stat:
    """`measure(run directory)` on each seed's run of `model`."""
    return Stat(tuple(measure(path) for path in seed_runs(runs, model, options)))


def _test_error(path: Path) -> float:
    return 100 * RunDir(path).read_summary()["test_error"]


def _seeds_note(options: Options) -> list[str]:
    if options.seeds == 1:
        return []
    return [f"Each net trained with {options.seeds} seeds ({options.seed} to "
            f"{options.seed + options.seeds - 1}): numbers are mean +- sample std over the "
            f"seeds (the std columns) and the best run; a claim 'holds' when the means are "
            f"ordered as the paper says by more than the two stds together, 'holds, within "
            f"the spread' when only the means are. Curves: the first seed's runs."]


def _depth(model: str) -> int:
    return int("".join(ch for ch in model if ch.isdigit()))


class Table1:
    name, title = "table1", "Table 1: parameters and multiply-adds of the ImageNet ResNets"
    models = tuple(PAPER_TABLE1)

    def specs(self, options: Options) -> list[RunSpec]:
        return []  # counted on the models themselves, nothing to train

    def report(self, options: Options, runs: Path, folder: Path) -> Report:
        report = Report(self.title, "Counted on the models built on the meta device (no "
                        "training); MACs of one 224x224 forward pass (BN, ReLU, pooling and "
                        "additions not counted, as in the paper).",
                        ("model", "params", "torchvision params", "GMACs",
                         "paper GMACs (1 decimal)", "gap %"))
        for name in check_models(options.models, self.models, self.name):
            row = summarize(name)
            params, macs = PAPER_TABLE1[name]
            gap = 100 * (row["macs"] - macs) / macs
            report.rows.append({"model": name, "params": row["params"],
                                "torchvision params": params, "GMACs": row["macs"] / 1e9,
                                "paper GMACs (1 decimal)": macs / 1e9, "gap %": gap})
            if params is not None:
                report.checks.append(Check(f"{name} has torchvision's {params:,} parameters",
                                           row["params"] == params, f"{row['params']:,}"))
            report.checks.append(Check(
                f"{name}: within {100 * MAC_TOLERANCE:.0f}% of the paper's {macs / 1e9:.1f} "
                f"GMACs (printed with one decimal)",
                abs(gap) <= 100 * MAC_TOLERANCE, f"{row['macs'] / 1e9:.2f}G, {gap:+.1f}%"))
        return report


class ModelRuns:
    """An experiment that trains one run per model: `models` (those --models may name) and
    `default` (those trained without --models; None: all of `models`)."""

    name: str
    models: tuple[str, ...]
    default: tuple[str, ...] | None = None

    def chosen(self, options: Options) -> tuple[str, ...]:
        if options.models is None and self.default is not None:
            return self.default
        return check_models(options.models, self.models, self.name)

    def specs(self, options: Options) -> list[RunSpec]:
        return model_specs(self.chosen(options), options)


class Table6(ModelRuns):
    name, title = "table6", "Table 6: CIFAR-10 test error of the ResNets"
    models = tuple(PAPER_TABLE6)
    default = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")

    def report(self, options: Options, runs: Path, folder: Path) -> Report:
        report = Report(self.title, budget_note(options),
                        ("model", "params", "paper params", "test error %", "std", "best %",
                         "paper %", "gap (points)"))
        errors = {}
        for model in self.chosen(options):
            errors[model] = stat = over_seeds(runs, model, options, _test_error)
            params_text, paper = PAPER_TABLE6[model]
            # A gap means something on the paper's data only (digits are not CIFAR-10).
            gap = stat.mean - paper if options.dataset == "cifar10" else None
            report.rows.append({"model": model, "params": summarize(model)["params"],
                                "paper params": params_text, "test error %": stat.mean,
                                "std": stat.spread, "best %": stat.best, "paper %": paper,
                                "gap (points)": gap})
            if options.dataset == "cifar10" and options.budget == "full":
                # The paper prints the best of its runs (ResNet-110: best of 5).
                report.checks.append(Check(f"{model} reaches the paper's {paper}% or better "
                                           f"(best run)", stat.best <= paper,
                                           f"best {stat.best:.2f}%, mean {stat.text()}%"))
        # 1202 layers overfit (Table 6): the paper's "deeper is better" holds up to 110.
        report.checks += _residual_checks({m: e for m, e in errors.items() if _depth(m) <= 110},
                                          "has lower test error than", "{:.2f}%")
        report.notes += _seeds_note(options)
        return report


class Fig6(ModelRuns):
    name, title = "fig6", "Fig. 6: training and test error of plain nets and ResNets"
    models = ("plain20", "plain32", "plain44", "plain56", "resnet20", "resnet32", "resnet44",
              "resnet56", "resnet110")

    def report(self, options: Options, runs: Path, folder: Path) -> Report:
        report = Report(self.title, budget_note(options),
                        ("model", "training error %", "training std", "best training %",
                         "test error %", "test std", "best test %"))
        train, test = {}, {}
        for model in self.chosen(options):
            train[model] = over_seeds(runs, model, options,
                                      lambda path: 100 * final_train_error(path))
            test[model] = over_seeds(runs, model, options, _test_error)
            report.rows.append({"model": model, "training error %": train[model].mean,
                                "training std": train[model].spread,
                                "best training %": train[model].best,
                                "test error %": test[model].mean, "test std": test[model].spread,
                                "best test %": test[model].best})
        first = options.each_seed()[0]
        for family in ("plain", "resnet"):
            names = [f"{m}-{first.tag}" for m in self.chosen(options) if m.startswith(family)]
            if names:
                png = f"fig6-{family}.png"
                plot_runs([runs / n for n in names], folder / png,
                          title=f"{'plain' if family == 'plain' else 'residual'} nets "
                                f"({first.tag})")
                report.figures.append(png)
        report.checks += _degradation_checks(train)
        report.notes.append("Paper (Fig. 6): plain-56 has higher training and test error than "
                            "plain-20 (plain-110 above 60%); ResNets get better with depth "
                            "(Table 6). Training error is the mean of the last 10% of the "
                            "training records, on augmented batches as in the paper. Deeper "
                            "ResNets are checked to train at least as well: on the digits "
                            "every ResNet's training error ends near 0, where 'better' is "
                            "noise.")
        report.notes += _seeds_note(options)
        return report


def _degradation_checks(train: dict[str, Stat]) -> list[Check]:
    checks = []
    plain = sorted((m for m in train if m.startswith("plain")), key=_depth)
    if len(plain) > 1:
        a, b = plain[0], plain[-1]
        checks.append(above(f"degradation: the deeper plain net trains worse ({b} above {a})",
                            train[b], train[a], "{:.2f}%"))
    return checks + _residual_checks(train, "trains better than", "{:.2f}%",
                                     deeper="trains at least as well as")


def _residual_checks(values: dict[str, Stat], verb: str, fmt: str, *,
                     deeper: str | None = None) -> list[Check]:
    """Lower is better: each ResNet against its plain twin ("resnet20 VERB plain20"), and
    each deeper ResNet against the shallowest ("deeper: resnet56 VERB resnet20"; with
    `deeper`, that verb instead, meaning at least as well)."""
    checks = []
    for model in values:
        twin = "plain" + model[len("resnet"):]
        if model.startswith("resnet") and twin in values:
            checks.append(below(f"{model} {verb} {twin}", values[model], values[twin], fmt))
    resnets = sorted((m for m in values if m.startswith("resnet")), key=_depth)
    for b in resnets[1:]:
        a = resnets[0]
        checks.append(below(f"deeper: {b} {deeper or verb} {a}", values[b], values[a], fmt,
                            or_equal=deeper is not None))
    return checks


class Fig7(ModelRuns):
    name, title = "fig7", "Fig. 7: standard deviations of the layer responses"
    models = ("plain20", "plain56", "resnet20", "resnet56", "resnet110")

    def report(self, options: Options, runs: Path, folder: Path) -> Report:
        report = Report(self.title, budget_note(options),
                        ("model", "layers", "mean std", "spread", "max std"))
        curves, means = {}, {}
        for model in self.chosen(options):
            per_seed = [[r["std"] for r in _responses(path, folder, path.name, options.device)]
                        for path in seed_runs(runs, model, options)]
            curves[model] = [sum(layer) / len(layer) for layer in zip(*per_seed)]
            means[model] = Stat(tuple(sum(s) / len(s) for s in per_seed))
            report.rows.append({"model": model, "layers": len(curves[model]),
                                "mean std": means[model].mean, "spread": means[model].spread,
                                "max std": max(max(s) for s in per_seed)})
        plot_responses(curves, folder / "fig7.png")
        report.figures.append("fig7.png")
        report.checks += _residual_checks(means, "responds less than", "{:.3f}")
        report.notes.append("Paper (Fig. 7): ResNets have generally smaller responses than "
                            "their plain counterparts, and deeper ResNets smaller still. "
                            "Responses: outputs of each 3x3 layer after BN, before ReLU or "
                            "addition, on the test split ('distbelief analyze responses'). "
                            "With several seeds: 'mean std' and the curves average the "
                            "seeds, 'spread' is the std of the runs' mean stds.")
        report.notes += _seeds_note(options)
        return report


def _responses(path: Path, folder: Path, name: str, device: str) -> list[dict]:
    """The layer responses of a finished run on `device`, measured once and kept in `folder`
    (measured again if the run's checkpoint is newer)."""
    cache, checkpoint = folder / f"responses-{name}.json", RunDir(path).checkpoint
    if cache.is_file() and cache.stat().st_mtime >= checkpoint.stat().st_mtime:
        return json.loads(cache.read_text())
    from distbelief.engine import load_for_eval
    from distbelief.paper.responses import layer_responses

    model, data, config = load_for_eval(checkpoint, {"device": device})
    responses = layer_responses(model, data.splits["test"].batches(),
                                channels_last=config.channels_last)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(responses, indent=1) + "\n")
    return responses


class Downpour:
    name = "downpour"
    title = "DistBelief Fig. 4 at reduced scale: error against time and examples"
    schemes = ("single", "downpour", "downpour-adagrad", "sandblaster")

    def specs(self, options: Options) -> list[RunSpec]:
        if options.models not in (None, ("mlp",)):
            raise_models(self.name)
        # A dense net, as the paper's speech model, so that Sandblaster applies (no BN); no
        # augmentation, which a dense net cannot use (a shifted digit is a new input to it).
        base = run_config("mlp", options).replace(compile=False, augment=False)
        cluster = {"replicas": 2, "ps_shards": 2}
        configs = {
            "single": base,
            # The recipe's momentum: the shards correct for staleness (--staleness-rule).
            "downpour": base.replace(mode="downpour", **cluster),
            # Adagrad on the shards, as the paper's best Downpour (its rate is not SGD's).
            "downpour-adagrad": base.replace(mode="downpour", optimizer="adagrad", lr=0.05,
                                             milestones=(), **cluster),
            "sandblaster": base.replace(mode="sandblaster", batch_size=0, lr=1.0,
                                        iterations=100 if options.budget == "short" else 500,
                                        milestones=(), weight_decay=1e-4,
                                        log_every=10, eval_every=25, checkpoint_every=50,
                                        **cluster)}
        return [RunSpec(f"mlp-{scheme}-{options.tag}", configs[scheme])
                for scheme in self.schemes]

    def report(self, options: Options, runs: Path, folder: Path) -> Report:
        report = Report(self.title, budget_note(options) + " Model: an MLP (one tanh layer "
                        "of 256), dense like the paper's speech model, so that Sandblaster "
                        "L-BFGS applies too.",
                        ("scheme", "test error %", "wall s", "images/s"))
        specs = self.specs(options)
        for scheme, spec in zip(self.schemes, specs):
            summary = RunDir(runs / spec.name).read_summary()
            report.rows.append({"scheme": scheme, "test error %": 100 * summary["test_error"],
                                "wall s": summary["wall_s"],
                                "images/s": summary.get("images_per_s")})
            report.checks.append(Check(f"{scheme} learns: test error below half of chance",
                                       summary["test_error"] < 0.45,
                                       f"{100 * summary['test_error']:.2f}%"))
        for x in ("wall", "examples"):
            png = f"downpour-{x}.png"
            plot_runs([runs / s.name for s in specs], folder / png, x=x,
                      title=f"MLP on {options.dataset}: error against "
                            f"{'wall time' if x == 'wall' else 'images processed'}")
            report.figures.append(png)
        report.notes.append(
            "Paper (Fig. 4, 42M-parameter speech model, up to 2,000 cores): single SGD is "
            "slowest, then Downpour, Downpour + Adagrad, Sandblaster L-BFGS; the cluster "
            "reached the GPU baseline's accuracy in under a tenth of its time. On a few cores "
            "the replicas share the cores the single process has alone, so this view shows "
            "the schemes' behaviour, not the paper's speed-up.")
        return report


def raise_models(experiment: str):
    from distbelief.errors import ConfigError

    raise ConfigError(f"{experiment} has its own runs; --models does not apply to it")


def _experiments() -> dict:
    from distbelief.paper.fig4 import Fig4

    return {e.name: e for e in (Table1(), Table6(), Fig6(), Fig7(), Downpour(), Fig4())}


EXPERIMENTS = _experiments()
