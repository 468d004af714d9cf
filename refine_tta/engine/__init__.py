"""Tier 3: sessions and the engine (the one worker thread that owns the device). No HTTP here.

This package is the public surface the server uses: the engine, its jobs and errors, sessions,
the text layer's types, and what it takes to build an engine (``load_model``, ``RefineConfig``
and its presets)."""

from refine_tta.engine.engine import (
    ADAPT_STARTED,
    ADAPT_STEP,
    AdaptJob,
    Engine,
    EngineLimits,
    EngineMetrics,
    GenerateJob,
    Job,
    JobHandle,
    ScoreJob,
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
from refine_tta.engine.scoring import TokenScores
from refine_tta.engine.sessions import Session, SessionStore
from refine_tta.engine.storage import (
    LockMode,
    SessionDamaged,
    SessionRefused,
    SessionStorage,
    StateDirLock,
    StateDirLocked,
    StorageFull,
    is_session_id,
    new_session_id,
)
from refine_tta.engine.text import GenerationResult, SamplingConfig, TextCodec, generate_text
from refine_tta.model.loading import LoadedModel, load_model
from refine_tta.refine.config import PRESETS, RefineConfig, preset

__all__ = [
    "ADAPT_STARTED", "ADAPT_STEP", "AdaptJob", "Cancelled", "Engine", "EngineError", "EngineLimits", "EngineMetrics",
    "GenerateJob", "GenerationResult", "InvalidSettings", "Job", "JobHandle", "LimitExceeded", "LoadedModel",
    "LockMode", "NotFound", "PRESETS", "QueueFull", "RefineConfig", "SamplingConfig", "ScoreJob", "Session",
    "SessionDamaged", "SessionRefused", "SessionStorage", "SessionStore", "StateDirLock", "StateDirLocked", "StorageFull",
    "TextCodec", "TokenScores", "Unavailable", "generate_text", "is_session_id", "jsonable", "load_model", "new_session_id", "preset",
]
