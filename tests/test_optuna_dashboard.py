"""optuna-dashboard on the server's own database: what a team already running it sees.

A live server runs a study with rung reports and early stopping on SQLite and on
PostgreSQL; ``optuna-dashboard STORAGE`` is started on the same URL as its own process,
as the compose file runs it, and its JSON API (what its pages draw) is read: the study is
listed, its objectives carry their metric names, not "Objective 0/1/2", each trial's rung
reports are its intermediate values (the first objective's metric at each rung: a
multi-objective study has one intermediate value per step), the stopped trial is Pruned
at the rung that stopped it, and the dashboard's Pareto front is the server's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import StudySpec
from stagetune.server.app import StagetuneServer
from tests.conftest import objective_metrics
from tests.ui_servers import optuna_dashboard

OBJECTIVES = ["eval_loss", "decode_latency_ms", "peak_memory_mb"]


def run_study(server: StagetuneServer, spec: StudySpec) -> dict[int, list[tuple[int, float]]]:
    """Three trials under MO-ASHA: the second is stopped at rung 8, the others complete.
    Returns each trial's rung reports of the first objective by trial id."""
    reported: dict[int, list[tuple[int, float]]] = {}
    with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
        sc.create_study(spec)
        first, second = wc.acquire("w1").trial.trial_id, wc.acquire("w2").trial.trial_id

        def report(trial: int, worker: str, step: int, loss: float) -> bool:
            reported.setdefault(trial, []).append((step, loss))
            return bool(wc.report_progress(trial, worker, step, {OBJECTIVES[0]: loss}).stop)

        assert not report(first, "w1", 8, 2.0)
        assert report(second, "w2", 8, 3.0)  # the worse half of rung 8: stopped
        assert not report(first, "w1", 16, 1.5)
        wc.complete(first, "w1", objective_metrics(1.2, 5.0, 100.0))
        third = wc.acquire("w2").trial.trial_id
        assert not report(third, "w2", 8, 1.8)
        assert not report(third, "w2", 16, 1.4)
        wc.complete(third, "w2", objective_metrics(1.3, 4.0, 110.0))
    return reported


def test_optuna_dashboard_shows_the_study_with_objective_names_and_rung_reports(
    tmp_path: Path, server: StagetuneServer, lora_spec: StudySpec
) -> None:
    spec = dataclasses.replace(
        lora_spec,
        name="dashboard-study",
        early_stopping="mo_asha",
        budget=dataclasses.replace(lora_spec.budget, max_trials=3),
    )
    reported = run_study(server, spec)
    with StudyClient(server.address) as sc:
        trials = {t.trial_id: t for t in sc.list_trials(spec.name)}
    front = {t.trial_id for t in trials.values() if t.pareto_rank == 1}
    assert len(front) == 2

    storage = server.settings.resolved_storage_url()
    with optuna_dashboard(storage, tmp_path / "optuna-dashboard") as dashboard:
        listed = {s["study_name"]: s for s in dashboard.get_json("/api/studies")["study_summaries"]}
        assert spec.name in listed
        assert listed[spec.name]["directions"] == ["minimize"] * 3
        detail: dict[str, Any] = dashboard.get_json(f"/api/studies/{listed[spec.name]['study_id']}")

    assert detail.get("objective_names") == OBJECTIVES, "the dashboard shows Objective 0/1/2"
    shown = {t["trial_id"]: t for t in detail["trials"]}
    assert set(shown) == set(trials)
    for trial_id, trial in trials.items():
        assert shown[trial_id]["number"] == trial.number
        steps = [(v["step"], v["value"]) for v in shown[trial_id]["intermediate_values"]]
        assert steps == reported[trial_id], f"trial {trial.number}: rung reports"
    states = {shown[i]["state"] for i in trials}
    assert sorted(states) == ["Complete", "Pruned"]
    (pruned,) = [t for t in shown.values() if t["state"] == "Pruned"]
    assert [v["step"] for v in pruned["intermediate_values"]] == [8]
    assert detail["has_intermediate_values"] is True
    for trial_id in front:
        assert shown[trial_id]["values"] == list(trials[trial_id].objective_values)
    assert {t["trial_id"] for t in detail["best_trials"]} == front
