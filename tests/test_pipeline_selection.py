"""Choosing a stage's winner: the knee of the front, the best value of a metric under
extra limits, or a person's choice; infeasible and unfinished trials are never chosen."""

from __future__ import annotations

import pytest

from stagetune.contract.errors import FailedPrecondition, InvalidArgument
from stagetune.contract.pipeline import Selection
from stagetune.contract.spec import ConstraintSpec, StudySpec
from stagetune.server.records import TrialRecord, TrialStateName
from stagetune.server.selection import approvable, select_trial


def trial(
    i: int, loss: float, latency: float, memory: float, state: TrialStateName = "complete"
) -> TrialRecord:
    metrics = {"eval_loss": loss, "decode_latency_ms": latency, "peak_memory_mb": memory}
    values = (loss, latency, memory) if state == "complete" else ()
    return TrialRecord(i, i, "s", state, {"learning_rate": 0.01 * i}, 1, metrics, values)


TRIALS = [
    trial(1, loss=1.0, latency=9.0, memory=100),  # best loss, slow
    trial(2, loss=2.0, latency=2.0, memory=100),  # balanced
    trial(3, loss=4.0, latency=1.0, memory=100),  # fastest
    trial(4, loss=3.0, latency=3.0, memory=100),  # dominated by 2
    trial(5, loss=0.1, latency=0.1, memory=1, state="infeasible"),  # broke a constraint
    trial(6, loss=0.1, latency=0.1, memory=1, state="stopped"),
]


def test_knee_picks_the_balanced_member_of_the_front(lora_spec: StudySpec) -> None:
    chosen, why = select_trial(lora_spec, TRIALS, Selection())
    assert chosen is not None and chosen.trial_id == 2
    assert "front of 3" in why


def test_best_picks_the_best_value_in_the_metrics_direction(lora_spec: StudySpec) -> None:
    chosen, _ = select_trial(lora_spec, TRIALS, Selection("best", "eval_loss"))
    assert chosen is not None and chosen.trial_id == 1
    chosen, _ = select_trial(lora_spec, TRIALS, Selection("best", "decode_latency_ms"))
    assert chosen is not None and chosen.trial_id == 3


def test_best_obeys_extra_limits(lora_spec: StudySpec) -> None:
    fast = Selection("best", "eval_loss", (ConstraintSpec("decode_latency_ms", max=8),))
    chosen, why = select_trial(lora_spec, TRIALS, fast)
    assert chosen is not None and chosen.trial_id == 2
    assert "of 3 eligible" in why
    impossible = Selection("best", "eval_loss", (ConstraintSpec("decode_latency_ms", max=0.5),))
    chosen, why = select_trial(lora_spec, TRIALS, impossible)
    assert chosen is None and "decode_latency_ms <= 0.5" in why


def test_a_metric_that_is_no_objective_uses_the_catalogs_direction(lora_spec: StudySpec) -> None:
    trials = [
        trial(1, 1.0, 1.0, 1.0),
        trial(2, 1.0, 1.0, 1.0),
    ]
    trials[0].metrics["exact_match"] = 0.2
    trials[1].metrics["exact_match"] = 0.7  # maximised
    chosen, _ = select_trial(lora_spec, trials, Selection("best", "exact_match"))
    assert chosen is not None and chosen.trial_id == 2


def test_nothing_to_select_says_why(lora_spec: StudySpec) -> None:
    chosen, why = select_trial(lora_spec, TRIALS[4:], Selection())
    assert chosen is None and why == "no trial completed feasibly"


def test_a_person_may_promote_only_a_complete_feasible_trial_of_the_stage() -> None:
    approvable("s", TRIALS[0])
    with pytest.raises(FailedPrecondition, match="infeasible"):
        approvable("s", TRIALS[4])
    with pytest.raises(FailedPrecondition, match="stopped"):
        approvable("s", TRIALS[5])
    with pytest.raises(InvalidArgument) as e:
        approvable("other", TRIALS[0])
    assert e.value.field == "trial_id"
