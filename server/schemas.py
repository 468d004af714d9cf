"""Typed request and response bodies of the HTTP API (docs/http-api.md).

Requests are strict (``"4"`` is not an int, ``123`` is not a string; ``2.0`` is the int 2, as
JSON Schema says) and reject unknown fields, except the OpenAI completions request, which ignores
fields it does not use (so OpenAI clients that send extra options keep working) and refuses the
ones it cannot honour. Numbers are finite and every setting has a documented range, so the
OpenAPI schema says what the server takes. Checks that need more than one field or the model
(``k`` and ``edge_margin`` against the document, known LoRA targets, ...) stay in ``RefineConfig``
and the engine and come back as 400 ``invalid_request`` with their message.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator

from refine_tta.engine import GenerationResult, RefineConfig, Session

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
MAX_SEED = 2**63 - 1
MAX_STOPS = 8
MAX_BATCH = 32  # prompts in one completions request
MAX_CHOICES = 32  # prompts * n in one completions request
MAX_LOGPROBS = 20


def _integral(value: Any) -> Any:
    """``2.0`` -> ``2`` (JSON Schema's integers include it); anything else is left to validation."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_SEED:
        return int(value)
    return value


def IntIn(ge: int | None = None, le: int | None = None) -> Any:  # noqa: N802 (a type)
    """An int in [ge, le] that also takes an integral float (constraints first: the JSON schema shows them)."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


Int = IntIn()
NonEmpty = Annotated[str, Field(min_length=1)]
Stop = Annotated[list[NonEmpty], Field(max_length=MAX_STOPS)] | NonEmpty | None


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


def _stops(value: list[str] | str | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


# ------------------------------------------------------------------------------------- /v1/adapt
class _SettingsBase(BaseModel):
    model_config = _STRICT

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


# What the HTTP API accepts for each RefineConfig field (the server's limits, e.g. max_steps, may be
# lower). Ranges are published in the OpenAPI schema; checks across fields or against the model
# stay in RefineConfig and the engine (400 with their message).
_SETTING_TYPES: dict[str, Any] = {
    "mode": Literal["refine", "sft", "none"],
    "steps": IntIn(0, 100_000),
    "lr": Annotated[float, Field(gt=0.0, le=1.0)],
    "weight_decay": Annotated[float, Field(ge=0.0, le=10.0)],
    "grad_clip": Annotated[float, Field(gt=0.0, le=1e6)],
    "n_chunks": IntIn(1, 100_000),
    "k": IntIn(1, 100_000),
    "n": IntIn(1, 100_000),
    "selection": Literal["entropy", "uniform", "argmax", "argmin"],
    "reward": Literal["cosine", "binary", "hybrid"],
    "sft_coef": Annotated[float, Field(ge=0.0, le=1e3)],
    "ppo_coef": Annotated[float, Field(ge=0.0, le=1e3)],
    "clip_low": Annotated[float, Field(gt=0.0, le=1.0)],
    "clip_high": Annotated[float, Field(gt=0.0, le=1.0)],
    "dual_clip": Annotated[float, Field(gt=1.0, le=1e3)],
    "temperature": Annotated[float, Field(ge=1e-3, le=100.0)],
    "edge_margin": IntIn(0, 1_000_000),
    "scope": Literal["full", "lora", "layers"],
    "lora_rank": IntIn(1, 100_000),
    "lora_alpha": Annotated[float, Field(gt=0.0, le=1e6)],
    "lora_targets": Annotated[list[NonEmpty], Field(min_length=1, max_length=64)],
    "layers": Annotated[list[IntIn(0, 10_000)], Field(min_length=1, max_length=10_000)],
    "seed": IntIn(0, MAX_SEED),
}


def _settings_model() -> type[_SettingsBase]:
    """RefineConfig's fields, in its order, each optional (absent = the server's default) with its
    HTTP type and range from ``_SETTING_TYPES`` (a RefineConfig field without one is an error here)."""
    names = [f.name for f in dataclasses.fields(RefineConfig)]
    if set(names) != set(_SETTING_TYPES):
        raise TypeError(f"server/schemas.py _SETTING_TYPES must cover exactly RefineConfig's fields: missing "
                        f"{sorted(set(names) - set(_SETTING_TYPES))}, extra {sorted(set(_SETTING_TYPES) - set(names))}")
    fields = {name: (_SETTING_TYPES[name] | None, None) for name in names}
    return create_model("AdaptSettings", __base__=_SettingsBase, __doc__="RefineConfig fields a request may set; "
                        "absent fields take the server's defaults. Ranges are what the HTTP API accepts (the "
                        "server's limits, e.g. max_steps, may be lower).", **fields)


AdaptSettings = _settings_model()


class AdaptRequest(BaseModel):
    model_config = _STRICT

    document: str = Field(min_length=1, description="the text to adapt to (at most the server's "
                                                     "max_document_tokens tokens; over it: 413)")
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
    max_tokens: IntIn(1) | None = Field(None, description="default: 64, or the server's limit if lower")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy; otherwise at least 0.001")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: IntIn(0, MAX_SEED) = 0
    stop: Stop = None
    stream: bool = False

    _unicode = field_validator("prompt", "stop")(_valid_unicode)

    @property
    def stops(self) -> list[str]:
        return _stops(self.stop)


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
TokenIds = Annotated[list[IntIn(0)], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI ``POST /v1/completions``. ``model``: a session id or the base model's name.

    ``prompt``: text, a list of texts, token ids, or a list of token-id lists; a list is one batch
    (choice ``i * n + j`` is the j-th completion of prompt i). Token ids are read as given (no BOS).
    """

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_BATCH)]
    max_tokens: IntIn(0) | None = Field(None, description="default: 16, or the server's limit if lower; 0 only "
                                                            "with echo (score the prompt)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: IntIn(1, MAX_CHOICES) = Field(1, description=f"completions per prompt (prompts * n <= {MAX_CHOICES})")
    best_of: IntIn(1, MAX_CHOICES) | None = Field(None, description="only equal to n (no re-ranking)")
    seed: IntIn(0, MAX_SEED) | None = Field(None, description="choice i samples with seed + i")
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="prepend the prompt to each choice (its tokens in logprobs)")
    logprobs: IntIn(0, MAX_LOGPROBS) | None = Field(None, description="log-probabilities of each token and "
                                                                         "the top-k alternatives")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="not supported: only 0")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only empty")
    suffix: str | None = Field(None, description="not supported: only empty")
    user: str | None = None

    @field_validator("prompt", "stop")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        return _valid_unicode(value)

    @property
    def stops(self) -> list[str]:
        return _stops(self.stop)

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: one entry per token of the choice's text (the prompt's first when
    echoed); ``token_logprobs`` is null for a first token with nothing before it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
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


# ------------------------------------------------------------------------------ tokenize (vLLM)
class TokenizeRequest(BaseModel):
    model_config = _STRICT

    model: str | None = Field(None, description="a session id or the base model (all share one tokenizer)")
    prompt: str
    add_special_tokens: bool = Field(True, description="add BOS, as a base-model text prompt does")

    _unicode = field_validator("prompt")(_valid_unicode)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="the most tokens one prompt may have (max_prompt_tokens)")
    tokens: list[int]


class TokenizerInfo(BaseModel):
    """vLLM's ``/tokenizer_info`` (what lm-evaluation-harness reads to use the server's tokenizer)."""

    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int = Field(description="the most tokens one prompt may have (max_prompt_tokens)")


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    tokens: list[IntIn(0)]


class DetokenizeResponse(BaseModel):
    prompt: str


# ------------------------------------------------------------------------------------ errors
class ErrorDetail(BaseModel):
    type: str = Field(description="invalid_request, authentication_error, permission_denied, not_found, "
                                  "limit_exceeded, rate_limited, unavailable, internal_error")
    message: str
    param: str | None = Field(description="the request field at fault (dotted), if one is")
    code: str | None = Field(description="a machine-readable reason, e.g. limit_exceeded, invalid_json")


class ErrorResponse(BaseModel):
    """The body of every error (and the data of a stream's ``error`` event)."""

    error: ErrorDetail
