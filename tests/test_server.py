"""The HTTP server: contract (docs/http-api.md), errors, auth, queue, streams, restart, and a real
uvicorn process for what needs one (OpenAI SDK, client SDK, disconnects, TTFT, equality with the
engine). A tiny random DeltaNet with the shipped tokenizer; the real REFINE loop."""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from server_fixtures import (
    REPO,
    TOKENIZER_DIR,
    BlockingJob,
    ServerProcess,
    app_client,
    document,
    make_tiny_model,
    sse_events,
)

DEFAULTS = {"steps": 1, "n_chunks": 4, "k": 4, "edge_margin": 8}
LIMITS = dict(max_document_tokens=600, max_prompt_tokens=64, max_new_tokens=32, max_steps=4, max_body_bytes=20000,
              queue_size=4)
UNKNOWN = "sess_" + "0" * 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def doc(tok):
    return document(tok, 150)


@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    with app_client(tiny, tmp_path_factory.mktemp("state"), refine_defaults=DEFAULTS, **LIMITS) as c:
        yield c


@pytest.fixture(scope="module")
def session_id(client, doc):
    r = client.post("/v1/adapt", json={"document": doc})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param", "code"}, body
    return body["error"]


# ----------------------------------------------------------------------------------- in-process
def test_health_is_503_while_loading_then_ok(tiny, tmp_path):
    from server.runtime import load_for_settings

    release = threading.Event()

    def slow_loader(settings):
        release.wait(60)
        return load_for_settings(settings)

    with app_client(tiny, tmp_path, loader=slow_loader) as c:
        for path, method in (("/health", "GET"), ("/v1/sessions", "GET"), ("/v1/generate", "POST")):
            r = c.request(method, path, json={"prompt": "x"} if method == "POST" else None)
            assert r.status_code == 503, (path, r.text)
            assert error_of(r)["type"] == "unavailable" and "loading" in error_of(r)["message"]
            assert int(r.headers["retry-after"]) >= 1 and r.headers["x-refine-retry-safe"] == "true"
            assert r.headers["x-request-id"]
        release.set()
        deadline = time.monotonic() + 60
        while (r := c.get("/health")).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.json() == {"status": "ok", "model": tiny.name, "device": "cpu", "backend": "torch"}
        assert c.head("/health").status_code == 200


def test_failed_load_is_reported_not_hidden(tmp_path):
    from refine_tta.model import ModelLoadError

    def broken(settings):
        raise ModelLoadError(f"{settings.model} has no config.json")

    with app_client(tmp_path / "missing", tmp_path / "state", loader=broken) as c:
        deadline = time.monotonic() + 30
        while c.app.state.runtime.error is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = c.get("/health")
        assert r.status_code == 503 and "failed to load" in error_of(r)["message"]
        assert "has no config.json" in error_of(r)["message"]
        assert "will not recover" in error_of(r)["message"]
        assert "retry-after" not in r.headers and "x-refine-retry-safe" not in r.headers


def test_request_ids(client):
    r = client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert client.get("/health", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert client.get("/nope").headers["x-request-id"]
    assert client.post("/v1/generate", content=b"{").headers["x-request-id"]


def test_a_bug_is_a_500_in_the_contract_shape(client, caplog):
    def boom() -> None:
        raise RuntimeError("a bug")

    client.app.add_api_route("/boom", boom)
    r = client.get("/boom", headers={"x-request-id": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert error_of(r) == {"type": "internal_error", "message": "internal error (RuntimeError); see the server log",
                           "param": None, "code": "internal_error"}
    assert "a bug" in caplog.text


def test_adapt_generate_and_sessions(client, doc, tok):
    r = client.post("/v1/adapt", json={"document": doc, "settings": {"steps": 2, "seed": 5}})
    assert r.status_code == 200, r.text
    body = r.json()
    sid = body["session_id"]
    assert re.fullmatch(r"sess_[0-9a-f]{32}", sid)
    assert body["document_tokens"] == len(tok(doc)["input_ids"])
    assert body["settings"]["steps"] == 2 and body["settings"]["seed"] == 5 and body["settings"]["k"] == 4
    assert len(body["stats"]["steps"]) == 2 and body["state_bytes"] > 0 and body["delta_bytes"] > 0
    total = body["stats"]["total"]
    assert {"ntp_loss_before", "ntp_loss_after", "seconds"} <= total.keys()
    step = body["stats"]["steps"][0]
    assert {"step", "of", "reward_mean", "ntp_loss", "policy_loss", "seconds"} <= step.keys()

    info = client.get(f"/v1/sessions/{sid}").json()
    assert {k: info[k] for k in ("session_id", "created", "document_tokens", "settings", "stats")} == \
        {k: body[k] for k in ("session_id", "created", "document_tokens", "settings", "stats")}
    assert sid in [s["session_id"] for s in client.get("/v1/sessions").json()["sessions"]]

    req = {"session_id": sid, "prompt": " The keeper", "max_tokens": 8, "temperature": 0.9, "seed": 4}
    g = client.post("/v1/generate", json=req).json()
    assert g["session_id"] == sid and g["completion_tokens"] == len(g["tokens"]) > 0
    assert g["finish_reason"] in ("length", "eos", "stop") and g["ttft_s"] > 0
    assert g["prompt_tokens"] == len(tok(" The keeper", add_special_tokens=False)["input_ids"])
    assert client.post("/v1/generate", json=req).json()["tokens"] == g["tokens"]  # same seed, same answer
    assert client.get(f"/v1/sessions/{sid}").json()["last_used"] >= info["last_used"]

    base = client.post("/v1/generate", json={"prompt": "The keeper", "max_tokens": 4}).json()
    assert base["session_id"] is None and base["prompt_tokens"] == len(tok("The keeper")["input_ids"])

    assert client.delete(f"/v1/sessions/{sid}").json() == {"session_id": sid, "deleted": True}
    for r in (client.get(f"/v1/sessions/{sid}"), client.delete(f"/v1/sessions/{sid}"),
              client.post("/v1/generate", json=req)):
        assert r.status_code == 404 and error_of(r)["type"] == "not_found"


def test_generate_with_stop_strings(client, session_id):
    free = client.post("/v1/generate", json={"session_id": session_id, "prompt": "The", "max_tokens": 16}).json()
    assert len(free["text"]) > 2
    stop = free["text"][1:3]
    cut = client.post("/v1/generate", json={"session_id": session_id, "prompt": "The", "max_tokens": 16,
                                            "stop": stop}).json()
    assert cut["finish_reason"] == "stop" and cut["text"] == free["text"][: free["text"].find(stop)]


BAD_INPUTS = [
    # (id, method, path, json body or raw bytes, status, type, words the message must contain)
    ("malformed-json", "POST", "/v1/adapt", b'{"document": ', 400, "invalid_request", ["malformed JSON"]),
    ("malformed-json-generate", "POST", "/v1/generate", b"{prompt}", 400, "invalid_request", ["malformed JSON"]),
    ("not-an-object", "POST", "/v1/adapt", b"[1, 2]", 400, "invalid_request", ["JSON object"]),
    ("document-wrong-type", "POST", "/v1/adapt", {"document": 5}, 400, "invalid_request", ["document"]),
    ("document-missing", "POST", "/v1/adapt", {"settings": {}}, 400, "invalid_request", ["document", "required"]),
    ("document-empty", "POST", "/v1/adapt", {"document": ""}, 400, "invalid_request", ["document"]),
    ("steps-as-string", "POST", "/v1/adapt", {"document": "d", "settings": {"steps": "2"}}, 400, "invalid_request",
     ["settings.steps"]),
    ("stream-wrong-type", "POST", "/v1/adapt", {"document": "d", "stream": "yes"}, 400, "invalid_request",
     ["stream"]),
    ("unknown-setting", "POST", "/v1/adapt", {"document": "d", "settings": {"kk": 1}}, 400, "invalid_request",
     ["settings.kk", "unknown field"]),
    ("k-zero", "POST", "/v1/adapt", {"document": "DOC", "settings": {"k": 0}}, 400, "invalid_request",
     ["settings.k", "greater than or equal to 1"]),
    ("unknown-reward", "POST", "/v1/adapt", {"document": "DOC", "settings": {"reward": "bleu"}}, 400,
     "invalid_request", ["settings.reward", "'hybrid'"]),
    ("negative-lr", "POST", "/v1/adapt", {"document": "DOC", "settings": {"lr": -1.0}}, 400, "invalid_request",
     ["lr"]),
    ("document-too-short", "POST", "/v1/adapt", {"document": "Hi."}, 400, "invalid_request", ["needs at least"]),
    ("steps-over-limit", "POST", "/v1/adapt", {"document": "DOC", "settings": {"steps": 5}}, 400, "invalid_request",
     ["max_steps=4"]),
    ("document-over-limit", "POST", "/v1/adapt", {"document": "LONGDOC"}, 413, "limit_exceeded",
     ["max_document_tokens=600"]),
    ("body-over-limit", "POST", "/v1/adapt", {"document": "x" * 30000}, 413, "limit_exceeded",
     ["max_body_bytes=20000"]),
    ("prompt-missing", "POST", "/v1/generate", {"max_tokens": 3}, 400, "invalid_request", ["prompt", "required"]),
    ("prompt-over-limit", "POST", "/v1/generate", {"prompt": "DOC"}, 400, "invalid_request",
     ["max_prompt_tokens=64"]),
    ("max-tokens-over-limit", "POST", "/v1/generate", {"prompt": "a", "max_tokens": 33}, 400, "invalid_request",
     ["max_new_tokens=32"]),
    ("max-tokens-zero", "POST", "/v1/generate", {"prompt": "a", "max_tokens": 0}, 400, "invalid_request",
     ["max_tokens"]),
    ("max-tokens-string", "POST", "/v1/generate", {"prompt": "a", "max_tokens": "8"}, 400, "invalid_request",
     ["max_tokens"]),
    ("temperature-negative", "POST", "/v1/generate", {"prompt": "a", "temperature": -1}, 400, "invalid_request",
     ["temperature"]),
    ("top-p-zero", "POST", "/v1/generate", {"prompt": "a", "top_p": 0}, 400, "invalid_request", ["top_p"]),
    ("empty-stop", "POST", "/v1/generate", {"prompt": "a", "stop": [""]}, 400, "invalid_request", ["stop"]),
    ("unknown-session", "POST", "/v1/generate", {"session_id": UNKNOWN, "prompt": "a"}, 404, "not_found",
     [UNKNOWN, "not found"]),
    ("malformed-session", "POST", "/v1/generate", {"session_id": "../../etc", "prompt": "a"}, 404, "not_found",
     ["not found"]),
    ("get-unknown-session", "GET", f"/v1/sessions/{UNKNOWN}", None, 404, "not_found", ["not found"]),
    ("delete-unknown-session", "DELETE", "/v1/sessions/nope", None, 404, "not_found", ["not found"]),
    ("unknown-route", "GET", "/v2/things", None, 404, "not_found", ["/v2/things"]),
    ("wrong-method", "DELETE", "/v1/sessions", None, 405, "invalid_request", ["DELETE"]),
    ("completion-unknown-model", "POST", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "not_found",
     ["gpt-4"]),
    ("completion-n", "POST", "/v1/completions", {"model": "M", "prompt": "a", "n": 100}, 400, "invalid_request",
     ["n"]),
    ("completion-batch", "POST", "/v1/completions", {"model": "M", "prompt": ["a"] * 9, "n": 4}, 400,
     "invalid_request", ["9 prompts", "n=4"]),
    ("completion-over-queue", "POST", "/v1/completions", {"model": "M", "prompt": ["a"] * 5}, 400,
     "invalid_request", ["queue_size=4"]),
    ("completion-presence-penalty", "POST", "/v1/completions", {"model": "M", "prompt": "a", "presence_penalty": 0.5},
     400, "invalid_request", ["presence_penalty", "not supported"]),
    ("completion-frequency-penalty", "POST", "/v1/completions",
     {"model": "M", "prompt": "a", "frequency_penalty": -1}, 400, "invalid_request", ["frequency_penalty"]),
    ("completion-logit-bias", "POST", "/v1/completions", {"model": "M", "prompt": "a", "logit_bias": {"5": 1}},
     400, "invalid_request", ["logit_bias"]),
    ("completion-suffix", "POST", "/v1/completions", {"model": "M", "prompt": "a", "suffix": "b"}, 400,
     "invalid_request", ["suffix"]),
    ("completion-best-of", "POST", "/v1/completions", {"model": "M", "prompt": "a", "best_of": 3}, 400,
     "invalid_request", ["best_of"]),
    ("completion-max-tokens-zero", "POST", "/v1/completions", {"model": "M", "prompt": "a", "max_tokens": 0}, 400,
     "invalid_request", ["echo"]),
    ("completion-stream-echo", "POST", "/v1/completions", {"model": "M", "prompt": "a", "stream": True,
                                                           "echo": True}, 400, "invalid_request", ["stream"]),
    ("completion-token-out-of-range", "POST", "/v1/completions", {"model": "M", "prompt": [5, 10**9]}, 400,
     "invalid_request", ["out of range"]),
    ("completion-logprobs-over", "POST", "/v1/completions", {"model": "M", "prompt": "a", "logprobs": 21}, 400,
     "invalid_request", ["logprobs"]),
    ("tokenize-unknown-model", "POST", "/tokenize", {"model": "gpt-4", "prompt": "a"}, 404, "not_found", ["gpt-4"]),
    ("detokenize-out-of-range", "POST", "/detokenize", {"tokens": [10**9]}, 400, "invalid_request",
     ["out of range"]),
    ("temperature-infinite", "POST", "/v1/generate", b'{"prompt": "a", "temperature": 1e309}', 400,
     "invalid_request", ["1e309", "finite"]),
    ("temperature-infinity-literal", "POST", "/v1/generate", b'{"prompt": "a", "temperature": Infinity}', 400,
     "invalid_request", ["Infinity"]),
    ("temperature-over-two", "POST", "/v1/generate", {"prompt": "a", "temperature": 5}, 400, "invalid_request",
     ["temperature"]),
    ("lr-huge", "POST", "/v1/adapt", {"document": "d", "settings": {"lr": 1e30}}, 400, "invalid_request",
     ["settings.lr"]),
    ("unknown-mode", "POST", "/v1/adapt", {"document": "d", "settings": {"mode": "magic"}}, 400, "invalid_request",
     ["settings.mode"]),
    ("deep-nesting", "POST", "/v1/generate", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
     "invalid_request", ["nested"]),
    ("invalid-utf8", "POST", "/v1/generate", b'{"prompt": "\xff\xfe"}'.decode("unicode_escape").encode("latin-1"),
     400, "invalid_request", ["UTF-8"]),
    ("too-many-rollouts", "POST", "/v1/adapt", {"document": "DOC", "settings": {"n": 100000}}, 400,
     "invalid_request", ["max_rollout_tokens=8192"]),
    ("lora-rank", "POST", "/v1/adapt", {"document": "DOC", "settings": {"scope": "lora", "lora_rank": 100000}}, 400,
     "invalid_request", ["max_lora_rank=256"]),
    ("layer-out-of-range", "POST", "/v1/adapt", {"document": "DOC", "settings": {"scope": "layers", "layers": [9]}},
     400, "invalid_request", ["out of range"]),
    ("unknown-lora-target", "POST", "/v1/adapt",
     {"document": "DOC", "settings": {"scope": "lora", "lora_targets": ["nope_proj"]}}, 400, "invalid_request",
     ["nope_proj"]),
    ("seed-too-big", "POST", "/v1/generate", {"prompt": "a", "seed": 2**64}, 400, "invalid_request", ["seed"]),
    ("adapt-seed-too-big", "POST", "/v1/adapt", {"document": "DOC", "settings": {"seed": 2**70}}, 400,
     "invalid_request", ["settings.seed"]),
    ("tiny-temperature", "POST", "/v1/generate", {"prompt": "a", "temperature": 1e-40}, 400, "invalid_request",
     ["temperature"]),
    ("lone-surrogate-prompt", "POST", "/v1/generate", b'{"prompt": "a\\ud800"}', 400, "invalid_request",
     ["prompt"]),
    ("lone-surrogate-document", "POST", "/v1/adapt", b'{"document": "a\\ud800"}', 400, "invalid_request",
     ["document"]),
    ("nan-lr", "POST", "/v1/adapt", b'{"document": "x", "settings": {"lr": NaN}}', 400, "invalid_request", ["NaN"]),
    ("completion-max-tokens", "POST", "/v1/completions", {"model": "M", "prompt": "a", "max_tokens": 100}, 400,
     "invalid_request", ["max_new_tokens=32"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_get_a_clear_4xx(client, tok, doc, case):
    _, method, path, body, status, kind, words = case
    if isinstance(body, dict):
        text = json.dumps(body).replace('"DOC"', json.dumps(doc)).replace('"LONGDOC"', json.dumps(document(tok, 700)))
        text = text.replace('"M"', json.dumps(client.get("/health").json()["model"]))
        r = client.request(method, path, content=text.encode(), headers={"content-type": "application/json"})
    else:
        r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["type"] == kind
    for word in words:
        assert word in err["message"], err["message"]


PARAMS = [
    # (id, path, body, param, code): what an OpenAI client reads to show which field is wrong
    ("max-tokens", "/v1/generate", {"prompt": "a", "max_tokens": 33}, "max_tokens", "limit_exceeded"),
    ("prompt", "/v1/generate", {"prompt": "DOC"}, "prompt", "limit_exceeded"),
    ("steps", "/v1/adapt", {"document": "DOC", "settings": {"steps": 5}}, "settings.steps", "limit_exceeded"),
    ("type", "/v1/generate", {"prompt": 5}, "prompt", "invalid_type"),
    ("unknown", "/v1/adapt", {"document": "d", "kk": 1}, "kk", "unknown_field"),
    ("stop", "/v1/generate", {"prompt": "a", "stop": ["x", ""]}, "stop.1", "invalid_value"),
    ("penalty", "/v1/completions", {"model": "M", "prompt": "a", "presence_penalty": 1}, "presence_penalty",
     "unsupported"),
    ("json", "/v1/generate", b"{", None, "invalid_json"),
    ("document", "/v1/adapt", {"document": "LONGDOC"}, "document", "limit_exceeded"),
]


@pytest.mark.parametrize("case", PARAMS, ids=[c[0] for c in PARAMS])
def test_errors_name_the_param_and_code(client, tok, doc, case):
    _, path, body, param, code = case
    if isinstance(body, dict):
        text = json.dumps(body).replace('"DOC"', json.dumps(doc)).replace('"LONGDOC"', json.dumps(document(tok, 700)))
        body = text.replace('"M"', json.dumps(client.get("/health").json()["model"])).encode()
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 413), r.text
    assert (error_of(r)["param"], error_of(r)["code"]) == (param, code)


def test_non_json_content_type_is_400_and_405_lists_every_method(client):
    r = client.post("/v1/generate", content=b"prompt=a", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "JSON object" in error_of(r)["message"]
    r = client.post(f"/v1/sessions/{UNKNOWN}")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}


def test_tiny_top_p_keeps_the_most_likely_token(client):
    for path, body in (("/v1/generate", {"prompt": "The", "max_tokens": 4, "temperature": 1.0}),
                       ("/v1/completions", {"model": "M", "prompt": "The", "max_tokens": 4})):
        body = {**body, "top_p": 1e-46, "seed": 1}
        if "model" in body:
            body["model"] = client.get("/health").json()["model"]
        greedy = client.post(path, json={**body, "temperature": 0.0, "top_p": 1.0}).json()
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["tokens" if path == "/v1/generate" else "choices"] == \
            greedy["tokens" if path == "/v1/generate" else "choices"]


def test_chunked_body_over_the_limit_is_413(client):
    def chunks():
        yield b'{"document": "'
        for _ in range(30):
            yield b"y" * 1000
        yield b'"}'

    r = client.post("/v1/adapt", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes=20000" in error_of(r)["message"]


def test_queue_full_is_429_with_retry_after(tiny, tmp_path, doc):
    with app_client(tiny, tmp_path, refine_defaults=DEFAULTS, queue_size=1, retry_after_s=3) as c:
        engine = c.app.state.runtime.engine
        running, waiting = BlockingJob(), BlockingJob()
        engine.submit(running)
        assert running.started.wait(10)
        engine.submit(waiting)
        try:
            for path, body in (("/v1/generate", {"prompt": "a"}), ("/v1/adapt", {"document": doc}),
                               ("/v1/completions", {"model": engine.model_name, "prompt": "a"})):
                r = c.post(path, json=body)
                assert r.status_code == 429, r.text
                assert error_of(r)["type"] == "rate_limited" and "queue is full" in error_of(r)["message"]
                assert r.headers["retry-after"] == "3" and r.headers["x-refine-retry-safe"] == "true"
            assert c.get("/v1/sessions").json() == {"sessions": []}  # nothing was applied
        finally:
            running.release.set()
            waiting.release.set()
        assert c.post("/v1/generate", json={"prompt": "a", "max_tokens": 2}).status_code == 200
        assert 'refine_tta_jobs_rejected_total 3.0' in c.get("/metrics").text


def test_adapt_stream_started_progress_then_done(client, doc):
    with client.stream("POST", "/v1/adapt", json={"document": doc, "settings": {"steps": 3}, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        events = sse_events(r.iter_lines())
    names = [e for e, _ in events]
    assert names == ["started"] + ["progress"] * 3 + ["done"]
    started = json.loads(events[0][1])
    assert started["of"] == 3 and started["mode"] == "refine" and started["queued_s"] >= 0
    progress = [json.loads(d) for _, d in events[1:4]]
    assert [(p["step"], p["of"]) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    for p in progress:
        assert all(isinstance(p[k], (int, float)) for k in ("reward_mean", "ntp_loss", "policy_loss", "seconds"))
    done = json.loads(events[-1][1])
    assert len(done["stats"]["steps"]) == 3 and started["document_tokens"] == done["document_tokens"]
    assert client.get(f"/v1/sessions/{done['session_id']}").status_code == 200


def test_generate_stream_tokens_then_done_equals_json(client, session_id):
    req = {"session_id": session_id, "prompt": " The", "max_tokens": 12, "temperature": 1.0, "seed": 9}
    with client.stream("POST", "/v1/generate", json={**req, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1][0] == "done" and {e for e, _ in events[:-1]} <= {"token"}
    pieces = [json.loads(d) for e, d in events[:-1]]
    done = json.loads(events[-1][1])
    assert "".join(p["text"] for p in pieces) == done["text"]
    assert done == {**client.post("/v1/generate", json=req).json(), "ttft_s": done["ttft_s"],
                    "tokens_per_s": done["tokens_per_s"]}


def test_stream_reports_errors_as_an_error_event(client, doc):
    sid = client.post("/v1/adapt", json={"document": doc}).json()["session_id"]
    engine = client.app.state.runtime.engine
    blocker = BlockingJob()
    engine.submit(blocker)
    assert blocker.started.wait(10)
    try:
        with client.stream("POST", "/v1/generate", json={"session_id": sid, "prompt": "a", "stream": True}) as r:
            assert r.status_code == 200
            assert client.delete(f"/v1/sessions/{sid}").status_code == 200  # gone before the job runs
            blocker.release.set()
            events = sse_events(r.iter_lines())
    finally:
        blocker.release.set()
    assert [e for e, _ in events] == ["error"]
    assert json.loads(events[0][1])["error"]["type"] == "not_found"


def test_openai_completions_shape(client, session_id):
    model = client.get("/health").json()["model"]
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == model and session_id in ids
    body = {"model": session_id, "prompt": " The", "max_tokens": 6, "temperature": 0, "seed": 1}
    r = client.post("/v1/completions", json=body).json()
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == session_id
    assert r["choices"][0]["finish_reason"] in ("stop", "length") and r["usage"]["completion_tokens"] <= 6
    g = client.post("/v1/generate", json={"session_id": session_id, "prompt": " The", "max_tokens": 6}).json()
    assert r["choices"][0]["text"] == g["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as s:
        datas = [d for _, d in sse_events(s.iter_lines())]
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == g["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == r["usage"]
    base = client.post("/v1/completions", json={**body, "model": model}).json()
    assert base["model"] == model and base["usage"]["prompt_tokens"] == 2  # BOS + " The"


def test_auth(tiny, tmp_path, doc):
    keys = {"a": "Bearer key-a", "b": "Bearer key-b"}
    with app_client(tiny, tmp_path, refine_defaults=DEFAULTS, api_keys="key-a,key-b", metrics_key="ops") as c:
        assert c.get("/health").status_code == 200  # open
        assert c.get("/openapi.json").status_code == 200  # the contract is public
        r = c.get("/metrics", headers={"Authorization": keys["a"]})  # a tenant sees no one's counts
        assert r.status_code == 403 and error_of(r)["type"] == "permission_denied"
        assert c.get("/metrics", headers={"Authorization": "Bearer ops"}).status_code == 200
        assert c.get("/v1/sessions", headers={"Authorization": "Bearer ops"}).status_code == 401
        metrics = c.get("/metrics", headers={"Authorization": "Bearer ops"}).text  # a 401 counts under its route
        assert re.search(r'refine_tta_requests_total\{method="GET",route="/v1/sessions",status="401"\} \d', metrics)
        for headers, word in (({}, "missing"), ({"Authorization": "Bearer nope"}, "invalid"),
                              ({"Authorization": "Basic a2V5LWE="}, "Bearer")):
            for method, path in (("GET", "/v1/sessions"), ("POST", "/v1/adapt"), ("GET", "/metrics"),
                                 ("GET", "/v1/models"), ("POST", "/v1/completions")):
                r = c.request(method, path, headers=headers, json={"document": doc})
                assert r.status_code == 401, (method, path, r.text)
                assert error_of(r)["type"] == "authentication_error" and word in error_of(r)["message"]
                assert r.headers["www-authenticate"] == "Bearer"
        sid = c.post("/v1/adapt", json={"document": doc}, headers={"Authorization": keys["a"]}).json()["session_id"]
        a, b = {"Authorization": keys["a"]}, {"Authorization": keys["b"]}
        assert [s["session_id"] for s in c.get("/v1/sessions", headers=a).json()["sessions"]] == [sid]
        assert c.get("/v1/sessions", headers=b).json() == {"sessions": []}
        assert sid not in [m["id"] for m in c.get("/v1/models", headers=b).json()["data"]]
        for r in (c.get(f"/v1/sessions/{sid}", headers=b),
                  c.post("/v1/generate", json={"session_id": sid, "prompt": "a"}, headers=b),
                  c.post("/v1/completions", json={"model": sid, "prompt": "a"}, headers=b),
                  c.delete(f"/v1/sessions/{sid}", headers=b)):
            assert r.status_code == 404 and error_of(r)["type"] == "not_found"
        assert c.post("/v1/generate", json={"session_id": sid, "prompt": "a", "max_tokens": 2},
                      headers=a).status_code == 200
        # base_session: ownership as for any other use; the owner continues from it
        r = c.post("/v1/adapt", json={"document": doc, "base_session": sid}, headers=b)
        assert r.status_code == 404 and error_of(r)["type"] == "not_found"
        r = c.post("/v1/adapt", json={"document": doc, "base_session": sid, "settings": {"scope": "full"}}, headers=a)
        assert r.status_code == 400 and "scope" in error_of(r)["message"]
        r = c.post("/v1/adapt", json={"document": doc, "base_session": sid}, headers=a)
        assert r.status_code == 200, r.text
        total = r.json()["stats"]["total"]
        assert total["base_session"] == sid and total["continued"] is True and "change" in total["drift"]
        assert c.delete(f"/v1/sessions/{sid}", headers=a).status_code == 200


def test_restart_keeps_acknowledged_sessions(tiny, tmp_path, doc):
    state = tmp_path / "state"
    req = {"prompt": " The", "max_tokens": 8, "temperature": 1.0, "seed": 2}
    with app_client(tiny, state, refine_defaults=DEFAULTS) as c:
        sids = [c.post("/v1/adapt", json={"document": doc, "settings": {"seed": s}}).json()["session_id"]
                for s in (0, 1)]
        answers = [c.post("/v1/generate", json={**req, "session_id": s}).json()["tokens"] for s in sids]
        listed = c.get("/v1/sessions").json()
    (state / ("sess_" + "f" * 32)).mkdir()  # not published by the storage (no meta.json): set aside
    with app_client(tiny, state, refine_defaults=DEFAULTS) as c:
        again = c.get("/v1/sessions").json()
        assert [s["session_id"] for s in again["sessions"]] == [s["session_id"] for s in listed["sessions"]]
        assert [s["stats"] for s in again["sessions"]] == [s["stats"] for s in listed["sessions"]]
        assert [c.post("/v1/generate", json={**req, "session_id": s}).json()["tokens"] for s in sids] == answers
    assert not (state / ("sess_" + "f" * 32)).exists() and (state / "quarantine").is_dir()


def test_lowered_disk_budget_refuses_new_sessions_and_deletes_none(tiny, tmp_path, doc):
    state = tmp_path / "state"
    with app_client(tiny, state, refine_defaults=DEFAULTS) as c:
        sid = c.post("/v1/adapt", json={"document": doc}).json()["session_id"]
    with app_client(tiny, state, refine_defaults=DEFAULTS, session_disk_bytes=1000) as c:
        r = c.post("/v1/adapt", json={"document": doc})
        assert r.status_code == 507 and r.json()["error"]["type"] == "storage_full"
        assert "session_disk_bytes=1000" in r.json()["error"]["message"] and "x-request-id" in r.headers
        assert [s["session_id"] for s in c.get("/v1/sessions").json()["sessions"]] == [sid]
        assert c.post("/v1/generate", json={"session_id": sid, "prompt": " The", "max_tokens": 2}).status_code == 200
        assert c.delete(f"/v1/sessions/{sid}").status_code == 200
        assert c.post("/v1/adapt", json={"document": doc}).status_code == 200  # room again


def test_metrics(client, session_id):
    client.post("/v1/generate", json={"session_id": session_id, "prompt": "a", "max_tokens": 3})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert re.search(r'refine_tta_requests_total\{method="POST",route="/v1/generate",status="200"\} \d', text)
    assert 'refine_tta_request_seconds_bucket{le="0.005",method="GET",route="/health"}' in text
    for name in ("refine_tta_queue_depth 0.0", "refine_tta_model_loaded 1.0", "refine_tta_sessions ",
                 "refine_tta_session_bytes ", "refine_tta_adaptation_steps_total ",
                 "refine_tta_adaptation_seconds_total ", "refine_tta_generated_tokens_total "):
        assert name in text, name
    assert metric(text, "refine_tta_adaptation_steps_total") >= 1
    assert metric(text, "refine_tta_sessions") >= 1 and metric(text, "refine_tta_session_bytes") > 0
    assert "/nope" not in text  # unknown paths do not make labels


def test_serve_help_imports_nothing_heavy():
    code = ("import sys, server.cli as c\n"
            "try:\n    c.main(['serve', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('fla', 'torch', 'transformers', 'uvicorn') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--state-dir" in out.stdout and "--api-key" in out.stdout


# ----------------------------------------------------------------------------------- real server
# One `python -m server serve` process (uvicorn) shared by the tests below.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    state = tmp_path_factory.mktemp("server-state")
    proc = ServerProcess(tiny, state, "--max-new-tokens", "20000", "--max-prompt-tokens", "4096",
                         "--max-document-tokens", "4096",
                         env={"REFINE_TTA_REFINE_DEFAULTS": json.dumps(DEFAULTS)})
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@slow
def test_real_server_matches_the_engine(server, tiny, doc):
    from refine_tta.engine import Engine, SessionStore
    from refine_tta.engine import SamplingConfig
    from refine_tta.model import load_model
    from refine_tta.refine.config import RefineConfig, preset

    settings = {"steps": 2, "seed": 7, "reward": "hybrid"}
    sampling = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 13}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        sid = http.post("/v1/adapt", json={"document": doc, "settings": settings}).json()["session_id"]
        over_http = http.post("/v1/generate", json={"session_id": sid, "prompt": " The keeper", **sampling}).json()
    loaded = load_model(tiny, device="cpu")
    with Engine(loaded, SessionStore.open(tiny.parent / "direct-state", loaded.fingerprint)) as engine:
        assert engine.default_preset == "safe"  # the server's 'auto' preset for any model but the embedded one
        config = RefineConfig.from_dict({**preset(engine.default_preset), **DEFAULTS, **settings})
        session = engine.submit_adapt(doc, config, None).result(120)
        direct = engine.submit_generate(session.id, " The keeper", SamplingConfig(
            max_new_tokens=16, temperature=0.9, top_p=0.95, seed=13), None).result(60)
    assert over_http["tokens"] == direct.tokens and over_http["text"] == direct.text


def _ttft_after(http: httpx.Client, sid: str, runs: int = 7) -> tuple[float, float]:
    """Median server-reported TTFT and median client-side time to the first token event."""
    server_side, client_side = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        with http.stream("POST", "/v1/generate", json={"session_id": sid, "prompt": " Question: who wrote?",
                                                       "max_tokens": 4, "seed": i, "stream": True}) as r:
            first = None
            lines = []
            for line in r.iter_lines():
                if first is None and line.startswith("event: token"):
                    first = time.perf_counter() - t0
                lines.append(line)
        done = json.loads(sse_events(lines)[-1][1])
        server_side.append(done["ttft_s"])
        client_side.append(first if first is not None else time.perf_counter() - t0)
    return statistics.median(server_side), statistics.median(client_side)


@slow
def test_ttft_does_not_grow_with_document_length(server, tok):
    short, long = document(tok, 256), document(tok, 2048)
    with httpx.Client(base_url=server.url, timeout=300) as http:
        sids = {}
        for name, text in (("short", short), ("long", long)):
            r = http.post("/v1/adapt", json={"document": text})
            assert r.status_code == 200, r.text
            sids[name] = (r.json()["session_id"], r.json()["document_tokens"])
        figures = {name: _ttft_after(http, sid) for name, (sid, _) in sids.items()}
        # What re-reading the document would cost: the long document as the prompt of the base model.
        reread = statistics.median(
            http.post("/v1/generate", json={"prompt": long, "max_tokens": 1, "seed": i}).json()["ttft_s"]
            for i in range(3))
    (s_srv, s_cli), (l_srv, l_cli) = figures["short"], figures["long"]
    print(f"\nTTFT after a {sids['short'][1]}-token document: server {s_srv * 1e3:.2f} ms, client {s_cli * 1e3:.2f} ms;"
          f" after a {sids['long'][1]}-token document: server {l_srv * 1e3:.2f} ms, client {l_cli * 1e3:.2f} ms;"
          f" ratio long/short server {l_srv / s_srv:.2f}, client {l_cli / s_cli:.2f};"
          f" re-reading the long document instead: {reread * 1e3:.1f} ms")
    assert sids["long"][1] >= 7 * sids["short"][1]
    assert l_srv / s_srv < 3 and l_cli / s_cli < 3


@slow
def test_openai_sdk_against_the_real_server(server, doc):
    from openai import OpenAI

    with httpx.Client(base_url=server.url, timeout=120) as http:
        sid = http.post("/v1/adapt", json={"document": doc}).json()["session_id"]
        expected = http.post("/v1/generate", json={"session_id": sid, "prompt": " The keeper", "max_tokens": 8,
                                                   "temperature": 0.0, "seed": 3}).json()
    oai = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert sid in [m.id for m in oai.models.list().data]
    out = oai.completions.create(model=sid, prompt=" The keeper", max_tokens=8, temperature=0.0, seed=3)
    assert out.choices[0].text == expected["text"]
    assert out.usage.completion_tokens == expected["completion_tokens"]
    assert out.choices[0].finish_reason == {"eos": "stop"}.get(expected["finish_reason"], expected["finish_reason"])
    pieces = []
    for chunk in oai.completions.create(model=sid, prompt=" The keeper", max_tokens=8, temperature=0.0, seed=3,
                                        stream=True):
        pieces.extend(c.text for c in chunk.choices)
    assert "".join(pieces) == expected["text"]
    from openai import NotFoundError as OpenAINotFound

    with pytest.raises(OpenAINotFound):
        oai.completions.create(model=UNKNOWN, prompt="a", max_tokens=2)


def _cancelled_jobs(http: httpx.Client) -> float:
    return metric(http.get("/metrics").text, "refine_tta_jobs_cancelled_total")


def _prompt_request_takes(http: httpx.Client) -> float:
    t0 = time.perf_counter()
    r = http.post("/v1/generate", json={"prompt": "a", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200
    return time.perf_counter() - t0


@slow
def test_client_disconnects_free_the_worker(server, tok):
    long_job = {"prompt": "a", "max_tokens": 20000, "temperature": 1.0}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = _cancelled_jobs(http)
        # 1. A token stream closed after three tokens.
        with http.stream("POST", "/v1/generate", json={**long_job, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("event: token")
                if seen == 3:
                    break
        assert _prompt_request_takes(http) < 10
        # 2. A plain request whose client gives up (read timeout) while it runs.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/generate", json=long_job, timeout=1.0)
        assert _prompt_request_takes(http) < 10
        # 3. An adaptation stream closed after its first step.
        with http.stream("POST", "/v1/adapt", json={"document": document(tok, 300), "settings": {"steps": 64},
                                                    "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("event: progress"):
                    break
        assert _prompt_request_takes(http) < 15
        deadline = time.monotonic() + 10
        while _cancelled_jobs(http) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _cancelled_jobs(http) == before + 3
        assert all(s["settings"]["steps"] != 64 for s in http.get("/v1/sessions").json()["sessions"])


@slow
def test_client_sdk_sync_and_async(server, doc):
    from refine_tta_client import AsyncRefineClient, NotFoundError, RefineClient

    with RefineClient(base_url=server.url, max_retries=0) as c:
        assert c.health().status == "ok"
        events = list(c.adapt(doc, steps=2, seed=1, stream=True))
        assert [e.type for e in events] == ["started", "progress", "progress", "done"]
        assert events[0].started.of == 2 and events[1].progress.step == 1 and events[1].progress.of == 2
        sid = events[-1].response.session_id
        answer = c.generate(sid, " The keeper", max_tokens=8, seed=2, temperature=0.7)
        streamed = list(c.generate(sid, " The keeper", max_tokens=8, seed=2, temperature=0.7, stream=True))
        assert streamed[-1].type == "done" and streamed[-1].response.tokens == answer.tokens
        assert "".join(e.text for e in streamed[:-1]) == answer.text
        assert sid in [s.session_id for s in c.sessions.list().sessions]
        assert c.sessions.get(sid).document_tokens == events[-1].response.document_tokens
        assert c.sessions.delete(sid).deleted
        with pytest.raises(NotFoundError):
            c.sessions.get(sid)

    async def run_async() -> None:
        async with AsyncRefineClient(base_url=server.url, max_retries=0) as ac:
            stream = await ac.adapt(doc, steps=2, seed=1, stream=True)
            events = [e async for e in stream]
            assert [e.type for e in events] == ["started", "progress", "progress", "done"]
            sid2 = events[-1].response.session_id
            got = await ac.generate(sid2, " The keeper", max_tokens=8, seed=2, temperature=0.7)
            assert got.tokens == answer.tokens  # same document, settings and seeds as the sync session
            assert sid2 in [s.session_id for s in (await ac.sessions.list()).sessions]
            assert (await ac.sessions.delete(sid2)).deleted
            with pytest.raises(NotFoundError):
                await ac.sessions.get(sid2)

    asyncio.run(run_async())
