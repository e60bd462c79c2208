"""The Pareto front as files a person reads beside the study's MLflow run:
``pareto_front.csv`` (the front's trials, objective values and params) and
``pareto_front.png`` (every pair of objectives, front members highlighted)."""

from __future__ import annotations

import csv
from pathlib import Path

from stagetune.contract.spec import StudySpec
from stagetune.server.records import TrialRecord

__all__ = ["write_front_csv", "plot_front"]


def write_front_csv(path: Path, spec: StudySpec, front: list[TrialRecord]) -> None:
    names = [p.name for p in spec.search_space]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "number", *spec.metric_names, *names])
        for t in front:
            writer.writerow(
                [t.trial_id, t.number, *t.values, *(t.params.get(n, "") for n in names)]
            )


def plot_front(path: Path, spec: StudySpec, trials: list[TrialRecord]) -> None:
    """Scatter of every pair of objectives; front members highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = len(spec.objectives)
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)] or [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        for on_front, style in ((False, {"c": "0.7", "s": 18}), (True, {"c": "C3", "s": 36})):
            pts = [t for t in trials if (t.pareto_rank == 1) == on_front]
            xs = [t.values[i] for t in pts]
            ys = [t.values[j] if m > 1 else t.number for t in pts]
            ax.scatter(xs, ys, label="Pareto front" if on_front else "dominated", **style)
        ax.set_xlabel(f"{spec.objectives[i].metric} ({spec.objectives[i].direction})")
        ax.set_ylabel(
            f"{spec.objectives[j].metric} ({spec.objectives[j].direction})" if m > 1 else "trial"
        )
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{spec.name}: {len(trials)} complete trials")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
