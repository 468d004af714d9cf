"""Unit tests of the refine-tta client SDK (``clients/``) against mocked HTTP (respx).

No server and no torch: every response is hand-made from docs/http-api.md.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

CLIENTS_DIR = Path(__file__).resolve().parents[1] / "clients"

try:
    import refine_tta_client as rtc
except ImportError:  # not pip-installed: use the source tree (clients/ is its own distribution)
    sys.path.insert(0, str(CLIENTS_DIR))
    import refine_tta_client as rtc
from refine_tta_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncRefineClient,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    RefineClient,
    RequestTooLargeError,
    ServerError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from refine_tta_client import cli
from refine_tta_client._retry import (
    MAX_BACKOFF,
    backoff_delay,
    parse_retry_after,
    retry_delay_for_error,
    retry_delay_for_status,
)
from refine_tta_client._streaming import SSEDecoder, ServerSentEvent, iter_sse

BASE = "http://refine.test"

ADAPT_BODY: dict[str, Any] = {
    "session_id": "sess_abc",
    "created": 1764000000.0,
    "document_tokens": 1234,
    "state_bytes": 2048,
    "delta_bytes": 1024,
    "settings": {"steps": 2, "seed": 0},
    "stats": {
        "steps": [
            {"step": 1, "reward_mean": 0.2, "ntp_loss": 3.1, "seconds": 1.5},
            {"step": 2, "reward_mean": 0.6, "ntp_loss": 2.9, "seconds": 1.25},
        ],
        "total": {"ntp_loss_before": 3.1, "ntp_loss_after": 2.8, "seconds": 2.75},
    },
}
GENERATE_BODY: dict[str, Any] = {
    "text": "Hello world",
    "tokens": [11, 12],
    "finish_reason": "stop",
    "prompt_tokens": 5,
    "completion_tokens": 2,
    "ttft_s": 0.01,
    "tokens_per_s": 80.0,
    "session_id": "sess_abc",
}
SESSION_INFO: dict[str, Any] = {
    "session_id": "sess_abc",
    "created": 1764000000.0,
    "last_used": 1764000100.0,
    "document_tokens": 1234,
    "state_bytes": 2048,
    "delta_bytes": 1024,
    "settings": {},
    "stats": {"steps": [], "total": {}},
}


def error_response(status: int, error_type: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        json={"error": {"type": error_type, "message": message}},
        headers={"x-request-id": "req_1", **headers},
    )


def sse(*events: tuple[str, Any] | str) -> bytes:
    """A text/event-stream body; a str item is written verbatim (comments, odd framing)."""
    out = []
    for event in events:
        if isinstance(event, str):
            out.append(event)
        else:
            name, data = event
            out.append(f"event: {name}\ndata: {json.dumps(data)}\n\n")
    return "".join(out).encode()


def sse_response(body: bytes | Iterator[bytes]) -> httpx.Response:
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


class Sleeps(list[float]):
    """Records the requested delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)

    async def asleep(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch) -> Iterator[RefineClient]:
    monkeypatch.delenv("REFINE_TTA_API_KEY", raising=False)
    with RefineClient(base_url=BASE, sleep=sleeps) as c:
        yield c


def async_client(sleeps: Sleeps, **kwargs: Any) -> AsyncRefineClient:
    return AsyncRefineClient(base_url=BASE, sleep=sleeps.asleep, **kwargs)


# ---------------------------------------------------------------------------------------------
# configuration and requests


def test_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFINE_TTA_BASE_URL", "http://env.test:9000/")
    monkeypatch.setenv("REFINE_TTA_API_KEY", "sk-env")
    monkeypatch.setenv("REFINE_TTA_TIMEOUT", "42")
    c = RefineClient()
    assert c.base_url == "http://env.test:9000"
    assert c.timeout.read == 42.0 and c.timeout.connect == 10.0
    with respx.mock(base_url="http://env.test:9000") as router:
        route = router.get("/health").respond(200, json={"status": "ok"})
        c.health()
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-env"
    c.close()


def test_defaults_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REFINE_TTA_BASE_URL", "REFINE_TTA_API_KEY", "REFINE_TTA_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    with RefineClient() as c:
        assert c.base_url == "http://127.0.0.1:8000"
        assert c.timeout.read == 600.0
        assert c.max_retries == 2


def test_bad_timeout_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFINE_TTA_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="REFINE_TTA_TIMEOUT"):
        RefineClient(base_url=BASE)


def test_no_auth_header_without_key(mock: respx.MockRouter, client: RefineClient) -> None:
    route = mock.get("/health").respond(200, json={"status": "ok", "model": "m", "device": "cpu"})
    health = client.health()
    assert health.status == "ok" and health.device == "cpu"
    assert "authorization" not in route.calls.last.request.headers


def test_adapt_sends_only_given_settings(mock: respx.MockRouter, client: RefineClient) -> None:
    route = mock.post("/v1/adapt").respond(200, json=ADAPT_BODY)
    result = client.adapt("some text", steps=2, lr=1e-4, seed=0, extra_settings={"future": True})
    body = json.loads(route.calls.last.request.content)
    assert body == {
        "document": "some text",
        "settings": {"steps": 2, "lr": 1e-4, "seed": 0, "future": True},
        "stream": False,
    }
    assert isinstance(result, rtc.AdaptResponse)
    assert result.session_id == "sess_abc" and result.stats.total["ntp_loss_after"] == 2.8


def test_adapt_base_session_in_the_body(mock: respx.MockRouter, client: RefineClient) -> None:
    route = mock.post("/v1/adapt").respond(200, json=ADAPT_BODY)
    client.adapt("more text", base_session="sess_abc")
    body = json.loads(route.calls.last.request.content)
    assert body == {"document": "more text", "settings": {}, "stream": False, "base_session": "sess_abc"}


def test_async_adapt_base_session_in_the_body(mock: respx.MockRouter) -> None:
    route = mock.post("/v1/adapt").respond(200, json=ADAPT_BODY)

    async def run() -> None:
        async with rtc.AsyncRefineClient(base_url=BASE) as aclient:
            await aclient.adapt("more text", base_session="sess_abc")

    asyncio.run(run())
    assert json.loads(route.calls.last.request.content)["base_session"] == "sess_abc"


def test_models_keep_unknown_fields(mock: respx.MockRouter, client: RefineClient) -> None:
    mock.post("/v1/generate").respond(200, json={**GENERATE_BODY, "new_field": [1, 2]})
    result = client.generate("sess_abc", "Question: ?")
    assert result.text == "Hello world"
    assert result.model_extra == {"new_field": [1, 2]}


def test_generate_base_model_body(mock: respx.MockRouter, client: RefineClient) -> None:
    route = mock.post("/v1/generate").respond(200, json=GENERATE_BODY)
    client.generate(None, "Q", max_tokens=8, temperature=0.0, seed=3, stop="\n")
    body = json.loads(route.calls.last.request.content)
    assert body == {
        "prompt": "Q",
        "max_tokens": 8,
        "temperature": 0.0,
        "seed": 3,
        "stop": ["\n"],
        "stream": False,
    }


def test_sessions(mock: respx.MockRouter, client: RefineClient) -> None:
    mock.get("/v1/sessions").respond(200, json={"sessions": [SESSION_INFO]})
    get = mock.get("/v1/sessions/sess%2Fodd").respond(200, json={**SESSION_INFO, "session_id": "sess/odd"})
    mock.delete("/v1/sessions/sess_abc").respond(200, json={"session_id": "sess_abc", "deleted": True})
    listed = client.sessions.list()
    assert [s.session_id for s in listed.sessions] == ["sess_abc"]
    assert client.sessions.get("sess/odd").session_id == "sess/odd"  # id is percent-encoded
    assert get.called
    deleted = client.sessions.delete("sess_abc")
    assert deleted.deleted is True


def test_invalid_success_body(mock: respx.MockRouter, client: RefineClient) -> None:
    mock.get("/health").respond(200, json={"unexpected": True})
    with pytest.raises(rtc.APIResponseValidationError):
        client.health()


# ---------------------------------------------------------------------------------------------
# status errors


STATUS_CASES = [
    (400, "invalid_request", "bad settings: steps must be >= 1", BadRequestError),
    (401, "authentication_error", "missing or wrong API key", AuthenticationError),
    (404, "not_found", "unknown session sess_x", NotFoundError),
    (413, "limit_exceeded", "document is 9000 tokens; limit is 8192", RequestTooLargeError),
    (422, "invalid_request", "settings.lr: must be a number", UnprocessableEntityError),
    (429, "rate_limited", "work queue full", RateLimitError),
    (500, "internal_error", "boom", ServerError),
    (503, "unavailable", "model is loading", ServiceUnavailableError),
]


@pytest.mark.parametrize(
    ("status", "error_type", "message", "cls"), STATUS_CASES, ids=[str(c[0]) for c in STATUS_CASES]
)
def test_status_maps_to_exception(
    mock: respx.MockRouter, status: int, error_type: str, message: str, cls: type[APIStatusError]
) -> None:
    mock.post("/v1/generate").mock(
        return_value=error_response(status, error_type, message, **{"retry-after": "1"})
    )
    with RefineClient(base_url=BASE, max_retries=0) as c, pytest.raises(cls) as info:
        c.generate("sess_x", "Q")
    err = info.value
    assert type(err) is cls
    assert str(err) == err.message == message
    assert err.status_code == status and err.error_type == error_type
    assert err.body == {"error": {"type": error_type, "message": message}}
    assert err.request_id == "req_1"
    if status in (400, 413, 422):
        assert isinstance(err, BadRequestError)
    if status >= 500:
        assert isinstance(err, ServerError)
    if status in (429, 503):
        assert err.retry_after == 1.0  # type: ignore[attr-defined]


def test_403_and_non_contract_bodies(mock: respx.MockRouter, client: RefineClient) -> None:
    mock.get("/v1/sessions").respond(403, json={"detail": "forbidden"})
    with pytest.raises(AuthenticationError, match="forbidden"):
        client.sessions.list()
    mock.get("/health").respond(502, text="bad gateway")
    with pytest.raises(ServerError) as info:
        client.health()
    assert info.value.status_code == 502 and info.value.message == "HTTP 502: bad gateway"


# ---------------------------------------------------------------------------------------------
# retries


def test_429_honours_retry_after(mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps) -> None:
    route = mock.post("/v1/adapt").mock(
        side_effect=[
            error_response(
                429, "rate_limited", "full", **{"retry-after": "3", "x-refine-retry-safe": "true"}
            ),
            error_response(
                429, "rate_limited", "full", **{"retry-after": "1.5", "x-refine-retry-safe": "true"}
            ),
            httpx.Response(200, json=ADAPT_BODY),
        ]
    )
    assert client.adapt("doc").session_id == "sess_abc"
    assert route.call_count == 3
    assert sleeps == [3.0, 1.5]


def test_429_stops_after_max_retries(mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps) -> None:
    route = mock.get("/v1/sessions").mock(
        return_value=error_response(429, "rate_limited", "full", **{"retry-after": "2"})
    )
    with pytest.raises(RateLimitError, match="full") as info:
        client.sessions.list()
    assert route.call_count == 3  # 1 try + max_retries=2
    assert sleeps == [2.0, 2.0]
    assert info.value.retry_after == 2.0


def test_long_retry_after_is_not_slept_through(
    mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps
) -> None:
    route = mock.get("/health").mock(
        return_value=error_response(503, "unavailable", "loading", **{"retry-after": "300"})
    )
    with pytest.raises(ServiceUnavailableError) as info:
        client.health()
    assert route.call_count == 1 and sleeps == []
    assert info.value.retry_after == 300.0


def test_503_retried_even_for_adapt(mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps) -> None:
    route = mock.post("/v1/adapt").mock(
        side_effect=[error_response(503, "unavailable", "loading"), httpx.Response(200, json=ADAPT_BODY)]
    )
    assert client.adapt("doc").session_id == "sess_abc"
    assert route.call_count == 2
    assert len(sleeps) == 1 and 0.0 <= sleeps[0] <= 0.5  # jittered backoff, attempt 0


def test_connection_error_retried_even_for_adapt(
    mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps
) -> None:
    route = mock.post("/v1/adapt").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.ConnectError("refused"),
            httpx.Response(200, json=ADAPT_BODY),
        ]
    )
    assert client.adapt("doc").session_id == "sess_abc"
    assert route.call_count == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0


def test_connection_error_exhausts_retries(
    mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps
) -> None:
    route = mock.get("/health").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(APIConnectionError, match="refused") as info:
        client.health()
    assert not isinstance(info.value, APITimeoutError)
    assert route.call_count == 3 and len(sleeps) == 2


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("disconnected"),
    ],
    ids=["read-timeout", "read-error", "remote-protocol"],
)
def test_adapt_not_retried_after_request_may_have_arrived(
    mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps, failure: Exception
) -> None:
    route = mock.post("/v1/adapt").mock(side_effect=[failure, httpx.Response(200, json=ADAPT_BODY)])
    expected = APITimeoutError if isinstance(failure, httpx.TimeoutException) else APIConnectionError
    with pytest.raises(expected):
        client.adapt("doc")
    assert route.call_count == 1 and sleeps == []


def test_adapt_not_retried_after_500(mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps) -> None:
    route = mock.post("/v1/adapt").mock(
        side_effect=[error_response(500, "internal_error", "boom"), httpx.Response(200, json=ADAPT_BODY)]
    )
    with pytest.raises(ServerError, match="boom"):
        client.adapt("doc")
    assert route.call_count == 1 and sleeps == []


def test_generate_retried_after_read_timeout(
    mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps
) -> None:
    route = mock.post("/v1/generate").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json=GENERATE_BODY)]
    )
    assert client.generate("sess_abc", "Q", seed=0).text == "Hello world"
    assert route.call_count == 2 and len(sleeps) == 1


def test_timeout_maps_to_api_timeout_error(mock: respx.MockRouter, client: RefineClient) -> None:
    route = mock.post("/v1/generate").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(APITimeoutError, match="timed out") as info:
        client.generate("sess_abc", "Q")
    assert isinstance(info.value, APIConnectionError)
    assert info.value.request is not None and info.value.request.url.path == "/v1/generate"
    assert route.call_count == 3


def test_get_and_delete_retried_after_read_error(mock: respx.MockRouter, client: RefineClient) -> None:
    listed = mock.get("/v1/sessions").mock(
        side_effect=[httpx.ReadError("reset"), httpx.Response(200, json={"sessions": []})]
    )
    deleted = mock.delete("/v1/sessions/s1").mock(
        side_effect=[
            httpx.ReadError("reset"),
            httpx.Response(200, json={"session_id": "s1", "deleted": True}),
        ]
    )
    assert client.sessions.list().sessions == []
    assert client.sessions.delete("s1").deleted
    assert listed.call_count == 2 and deleted.call_count == 2


def test_max_retries_zero(mock: respx.MockRouter, sleeps: Sleeps) -> None:
    route = mock.get("/health").mock(side_effect=httpx.ConnectError("refused"))
    with RefineClient(base_url=BASE, max_retries=0, sleep=sleeps) as c, pytest.raises(APIConnectionError):
        c.health()
    assert route.call_count == 1 and sleeps == []


def test_backoff_is_full_jitter_exponential_capped() -> None:
    assert [backoff_delay(a, random=lambda: 1.0) for a in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff_delay(3, random=lambda: 0.0) == 0.0
    assert backoff_delay(20, random=lambda: 0.5) == MAX_BACKOFF / 2


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after": "-4"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past


def test_retry_decisions() -> None:
    headers = {"retry-after": "5"}
    assert retry_delay_for_status(429, headers, attempt=0, max_retries=2) == 5.0
    assert retry_delay_for_status(429, headers, attempt=2, max_retries=2) is None
    assert retry_delay_for_status(500, {}, attempt=0, max_retries=2) is None
    assert retry_delay_for_status(502, {}, attempt=0, max_retries=2) is None

    def one() -> float:
        return 1.0

    for exc in (httpx.ConnectError("x"), httpx.ConnectTimeout("x"), httpx.PoolTimeout("x")):
        assert retry_delay_for_error(exc, idempotent=False, attempt=1, max_retries=2, random=one) == 1.0
    for exc in (httpx.ReadTimeout("x"), httpx.WriteTimeout("x"), httpx.ReadError("x"), httpx.WriteError("x")):
        assert retry_delay_for_error(exc, idempotent=False, attempt=0, max_retries=2) is None
        assert retry_delay_for_error(exc, idempotent=True, attempt=0, max_retries=2, random=one) == 0.5
    assert (
        retry_delay_for_error(httpx.UnsupportedProtocol("x"), idempotent=True, attempt=0, max_retries=2)
        is None
    )
    assert retry_delay_for_error(ValueError("x"), idempotent=True, attempt=0, max_retries=2) is None


# ---------------------------------------------------------------------------------------------
# server-sent events


def test_sse_decoder_framing() -> None:
    lines = [
        ": keep-alive",
        "event: progress",
        'data: {"a":',
        "data:  1}",
        "id: 7",
        "",
        "",  # a second blank line dispatches nothing
        "data: unnamed",
        "",
        "event: no-data",
        "",  # no data: not dispatched, name reset
        "data: x",
        "",
        "event: done",
        "data: tail",  # no final blank line: flushed at end of stream
    ]
    events = list(iter_sse(lines))
    assert events == [
        ServerSentEvent(event="progress", data='{"a":\n 1}', id="7"),
        ServerSentEvent(event="message", data="unnamed", id="7"),
        ServerSentEvent(event="message", data="x", id="7"),
        ServerSentEvent(event="done", data="tail", id="7"),
    ]
    assert json.loads(events[0].data) == {"a": 1}
    decoder = SSEDecoder()
    assert decoder.decode("data") is None  # a field without colon has an empty value
    assert decoder.decode("") == ServerSentEvent(data="")


ADAPT_STREAM = sse(
    ": connected\n",
    ("started", {"of": 2, "document_tokens": 1234, "mode": "refine", "queued_s": 0.01}),
    (
        "progress",
        {"step": 1, "of": 2, "reward_mean": 0.2, "ntp_loss": 3.1, "policy_loss": 0.01, "seconds": 1.5},
    ),
    "event: heartbeat\ndata: {}\n\n",  # unknown events are skipped
    # multi-line data: the JSON object split over two data lines
    'event: progress\ndata: {"step": 2, "of": 2,\ndata:  "reward_mean": 0.6, "extra": "kept"}\n\n',
    ("done", ADAPT_BODY),
)


def chunked(body: bytes, size: int = 7) -> Iterator[bytes]:
    """The body in small chunks, so that lines and events span chunk boundaries."""
    for i in range(0, len(body), size):
        yield body[i : i + size]


def test_adapt_stream_progress_then_done(mock: respx.MockRouter, client: RefineClient) -> None:
    route = mock.post("/v1/adapt").mock(return_value=sse_response(chunked(ADAPT_STREAM)))
    with client.adapt("doc", stream=True, steps=2) as events:
        received = list(events)
    request = route.calls.last.request
    assert json.loads(request.content)["stream"] is True
    assert request.headers["accept"] == "text/event-stream"
    assert [e.type for e in received] == ["started", "progress", "progress", "done"]
    started, first, second, done = received
    assert isinstance(started, rtc.AdaptStartedEvent)
    assert (started.started.of, started.started.document_tokens, started.started.mode) == (2, 1234, "refine")
    assert isinstance(first, rtc.AdaptProgressEvent) and isinstance(second, rtc.AdaptProgressEvent)
    assert (first.progress.step, first.progress.of, first.progress.reward_mean) == (1, 2, 0.2)
    assert second.progress.reward_mean == 0.6 and second.progress.model_extra == {"extra": "kept"}
    assert isinstance(done, rtc.AdaptDoneEvent)
    assert done.response == rtc.AdaptResponse.model_validate(ADAPT_BODY)


def test_adapt_stream_error_event_raises(mock: respx.MockRouter, client: RefineClient) -> None:
    body = sse(
        ("progress", {"step": 1, "of": 4}),
        ("error", {"error": {"type": "limit_exceeded", "message": "document over 8192 tokens"}}),
    )
    mock.post("/v1/adapt").mock(return_value=sse_response(body))
    events = client.adapt("doc", stream=True)
    assert next(events).type == "progress"
    with pytest.raises(RequestTooLargeError, match="document over 8192 tokens") as info:
        next(events)
    assert info.value.status_code == 413 and info.value.error_type == "limit_exceeded"
    assert events.response.is_closed


def test_stream_error_event_internal(mock: respx.MockRouter, client: RefineClient) -> None:
    mock.post("/v1/generate").mock(
        return_value=sse_response(sse(("error", {"error": {"type": "internal_error", "message": "oom"}})))
    )
    with pytest.raises(ServerError, match="oom"):
        list(client.generate("s", "Q", stream=True))


def test_stream_without_done_raises_connection_error(mock: respx.MockRouter, client: RefineClient) -> None:
    mock.post("/v1/adapt").mock(return_value=sse_response(sse(("progress", {"step": 1, "of": 4}))))
    with pytest.raises(APIConnectionError, match="done"):
        list(client.adapt("doc", stream=True))


def test_stream_cut_mid_way_is_not_retried(
    mock: respx.MockRouter, client: RefineClient, sleeps: Sleeps
) -> None:
    def body() -> Iterator[bytes]:
        yield sse(("progress", {"step": 1, "of": 4}))
        raise httpx.ReadError("connection reset")

    route = mock.post("/v1/adapt").mock(return_value=sse_response(body()))
    events = client.adapt("doc", stream=True)
    assert next(events).type == "progress"
    with pytest.raises(APIConnectionError, match="connection reset"):
        next(events)
    assert route.call_count == 1 and sleeps == []


def test_stream_status_error_before_events(mock: respx.MockRouter, client: RefineClient) -> None:
    mock.post("/v1/adapt").mock(
        return_value=error_response(422, "invalid_request", "settings.steps: not an int")
    )
    with pytest.raises(UnprocessableEntityError, match="settings.steps"):
        client.adapt("doc", stream=True)


def test_generate_stream_tokens_then_done(mock: respx.MockRouter, client: RefineClient) -> None:
    body = sse(
        ("token", {"text": "Hello", "token": 11}),
        ": ping\n",
        ("token", {"text": " world", "token": 12}),
        ("done", GENERATE_BODY),
    )
    mock.post("/v1/generate").mock(return_value=sse_response(chunked(body, 5)))
    events = list(client.generate("sess_abc", "Q", stream=True))
    assert [e.type for e in events] == ["token", "token", "done"]
    tokens = [e for e in events if isinstance(e, rtc.TokenEvent)]
    assert "".join(t.text for t in tokens) == "Hello world" and [t.token for t in tokens] == [11, 12]
    done = events[-1]
    assert isinstance(done, rtc.GenerateDoneEvent)
    assert done.response.finish_reason == "stop" and done.response.tokens == [11, 12]


def test_adapt_progress_bar(
    mock: respx.MockRouter, client: RefineClient, capsys: pytest.CaptureFixture[str]
) -> None:
    route = mock.post("/v1/adapt").mock(return_value=sse_response(ADAPT_STREAM))
    result = client.adapt("doc", progress=True)
    assert result.session_id == "sess_abc"
    assert json.loads(route.calls.last.request.content)["stream"] is True
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "adapt" in captured.err and "2/2" in captured.err
    with pytest.raises(ValueError):
        client.adapt("doc", stream=True, progress=True)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------
# async client


def test_async_status_errors(mock: respx.MockRouter, sleeps: Sleeps) -> None:
    async def run() -> None:
        async with async_client(sleeps, max_retries=0) as c:
            for status, error_type, message, cls in STATUS_CASES:
                mock.post("/v1/generate").mock(return_value=error_response(status, error_type, message))
                with pytest.raises(cls, match=message) as info:
                    await c.generate("s", "Q")
                assert type(info.value) is cls and info.value.status_code == status

    asyncio.run(run())


def test_async_429_retry_after_and_limit(mock: respx.MockRouter, sleeps: Sleeps) -> None:
    route = mock.get("/v1/sessions").mock(
        return_value=error_response(429, "rate_limited", "full", **{"retry-after": "4"})
    )

    async def run() -> None:
        async with async_client(sleeps) as c:
            with pytest.raises(RateLimitError):
                await c.sessions.list()

    asyncio.run(run())
    assert route.call_count == 3 and sleeps == [4.0, 4.0]


def test_async_adapt_not_retried_after_read_timeout_generate_is(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    adapt = mock.post("/v1/adapt").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json=ADAPT_BODY)]
    )
    generate = mock.post("/v1/generate").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json=GENERATE_BODY)]
    )

    async def run() -> None:
        async with async_client(sleeps) as c:
            with pytest.raises(APITimeoutError):
                await c.adapt("doc")
            assert (await c.generate("s", "Q")).text == "Hello world"

    asyncio.run(run())
    assert adapt.call_count == 1 and generate.call_count == 2 and len(sleeps) == 1


def test_async_connection_error_and_503_retried_for_adapt(mock: respx.MockRouter, sleeps: Sleeps) -> None:
    route = mock.post("/v1/adapt").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            error_response(503, "unavailable", "loading", **{"retry-after": "0.5"}),
            httpx.Response(200, json=ADAPT_BODY),
        ]
    )

    async def run() -> rtc.AdaptResponse:
        async with async_client(sleeps) as c:
            return await c.adapt("doc")

    assert asyncio.run(run()).session_id == "sess_abc"
    assert route.call_count == 3 and len(sleeps) == 2 and sleeps[1] == 0.5


def test_async_streams(mock: respx.MockRouter, sleeps: Sleeps) -> None:
    mock.post("/v1/adapt").mock(return_value=sse_response(ADAPT_STREAM))
    mock.post("/v1/generate").mock(
        return_value=sse_response(
            sse(("token", {"text": "Hi", "token": 1}), ("done", {**GENERATE_BODY, "text": "Hi"}))
        )
    )

    async def run() -> tuple[list[str], list[str], rtc.AdaptResponse]:
        async with async_client(sleeps) as c:
            stream = await c.adapt("doc", stream=True)
            async with stream:
                adapt_types = [e.type async for e in stream]
            gen_types = [e.type async for e in await c.generate("s", "Q", stream=True)]
            mock.post("/v1/adapt").mock(return_value=sse_response(ADAPT_STREAM))
            return adapt_types, gen_types, await c.adapt("doc", progress=True)

    adapt_types, gen_types, result = asyncio.run(run())
    assert adapt_types == ["started", "progress", "progress", "done"]
    assert gen_types == ["token", "done"]
    assert result.session_id == "sess_abc"


def test_async_stream_error_event(mock: respx.MockRouter, sleeps: Sleeps) -> None:
    mock.post("/v1/adapt").mock(
        return_value=sse_response(sse(("error", {"error": {"type": "rate_limited", "message": "busy"}})))
    )

    async def run() -> None:
        async with async_client(sleeps) as c:
            with pytest.raises(RateLimitError, match="busy"):
                async for _ in await c.adapt("doc", stream=True):
                    pass

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# command line


def cli_factory(sleeps: Sleeps) -> cli.ClientFactory:
    def make(base_url: str | None, api_key: str | None, timeout: float | None) -> RefineClient:
        return RefineClient(base_url=base_url or BASE, api_key=api_key, timeout=timeout, sleep=sleeps)

    return make


def test_cli_adapt(
    mock: respx.MockRouter, sleeps: Sleeps, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    route = mock.post("/v1/adapt").mock(return_value=sse_response(ADAPT_STREAM))
    doc = tmp_path / "doc.txt"
    doc.write_text("The document.", encoding="utf-8")
    code = cli.main(
        ["adapt", str(doc), "--steps", "2", "--seed", "0", "--lr", "1e-4", "--api-key", "sk-1"],
        client_factory=cli_factory(sleeps),
    )
    assert code == 0
    request = route.calls.last.request
    assert json.loads(request.content) == {
        "document": "The document.",
        "settings": {"steps": 2, "lr": 1e-4, "seed": 0},
        "stream": True,
    }
    assert request.headers["authorization"] == "Bearer sk-1"
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "session          sess_abc",
        "document tokens  1234",
        "steps            2",
        "reward mean      0.2 -> 0.6",
        "ntp loss         3.1 -> 2.8",
        "seconds          2.8",
    ]


def test_cli_adapt_base_session_and_drift(
    mock: respx.MockRouter, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = json.loads(json.dumps(ADAPT_BODY))
    body["stats"]["total"].update(drift={"probe_tokens": 200, "ntp_base": 3.5, "ntp_adapted": 3.25, "change": -0.25},
                                  base_session="sess_old")
    route = mock.post("/v1/adapt").respond(200, json=body)
    monkeypatch.setattr(sys, "stdin", io.StringIO("next document"))
    argv = ["adapt", "-", "--no-progress", "--base-session", "sess_old"]
    assert cli.main(argv, client_factory=cli_factory(sleeps)) == 0
    assert json.loads(route.calls.last.request.content)["base_session"] == "sess_old"
    out = capsys.readouterr().out
    assert "drift (generic text NTP)  3.5 -> 3.25" in out and "continued from" in out and "sess_old" in out


def test_cli_adapt_stdin(
    mock: respx.MockRouter,
    sleeps: Sleeps,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    route = mock.post("/v1/adapt").respond(200, json=ADAPT_BODY)
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    assert cli.main(["adapt", "-", "--no-progress"], client_factory=cli_factory(sleeps)) == 0
    assert json.loads(route.calls.last.request.content) == {
        "document": "from stdin",
        "settings": {},
        "stream": False,
    }
    assert "sess_abc" in capsys.readouterr().out


def test_cli_ask_streams(mock: respx.MockRouter, sleeps: Sleeps, capsys: pytest.CaptureFixture[str]) -> None:
    body = sse(
        ("token", {"text": "Hello", "token": 11}),
        ("token", {"text": " world", "token": 12}),
        ("done", GENERATE_BODY),
    )
    route = mock.post("/v1/generate").mock(return_value=sse_response(body))
    assert (
        cli.main(
            ["ask", "base", "Question: who?", "--max-tokens", "16", "--seed", "1"],
            client_factory=cli_factory(sleeps),
        )
        == 0
    )
    assert capsys.readouterr().out == "Hello world\n"
    assert json.loads(route.calls.last.request.content) == {
        "prompt": "Question: who?",
        "max_tokens": 16,
        "seed": 1,
        "stop": ["\n"],  # one line of answer by default
        "stream": True,
    }
    cli.main(["ask", "sess_abc", "Q"], client_factory=cli_factory(sleeps))
    assert json.loads(route.calls.last.request.content)["session_id"] == "sess_abc"
    cli.main(["ask", "sess_abc", "Q", "--no-stop"], client_factory=cli_factory(sleeps))
    assert "stop" not in json.loads(route.calls.last.request.content)
    cli.main(["ask", "sess_abc", "Q", "--stop", ".", "--stop", "?"], client_factory=cli_factory(sleeps))
    assert json.loads(route.calls.last.request.content)["stop"] == [".", "?"]
    assert cli.main(["ask", "sess_abc", "Q", "--stop", ".", "--no-stop"], client_factory=cli_factory(sleeps)) == 1


def test_progress_bar_shows_from_the_started_event() -> None:
    from refine_tta_client._progress import AdaptProgressBar

    out = io.StringIO()
    bar = AdaptProgressBar(file=out)
    bar.start(rtc.AdaptStarted(of=4, document_tokens=700, mode="refine"))
    assert "0/4" in out.getvalue() and "refine" in out.getvalue()  # before step 1 has finished
    bar.update(rtc.AdaptProgress(step=1, of=4, reward_mean=0.5, ntp_loss=3.0))
    bar.close()
    assert "1/4" in out.getvalue().rsplit("\r", 1)[-1]


def test_cli_error_exit(mock: respx.MockRouter, sleeps: Sleeps, capsys: pytest.CaptureFixture[str]) -> None:
    mock.post("/v1/generate").mock(return_value=error_response(404, "not_found", "unknown session sess_x"))
    assert cli.main(["ask", "sess_x", "Q"], client_factory=cli_factory(sleeps)) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: unknown session sess_x\n" and captured.out == ""
    assert cli.main(["adapt", "/nonexistent/file.txt"], client_factory=cli_factory(sleeps)) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["adapt"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["adapt", "f.txt", "--steps", "many"])
    assert info.value.code == 2


def test_cli_sessions_delete_health(
    mock: respx.MockRouter, sleeps: Sleeps, capsys: pytest.CaptureFixture[str]
) -> None:
    other = {
        **SESSION_INFO,
        "session_id": "sess_longer_id",
        "document_tokens": 7,
        "state_bytes": 5 * 1024 * 1024,
        "delta_bytes": 0,
        "last_used": None,
    }
    mock.get("/v1/sessions").respond(200, json={"sessions": [SESSION_INFO, other]})
    mock.delete("/v1/sessions/sess_abc").respond(200, json={"session_id": "sess_abc", "deleted": True})
    mock.get("/health").respond(
        200, json={"status": "ok", "model": "m1", "device": "cpu", "backend": "torch"}
    )
    factory = cli_factory(sleeps)
    assert cli.main(["sessions"], client_factory=factory) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "TOKENS", "BYTES", "CREATED", "LAST", "USED"]
    assert lines[1].startswith("sess_abc        ") and "3.0 KiB" in lines[1]
    assert lines[2].startswith("sess_longer_id") and "5.0 MiB" in lines[2] and lines[2].endswith("-")
    created = cli._when(SESSION_INFO["created"])  # local time
    assert lines[1].index(created) == lines[2].index(created) == lines[0].index("CREATED")  # aligned
    assert cli.main(["delete", "sess_abc"], client_factory=factory) == 0
    assert capsys.readouterr().out == "deleted sess_abc\n"
    assert cli.main(["health"], client_factory=factory) == 0
    assert capsys.readouterr().out == "ok (model=m1, device=cpu, backend=torch)\n"


# ---------------------------------------------------------------------------------------------
# packaging


def test_import_does_not_pull_torch_or_server() -> None:
    code = (
        "import sys, refine_tta_client, refine_tta_client.cli; "
        "bad = [m for m in ('torch', 'refine_tta', 'fastapi') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    package_root = Path(rtc.__file__).resolve().parents[1]  # installed or source tree
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
