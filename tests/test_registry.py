"""One registry each for stages, trial/study states and failure kinds: the wire enums,
the runner table and the names every layer prints all come from it."""

from __future__ import annotations

from typing import Any, Literal, get_args

import pytest

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.names import (
    FAILURE_KINDS,
    STUDY_STATES,
    TRIAL_STATES,
    EnumNames,
)
from stagetune.contract.spec import load_spec_file, spec_from_proto, spec_to_proto
from stagetune.contract.stages import STAGE_NAMES, STAGES
from stagetune.v1 import types_pb2 as pb
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("names", "enum"),
    [
        (STAGE_NAMES, pb.Stage),
        (STUDY_STATES, pb.StudyState),
        (TRIAL_STATES, pb.TrialState),
        (FAILURE_KINDS, pb.FailureKind),
    ],
    ids=["stage", "study-state", "trial-state", "failure-kind"],
)
def test_every_wire_value_but_unspecified_has_exactly_one_name(names: Any, enum: Any) -> None:
    assert sorted(names.from_proto) == sorted(v for v in enum.values() if v != 0)
    for name in names.names:
        assert enum.Name(names.to_proto[name]) == names.prefix + name.upper()
        assert names.name(names.to_proto[name], "x") == name


def test_a_proto_value_left_without_a_name_fails_at_import_naming_it() -> None:
    Partial = Literal["running", "stopped"]  # "done" forgotten
    with pytest.raises(RuntimeError, match="STUDY_STATE_DONE"):
        EnumNames(pb.StudyState, "STUDY_STATE_", get_args(Partial))


def test_an_unset_or_unknown_wire_value_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        TRIAL_STATES.name(pb.TRIAL_STATE_UNSPECIFIED, "states[0]")
    assert err.value.field == "states[0]"
    assert TRIAL_STATES.label(99) == "?"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_crosses_the_wire_under_its_own_enum(stage: str) -> None:
    spec = load_spec_file(REPO / "configs" / f"{stage}.yaml")
    msg = spec_to_proto(spec)
    assert pb.Stage.Name(msg.stage) == f"STAGE_{stage.upper()}"
    assert spec_from_proto(msg).stage == stage


def test_a_spec_with_no_stage_on_the_wire_is_refused_naming_stage() -> None:
    msg = spec_to_proto(load_spec_file(REPO / "configs" / "sft.yaml"))
    msg.stage = pb.STAGE_UNSPECIFIED
    with pytest.raises(InvalidArgument) as err:
        spec_from_proto(msg)
    assert err.value.field == "stage"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_trial_process_finds_every_stage_runner_the_registry_names(stage: str) -> None:
    from stagetune.trainer.run_trial import _runner

    runner = _runner(stage)
    assert callable(runner)
    assert f"{runner.__module__}:{runner.__name__}" == STAGES[stage].runner
    assert _runner("rlhf") is None
