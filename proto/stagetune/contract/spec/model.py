"""The study spec as typed, frozen domain objects: what a team submits, after parsing.

No reading, checking or wire code here: ``parsing`` builds these from YAML data,
``validation`` checks them, ``wire`` converts them to and from ``stagetune.v1``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

ParamValue = float | int | str | bool
Direction = Literal["minimize", "maximize"]
SamplerName = Literal["tpe", "nsga2", "random"]
EarlyStoppingName = Literal["mo_asha", "none"]

DIRECTIONS: tuple[Direction, ...] = get_args(Direction)
SAMPLERS: tuple[SamplerName, ...] = get_args(SamplerName)
EARLY_STOPPING: tuple[EarlyStoppingName, ...] = get_args(EarlyStoppingName)

__all__ = [
    "ParamValue",
    "Direction",
    "SamplerName",
    "EarlyStoppingName",
    "DIRECTIONS",
    "SAMPLERS",
    "EARLY_STOPPING",
    "FloatParam",
    "IntParam",
    "CategoricalParam",
    "ParamSpec",
    "ObjectiveSpec",
    "FidelitySpec",
    "SamplerConfig",
    "BudgetSpec",
    "ConstraintSpec",
    "WarmStartSpec",
    "StudySpec",
]


@dataclass(frozen=True)
class FloatParam:
    name: str
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class IntParam:
    name: str
    low: int
    high: int
    log: bool = False
    step: int = 1


@dataclass(frozen=True)
class CategoricalParam:
    name: str
    choices: tuple[ParamValue, ...]


ParamSpec = FloatParam | IntParam | CategoricalParam


@dataclass(frozen=True)
class ObjectiveSpec:
    metric: str
    direction: Direction
    reference: float | None = None


@dataclass(frozen=True)
class FidelitySpec:
    min_steps: int
    max_steps: int
    reduction_factor: float = 3.0
    min_reports: int = 0  # early stopping waits for this many reports at a rung (see below)
    # Asynchronous Hyperband's hedge: trial number n is in bracket n % brackets, and a
    # trial of bracket b is not stopped at its first b rungs (1: one bracket, plain ASHA).
    brackets: int = 1

    @property
    def reports_to_stop(self) -> int:
        """Reports a rung needs before early stopping stops anything there: ``min_reports``,
        and never fewer than ``ceil(reduction_factor)`` (below that, every trial is in the
        top ``1/reduction_factor``)."""
        return max(self.min_reports, math.ceil(self.reduction_factor))

    def stops_at(self, step: int, number: int) -> bool:
        """Whether early stopping may stop trial ``number`` at ``step``: a rung below the
        last, and not one of the first ``number % brackets`` rungs (its bracket's)."""
        rungs = self.rungs()
        return step in rungs[:-1] and rungs.index(step) >= number % self.brackets

    def rungs(self) -> list[int]:
        """Rung budgets: min_steps · η^i below max_steps, then max_steps itself."""
        rungs: list[int] = []
        budget = float(self.min_steps)
        while round(budget) < self.max_steps:
            step = int(round(budget))
            if not rungs or step > rungs[-1]:
                rungs.append(step)
            budget *= self.reduction_factor
        rungs.append(self.max_steps)
        return rungs


@dataclass(frozen=True)
class SamplerConfig:
    kind: SamplerName = "tpe"
    seed: int | None = None


@dataclass(frozen=True)
class BudgetSpec:
    """How much a study may spend: trials, retries of lost attempts, and device-hours (the
    sum of the ``device_seconds`` its trials report; None: no limit)."""

    max_trials: int
    max_retries: int = 2
    max_device_hours: float | None = None

    @property
    def max_device_seconds(self) -> float | None:
        return None if self.max_device_hours is None else self.max_device_hours * 3600.0


@dataclass(frozen=True)
class ConstraintSpec:
    """A hard limit on a metric: ``min <= value <= max`` (either side may be open)."""

    metric: str
    max: float | None = None
    min: float | None = None

    def excess(self, value: float) -> float:
        """How far ``value`` lies outside the limit (0 when it is inside; > 0 outside)."""
        over = value - self.max if self.max is not None else 0.0
        under = self.min - value if self.min is not None else 0.0
        return max(0.0, over, under)

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"{self.metric} >= {self.min:g}")
        if self.max is not None:
            parts.append(f"{self.metric} <= {self.max:g}")
        return " and ".join(parts)


@dataclass(frozen=True)
class WarmStartSpec:
    """Seeds queued before the sampler's first proposal: the Pareto sets of earlier
    studies of the same stage, and the stage's defaults from configs/warm_start.yaml."""

    studies: tuple[str, ...] = ()
    defaults: bool = False


@dataclass(frozen=True)
class StudySpec:
    """A study as submitted. ``runner`` is the runner section as the team wrote it (JSON
    values: it travels and is stored as is); ``spec.runner.parse_runner`` gives its typed
    form."""

    name: str
    stage: str
    search_space: tuple[ParamSpec, ...]
    objectives: tuple[ObjectiveSpec, ...]
    fidelity: FidelitySpec
    budget: BudgetSpec
    sampler: SamplerConfig = SamplerConfig()
    runner: dict[str, Any] = field(default_factory=dict)
    early_stopping: EarlyStoppingName = "mo_asha"
    constraints: tuple[ConstraintSpec, ...] = ()
    warm_start: WarmStartSpec = WarmStartSpec()

    def violated(self, metrics: dict[str, float]) -> str:
        """The first constraint ``metrics`` break, described with the value; "" if none."""
        for c in self.constraints:
            value = metrics.get(c.metric)
            if value is not None and c.excess(value) > 0:
                return f"{c.metric} = {value:g} breaks {c.describe()}"
        return ""

    @property
    def directions(self) -> list[Direction]:
        return [o.direction for o in self.objectives]

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    def param(self, name: str) -> ParamSpec:
        for p in self.search_space:
            if p.name == name:
                return p
        raise KeyError(name)

    def canonical_json(self) -> str:
        """A stable text form: equal specs give equal text (used for idempotent create)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
