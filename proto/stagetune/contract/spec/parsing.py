"""Parsing: YAML data (a mapping) -> ``StudySpec``, filling the stage's defaults.

Parsing checks types and known keys, naming the field; ranges and cross-field rules are
``validation``'s job. ``load_spec_file`` does all three for a file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.packaged import example_configs, packaged_example
from stagetune.contract.spec.fields import as_mapping, as_number, check_known
from stagetune.contract.spec.model import (
    DIRECTIONS,
    EARLY_STOPPING,
    SAMPLERS,
    BudgetSpec,
    CategoricalParam,
    ConstraintSpec,
    FidelitySpec,
    FloatParam,
    IntParam,
    ObjectiveSpec,
    ParamSpec,
    SamplerConfig,
    StudySpec,
    WarmStartSpec,
)
from stagetune.contract.spec.strict_yaml import read_yaml_file
from stagetune.contract.spec.validation import validate_spec
from stagetune.contract.stages import STAGES
from stagetune.objectives.catalog import METRICS

__all__ = ["load_spec_file", "spec_from_mapping"]

_TOP_LEVEL = {
    "name",
    "stage",
    "search_space",
    "objectives",
    "fidelity",
    "budget",
    "sampler",
    "runner",
    "early_stopping",
    "constraints",
    "warm_start",
}


def load_spec_file(path: str | Path) -> StudySpec:
    """Read a study config file (YAML), then build and validate the spec.

    A bare name that is not a file here (``lora``) is the packaged example of that name
    (``stagetune configs`` lists them)."""
    source: Path | Traversable = Path(path)
    if not Path(path).exists():
        example = packaged_example(str(path))
        if example is None:
            known = ", ".join(example_configs())
            raise InvalidArgument(
                str(path), f"no such file, and no packaged config of that name ({known})"
            )
        source = example
    data = read_yaml_file(source)
    if not isinstance(data, Mapping):
        raise InvalidArgument(str(path), "must be a mapping of study fields")
    spec = spec_from_mapping(data)
    validate_spec(spec)
    return spec


def _param_from_mapping(name: str, data: Mapping[str, Any]) -> ParamSpec:
    where = f"search_space.{name}"
    kind = data.get("type")
    if kind == "float":
        check_known(data, {"type", "low", "high", "log", "step"}, where)
        step = data.get("step")
        return FloatParam(
            name,
            as_number(data.get("low"), f"{where}.low"),
            as_number(data.get("high"), f"{where}.high"),
            bool(data.get("log", False)),
            None if step is None else as_number(step, f"{where}.step"),
        )
    if kind == "int":
        check_known(data, {"type", "low", "high", "log", "step"}, where)
        return IntParam(
            name,
            as_number(data.get("low"), f"{where}.low", int),
            as_number(data.get("high"), f"{where}.high", int),
            bool(data.get("log", False)),
            as_number(data.get("step", 1), f"{where}.step", int),
        )
    if kind == "categorical":
        check_known(data, {"type", "choices"}, where)
        choices = data.get("choices")
        if not isinstance(choices, Sequence) or isinstance(choices, str):
            raise InvalidArgument(f"{where}.choices", "must be a list")
        for i, c in enumerate(choices):
            if not isinstance(c, (bool, int, float, str)):
                raise InvalidArgument(f"{where}.choices[{i}]", "must be a number, string or bool")
        return CategoricalParam(name, tuple(choices))
    raise InvalidArgument(f"{where}.type", f"must be float, int or categorical, got {kind!r}")


def spec_from_mapping(data: Mapping[str, Any]) -> StudySpec:
    """Build a typed spec from parsed YAML. Fills defaults; ``validate_spec`` checks ranges."""
    check_known(data, _TOP_LEVEL, "")
    name = data.get("name")
    if not isinstance(name, str):
        raise InvalidArgument("name", "is required and must be a string")
    stage = data.get("stage")
    if not isinstance(stage, str):
        raise InvalidArgument("stage", f"is required; one of {sorted(STAGES)}")
    stage_def = STAGES.get(stage)

    space_data = data.get("search_space")
    if space_data is None and stage_def is not None:
        space_data = stage_def.default_search_space
    space = [
        _param_from_mapping(str(k), as_mapping(v, f"search_space.{k}"))
        for k, v in as_mapping(space_data, "search_space").items()
    ]

    obj_data = data.get("objectives")
    if obj_data is None:
        obj_data = list(stage_def.default_objectives) if stage_def else []
    if not isinstance(obj_data, Sequence) or isinstance(obj_data, str):
        raise InvalidArgument("objectives", "must be a list")
    objectives = []
    for i, item in enumerate(obj_data):
        where = f"objectives[{i}]"
        entry = {"metric": item} if isinstance(item, str) else dict(as_mapping(item, where))
        check_known(entry, {"metric", "direction", "reference"}, where)
        metric = entry.get("metric")
        if not isinstance(metric, str) or metric not in METRICS:
            raise InvalidArgument(
                f"{where}.metric", f"unknown metric {metric!r}; one of {sorted(METRICS)}"
            )
        raw = entry.get("direction", METRICS[metric].direction)
        if raw not in DIRECTIONS:
            raise InvalidArgument(f"{where}.direction", "must be minimize or maximize")
        direction = raw
        ref = entry.get("reference")
        objectives.append(
            ObjectiveSpec(
                metric, direction, None if ref is None else as_number(ref, f"{where}.reference")
            )
        )

    fid = as_mapping(data.get("fidelity"), "fidelity")
    check_known(
        fid, {"min_steps", "max_steps", "reduction_factor", "min_reports", "brackets"}, "fidelity"
    )
    if "max_steps" not in fid:
        raise InvalidArgument("fidelity.max_steps", "is required")
    max_steps = as_number(fid["max_steps"], "fidelity.max_steps", int)
    fidelity = FidelitySpec(
        as_number(fid.get("min_steps", max_steps), "fidelity.min_steps", int),
        max_steps,
        as_number(fid.get("reduction_factor", 3.0), "fidelity.reduction_factor"),
        as_number(fid.get("min_reports", 0), "fidelity.min_reports", int),
        as_number(fid.get("brackets", 1), "fidelity.brackets", int),
    )

    bud = as_mapping(data.get("budget"), "budget")
    check_known(bud, {"max_trials", "max_retries", "max_device_hours"}, "budget")
    if "max_trials" not in bud:
        raise InvalidArgument("budget.max_trials", "is required")
    hours = bud.get("max_device_hours")
    budget = BudgetSpec(
        as_number(bud["max_trials"], "budget.max_trials", int),
        as_number(bud.get("max_retries", 2), "budget.max_retries", int),
        None if hours is None else as_number(hours, "budget.max_device_hours"),
    )

    samp = as_mapping(data.get("sampler"), "sampler")
    check_known(samp, {"kind", "seed"}, "sampler")
    kind = samp.get("kind", "tpe")
    if kind not in SAMPLERS:
        raise InvalidArgument("sampler.kind", f"must be one of {list(SAMPLERS)}, got {kind!r}")
    seed = samp.get("seed")
    sampler = SamplerConfig(kind, None if seed is None else as_number(seed, "sampler.seed", int))

    runner = dict(as_mapping(data.get("runner"), "runner"))
    stopping = data.get("early_stopping", "mo_asha")
    if stopping not in EARLY_STOPPING:
        raise InvalidArgument("early_stopping", f"must be mo_asha or none, got {stopping!r}")
    return StudySpec(
        name,
        stage,
        tuple(space),
        tuple(objectives),
        fidelity,
        budget,
        sampler,
        runner,
        stopping,
        _constraints_from(data.get("constraints", [])),
        _warm_start_from(data.get("warm_start", {})),
    )


def _warm_start_from(data: Any) -> WarmStartSpec:
    entry = as_mapping(data, "warm_start")
    check_known(entry, {"studies", "defaults"}, "warm_start")
    studies = entry.get("studies", [])
    if not isinstance(studies, list) or not all(isinstance(s, str) for s in studies):
        raise InvalidArgument("warm_start.studies", "must be a list of study names")
    defaults = entry.get("defaults", False)
    if not isinstance(defaults, bool):
        raise InvalidArgument("warm_start.defaults", "must be true or false")
    return WarmStartSpec(tuple(studies), defaults)


_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*(\S+)\s*$")


def _constraints_from(data: Any) -> tuple[ConstraintSpec, ...]:
    """``constraints:`` items as "metric <= value" / "metric >= value" strings or
    mappings ``{metric, max, min}``."""
    if not isinstance(data, Sequence) or isinstance(data, str):
        raise InvalidArgument("constraints", "must be a list")
    out = []
    for i, item in enumerate(data):
        where = f"constraints[{i}]"
        if isinstance(item, str):
            m = _CONSTRAINT.match(item)
            if m is None:
                raise InvalidArgument(
                    where, f"expected 'metric <= value' or 'metric >= value', got {item!r}"
                )
            metric, op, raw = m.groups()
            try:
                value = float(raw)
            except ValueError:
                raise InvalidArgument(where, f"{raw!r} is not a number") from None
            out.append(
                ConstraintSpec(metric, max=value)
                if op == "<="
                else ConstraintSpec(metric, min=value)
            )
            continue
        entry = as_mapping(item, where)
        check_known(entry, {"metric", "max", "min"}, where)
        metric = entry.get("metric")
        if not isinstance(metric, str):
            raise InvalidArgument(f"{where}.metric", "is required")
        bounds = {k: as_number(entry[k], f"{where}.{k}") for k in ("max", "min") if k in entry}
        out.append(ConstraintSpec(metric, **bounds))
    return tuple(out)
