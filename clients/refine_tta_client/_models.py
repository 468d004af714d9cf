"""Typed responses of the refine-tta HTTP API (docs/http-api.md).

Every model allows extra fields (``extra="allow"``), so a newer server that adds fields does not
break an older client; the added fields are kept and reachable as attributes and in
``model_dump()``. Fields the contract marks as always present are required; the rest are optional.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AdaptStats",
    "AdaptResponse",
    "AdaptStarted",
    "AdaptStartedEvent",
    "AdaptProgress",
    "AdaptProgressEvent",
    "AdaptDoneEvent",
    "AdaptEvent",
    "GenerateResponse",
    "TokenEvent",
    "GenerateDoneEvent",
    "GenerateEvent",
    "SessionInfo",
    "SessionList",
    "DeleteResponse",
    "Health",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class AdaptStats(_Model):
    """Adaptation statistics: one dict per step (``reward_mean``, ``ntp_loss``, ...) and totals."""

    steps: list[dict[str, Any]] = Field(default_factory=list)
    total: dict[str, Any] = Field(default_factory=dict)


class AdaptResponse(_Model):
    """Body of ``POST /v1/adapt`` (and data of its stream's ``done`` event): the new session."""

    session_id: str
    created: float
    document_tokens: int
    state_bytes: int | None = None
    delta_bytes: int | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    stats: AdaptStats = Field(default_factory=AdaptStats)


class AdaptStarted(_Model):
    """Data of the ``started`` event: the server began the adaptation (before step 1)."""

    of: int
    document_tokens: int | None = None
    mode: str | None = None
    queued_s: float | None = None


class AdaptStartedEvent(_Model):
    """Streamed adaptation: the first event, sent when the work starts (step 1 may take long)."""

    type: Literal["started"] = "started"
    started: AdaptStarted


class AdaptProgress(_Model):
    """Data of a ``progress`` event: step ``step`` of ``of`` has finished."""

    step: int
    of: int
    reward_mean: float | None = None
    ntp_loss: float | None = None
    policy_loss: float | None = None
    seconds: float | None = None


class AdaptProgressEvent(_Model):
    """Streamed adaptation: one step finished."""

    type: Literal["progress"] = "progress"
    progress: AdaptProgress


class AdaptDoneEvent(_Model):
    """Streamed adaptation: the last event, carrying the full :class:`AdaptResponse`."""

    type: Literal["done"] = "done"
    response: AdaptResponse


AdaptEvent = AdaptStartedEvent | AdaptProgressEvent | AdaptDoneEvent
"""What ``adapt(..., stream=True)`` yields: a started event, progress events, then exactly one done event."""


class GenerateResponse(_Model):
    """Body of ``POST /v1/generate`` (and data of its stream's ``done`` event)."""

    text: str
    tokens: list[int] = Field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "eos"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    session_id: str | None = None


class TokenEvent(_Model):
    """Streamed generation: one new piece of text and the token id that produced it."""

    type: Literal["token"] = "token"
    text: str
    token: int | None = None


class GenerateDoneEvent(_Model):
    """Streamed generation: the last event, carrying the full :class:`GenerateResponse`."""

    type: Literal["done"] = "done"
    response: GenerateResponse


GenerateEvent = TokenEvent | GenerateDoneEvent
"""What ``generate(..., stream=True)`` yields: token events, then exactly one done event."""


class SessionInfo(_Model):
    """``GET /v1/sessions/{id}``: an adapted document state held by the server."""

    session_id: str
    created: float
    last_used: float | None = None
    document_tokens: int
    state_bytes: int | None = None
    delta_bytes: int | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    stats: AdaptStats = Field(default_factory=AdaptStats)


class SessionList(_Model):
    """``GET /v1/sessions``."""

    sessions: list[SessionInfo] = Field(default_factory=list)


class DeleteResponse(_Model):
    """``DELETE /v1/sessions/{id}``."""

    session_id: str
    deleted: bool


class Health(_Model):
    """``GET /health`` when the model is loaded."""

    status: str
    model: str | None = None
    device: str | None = None
    backend: str | None = None
