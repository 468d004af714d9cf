"""Tier 3: sessions and the engine (the one worker thread that owns the device). No HTTP here."""

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
    TokenScores,
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
from refine_tta.model.generation import GenerationResult, SamplingConfig
from refine_tta.refine.config import RefineConfig

__all__ = [
    "ADAPT_STARTED", "ADAPT_STEP", "AdaptJob", "Cancelled", "Engine", "EngineError", "EngineLimits", "EngineMetrics",
    "GenerateJob", "GenerationResult", "InvalidSettings", "Job", "JobHandle", "LimitExceeded", "LockMode", "NotFound",
    "QueueFull", "RefineConfig", "SamplingConfig", "ScoreJob", "Session", "SessionDamaged", "SessionRefused",
    "SessionStorage", "SessionStore", "StateDirLock", "StateDirLocked", "StorageFull", "TokenScores", "Unavailable",
    "is_session_id", "jsonable", "new_session_id",
]
