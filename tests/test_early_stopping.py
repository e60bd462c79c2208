"""MO-ASHA through a live server: who is stopped at a rung, and why it is visible."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import FailedPrecondition, InvalidArgument
from stagetune.contract.spec import (
    BudgetSpec,
    StudySpec,
    spec_from_mapping,
    spec_from_proto,
    validate_spec,
)
from stagetune.v1 import types_pb2 as pb
from tests.conftest import REPO


@pytest.fixture
def asha_spec(study_client: StudyClient, lora_spec: StudySpec) -> StudySpec:
    spec = dataclasses.replace(lora_spec, early_stopping="mo_asha", budget=BudgetSpec(8, 0))
    study_client.create_study(spec)
    return spec


def asha_study(client: StudyClient, base: StudySpec, **fidelity: int) -> StudySpec:
    """``base`` with MO-ASHA, 8 trials and ``fidelity`` changed, created; as stored."""
    spec = dataclasses.replace(
        base,
        early_stopping="mo_asha",
        budget=BudgetSpec(8, 0),
        fidelity=dataclasses.replace(base.fidelity, **fidelity),
    )
    client.create_study(spec)
    return spec_from_proto(client.get_study(spec.name).spec)


def _report(
    wc: WorkerClient, worker: str, step: int, loss: float, memory: float
) -> tuple[int, bool, str]:
    a = wc.acquire(worker)
    d = wc.report_progress(
        a.trial.trial_id, worker, step, {"eval_loss": loss, "peak_memory_mb": memory}
    )
    return a.trial.trial_id, d.stop, d.reason


def test_a_dominated_trial_is_stopped_at_the_first_rung_with_its_reason(
    worker_client: WorkerClient, study_client: StudyClient, asha_spec: StudySpec
) -> None:
    good, stop_good, _ = _report(worker_client, "w1", 8, 2.0, 500.0)
    bad, stop_bad, reason = _report(worker_client, "w2", 8, 3.0, 600.0)
    assert not stop_good  # alone at the rung: no evidence to stop on
    assert stop_bad
    assert "stopped at rung 8" in reason and f"dominated by trials {good}" in reason
    trials = {t.trial_id: t for t in study_client.list_trials(asha_spec.name)}
    assert trials[bad].state == pb.TRIAL_STATE_STOPPED
    assert trials[bad].reason == reason
    assert trials[good].state == pb.TRIAL_STATE_RUNNING
    with pytest.raises(FailedPrecondition):  # a stopped trial cannot complete afterwards
        worker_client.complete(
            bad, "w2", {"eval_loss": 1, "decode_latency_ms": 1, "peak_memory_mb": 1}
        )


def test_a_trial_on_the_front_with_room_at_the_rung_continues(
    worker_client: WorkerClient, asha_spec: StudySpec
) -> None:
    _report(worker_client, "w1", 8, 2.0, 500.0)
    _report(worker_client, "w2", 8, 3.0, 600.0)  # stopped: n=2 keeps 1
    _, stop, _ = _report(worker_client, "w3", 8, 1.0, 450.0)  # dominates both: first of 3
    assert not stop


def test_the_last_rung_always_continues(worker_client: WorkerClient, asha_spec: StudySpec) -> None:
    _report(worker_client, "w1", 32, 1.0, 400.0)
    _, stop, _ = _report(worker_client, "w2", 32, 9.0, 900.0)
    assert not stop


def test_with_early_stopping_off_every_trial_continues(
    worker_client: WorkerClient, study_client: StudyClient, lora_spec: StudySpec
) -> None:
    assert lora_spec.early_stopping == "none"  # the demo config runs every trial fully
    study_client.create_study(lora_spec)
    _report(worker_client, "w1", 8, 2.0, 500.0)
    _, stop, _ = _report(worker_client, "w2", 8, 3.0, 600.0)
    assert not stop


def test_status_shows_why_a_trial_was_stopped(
    worker_client: WorkerClient, study_client: StudyClient, asha_spec: StudySpec
) -> None:
    from stagetune.cli.render import render_status

    _report(worker_client, "w1", 8, 2.0, 500.0)
    _report(worker_client, "w2", 8, 3.0, 600.0)
    text = render_status(study_client, asha_spec.name)
    assert "stopped / failed / infeasible:" in text and "stopped at rung 8" in text


def test_min_reports_holds_every_stop_until_the_rung_has_that_many_reports(
    worker_client: WorkerClient, study_client: StudyClient, lora_spec: StudySpec
) -> None:
    stored = asha_study(study_client, lora_spec, min_reports=3)
    assert stored.fidelity.min_reports == 3  # through the wire and the store
    _report(worker_client, "w1", 8, 2.0, 500.0)
    _, stop, _ = _report(worker_client, "w2", 8, 3.0, 600.0)
    assert not stop  # dominated, but compared with one trial only
    _, stop, reason = _report(worker_client, "w3", 8, 4.0, 700.0)
    assert stop and "place 3 of 3" in reason


def test_a_bad_min_reports_is_refused_naming_the_field(
    study_client: StudyClient, lora_spec: StudySpec
) -> None:
    fidelity = dataclasses.replace(lora_spec.fidelity, min_reports=-1)
    with pytest.raises(InvalidArgument) as err:
        study_client.create_study(dataclasses.replace(lora_spec, fidelity=fidelity))
    assert err.value.field == "fidelity.min_reports"
    assert not [s for s in study_client.list_studies() if s.spec.name == lora_spec.name]


def test_with_brackets_a_trial_is_not_stopped_at_its_brackets_first_rungs(
    worker_client: WorkerClient, study_client: StudyClient, lora_spec: StudySpec
) -> None:
    stored = asha_study(study_client, lora_spec, brackets=2)
    assert stored.fidelity.brackets == 2  # through the wire and the store
    assert stored.fidelity.rungs() == [8, 16, 32]
    first, _, _ = _report(worker_client, "w0", 8, 2.0, 500.0)  # trial 0: bracket 0
    hedged, stop, _ = _report(worker_client, "w1", 8, 3.0, 600.0)  # trial 1: bracket 1
    assert not stop  # dominated, but bracket 1 is not stopped at its first rung
    _, stop, reason = _report(worker_client, "w2", 8, 3.0, 600.0)  # trial 2: bracket 0
    assert stop and f"dominated by trials {first}" in reason
    # From its bracket's second rung on, trial 1 is ranked like any other.
    worker_client.report_progress(first, "w0", 16, {"eval_loss": 1.5, "peak_memory_mb": 500.0})
    d = worker_client.report_progress(hedged, "w1", 16, {"eval_loss": 2.5, "peak_memory_mb": 600.0})
    assert d.stop and "stopped at rung 16" in d.reason


def test_brackets_are_read_from_a_config_and_bounded_by_the_rungs() -> None:
    data = yaml.safe_load((REPO / "configs" / "lora.yaml").read_text())
    data["fidelity"] = {"min_steps": 8, "max_steps": 32, "reduction_factor": 2, "brackets": 3}
    assert spec_from_mapping(data).fidelity.brackets == 3
    del data["fidelity"]["brackets"]
    assert spec_from_mapping(data).fidelity.brackets == 1  # one bracket: plain MO-ASHA
    data["fidelity"]["brackets"] = 4
    with pytest.raises(InvalidArgument) as err:
        validate_spec(spec_from_mapping(data))
    assert err.value.field == "fidelity.brackets"
    assert str(err.value) == "fidelity.brackets: must be between 1 and 3 (the rungs [8, 16, 32])"


def test_min_reports_is_read_from_a_config_and_never_below_the_reduction_factor() -> None:
    data = yaml.safe_load((REPO / "configs" / "lora.yaml").read_text())
    data["fidelity"] = {"min_steps": 8, "max_steps": 32, "reduction_factor": 3, "min_reports": 6}
    assert spec_from_mapping(data).fidelity.reports_to_stop == 6
    data["fidelity"]["min_reports"] = 1  # fewer than ceil(3): the top third holds every one
    assert spec_from_mapping(data).fidelity.reports_to_stop == 3
    del data["fidelity"]["min_reports"]
    assert spec_from_mapping(data).fidelity.reports_to_stop == 3
