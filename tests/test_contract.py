"""The published contract is the real one: the OpenAPI document lists what each route answers,
and schemathesis (``--checks all``, fixed seed and example count) finds no 5xx and no response
that breaks the document, against a real server with and without API keys."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from server_fixtures import REPO, ServerProcess, app_client, make_tiny_model

DEFAULTS = {"steps": 1, "n_chunks": 4, "k": 4, "edge_margin": 8}
LIMITS = ("--max-document-tokens", "600", "--max-prompt-tokens", "64", "--max-new-tokens", "16", "--max-steps", "2")
CONFIG = REPO / "tests" / "schemathesis.toml"
SEED, EXAMPLES = 14, 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


@pytest.mark.parametrize("keys", [{}, {"api_keys": "k1", "metrics_key": "ops"}], ids=["open", "keys"])
def test_openapi_documents_every_answer(tiny, tmp_path, keys):
    with app_client(tiny, tmp_path, **keys) as client:
        spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ErrorResponse" in schemas
    assert set(schemas["ErrorDetail"]["required"]) == {"type", "message", "param", "code"}
    paths = {path for path, _, _ in operations(spec)}
    assert {"/tokenize", "/detokenize", "/metrics", "/v1/completions"} <= paths
    for path, method, op in operations(spec):
        statuses = set(op["responses"])
        assert "422" not in statuses, (path, method)
        assert "500" in statuses
        if "requestBody" in op:
            assert "400" in statuses, (path, method)
        secured = path not in ("/health", "/openapi.json") and bool(keys)
        assert ("401" in statuses) == secured and ("security" in op) == secured, (path, method)
    for path in ("/v1/adapt", "/v1/generate", "/v1/completions"):
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= set(content)
    for status in ("413", "429"):
        assert status in spec["paths"]["/v1/adapt"]["post"]["responses"]
    assert "429" in spec["paths"]["/v1/completions"]["post"]["responses"]
    if keys:
        assert spec["components"]["securitySchemes"]["apiKey"] == {
            "type": "http", "scheme": "bearer", "description": "one of the server's API keys"}
        assert spec["paths"]["/metrics"]["get"]["security"] == [{"operatorKey": []}]


def test_docs_pages_are_off_by_default(tiny, tmp_path):
    with app_client(tiny, tmp_path) as client:
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").status_code == 200


def test_key_check_compares_every_key(monkeypatch):
    import hmac

    from server import middleware

    calls = []

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return a == b

    monkeypatch.setattr(middleware.hmac, "compare_digest", counting)
    keys = [b"first", b"second", b"third"]
    assert middleware.key_matches(b"first", keys) and calls == keys  # no early exit on the first match
    calls.clear()
    assert not middleware.key_matches(b"nope", keys) and calls == keys
    assert hmac.compare_digest is counting


def _statuses(url: str, headers: dict[str, str]) -> Counter:
    """Requests answered so far, by status (from the server's own metrics)."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    counts: Counter = Counter()
    for status, value in re.findall(r'^refine_tta_requests_total\{[^}]*status="(\d+)"[^}]*\} (\S+)$', text, re.M):
        counts[status] += int(float(value))
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "api-key"])
def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(tiny, tmp_path, keyed):
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis is not installed (pip install -e '.[test]')"
    extra = ("--api-key", "k1", "--metrics-key", "ops") if keyed else ()
    server = ServerProcess(tiny, tmp_path / "state", *LIMITS, *extra,
                           env={"REFINE_TTA_REFINE_DEFAULTS": json.dumps(DEFAULTS)})
    try:
        server.wait_healthy()
        operator = {"Authorization": "Bearer ops"} if keyed else {}
        before = _statuses(server.url, operator)
        cmd = [st, "--config-file", str(CONFIG), "run", server.url + "/openapi.json", "--checks", "all",
               "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
               "--suppress-health-check", "all", *(["-H", "Authorization: Bearer k1"] if keyed else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env={"NO_COLOR": "1", "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)})
        statuses = _statuses(server.url, operator) - before
    finally:
        server.stop()
    cases = re.search(r"^\s*(\d+ generated.*)$", out.stdout, re.M)
    print(f"\nschemathesis ({'API key' if keyed else 'no key'}), seed {SEED}, {EXAMPLES} examples: "
          f"{cases.group(1) if cases else '?'}; statuses {dict(sorted(statuses.items()))}")
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert cases and re.search(r"(\d+) generated, \1 passed", cases.group(1)), cases
    assert not [s for s in statuses if s.startswith("5")], statuses
