"""Wire conversion: ``PipelineSpec`` <-> ``stagetune.v1.PipelineSpec``.

``pipeline_from_proto`` checks only what the wire form can get wrong (an unset selection
rule, and what ``spec_from_proto`` checks of each stage's study); ``validate_pipeline``
does the rest.
"""

from __future__ import annotations

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.names import EnumNames
from stagetune.contract.pipeline import (
    SELECTION_RULES,
    PipelineSpec,
    PipelineStageSpec,
    Selection,
    SelectionRuleName,
)
from stagetune.contract.spec import ConstraintSpec, spec_from_proto, spec_to_proto
from stagetune.v1 import pipeline_service_pb2 as ps
from stagetune.v1 import types_pb2 as pb

__all__ = ["SELECTION_RULE_NAMES", "pipeline_to_proto", "pipeline_from_proto"]

SELECTION_RULE_NAMES: EnumNames[SelectionRuleName, ps.SelectionRule] = EnumNames(
    ps.SelectionRule, "SELECTION_RULE_", SELECTION_RULES
)


def _limit_to_proto(c: ConstraintSpec) -> pb.Constraint:
    msg = pb.Constraint(metric=c.metric)
    if c.max is not None:
        msg.max = c.max
    if c.min is not None:
        msg.min = c.min
    return msg


def _limit_from_proto(c: pb.Constraint) -> ConstraintSpec:
    return ConstraintSpec(
        c.metric,
        max=c.max if c.HasField("max") else None,
        min=c.min if c.HasField("min") else None,
    )


def pipeline_to_proto(spec: PipelineSpec) -> ps.PipelineSpec:
    msg = ps.PipelineSpec(name=spec.name)
    if spec.max_device_hours is not None:
        msg.max_device_hours = spec.max_device_hours
    for stage in spec.stages:
        msg.stages.append(
            ps.PipelineStageSpec(
                name=stage.name,
                study=spec_to_proto(stage.study),
                select=ps.Selection(
                    rule=SELECTION_RULE_NAMES.to_proto[stage.select.rule],
                    metric=stage.select.metric,
                    limits=[_limit_to_proto(c) for c in stage.select.limits],
                ),
                final_steps=stage.final_steps,
                model_from_previous=stage.model_from_previous,
            )
        )
    return msg


def pipeline_from_proto(msg: ps.PipelineSpec) -> PipelineSpec:
    """Convert a wire spec to the domain spec. Does not validate (see validate_pipeline)."""
    stages = []
    for i, s in enumerate(msg.stages):
        where = f"stages[{i}]"
        try:
            study = spec_from_proto(s.study)
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}.study.{e.field}".rstrip("."), e.problem) from None
        rule = SELECTION_RULE_NAMES.name(s.select.rule, f"{where}.select.rule")
        selection = Selection(rule, s.select.metric, tuple(map(_limit_from_proto, s.select.limits)))
        stages.append(
            PipelineStageSpec(s.name, study, selection, s.final_steps, s.model_from_previous)
        )
    hours = msg.max_device_hours if msg.HasField("max_device_hours") else None
    return PipelineSpec(msg.name, tuple(stages), hours)
