import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from stagetune.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SelectionRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECTION_RULE_UNSPECIFIED: _ClassVar[SelectionRule]
    SELECTION_RULE_KNEE: _ClassVar[SelectionRule]
    SELECTION_RULE_BEST: _ClassVar[SelectionRule]
    SELECTION_RULE_MANUAL: _ClassVar[SelectionRule]

class PipelineState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIPELINE_STATE_UNSPECIFIED: _ClassVar[PipelineState]
    PIPELINE_STATE_RUNNING: _ClassVar[PipelineState]
    PIPELINE_STATE_AWAITING_APPROVAL: _ClassVar[PipelineState]
    PIPELINE_STATE_DONE: _ClassVar[PipelineState]
    PIPELINE_STATE_STOPPED: _ClassVar[PipelineState]
    PIPELINE_STATE_FAILED: _ClassVar[PipelineState]

class StagePhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_PHASE_UNSPECIFIED: _ClassVar[StagePhase]
    STAGE_PHASE_PENDING: _ClassVar[StagePhase]
    STAGE_PHASE_SEARCHING: _ClassVar[StagePhase]
    STAGE_PHASE_AWAITING_APPROVAL: _ClassVar[StagePhase]
    STAGE_PHASE_RETRAINING: _ClassVar[StagePhase]
    STAGE_PHASE_PROMOTING: _ClassVar[StagePhase]
    STAGE_PHASE_EVALUATING: _ClassVar[StagePhase]
    STAGE_PHASE_DONE: _ClassVar[StagePhase]
    STAGE_PHASE_FAILED: _ClassVar[StagePhase]
    STAGE_PHASE_STOPPED: _ClassVar[StagePhase]
SELECTION_RULE_UNSPECIFIED: SelectionRule
SELECTION_RULE_KNEE: SelectionRule
SELECTION_RULE_BEST: SelectionRule
SELECTION_RULE_MANUAL: SelectionRule
PIPELINE_STATE_UNSPECIFIED: PipelineState
PIPELINE_STATE_RUNNING: PipelineState
PIPELINE_STATE_AWAITING_APPROVAL: PipelineState
PIPELINE_STATE_DONE: PipelineState
PIPELINE_STATE_STOPPED: PipelineState
PIPELINE_STATE_FAILED: PipelineState
STAGE_PHASE_UNSPECIFIED: StagePhase
STAGE_PHASE_PENDING: StagePhase
STAGE_PHASE_SEARCHING: StagePhase
STAGE_PHASE_AWAITING_APPROVAL: StagePhase
STAGE_PHASE_RETRAINING: StagePhase
STAGE_PHASE_PROMOTING: StagePhase
STAGE_PHASE_EVALUATING: StagePhase
STAGE_PHASE_DONE: StagePhase
STAGE_PHASE_FAILED: StagePhase
STAGE_PHASE_STOPPED: StagePhase

class Selection(_message.Message):
    __slots__ = ("rule", "metric", "limits")
    RULE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    rule: SelectionRule
    metric: str
    limits: _containers.RepeatedCompositeFieldContainer[_types_pb2.Constraint]
    def __init__(self, rule: _Optional[_Union[SelectionRule, str]] = ..., metric: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[_types_pb2.Constraint, _Mapping]]] = ...) -> None: ...

class PipelineStageSpec(_message.Message):
    __slots__ = ("name", "study", "select", "final_steps", "model_from_previous")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STUDY_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    FINAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FROM_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    study: _types_pb2.StudySpec
    select: Selection
    final_steps: int
    model_from_previous: bool
    def __init__(self, name: _Optional[str] = ..., study: _Optional[_Union[_types_pb2.StudySpec, _Mapping]] = ..., select: _Optional[_Union[Selection, _Mapping]] = ..., final_steps: _Optional[int] = ..., model_from_previous: _Optional[bool] = ...) -> None: ...

class PipelineSpec(_message.Message):
    __slots__ = ("name", "stages", "max_device_hours")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICE_HOURS_FIELD_NUMBER: _ClassVar[int]
    name: str
    stages: _containers.RepeatedCompositeFieldContainer[PipelineStageSpec]
    max_device_hours: float
    def __init__(self, name: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[PipelineStageSpec, _Mapping]]] = ..., max_device_hours: _Optional[float] = ...) -> None: ...

class HeldOutResult(_message.Message):
    __slots__ = ("metric", "eval_value", "test_value", "gap")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    EVAL_VALUE_FIELD_NUMBER: _ClassVar[int]
    TEST_VALUE_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    metric: str
    eval_value: float
    test_value: float
    gap: float
    def __init__(self, metric: _Optional[str] = ..., eval_value: _Optional[float] = ..., test_value: _Optional[float] = ..., gap: _Optional[float] = ...) -> None: ...

class PipelineStage(_message.Message):
    __slots__ = ("name", "phase", "study_name", "final_study_name", "test_study_name", "base_model", "selected_trial_id", "selected_params", "model_trial_id", "model_name", "model_version", "model_uri", "device_seconds", "held_out", "reason")
    class SelectedParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _types_pb2.ParameterValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_types_pb2.ParameterValue, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    FINAL_STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    TEST_STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SELECTED_TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTED_PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    phase: StagePhase
    study_name: str
    final_study_name: str
    test_study_name: str
    base_model: str
    selected_trial_id: int
    selected_params: _containers.MessageMap[str, _types_pb2.ParameterValue]
    model_trial_id: int
    model_name: str
    model_version: str
    model_uri: str
    device_seconds: float
    held_out: _containers.RepeatedCompositeFieldContainer[HeldOutResult]
    reason: str
    def __init__(self, name: _Optional[str] = ..., phase: _Optional[_Union[StagePhase, str]] = ..., study_name: _Optional[str] = ..., final_study_name: _Optional[str] = ..., test_study_name: _Optional[str] = ..., base_model: _Optional[str] = ..., selected_trial_id: _Optional[int] = ..., selected_params: _Optional[_Mapping[str, _types_pb2.ParameterValue]] = ..., model_trial_id: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_uri: _Optional[str] = ..., device_seconds: _Optional[float] = ..., held_out: _Optional[_Iterable[_Union[HeldOutResult, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class Pipeline(_message.Message):
    __slots__ = ("spec", "state", "current_stage", "stages", "device_seconds", "create_time", "mlflow_experiment_id", "mlflow_run_id", "reason")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    spec: PipelineSpec
    state: PipelineState
    current_stage: int
    stages: _containers.RepeatedCompositeFieldContainer[PipelineStage]
    device_seconds: float
    create_time: _timestamp_pb2.Timestamp
    mlflow_experiment_id: str
    mlflow_run_id: str
    reason: str
    def __init__(self, spec: _Optional[_Union[PipelineSpec, _Mapping]] = ..., state: _Optional[_Union[PipelineState, str]] = ..., current_stage: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[PipelineStage, _Mapping]]] = ..., device_seconds: _Optional[float] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mlflow_experiment_id: _Optional[str] = ..., mlflow_run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SubmitPipelineRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: PipelineSpec
    def __init__(self, spec: _Optional[_Union[PipelineSpec, _Mapping]] = ...) -> None: ...

class SubmitPipelineResponse(_message.Message):
    __slots__ = ("pipeline", "created")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    pipeline: Pipeline
    created: bool
    def __init__(self, pipeline: _Optional[_Union[Pipeline, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetPipelineRequest(_message.Message):
    __slots__ = ("pipeline_name",)
    PIPELINE_NAME_FIELD_NUMBER: _ClassVar[int]
    pipeline_name: str
    def __init__(self, pipeline_name: _Optional[str] = ...) -> None: ...

class ListPipelinesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPipelinesResponse(_message.Message):
    __slots__ = ("pipelines",)
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    pipelines: _containers.RepeatedCompositeFieldContainer[Pipeline]
    def __init__(self, pipelines: _Optional[_Iterable[_Union[Pipeline, _Mapping]]] = ...) -> None: ...

class ApproveTrialRequest(_message.Message):
    __slots__ = ("pipeline_name", "trial_id")
    PIPELINE_NAME_FIELD_NUMBER: _ClassVar[int]
    TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    pipeline_name: str
    trial_id: int
    def __init__(self, pipeline_name: _Optional[str] = ..., trial_id: _Optional[int] = ...) -> None: ...

class StopPipelineRequest(_message.Message):
    __slots__ = ("pipeline_name",)
    PIPELINE_NAME_FIELD_NUMBER: _ClassVar[int]
    pipeline_name: str
    def __init__(self, pipeline_name: _Optional[str] = ...) -> None: ...
