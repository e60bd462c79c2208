"""Study specs: typed domain objects, parsed once from YAML and validated at the edge.

A ``StudySpec`` is what a team submits. ``load_spec_file`` reads YAML with a safe loader,
``spec_from_mapping`` builds the typed spec, and ``validate_spec`` checks it, raising
``InvalidArgument`` that names the offending field (``search_space.learning_rate.low: must
be > 0 when log is set``). The server validates again after converting from the wire, so a
spec that did not come through the CLI gets the same checks. ``spec_to_proto`` and
``spec_from_proto`` convert to and from ``stagetune.v1.StudySpec``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from google.protobuf import json_format

from stagetune.contract.datafiles import SUFFIXES, columns_of, required_columns
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.packaged import example_configs, packaged_example
from stagetune.contract.stages import REWARD_FUNCTIONS, RUNNER_KEYS, STAGES, ParamDef
from stagetune.objectives.catalog import METRICS
from stagetune.v1 import types_pb2 as pb

ParamValue = float | int | str | bool
Direction = Literal["minimize", "maximize"]
SamplerName = Literal["tpe", "nsga2", "random"]
EarlyStoppingName = Literal["mo_asha", "none"]

__all__ = [
    "ParamValue",
    "FloatParam",
    "IntParam",
    "CategoricalParam",
    "ParamSpec",
    "ObjectiveSpec",
    "ConstraintSpec",
    "WarmStartSpec",
    "FidelitySpec",
    "SamplerConfig",
    "BudgetSpec",
    "StudySpec",
    "MAX_SPEC_BYTES",
    "read_yaml_file",
    "check_bounded",
    "check_count",
    "LIMITS",
    "load_spec_file",
    "spec_from_mapping",
    "validate_spec",
    "spec_to_proto",
    "spec_from_proto",
    "value_to_proto",
    "value_from_proto",
]

MAX_SPEC_BYTES = 1 << 20
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
_SAMPLERS: tuple[SamplerName, ...] = ("tpe", "nsga2", "random")
_DIRECTIONS: dict[str, Direction] = {"minimize": "minimize", "maximize": "maximize"}
_EARLY_STOPPING: dict[str, EarlyStoppingName] = {"mo_asha": "mo_asha", "none": "none"}


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
    max_trials: int
    max_retries: int = 2


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


# ---------------------------------------------------------------- YAML → spec


_NO_ALIASES = "aliases (*name) are not allowed in a config"


class _StrictLoader(yaml.SafeLoader):
    """The safe loader (no Python tags) that also refuses anchors and aliases: a config
    never needs them, and nested aliases ("billion laughs") expand exponentially once the
    data is copied or serialised."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, _NO_ALIASES, event.start_mark)
        return super().compose_node(parent, index)


def read_yaml_file(path: str | Path | Traversable, *, quote: bool = True) -> Any:
    """A YAML config file's data, read with the strict safe loader; at most
    ``MAX_SPEC_BYTES`` are read. Errors: ``InvalidArgument`` naming the file; with
    ``quote=False`` (a file of secrets) they give only the line, never a word of the file
    (the parser's own descriptions quote it: a tag, a character)."""
    p = path if isinstance(path, Traversable) else Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # a pipe or a growing file has no honest size
    except OSError as e:
        raise InvalidArgument(str(path), f"cannot read: {e.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        limit = MAX_SPEC_BYTES
        raise InvalidArgument(str(path), f"file is over {limit} bytes; the limit is {limit}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(str(path), f"not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (safe, no aliases)
    except yaml.YAMLError as e:
        if quote:
            raise InvalidArgument(str(path), f"not valid YAML: {e}") from None
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        ours = f": {_NO_ALIASES}" if getattr(e, "problem", None) == _NO_ALIASES else ""
        raise InvalidArgument(str(path), f"not valid YAML{at}{ours}") from None
    except ValueError:  # a value YAML types but cannot build (a date such as 2024-13-45)
        raise InvalidArgument(str(path), "not valid YAML: a value could not be read") from None


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


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(where, f"must be a mapping, got {type(value).__name__}")
    return value


def _known(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise InvalidArgument(
                f"{prefix}{key}", f"unknown field; expected one of {sorted(allowed)}"
            )


def _number(value: Any, where: str, kind: type[int] | type[float] = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(where, f"must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidArgument(where, f"must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _param_from_mapping(name: str, data: Mapping[str, Any]) -> ParamSpec:
    where = f"search_space.{name}"
    kind = data.get("type")
    if kind == "float":
        _known(data, {"type", "low", "high", "log", "step"}, where)
        step = data.get("step")
        return FloatParam(
            name,
            _number(data.get("low"), f"{where}.low"),
            _number(data.get("high"), f"{where}.high"),
            bool(data.get("log", False)),
            None if step is None else _number(step, f"{where}.step"),
        )
    if kind == "int":
        _known(data, {"type", "low", "high", "log", "step"}, where)
        return IntParam(
            name,
            _number(data.get("low"), f"{where}.low", int),
            _number(data.get("high"), f"{where}.high", int),
            bool(data.get("log", False)),
            _number(data.get("step", 1), f"{where}.step", int),
        )
    if kind == "categorical":
        _known(data, {"type", "choices"}, where)
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
    _known(
        data,
        {
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
        },
        "",
    )
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
        _param_from_mapping(str(k), _mapping(v, f"search_space.{k}"))
        for k, v in _mapping(space_data, "search_space").items()
    ]

    obj_data = data.get("objectives")
    if obj_data is None:
        obj_data = list(stage_def.default_objectives) if stage_def else []
    if not isinstance(obj_data, Sequence) or isinstance(obj_data, str):
        raise InvalidArgument("objectives", "must be a list")
    objectives = []
    for i, item in enumerate(obj_data):
        where = f"objectives[{i}]"
        entry = {"metric": item} if isinstance(item, str) else dict(_mapping(item, where))
        _known(entry, {"metric", "direction", "reference"}, where)
        metric = entry.get("metric")
        if not isinstance(metric, str) or metric not in METRICS:
            raise InvalidArgument(
                f"{where}.metric", f"unknown metric {metric!r}; one of {sorted(METRICS)}"
            )
        raw = entry.get("direction", METRICS[metric].direction)
        if raw not in _DIRECTIONS:
            raise InvalidArgument(f"{where}.direction", "must be minimize or maximize")
        direction = _DIRECTIONS[raw]
        ref = entry.get("reference")
        objectives.append(
            ObjectiveSpec(
                metric, direction, None if ref is None else _number(ref, f"{where}.reference")
            )
        )

    fid = _mapping(data.get("fidelity"), "fidelity")
    _known(fid, {"min_steps", "max_steps", "reduction_factor"}, "fidelity")
    if "max_steps" not in fid:
        raise InvalidArgument("fidelity.max_steps", "is required")
    max_steps = _number(fid["max_steps"], "fidelity.max_steps", int)
    fidelity = FidelitySpec(
        _number(fid.get("min_steps", max_steps), "fidelity.min_steps", int),
        max_steps,
        _number(fid.get("reduction_factor", 3.0), "fidelity.reduction_factor"),
    )

    bud = _mapping(data.get("budget"), "budget")
    _known(bud, {"max_trials", "max_retries"}, "budget")
    if "max_trials" not in bud:
        raise InvalidArgument("budget.max_trials", "is required")
    budget = BudgetSpec(
        _number(bud["max_trials"], "budget.max_trials", int),
        _number(bud.get("max_retries", 2), "budget.max_retries", int),
    )

    samp = _mapping(data.get("sampler"), "sampler")
    _known(samp, {"kind", "seed"}, "sampler")
    kind = samp.get("kind", "tpe")
    if kind not in _SAMPLERS:
        raise InvalidArgument("sampler.kind", f"must be one of {list(_SAMPLERS)}, got {kind!r}")
    seed = samp.get("seed")
    sampler = SamplerConfig(kind, None if seed is None else _number(seed, "sampler.seed", int))

    runner = dict(_mapping(data.get("runner"), "runner"))
    stopping = data.get("early_stopping", "mo_asha")
    if stopping not in _EARLY_STOPPING:
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
        _EARLY_STOPPING[stopping],
        _constraints_from(data.get("constraints", [])),
        _warm_start_from(data.get("warm_start", {})),
    )


def _warm_start_from(data: Any) -> WarmStartSpec:
    entry = _mapping(data, "warm_start")
    _known(entry, {"studies", "defaults"}, "warm_start")
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
        entry = _mapping(item, where)
        _known(entry, {"metric", "max", "min"}, where)
        metric = entry.get("metric")
        if not isinstance(metric, str):
            raise InvalidArgument(f"{where}.metric", "is required")
        bounds = {k: _number(entry[k], f"{where}.{k}") for k in ("max", "min") if k in entry}
        out.append(ConstraintSpec(metric, **bounds))
    return tuple(out)


# ---------------------------------------------------------------- validation


def _finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(where, f"must be finite, got {value}")


def check_bounded(value: float, where: str) -> None:
    """A metric value or objective reference: finite and within +-``MAX_MAGNITUDE``."""
    _finite(value, where)
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
        _finite(p.low, f"{where}.low")
        _finite(p.high, f"{where}.high")
        if p.low >= p.high:
            raise InvalidArgument(f"{where}.low", f"must be < high ({p.low} >= {p.high})")
        if p.log and p.low <= 0:
            raise InvalidArgument(f"{where}.low", "must be > 0 when log is set")
        if p.step is not None:
            _finite(p.step, f"{where}.step")
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
                _finite(c, f"{where}.choices[{i}]")
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
                _finite(value, f"{where}.{end}")
        if c.max is not None and c.min is not None and c.min > c.max:
            raise InvalidArgument(f"{where}.min", f"must be <= max ({c.min} > {c.max})")
    f = spec.fidelity
    if f.min_steps < 1:
        raise InvalidArgument("fidelity.min_steps", "must be >= 1")
    if f.max_steps < f.min_steps:
        raise InvalidArgument("fidelity.max_steps", f"must be >= min_steps ({f.min_steps})")
    if f.max_steps > 10_000_000:
        raise InvalidArgument("fidelity.max_steps", "must be <= 10000000")
    _finite(f.reduction_factor, "fidelity.reduction_factor")
    if f.reduction_factor <= 1:
        raise InvalidArgument("fidelity.reduction_factor", "must be > 1")
    if not 1 <= spec.budget.max_trials <= 100_000:
        raise InvalidArgument("budget.max_trials", "must be between 1 and 100000")
    if not 0 <= spec.budget.max_retries <= 10:
        raise InvalidArgument("budget.max_retries", "must be between 0 and 10")
    if spec.sampler.kind not in _SAMPLERS:
        raise InvalidArgument("sampler.kind", f"must be one of {list(_SAMPLERS)}")
    _validate_runner(spec)


def _validate_runner(spec: StudySpec) -> None:
    stage = STAGES[spec.stage]
    runner = spec.runner
    _known(runner, set(RUNNER_KEYS), "runner")
    model = _mapping(runner.get("model"), "runner.model")
    if ("name_or_path" in model) == ("tiny" in model):
        raise InvalidArgument("runner.model", "needs exactly one of name_or_path or tiny")
    _known(model, {"name_or_path", "tiny"}, "runner.model")
    if "tiny" in model:
        tiny = _mapping(model["tiny"], "runner.model.tiny")
        _known(
            tiny,
            {"hidden_size", "num_layers", "num_heads", "intermediate_size"},
            "runner.model.tiny",
        )
        for key, value in tiny.items():
            if _number(value, f"runner.model.tiny.{key}", int) < 1:
                raise InvalidArgument(f"runner.model.tiny.{key}", "must be >= 1")
    elif not isinstance(model["name_or_path"], str) or not model["name_or_path"]:
        raise InvalidArgument("runner.model.name_or_path", "must be a non-empty string")
    data = _mapping(runner.get("data"), "runner.data")
    if ("synthetic" in data) == ("path" in data):
        raise InvalidArgument("runner.data", "needs exactly one of synthetic or path")
    column_keys = set(stage.data_columns)
    _known(data, {"synthetic", "path", "train_size", "eval_size"} | column_keys, "runner.data")
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
        if key in data and _number(data[key], f"runner.data.{key}", int) < 1:
            raise InvalidArgument(f"runner.data.{key}", "must be >= 1")
    if "path" in data:
        _check_data_file(stage.data_columns, data)
    training = _mapping(runner.get("training"), "runner.training")
    _known(training, set(stage.training_keys), "runner.training")
    for key, value in training.items():
        _check_fixed(spec.stage, key, value)
    if "processes" in runner and _number(runner["processes"], "runner.processes", int) < 1:
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
        _finite(value, where)
    why = knob.check(value)
    if why is not None:
        raise InvalidArgument(where, why)


# ---------------------------------------------------------------- wire conversion

_STAGE_TO_PB = {
    "pretrain_proxy": pb.STAGE_PRETRAIN_PROXY,
    "sft": pb.STAGE_SFT,
    "lora": pb.STAGE_LORA,
    "dpo": pb.STAGE_DPO,
    "grpo": pb.STAGE_GRPO,
}
_STAGE_FROM_PB = {v: k for k, v in _STAGE_TO_PB.items()}
_DIR_TO_PB = {"minimize": pb.DIRECTION_MINIMIZE, "maximize": pb.DIRECTION_MAXIMIZE}
_DIR_FROM_PB: dict[int, Direction] = {v: k for k, v in _DIR_TO_PB.items()}  # type: ignore[misc]
_SAMPLER_TO_PB = {
    "tpe": pb.SAMPLER_KIND_TPE,
    "nsga2": pb.SAMPLER_KIND_NSGA2,
    "random": pb.SAMPLER_KIND_RANDOM,
}
_SAMPLER_FROM_PB: dict[int, SamplerName] = {v: k for k, v in _SAMPLER_TO_PB.items()}  # type: ignore[misc]


_STOPPING_TO_PB = {
    "none": pb.EARLY_STOPPING_NONE,
    "mo_asha": pb.EARLY_STOPPING_MO_ASHA,
}
_STOPPING_FROM_PB: dict[int, EarlyStoppingName] = {
    pb.EARLY_STOPPING_NONE: "none",
    pb.EARLY_STOPPING_MO_ASHA: "mo_asha",
}


def value_to_proto(value: ParamValue) -> pb.ParameterValue:
    if isinstance(value, bool):
        return pb.ParameterValue(bool_value=value)
    if isinstance(value, int):
        return pb.ParameterValue(int_value=value)
    if isinstance(value, float):
        return pb.ParameterValue(float_value=value)
    return pb.ParameterValue(string_value=str(value))


def value_from_proto(value: pb.ParameterValue, where: str = "value") -> ParamValue:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(where, "no value set")
    result: ParamValue = getattr(value, kind)
    return result


def spec_to_proto(spec: StudySpec) -> pb.StudySpec:
    msg = pb.StudySpec(
        name=spec.name,
        stage=_STAGE_TO_PB.get(spec.stage, pb.STAGE_UNSPECIFIED),
        fidelity=pb.Fidelity(
            min_steps=spec.fidelity.min_steps,
            max_steps=spec.fidelity.max_steps,
            reduction_factor=spec.fidelity.reduction_factor,
        ),
        budget=pb.Budget(max_trials=spec.budget.max_trials, max_retries=spec.budget.max_retries),
        sampler=pb.SamplerSpec(kind=_SAMPLER_TO_PB[spec.sampler.kind]),
    )
    if spec.sampler.seed is not None:
        msg.sampler.seed = spec.sampler.seed
    for p in spec.search_space:
        ps = msg.search_space.add(name=p.name)
        if isinstance(p, FloatParam):
            ps.float_range.CopyFrom(
                pb.FloatRange(low=p.low, high=p.high, log=p.log, step=p.step or 0.0)
            )
        elif isinstance(p, IntParam):
            ps.int_range.CopyFrom(pb.IntRange(low=p.low, high=p.high, log=p.log, step=p.step))
        else:
            ps.categorical.CopyFrom(pb.Categorical(choices=[value_to_proto(c) for c in p.choices]))
    for o in spec.objectives:
        om = msg.objectives.add(metric=o.metric, direction=_DIR_TO_PB[o.direction])
        if o.reference is not None:
            om.reference = o.reference
    msg.runner.update(_jsonable(spec.runner))
    msg.early_stopping = _STOPPING_TO_PB[spec.early_stopping]
    if spec.warm_start != WarmStartSpec():
        msg.warm_start.CopyFrom(
            pb.WarmStart(studies=list(spec.warm_start.studies), defaults=spec.warm_start.defaults)
        )
    for c in spec.constraints:
        cm = msg.constraints.add(metric=c.metric)
        if c.max is not None:
            cm.max = c.max
        if c.min is not None:
            cm.min = c.min
    return msg


def _jsonable(value: Any) -> Any:
    # Struct holds JSON values only; a round trip through json makes the YAML's ints
    # floats, which ``_restore_ints`` undoes on the way back.
    return json.loads(json.dumps(value))


def _restore_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _restore_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_ints(v) for v in value]
    return value


def spec_from_proto(msg: pb.StudySpec) -> StudySpec:
    """Convert a wire spec to the domain spec. Does not validate ranges (see validate_spec)."""
    space: list[ParamSpec] = []
    for i, ps in enumerate(msg.search_space):
        where = f"search_space[{i}]"
        kind = ps.WhichOneof("domain")
        if kind == "float_range":
            r = ps.float_range
            space.append(FloatParam(ps.name, r.low, r.high, r.log, r.step or None))
        elif kind == "int_range":
            ir = ps.int_range
            space.append(IntParam(ps.name, ir.low, ir.high, ir.log, ir.step or 1))
        elif kind == "categorical":
            choices = tuple(
                value_from_proto(c, f"{where}.categorical.choices[{j}]")
                for j, c in enumerate(ps.categorical.choices)
            )
            space.append(CategoricalParam(ps.name, choices))
        else:
            raise InvalidArgument(f"{where}.domain", f"parameter {ps.name!r} has no domain")
    objectives = []
    for i, o in enumerate(msg.objectives):
        if o.direction not in _DIR_FROM_PB:
            raise InvalidArgument(f"objectives[{i}].direction", "must be MINIMIZE or MAXIMIZE")
        ref = o.reference if o.HasField("reference") else None
        objectives.append(ObjectiveSpec(o.metric, _DIR_FROM_PB[o.direction], ref))
    if msg.stage not in _STAGE_FROM_PB:
        raise InvalidArgument("stage", "must be set")
    if msg.sampler.kind == pb.SAMPLER_KIND_UNSPECIFIED:
        sampler_kind: SamplerName = "tpe"
    elif msg.sampler.kind in _SAMPLER_FROM_PB:
        sampler_kind = _SAMPLER_FROM_PB[msg.sampler.kind]
    else:
        raise InvalidArgument("sampler.kind", f"unknown sampler {msg.sampler.kind}")
    try:
        runner = (
            _restore_ints(json_format.MessageToDict(msg.runner)) if msg.HasField("runner") else {}
        )
    except ValueError:  # NaN or infinity somewhere in the struct: JSON cannot carry it
        raise InvalidArgument("runner", "numbers must be finite") from None
    if msg.early_stopping not in _STOPPING_FROM_PB:
        raise InvalidArgument("early_stopping", "must be NONE or MO_ASHA")
    return StudySpec(
        name=msg.name,
        stage=_STAGE_FROM_PB[msg.stage],
        search_space=tuple(space),
        objectives=tuple(objectives),
        fidelity=FidelitySpec(
            msg.fidelity.min_steps, msg.fidelity.max_steps, msg.fidelity.reduction_factor
        ),
        budget=BudgetSpec(msg.budget.max_trials, msg.budget.max_retries),
        sampler=SamplerConfig(
            sampler_kind, msg.sampler.seed if msg.sampler.HasField("seed") else None
        ),
        runner=runner,
        early_stopping=_STOPPING_FROM_PB[msg.early_stopping],
        constraints=tuple(
            ConstraintSpec(
                c.metric,
                max=c.max if c.HasField("max") else None,
                min=c.min if c.HasField("min") else None,
            )
            for c in msg.constraints
        ),
        warm_start=WarmStartSpec(tuple(msg.warm_start.studies), msg.warm_start.defaults),
    )
