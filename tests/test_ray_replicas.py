"""``refine-tta serve --replicas N``: two replicas under a real Ray Serve (started here, on CPU),
session-affine routing over one shared state directory (docs/ray.md).

The Ray tests need the ``[ray]`` extra (``.ci/run`` installs it) and skip without it; the
single-process path is checked never to import Ray whether or not it is installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_fixtures import REPO, app_client, document, free_port, make_tiny_model

HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray Serve is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # Ray's own use of pydantic

QUESTION = "\n\nQuestion: What did the keeper write in? Answer:"
ADAPT = {"mode": "refine", "steps": 2, "seed": 7}


# ------------------------------------------------------------------------ without Ray, always run
def test_single_process_path_never_imports_ray(tmp_path):
    """The default server (one process) builds, loads, answers and shuts down without Ray."""
    model = make_tiny_model(tmp_path / "model")
    code = f"""
import sys
from fastapi.testclient import TestClient
from server.app import create_app
from server.cli import build_parser
from server.settings import ServerSettings
assert build_parser().parse_args(["serve"]).replicas == 1
app = create_app(ServerSettings(model={str(model)!r}, state_dir={str(tmp_path / 'state')!r}, device="cpu"))
with TestClient(app) as client:
    import time
    while client.get("/health").status_code != 200:
        time.sleep(0.05)
print("ray imported:", any(name == "ray" or name.startswith("ray.") for name in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ray imported: False")


def test_replicas_below_one_is_refused(capsys):
    from server.cli import main

    assert main(["serve", "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------- routing (pure)
@needs_ray
@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    ("POST", "/v1/generate", b'{"session_id": "sess_' + b"a" * 32 + b'", "prompt": "x"}', "sess_" + "a" * 32),
    ("POST", "/v1/completions", b'{"model": "sess_' + b"b" * 32 + b'", "prompt": "x"}', "sess_" + "b" * 32),
    ("POST", "/v1/completions", b'{"model": "refine-tiny-deltanet", "prompt": "x"}', None),
    ("GET", "/v1/sessions/sess_" + "c" * 32, b"", "sess_" + "c" * 32),
    ("DELETE", "/v1/sessions/sess_" + "c" * 32, b"", "sess_" + "c" * 32),
    ("GET", "/v1/sessions", b"", None),
    ("POST", "/v1/adapt", b'{"document": "sess_' + b"d" * 32 + b'"}', None),
    ("POST", "/v1/generate", b"not json", None),
    ("POST", "/v1/generate", b'["a list"]', None),
    ("POST", "/v1/generate", b'{"session_id": "sess_../../etc"}', None),
    ("PUT", "/v1/sessions/sess_" + "c" * 32, b"", None),
])
def test_session_of(method, path, body, expected):
    from server.ray_app import session_of

    assert session_of(method, path, body) == expected


@needs_ray
def test_replica_resources_chosen_once():
    from server.ray_app import ReplicaResources

    cpu = ReplicaResources.choose("auto", 0, 2)
    assert (cpu.num_cpus, cpu.num_gpus, cpu.threads.threads, cpu.threads.wait_policy) == (1, 0, 1, "PASSIVE")
    assert "no GPU" in cpu.reason
    assert ReplicaResources.choose("cpu", 8, 2).num_gpus == 0
    three = ReplicaResources.choose("cpu", 0, 2, threads=3)
    assert (three.num_cpus, three.threads.threads) == (3, 3) and "--threads" in three.threads.reason
    gpu = ReplicaResources.choose("auto", 4, 2)
    assert (gpu.num_gpus, gpu.threads) == (1, None)


@needs_ray
@pytest.mark.slow
def test_serve_command_with_two_replicas(tmp_path):
    """``refine-tta serve --replicas 2`` end to end: its own Ray, answers through the port it was
    given, exits 0 on SIGTERM. (Runs before the shared cluster below is started.)"""
    from server_fixtures import ServerProcess

    model = make_tiny_model(tmp_path / "model")
    server = ServerProcess(model, tmp_path / "state", "--replicas", "2")
    try:
        server.wait_healthy(timeout=300)
        with httpx.Client(base_url=server.url, timeout=300) as http:
            sid = _adapt(http, document(_tokenizer(model), 120)).json()["session_id"]
            r = http.post("/v1/generate", json=_ask(sid))
            assert r.status_code == 200 and r.headers["x-refine-replica"]
            assert (tmp_path / "state" / sid / "meta.json").is_file()
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log()


# -------------------------------------------------------------------------------- real Ray Serve
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ray-model") / "tiny")


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """Ray (3 logical CPUs, no dashboard) + Serve on a free port: ingress and 2 replicas on one
    shared state directory. Yields (url, state_dir). Replicas: queue_size 2, so Ray's router
    sends at most 2 requests at a time to a replica and holds the rest."""
    if not HAVE_RAY:
        pytest.skip("Ray Serve is not installed")
    import ray
    from ray import serve

    from server.ray_app import APP_NAME, ReplicaResources, build
    from server.settings import ServerSettings

    state_dir = tmp_path_factory.mktemp("ray-state")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved or "") if p)  # Ray's workers inherit it
    port = free_port()
    ray.init(num_cpus=3, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20,
             logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServerSettings(model=str(model_dir), state_dir=state_dir, device="cpu", queue_size=2,
                                  log_level="warning", shutdown_grace_s=2)
        serve.run(build(settings, 2, ReplicaResources.choose("cpu", 0, 2)), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the replicas did not become healthy"
            time.sleep(0.5)
        yield url, state_dir
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """The single-process server with the same settings (in this process)."""
    with app_client(model_dir, tmp_path_factory.mktemp("single-state"), queue_size=2) as client:
        yield client


def _adapt(client, text: str) -> httpx.Response:
    r = client.post("/v1/adapt", json={"document": text, "settings": ADAPT})
    assert r.status_code == 200, r.text
    return r


def _ask(session_id: str, max_tokens: int = 12) -> dict:
    return {"session_id": session_id, "prompt": QUESTION, "max_tokens": max_tokens, "temperature": 0.0}


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _burst(url: str, n: int, method: str, path: str, body: dict | None) -> list[httpx.Response]:
    """n requests at once through the ingress."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            return await asyncio.gather(*(http.request(method, path, json=body) for _ in range(n)))

    return asyncio.run(run())


@needs_ray
@pytest.mark.slow
def test_answers_equal_single_process_and_follow_the_session(cluster, reference, model_dir):
    url, _ = cluster
    text = document(_tokenizer(model_dir), 300)
    with httpx.Client(base_url=url, timeout=300) as http:
        adapted = _adapt(http, text)
        sid, holder = adapted.json()["session_id"], adapted.headers["x-refine-replica"]
        expected = reference.post("/v1/generate", json=_ask(_adapt(reference, text).json()["session_id"])).json()
        answers = []
        for _ in range(12):
            r = http.post("/v1/generate", json=_ask(sid))
            assert r.status_code == 200, r.text
            answers.append((r.json(), r.headers["x-refine-replica"], r.headers["x-refine-session-source"]))
        completion = http.post("/v1/completions", json={"model": sid, "prompt": QUESTION, "max_tokens": 12,
                                                        "temperature": 0.0, "seed": 0})
        assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == expected["text"]
    for body, _, _ in answers:
        assert (body["text"], body["tokens"]) == (expected["text"], expected["tokens"])
    # Routed to a replica holding the session: the adapting replica holds it from the start; another
    # replica may load it from the store once (before the router has heard of the adaptation), and
    # from then on holds it too. Never a second load.
    from collections import Counter

    print(f"adapted on {holder}; 12 generates answered by (replica, source): "
          f"{dict(Counter((replica, source) for _, replica, source in answers))}")
    loads = [replica for _, replica, source in answers if source == "store"]
    assert len(loads) <= 1 and holder not in loads, answers
    assert all(source == "memory" for _, replica, source in answers if replica == holder)


@needs_ray
@pytest.mark.slow
def test_delete_through_one_replica_and_the_other_answers_404(cluster, model_dir):
    url, state_dir = cluster
    with httpx.Client(base_url=url, timeout=300) as http:
        sid = _adapt(http, document(_tokenizer(model_dir), 200)).json()["session_id"]
        holders: set[str] = set()
        for _ in range(6):  # Ray's router holds 2 requests per replica; after 1 s the rest go to the other one
            rs = _burst(url, 10, "POST", "/v1/generate", _ask(sid, max_tokens=96))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
            holders |= {r.headers["x-refine-replica"] for r in rs}
            if len(holders) == 2:
                break
        assert len(holders) == 2, "the router never sent the session to the second replica"
        deleted = http.delete(f"/v1/sessions/{sid}")
        assert deleted.status_code == 200, deleted.text
        deleter = deleted.headers["x-refine-replica"]
        assert not (state_dir / sid).exists()
        others = []
        for _ in range(6):
            rs = _burst(url, 10, "POST", "/v1/generate", _ask(sid))
            assert all(r.status_code == 404 and r.json()["error"]["type"] == "not_found" for r in rs), \
                [r.text for r in rs]
            others += [r for r in rs if r.headers["x-refine-replica"] != deleter]
            if others:
                break
        assert others, "no request reached the replica that did not delete"
        assert http.get(f"/v1/sessions/{sid}").status_code == 404
        assert sid not in [s["session_id"] for s in http.get("/v1/sessions").json()["sessions"]]


def _replica_states() -> dict[str, int]:
    from ray import serve

    from server.ray_app import APP_NAME

    status = serve.status().applications[APP_NAME].deployments["SessionReplica"]
    return {str(k.value if hasattr(k, "value") else k): v for k, v in status.replica_states.items()}


@needs_ray
@pytest.mark.slow
def test_killed_replica_sessions_served_by_the_other_and_ray_restarts_it(cluster, reference, model_dir):
    """Sessions are only adapted (never asked) before the kill, so the first one is held by its
    adapting replica alone; the expected answers are the single-process server's (equal, as the
    first test shows)."""
    url, _ = cluster
    tok = _tokenizer(model_dir)
    with httpx.Client(base_url=url, timeout=300) as http:
        sessions, seen = {}, set()
        for n in (180, 220):
            r = _adapt(http, document(tok, n))
            mine = _adapt(reference, document(tok, n)).json()["session_id"]
            expected = reference.post("/v1/generate", json=_ask(mine))
            sessions[r.json()["session_id"]] = (r.headers["x-refine-replica"], r.headers["x-refine-replica-pid"],
                                                expected.json()["text"])
            seen.add(r.headers["x-refine-replica"])
        victim_sid, (victim, victim_pid, _) = next(iter(sessions.items()))
        replicas_before = seen | {h.headers["x-refine-replica"] for h in _burst(url, 8, "GET", "/health", None)}
        os.kill(int(victim_pid), signal.SIGKILL)
        killed = time.monotonic()

        for sid, (holder, _, text) in sessions.items():  # answered at once, by a live replica
            t = time.monotonic()
            r = http.post("/v1/generate", json=_ask(sid))
            assert r.status_code == 200, r.text
            assert r.json()["text"] == text
            assert r.headers["x-refine-replica"] != victim
            if holder == victim:  # held by the dead replica only: loaded from the store
                assert r.headers["x-refine-session-source"] == "store"
            print(f"after kill -9 of {victim}: {sid} (adapted on {holder}) answered by "
                  f"{r.headers['x-refine-replica']} ({r.headers['x-refine-session-source']}, load "
                  f"{r.headers['x-refine-session-load-ms']} ms) in {time.monotonic() - t:.2f} s, same answer")
        listed = {s["session_id"] for s in http.get("/v1/sessions").json()["sessions"]}
        assert set(sessions) <= listed

        deadline = time.monotonic() + 240  # Ray starts a new replica in the dead one's place
        new_replicas: set[str] = set()
        while time.monotonic() < deadline:
            if _replica_states().get("RUNNING") == 2:
                seen = {h.headers["x-refine-replica"] for h in _burst(url, 6, "GET", "/health", None)}
                new_replicas = seen - replicas_before
                if new_replicas:
                    break
            time.sleep(1)
        assert new_replicas, f"Ray did not restart the replica: {_replica_states()}"
        print(f"Ray restarted the replica ({sorted(new_replicas)}) {time.monotonic() - killed:.1f} s after the kill")
        for sid, (_, _, text) in sessions.items():
            assert http.post("/v1/generate", json=_ask(sid)).json()["text"] == text


@needs_ray
@pytest.mark.slow
def test_adaptation_goes_to_the_less_loaded_replica_and_streams_through_the_ingress(cluster, model_dir):
    """While one replica runs a long streamed adaptation, a new adaptation goes to the other one."""
    url, _ = cluster
    tok = _tokenizer(model_dir)
    with httpx.Client(base_url=url, timeout=300) as http:
        long = {"document": document(tok, 300), "stream": True, "settings": {**ADAPT, "steps": 40}}
        with http.stream("POST", "/v1/adapt", json=long) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            busy = stream.headers["x-refine-replica"]
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("event: ")) in ("event: started", "event: progress")
            short = _adapt(http, document(tok, 150))
            assert short.headers["x-refine-replica"] != busy
        assert http.post("/v1/generate", json=_ask(short.json()["session_id"])).status_code == 200
