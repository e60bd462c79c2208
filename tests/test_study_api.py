"""Study service through a live server, against SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses

import pytest

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import AlreadyExists, InvalidArgument, NotFound
from stagetune.contract.spec import BudgetSpec, FloatParam, StudySpec, spec_to_proto
from stagetune.server.app import StagetuneServer
from stagetune.v1 import types_pb2 as pb
from tests.conftest import objective_metrics


def test_create_study_returns_it_with_zero_counts(
    study_client: StudyClient, lora_spec: StudySpec
) -> None:
    study, created = study_client.create_study(lora_spec)
    assert created
    assert study.spec.name == lora_spec.name
    assert study.state == pb.STUDY_STATE_RUNNING
    assert study.counts.complete == 0 and study.counts.running == 0


def test_creating_the_same_spec_twice_is_a_no_op(
    study_client: StudyClient, lora_spec: StudySpec
) -> None:
    study_client.create_study(lora_spec)
    _, created = study_client.create_study(lora_spec)
    assert not created
    assert [s.spec.name for s in study_client.list_studies()] == [lora_spec.name]


def test_a_different_spec_under_the_same_name_is_refused(
    study_client: StudyClient, lora_spec: StudySpec
) -> None:
    study_client.create_study(lora_spec)
    other = dataclasses.replace(lora_spec, budget=BudgetSpec(99, 1))
    with pytest.raises(AlreadyExists, match="different spec"):
        study_client.create_study(other)
    assert study_client.get_study(lora_spec.name).spec.budget.max_trials == 12


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda m: setattr(m.search_space[0].float_range, "low", -1.0),
            "search_space.learning_rate.low",
        ),
        (lambda m: setattr(m.fidelity, "reduction_factor", 1.0), "fidelity.reduction_factor"),
        (lambda m: setattr(m.fidelity, "min_reports", -3), "fidelity.min_reports"),
        # A hair above 1: listing its rungs (every acquire does) would take hours.
        (
            lambda m: setattr(m.fidelity, "reduction_factor", 1.0 + 1e-12),
            "fidelity.reduction_factor",
        ),
        (lambda m: setattr(m.fidelity, "brackets", 4), "fidelity.brackets"),  # 3 rungs
        (lambda m: setattr(m.fidelity, "brackets", -1), "fidelity.brackets"),
        (lambda m: setattr(m.budget, "max_trials", 0), "budget.max_trials"),
        (lambda m: setattr(m, "name", "../etc"), "name"),
        (
            lambda m: m.search_space.add(name="nonsense", float_range=pb.FloatRange(low=0, high=1)),
            "search_space.nonsense",
        ),
        (lambda m: setattr(m.objectives[0], "metric", "accuracy_of_vibes"), "objectives[0].metric"),
        (lambda m: m.runner.update({"model": {}}), "runner.model"),
        # So large that the hypervolume would overflow to infinity.
        (lambda m: setattr(m.objectives[0], "reference", 1e300), "objectives[0].reference"),
    ],
)
def test_a_bad_spec_is_invalid_argument_naming_the_field_and_writes_nothing(
    study_client: StudyClient, lora_spec: StudySpec, mutate: object, field: str
) -> None:
    msg = spec_to_proto(lora_spec)
    mutate(msg)  # type: ignore[operator]
    with pytest.raises(InvalidArgument) as err:
        study_client.create_study(msg)
    assert err.value.field == field
    assert study_client.list_studies() == []


def test_unknown_study_is_not_found(study_client: StudyClient) -> None:
    with pytest.raises(NotFound, match="nope"):
        study_client.get_study("nope")
    with pytest.raises(NotFound):
        study_client.pareto_front("nope")


def test_stopped_study_hands_out_no_trials(
    study_client: StudyClient, worker_client: WorkerClient, lora_spec: StudySpec
) -> None:
    study_client.create_study(lora_spec)
    assert study_client.stop_study(lora_spec.name).state == pb.STUDY_STATE_STOPPED
    got = worker_client.acquire("w1")
    assert not got.HasField("trial") if hasattr(got, "trial") else True
    assert "no running study" in got.reason


def test_a_result_too_large_for_the_front_is_refused_and_poisons_nothing(
    study_client: StudyClient, worker_client: WorkerClient, lora_spec: StudySpec
) -> None:
    """The first completion fixes the study's hypervolume reference (twice its values):
    one of 1.8e308 would make it infinite and every later completion fail."""
    study_client.create_study(lora_spec)
    a = worker_client.acquire("w1")
    with pytest.raises(InvalidArgument) as err:
        worker_client.complete(a.trial.trial_id, "w1", objective_metrics(1.797e308, 5.0, 100.0))
    assert err.value.field == "metrics.eval_loss"
    assert study_client.list_trials(lora_spec.name)[0].state == pb.TRIAL_STATE_RUNNING
    done = worker_client.complete(a.trial.trial_id, "w1", objective_metrics(2.0, 5.0, 100.0))
    assert done.state == pb.TRIAL_STATE_COMPLETE
    b = worker_client.acquire("w1")
    worker_client.complete(b.trial.trial_id, "w1", objective_metrics(1.0, 4.0, 90.0))
    assert study_client.get_study(lora_spec.name).hypervolume > 0


def test_pareto_front_lists_only_non_dominated_complete_trials(
    study_client: StudyClient, worker_client: WorkerClient, lora_spec: StudySpec
) -> None:
    study_client.create_study(lora_spec)
    results = [(2.0, 5.0, 100.0), (1.0, 6.0, 100.0), (2.5, 6.5, 120.0)]  # the last is dominated
    ids = []
    for metrics in results:
        a = worker_client.acquire("w1")
        worker_client.complete(a.trial.trial_id, "w1", objective_metrics(*metrics))
        ids.append(a.trial.trial_id)
    front = study_client.pareto_front(lora_spec.name)
    assert sorted(t.trial_id for t in front.trials) == sorted(ids[:2])
    assert [o.metric for o in front.objectives] == lora_spec.metric_names
    assert front.knee_trial_id in ids[:2]
    assert front.hypervolume > 0
    ranks = {t.trial_id: t.pareto_rank for t in study_client.list_trials(lora_spec.name)}
    assert ranks == {ids[0]: 1, ids[1]: 1, ids[2]: 2}


def test_study_is_done_when_its_budget_is_spent(
    study_client: StudyClient, worker_client: WorkerClient, lora_spec: StudySpec
) -> None:
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(2, 0))
    study_client.create_study(spec)
    for _ in range(2):
        a = worker_client.acquire("w1")
        worker_client.complete(a.trial.trial_id, "w1", objective_metrics(1, 1, 1))
    study = study_client.get_study(spec.name)
    assert study.state == pb.STUDY_STATE_DONE
    assert study.counts.complete == 2
    assert "no running study" in worker_client.acquire("w1").reason


def test_the_server_continues_a_study_after_restart(
    server: StagetuneServer, tmp_path: object, lora_spec: StudySpec, storage_url: str
) -> None:
    from tests.conftest import start_server

    with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
        sc.create_study(lora_spec)
        first = wc.acquire("w1")
        wc.complete(first.trial.trial_id, "w1", objective_metrics(1, 2, 3))
        held = wc.acquire("w2")
    server.stop(grace=0)
    again = start_server(tmp_path / "again", storage_url=storage_url, tracking_uri="")  # type: ignore[operator]
    try:
        with StudyClient(again.address) as sc, WorkerClient(again.address) as wc:
            assert sc.get_study(lora_spec.name).counts.complete == 1
            # The held trial survived the restart and can still be completed.
            wc.complete(held.trial.trial_id, "w2", objective_metrics(2, 1, 3))
            assert sc.get_study(lora_spec.name).counts.complete == 2
            fresh = wc.acquire("w3")
            assert fresh.trial.number == 2
    finally:
        again.stop(grace=0)


def test_float_param_ranges_survive_the_wire(
    study_client: StudyClient, lora_spec: StudySpec
) -> None:
    study, _ = study_client.create_study(lora_spec)
    lr = next(p for p in study.spec.search_space if p.name == "learning_rate")
    assert isinstance(lora_spec.param("learning_rate"), FloatParam)
    assert (lr.float_range.low, lr.float_range.high, lr.float_range.log) == (1e-4, 3e-2, True)


def test_a_study_whose_creation_a_crash_cut_short_can_be_created_again(
    server: StagetuneServer, study_client: StudyClient, lora_spec: StudySpec
) -> None:
    import optuna

    # What a server killed inside create_study leaves: Optuna's study row, no spec yet.
    directions = [optuna.study.StudyDirection[d.upper()] for d in lora_spec.directions]
    server.store.optuna_storage.create_new_study(directions, lora_spec.name)
    assert not server.store.study_exists(lora_spec.name)  # invisible, not a study
    assert study_client.list_studies() == []
    with pytest.raises(NotFound):
        study_client.get_study(lora_spec.name)
    study, created = study_client.create_study(lora_spec)  # the name is not held forever
    assert created and study.spec.name == lora_spec.name
    assert [s.spec.name for s in study_client.list_studies()] == [lora_spec.name]
    with WorkerClient(server.address) as wc:  # and it serves trials
        assert wc.acquire("w1", study_name=lora_spec.name).trial.number == 0
