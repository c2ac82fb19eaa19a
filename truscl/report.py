"""A task's figures and the report made of them: PNG plots and a Markdown summary.

:class:`TaskFigures` is what an operator looks at, gathered by
:func:`truscl.server.figures.task_figures` from the chain, the aggregator's journal and archive
and, when at hand, the owner's released models; ``truscl report`` writes it out with
:func:`write_report` and the aggregator's status page renders the same figures as HTML. Nothing
here needs a key, and nothing here reads a file: the figures come in whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The plots, by file name, in the order the summary shows them.
PLOTS = ("accuracy.png", "epsilon.png", "participants.png", "bytes.png", "gas.png")
DPI = 100
BAR = 0.6  # bar width, in rounds


@dataclass(frozen=True)
class RoundFigures:
    """One round as the journal, the archive and the chain record it."""

    round: int
    state: str  # the journal's: open, closed, anchored, delivered
    participants: int  # updates made for this round and counted in it
    late: int = 0  # updates made for the round before, counted in this one
    bytes: int = 0  # signed updates archived for the round
    rejections: dict[str, int] = field(default_factory=dict)  # by reason
    anchor_tx: str | None = None
    gas: int | None = None  # gas used by the anchoring transaction
    model_hash: str | None = None  # of the model released after this round (on chain)
    refused: int = 0  # the owner's refusal code on chain (0: not refused)
    accuracy: float | None = None  # of the released model on the evaluation set


@dataclass(frozen=True)
class DeviceFigures:
    """A device as its updates show it: the epsilon it signed it has spent, round by round."""

    address: str
    updates: int
    last_round: int  # the last round that counted one of its updates
    epsilon: float  # the most it has said it spent
    epsilon_by_round: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TaskFigures:
    task: str
    rounds_planned: int
    rounds: tuple[RoundFigures, ...]
    devices: tuple[DeviceFigures, ...]
    rejections: dict[str, int]  # every refusal the journal counted, by reason
    accuracy_note: str  # where accuracy comes from, or why there is none

    @property
    def has_accuracy(self) -> bool:
        return any(r.accuracy is not None for r in self.rounds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "rounds_planned": self.rounds_planned,
            "rounds": [vars(r) for r in self.rounds],
            "devices": [vars(d) for d in self.devices],
            "rejections": self.rejections,
            "accuracy_note": self.accuracy_note,
        }


def write_report(figures: TaskFigures, out: Path) -> Path:
    """The plots and ``summary.md`` in ``out`` (made if missing); the summary's path."""
    out.mkdir(parents=True, exist_ok=True)
    _plot_accuracy(figures, out / "accuracy.png")
    _plot_epsilon(figures, out / "epsilon.png")
    _plot_participants(figures, out / "participants.png")
    _plot_series(
        figures, out / "bytes.png", [r.bytes for r in figures.rounds], "bytes of updates", "C2"
    )
    _plot_series(
        figures, out / "gas.png", [r.gas or 0 for r in figures.rounds], "gas per anchor", "C3"
    )
    summary = out / "summary.md"
    summary.write_text(summary_markdown(figures))
    return summary


def summary_markdown(figures: TaskFigures) -> str:
    rounds = figures.rounds
    anchored = [r for r in rounds if r.anchor_tx]
    lines = [
        f"# truscl report: task `{figures.task}`",
        "",
        f"- rounds: {len(rounds)} of {figures.rounds_planned} ({len(anchored)} anchored)",
        f"- devices seen: {len(figures.devices)}",
        f"- updates counted: {sum(r.participants + r.late for r in rounds)}",
        f"- rejections: {_reasons(figures.rejections)}",
        f"- refused rounds: {', '.join(str(r.round) for r in rounds if r.refused) or 'none'}",
        f"- accuracy: {figures.accuracy_note}",
        "",
        "| round | state | participants | late | rejections | bytes | gas | accuracy | anchor |",
        "|---:|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rounds:
        accuracy = "n/a" if r.accuracy is None else f"{r.accuracy:.3f}"
        lines.append(
            f"| {r.round} | {r.state} | {r.participants} | {r.late} | {_reasons(r.rejections)} "
            f"| {r.bytes:,} | {r.gas if r.gas is not None else 'n/a'} | {accuracy} "
            f"| `{r.anchor_tx or '-'}` |"
        )
    lines += ["", "| device | updates | last round | epsilon |", "|---|---:|---:|---:|"]
    lines += [
        f"| `{d.address}` | {d.updates} | {d.last_round} | {d.epsilon:.3f} |"
        for d in figures.devices
    ]
    lines.append("")
    lines += [f"![{name.removesuffix('.png')}]({name})" for name in PLOTS]
    return "\n".join(lines) + "\n"


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "none"


def _axes(title: str, ylabel: str) -> tuple[Any, Any]:
    # A Figure of its own, not pyplot's global state: safe in a service's thread, no display.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 3.6), dpi=DPI, layout="constrained")
    axes = figure.subplots()
    axes.set_title(title)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure, axes


def _rounds(figures: TaskFigures) -> list[int]:
    return [r.round for r in figures.rounds]


def _plot_accuracy(figures: TaskFigures, path: Path) -> None:
    figure, axes = _axes("accuracy of the released model", "accuracy")
    points = [(r.round, r.accuracy) for r in figures.rounds if r.accuracy is not None]
    if points:
        axes.plot(*zip(*points, strict=True), marker="o")
        axes.set_ylim(0, 1)
    else:
        axes.text(0.5, 0.5, figures.accuracy_note, ha="center", va="center", wrap=True)
    figure.savefig(path, format="png")


def _plot_epsilon(figures: TaskFigures, path: Path) -> None:
    figure, axes = _axes("epsilon each device says it spent", "epsilon")
    for device in figures.devices:
        if device.epsilon_by_round:
            axes.plot(*zip(*device.epsilon_by_round, strict=True), marker=".", label=device.address)
    if 0 < len(figures.devices) <= 8:
        axes.legend(fontsize="x-small")
    figure.savefig(path, format="png")


def _plot_participants(figures: TaskFigures, path: Path) -> None:
    figure, axes = _axes("participants and rejections", "updates")
    rounds = _rounds(figures)
    counted = [r.participants for r in figures.rounds]
    axes.bar(rounds, counted, width=BAR, label="counted")
    late = [r.late for r in figures.rounds]
    if any(late):
        axes.bar(rounds, late, width=BAR, bottom=counted, label="late")
    axes.plot(rounds, [sum(r.rejections.values()) for r in figures.rounds], "rx-", label="rejected")
    axes.legend(fontsize="small")
    figure.savefig(path, format="png")


def _plot_series(
    figures: TaskFigures, path: Path, values: list[int], label: str, colour: str
) -> None:
    figure, axes = _axes(label, label.split(" ")[0])
    axes.bar(_rounds(figures), values, width=BAR, color=colour)
    figure.savefig(path, format="png")
