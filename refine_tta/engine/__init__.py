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

__all__ = [
    "ADAPT_STARTED", "ADAPT_STEP", "AdaptJob", "Cancelled", "Engine", "EngineError", "EngineLimits", "EngineMetrics",
    "GenerateJob", "InvalidSettings", "Job", "JobHandle", "LimitExceeded", "LockMode", "NotFound", "QueueFull",
    "Session", "SessionDamaged", "SessionRefused", "SessionStorage", "SessionStore", "StateDirLock", "StateDirLocked",
    "StorageFull", "Unavailable", "is_session_id", "jsonable", "new_session_id",
]
