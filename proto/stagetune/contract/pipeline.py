"""Pipelines: a lifecycle as an ordered chain of studies, each starting from the model the
previous stage promoted, and the studies the server derives from each stage.

A stage is a search study (named ``<pipeline>.<stage>``), a selection rule for its winner
(the front's knee, the best value of a metric under extra limits, or a person's approval),
and optionally the steps of a retrain of the winner. For each stage the server runs, in
order:

1. the search study (``search_study``): without a retrain, every completed trial saves its
   model, since the selected one is promoted as it is;
2. the retrain (``final_study``, ``<pipeline>.<stage>.final``): one trial of the selected
   params at ``final_steps``, saving its model;
3. the evaluation (``evaluation_study``, ``<pipeline>.<stage>.test``): one trial that trains
   nothing and scores the promoted model on the test split (``runner.evaluate: test``).

The model is registered as a version of ``model_name(pipeline, stage)``; the next stage's
studies start from ``models:/<that name>/<version>``. Each derived study gets what is left
of the pipeline's device-hour budget as its own.

``validate_pipeline`` checks a spec completely, including every study a stage derives (with
placeholders for what only a run decides), naming the field as the pipeline file spells it
(``stages[1].study.runner.data.split.fractions.test: must be > 0``). Reading YAML is
``pipeline_file``'s job, the wire form ``pipeline_wire``'s.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import (
    BudgetSpec,
    CategoricalParam,
    ConstraintSpec,
    FidelitySpec,
    FloatParam,
    IntParam,
    ParamValue,
    SamplerConfig,
    StudySpec,
    WarmStartSpec,
    validate_spec,
)
from stagetune.contract.spec.validation import check_device_hours
from stagetune.objectives.catalog import METRICS

__all__ = [
    "SelectionRuleName",
    "SELECTION_RULES",
    "MAX_STAGES",
    "Selection",
    "PipelineStageSpec",
    "PipelineSpec",
    "model_name",
    "search_study",
    "final_study",
    "evaluation_study",
    "validate_pipeline",
]

SelectionRuleName = Literal["knee", "best", "manual"]
SELECTION_RULES: tuple[SelectionRuleName, ...] = get_args(SelectionRuleName)
MAX_STAGES = 16
PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,15}$")
MAX_FINAL_STEPS = 10_000_000


@dataclass(frozen=True)
class Selection:
    """How a stage's winner is chosen once its study is done: the front's ``knee``, the
    ``best`` value of ``metric`` among feasible trials that also meet ``limits``, or a
    person's choice (``manual``: the pipeline waits for an approval)."""

    rule: SelectionRuleName = "knee"
    metric: str = ""
    limits: tuple[ConstraintSpec, ...] = ()

    def describe(self) -> str:
        if self.rule != "best":
            return self.rule
        return ", ".join([f"best {self.metric}", *(c.describe() for c in self.limits)])


@dataclass(frozen=True)
class PipelineStageSpec:
    """One stage: its search study (named ``<pipeline>.<stage>``; without ``runner.model``
    when it starts from the previous stage's model), its selection, and the steps of the
    retrain of the winner (0: promote the selected trial's own model)."""

    name: str
    study: StudySpec
    select: Selection = Selection()
    final_steps: int = 0
    model_from_previous: bool = False


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    stages: tuple[PipelineStageSpec, ...]
    max_device_hours: float | None = None

    def canonical_json(self) -> str:
        """A stable text form: equal specs give equal text (idempotent submission)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def max_device_seconds(self) -> float | None:
        return None if self.max_device_hours is None else self.max_device_hours * 3600.0

    def study_names(self, i: int) -> tuple[str, str, str]:
        """Stage ``i``'s search, retrain and evaluation study names."""
        search = self.stages[i].study.name
        return search, f"{search}.final", f"{search}.test"


def model_name(pipeline: str, stage: str) -> str:
    """The registered model a stage promotes into: ``<pipeline>.<stage>`` (MLflow refuses
    '/' and ':' in names, and ``models:/NAME/VERSION`` URIs split on '/')."""
    return f"{pipeline}.{stage}"


# ------------------------------------------------------------------ derived studies


def _budget(study: StudySpec, max_trials: int, hours: float | None) -> BudgetSpec:
    """The study's budget with ``max_trials`` and the smaller of its own device-hours and
    ``hours`` (what is left of the pipeline's)."""
    own = study.budget.max_device_hours
    limit = hours if own is None else own if hours is None else min(own, hours)
    return BudgetSpec(max_trials, study.budget.max_retries, limit)


def _with_model(runner: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    return {**runner, "model": dict(model)}


def search_study(
    pipeline: PipelineSpec, i: int, base_model: Mapping[str, Any], hours: float | None
) -> StudySpec:
    """Stage ``i``'s search study, starting from ``base_model`` (a ``runner.model``
    mapping), within ``hours`` device-hours (None: its own budget only)."""
    stage = pipeline.stages[i]
    study = stage.study
    runner = _with_model(study.runner, base_model)
    if stage.final_steps == 0:  # the selected trial's own model is promoted: keep them all
        runner["save_model"] = True
    return dataclasses.replace(
        study, runner=runner, budget=_budget(study, study.budget.max_trials, hours)
    )


def _fixed_space(params: Mapping[str, ParamValue]) -> tuple[CategoricalParam, ...]:
    # One choice per param: the sampler can only propose the selected configuration, and
    # the trial shows its params like any other.
    return tuple(CategoricalParam(k, (v,)) for k, v in sorted(params.items()))


def final_study(
    pipeline: PipelineSpec,
    i: int,
    base_model: Mapping[str, Any],
    params: Mapping[str, ParamValue],
    hours: float | None,
) -> StudySpec:
    """Stage ``i``'s retrain: one trial of ``params`` for ``final_steps`` steps, no early
    stopping, saving its model."""
    stage = pipeline.stages[i]
    study = stage.study
    steps = stage.final_steps
    return dataclasses.replace(
        study,
        name=pipeline.study_names(i)[1],
        search_space=_fixed_space(params),
        fidelity=FidelitySpec(steps, steps, 2.0),
        budget=_budget(study, 1, hours),
        sampler=SamplerConfig("random", study.sampler.seed),
        runner={**_with_model(study.runner, base_model), "save_model": True},
        early_stopping="none",
        warm_start=WarmStartSpec(),
    )


def evaluation_study(
    pipeline: PipelineSpec,
    i: int,
    model_uri: str,
    base_model: Mapping[str, Any],
    params: Mapping[str, ParamValue],
    hours: float | None,
) -> StudySpec:
    """Stage ``i``'s evaluation: one trial that trains nothing and scores the promoted
    model (``model_uri``) on the test split, measuring every objective of the stage. No
    constraints: it measures, it does not judge. DPO measures its implicit reward against
    what the stage started from (``base_model``)."""
    study = pipeline.stages[i].study
    runner = _with_model(study.runner, {"name_or_path": model_uri})
    runner["evaluate"] = "test"
    runner.pop("save_model", None)
    if study.stage == "dpo":
        runner["reference_model"] = dict(base_model)
    return dataclasses.replace(
        study,
        name=pipeline.study_names(i)[2],
        search_space=_fixed_space(params),
        fidelity=FidelitySpec(1, 1, 2.0),
        budget=_budget(study, 1, hours),
        sampler=SamplerConfig("random", study.sampler.seed),
        runner=runner,
        early_stopping="none",
        constraints=(),
        warm_start=WarmStartSpec(),
    )


# ------------------------------------------------------------------ validation


def _placeholder_params(study: StudySpec) -> dict[str, ParamValue]:
    """A value of every searched param, standing in for the one a run will select."""
    out: dict[str, ParamValue] = {}
    for p in study.search_space:
        out[p.name] = p.low if isinstance(p, FloatParam | IntParam) else p.choices[0]
    return out


def _prefixed(e: InvalidArgument, where: str) -> InvalidArgument:
    return InvalidArgument(f"{where}.{e.field}" if e.field else where, e.problem)


def _check_selection(select: Selection, where: str) -> None:
    if select.rule not in SELECTION_RULES:
        raise InvalidArgument(where, f"must be one of {list(SELECTION_RULES)}")
    if select.rule != "best":
        if select.metric or select.limits:
            raise InvalidArgument(where, f"{select.rule} takes no metric or limits")
        return
    if select.metric not in METRICS:
        raise InvalidArgument(f"{where}.best", f"unknown metric {select.metric!r}")
    for j, c in enumerate(select.limits):
        at = f"{where}.limits[{j}]"
        if c.metric not in METRICS:
            raise InvalidArgument(at, f"unknown metric {c.metric!r}")
        if c.max is None and c.min is None:
            raise InvalidArgument(at, "needs max, min or both")


def _check_stage(pipeline: PipelineSpec, i: int, names: set[str]) -> None:
    stage = pipeline.stages[i]
    where = f"stages[{i}]"
    if not STAGE_NAME.match(stage.name):
        raise InvalidArgument(
            f"{where}.name", "must be 1-16 letters, digits, '-' or '_', starting with either"
        )
    if stage.name in names:
        raise InvalidArgument(f"{where}.name", f"stage {stage.name!r} appears twice")
    names.add(stage.name)
    study = stage.study
    if study.name != f"{pipeline.name}.{stage.name}":
        raise InvalidArgument(f"{where}.study.name", f"must be {pipeline.name}.{stage.name}")
    if i == 0 and stage.model_from_previous:
        raise InvalidArgument(f"{where}.study.runner.model.from", "the first stage has no previous")
    if i > 0 and not stage.model_from_previous:
        raise InvalidArgument(
            f"{where}.study.runner.model",
            "a later stage starts from the model the previous stage promoted: "
            "set runner.model.from: previous",
        )
    if stage.model_from_previous and "model" in study.runner:
        raise InvalidArgument(
            f"{where}.study.runner.model", "comes from the previous stage; give no other"
        )
    _check_selection(stage.select, f"{where}.select")
    if not 0 <= stage.final_steps <= MAX_FINAL_STEPS:
        raise InvalidArgument(f"{where}.final.steps", f"must be between 1 and {MAX_FINAL_STEPS}")
    if stage.model_from_previous:
        previous = pipeline.stages[i - 1].name
        base: Mapping[str, Any] = {
            "name_or_path": f"models:/{model_name(pipeline.name, previous)}/1"
        }
    else:
        base = dict(study.runner.get("model") or {})
    params = _placeholder_params(study)
    derived = [search_study(pipeline, i, base, pipeline.max_device_hours)]
    if stage.final_steps:
        derived.append(final_study(pipeline, i, base, params, pipeline.max_device_hours))
    uri = f"models:/{model_name(pipeline.name, stage.name)}/1"
    derived.append(evaluation_study(pipeline, i, uri, base, params, pipeline.max_device_hours))
    for spec in derived:
        try:
            validate_spec(spec)
        except InvalidArgument as e:
            raise _prefixed(e, f"{where}.study") from None


def validate_pipeline(spec: PipelineSpec) -> None:
    """Check a pipeline completely, the studies each stage derives included; raise
    ``InvalidArgument`` naming the first bad field."""
    if not PIPELINE_NAME.match(spec.name):
        raise InvalidArgument(
            "name", "must be 1-32 letters, digits, '-', '_' or '.', starting with either"
        )
    if not spec.stages:
        raise InvalidArgument("stages", "must list at least one stage")
    if len(spec.stages) > MAX_STAGES:
        raise InvalidArgument(
            "stages", f"has {len(spec.stages)} entries; the limit is {MAX_STAGES}"
        )
    check_device_hours(spec.max_device_hours, "budget.max_device_hours")
    names: set[str] = set()
    for i in range(len(spec.stages)):
        _check_stage(spec, i, names)
