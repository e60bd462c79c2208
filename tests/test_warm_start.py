"""Warm start: a new study first tries the Pareto set of an earlier study of the same
stage and the stage's defaults, cut to its own search space; bad sources change nothing."""

from __future__ import annotations

import dataclasses

import pytest

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import BudgetSpec, StudySpec, WarmStartSpec, load_spec_file
from stagetune.contract.stages import STAGES
from stagetune.server.warmstart import fit_to_space, stage_defaults
from tests.conftest import REPO, objective_metrics


def test_every_stage_has_defaults_that_fit_its_own_config() -> None:
    for stage in STAGES:
        spec = load_spec_file(REPO / "configs" / f"{stage}.yaml")
        defaults = stage_defaults(stage)
        assert defaults, stage
        for point in defaults:
            assert set(point) <= set(STAGES[stage].params), (stage, point)
        assert any(fit_to_space(spec, p) for p in defaults), stage


def test_a_seed_keeps_only_what_is_valid_in_the_new_space(lora_spec: StudySpec) -> None:
    # lora.yaml: learning_rate in [1e-4, 3e-2] (log), lora_alpha in {8, 16, 32, 64}
    seed = {"learning_rate": 5e-2, "lora_alpha": 32, "beta": 0.1, "lora_r": 4}
    assert fit_to_space(lora_spec, seed) == {"lora_alpha": 32, "lora_r": 4}


def finish(wc: WorkerClient, worker: str, loss: float, memory: float) -> dict[str, object]:
    a = wc.acquire(worker)
    wc.complete(a.trial.trial_id, worker, objective_metrics(loss, 3.0, memory))
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in a.trial.params.items()}


def test_a_new_study_first_tries_the_earlier_front_then_the_defaults(
    study_client: StudyClient, worker_client: WorkerClient, lora_spec: StudySpec
) -> None:
    earlier = dataclasses.replace(lora_spec, name="earlier", budget=BudgetSpec(3, 0))
    study_client.create_study(earlier)
    p1 = finish(worker_client, "w", 1.0, 600.0)  # on the front
    p2 = finish(worker_client, "w", 2.0, 500.0)  # on the front
    finish(worker_client, "w", 3.0, 700.0)  # dominated by both: not a seed
    later = dataclasses.replace(
        lora_spec,
        name="later",
        budget=BudgetSpec(6, 0),
        warm_start=WarmStartSpec(studies=("earlier",), defaults=True),
    )
    study, _ = study_client.create_study(later)
    assert study.counts.waiting == 4  # 2 defaults + 2 front points, queued
    handed = []
    for _ in range(4):
        a = worker_client.acquire("w2")
        handed.append({k: getattr(v, v.WhichOneof("kind")) for k, v in a.trial.params.items()})
        worker_client.complete(a.trial.trial_id, "w2", objective_metrics(2.0, 3.0, 550.0))
    defaults = [fit_to_space(later, p) for p in stage_defaults("lora")]
    assert handed[:2] == defaults
    assert handed[2:] in ([p1, p2], [p2, p1])
    # The seeds were first attempts inside the budget: two sampled trials remain.
    assert study_client.get_study("later").counts.complete == 4
    worker_client.acquire("w3")
    worker_client.acquire("w4")
    assert study_client.get_study("later").counts.running == 2


@pytest.mark.parametrize(
    ("source_name", "problem"),
    [("nowhere", "no study named 'nowhere'"), ("other", "tunes stage sft")],
)
def test_a_bad_source_study_is_refused_and_creates_nothing(
    study_client: StudyClient, lora_spec: StudySpec, source_name: str, problem: str
) -> None:
    sft = load_spec_file(REPO / "configs" / "sft.yaml")
    study_client.create_study(dataclasses.replace(sft, name="other"))
    spec = dataclasses.replace(
        lora_spec, name="seeded", warm_start=WarmStartSpec(studies=(source_name,))
    )
    with pytest.raises(InvalidArgument) as err:
        study_client.create_study(spec)
    assert err.value.field == "warm_start.studies[0]" and problem in err.value.message
    assert [s.spec.name for s in study_client.list_studies()] == ["other"]


def test_a_study_cannot_seed_itself(lora_spec: StudySpec) -> None:
    from stagetune.contract.spec import validate_spec

    spec = dataclasses.replace(lora_spec, warm_start=WarmStartSpec(studies=(lora_spec.name,)))
    with pytest.raises(InvalidArgument, match=r"warm_start.studies\[0\]"):
        validate_spec(spec)
