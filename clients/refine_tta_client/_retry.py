"""Retry policy as pure functions (no I/O), shared by the sync and async clients.

Policy (see "Retry safety" in docs/http-api.md):

* At most ``max_retries`` retries, so at most ``max_retries + 1`` attempts.
* Statuses 429 and 503 are retried for every method: the server guarantees nothing was applied
  (it marks them ``x-refine-retry-safe: true``). A ``Retry-After`` header is honoured exactly;
  one above :data:`MAX_RETRY_AFTER` seconds is not waited for: the error is raised at once so the
  caller can decide (it carries ``retry_after``).
* A connection that failed *before the request was sent* (connect error, connect or pool timeout)
  is retried for every method.
* Any other transport failure (read/write timeout, read error, connection reset, remote protocol
  error) is retried only for idempotent calls (GET, DELETE, ``POST /v1/generate``); never for
  ``POST /v1/adapt``, which may have been applied. Other statuses (including 500) are never retried.
* Without ``Retry-After`` the delay is exponential backoff with full jitter:
  ``uniform(0, min(MAX_BACKOFF, INITIAL_BACKOFF * 2**attempt))``.
"""

from __future__ import annotations

import email.utils
import math
import random as _random
import time
from collections.abc import Callable, Mapping

import httpx

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "INITIAL_BACKOFF",
    "MAX_BACKOFF",
    "MAX_RETRY_AFTER",
    "RETRYABLE_STATUSES",
    "parse_retry_after",
    "backoff_delay",
    "is_unsent",
    "retry_delay_for_status",
    "retry_delay_for_error",
]

DEFAULT_MAX_RETRIES = 2
INITIAL_BACKOFF = 0.5  # seconds, first retry's upper bound
MAX_BACKOFF = 8.0  # seconds, cap of the jittered backoff
MAX_RETRY_AFTER = 60.0  # seconds; a longer Retry-After is surfaced, not slept through
RETRYABLE_STATUSES = frozenset({429, 503})

# Failures that happen before a single byte of the request left the client.
_UNSENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# Failures worth retrying for an idempotent request (excludes e.g. UnsupportedProtocol,
# LocalProtocolError and ProxyError, which a retry cannot fix).
_TRANSIENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


def parse_retry_after(headers: Mapping[str, str] | httpx.Headers) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    Returns None when the header is absent or unparsable; never a negative number.
    """
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def backoff_delay(attempt: int, *, random: Callable[[], float] = _random.random) -> float:
    """Full-jitter exponential backoff before retry number ``attempt + 1`` (``attempt`` from 0).

    ``random`` returns a float in [0, 1); the delay is ``random() * min(8, 0.5 * 2**attempt)``.
    """
    return random() * min(MAX_BACKOFF, INITIAL_BACKOFF * 2.0**attempt)


def is_unsent(exc: httpx.TransportError) -> bool:
    """True when the request certainly never reached the server (safe to retry any method)."""
    return isinstance(exc, _UNSENT_ERRORS)


def retry_delay_for_status(
    status_code: int,
    headers: Mapping[str, str] | httpx.Headers,
    *,
    attempt: int,
    max_retries: int,
    random: Callable[[], float] = _random.random,
) -> float | None:
    """Seconds to sleep before retrying after an error status, or None to give up now.

    ``attempt`` counts the retries already made (0 after the first try).
    """
    if attempt >= max_retries or status_code not in RETRYABLE_STATUSES:
        return None
    retry_after = parse_retry_after(headers)
    if retry_after is None:
        return backoff_delay(attempt, random=random)
    if retry_after > MAX_RETRY_AFTER:
        return None
    return retry_after


def retry_delay_for_error(
    exc: BaseException,
    *,
    idempotent: bool,
    attempt: int,
    max_retries: int,
    random: Callable[[], float] = _random.random,
) -> float | None:
    """Seconds to sleep before retrying after a transport error, or None to give up now.

    A non-idempotent request (``adapt``) is retried only when the request was never sent.
    """
    if attempt >= max_retries or not isinstance(exc, httpx.TransportError):
        return None
    if is_unsent(exc) or (idempotent and isinstance(exc, _TRANSIENT_ERRORS)):
        return backoff_delay(attempt, random=random)
    return None
