"""Validation: a parsed ``StudySpec`` checked completely, against the stage registry and
the metric catalog. The first bad field raises ``InvalidArgument`` naming it
(``search_space.learning_rate.low: must be > 0 when log is set``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stagetune.contract.datafiles import SUFFIXES, columns_of, required_columns
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec.fields import as_mapping, as_number, check_finite, check_known
from stagetune.contract.spec.model import (
    SAMPLERS,
    CategoricalParam,
    FloatParam,
    IntParam,
    ParamSpec,
    ParamValue,
    StudySpec,
)
from stagetune.contract.stages import REWARD_FUNCTIONS, RUNNER_KEYS, STAGES, ParamDef
from stagetune.objectives.catalog import METRICS

__all__ = ["MAX_MAGNITUDE", "LIMITS", "check_bounded", "check_count", "validate_spec"]

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
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_bounded(value: float, where: str) -> None:
    """A metric value or objective reference: finite and within +-``MAX_MAGNITUDE``."""
    check_finite(value, where)
    if abs(value) > MAX_MAGNITUDE:
        raise InvalidArgument(where, f"must lie within +-{MAX_MAGNITUDE:g}, got {value:g}")


def check_count(n: int, limit: int, where: str) -> None:
    """A list of ``n`` entries where at most ``limit`` are allowed."""
    if n > limit:
        raise InvalidArgument(where, f"has {n} entries; the limit is {limit}")


def _of_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` is a value of a knob of this kind (an int is a float, a bool is
    not a number)."""
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "float":
        return isinstance(value, (int, float))
    if kind == "int":
        return isinstance(value, int)
    return kind == "str" and isinstance(value, str)


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
            if not _of_kind(c, kind):
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
    stage = STAGES.get(spec.stage)
    if stage is None:
        raise InvalidArgument("stage", f"unknown stage {spec.stage!r}; one of {sorted(STAGES)}")
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
        knob = stage.params.get(p.name)
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
    if not 1 <= spec.budget.max_trials <= 100_000:
        raise InvalidArgument("budget.max_trials", "must be between 1 and 100000")
    if not 0 <= spec.budget.max_retries <= 10:
        raise InvalidArgument("budget.max_retries", "must be between 0 and 10")
    if spec.sampler.kind not in SAMPLERS:
        raise InvalidArgument("sampler.kind", f"must be one of {list(SAMPLERS)}")
    _validate_runner(spec)


def _validate_runner(spec: StudySpec) -> None:
    stage = STAGES[spec.stage]
    runner = spec.runner
    check_known(runner, set(RUNNER_KEYS), "runner")
    model = as_mapping(runner.get("model"), "runner.model")
    if ("name_or_path" in model) == ("tiny" in model):
        raise InvalidArgument("runner.model", "needs exactly one of name_or_path or tiny")
    check_known(model, {"name_or_path", "tiny"}, "runner.model")
    if "tiny" in model:
        tiny = as_mapping(model["tiny"], "runner.model.tiny")
        check_known(
            tiny,
            {"hidden_size", "num_layers", "num_heads", "intermediate_size"},
            "runner.model.tiny",
        )
        for key, value in tiny.items():
            if as_number(value, f"runner.model.tiny.{key}", int) < 1:
                raise InvalidArgument(f"runner.model.tiny.{key}", "must be >= 1")
    elif not isinstance(model["name_or_path"], str) or not model["name_or_path"]:
        raise InvalidArgument("runner.model.name_or_path", "must be a non-empty string")
    data = as_mapping(runner.get("data"), "runner.data")
    if ("synthetic" in data) == ("path" in data):
        raise InvalidArgument("runner.data", "needs exactly one of synthetic or path")
    column_keys = set(stage.data_columns)
    check_known(data, {"synthetic", "path", "train_size", "eval_size"} | column_keys, "runner.data")
    if "synthetic" in data and data["synthetic"] != "arithmetic":
        raise InvalidArgument("runner.data.synthetic", "the synthetic task is 'arithmetic'")
    if "path" in data and (not isinstance(data["path"], str) or not data["path"]):
        raise InvalidArgument("runner.data.path", "must be a non-empty string")
    for key in column_keys & set(data):
        value = data[key]
        names = value if key == "prompt_columns" else [value]
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(c, str) and c for c in names)
        ):
            want = "a non-empty list of column names" if key == "prompt_columns" else "a name"
            raise InvalidArgument(f"runner.data.{key}", f"must be {want}")
    for key in ("train_size", "eval_size"):
        if key in data and as_number(data[key], f"runner.data.{key}", int) < 1:
            raise InvalidArgument(f"runner.data.{key}", "must be >= 1")
    if "path" in data:
        _check_data_file(stage.data_columns, data)
    training = as_mapping(runner.get("training"), "runner.training")
    check_known(training, set(stage.training_keys), "runner.training")
    for key, value in training.items():
        _check_fixed(spec.stage, key, value)
    if "processes" in runner and as_number(runner["processes"], "runner.processes", int) < 1:
        raise InvalidArgument("runner.processes", "must be >= 1")
    if "save_model" in runner and not isinstance(runner["save_model"], bool):
        raise InvalidArgument("runner.save_model", "must be true or false")
    if spec.stage == "grpo":
        _check_generation_batch(spec)


def _values(spec: StudySpec, name: str) -> list[Any] | None:
    """Every value ``name`` can take in this study: its choices, its fixed value, or None
    when it is a range or left to the runner's default."""
    for p in spec.search_space:
        if p.name == name:
            return list(p.choices) if isinstance(p, CategoricalParam) else None
    training = spec.runner.get("training", {})
    return [training[name]] if name in training else None


def _check_generation_batch(spec: StudySpec) -> None:
    """GRPO samples num_generations completions per prompt: every batch of completions
    (micro-batch x processes x accumulation) must hold whole groups."""
    batches = _values(spec, "per_device_train_batch_size")
    groups = _values(spec, "num_generations")
    accum = _values(spec, "gradient_accumulation_steps")
    if batches is None or groups is None or (accum is not None and len(accum) != 1):
        return
    scale = int(spec.runner.get("processes", 1)) * (int(accum[0]) if accum else 1)
    for b in batches:
        for g in groups:
            if (int(b) * scale) % int(g):
                raise InvalidArgument(
                    "search_space.num_generations",
                    f"{g} completions per prompt do not divide a batch of {int(b) * scale} "
                    "(per_device_train_batch_size x processes x gradient_accumulation_steps)",
                )


def _check_fixed(stage_name: str, key: str, value: Any) -> None:
    """A fixed value under ``runner.training`` has the knob's kind and a valid value."""
    where = f"runner.training.{key}"
    knob = STAGES[stage_name].knob(key)
    assert knob is not None
    if key == "reward_functions":
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise InvalidArgument(where, "must be a list of reward function names")
        for name in names:
            if name not in REWARD_FUNCTIONS:
                raise InvalidArgument(
                    where, f"unknown reward function {name!r}; one of {sorted(REWARD_FUNCTIONS)}"
                )
        return
    if not _of_kind(value, knob.kind):
        raise InvalidArgument(where, f"takes a {knob.kind} value, got {value!r}")
    if isinstance(value, float):
        check_finite(value, where)
    why = knob.check(value)
    if why is not None:
        raise InvalidArgument(where, why)


def _check_data_file(stage_columns: dict[str, str], data: Mapping[str, Any]) -> None:
    """Refuse a mapped column the file lacks. A path this process cannot see (a worker's
    own disk) is checked by the worker instead, naming the same field."""
    path = Path(data["path"])
    if not path.is_dir() and not any(path.name.endswith(s) for s in SUFFIXES):
        raise InvalidArgument(
            "runner.data.path", f"{path.name}: expected a folder or one of {list(SUFFIXES)}"
        )
    if not path.exists():
        return
    try:
        columns = columns_of(path)
    except (OSError, ValueError) as e:
        raise InvalidArgument("runner.data.path", f"cannot read {path.name}: {e}") from None
    if columns is None:
        return
    for key, names in required_columns(stage_columns, dict(data)).items():
        for name in names:
            if name not in columns:
                raise InvalidArgument(
                    f"runner.data.{key}",
                    f"column {name!r} not in {path.name} (columns: {sorted(columns)})",
                )
