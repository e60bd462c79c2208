from stagetune.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateStudyRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _types_pb2.StudySpec
    def __init__(self, spec: _Optional[_Union[_types_pb2.StudySpec, _Mapping]] = ...) -> None: ...

class CreateStudyResponse(_message.Message):
    __slots__ = ("study", "created")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    study: _types_pb2.Study
    created: bool
    def __init__(self, study: _Optional[_Union[_types_pb2.Study, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetStudyRequest(_message.Message):
    __slots__ = ("study_name",)
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    def __init__(self, study_name: _Optional[str] = ...) -> None: ...

class ListStudiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStudiesResponse(_message.Message):
    __slots__ = ("studies",)
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedCompositeFieldContainer[_types_pb2.Study]
    def __init__(self, studies: _Optional[_Iterable[_Union[_types_pb2.Study, _Mapping]]] = ...) -> None: ...

class StopStudyRequest(_message.Message):
    __slots__ = ("study_name",)
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    def __init__(self, study_name: _Optional[str] = ...) -> None: ...

class ListTrialsRequest(_message.Message):
    __slots__ = ("study_name", "states")
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    states: _containers.RepeatedScalarFieldContainer[_types_pb2.TrialState]
    def __init__(self, study_name: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_types_pb2.TrialState, str]]] = ...) -> None: ...

class ListTrialsResponse(_message.Message):
    __slots__ = ("trials",)
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    trials: _containers.RepeatedCompositeFieldContainer[_types_pb2.Trial]
    def __init__(self, trials: _Optional[_Iterable[_Union[_types_pb2.Trial, _Mapping]]] = ...) -> None: ...

class GetParetoFrontRequest(_message.Message):
    __slots__ = ("study_name",)
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    def __init__(self, study_name: _Optional[str] = ...) -> None: ...

class GetParetoFrontResponse(_message.Message):
    __slots__ = ("objectives", "trials", "hypervolume", "knee_trial_id")
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    HYPERVOLUME_FIELD_NUMBER: _ClassVar[int]
    KNEE_TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    objectives: _containers.RepeatedCompositeFieldContainer[_types_pb2.Objective]
    trials: _containers.RepeatedCompositeFieldContainer[_types_pb2.Trial]
    hypervolume: float
    knee_trial_id: int
    def __init__(self, objectives: _Optional[_Iterable[_Union[_types_pb2.Objective, _Mapping]]] = ..., trials: _Optional[_Iterable[_Union[_types_pb2.Trial, _Mapping]]] = ..., hypervolume: _Optional[float] = ..., knee_trial_id: _Optional[int] = ...) -> None: ...
