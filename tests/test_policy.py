"""The policy is an interface the server is handed: a server built with another policy
asks that one for every configuration and every rung decision, hands it warm-start seeds
and retries, tells it each outcome, and closes it when it stops."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import (
    BudgetSpec,
    ParamValue,
    StudySpec,
    WarmStartSpec,
    value_from_proto,
)
from stagetune.server.app import ServerSettings, make_server
from stagetune.server.optuna_policy import OptunaPolicy
from stagetune.server.policy import Policy
from stagetune.server.records import TrialLease, TrialOutcome, TrialRecord
from stagetune.server.storage import StudyStore
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws

# Corners of configs/lora.yaml's space: values a sampler would not propose by chance.
FIRST: dict[str, ParamValue] = {
    "learning_rate": 1e-4,
    "lora_r": 2,
    "lora_alpha": 64,
    "lora_dropout": 0.0,
}
SECOND: dict[str, ParamValue] = {**FIRST, "lora_r": 32, "lora_dropout": 0.2}


class ListPolicy(Policy):
    """Hands out the configurations it was given, in order, and stops every trial at its
    first rung report; remembers what it was told."""

    def __init__(self, store: StudyStore, configs: list[dict[str, ParamValue]]) -> None:
        self.store = store
        self.configs = list(configs)
        self.enqueued: list[tuple[dict[str, ParamValue], int, str]] = []
        self.told: list[tuple[int, str, str]] = []
        self.closed = False

    def ask(self, spec: StudySpec, lease: TrialLease, *, queued: bool) -> TrialRecord:
        return self.store.create_running_trial(spec, self.configs.pop(0), lease)

    def enqueue(
        self, spec: StudySpec, params: dict[str, ParamValue], *, attempt: int, source: str = ""
    ) -> None:
        self.enqueued.append((dict(params), attempt, source))

    def tell(self, spec: StudySpec, trial: TrialRecord, outcome: TrialOutcome) -> None:
        self.told.append((trial.trial_id, outcome.state, outcome.reason))

    def decide(
        self, spec: StudySpec, trial: TrialRecord, step: int, metrics: dict[str, float]
    ) -> tuple[bool, str]:
        return True, f"the list policy stops every trial at its first rung ({step})"

    def close(self) -> None:
        self.closed = True


def test_a_server_built_with_another_policy_uses_it(tmp_path: Path, lora_spec: StudySpec) -> None:
    policies: list[ListPolicy] = []

    def factory(store: StudyStore) -> Policy:
        policies.append(ListPolicy(store, [FIRST, SECOND]))
        return policies[-1]

    settings = ServerSettings(port=0, data_dir=tmp_path, tracking_uri="", grace=0.0)
    server = make_server(settings, policy_factory=factory).start()
    (policy,) = policies
    spec = dataclasses.replace(
        lora_spec, budget=BudgetSpec(4, 1), warm_start=WarmStartSpec(defaults=True)
    )
    try:
        with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
            sc.create_study(spec)
            # Warm-start seeds go to the policy's queue, each as a first attempt.
            assert policy.enqueued and all(
                attempt == 1 and source == "defaults:lora" for _, attempt, source in policy.enqueued
            )
            policy.enqueued.clear()

            first = wc.acquire("w1")
            assert isinstance(first, ws.Assignment)
            assert {k: value_from_proto(v) for k, v in first.trial.params.items()} == FIRST
            decision = wc.report_progress(first.trial.trial_id, "w1", 8, {"eval_loss": 2.0})
            assert decision.stop
            assert decision.reason == "the list policy stops every trial at its first rung (8)"
            stopped = sc.list_trials(spec.name, [pb.TRIAL_STATE_STOPPED])
            assert [t.trial_id for t in stopped] == [first.trial.trial_id]

            second = wc.acquire("w2").trial
            assert {k: value_from_proto(v) for k, v in second.params.items()} == SECOND
            _, requeued = wc.fail(second.trial_id, "w2", "interrupted", "node drained")
            assert requeued
            assert policy.enqueued == [(SECOND, 2, "")]  # the retry, same params
            assert [(state, reason) for _, state, reason in policy.told] == [
                ("stopped", decision.reason),
                ("failed", "interrupted: node drained"),
            ]
    finally:
        server.stop(grace=0)
    assert policy.closed


def test_the_default_policy_is_optuna(tmp_path: Path) -> None:
    settings = ServerSettings(port=0, data_dir=tmp_path, tracking_uri="")
    server = make_server(settings)
    try:
        assert isinstance(server.service.policy, OptunaPolicy)
    finally:
        server.stop(grace=0)
