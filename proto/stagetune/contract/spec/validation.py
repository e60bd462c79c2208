"""Validation: a parsed ``StudySpec`` checked completely, against the stage registry and
the metric catalog. The first bad field raises ``InvalidArgument`` naming it
(``search_space.learning_rate.low: must be > 0 when log is set``).

Shape only: nothing here opens a file a spec names, so the server can run it on any
request and its answer says nothing about its own disk. The data file is checked where it
is meant to be, by ``stagetune.contract.datafiles.check_data_files``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec.custom import custom_knob, parse_custom_runner
from stagetune.contract.spec.fields import as_mapping, check_finite
from stagetune.contract.spec.model import (
    SAMPLERS,
    CategoricalParam,
    FloatParam,
    IntParam,
    ParamSpec,
    ParamValue,
    StudySpec,
)
from stagetune.contract.spec.runner import RunnerSettings, parse_runner
from stagetune.contract.stages import CUSTOM, STAGES, ParamDef, find_stage
from stagetune.objectives.catalog import METRICS

__all__ = [
    "MAX_MAGNITUDE",
    "MAX_DEVICE_HOURS",
    "LIMITS",
    "check_bounded",
    "check_count",
    "check_device_hours",
    "validate_spec",
]

# Largest magnitude of a metric value or an objective reference: hypervolumes (up to 8
# objectives, references up to twice the first values) stay finite. No loss, latency,
# memory or token count comes near it.
MAX_MAGNITUDE = 1e18
#: How many of each list a spec may hold: far above any real study, low enough that no
#: spec makes the sampler, the front or a response blow up.
LIMITS = {
    "search_space": 64,
    "choices": 256,
    "objectives": 8,
    "constraints": 32,
    "warm_start.studies": 16,
}
#: Largest device-hour budget: a million device-hours, far above any study.
MAX_DEVICE_HOURS = 1e6
#: Rungs a study may have, the last (max_steps) included.
MAX_RUNGS = 100
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_bounded(value: float, where: str) -> None:
    """A metric value or objective reference: finite and within +-``MAX_MAGNITUDE``."""
    check_finite(value, where)
    if abs(value) > MAX_MAGNITUDE:
        raise InvalidArgument(where, f"must lie within +-{MAX_MAGNITUDE:g}, got {value:g}")


def check_device_hours(hours: float | None, where: str) -> None:
    """A device-hour budget: unset, or finite, > 0 and at most ``MAX_DEVICE_HOURS``."""
    if hours is None:
        return
    check_finite(hours, where)
    if not 0 < hours <= MAX_DEVICE_HOURS:
        raise InvalidArgument(where, f"must be > 0 and <= {MAX_DEVICE_HOURS:g}, got {hours:g}")


def check_count(n: int, limit: int, where: str) -> None:
    """A list of ``n`` entries where at most ``limit`` are allowed."""
    if n > limit:
        raise InvalidArgument(where, f"has {n} entries; the limit is {limit}")


def _validate_param(p: ParamSpec, knob: ParamDef) -> None:
    where = f"search_space.{p.name}"
    kind = knob.kind
    if isinstance(p, FloatParam):
        if kind not in ("float",):
            raise InvalidArgument(
                f"{where}.type", f"{p.name} takes {kind} values, not a float range"
            )
        check_finite(p.low, f"{where}.low")
        check_finite(p.high, f"{where}.high")
        if p.low >= p.high:
            raise InvalidArgument(f"{where}.low", f"must be < high ({p.low} >= {p.high})")
        if p.log and p.low <= 0:
            raise InvalidArgument(f"{where}.low", "must be > 0 when log is set")
        if p.step is not None:
            check_finite(p.step, f"{where}.step")
            if p.log:
                raise InvalidArgument(f"{where}.step", "cannot be combined with log")
            if p.step <= 0:
                raise InvalidArgument(f"{where}.step", "must be > 0")
        _in_bounds(p.name, knob, where, p.low, p.high)
    elif isinstance(p, IntParam):
        if kind not in ("int",):
            raise InvalidArgument(
                f"{where}.type", f"{p.name} takes {kind} values, not an int range"
            )
        if p.low >= p.high:
            raise InvalidArgument(f"{where}.low", f"must be < high ({p.low} >= {p.high})")
        if p.log and p.low < 1:
            raise InvalidArgument(f"{where}.low", "must be >= 1 when log is set")
        if p.step < 1:
            raise InvalidArgument(f"{where}.step", "must be >= 1")
        if p.log and p.step != 1:
            raise InvalidArgument(f"{where}.step", "must be 1 when log is set")
        _in_bounds(p.name, knob, where, p.low, p.high)
    else:
        if not p.choices:
            raise InvalidArgument(f"{where}.choices", "must not be empty")
        check_count(len(p.choices), LIMITS["choices"], f"{where}.choices")
        seen: set[tuple[str, ParamValue]] = set()
        for i, c in enumerate(p.choices):
            key = (type(c).__name__, c)
            if key in seen:
                raise InvalidArgument(f"{where}.choices[{i}]", f"duplicate choice {c!r}")
            seen.add(key)
            if isinstance(c, float):
                check_finite(c, f"{where}.choices[{i}]")
            if not knob.of_kind(c):
                raise InvalidArgument(
                    f"{where}.choices[{i}]", f"{p.name} takes {kind} values, got {c!r}"
                )
            why = knob.check(c)
            if why is not None:
                raise InvalidArgument(f"{where}.choices[{i}]", f"{p.name} {why}")


def _in_bounds(name: str, knob: ParamDef, where: str, low: float, high: float) -> None:
    if knob.choices is not None:
        raise InvalidArgument(
            f"{where}.type", f"{name} takes one of {list(knob.choices)}: use a categorical"
        )
    for end, value in (("low", low), ("high", high)):
        why = knob.check(value)
        if why is not None:
            raise InvalidArgument(f"{where}.{end}", f"{name} {why}")


def validate_spec(spec: StudySpec) -> None:
    """Check a spec completely; raise ``InvalidArgument`` naming the first bad field."""
    if not _NAME.match(spec.name):
        raise InvalidArgument(
            "name", "must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    stage = find_stage(spec.stage)
    if stage is None:
        known = sorted([*STAGES, CUSTOM.name])
        raise InvalidArgument("stage", f"unknown stage {spec.stage!r}; one of {known}")
    if not spec.search_space:
        raise InvalidArgument("search_space", "must name at least one parameter")
    for field_name, items in (
        ("search_space", spec.search_space),
        ("objectives", spec.objectives),
        ("constraints", spec.constraints),
        ("warm_start.studies", spec.warm_start.studies),
    ):
        check_count(len(items), LIMITS[field_name], field_name)
    names: set[str] = set()
    for p in spec.search_space:
        if p.name in names:
            raise InvalidArgument(f"search_space.{p.name}", "appears twice")
        names.add(p.name)
        knob = custom_knob(p) if stage is CUSTOM else stage.params.get(p.name)
        if knob is None:
            raise InvalidArgument(
                f"search_space.{p.name}",
                f"not a parameter of stage {spec.stage}; one of {sorted(stage.params)}",
            )
        _validate_param(p, knob)
    if not spec.objectives:
        raise InvalidArgument("objectives", "must list at least one objective")
    metrics: set[str] = set()
    for i, o in enumerate(spec.objectives):
        if o.metric not in METRICS:
            raise InvalidArgument(f"objectives[{i}].metric", f"unknown metric {o.metric!r}")
        if o.metric in metrics:
            raise InvalidArgument(f"objectives[{i}].metric", f"{o.metric} appears twice")
        metrics.add(o.metric)
        if o.direction not in ("minimize", "maximize"):
            raise InvalidArgument(f"objectives[{i}].direction", "must be minimize or maximize")
        if o.reference is not None:  # bounded: the hypervolume must stay finite
            check_bounded(o.reference, f"objectives[{i}].reference")
    for i, source in enumerate(spec.warm_start.studies):
        if not _NAME.match(source):
            raise InvalidArgument(f"warm_start.studies[{i}]", f"{source!r} is not a study name")
        if source == spec.name:
            raise InvalidArgument(f"warm_start.studies[{i}]", "a study cannot seed itself")
    for i, c in enumerate(spec.constraints):
        where = f"constraints[{i}]"
        if c.metric not in METRICS:
            raise InvalidArgument(f"{where}.metric", f"unknown metric {c.metric!r}")
        if c.max is None and c.min is None:
            raise InvalidArgument(where, "needs max, min or both")
        for end, value in (("max", c.max), ("min", c.min)):
            if value is not None:
                check_finite(value, f"{where}.{end}")
        if c.max is not None and c.min is not None and c.min > c.max:
            raise InvalidArgument(f"{where}.min", f"must be <= max ({c.min} > {c.max})")
    f = spec.fidelity
    if f.min_steps < 1:
        raise InvalidArgument("fidelity.min_steps", "must be >= 1")
    if f.max_steps < f.min_steps:
        raise InvalidArgument("fidelity.max_steps", f"must be >= min_steps ({f.min_steps})")
    if f.max_steps > 10_000_000:
        raise InvalidArgument("fidelity.max_steps", "must be <= 10000000")
    check_finite(f.reduction_factor, "fidelity.reduction_factor")
    if f.reduction_factor <= 1:
        raise InvalidArgument("fidelity.reduction_factor", "must be > 1")
    # Counted without listing them: a factor a hair above 1 would make listing the rungs,
    # which every acquire and rung report does, take hours.
    if math.log(f.max_steps / f.min_steps) / math.log(f.reduction_factor) > MAX_RUNGS - 1:
        raise InvalidArgument(
            "fidelity.reduction_factor",
            f"gives more than {MAX_RUNGS} rungs from min_steps {f.min_steps} to max_steps "
            f"{f.max_steps}; raise it",
        )
    if not 0 <= f.min_reports <= 100_000:
        raise InvalidArgument("fidelity.min_reports", "must be between 0 and 100000")
    rungs = f.rungs()
    if not 1 <= f.brackets <= len(rungs):
        raise InvalidArgument(
            "fidelity.brackets", f"must be between 1 and {len(rungs)} (the rungs {rungs})"
        )
    if not 1 <= spec.budget.max_trials <= 100_000:
        raise InvalidArgument("budget.max_trials", "must be between 1 and 100000")
    if not 0 <= spec.budget.max_retries <= 10:
        raise InvalidArgument("budget.max_retries", "must be between 0 and 10")
    check_device_hours(spec.budget.max_device_hours, "budget.max_device_hours")
    if spec.sampler.kind not in SAMPLERS:
        raise InvalidArgument("sampler.kind", f"must be one of {list(SAMPLERS)}")
    _validate_runner(spec)


def _validate_runner(spec: StudySpec) -> None:
    if spec.stage == CUSTOM.name:
        parse_custom_runner(spec.runner)
        return
    runner = parse_runner(spec.stage, spec.runner)
    if spec.stage == "grpo":
        _check_generation_batch(spec, runner)


def _values(spec: StudySpec, runner: RunnerSettings, name: str) -> list[Any] | None:
    """Every value ``name`` can take in this study: its choices, its fixed value, or None
    when it is a range or left to the runner's default."""
    for p in spec.search_space:
        if p.name == name:
            return list(p.choices) if isinstance(p, CategoricalParam) else None
    fixed = as_mapping(spec.runner.get("training"), "runner.training")
    return [getattr(runner.training, name)] if name in fixed else None


def _check_generation_batch(spec: StudySpec, runner: RunnerSettings) -> None:
    """GRPO samples num_generations completions per prompt: every batch of completions
    (micro-batch x processes x accumulation) must hold whole groups."""
    batches = _values(spec, runner, "per_device_train_batch_size")
    groups = _values(spec, runner, "num_generations")
    accum = _values(spec, runner, "gradient_accumulation_steps")
    if batches is None or groups is None or (accum is not None and len(accum) != 1):
        return
    scale = (runner.processes or 1) * (int(accum[0]) if accum else 1)
    for b in batches:
        for g in groups:
            if (int(b) * scale) % int(g):
                raise InvalidArgument(
                    "search_space.num_generations",
                    f"{g} completions per prompt do not divide a batch of {int(b) * scale} "
                    "(per_device_train_batch_size x processes x gradient_accumulation_steps)",
                )
