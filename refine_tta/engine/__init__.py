"""Tier 3: sessions and the engine (the one worker thread that owns the device). No HTTP here."""

from refine_tta.engine.engine import (
    AdaptJob,
    Engine,
    EngineLimits,
    EngineMetrics,
    GenerateJob,
    Job,
    JobHandle,
    jsonable,
)
from refine_tta.engine.errors import (
    Cancelled,
    EngineError,
    InvalidSettings,
    LimitExceeded,
    NotFound,
    QueueFull,
    Unavailable,
)
from refine_tta.engine.sessions import Session, SessionStore, is_session_id, new_session_id
from refine_tta.engine.text import GenerationResult, SamplingConfig, TextCodec, generate_text

__all__ = [
    "AdaptJob", "Cancelled", "Engine", "EngineError", "EngineLimits", "EngineMetrics", "GenerateJob",
    "GenerationResult", "InvalidSettings", "Job", "JobHandle", "LimitExceeded", "NotFound", "QueueFull",
    "SamplingConfig", "Session", "SessionStore", "TextCodec", "Unavailable", "generate_text", "is_session_id",
    "jsonable", "new_session_id",
]
