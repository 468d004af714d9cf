"""Typed request and response bodies of the HTTP API (docs/http-api.md).

Requests are strict (``"4"`` is not an int, ``123`` is not a string) and reject unknown fields,
except the OpenAI completions request, which ignores fields it does not use (so OpenAI clients
that send extra options keep working) and refuses the ones it cannot honour. Value checks that
belong to the library (``k >= 1``, known reward kinds, ...) stay in ``RefineConfig`` and come
back as 400 ``invalid_request`` with its message.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from refine_tta.engine import GenerationResult, RefineConfig, Session

_STRICT = ConfigDict(strict=True, extra="forbid")
MAX_SEED = 2**63 - 1


def _valid_unicode(value: Any) -> Any:
    """Reject strings with lone surrogates (valid JSON, ``"\\ud800"``, but not encodable text)."""
    texts = value if isinstance(value, list) else [value]
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"not valid Unicode ({exc.reason} at position {exc.start})") from None
    return value


def _stop_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        if len(value) > 8:
            raise ValueError("at most 8 stop strings")
        if any(isinstance(s, str) and not s for s in value):
            raise ValueError("stop strings must be non-empty")
    return value


# ------------------------------------------------------------------------------------- /v1/adapt
class _SettingsBase(BaseModel):
    model_config = _STRICT

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _optional(annotation: Any) -> Any:
    """A RefineConfig field's type as an optional JSON type (tuples are JSON arrays)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in (int, float, str, bool):
        return annotation | None
    if typing.get_origin(annotation) is tuple:
        return list[args[0]] | None
    if len(args) == 1:  # X | None
        return _optional(args[0])
    raise TypeError(f"RefineConfig field type {annotation!r} has no JSON form here")


def _settings_model() -> type[_SettingsBase]:
    """RefineConfig's fields, each optional (absent = the server's default); seeds range-checked here."""
    hints = typing.get_type_hints(RefineConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(RefineConfig):
        extra = {"ge": 0, "le": MAX_SEED} if f.name == "seed" else {}
        fields[f.name] = (_optional(hints[f.name]), Field(None, **extra))
    return create_model("AdaptSettings", __base__=_SettingsBase, __doc__="RefineConfig fields a request may set; "
                        "absent fields take the server's defaults.", **fields)


AdaptSettings = _settings_model()


class AdaptRequest(BaseModel):
    model_config = _STRICT

    document: str = Field(min_length=1, description="the text to adapt to")
    settings: AdaptSettings = Field(default_factory=AdaptSettings)
    base_session: str | None = Field(None, description="continue from this session's adapted weights (one of "
                                                       "yours, adapted with the same scope)")
    stream: bool = False

    _unicode = field_validator("document")(_valid_unicode)


class AdaptStats(BaseModel):
    steps: list[dict[str, Any]] = Field(default_factory=list)
    total: dict[str, Any] = Field(default_factory=dict)


class SessionInfo(BaseModel):
    session_id: str
    created: float
    last_used: float
    document_tokens: int
    state_bytes: int
    delta_bytes: int
    settings: dict[str, Any]
    stats: AdaptStats

    @classmethod
    def of(cls, session: Session) -> SessionInfo:
        return cls(session_id=session.id, created=session.created, last_used=session.last_used,
                   document_tokens=session.document_tokens, state_bytes=session.state_bytes,
                   delta_bytes=session.delta_bytes, settings=session.settings,
                   stats=AdaptStats(steps=session.stats.get("steps", []), total=session.stats.get("total", {})))


class AdaptResponse(SessionInfo):
    """Body of ``POST /v1/adapt`` (and data of its stream's ``done`` event)."""


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class DeleteResponse(BaseModel):
    session_id: str
    deleted: bool


# ---------------------------------------------------------------------------------- /v1/generate
class GenerateRequest(BaseModel):
    model_config = _STRICT

    session_id: str | None = None
    prompt: str
    max_tokens: int | None = Field(None, ge=1, description="default: 64, or the server's limit if lower")
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    stop: list[str] | str | None = None
    stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        return _stop_list(value)

    _unicode = field_validator("prompt", "stop")(_valid_unicode)

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class GenerateResponse(BaseModel):
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tokens_per_s: float
    session_id: str | None

    @classmethod
    def of(cls, result: GenerationResult, session_id: str | None) -> GenerateResponse:
        return cls(text=result.text, tokens=result.tokens, finish_reason=result.finish_reason,
                   prompt_tokens=result.prompt_tokens, completion_tokens=len(result.tokens),
                   ttft_s=result.ttft_s, tokens_per_s=result.tokens_per_s, session_id=session_id)


class TokenEvent(BaseModel):
    text: str
    token: int


# ------------------------------------------------------------------------------------ /health
class Health(BaseModel):
    status: Literal["ok"]
    model: str
    device: str
    backend: str


# -------------------------------------------------------------------------------- OpenAI-compatible
class CompletionRequest(BaseModel):
    """OpenAI ``POST /v1/completions``. ``model``: a session id or the base model's name."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1, description="default: 16, or the server's limit if lower")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] | str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    best_of: int | None = Field(None, ge=1, le=1)
    echo: Literal[False] = False
    logprobs: None = Field(None, description="log-probabilities are not supported")
    suffix: None = Field(None, description="suffixes (insertion) are not supported")
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        return _stop_list(value)

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request (a string, or a list holding one string)")
        return _valid_unicode(value)

    _unicode = field_validator("stop")(_valid_unicode)

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
