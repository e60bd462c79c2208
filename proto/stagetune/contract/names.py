"""The names the project uses for the values of its proto enums, written once.

Each ``EnumNames`` pairs a ``Literal`` of lower-case names with a proto enum whose values
are those names in upper case behind a prefix (``"running"`` <-> ``TRIAL_STATE_RUNNING``).
The pairing is checked when this module is imported: a value added to the enum without
a name here (or a name without a value) fails at once, not as a ``KeyError`` in the field.

Study states, trial states and failure kinds live here; the stage names come from the
stage registry (``stagetune.contract.stages``) and the spec's own enums (direction,
sampler, early stopping) from ``stagetune.contract.spec.model``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, Literal, TypeVar, get_args

from stagetune.contract.errors import InvalidArgument
from stagetune.v1 import types_pb2 as pb

__all__ = [
    "EnumNames",
    "StudyStateName",
    "TrialStateName",
    "FailureKindName",
    "STUDY_STATES",
    "TRIAL_STATES",
    "FAILURE_KINDS",
]

StudyStateName = Literal["running", "stopped", "done"]
TrialStateName = Literal["waiting", "running", "complete", "stopped", "failed", "infeasible"]
#: Why a worker gave a trial up: its process crashed (or diverged, or was misconfigured),
#: ran out of memory (an infeasible configuration, not retried), or was interrupted (the
#: worker is shutting down or the study stopped; the same params are requeued).
FailureKindName = Literal["crash", "out_of_memory", "interrupted"]

N = TypeVar("N", bound=str)
V = TypeVar("V", bound=int)


class EnumNames(Generic[N, V]):
    """Lower-case names <-> the values of one proto enum (its ``*_UNSPECIFIED = 0`` has no
    name: it means "not set")."""

    def __init__(self, enum: Any, prefix: str, names: tuple[N, ...]) -> None:
        self.prefix = prefix
        self.names = names
        self.to_proto: Mapping[N, V] = {n: enum.Value(prefix + n.upper()) for n in names}
        self.from_proto: Mapping[int, N] = {v: n for n, v in self.to_proto.items()}
        unnamed = set(enum.values()) - set(self.from_proto) - {0}
        if unnamed or len(self.from_proto) != len(names):
            missing = sorted(enum.Name(v) for v in unnamed)
            raise RuntimeError(f"{prefix}*: no name for {missing} (or a name given twice)")

    def name(self, value: int, where: str) -> N:
        """The name of a wire value; ``InvalidArgument`` naming ``where`` when it has none
        (unset, or from a newer peer)."""
        if value not in self.from_proto:
            raise InvalidArgument(where, f"must be one of {list(self.names)}, got {value}")
        return self.from_proto[value]

    def label(self, value: int) -> str:
        """The name of a wire value for display; ``"?"`` when it has none."""
        return self.from_proto.get(value, "?")


STUDY_STATES: EnumNames[StudyStateName, pb.StudyState] = EnumNames(
    pb.StudyState, "STUDY_STATE_", get_args(StudyStateName)
)
TRIAL_STATES: EnumNames[TrialStateName, pb.TrialState] = EnumNames(
    pb.TrialState, "TRIAL_STATE_", get_args(TrialStateName)
)
FAILURE_KINDS: EnumNames[FailureKindName, pb.FailureKind] = EnumNames(
    pb.FailureKind, "FAILURE_KIND_", get_args(FailureKindName)
)
