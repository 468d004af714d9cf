"""Domain errors of the engine tier. The HTTP edge maps each class to one status, in one place."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose; ``str(err)`` is a message for the user."""


class NotFound(EngineError):
    """No such session (or it belongs to another owner, which must look the same)."""


class LimitExceeded(EngineError):
    """A request is over one of the configured limits (:class:`~refine_tta.engine.EngineLimits`)."""

    def __init__(self, limit: str, value: int, maximum: int, what: str | None = None):
        self.limit, self.value, self.maximum = limit, value, maximum
        subject = what or limit
        super().__init__(f"{subject} is {value}, over the limit {limit}={maximum}")


class InvalidSettings(EngineError):
    """Settings or inputs that are well-typed but impossible (k=0, unknown reward, too short a document)."""


class QueueFull(EngineError):
    """The work queue is full; nothing was done, the request may be retried after ``retry_after`` seconds."""

    def __init__(self, queue_size: int, retry_after: float = 1.0):
        self.queue_size, self.retry_after = queue_size, retry_after
        super().__init__(f"the work queue is full ({queue_size} jobs waiting); retry later")


class Cancelled(EngineError):
    """The job was cancelled (its client went away, or the engine is shutting down)."""


class Unavailable(EngineError):
    """The engine cannot take work (model still loading, or stopped). ``retry_after`` None: it will
    not recover by waiting (the model failed to load)."""

    def __init__(self, message: str, retry_after: float | None = 5.0):
        self.retry_after = retry_after
        super().__init__(message)
