"""Wire conversion: ``StudySpec`` <-> ``stagetune.v1.StudySpec``, and parameter values.

``spec_from_proto`` checks only what the wire form can get wrong (an unset enum, a value
with no kind, a non-finite number in the runner struct); ``validate_spec`` does the rest.
The runner section travels as a ``Struct``, exactly as the team wrote it.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.names import EnumNames
from stagetune.contract.spec.model import (
    DIRECTIONS,
    EARLY_STOPPING,
    SAMPLERS,
    BudgetSpec,
    CategoricalParam,
    ConstraintSpec,
    Direction,
    EarlyStoppingName,
    FidelitySpec,
    FloatParam,
    IntParam,
    ObjectiveSpec,
    ParamSpec,
    ParamValue,
    SamplerConfig,
    SamplerName,
    StudySpec,
    WarmStartSpec,
)
from stagetune.contract.stages import STAGE_NAMES
from stagetune.v1 import types_pb2 as pb

__all__ = ["spec_to_proto", "spec_from_proto", "value_to_proto", "value_from_proto"]

_DIRECTIONS: EnumNames[Direction, pb.Direction] = EnumNames(pb.Direction, "DIRECTION_", DIRECTIONS)
_SAMPLERS: EnumNames[SamplerName, pb.SamplerKind] = EnumNames(
    pb.SamplerKind, "SAMPLER_KIND_", SAMPLERS
)
_STOPPING: EnumNames[EarlyStoppingName, pb.EarlyStopping] = EnumNames(
    pb.EarlyStopping, "EARLY_STOPPING_", EARLY_STOPPING
)


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
        stage=STAGE_NAMES.to_proto.get(spec.stage, pb.STAGE_UNSPECIFIED),
        fidelity=pb.Fidelity(
            min_steps=spec.fidelity.min_steps,
            max_steps=spec.fidelity.max_steps,
            reduction_factor=spec.fidelity.reduction_factor,
            min_reports=spec.fidelity.min_reports,
            brackets=spec.fidelity.brackets,
        ),
        budget=pb.Budget(max_trials=spec.budget.max_trials, max_retries=spec.budget.max_retries),
        sampler=pb.SamplerSpec(kind=_SAMPLERS.to_proto[spec.sampler.kind]),
    )
    if spec.sampler.seed is not None:
        msg.sampler.seed = spec.sampler.seed
    if spec.budget.max_device_hours is not None:
        msg.budget.max_device_hours = spec.budget.max_device_hours
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
        om = msg.objectives.add(metric=o.metric, direction=_DIRECTIONS.to_proto[o.direction])
        if o.reference is not None:
            om.reference = o.reference
    msg.runner.update(_jsonable(spec.runner))
    msg.early_stopping = _STOPPING.to_proto[spec.early_stopping]
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
        direction = _DIRECTIONS.name(o.direction, f"objectives[{i}].direction")
        ref = o.reference if o.HasField("reference") else None
        objectives.append(ObjectiveSpec(o.metric, direction, ref))
    stage = STAGE_NAMES.name(msg.stage, "stage")
    sampler_kind: SamplerName = "tpe"  # unset: the default sampler
    if msg.sampler.kind != pb.SAMPLER_KIND_UNSPECIFIED:
        sampler_kind = _SAMPLERS.name(msg.sampler.kind, "sampler.kind")
    try:
        runner = (
            _restore_ints(json_format.MessageToDict(msg.runner)) if msg.HasField("runner") else {}
        )
    except ValueError:  # NaN or infinity somewhere in the struct: JSON cannot carry it
        raise InvalidArgument("runner", "numbers must be finite") from None
    early_stopping = _STOPPING.name(msg.early_stopping, "early_stopping")
    return StudySpec(
        name=msg.name,
        stage=stage,
        search_space=tuple(space),
        objectives=tuple(objectives),
        fidelity=FidelitySpec(
            msg.fidelity.min_steps,
            msg.fidelity.max_steps,
            msg.fidelity.reduction_factor,
            msg.fidelity.min_reports,
            msg.fidelity.brackets or 1,  # 0: a client from before brackets
        ),
        budget=BudgetSpec(
            msg.budget.max_trials,
            msg.budget.max_retries,
            msg.budget.max_device_hours if msg.budget.HasField("max_device_hours") else None,
        ),
        sampler=SamplerConfig(
            sampler_kind, msg.sampler.seed if msg.sampler.HasField("seed") else None
        ),
        runner=runner,
        early_stopping=early_stopping,
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
