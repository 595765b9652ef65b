import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
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

class GetObservabilityMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetObservabilityMetricsResponse(_message.Message):
    __slots__ = ("traces", "spans", "events")
    TRACES_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    traces: TraceFigures
    spans: SpanFigures
    events: EventFigures
    def __init__(self, traces: _Optional[_Union[TraceFigures, _Mapping]] = ..., spans: _Optional[_Union[SpanFigures, _Mapping]] = ..., events: _Optional[_Union[EventFigures, _Mapping]] = ...) -> None: ...

class TraceFigures(_message.Message):
    __slots__ = ("total", "error_rate", "average_latency")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_LATENCY_FIELD_NUMBER: _ClassVar[int]
    total: int
    error_rate: float
    average_latency: float
    def __init__(self, total: _Optional[int] = ..., error_rate: _Optional[float] = ..., average_latency: _Optional[float] = ...) -> None: ...

class SpanFigures(_message.Message):
    __slots__ = ("total", "db_spans", "external_spans")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DB_SPANS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_SPANS_FIELD_NUMBER: _ClassVar[int]
    total: int
    db_spans: int
    external_spans: int
    def __init__(self, total: _Optional[int] = ..., db_spans: _Optional[int] = ..., external_spans: _Optional[int] = ...) -> None: ...

class EventFigures(_message.Message):
    __slots__ = ("total", "agent_events", "task_events")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    AGENT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    TASK_EVENTS_FIELD_NUMBER: _ClassVar[int]
    total: int
    agent_events: int
    task_events: int
    def __init__(self, total: _Optional[int] = ..., agent_events: _Optional[int] = ..., task_events: _Optional[int] = ...) -> None: ...

class ListActiveTracesRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class Trace(_message.Message):
    __slots__ = ("trace_id", "span_id", "operation_name", "start_time", "duration", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATION_NAME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    trace_id: str
    span_id: str
    operation_name: str
    start_time: _timestamp_pb2.Timestamp
    duration: float
    tags: _containers.ScalarMap[str, str]
    def __init__(self, trace_id: _Optional[str] = ..., span_id: _Optional[str] = ..., operation_name: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration: _Optional[float] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...
