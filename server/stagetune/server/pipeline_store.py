"""Pipelines in the same Optuna RDB storage as studies, so a restarted server (or another
replica on the same PostgreSQL) carries on with them like with studies.

A pipeline is kept as an Optuna study named ``pipeline:<name>`` (no study can take that
name: study names have no ':') that holds no trials, only user attributes: its spec as
canonical proto JSON, owning team, creation time, state, MLflow ids and one record per
stage. The study store ignores it (it has no study spec), so it shows in no study list.
These keys are the stored format: a key never changes meaning or name.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import optuna
from google.protobuf import json_format

from stagetune.contract.errors import AlreadyExists, NotFound
from stagetune.contract.pipeline import PipelineSpec
from stagetune.contract.pipeline_wire import pipeline_from_proto, pipeline_to_proto
from stagetune.server import optuna_rdb as rdb
from stagetune.server.database import storage_errors
from stagetune.server.pipeline_records import (
    PipelineRecord,
    PipelineStateName,
    StageRecord,
)
from stagetune.server.storage import StudyStore
from stagetune.v1 import pipeline_service_pb2 as ps

__all__ = ["PipelineStore", "PREFIX"]

PREFIX = "pipeline:"
SPEC = "st_pipeline_spec"
TEAM = "st_pipeline_team"
CREATED = "st_pipeline_created"
STATE = "st_pipeline_state"  # {"state": ..., "current": ..., "reason": ...}
STAGE_PREFIX = "st_pipeline_stage_"  # + index -> StageRecord as JSON
MLFLOW_EXPERIMENT = "st_pipeline_mlflow_experiment_id"
MLFLOW_RUN = "st_pipeline_mlflow_run_id"


def _not_found(name: str) -> NotFound:
    return NotFound(f"pipeline {name!r} not found")


class PipelineStore:
    """Pipelines as records, in the study store's Optuna storage."""

    def __init__(self, studies: StudyStore) -> None:
        self.studies = studies
        self._storage = studies.optuna_storage
        self._create_lock = threading.Lock()
        self._specs: dict[str, PipelineSpec] = {}  # parsed spec by its JSON

    def _id(self, name: str) -> int:
        try:
            return self._storage.get_study_id_from_name(PREFIX + name)
        except KeyError:
            raise _not_found(name) from None

    def _spec(self, spec_json: str) -> PipelineSpec:
        spec = self._specs.get(spec_json)
        if spec is None:
            spec = pipeline_from_proto(json_format.Parse(spec_json, ps.PipelineSpec()))
            self._specs[spec_json] = spec
        return spec

    def _record(self, attrs: dict[str, Any]) -> PipelineRecord:
        spec = self._spec(attrs[SPEC])
        state = attrs.get(STATE, {})
        stages = tuple(
            StageRecord.from_json(attrs.get(f"{STAGE_PREFIX}{i}", {}))
            for i in range(len(spec.stages))
        )
        return PipelineRecord(
            spec=spec,
            state=state.get("state", "running"),
            current=int(state.get("current", 0)),
            stages=stages,
            created=datetime.fromtimestamp(float(attrs.get(CREATED, 0.0)), UTC),
            team=attrs.get(TEAM, ""),
            reason=state.get("reason", ""),
            mlflow_experiment_id=attrs.get(MLFLOW_EXPERIMENT, ""),
            mlflow_run_id=attrs.get(MLFLOW_RUN, ""),
        )

    @storage_errors
    def create(self, spec: PipelineSpec, team: str = "") -> tuple[PipelineRecord, bool]:
        """Create the pipeline, or return the existing equal one (in whatever state). A
        different spec under the name: ``AlreadyExists``."""
        spec_json = json_format.MessageToJson(pipeline_to_proto(spec), sort_keys=True)
        with self._create_lock:
            try:
                found: int | None = self._storage.get_study_id_from_name(PREFIX + spec.name)
            except KeyError:
                found = None
            if found is not None:
                if SPEC in self._storage.get_study_user_attrs(found):
                    existing = self.get(spec.name)
                    if existing.spec.canonical_json() != spec.canonical_json():
                        raise AlreadyExists(
                            f"pipeline {spec.name!r} exists with a different spec; "
                            "choose another name or submit the same spec"
                        )
                    return existing, False
                self._storage.delete_study(found)  # half-written by a crash during create
            direction = [optuna.study.StudyDirection.MINIMIZE]  # unused: it holds no trials
            study_id = self._storage.create_new_study(direction, PREFIX + spec.name)
            try:
                self._storage.set_study_user_attr(study_id, CREATED, datetime.now(UTC).timestamp())
                if team:
                    self._storage.set_study_user_attr(study_id, TEAM, team)
                self._storage.set_study_user_attr(
                    study_id, STATE, {"state": "running", "current": 0, "reason": ""}
                )
                # Last: a pipeline without its spec is invisible, so a crash before this
                # line leaves nothing anyone sees (and the next create replaces it).
                self._storage.set_study_user_attr(study_id, SPEC, spec_json)
            except Exception:
                self._storage.delete_study(study_id)
                raise
        return self.get(spec.name), True

    @storage_errors
    def exists(self, name: str) -> bool:
        try:
            return SPEC in self._storage.get_study_user_attrs(self._id(name))
        except NotFound:
            return False

    @storage_errors
    def get(self, name: str) -> PipelineRecord:
        attrs = self._storage.get_study_user_attrs(self._id(name))
        if SPEC not in attrs:
            raise _not_found(name)
        return self._record(attrs)

    @storage_errors
    def owner(self, name: str) -> str | None:
        """The team a pipeline belongs to; None if it has none or does not exist."""
        try:
            team = rdb.study_attrs(self._storage, self._id(name), [TEAM]).get(TEAM)
        except NotFound:
            return None
        return team if isinstance(team, str) and team else None

    @storage_errors
    def all(self) -> list[PipelineRecord]:
        """Every pipeline, newest first."""
        records = [
            self._record(s.user_attrs)
            for s in self._storage.get_all_studies()
            if s.study_name.startswith(PREFIX) and SPEC in s.user_attrs
        ]
        return sorted(records, key=lambda r: r.created, reverse=True)

    @storage_errors
    def names(self, states: set[PipelineStateName]) -> list[str]:
        """Names of the pipelines in one of ``states``."""
        return [
            s.study_name[len(PREFIX) :]
            for s in self._storage.get_all_studies()
            if s.study_name.startswith(PREFIX)
            and SPEC in s.user_attrs
            and s.user_attrs.get(STATE, {}).get("state", "running") in states
        ]

    @storage_errors
    def save_stage(self, name: str, i: int, stage: StageRecord) -> None:
        self._storage.set_study_user_attr(self._id(name), f"{STAGE_PREFIX}{i}", stage.to_json())

    @storage_errors
    def set_state(
        self, name: str, state: PipelineStateName, current: int, reason: str = ""
    ) -> None:
        value = {"state": state, "current": current, "reason": reason}
        self._storage.set_study_user_attr(self._id(name), STATE, value)

    @storage_errors
    def set_tracking(self, name: str, experiment_id: str, run_id: str) -> None:
        study_id = self._id(name)
        self._storage.set_study_user_attr(study_id, MLFLOW_EXPERIMENT, experiment_id)
        self._storage.set_study_user_attr(study_id, MLFLOW_RUN, run_id)
