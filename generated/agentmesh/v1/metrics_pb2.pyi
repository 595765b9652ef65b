from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMetricsResponse(_message.Message):
    __slots__ = ("system", "agents", "performance")
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    PERFORMANCE_FIELD_NUMBER: _ClassVar[int]
    system: SystemMetrics
    agents: AgentsMetrics
    performance: PerformanceMetrics
    def __init__(self, system: _Optional[_Union[SystemMetrics, _Mapping]] = ..., agents: _Optional[_Union[AgentsMetrics, _Mapping]] = ..., performance: _Optional[_Union[PerformanceMetrics, _Mapping]] = ...) -> None: ...

class SystemMetrics(_message.Message):
    __slots__ = ("cpu_usage", "memory_usage", "memory_total", "disk_usage")
    CPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DISK_USAGE_FIELD_NUMBER: _ClassVar[int]
    cpu_usage: float
    memory_usage: int
    memory_total: int
    disk_usage: float
    def __init__(self, cpu_usage: _Optional[float] = ..., memory_usage: _Optional[int] = ..., memory_total: _Optional[int] = ..., disk_usage: _Optional[float] = ...) -> None: ...

class AgentsMetrics(_message.Message):
    __slots__ = ("total", "active", "tasks_queued", "tasks_processing", "tasks_completed_today")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TASKS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    TASKS_PROCESSING_FIELD_NUMBER: _ClassVar[int]
    TASKS_COMPLETED_TODAY_FIELD_NUMBER: _ClassVar[int]
    total: int
    active: int
    tasks_queued: int
    tasks_processing: int
    tasks_completed_today: int
    def __init__(self, total: _Optional[int] = ..., active: _Optional[int] = ..., tasks_queued: _Optional[int] = ..., tasks_processing: _Optional[int] = ..., tasks_completed_today: _Optional[int] = ...) -> None: ...

class PerformanceMetrics(_message.Message):
    __slots__ = ("average_task_duration", "p95_task_duration", "error_rate")
    AVERAGE_TASK_DURATION_FIELD_NUMBER: _ClassVar[int]
    P95_TASK_DURATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    average_task_duration: float
    p95_task_duration: float
    error_rate: float
    def __init__(self, average_task_duration: _Optional[float] = ..., p95_task_duration: _Optional[float] = ..., error_rate: _Optional[float] = ...) -> None: ...

class GetPrometheusMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
