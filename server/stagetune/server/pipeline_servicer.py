"""The pipeline servicer: proto <-> domain around the pipeline service, with the same
tenancy as studies (server/auth.py): a pipeline submitted by a member belongs to its team,
and every other team sees it exactly as if it did not exist (NOT_FOUND, left out of lists);
one without an owner is visible to admins only. With auth off nothing is checked."""

from __future__ import annotations

from datetime import datetime
from typing import get_args

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from stagetune.contract.errors import AlreadyExists, InvalidArgument, NotFound
from stagetune.contract.names import EnumNames
from stagetune.contract.pipeline_wire import pipeline_from_proto, pipeline_to_proto
from stagetune.contract.spec import value_to_proto
from stagetune.server.auth import Identity, current_identity
from stagetune.server.pipeline_records import PipelineStateName, PipelineView, StagePhaseName
from stagetune.server.pipeline_service import PipelineService
from stagetune.v1 import pipeline_service_pb2 as ps
from stagetune.v1 import pipeline_service_pb2_grpc as ps_grpc

__all__ = ["PipelineServicer", "pipeline_to_message", "PIPELINE_STATES", "STAGE_PHASES"]

PIPELINE_STATES: EnumNames[PipelineStateName, ps.PipelineState] = EnumNames(
    ps.PipelineState, "PIPELINE_STATE_", get_args(PipelineStateName)
)
STAGE_PHASES: EnumNames[StagePhaseName, ps.StagePhase] = EnumNames(
    ps.StagePhase, "STAGE_PHASE_", get_args(StagePhaseName)
)


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def pipeline_to_message(view: PipelineView) -> ps.Pipeline:
    r = view.record
    msg = ps.Pipeline(
        spec=pipeline_to_proto(r.spec),
        state=PIPELINE_STATES.to_proto[r.state],
        current_stage=r.current,
        device_seconds=view.total_seconds,
        create_time=_timestamp(r.created),
        mlflow_experiment_id=r.mlflow_experiment_id,
        mlflow_run_id=r.mlflow_run_id,
        reason=r.reason,
    )
    for i, (stage, spec) in enumerate(zip(r.stages, r.spec.stages, strict=True)):
        search, final, test = view.stage_studies[i]
        msg.stages.append(
            ps.PipelineStage(
                name=spec.name,
                phase=STAGE_PHASES.to_proto[stage.phase],
                study_name=search,
                final_study_name=final,
                test_study_name=test,
                base_model=stage.base_uri(),
                selected_trial_id=stage.selected_trial,
                selected_params={k: value_to_proto(v) for k, v in stage.selected_params.items()},
                model_trial_id=stage.model_trial,
                model_name=r.model_name(i) if stage.model_version else "",
                model_version=stage.model_version,
                model_uri=r.model_uri(i),
                device_seconds=view.stage_seconds[i],
                held_out=[
                    ps.HeldOutResult(
                        metric=h.metric, eval_value=h.eval_value, test_value=h.test_value, gap=h.gap
                    )
                    for h in r.held_out(i)
                ],
                reason=stage.reason,
            )
        )
    return msg


def _restricted() -> Identity | None:
    identity = current_identity()
    return None if identity is None or identity.is_admin else identity


class PipelineServicer(ps_grpc.PipelineServiceServicer):
    def __init__(self, service: PipelineService) -> None:
        self._service = service

    def _visible(self, name: str) -> str:
        if not name:
            raise InvalidArgument("pipeline_name", "is required")
        identity = _restricted()
        if identity is not None and self._service.owner(name) != identity.team:
            raise NotFound(f"pipeline {name!r} not found")  # as a missing one is worded
        return name

    def SubmitPipeline(
        self, request: ps.SubmitPipelineRequest, context: grpc.ServicerContext
    ) -> ps.SubmitPipelineResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        spec = pipeline_from_proto(request.spec)
        restricted = _restricted()
        if (
            restricted is not None
            and self._service.store.exists(spec.name)
            and self._service.owner(spec.name) != restricted.team
        ):
            # Unavoidable: the name space is shared, so a taken name says the pipeline exists.
            raise AlreadyExists(f"pipeline {spec.name!r} already exists; choose another name")
        identity = current_identity()
        team = identity.team if identity is not None else ""
        view, created = self._service.submit(spec, team)
        return ps.SubmitPipelineResponse(pipeline=pipeline_to_message(view), created=created)

    def GetPipeline(
        self, request: ps.GetPipelineRequest, context: grpc.ServicerContext
    ) -> ps.Pipeline:
        return pipeline_to_message(self._service.view(self._visible(request.pipeline_name)))

    def ListPipelines(
        self, request: ps.ListPipelinesRequest, context: grpc.ServicerContext
    ) -> ps.ListPipelinesResponse:
        identity = _restricted()
        views = self._service.list_pipelines()
        if identity is not None:
            views = [v for v in views if v.record.team == identity.team]
        return ps.ListPipelinesResponse(pipelines=[pipeline_to_message(v) for v in views])

    def ApproveTrial(
        self, request: ps.ApproveTrialRequest, context: grpc.ServicerContext
    ) -> ps.Pipeline:
        name = self._visible(request.pipeline_name)
        if request.trial_id <= 0:
            raise InvalidArgument("trial_id", "is required")
        return pipeline_to_message(self._service.approve(name, request.trial_id))

    def StopPipeline(
        self, request: ps.StopPipelineRequest, context: grpc.ServicerContext
    ) -> ps.Pipeline:
        return pipeline_to_message(self._service.stop(self._visible(request.pipeline_name)))
