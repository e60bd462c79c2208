"""Text renderings of a study for the terminal: the status table and the Pareto front
(table, JSON or CSV)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from stagetune.contract.client import StudyClient
from stagetune.contract.names import STUDY_STATES, TRIAL_STATES
from stagetune.contract.spec import value_from_proto
from stagetune.contract.stages import STAGE_NAMES
from stagetune.v1 import study_service_pb2 as ss
from stagetune.v1 import types_pb2 as pb

__all__ = ["STUDY_STATE", "render_pareto", "render_status", "render_trial_log"]

STUDY_STATE = STUDY_STATES.from_proto
_TRIAL_STATE = TRIAL_STATES.from_proto


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _params(trial: pb.Trial) -> dict[str, Any]:
    return {k: value_from_proto(v) for k, v in sorted(trial.params.items())}


def _counts(study: pb.Study) -> str:
    c = study.counts
    return (
        f"{c.complete} complete, {c.stopped} stopped, {c.failed} failed, "
        f"{c.infeasible} infeasible, {c.running} running, {c.waiting} waiting"
    )


def _finished(study: pb.Study) -> int:
    c = study.counts
    return c.complete + c.stopped + c.failed + c.infeasible


def render_status(client: StudyClient, name: str | None) -> str:
    if not name:
        studies = client.list_studies()
        if not studies:
            return "no studies"
        rows = [
            [
                s.spec.name,
                STAGE_NAMES.label(s.spec.stage),
                STUDY_STATE.get(s.state, "?"),
                f"{_finished(s)}/{s.spec.budget.max_trials}",
                _counts(s),
                s.hypervolume,
            ]
            for s in studies
        ]
        return _table(["study", "stage", "state", "finished", "trials", "hypervolume"], rows)
    study = client.get_study(name)
    trials = client.list_trials(name)
    out = [
        f"study {name}: {STUDY_STATE.get(study.state, '?')}, {_counts(study)}, "
        f"budget {study.spec.budget.max_trials}, hypervolume {study.hypervolume:.4g}"
    ]
    metrics = [o.metric for o in study.spec.objectives]
    running = [t for t in trials if t.state == pb.TRIAL_STATE_RUNNING]
    if running:
        out.append("\nrunning:")
        rows = [
            [t.trial_id, t.number, t.attempt, t.worker_id, t.rungs[-1].step if t.rungs else 0]
            for t in running
        ]
        out.append(_table(["trial", "#", "attempt", "worker", "last rung"], rows))
    front = sorted(
        (t for t in trials if t.pareto_rank == 1), key=lambda t: list(t.objective_values)
    )
    if front:
        out.append("\nPareto front:")
        rows = [[t.trial_id, t.number, *t.objective_values] for t in front]
        out.append(_table(["trial", "#", *metrics], rows))
    ended = [
        t
        for t in trials
        if t.state in (pb.TRIAL_STATE_STOPPED, pb.TRIAL_STATE_FAILED, pb.TRIAL_STATE_INFEASIBLE)
    ]
    if ended:
        out.append("\nstopped / failed / infeasible:")
        rows = [
            [t.trial_id, _TRIAL_STATE[t.state], t.reason.splitlines()[0] if t.reason else ""]
            for t in ended[-10:]
        ]
        out.append(_table(["trial", "state", "reason"], rows))
    return "\n".join(out)


def render_pareto(front: ss.GetParetoFrontResponse, fmt: str) -> str:
    metrics = [o.metric for o in front.objectives]
    rows: list[dict[str, Any]] = []
    for t in front.trials:
        rows.append(
            {
                "trial_id": t.trial_id,
                "number": t.number,
                "knee": t.trial_id == front.knee_trial_id,
                "objectives": dict(zip(metrics, t.objective_values, strict=True)),
                "params": _params(t),
                "mlflow_run_id": t.mlflow_run_id,
            }
        )
    if fmt == "json":
        return json.dumps(
            {
                "objectives": [
                    {"metric": o.metric, "direction": pb.Direction.Name(o.direction)[10:].lower()}
                    for o in front.objectives
                ],
                "hypervolume": front.hypervolume,
                "knee_trial_id": front.knee_trial_id,
                "trials": rows,
            },
            indent=2,
        )
    names = sorted({k for r in rows for k in r["params"]})
    table_rows = [
        [
            r["trial_id"],
            r["number"],
            *r["objectives"].values(),
            *(r["params"].get(n, "") for n in names),
            "*" if r["knee"] else "",
        ]
        for r in rows
    ]
    headers = ["trial_id", "number", *metrics, *names, "knee"]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(headers)
        writer.writerows([[*row[:-1], bool(row[-1])] for row in table_rows])
        return buf.getvalue().rstrip("\n")
    if not rows:
        return "the Pareto front is empty: no trial has completed yet"
    return _table(headers, table_rows) + f"\n\nhypervolume {front.hypervolume:.4g}; * = knee point"


def render_trial_log(trial: pb.Trial) -> str:
    """A trial's state and, for one that ended early, its whole reason: the headline (how
    it ended and the Python error), then the error's details and the end of its log."""
    head = f"trial {trial.trial_id} ({trial.study_name} #{trial.number}, attempt {trial.attempt})"
    state = _TRIAL_STATE.get(trial.state, "?")
    if not trial.reason:
        return f"{head}: {state}; it left no error or log"
    return f"{head}: {state}\n{trial.reason}"
