from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Thumb(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THUMB_UNSPECIFIED: _ClassVar[Thumb]
    THUMB_UP: _ClassVar[Thumb]
    THUMB_DOWN: _ClassVar[Thumb]

class PairwiseChoice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAIRWISE_CHOICE_UNSPECIFIED: _ClassVar[PairwiseChoice]
    PAIRWISE_CHOICE_FIRST: _ClassVar[PairwiseChoice]
    PAIRWISE_CHOICE_SECOND: _ClassVar[PairwiseChoice]
    PAIRWISE_CHOICE_TIE: _ClassVar[PairwiseChoice]
THUMB_UNSPECIFIED: Thumb
THUMB_UP: Thumb
THUMB_DOWN: Thumb
PAIRWISE_CHOICE_UNSPECIFIED: PairwiseChoice
PAIRWISE_CHOICE_FIRST: PairwiseChoice
PAIRWISE_CHOICE_SECOND: PairwiseChoice
PAIRWISE_CHOICE_TIE: PairwiseChoice

class ThumbsFeedback(_message.Message):
    __slots__ = ("completion_id", "value")
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    value: Thumb
    def __init__(self, completion_id: _Optional[str] = ..., value: _Optional[_Union[Thumb, str]] = ...) -> None: ...

class RatingFeedback(_message.Message):
    __slots__ = ("completion_id", "score")
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    score: int
    def __init__(self, completion_id: _Optional[str] = ..., score: _Optional[int] = ...) -> None: ...

class CommentFeedback(_message.Message):
    __slots__ = ("completion_id",)
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    def __init__(self, completion_id: _Optional[str] = ...) -> None: ...

class CorrectionFeedback(_message.Message):
    __slots__ = ("completion_id", "corrected_text")
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    CORRECTED_TEXT_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    corrected_text: str
    def __init__(self, completion_id: _Optional[str] = ..., corrected_text: _Optional[str] = ...) -> None: ...

class PairwiseFeedback(_message.Message):
    __slots__ = ("first_completion_id", "second_completion_id", "group_id", "choice")
    FIRST_COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    SECOND_COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    first_completion_id: str
    second_completion_id: str
    group_id: str
    choice: PairwiseChoice
    def __init__(self, first_completion_id: _Optional[str] = ..., second_completion_id: _Optional[str] = ..., group_id: _Optional[str] = ..., choice: _Optional[_Union[PairwiseChoice, str]] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("event_id", "rater_id", "thumbs", "rating", "comment", "correction", "pairwise", "comment_text", "reason_tags")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RATER_ID_FIELD_NUMBER: _ClassVar[int]
    THUMBS_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_TEXT_FIELD_NUMBER: _ClassVar[int]
    REASON_TAGS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    rater_id: str
    thumbs: ThumbsFeedback
    rating: RatingFeedback
    comment: CommentFeedback
    correction: CorrectionFeedback
    pairwise: PairwiseFeedback
    comment_text: str
    reason_tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, event_id: _Optional[str] = ..., rater_id: _Optional[str] = ..., thumbs: _Optional[_Union[ThumbsFeedback, _Mapping]] = ..., rating: _Optional[_Union[RatingFeedback, _Mapping]] = ..., comment: _Optional[_Union[CommentFeedback, _Mapping]] = ..., correction: _Optional[_Union[CorrectionFeedback, _Mapping]] = ..., pairwise: _Optional[_Union[PairwiseFeedback, _Mapping]] = ..., comment_text: _Optional[str] = ..., reason_tags: _Optional[_Iterable[str]] = ...) -> None: ...

class FeedbackError(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class FeedbackAck(_message.Message):
    __slots__ = ("event_id", "duplicate", "sequence", "superseded_event_id", "stream_index", "error")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    duplicate: bool
    sequence: int
    superseded_event_id: str
    stream_index: int
    error: FeedbackError
    def __init__(self, event_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., sequence: _Optional[int] = ..., superseded_event_id: _Optional[str] = ..., stream_index: _Optional[int] = ..., error: _Optional[_Union[FeedbackError, _Mapping]] = ...) -> None: ...

class SubmitFeedbackBatchRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[FeedbackEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[FeedbackEvent, _Mapping]]] = ...) -> None: ...

class SubmitFeedbackBatchResponse(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[FeedbackAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[FeedbackAck, _Mapping]]] = ...) -> None: ...
