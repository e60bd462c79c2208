"""The typed client of the pipeline service: what ``stagetune pipeline`` and a team's own
scripts use. Same deadlines, retries, credentials and error mapping as the study client
(``stagetune.contract.client``): callers never see ``grpc.RpcError``."""

from __future__ import annotations

from typing import Any

from stagetune.contract.client import DEFAULT_ADDRESS, _Client
from stagetune.contract.pipeline import PipelineSpec
from stagetune.contract.pipeline_wire import pipeline_to_proto
from stagetune.v1 import pipeline_service_pb2 as ps
from stagetune.v1 import pipeline_service_pb2_grpc as ps_grpc

__all__ = ["PipelineClient"]


class PipelineClient(_Client):
    """Submit, follow, approve and stop pipelines."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = ps_grpc.PipelineServiceStub(self._channel)

    def submit(self, spec: PipelineSpec | ps.PipelineSpec) -> tuple[ps.Pipeline, bool]:
        """Submit a pipeline; returns it and whether it was new (False: an equal one
        existed, in whatever state it is)."""
        msg = spec if isinstance(spec, ps.PipelineSpec) else pipeline_to_proto(spec)
        reply = self._call(self._stub.SubmitPipeline, ps.SubmitPipelineRequest(spec=msg))
        return reply.pipeline, reply.created

    def get(self, name: str) -> ps.Pipeline:
        return self._call(self._stub.GetPipeline, ps.GetPipelineRequest(pipeline_name=name))

    def list(self) -> list[ps.Pipeline]:
        return list(self._call(self._stub.ListPipelines, ps.ListPipelinesRequest()).pipelines)

    def approve(self, name: str, trial_id: int) -> ps.Pipeline:
        """Promote ``trial_id`` of the stage that waits for approval."""
        request = ps.ApproveTrialRequest(pipeline_name=name, trial_id=trial_id)
        return self._call(self._stub.ApproveTrial, request)

    def stop(self, name: str) -> ps.Pipeline:
        return self._call(self._stub.StopPipeline, ps.StopPipelineRequest(pipeline_name=name))
