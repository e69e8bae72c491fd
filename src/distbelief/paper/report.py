"""What a reproduction writes: report.md (our numbers beside the paper's, with the gap and the
orderings the paper claims, each marked as holding or not), results.json (the same, for
programs and tests) and the figures."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from distbelief.engine.checkpoint import atomic_write, atomic_write_text
from distbelief.engine.rundir import RunDir, read_jsonl


@dataclass
class Check:
    """One of the paper's claims, tested on our runs. `holds`: the means are ordered as the
    paper says; `separated`: and by more than their spread (None: one run each, no spread)."""

    claim: str
    holds: bool
    detail: str = ""
    separated: bool | None = None

    @property
    def mark(self) -> str:
        if not self.holds:
            return "does NOT hold"
        return "holds, within the spread" if self.separated is False else "holds"


@dataclass(frozen=True)
class Stat:
    """One number measured on each seed's run: their mean, sample std (0 for one run) and best
    (lowest: errors and responses, lower is better)."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def spread(self) -> float | None:
        """The std where there is one (several runs), else None (a table's "-")."""
        return self.std if len(self.values) > 1 else None

    @property
    def best(self) -> float:
        return min(self.values)

    def text(self, fmt: str = "{:.2f}") -> str:
        """"1.23" for one run, "1.23 +- 0.45" for several."""
        mean = fmt.format(self.mean)
        return mean if len(self.values) < 2 else f"{mean} +- {fmt.format(self.std)}"


def below(claim: str, a: Stat, b: Stat, fmt: str = "{:.2f}", *,
          or_equal: bool = False) -> Check:
    """The claim "a is below b" (or with `or_equal`, "a is not above b beyond the spread").

    Strict: holds when a's mean is below b's, separated when by more than the two stds
    together. Or-equal: holds when a's mean is at most b's plus the two stds (a tie within the
    noise is "as well"), separated when a's mean is at most b's."""
    spread = a.std + b.std
    several = len(a.values) > 1 and len(b.values) > 1
    if or_equal:
        holds, separated = a.mean <= b.mean + spread, a.mean <= b.mean
    else:
        holds, separated = a.mean < b.mean, b.mean - a.mean > spread
    return Check(claim, holds, f"{a.text(fmt)} vs {b.text(fmt)}",
                 separated if several else None)


def above(claim: str, a: Stat, b: Stat, fmt: str = "{:.2f}") -> Check:
    """The claim "a is above b": `below(b, a)`, its detail in the claim's order."""
    return replace(below(claim, b, a, fmt), detail=f"{a.text(fmt)} vs {b.text(fmt)}")


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
            lines += [f"- {c.mark}: {c.claim}"
                      + (f" ({c.detail})" if c.detail else "") for c in self.checks]
            lines.append("")
        lines += [f"{note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def check_dicts(self) -> list[dict]:
        return [{**vars(c), "mark": c.mark} for c in self.checks]

    def write(self, folder: Path) -> Path:
        """report.md and results.json into `folder`, each atomically; returns report.md."""
        folder.mkdir(parents=True, exist_ok=True)
        results = {"title": self.title, "rows": self.rows, "figures": self.figures,
                   "checks": self.check_dicts()}
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
    magnitude (bottom); plain nets dashed, ResNets solid. The std axis is logarithmic, so one
    net's outlier layer (a plain-56 at 22 beside ResNets at ~1) leaves every curve visible."""
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
        ax.set_yscale("log")
        ax.set_ylabel("std (log scale)")
        ax.grid(alpha=0.3)
    top.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(output, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return output
