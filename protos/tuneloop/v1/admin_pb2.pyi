from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListAdaptersRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterState]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterState, _Mapping]]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("name", "to_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    to_version: str
    def __init__(self, name: _Optional[str] = ..., to_version: _Optional[str] = ...) -> None: ...

class SetCanaryRequest(_message.Message):
    __slots__ = ("name", "version", "share", "auto_decide")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    AUTO_DECIDE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    share: float
    auto_decide: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., share: _Optional[float] = ..., auto_decide: _Optional[bool] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class LiveFeedback(_message.Message):
    __slots__ = ("thumbs_up", "thumbs_down", "ratings", "rating_mean", "pairwise_wins", "pairwise_losses")
    THUMBS_UP_FIELD_NUMBER: _ClassVar[int]
    THUMBS_DOWN_FIELD_NUMBER: _ClassVar[int]
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    RATING_MEAN_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_WINS_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_LOSSES_FIELD_NUMBER: _ClassVar[int]
    thumbs_up: int
    thumbs_down: int
    ratings: int
    rating_mean: float
    pairwise_wins: int
    pairwise_losses: int
    def __init__(self, thumbs_up: _Optional[int] = ..., thumbs_down: _Optional[int] = ..., ratings: _Optional[int] = ..., rating_mean: _Optional[float] = ..., pairwise_wins: _Optional[int] = ..., pairwise_losses: _Optional[int] = ...) -> None: ...

class VersionState(_message.Message):
    __slots__ = ("version", "status", "parent_version", "created_at", "loaded", "active_requests", "traffic_share", "role", "feedback", "metrics", "refusal")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SHARE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    version: str
    status: str
    parent_version: str
    created_at: float
    loaded: bool
    active_requests: int
    traffic_share: float
    role: str
    feedback: LiveFeedback
    metrics: _containers.ScalarMap[str, float]
    refusal: str
    def __init__(self, version: _Optional[str] = ..., status: _Optional[str] = ..., parent_version: _Optional[str] = ..., created_at: _Optional[float] = ..., loaded: _Optional[bool] = ..., active_requests: _Optional[int] = ..., traffic_share: _Optional[float] = ..., role: _Optional[str] = ..., feedback: _Optional[_Union[LiveFeedback, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., refusal: _Optional[str] = ...) -> None: ...

class CanaryStatus(_message.Message):
    __slots__ = ("decision", "llr", "wins", "losses", "auto_decide")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    LLR_FIELD_NUMBER: _ClassVar[int]
    WINS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    AUTO_DECIDE_FIELD_NUMBER: _ClassVar[int]
    decision: str
    llr: float
    wins: int
    losses: int
    auto_decide: bool
    def __init__(self, decision: _Optional[str] = ..., llr: _Optional[float] = ..., wins: _Optional[int] = ..., losses: _Optional[int] = ..., auto_decide: _Optional[bool] = ...) -> None: ...

class AdapterState(_message.Message):
    __slots__ = ("name", "current_version", "canary_version", "canary_share", "versions", "canary")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_SHARE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    name: str
    current_version: str
    canary_version: str
    canary_share: float
    versions: _containers.RepeatedCompositeFieldContainer[VersionState]
    canary: CanaryStatus
    def __init__(self, name: _Optional[str] = ..., current_version: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_share: _Optional[float] = ..., versions: _Optional[_Iterable[_Union[VersionState, _Mapping]]] = ..., canary: _Optional[_Union[CanaryStatus, _Mapping]] = ...) -> None: ...
