"""What a run leaves behind: ``metrics.csv`` (one row per optimizer step) and ``loss.png``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from .._state import StepReport

COLUMNS = ["step", "epoch", "loss", "grad_norm", "lr", "num_items", "micro_batches", "skipped", "seconds"]


class MetricsFile:
    """Append-only CSV of step reports; on resume, rows after the checkpoint are dropped
    so that the file reads as if the run had never stopped.

    Example:
        >>> m = MetricsFile(Path("runs/train/metrics.csv"), keep_until=0)  # doctest: +SKIP
        >>> m.write(report, epoch=1, seconds=0.8)  # doctest: +SKIP
    """

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        rows = []
        if keep_until and path.is_file():
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= keep_until]
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def write(self, rep: StepReport, epoch: int, seconds: float) -> None:
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerow([
                rep.step, epoch, f"{rep.loss:.6g}", f"{rep.grad_norm:.6g}", f"{rep.lr:.6g}",
                "" if rep.num_items is None else int(rep.num_items), rep.micro_batches,
                int(rep.skipped), f"{seconds:.4f}",
            ])


def plot_loss(metrics_csv: Path, evals: list[dict[str, Any]], png: Path) -> None:
    """Training loss per optimizer step, with the evaluation loss at its steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    with metrics_csv.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["skipped"] == "0"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label="train loss (per optimizer step)")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval loss")
        for e in evals:
            if "accuracy" in e:
                ax.annotate(f"acc {e['accuracy']:.2f}", (e["step"], e["loss"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
