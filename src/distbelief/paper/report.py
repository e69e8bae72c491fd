"""What a reproduction writes: report.md (our numbers beside the paper's, with the gap and the
orderings the paper claims, each marked as holding or not), results.json (the same, for
programs and tests) and the figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from distbelief.engine.checkpoint import atomic_write, atomic_write_text
from distbelief.engine.rundir import RunDir, read_jsonl


@dataclass
class Check:
    """One of the paper's claims, tested on our runs."""

    claim: str
    holds: bool
    detail: str = ""


@dataclass
class Report:
    title: str
    budget_note: str
    columns: tuple[str, ...] = ()
    rows: list[dict] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", self.budget_note, ""]
        if self.rows:
            lines += ["| " + " | ".join(self.columns) + " |",
                      "|" + "---|" * len(self.columns)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in self.columns) + " |"
                      for r in self.rows]
            lines.append("")
        for figure in self.figures:
            lines += [f"![{figure}]({figure})", ""]
        if self.checks:
            lines += ["## The paper's claims on these runs", ""]
            lines += [f"- {'holds' if c.holds else 'does NOT hold'}: {c.claim}"
                      + (f" ({c.detail})" if c.detail else "") for c in self.checks]
            lines.append("")
        lines += [f"{note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def write(self, folder: Path) -> Path:
        """report.md and results.json into `folder`, each atomically; returns report.md."""
        folder.mkdir(parents=True, exist_ok=True)
        results = {"title": self.title, "rows": self.rows, "figures": self.figures,
                   "checks": [vars(c) for c in self.checks]}
        atomic_write_text(folder / "results.json", json.dumps(results, indent=2) + "\n")
        atomic_write_text(folder / "report.md", self.markdown())
        return folder / "report.md"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def final_train_error(path: Path, tail: float = 0.1) -> float | None:
    """Training error at the end of a run: the mean over its last `tail` of training records
    (single windows are noisy), as a fraction; None without training records."""
    errors = [r["error"] for r in read_jsonl(RunDir(path).metrics_file)
              if r.get("kind") == "train" and r.get("error") is not None]
    if not errors:
        return None
    last = errors[-max(1, round(len(errors) * tail)):]
    return sum(last) / len(last)


def plot_responses(curves: dict[str, list[float]], output: Path) -> Path:
    """Fig. 7: each net's layer-response stds in the original layer order (top) and sorted by
    magnitude (bottom); plain nets dashed, ResNets solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.4), dpi=120)
    for i, (label, stds) in enumerate(curves.items()):
        style = "--" if label.startswith("plain") else "-"
        xs = range(1, len(stds) + 1)
        top.plot(xs, stds, style, color=f"C{i}", label=label, linewidth=1.4)
        bottom.plot(xs, sorted(stds, reverse=True), style, color=f"C{i}", linewidth=1.4)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
    top.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(output, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return output
