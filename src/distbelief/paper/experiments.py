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
from distbelief.paper.report import Check, Report, final_train_error, plot_responses
from distbelief.paper.runner import RunSpec

# Table 1 / Sec. 3.3: multiply-adds (the paper's "FLOPs") and torchvision's parameter counts.
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
FULL_NOTE = "Budget full: {schedule}, the paper's schedule."


def budget_note(options: Options) -> str:
    c = run_config("resnet20", options)
    schedule = (f"{c.data}, {c.iterations:,} iterations of {c.batch_size}, lr {c.lr} / 10 at "
                f"{' and '.join(f'{m:,}' for m in c.milestones)}")
    return (SHORT_NOTE if options.budget == "short" else FULL_NOTE).format(schedule=schedule)


def model_specs(models, options: Options) -> list[RunSpec]:
    return [RunSpec(f"{m}-{options.tag}", run_config(m, options)) for m in models]


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
                        ("model", "params", "paper params", "GMACs", "paper GMACs", "gap %"))
        for name in check_models(options.models, self.models, self.name):
            row = summarize(name)
            params, macs = PAPER_TABLE1[name]
            gap = 100 * (row["macs"] - macs) / macs
            report.rows.append({"model": name, "params": row["params"], "paper params": params,
                                "GMACs": row["macs"] / 1e9, "paper GMACs": macs / 1e9,
                                "gap %": gap})
            if params is not None:
                report.checks.append(Check(f"{name} has torchvision's {params:,} parameters",
                                           row["params"] == params, f"{row['params']:,}"))
            report.checks.append(Check(
                f"{name}: {macs / 1e9:.1f} GMACs as printed in the paper",
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
                        ("model", "params", "paper params", "test error %", "paper %",
                         "gap (points)"))
        errors = {}
        for spec, model in zip(self.specs(options), self.chosen(options)):
            summary = RunDir(runs / spec.name).read_summary()
            errors[model] = 100 * summary["test_error"]
            params_text, paper = PAPER_TABLE6[model]
            # A gap means something on the paper's data only (digits are not CIFAR-10).
            gap = errors[model] - paper if options.dataset == "cifar10" else None
            report.rows.append({"model": model, "params": summarize(model)["params"],
                                "paper params": params_text, "test error %": errors[model],
                                "paper %": paper, "gap (points)": gap})
            if options.dataset == "cifar10" and options.budget == "full":
                report.checks.append(Check(f"{model} reaches the paper's {paper}% or better",
                                           errors[model] <= paper, f"{errors[model]:.2f}%"))
        # 1202 layers overfit (Table 6): the paper's "deeper is better" holds up to 110.
        report.checks += _residual_checks({m: e for m, e in errors.items() if _depth(m) <= 110},
                                          "has lower test error", "{:.2f}% vs {:.2f}%")
        return report


class Fig6(ModelRuns):
    name, title = "fig6", "Fig. 6: training and test error of plain nets and ResNets"
    models = ("plain20", "plain32", "plain44", "plain56", "resnet20", "resnet32", "resnet44",
              "resnet56", "resnet110")

    def report(self, options: Options, runs: Path, folder: Path) -> Report:
        report = Report(self.title, budget_note(options),
                        ("model", "training error %", "test error %"))
        train, test = {}, {}
        for spec, model in zip(self.specs(options), self.chosen(options)):
            train[model] = 100 * final_train_error(runs / spec.name)
            test[model] = 100 * RunDir(runs / spec.name).read_summary()["test_error"]
            report.rows.append({"model": model, "training error %": train[model],
                                "test error %": test[model]})
        for family in ("plain", "resnet"):
            names = [s.name for s, m in zip(self.specs(options), self.chosen(options))
                     if m.startswith(family)]
            if names:
                png = f"fig6-{family}.png"
                plot_runs([runs / n for n in names], folder / png,
                          title=f"{'plain' if family == 'plain' else 'residual'} nets "
                                f"({options.tag})")
                report.figures.append(png)
        report.checks += _degradation_checks(train)
        report.notes.append("Paper (Fig. 6): plain-56 has higher training and test error than "
                            "plain-20 (plain-110 above 60%); ResNets get better with depth "
                            "(Table 6). Training error is the mean of the last 10% of the "
                            "training records, on augmented batches as in the paper.")
        return report


def _degradation_checks(train: dict[str, float]) -> list[Check]:
    checks = []
    plain = sorted((m for m in train if m.startswith("plain")), key=_depth)
    if len(plain) > 1:
        a, b = plain[0], plain[-1]
        checks.append(Check(f"degradation: the deeper plain net trains worse ({b} above {a})",
                            train[b] > train[a], f"{train[b]:.2f}% vs {train[a]:.2f}%"))
    return checks + _residual_checks(train, "trains better", "{:.2f}% vs {:.2f}%")


def _residual_checks(values: dict[str, float], verb: str, detail: str) -> list[Check]:
    """Lower is better: each ResNet against its plain twin ("resnet20 VERB than plain20"),
    and the deepest ResNet against the shallowest ("deeper: resnet110 VERB than resnet20")."""
    checks = []
    for model in values:
        twin = "plain" + model[len("resnet"):]
        if model.startswith("resnet") and twin in values:
            checks.append(Check(f"{model} {verb} than {twin}", values[model] < values[twin],
                                detail.format(values[model], values[twin])))
    resnets = sorted((m for m in values if m.startswith("resnet")), key=_depth)
    if len(resnets) > 1:
        a, b = resnets[0], resnets[-1]
        checks.append(Check(f"deeper: {b} {verb} than {a}", values[b] < values[a],
                            detail.format(values[b], values[a])))
    return checks


class Fig7(ModelRuns):
    name, title = "fig7", "Fig. 7: standard deviations of the layer responses"
    models = ("plain20", "plain56", "resnet20", "resnet56", "resnet110")

    def report(self, options: Options, runs: Path, folder: Path) -> Report:
        report = Report(self.title, budget_note(options),
                        ("model", "layers", "mean std", "max std"))
        curves = {}
        for spec, model in zip(self.specs(options), self.chosen(options)):
            stds = [r["std"] for r in _responses(runs / spec.name, folder, spec.name,
                                                 options.device)]
            curves[model] = stds
            report.rows.append({"model": model, "layers": len(stds),
                                "mean std": sum(stds) / len(stds), "max std": max(stds)})
        plot_responses(curves, folder / "fig7.png")
        report.figures.append("fig7.png")
        means = {m: sum(s) / len(s) for m, s in curves.items()}
        report.checks += _residual_checks(means, "responds less", "mean std {:.3f} vs {:.3f}")
        report.notes.append("Paper (Fig. 7): ResNets have generally smaller responses than "
                            "their plain counterparts, and deeper ResNets smaller still. "
                            "Responses: outputs of each 3x3 layer after BN, before ReLU or "
                            "addition, on the test split ('distbelief analyze responses').")
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


EXPERIMENTS = {e.name: e for e in (Table1(), Table6(), Fig6(), Fig7(), Downpour())}
