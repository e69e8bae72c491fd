"""DistBelief's Fig. 4 on the virtual cluster (`distbelief reproduce fig4`): time to a fixed test
error for 1 to 64 Downpour replicas (SGD and Adagrad on the shards) and Sandblaster L-BFGS
(`fig4_sandblaster`), against the single process.

What is measured and what is simulated. Every run trains for real: the replicas' gradients,
the shards' updates and the test errors are computed. The clock is simulated (`--virtual`):
every push and fetch crosses a 10 Gbit/s, 50 us link of its own node, each shard serves one
request at a time in the time its update takes here (measured), and a replica computes a step
in the time one step takes on this machine (measured at each run's start: the "measured"
regime) or in 100 ms (the "compute-bound" regime: a model whose step dwarfs a shard's update,
as the paper's did). So the times are those of a cluster of such machines, one replica per
machine, which a laptop cannot have; the single process's time is real. Schemes: Downpour SGD
with our default staleness rule (dana+lr), and Downpour with Adagrad on the shards and no
staleness rule, as the paper's.

On the digits (the default) the model is the `downpour` experiment's MLP (dense, like the
paper's speech model), at batches of 16 so that 64 replicas each hold a slice of the 1,437
training images larger than a batch; every run trains the same number of minibatches (over
all its replicas), evaluating the test split every 50 of them. On CIFAR-10 (--data cifar10)
the model is ResNet-20 with the paper's recipe, 2,000 minibatches (medium: 8,000): hours on a
CPU.
"""

from __future__ import annotations

from pathlib import Path

from distbelief.engine.rundir import RunDir, read_jsonl
from distbelief.paper.budgets import Options, run_config
from distbelief.paper.fig4_sandblaster import round_seconds, trajectory
from distbelief.paper.report import Check, Report
from distbelief.paper.runner import RunSpec
from distbelief.plot import plot_runs

REPLICAS = (1, 2, 4, 8, 16, 32, 64)
SCHEMES = ("downpour", "downpour-adagrad")
# Cost regimes: this machine's measured costs, and a replica step of 100 ms (a model whose
# compute dwarfs a shard's update, as the paper's did) with the same measured shards and links.
REGIMES = {"measured": {}, "compute-bound": {"virtual_step_ms": 100.0}}
# (minibatches, test error target) per data and budget.
PLAN = {("digits", "short"): (4000, 0.05), ("digits", "medium"): (12000, 0.04),
        ("digits", "full"): (12000, 0.04), ("cifar10", "short"): (2000, 0.6),
        ("cifar10", "medium"): (8000, 0.35), ("cifar10", "full"): (32000, 0.2)}


def _base(options: Options):
    minibatches, _ = PLAN[options.dataset, options.budget]
    if options.dataset == "cifar10":
        base = run_config("resnet20", options)
        cadence = {"eval_every": 250, "log_every": 50}
    else:
        base = run_config("mlp", options).replace(augment=False, batch_size=16)
        cadence = {"eval_every": 50, "log_every": 50}
    return base.replace(iterations=minibatches, milestones=(), checkpoint_every=minibatches,
                        compile=False, **cadence)


# Our default (SGD with momentum, --staleness-rule dana+lr), and the paper's Adagrad, which
# corrects for no staleness.
SCHEME = {"downpour": {}, "downpour-adagrad": {"optimizer": "adagrad", "lr": 0.05,
                                               "staleness_rule": "none"}}


def _name(scheme: str, regime: str, n: int, options: Options) -> str:
    return f"fig4-{scheme}-{regime}-x{n}-{options.tag}"


class Fig4:
    name = "fig4"
    title = ("DistBelief Fig. 4 on a virtual cluster: time to a fixed test error for 1 to 64 "
             "Downpour replicas")

    def specs(self, options: Options) -> list[RunSpec]:
        from distbelief.paper.experiments import raise_models

        if options.models is not None:
            raise_models(self.name)
        base = _base(options)
        specs = [RunSpec(f"fig4-single-{options.tag}", base)]
        for regime, costs in REGIMES.items():
            for scheme in SCHEMES:
                specs += [RunSpec(_name(scheme, regime, n, options),
                                  base.replace(mode="downpour", replicas=n, ps_shards=2,
                                               virtual=True, **SCHEME[scheme], **costs))
                          for n in REPLICAS]
        return specs

    def report(self, options: Options, runs: Path, folder: Path) -> Report:
        _, target = PLAN[options.dataset, options.budget]
        specs = self.specs(options)
        report = Report(self.title, _note(options, target),
                        ("scheme", "replicas", "time to target s", "minibatches to target",
                         "speed-up", "final test error %", "mean staleness", "real s"))
        single = _reached(runs / specs[0].name, target)
        report.rows.append({"scheme": "single process (real time)", "replicas": 1,
                            **_row(single, None)})
        curves = {}
        for regime in REGIMES:
            for scheme in SCHEMES:
                found = [(n, _reached(runs / _name(scheme, regime, n, options), target))
                         for n in REPLICAS]
                one, label = found[0][1], f"{scheme}, {regime}"
                curves[label] = [(n, _speedup(one, r)) for n, r in found]
                for (n, r), (_, up) in zip(found, curves[label]):
                    report.rows.append({"scheme": f"{label} (simulated)", "replicas": n,
                                        **_row(r, up)})
                report.checks += _checks(label, curves[label])
        blaster = _base(options).replace(mode="sandblaster", batch_size=0, lr=1.0, history=10,
                                         replicas=1, ps_shards=2)
        found = trajectory(blaster, target)  # the same in every regime: computed once
        for regime in REGIMES:
            label = f"sandblaster L-BFGS, {regime}"
            rows, curves[label] = _sandblaster(options, runs, regime, blaster, found)
            report.rows += rows
            report.checks += _checks(label, curves[label])[:1]
        _speedup_figure(curves, folder / "fig4-speedup.png")
        report.figures.append("fig4-speedup.png")
        plot_runs([runs / _name("downpour", "compute-bound", n, options) for n in REPLICAS],
                  folder / "fig4-wall.png", x="wall",
                  title=f"Downpour SGD on {options.dataset}, 100 ms steps: test error against "
                        f"simulated time")
        report.figures.append("fig4-wall.png")
        # Each note its own paragraph.
        report.notes += [note + "\n" for note in
                         [_saturation(runs / _name("downpour", "measured", 1, options)),
                          *_notes()] if note]
        return report


def _sandblaster(options: Options, runs: Path, regime: str, config, found: dict) -> tuple:
    """Sandblaster L-BFGS's rows and speed-up curve in `regime` (`fig4_sandblaster`): its
    trajectory `found` under `config` (its numbers do not depend on the replicas), each
    round's time at N replicas simulated with the regime's step time per example and the
    shards' measured push time (from that regime's one-replica Downpour run)."""
    costs = RunDir(runs / _name("downpour", regime, 1, options)).read_summary()["virtual"]
    example_s = costs["step_s"] / _base(options).batch_size
    push_s = max(costs["shard_push_s"])
    times = {}
    for n in REPLICAS:
        times[n] = None if found["rounds"] is None else sum(
            round_seconds(config, n, example_s, push_s, i, found["values"], found["examples"])
            for i in range(found["rounds"]))
    rows = [{"scheme": f"sandblaster L-BFGS, {regime} (simulated)", "replicas": n,
             "time to target s": "not reached" if t is None else round(t, 3),
             "minibatches to target": "not reached" if t is None else
             f"{found['rounds']} rounds of {found['examples']:,} examples",
             "speed-up": None if t is None else round(times[1] / t, 2),
             "final test error %": round(100 * found["final"], 2), "mean staleness": 0.0,
             "real s": round(found["real_s"], 1)} for n, t in times.items()]
    return rows, [(n, None if t is None else times[1] / t) for n, t in times.items()]


def _reached(path: Path, target: float) -> dict:
    """When run `path` first evaluated at or below `target` test error: {"time", "minibatches"}
    (None when it never did), its final test error, mean staleness, step time and real time."""
    records = read_jsonl(RunDir(path).metrics_file)
    tests = [r for r in records if r.get("kind") == "eval" and r.get("split") == "test"]
    hit = next((r for r in tests if r["error"] <= target), None)
    summary = RunDir(path).read_summary()
    return {"time": hit and hit["wall_s"], "minibatches": hit and hit["iteration"],
            "final": tests[-1]["error"] if tests else None,
            "staleness": summary.get("staleness_mean"),
            "step_s": (summary.get("virtual") or {}).get("step_s"),
            "real": summary.get("real_wall_s", summary.get("wall_s"))}


def _speedup(one: dict, run: dict) -> float | None:
    """Time to target of one virtual replica over this run's, each in units of its own
    measured step (so that the measurement's noise between runs cancels)."""
    if one["time"] is None or run["time"] is None:
        return None
    return (one["time"] / one["step_s"]) / (run["time"] / run["step_s"])


def _row(r: dict, speedup: float | None) -> dict:
    return {"time to target s": "not reached" if r["time"] is None else round(r["time"], 3),
            "minibatches to target": r["minibatches"] or "not reached",
            "speed-up": None if speedup is None else round(speedup, 2),
            "final test error %": None if r["final"] is None else round(100 * r["final"], 2),
            "mean staleness": r["staleness"], "real s": round(r["real"], 1)}


def _checks(scheme: str, curve: list[tuple]) -> list[Check]:
    ups = {n: up for n, up in curve if up is not None}
    if not ups:
        return [Check(f"{scheme}: some replica count reaches the target", False, "none does")]
    best = max(ups, key=ups.get)
    efficiency = {n: up / n for n, up in ups.items()}
    return [
        Check(f"{scheme}: more replicas reach the target sooner (clearly: 1.5x or more)",
              best > 1 and ups[best] >= 1.5, f"best: {ups[best]:.2f}x at {best} replicas"),
        Check(f"{scheme}: beyond that, staleness costs more than the replicas bring (each "
              f"replica adds less)", efficiency[best] < efficiency.get(2, 1.0),
              ", ".join(f"{n}: {efficiency[n]:.2f}" for n in sorted(efficiency)) +
              " (speed-up per replica)")]


def _speedup_figure(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distbelief.engine.checkpoint import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot(REPLICAS, REPLICAS, ":", color="grey", label="linear")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    for scheme, curve in curves.items():
        points = [(n, up) for n, up in curve if up is not None]
        if points:
            ax.plot(*zip(*points), "o-", label=scheme)
    ax.set(xscale="log", yscale="log", xlabel="replicas", ylabel="speed-up to the target",
           title="Time to a fixed test error, against one replica (simulated)")
    ax.set_xticks(REPLICAS, [str(n) for n in REPLICAS])
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _note(options: Options, target: float) -> str:
    minibatches, _ = PLAN[options.dataset, options.budget]
    return (f"Budget {options.budget}, {options.dataset}: every run trains {minibatches:,} "
            f"minibatches over all its replicas; the target is {100 * target:g}% test error. "
            f"Replicas and shards run on a virtual cluster (--virtual): every gradient and "
            f"update is computed, only the clock is simulated from costs measured on this "
            f"machine (docs/downpour.md, 'A virtual cluster').")


def _saturation(one: Path) -> str:
    """Where this machine's measured costs put the parameter server's limit."""
    costs = RunDir(one).read_summary().get("virtual", {})
    step, push = costs.get("step_s"), max(costs.get("shard_push_s") or [0.0])
    if not step or not push:
        return ""
    return (f"Measured here: a replica's step takes {1e3 * step:.3g} ms and a shard applies a "
            f"push in {1e3 * push:.3g} ms. Every replica pushes to every shard once a step, so "
            f"beyond about {step / push:.0f} replicas the shards cannot keep up: pushes queue, "
            f"staleness grows far beyond the replicas' count (the mean staleness column) and "
            f"more replicas stop helping however the update rule treats staleness. With "
            f"100 ms steps (compute-bound) the same shards serve {0.1 / push:.0f} replicas.")


def _notes() -> list[str]:
    return [
        "What is simulated: the time of each replica's step (this machine's, measured at the "
        "run's start, or 100 ms; spread 10%), of each message (10 Gbit/s and 50 us per node) "
        "and of each shard's update (measured). What is measured: everything else, the "
        "errors above included. Speed-ups count each run's time in its own measured steps, so the "
        "measurement's noise between runs cancels.",
        "Paper (Fig. 4, 42M-parameter speech model): Downpour with more replicas reaches a "
        "given accuracy sooner, Adagrad more so, up to where more replicas stop helping; the "
        "cluster reached the GPU's accuracy in a tenth of its time.",
        "Sandblaster L-BFGS (full batch, history 10): its rounds compute the batch's exact "
        "gradient whatever the replica count, so its trajectory is computed once, for real, "
        "and each round's time at N replicas is simulated (portions handed to the replica "
        "free first, x fetched and gradients pushed over the same links, the shards' measured "
        "push time, the coordinator's round trips; backup tasks not simulated). Few rounds, "
        "each a pass over the training set: slow with one replica, and close to linear in "
        "the replicas as long as a portion's compute outweighs its round trip; "
        "`reproduce downpour` runs it for real on Ray."]
