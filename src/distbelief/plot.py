"""Error curves of several runs on one figure, in the style of the paper's Fig. 6:
training error dashed, test error bold, one colour per run, error in % against iterations."""

from __future__ import annotations

import os
from pathlib import Path

from distbelief.engine.checkpoint import atomic_write
from distbelief.engine.rundir import RunDir, read_jsonl
from distbelief.errors import ConfigError


def run_curves(run_dir: str | os.PathLike) -> dict:
    """{'label', 'train': (iterations, errors), 'test': (iterations, errors)} of one run."""
    run = RunDir(run_dir)
    if not run.metrics_file.is_file():
        raise ConfigError(f"{run.path} is not a run directory (no metrics.jsonl)")
    records = read_jsonl(run.metrics_file)
    train = [(r["iteration"], r["error"]) for r in records if r.get("kind") == "train"]
    test = [(r["iteration"], r["error"]) for r in records
            if r.get("kind") == "eval" and r.get("split") == "test"]
    if not train and not test:
        raise ConfigError(f"{run.metrics_file} holds no training or test records yet")
    label = run.read_config().model if run.config_file.exists() else run.path.name
    return {"label": label, "train": tuple(zip(*train)) or ((), ()),
            "test": tuple(zip(*test)) or ((), ())}


def plot_runs(run_dirs, output: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the runs' error curves into `output` (PNG, PDF or SVG by suffix); returns it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    curves = [run_curves(d) for d in run_dirs]
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
    ax.set_xlabel("iterations")
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
