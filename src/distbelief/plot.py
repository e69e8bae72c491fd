"""Error curves of several runs on one figure, in the style of the paper's Fig. 6:
training error dashed, test error bold, one colour per run, error in % against iterations, or
against wall-clock time or images processed (the view of the DistBelief paper's Fig. 4, to
compare single-process and Downpour runs)."""

from __future__ import annotations

import os
from pathlib import Path

from distbelief.engine.checkpoint import atomic_write
from distbelief.engine.rundir import RunDir, read_jsonl, record_number
from distbelief.errors import ConfigError, check_choice


X_AXES = {"iterations": "iterations", "wall": "wall-clock time (s)",
          "examples": "training images processed"}


def run_curves(run_dir: str | os.PathLike, x: str = "iterations") -> dict:
    """{'label', 'train': (xs, errors), 'test': (xs, errors)} of one run; `x` is
    'iterations', 'wall' (seconds) or 'examples' (images processed)."""
    check_choice("x axis", x, tuple(X_AXES))
    run = RunDir(run_dir)
    if not run.metrics_file.is_file():
        raise ConfigError(f"{run.path} is not a run directory (no metrics.jsonl)")
    config = run.read_config() if run.config_file.exists() else None
    if config is not None and config.loss == "mse":
        raise ConfigError(f"{run.path} is a regression run (--loss mse): it has no error "
                          f"curves; its losses are in metrics.jsonl (and --tensorboard)")
    records = read_jsonl(run.metrics_file)

    # Records without "examples" (single process, sync) count iterations of this many images.
    per_iteration = 0 if config is None else config.batch_size * (
        config.cluster.replicas if config.mode == "sync" else 1)

    def position(r: dict):
        if x == "wall":
            return r.get("wall_s")
        if x == "examples" and "examples" in r:
            return r["examples"]
        if x == "examples":
            it = record_number(r.get("iteration"))
            return None if it is None else it * per_iteration
        return r.get("iteration")

    def points(kind: str, split: str | None = None) -> list[tuple]:
        # Records a damaged line turned into something else (no number where one goes) are
        # left out. Sandblaster's train records hold the batch objective, not an error rate.
        chosen = [(position(r), r.get("error")) for r in records
                  if r.get("kind") == kind and r.get("split") == split]
        return [p for p in chosen if all(record_number(v) is not None for v in p)]

    train, test = points("train"), points("eval", "test")
    if not train and not test:
        raise ConfigError(f"{run.metrics_file} holds no training or test records yet")
    label = run.path.name
    if config is not None:
        label = config.model + {
            "downpour": f" ({'virtual ' if config.downpour.virtual else ''}Downpour "
                        f"x{config.cluster.replicas}, {config.optimizer})",
            "sandblaster": f" (Sandblaster L-BFGS x{config.cluster.replicas})"}.get(config.mode, "")
    return {"label": label, "train": tuple(zip(*train)) or ((), ()),
            "test": tuple(zip(*test)) or ((), ())}


def plot_runs(run_dirs, output: str | os.PathLike, title: str | None = None,
              x: str = "iterations") -> Path:
    """Draw the runs' error curves into `output` (PNG, PDF or SVG by suffix) against `x`
    (see `run_curves`); returns it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    curves = [run_curves(d, x) for d in run_dirs]
    labels = [c["label"] for c in curves]
    for curve, run_dir in zip(curves, run_dirs):
        if labels.count(curve["label"]) > 1:  # same model twice: tell the runs apart
            curve["label"] = f"{curve['label']} ({Path(run_dir).name})"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, curve in enumerate(curves):
        colour = f"C{i}"
        ax.plot(curve["train"][0], [100 * e for e in curve["train"][1]], "--", color=colour,
                linewidth=1)
        ax.plot(curve["test"][0], [100 * e for e in curve["test"][1]], "-", color=colour,
                linewidth=2.2, label=curve["label"])
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("error (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(title="dashed: training, bold: test", fontsize="small", title_fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    output = Path(output)
    fmt = output.suffix.lstrip(".").lower() or "png"
    if fmt not in ("png", "pdf", "svg"):
        raise ConfigError(f"cannot write {output}: choose a .png, .pdf or .svg file")
    atomic_write(output, lambda f: fig.savefig(f, format=fmt))
    plt.close(fig)
    return output
