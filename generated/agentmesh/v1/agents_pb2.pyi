import datetime

from agentmesh.v1 import common_pb2 as _common_pb2
from agentmesh.v1 import tasks_pb2 as _tasks_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Agent(_message.Message):
    __slots__ = ("agent_id", "name", "type", "status", "capabilities", "current_load", "max_capacity", "health", "configuration", "metrics", "resources", "owner_id", "connected_at", "version")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    name: str
    type: str
    status: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    current_load: int
    max_capacity: int
    health: AgentHealth
    configuration: _struct_pb2.Struct
    metrics: AgentMetrics
    resources: AgentResources
    owner_id: str
    connected_at: _timestamp_pb2.Timestamp
    version: str
    def __init__(self, agent_id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., status: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., current_load: _Optional[int] = ..., max_capacity: _Optional[int] = ..., health: _Optional[_Union[AgentHealth, _Mapping]] = ..., configuration: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., metrics: _Optional[_Union[AgentMetrics, _Mapping]] = ..., resources: _Optional[_Union[AgentResources, _Mapping]] = ..., owner_id: _Optional[str] = ..., connected_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...

class AgentHealth(_message.Message):
    __slots__ = ("status", "last_heartbeat", "uptime_seconds")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    status: str
    last_heartbeat: _timestamp_pb2.Timestamp
    uptime_seconds: int
    def __init__(self, status: _Optional[str] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uptime_seconds: _Optional[int] = ...) -> None: ...

class AgentMetrics(_message.Message):
    __slots__ = ("tasks_completed", "average_duration", "success_rate", "error_rate")
    TASKS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_DURATION_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    tasks_completed: int
    average_duration: float
    success_rate: float
    error_rate: float
    def __init__(self, tasks_completed: _Optional[int] = ..., average_duration: _Optional[float] = ..., success_rate: _Optional[float] = ..., error_rate: _Optional[float] = ...) -> None: ...

class AgentResources(_message.Message):
    __slots__ = ("cpu_usage", "memory_usage", "memory_limit")
    CPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    cpu_usage: float
    memory_usage: float
    memory_limit: float
    def __init__(self, cpu_usage: _Optional[float] = ..., memory_usage: _Optional[float] = ..., memory_limit: _Optional[float] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("status", "capabilities", "limit", "offset")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    status: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    offset: int
    def __init__(self, status: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "total", "limit", "offset", "has_more", "active", "idle", "busy")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    total: int
    limit: int
    offset: int
    has_more: bool
    active: int
    idle: int
    busy: int
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ..., total: _Optional[int] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., has_more: _Optional[bool] = ..., active: _Optional[int] = ..., idle: _Optional[int] = ..., busy: _Optional[int] = ...) -> None: ...

class GetAgentRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class UpdateAgentConfigRequest(_message.Message):
    __slots__ = ("agent_id", "configuration", "update_mask")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    configuration: _struct_pb2.Struct
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, agent_id: _Optional[str] = ..., configuration: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateAgentConfigResponse(_message.Message):
    __slots__ = ("agent_id", "updated_fields", "configuration")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    updated_fields: _containers.RepeatedScalarFieldContainer[str]
    configuration: _struct_pb2.Struct
    def __init__(self, agent_id: _Optional[str] = ..., updated_fields: _Optional[_Iterable[str]] = ..., configuration: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RegisterAgentRequest(_message.Message):
    __slots__ = ("name", "type", "capabilities", "max_capacity", "configuration", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    max_capacity: int
    configuration: _struct_pb2.Struct
    version: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., max_capacity: _Optional[int] = ..., configuration: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...

class RegisterAgentResponse(_message.Message):
    __slots__ = ("agent", "heartbeat_interval_seconds", "lease_duration_seconds")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    heartbeat_interval_seconds: int
    lease_duration_seconds: int
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ..., heartbeat_interval_seconds: _Optional[int] = ..., lease_duration_seconds: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("agent_id", "current_load", "resources", "task_ids")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LOAD_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    current_load: int
    resources: AgentResources
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., current_load: _Optional[int] = ..., resources: _Optional[_Union[AgentResources, _Mapping]] = ..., task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_expires_at", "renewed_task_ids", "lost_task_ids", "heartbeat_interval_seconds")
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RENEWED_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    LOST_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_expires_at: _timestamp_pb2.Timestamp
    renewed_task_ids: _containers.RepeatedScalarFieldContainer[str]
    lost_task_ids: _containers.RepeatedScalarFieldContainer[str]
    heartbeat_interval_seconds: int
    def __init__(self, lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., renewed_task_ids: _Optional[_Iterable[str]] = ..., lost_task_ids: _Optional[_Iterable[str]] = ..., heartbeat_interval_seconds: _Optional[int] = ...) -> None: ...

class ReportProgressRequest(_message.Message):
    __slots__ = ("agent_id", "task_id", "attempt_token", "progress", "message")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    task_id: str
    attempt_token: str
    progress: int
    message: str
    def __init__(self, agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., attempt_token: _Optional[str] = ..., progress: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ReportProgressResponse(_message.Message):
    __slots__ = ("lease_expires_at",)
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    lease_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CompleteTaskRequest(_message.Message):
    __slots__ = ("agent_id", "task_id", "attempt_token", "result", "error")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    task_id: str
    attempt_token: str
    result: _struct_pb2.Struct
    error: _tasks_pb2.TaskError
    def __init__(self, agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., attempt_token: _Optional[str] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[_Union[_tasks_pb2.TaskError, _Mapping]] = ...) -> None: ...

class CompleteTaskResponse(_message.Message):
    __slots__ = ("task_id", "status")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: str
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class StreamAssignmentsRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("hello", "heartbeat", "progress", "result", "pong")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: AgentHeartbeat
    progress: TaskProgress
    result: TaskResult
    pong: Pong
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[AgentHeartbeat, _Mapping]] = ..., progress: _Optional[_Union[TaskProgress, _Mapping]] = ..., result: _Optional[_Union[TaskResult, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("welcome", "assignment", "cancellation", "config_update", "ping", "result_ack", "error", "end")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    CANCELLATION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_UPDATE_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    RESULT_ACK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    assignment: _tasks_pb2.Assignment
    cancellation: Cancellation
    config_update: ConfigUpdate
    ping: Ping
    result_ack: TaskResultAck
    error: _common_pb2.StreamError
    end: _common_pb2.StreamEnd
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., assignment: _Optional[_Union[_tasks_pb2.Assignment, _Mapping]] = ..., cancellation: _Optional[_Union[Cancellation, _Mapping]] = ..., config_update: _Optional[_Union[ConfigUpdate, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., result_ack: _Optional[_Union[TaskResultAck, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.StreamError, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.StreamEnd, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("name", "type", "capabilities", "max_capacity", "configuration", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    max_capacity: int
    configuration: _struct_pb2.Struct
    version: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., max_capacity: _Optional[int] = ..., configuration: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...

class AgentHeartbeat(_message.Message):
    __slots__ = ("heartbeat", "current_load", "resources", "task_ids")
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LOAD_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat: _common_pb2.Heartbeat
    current_load: int
    resources: AgentResources
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, heartbeat: _Optional[_Union[_common_pb2.Heartbeat, _Mapping]] = ..., current_load: _Optional[int] = ..., resources: _Optional[_Union[AgentResources, _Mapping]] = ..., task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskProgress(_message.Message):
    __slots__ = ("task_id", "attempt_token", "progress", "message")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt_token: str
    progress: int
    message: str
    def __init__(self, task_id: _Optional[str] = ..., attempt_token: _Optional[str] = ..., progress: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "attempt_token", "result", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt_token: str
    result: _struct_pb2.Struct
    error: _tasks_pb2.TaskError
    def __init__(self, task_id: _Optional[str] = ..., attempt_token: _Optional[str] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[_Union[_tasks_pb2.TaskError, _Mapping]] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    def __init__(self, nonce: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("agent_id", "heartbeat_interval_seconds", "lease_duration_seconds", "configuration")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    heartbeat_interval_seconds: int
    lease_duration_seconds: int
    configuration: _struct_pb2.Struct
    def __init__(self, agent_id: _Optional[str] = ..., heartbeat_interval_seconds: _Optional[int] = ..., lease_duration_seconds: _Optional[int] = ..., configuration: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Cancellation(_message.Message):
    __slots__ = ("task_id", "reason", "attempt_token", "message")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    attempt_token: str
    message: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ..., attempt_token: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ConfigUpdate(_message.Message):
    __slots__ = ("configuration", "updated_fields")
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    configuration: _struct_pb2.Struct
    updated_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, configuration: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., updated_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce", "time")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, nonce: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TaskResultAck(_message.Message):
    __slots__ = ("task_id", "attempt_token", "accepted", "reason", "status")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt_token: str
    accepted: bool
    reason: str
    status: str
    def __init__(self, task_id: _Optional[str] = ..., attempt_token: _Optional[str] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class DeliverCancellationRequest(_message.Message):
    __slots__ = ("agent_id", "task_id", "reason", "attempt_token", "message")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    task_id: str
    reason: str
    attempt_token: str
    message: str
    def __init__(self, agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., reason: _Optional[str] = ..., attempt_token: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DeliverCancellationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NotifyTasksAvailableRequest(_message.Message):
    __slots__ = ("capabilities",)
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class NotifyTasksAvailableResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResolveAgentsRequest(_message.Message):
    __slots__ = ("agent_ids", "key_id")
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    key_id: str
    def __init__(self, agent_ids: _Optional[_Iterable[str]] = ..., key_id: _Optional[str] = ...) -> None: ...

class ResolveAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentIdentity]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentIdentity, _Mapping]]] = ...) -> None: ...

class CountAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CountAgentsResponse(_message.Message):
    __slots__ = ("registered", "online")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    registered: int
    online: int
    def __init__(self, registered: _Optional[int] = ..., online: _Optional[int] = ...) -> None: ...

class AgentIdentity(_message.Message):
    __slots__ = ("agent_id", "owner_id", "key_id", "name", "online")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    owner_id: str
    key_id: str
    name: str
    online: bool
    def __init__(self, agent_id: _Optional[str] = ..., owner_id: _Optional[str] = ..., key_id: _Optional[str] = ..., name: _Optional[str] = ..., online: _Optional[bool] = ...) -> None: ...
