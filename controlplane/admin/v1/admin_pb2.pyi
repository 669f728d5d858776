from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PublishRequest(_message.Message):
    __slots__ = ("group", "message", "actor", "resources", "create_group")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    CREATE_GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    message: str
    actor: str
    resources: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    create_group: bool
    def __init__(self, group: _Optional[str] = ..., message: _Optional[str] = ..., actor: _Optional[str] = ..., resources: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ..., create_group: _Optional[bool] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("version", "changed", "parent_version", "counts", "outcome")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    version: str
    changed: bool
    parent_version: str
    counts: _containers.ScalarMap[str, int]
    outcome: str
    def __init__(self, version: _Optional[str] = ..., changed: _Optional[bool] = ..., parent_version: _Optional[str] = ..., counts: _Optional[_Mapping[str, int]] = ..., outcome: _Optional[str] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("id", "group", "action", "version", "parent_version", "created_at", "actor", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    group: str
    action: str
    version: str
    parent_version: str
    created_at: float
    actor: str
    message: str
    def __init__(self, id: _Optional[int] = ..., group: _Optional[str] = ..., action: _Optional[str] = ..., version: _Optional[str] = ..., parent_version: _Optional[str] = ..., created_at: _Optional[float] = ..., actor: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("group", "limit")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    group: str
    limit: int
    def __init__(self, group: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class GroupPointers(_message.Message):
    __slots__ = ("pointers",)
    class PointersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POINTERS_FIELD_NUMBER: _ClassVar[int]
    pointers: _containers.ScalarMap[str, str]
    def __init__(self, pointers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("entries", "groups")
    class GroupsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: GroupPointers
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[GroupPointers, _Mapping]] = ...) -> None: ...
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    groups: _containers.MessageMap[str, GroupPointers]
    def __init__(self, entries: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ..., groups: _Optional[_Mapping[str, GroupPointers]] = ...) -> None: ...

class GetFleetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TypeStatus(_message.Message):
    __slots__ = ("type_url", "state", "expected_version", "sent_version", "sent_at", "acked_version", "acked_at", "nacked_version", "nacked_at", "nack_error")
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    ACKED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    NACKED_VERSION_FIELD_NUMBER: _ClassVar[int]
    NACKED_AT_FIELD_NUMBER: _ClassVar[int]
    NACK_ERROR_FIELD_NUMBER: _ClassVar[int]
    type_url: str
    state: str
    expected_version: str
    sent_version: str
    sent_at: float
    acked_version: str
    acked_at: float
    nacked_version: str
    nacked_at: float
    nack_error: str
    def __init__(self, type_url: _Optional[str] = ..., state: _Optional[str] = ..., expected_version: _Optional[str] = ..., sent_version: _Optional[str] = ..., sent_at: _Optional[float] = ..., acked_version: _Optional[str] = ..., acked_at: _Optional[float] = ..., nacked_version: _Optional[str] = ..., nacked_at: _Optional[float] = ..., nack_error: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "group", "build_version", "user_agent", "protocol", "stream_id", "connected_at", "snapshot_version", "types", "canary", "held_version", "state", "served_group", "stuck", "stuck_since", "missing", "started_empty", "replica")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BUILD_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVED_GROUP_FIELD_NUMBER: _ClassVar[int]
    STUCK_FIELD_NUMBER: _ClassVar[int]
    STUCK_SINCE_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    STARTED_EMPTY_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    group: str
    build_version: str
    user_agent: str
    protocol: str
    stream_id: int
    connected_at: float
    snapshot_version: str
    types: _containers.RepeatedCompositeFieldContainer[TypeStatus]
    canary: bool
    held_version: str
    state: str
    served_group: str
    stuck: bool
    stuck_since: float
    missing: _containers.RepeatedScalarFieldContainer[str]
    started_empty: bool
    replica: str
    def __init__(self, node_id: _Optional[str] = ..., group: _Optional[str] = ..., build_version: _Optional[str] = ..., user_agent: _Optional[str] = ..., protocol: _Optional[str] = ..., stream_id: _Optional[int] = ..., connected_at: _Optional[float] = ..., snapshot_version: _Optional[str] = ..., types: _Optional[_Iterable[_Union[TypeStatus, _Mapping]]] = ..., canary: _Optional[bool] = ..., held_version: _Optional[str] = ..., state: _Optional[str] = ..., served_group: _Optional[str] = ..., stuck: _Optional[bool] = ..., stuck_since: _Optional[float] = ..., missing: _Optional[_Iterable[str]] = ..., started_empty: _Optional[bool] = ..., replica: _Optional[str] = ...) -> None: ...

class GetFleetStatusResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("group", "phase", "candidate", "previous_stable", "staged_at", "ended_at", "reason", "actor", "message", "existing_acked", "fresh_acked", "min_existing", "min_fresh", "probe_state", "probe_reason", "canary_selector", "auto_promote", "bake_seconds", "deadline_seconds", "pending", "bake_started_at", "bake_ends_at", "bake_seconds_left", "observed_at", "traffic_checks", "traffic_prometheus", "traffic_min_passes", "traffic_interval_seconds")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STABLE_FIELD_NUMBER: _ClassVar[int]
    STAGED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXISTING_ACKED_FIELD_NUMBER: _ClassVar[int]
    FRESH_ACKED_FIELD_NUMBER: _ClassVar[int]
    MIN_EXISTING_FIELD_NUMBER: _ClassVar[int]
    MIN_FRESH_FIELD_NUMBER: _ClassVar[int]
    PROBE_STATE_FIELD_NUMBER: _ClassVar[int]
    PROBE_REASON_FIELD_NUMBER: _ClassVar[int]
    CANARY_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    AUTO_PROMOTE_FIELD_NUMBER: _ClassVar[int]
    BAKE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    BAKE_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    BAKE_ENDS_AT_FIELD_NUMBER: _ClassVar[int]
    BAKE_SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CHECKS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PROMETHEUS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_MIN_PASSES_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group: str
    phase: str
    candidate: str
    previous_stable: str
    staged_at: float
    ended_at: float
    reason: str
    actor: str
    message: str
    existing_acked: _containers.RepeatedScalarFieldContainer[str]
    fresh_acked: _containers.RepeatedScalarFieldContainer[str]
    min_existing: int
    min_fresh: int
    probe_state: str
    probe_reason: str
    canary_selector: str
    auto_promote: bool
    bake_seconds: float
    deadline_seconds: float
    pending: _containers.RepeatedCompositeFieldContainer[RolloutPendingNode]
    bake_started_at: float
    bake_ends_at: float
    bake_seconds_left: float
    observed_at: float
    traffic_checks: _containers.RepeatedCompositeFieldContainer[TrafficCheckStatus]
    traffic_prometheus: str
    traffic_min_passes: int
    traffic_interval_seconds: float
    def __init__(self, group: _Optional[str] = ..., phase: _Optional[str] = ..., candidate: _Optional[str] = ..., previous_stable: _Optional[str] = ..., staged_at: _Optional[float] = ..., ended_at: _Optional[float] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ..., message: _Optional[str] = ..., existing_acked: _Optional[_Iterable[str]] = ..., fresh_acked: _Optional[_Iterable[str]] = ..., min_existing: _Optional[int] = ..., min_fresh: _Optional[int] = ..., probe_state: _Optional[str] = ..., probe_reason: _Optional[str] = ..., canary_selector: _Optional[str] = ..., auto_promote: _Optional[bool] = ..., bake_seconds: _Optional[float] = ..., deadline_seconds: _Optional[float] = ..., pending: _Optional[_Iterable[_Union[RolloutPendingNode, _Mapping]]] = ..., bake_started_at: _Optional[float] = ..., bake_ends_at: _Optional[float] = ..., bake_seconds_left: _Optional[float] = ..., observed_at: _Optional[float] = ..., traffic_checks: _Optional[_Iterable[_Union[TrafficCheckStatus, _Mapping]]] = ..., traffic_prometheus: _Optional[str] = ..., traffic_min_passes: _Optional[int] = ..., traffic_interval_seconds: _Optional[float] = ...) -> None: ...

class RolloutPendingNode(_message.Message):
    __slots__ = ("node_id", "waiting_for", "types", "since", "detail")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    waiting_for: str
    types: _containers.RepeatedScalarFieldContainer[str]
    since: float
    detail: str
    def __init__(self, node_id: _Optional[str] = ..., waiting_for: _Optional[str] = ..., types: _Optional[_Iterable[str]] = ..., since: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class TrafficCheckStatus(_message.Message):
    __slots__ = ("name", "state", "value", "query", "detail", "passes", "failures", "evaluated_at", "max", "min")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_AT_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    value: float
    query: str
    detail: str
    passes: int
    failures: int
    evaluated_at: float
    max: float
    min: float
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., value: _Optional[float] = ..., query: _Optional[str] = ..., detail: _Optional[str] = ..., passes: _Optional[int] = ..., failures: _Optional[int] = ..., evaluated_at: _Optional[float] = ..., max: _Optional[float] = ..., min: _Optional[float] = ...) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts", "guards")
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    GUARDS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutStatus]
    guards: _containers.RepeatedCompositeFieldContainer[GuardStatus]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[RolloutStatus, _Mapping]]] = ..., guards: _Optional[_Iterable[_Union[GuardStatus, _Mapping]]] = ...) -> None: ...

class GuardStatus(_message.Message):
    __slots__ = ("group", "version", "rollback_to", "phase", "started_at", "seconds", "seconds_left", "first_sync_seconds", "reason", "ended_at")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_TO_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SYNC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    group: str
    version: str
    rollback_to: str
    phase: str
    started_at: float
    seconds: float
    seconds_left: float
    first_sync_seconds: float
    reason: str
    ended_at: float
    def __init__(self, group: _Optional[str] = ..., version: _Optional[str] = ..., rollback_to: _Optional[str] = ..., phase: _Optional[str] = ..., started_at: _Optional[float] = ..., seconds: _Optional[float] = ..., seconds_left: _Optional[float] = ..., first_sync_seconds: _Optional[float] = ..., reason: _Optional[str] = ..., ended_at: _Optional[float] = ...) -> None: ...

class RolloutCommand(_message.Message):
    __slots__ = ("group", "actor", "reason")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    group: str
    actor: str
    reason: str
    def __init__(self, group: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("group", "to_version", "actor", "reason")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    group: str
    to_version: str
    actor: str
    reason: str
    def __init__(self, group: _Optional[str] = ..., to_version: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("version", "previous_version", "aborted_rollout", "started_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ABORTED_ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    version: str
    previous_version: str
    aborted_rollout: bool
    started_at: float
    def __init__(self, version: _Optional[str] = ..., previous_version: _Optional[str] = ..., aborted_rollout: _Optional[bool] = ..., started_at: _Optional[float] = ...) -> None: ...

class WaitForConvergenceRequest(_message.Message):
    __slots__ = ("group", "version", "since", "timeout_seconds")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group: str
    version: str
    since: float
    timeout_seconds: float
    def __init__(self, group: _Optional[str] = ..., version: _Optional[str] = ..., since: _Optional[float] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class LaggingNode(_message.Message):
    __slots__ = ("node_id", "state")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: str
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class WaitForConvergenceResponse(_message.Message):
    __slots__ = ("version", "total_nodes", "acked_nodes", "seconds", "lagging")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NODES_FIELD_NUMBER: _ClassVar[int]
    ACKED_NODES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAGGING_FIELD_NUMBER: _ClassVar[int]
    version: str
    total_nodes: int
    acked_nodes: int
    seconds: float
    lagging: _containers.RepeatedCompositeFieldContainer[LaggingNode]
    def __init__(self, version: _Optional[str] = ..., total_nodes: _Optional[int] = ..., acked_nodes: _Optional[int] = ..., seconds: _Optional[float] = ..., lagging: _Optional[_Iterable[_Union[LaggingNode, _Mapping]]] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("version", "type_url", "name", "page_bytes", "offset", "include_secrets")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SECRETS_FIELD_NUMBER: _ClassVar[int]
    version: str
    type_url: str
    name: str
    page_bytes: int
    offset: int
    include_secrets: bool
    def __init__(self, version: _Optional[str] = ..., type_url: _Optional[str] = ..., name: _Optional[str] = ..., page_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., include_secrets: _Optional[bool] = ...) -> None: ...

class GetSnapshotResponse(_message.Message):
    __slots__ = ("version", "resources", "next_offset")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    version: str
    resources: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    next_offset: int
    def __init__(self, version: _Optional[str] = ..., resources: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class NodeConfigRequest(_message.Message):
    __slots__ = ("node_id", "type_url", "include_resources", "include_secrets")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SECRETS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    type_url: str
    include_resources: bool
    include_secrets: bool
    def __init__(self, node_id: _Optional[str] = ..., type_url: _Optional[str] = ..., include_resources: _Optional[bool] = ..., include_secrets: _Optional[bool] = ...) -> None: ...

class NodeConfigType(_message.Message):
    __slots__ = ("status", "names", "resources", "wildcard")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    WILDCARD_FIELD_NUMBER: _ClassVar[int]
    status: TypeStatus
    names: _containers.RepeatedScalarFieldContainer[str]
    resources: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    wildcard: bool
    def __init__(self, status: _Optional[_Union[TypeStatus, _Mapping]] = ..., names: _Optional[_Iterable[str]] = ..., resources: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ..., wildcard: _Optional[bool] = ...) -> None: ...

class NodeConfigStream(_message.Message):
    __slots__ = ("node", "types")
    NODE_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    node: NodeStatus
    types: _containers.RepeatedCompositeFieldContainer[NodeConfigType]
    def __init__(self, node: _Optional[_Union[NodeStatus, _Mapping]] = ..., types: _Optional[_Iterable[_Union[NodeConfigType, _Mapping]]] = ...) -> None: ...

class NodeConfigResponse(_message.Message):
    __slots__ = ("streams",)
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[NodeConfigStream]
    def __init__(self, streams: _Optional[_Iterable[_Union[NodeConfigStream, _Mapping]]] = ...) -> None: ...
