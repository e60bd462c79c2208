"""Reading pipeline files (``configs/pipelines/*.yaml``) into ``PipelineSpec``.

::

    name: tiny-lifecycle
    budget: {max_device_hours: 2}          # optional: every trial of every stage together
    stages:
      - name: pretrain
        study: pretrain_proxy              # a file next to this one, a packaged config,
        overrides: {budget: {max_trials: 4}}   # or an inline mapping; overrides merge in
        select: knee                       # knee (default) | manual | {best: M, limits: [...]}
        final: {steps: 64}                 # optional: retrain the winner, promote that model
      - name: sft
        study: sft
        overrides: {runner: {model: {from: previous}}}
        select: {best: eval_loss, limits: ["decode_latency_ms <= 8"]}

Each stage's study is named ``<pipeline>.<stage>`` whatever its config says. Overrides
merge mapping by mapping; anything else (a list, a number) replaces. Where a section
holds one of several sources, the override's replaces the config's: ``data.path`` drops
``data.synthetic`` (and back), ``model.from`` or ``model.name_or_path`` the config's model.
Errors name the field as the file spells it (``stages[1].study.budget.max_trials``);
``validate_pipeline`` runs last.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from stagetune.contract.datafiles import check_data_files
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.packaged import packaged_example, packaged_file
from stagetune.contract.pipeline import (
    MAX_FINAL_STEPS,
    MAX_STAGES,
    PIPELINE_NAME,
    STAGE_NAME,
    PipelineSpec,
    PipelineStageSpec,
    Selection,
    validate_pipeline,
)
from stagetune.contract.spec import ConstraintSpec, read_yaml_file, spec_from_mapping
from stagetune.contract.spec.fields import as_mapping, as_number, check_known
from stagetune.objectives.catalog import METRICS

__all__ = [
    "load_pipeline_file",
    "packaged_pipelines",
    "pipeline_from_mapping",
    "parse_limit",
    "check_pipeline_data",
]

_LIMIT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*(\S+)\s*$")
_TOP_LEVEL = {"name", "stages", "budget"}
_STAGE_KEYS = {"name", "study", "overrides", "select", "final"}


def packaged_pipelines() -> list[str]:
    """Names of the packaged example pipelines (``configs/pipelines/*.yaml``), sorted."""
    folder = packaged_file("pipelines")
    if not folder.is_dir():
        return []
    names = (n.name for n in folder.iterdir())
    return sorted(n.removesuffix(".yaml") for n in names if n.endswith(".yaml"))


def _packaged_pipeline(name: str) -> Traversable | None:
    stem = name.removesuffix(".yaml")
    if "/" in stem or "\\" in stem or stem not in packaged_pipelines():
        return None
    return packaged_file(f"pipelines/{stem}.yaml")


def load_pipeline_file(path: str | Path) -> PipelineSpec:
    """Read a pipeline file, then build and validate its spec. A bare name that is not a
    file here (``tiny-lifecycle``) is the packaged pipeline of that name. A stage's
    ``study:`` names a file relative to the pipeline file's folder, or a packaged config."""
    source: Path | Traversable = Path(path)
    base: Path | None = Path(path).resolve().parent
    if not Path(path).exists():
        packaged = _packaged_pipeline(str(path))
        if packaged is None:
            known = ", ".join(packaged_pipelines()) or "none"
            raise InvalidArgument(
                str(path), f"no such file, and no packaged pipeline of that name ({known})"
            )
        source, base = packaged, None
    data = read_yaml_file(source)
    if not isinstance(data, Mapping):
        raise InvalidArgument(str(path), "must be a mapping of pipeline fields")
    return pipeline_from_mapping(data, base)


#: Keys of which a section holds one: an override naming one drops the others it merges into.
_ALTERNATIVES = {
    "model": ("from", "name_or_path", "tiny"),
    "data": ("path", "synthetic"),
}


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            inner = dict(out[key])
            given = [k for k in _ALTERNATIVES.get(key, ()) if k in value]
            if given:
                for other in _ALTERNATIVES[key]:
                    inner.pop(other, None)
            if key == "model" and "from" in value:
                inner = {}  # the previous stage's model: nothing of the config's own stays
            out[key] = _merged(inner, value)
        else:
            out[key] = value
    return out


def _study_source(value: Any, base: Path | None, where: str) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    if not isinstance(value, str) or not value:
        raise InvalidArgument(where, "must be a study config file, a packaged name or a mapping")
    source: Path | Traversable | None = None
    if base is not None and (base / value).is_file():
        source = base / value
    else:
        source = packaged_example(value)
    if source is None:
        raise InvalidArgument(
            where, f"{value!r}: no such file next to the pipeline file, and no packaged config"
        )
    try:
        data = read_yaml_file(source)
    except InvalidArgument as e:
        raise InvalidArgument(where, e.message) from None
    if not isinstance(data, Mapping):
        raise InvalidArgument(where, f"{value!r} must be a mapping of study fields")
    return data


def parse_limit(item: Any, where: str) -> ConstraintSpec:
    """A limit written ``"metric <= value"`` / ``"metric >= value"`` or as a mapping
    ``{metric, max, min}``, on a metric of the catalog."""
    if isinstance(item, str):
        m = _LIMIT.match(item)
        if m is None:
            raise InvalidArgument(
                where, f"expected 'metric <= value' or 'metric >= value', got {item!r}"
            )
        metric, op, raw = m.groups()
        try:
            value = float(raw)
        except ValueError:
            raise InvalidArgument(where, f"{raw!r} is not a number") from None
        limit = (
            ConstraintSpec(metric, max=value) if op == "<=" else ConstraintSpec(metric, min=value)
        )
    else:
        entry = as_mapping(item, where)
        check_known(entry, {"metric", "max", "min"}, where)
        name = entry.get("metric")
        if not isinstance(name, str):
            raise InvalidArgument(f"{where}.metric", "is required")
        bounds = {k: as_number(entry[k], f"{where}.{k}") for k in ("max", "min") if k in entry}
        if not bounds:
            raise InvalidArgument(where, "needs max, min or both")
        limit = ConstraintSpec(name, **bounds)
    if limit.metric not in METRICS:
        raise InvalidArgument(where, f"unknown metric {limit.metric!r}; one of {sorted(METRICS)}")
    return limit


def _selection(value: Any, where: str) -> Selection:
    if value is None or value == "knee":
        return Selection()
    if value == "manual":
        return Selection("manual")
    if isinstance(value, str):
        raise InvalidArgument(where, f"must be knee, manual or {{best: METRIC}}, got {value!r}")
    entry = as_mapping(value, where)
    check_known(entry, {"best", "limits"}, where)
    metric = entry.get("best")
    if not isinstance(metric, str) or metric not in METRICS:
        raise InvalidArgument(
            f"{where}.best", f"unknown metric {metric!r}; one of {sorted(METRICS)}"
        )
    limits = entry.get("limits", [])
    if not isinstance(limits, Sequence) or isinstance(limits, str):
        raise InvalidArgument(f"{where}.limits", "must be a list")
    parsed = tuple(parse_limit(x, f"{where}.limits[{j}]") for j, x in enumerate(limits))
    return Selection("best", metric, parsed)


def _final_steps(entry: Mapping[str, Any], where: str) -> int:
    if "final" not in entry:
        return 0
    final = as_mapping(entry["final"], where)
    check_known(final, {"steps"}, where)
    if "steps" not in final:
        raise InvalidArgument(f"{where}.steps", "is required")
    steps: int = as_number(final["steps"], f"{where}.steps", int)
    if not 1 <= steps <= MAX_FINAL_STEPS:
        raise InvalidArgument(f"{where}.steps", f"must be between 1 and {MAX_FINAL_STEPS}")
    return steps


def _stage(pipeline: str, i: int, data: Any, base: Path | None) -> PipelineStageSpec:
    where = f"stages[{i}]"
    entry = as_mapping(data, where)
    check_known(entry, _STAGE_KEYS, where)
    name = entry.get("name")
    if not isinstance(name, str) or not STAGE_NAME.match(name):
        raise InvalidArgument(
            f"{where}.name", "is required: 1-16 letters, digits, '-' or '_', starting with either"
        )
    if "study" not in entry:
        raise InvalidArgument(f"{where}.study", "is required")
    config = _merged(
        _study_source(entry["study"], base, f"{where}.study"),
        as_mapping(entry.get("overrides"), f"{where}.overrides"),
    )
    config["name"] = f"{pipeline}.{name}"
    runner = dict(as_mapping(config.get("runner"), f"{where}.study.runner"))
    model = as_mapping(runner.get("model"), f"{where}.study.runner.model")
    from_previous = "from" in model
    if from_previous:
        check_known(model, {"from"}, f"{where}.study.runner.model")
        if model["from"] != "previous":
            raise InvalidArgument(
                f"{where}.study.runner.model.from", f"must be previous, got {model['from']!r}"
            )
        del runner["model"]
        config["runner"] = runner
    try:
        study = spec_from_mapping(config)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}.study.{e.field}".rstrip("."), e.problem) from None
    return PipelineStageSpec(
        name,
        study,
        _selection(entry.get("select"), f"{where}.select"),
        _final_steps(entry, f"{where}.final"),
        from_previous,
    )


def pipeline_from_mapping(data: Mapping[str, Any], base: Path | None = None) -> PipelineSpec:
    """Build and validate a pipeline spec from parsed YAML (``base``: the folder a stage's
    study file is relative to; None: packaged study configs only)."""
    check_known(data, _TOP_LEVEL, "")
    name = data.get("name")
    if not isinstance(name, str) or not PIPELINE_NAME.match(name):
        raise InvalidArgument(
            "name", "is required: 1-32 letters, digits, '-', '_' or '.', starting with either"
        )
    stages = data.get("stages")
    if not isinstance(stages, Sequence) or isinstance(stages, str) or not stages:
        raise InvalidArgument("stages", "must be a non-empty list of stages")
    if len(stages) > MAX_STAGES:
        raise InvalidArgument("stages", f"has {len(stages)} entries; the limit is {MAX_STAGES}")
    budget = as_mapping(data.get("budget"), "budget")
    check_known(budget, {"max_device_hours"}, "budget")
    hours = budget.get("max_device_hours")
    spec = PipelineSpec(
        name,
        tuple(_stage(name, i, s, base) for i, s in enumerate(stages)),
        None if hours is None else as_number(hours, "budget.max_device_hours"),
    )
    validate_pipeline(spec)
    return spec


def check_pipeline_data(spec: PipelineSpec) -> None:
    """On the submitting machine: refuse a data file this machine has that lacks a column
    a stage maps (``stagetune.contract.datafiles``), naming the stage's field."""
    for i, stage in enumerate(spec.stages):
        # The model is not read here; a stage from the previous one has none of its own.
        runner = {**stage.study.runner, "model": {"name_or_path": "unused"}}
        try:
            check_data_files(dataclasses.replace(stage.study, runner=runner))
        except InvalidArgument as e:
            raise InvalidArgument(f"stages[{i}].study.{e.field}".rstrip("."), e.problem) from None
