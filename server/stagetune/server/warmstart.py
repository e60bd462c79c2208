"""Warm start: the configurations a new study tries before its sampler proposes any.

Seeds come from the Pareto sets of earlier studies of the same stage and from the stage's
known-good defaults (``configs/warm_start.yaml``). Each seed is cut to the new study's
search space: params it does not search are dropped (the policy fills in the rest), and
a value outside the new range or choices is dropped too, never clipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from stagetune.contract.errors import InvalidArgument, NotFound
from stagetune.contract.packaged import packaged_path
from stagetune.contract.spec import CategoricalParam, FloatParam, ParamValue, StudySpec
from stagetune.server.front import ranked
from stagetune.server.storage import StudyStore

__all__ = ["DEFAULTS_FILE", "stage_defaults", "fit_to_space", "dedupe", "warm_start_seeds"]

#: The packaged per-stage defaults (``configs/warm_start.yaml``).
DEFAULTS_FILE = "warm_start.yaml"


def stage_defaults(stage: str, path: Path | None = None) -> list[dict[str, Any]]:
    """The stage's default starting points: from ``path``, else the packaged defaults
    (a missing packaged file raises: defaults must not silently vanish)."""
    source = packaged_path(DEFAULTS_FILE) if path is None else path
    data = yaml.safe_load(source.read_text()) or {}
    entries = data.get(stage, []) if isinstance(data, dict) else []
    return [dict(e) for e in entries if isinstance(e, dict)]


def _fits(spec: StudySpec, name: str, value: Any) -> bool:
    p = next((q for q in spec.search_space if q.name == name), None)
    if p is None:
        return False
    if isinstance(p, CategoricalParam):
        return any(value == c and type(value) is type(c) for c in p.choices) or (
            isinstance(value, (int, float)) and value in p.choices
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(p, FloatParam):
        return math.isfinite(value) and p.low <= value <= p.high
    return float(value).is_integer() and p.low <= value <= p.high


def fit_to_space(spec: StudySpec, params: dict[str, Any]) -> dict[str, ParamValue]:
    """The part of ``params`` that is valid in ``spec``'s search space."""
    return {k: v for k, v in params.items() if _fits(spec, k, v)}


def dedupe(
    seeds: list[tuple[str, dict[str, ParamValue]]],
) -> list[tuple[str, dict[str, ParamValue]]]:
    seen: set[tuple[tuple[str, Any], ...]] = set()
    out = []
    for source, params in seeds:
        key = tuple(sorted(params.items()))
        if params and key not in seen:
            seen.add(key)
            out.append((source, params))
    return out


def warm_start_seeds(spec: StudySpec, store: StudyStore) -> list[tuple[str, dict[str, ParamValue]]]:
    """(source, params) of each seed of a new study, checked before it is created:
    defaults first, then each source study's Pareto set, cut to this search space, at
    most max_trials. An unknown source study, or one of another stage, is refused."""
    seeds: list[tuple[str, dict[str, ParamValue]]] = []
    if spec.warm_start.defaults:
        for params in stage_defaults(spec.stage):
            seeds.append((f"defaults:{spec.stage}", fit_to_space(spec, params)))
    for i, name in enumerate(spec.warm_start.studies):
        where = f"warm_start.studies[{i}]"
        try:
            source = store.get_study(name)
        except NotFound:
            raise InvalidArgument(where, f"no study named {name!r}") from None
        if source.spec.stage != spec.stage:
            raise InvalidArgument(
                where, f"{name!r} tunes stage {source.spec.stage}, not {spec.stage}"
            )
        for t in ranked(source.spec, store.trials(name, ["complete"])):
            if t.pareto_rank == 1:
                seeds.append((f"study:{name}#{t.number}", fit_to_space(spec, t.params)))
    return dedupe(seeds)[: spec.budget.max_trials]
