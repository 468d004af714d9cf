"""Python client for the refine-tta test-time adaptation server.

>>> from refine_tta_client import RefineClient
>>> with RefineClient() as client:                      # doctest: +SKIP
...     session = client.adapt(open("paper.txt").read(), steps=4, progress=True)
...     print(client.generate(session.session_id, "Question: ...", max_tokens=64).text)

Depends only on httpx, pydantic and tqdm. The HTTP contract is ``docs/http-api.md``.
"""

from ._async_client import AsyncRefineClient, AsyncSessions
from ._client import RefineClient, Sessions
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    RefineError,
    RequestTooLargeError,
    ServerError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from ._models import (
    AdaptDoneEvent,
    AdaptEvent,
    AdaptProgress,
    AdaptProgressEvent,
    AdaptStarted,
    AdaptStartedEvent,
    AdaptResponse,
    AdaptStats,
    DeleteResponse,
    GenerateDoneEvent,
    GenerateEvent,
    GenerateResponse,
    Health,
    SessionInfo,
    SessionList,
    TokenEvent,
)
from ._streaming import AsyncStream, Stream
from ._version import __version__

__all__ = [
    "__version__",
    # clients
    "RefineClient",
    "AsyncRefineClient",
    "Sessions",
    "AsyncSessions",
    "Stream",
    "AsyncStream",
    # models
    "AdaptResponse",
    "AdaptStats",
    "AdaptProgress",
    "AdaptProgressEvent",
    "AdaptStarted",
    "AdaptStartedEvent",
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
    # exceptions
    "RefineError",
    "APIResponseValidationError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "BadRequestError",
    "RequestTooLargeError",
    "UnprocessableEntityError",
    "AuthenticationError",
    "NotFoundError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
]
