"""Faults against real ``refine-tta serve`` processes: kill -9 at every step of a write, damaged
files, file descriptors exhausted, SIGTERM during plain and streamed adaptation, two servers on one
state directory. Each test prints ``FAULT | fault | what happened | what the client saw`` lines
(``pytest -s``): the fault table of docs/session-storage.md comes from them."""

from __future__ import annotations

import json
import resource
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from server_fixtures import REPO, TOKENIZER_DIR, ServerProcess, document, make_tiny_model, sse_events

from refine_tta.engine.storage import DELETING_PREFIX, QUARANTINE_DIR, REASON_FILE, STAGING_PREFIX

pytestmark = pytest.mark.slow

FAULT_SERVER = REPO / "tests" / "fault_server.py"
DEFAULTS = {"steps": 1, "n_chunks": 4, "k": 4, "edge_margin": 8}
ENV = {"REFINE_TTA_REFINE_DEFAULTS": json.dumps(DEFAULTS)}
GEN = {"prompt": " The keeper", "max_tokens": 8, "temperature": 0.0, "seed": 0}


def report(fault: str, happened: str, client: str) -> None:
    print(f"\nFAULT | {fault} | {happened} | {client}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def start(tiny: Path, state: Path, *extra: str, launcher: tuple[str, ...] = ("-m", "server")) -> ServerProcess:
    proc = ServerProcess(tiny, state, *extra, env=ENV, launcher=launcher)
    proc.wait_healthy()
    return proc


def adapt(http: httpx.Client, text: str) -> dict:
    r = http.post("/v1/adapt", json={"document": text})
    assert r.status_code == 200, r.text
    return r.json()


def answer(http: httpx.Client, session_id: str) -> httpx.Response:
    return http.post("/v1/generate", json={**GEN, "session_id": session_id})


def tokens_of(http: httpx.Client, session_id: str) -> list[int]:
    r = answer(http, session_id)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def leftovers(state: Path) -> list[str]:
    return [p.name for p in state.iterdir() if p.name.startswith((STAGING_PREFIX, DELETING_PREFIX))]


def quarantined(state: Path) -> list[Path]:
    q = state / QUARANTINE_DIR
    return sorted(q.iterdir()) if q.is_dir() else []


# ---------------------------------------------------------------------------------------- kill -9
ALL_KILL_POINTS = ["staged", "state.safetensors", "delta.safetensors", "meta.json", "published", "unlisted"]
KILL_POINTS = ["state.safetensors", "meta.json", "published", "unlisted"]  # real servers (each life ~20 s)

CHILD = """
import sys, time
from pathlib import Path
from test_sessions import FP, make_session
from refine_tta.engine import SessionStore, SessionStorage
state, step, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
store = SessionStore.open(state, FP)
victim = None
for seed in range(3):
    sid = store.put(make_session(seed)).id
    victim = victim or sid
    print(seed, flush=True)
def freeze(self, name, path):
    if name == step:
        marker.write_text(str(path))
        time.sleep(3600)
SessionStorage._reached = freeze
store.delete(victim, None) if step == "unlisted" else store.put(make_session(99))
"""


@pytest.mark.parametrize("step", ALL_KILL_POINTS)
def test_kill_9_of_a_storage_process_at_every_step(tmp_path, step):
    """The storage alone (no model, hand-made tensors) in a child process killed at each step:
    the three acknowledged sessions come back bit-identical; the interrupted one is absent or whole."""
    import subprocess
    import sys

    from test_sessions import FP, assert_same_tensors, make_session

    from refine_tta.engine import SessionStore

    state, marker = tmp_path / "state", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(state), step, str(marker)], cwd=REPO / "tests",
                             stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.02)
        child.kill()
        acknowledged = [int(line) for line in child.communicate(timeout=30)[0].split()]
    finally:
        child.kill()
    assert acknowledged == [0, 1, 2]
    store = SessionStore.open(state, FP)
    by_seed = {s.document_tokens - 100: s.id for s in store.list(None)}
    expected = {0, 1, 2} - ({0} if step == "unlisted" else set())
    maybe = {99} if step == "published" else set()  # published, killed before the put returned
    assert expected <= by_seed.keys() <= expected | maybe
    for seed, sid in by_seed.items():
        assert_same_tensors(store.get(sid, None), make_session(seed))
    assert leftovers(state) == [] and quarantined(state) == []


def test_kill_9_at_every_step_of_a_write_loses_no_acknowledged_session(tiny, tok, tmp_path):
    """One state directory through len(KILL_POINTS) + 1 server lives (the points between are covered
    by the storage-only test above). Each life checks every session
    acknowledged so far (listed, same metadata, same greedy answer), stores one more (acknowledged),
    then is killed with SIGKILL while the storage is frozen at the next kill point of a second write
    (or, at ``unlisted``, of a delete)."""
    state = tmp_path / "state"
    acknowledged: dict[str, tuple[dict, list[int]]] = {}
    for i, step in enumerate([*KILL_POINTS, None]):
        marker = tmp_path / f"marker-{i}"
        launcher = ("-m", "server") if step is None else \
            (str(FAULT_SERVER), step, "1" if step == "unlisted" else "2", str(marker))
        proc = start(tiny, state, launcher=launcher)
        try:
            with httpx.Client(base_url=proc.url, timeout=120) as http:
                listed = {s["session_id"]: s for s in http.get("/v1/sessions").json()["sessions"]}
                for sid, (info, expected) in acknowledged.items():
                    assert sid in listed, f"acknowledged session {sid} lost after kill -9 at {KILL_POINTS[i - 1]}"
                    assert {k: listed[sid][k] for k in ("created", "settings", "stats", "document_tokens")} == \
                        {k: info[k] for k in ("created", "settings", "stats", "document_tokens")}
                    assert tokens_of(http, sid) == expected
                for sid in listed.keys() - acknowledged.keys():  # written but never acknowledged: complete
                    assert answer(http, sid).status_code == 200
                assert leftovers(state) == [] and quarantined(state) == []
                if i > 0:
                    report(f"kill -9 at '{KILL_POINTS[i - 1]}'", f"restart: {len(acknowledged)} acknowledged "
                           f"sessions identical, {len(listed) - len(acknowledged)} unacknowledged complete, nothing "
                           "half-written visible or left", "every acknowledged session served, same answer")
                if step is None:
                    break
                info = adapt(http, document(tok, 100 + 10 * i))
                acknowledged[info["session_id"]] = (info, tokens_of(http, info["session_id"]))
                if step == "unlisted":
                    victim = next(iter(acknowledged))
                    acknowledged.pop(victim)
                    request = ("DELETE", f"/v1/sessions/{victim}", None)
                else:
                    request = ("POST", "/v1/adapt", {"document": document(tok, 105 + 10 * i)})
            outcome: list[object] = []

            def send(method=request[0], path=request[1], body=request[2]) -> None:
                try:
                    outcome.append(httpx.request(method, proc.url + path, json=body, timeout=120).status_code)
                except httpx.HTTPError as exc:
                    outcome.append(type(exc).__name__)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert time.monotonic() < deadline and proc.proc.poll() is None, proc.log()
                time.sleep(0.05)
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(30)
            sender.join(30)
            assert outcome and outcome[0] != 200  # the interrupted request was never acknowledged
        finally:
            proc.stop()


# ------------------------------------------------------------------------------------ damaged files
def flip(path: Path, n: int) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for j in range(middle, middle + n):
        data[j] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_files_are_quarantined_and_answered_clearly(tiny, tok, tmp_path):
    state = tmp_path / "state"
    proc = start(tiny, state)
    try:
        with httpx.Client(base_url=proc.url, timeout=120) as http:
            sids = [adapt(http, document(tok, 100 + 10 * i))["session_id"] for i in range(4)]
            expected = {sid: tokens_of(http, sid) for sid in sids}
    finally:
        proc.stop()
    delta_flip, state_flip, garbled, intact = sids
    delta_file = state / delta_flip / "delta.safetensors"
    size = delta_file.stat().st_size
    flip(delta_file, 4096)  # 4 KiB, same size
    flip(state / state_flip / "state.safetensors", 1)
    tensors = {name: (state / garbled / name).read_bytes() for name in ("state.safetensors", "delta.safetensors")}
    (state / garbled / "meta.json").write_text('{"format": "refine-tta-session/2", "files": ')
    proc = start(tiny, state)
    try:
        with httpx.Client(base_url=proc.url, timeout=120) as http:
            for sid, file, n in ((delta_flip, "delta.safetensors", "4 KiB"),
                                 (state_flip, "state.safetensors", "1 byte")):
                r = answer(http, sid)
                error = r.json()["error"]
                assert r.status_code == 404 and error["type"] == "not_found" and "x-request-id" in r.headers
                assert f"{file} fails its checksum" in error["message"] and "quarantined" in error["message"]
                again = http.get(f"/v1/sessions/{sid}")
                assert again.status_code == 404 and "was quarantined" in again.json()["error"]["message"]
                report(f"{n} flipped in {file} (same size), restart, generate",
                       "checksum mismatch on load: directory moved to quarantine/ with REASON.json, logged",
                       f"404 not_found: {error['message']}")
            r = answer(http, garbled)
            assert r.status_code == 404 and "quarantined" in r.json()["error"]["message"]
            assert "meta.json is not valid JSON" in r.json()["error"]["message"]
            report("garbled meta.json, restart, generate", "quarantined at start, tensor files kept byte for byte",
                   f"404 not_found: {r.json()['error']['message']}")
            assert tokens_of(http, intact) == expected[intact]
            assert [s["session_id"] for s in http.get("/v1/sessions").json()["sessions"]] == [intact]
    finally:
        proc.stop()
    moved = {p.name.split(".")[0]: p for p in quarantined(state)}
    assert moved.keys() == {delta_flip, state_flip, garbled}
    assert (moved[delta_flip] / "delta.safetensors").stat().st_size == size
    for name, data in tensors.items():
        assert (moved[garbled] / name).read_bytes() == data
    for p in moved.values():
        assert json.loads((p / REASON_FILE).read_text())["reason"]
    assert proc.log().count("quarantined sess_") >= 3


# -------------------------------------------------------------------------------------- EMFILE
def lowest_free_fd(pid: int) -> int:
    used = {int(name) for name in Path(f"/proc/{pid}/fd").iterdir() for name in [name.name]}
    return next(n for n in range(len(used) + 1) if n not in used)


def test_emfile_during_reload_keeps_the_session(tiny, tok, tmp_path):
    """The server's file-descriptor limit is lowered (prlimit) so that its next open() fails with
    EMFILE while it reloads an evicted session; then restored."""
    proc = start(tiny, tmp_path / "state", "--session-memory-bytes", "1")
    try:
        with httpx.Client(base_url=proc.url, timeout=120) as http:
            first = adapt(http, document(tok, 120))["session_id"]
            expected = tokens_of(http, first)
            second = adapt(http, document(tok, 140))["session_id"]
            tokens_of(http, second)  # first is now on disk only
            pid = proc.proc.pid
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid), hard))
            try:
                r = answer(http, first)
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "2" and r.headers["x-refine-retry-safe"] == "true"
            assert "EMFILE" in r.json()["error"]["message"] and "kept" in r.json()["error"]["message"]
            report("EMFILE while reloading an evicted session", "4 tries (0.05/0.25/1 s apart), session kept "
                   "on disk and in the index", f"503 unavailable, Retry-After: 2, x-refine-retry-safe: true: "
                   f"{r.json()['error']['message']}")
            assert tokens_of(http, first) == expected  # the limit restored: served, unchanged
        assert quarantined(tmp_path / "state") == []
    finally:
        proc.stop()


# ------------------------------------------------------------------------------------- SIGTERM
def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigterm_during_plain_and_streamed_adaptation(tiny, tok, tmp_path):
    """Grace 1 s. Life 1: a plain adaptation running past the grace period, a stream queued.
    Life 2: a stream running past it, a plain request queued. Every client gets the documented
    answer: 503 + Retry-After + x-refine-retry-safe (plain) or a final ``error`` event (stream)."""
    long_doc = {"document": document(tok, 300), "settings": {"steps": 64}}
    state = tmp_path / "state"
    for running in ("plain", "stream"):
        proc = start(tiny, state, "--shutdown-grace-s", "1")
        results: dict[str, object] = {}

        def plain() -> None:
            r = httpx.post(proc.url + "/v1/adapt", json=long_doc, timeout=120)
            results["plain"] = (r.status_code, dict(r.headers), r.json(), time.monotonic())

        def stream() -> None:
            with httpx.stream("POST", proc.url + "/v1/adapt", json={**long_doc, "stream": True}, timeout=120) as r:
                results["stream_status"] = r.status_code
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    if line.startswith("event: progress"):
                        results.setdefault("progress", time.monotonic())
                results["stream"] = (sse_events(lines), time.monotonic())

        first, second = (plain, stream) if running == "plain" else (stream, plain)
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            threads = [threading.Thread(target=first, daemon=True)]
            threads[0].start()
            wait_for(lambda: metric(http, "refine_tta_jobs_running") == 1 and
                     metric(http, "refine_tta_adaptation_steps_total") >= 1)
            threads.append(threading.Thread(target=second, daemon=True))
            threads[1].start()
            wait_for(lambda: metric(http, "refine_tta_queue_depth") == 1)
        t_term = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        rc = proc.proc.wait(60)
        exited = time.monotonic() - t_term
        # uvicorn re-raises the signal once shut down: -15 after "Application shutdown complete".
        assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in proc.log(), proc.log()
        status, headers, body, t_plain = results["plain"]
        assert status == 503 and body["error"]["type"] == "unavailable", body
        assert headers["retry-after"] and headers["x-refine-retry-safe"] == "true" and headers["x-request-id"]
        events, t_stream = results["stream"]
        assert results["stream_status"] == 200 and events[-1][0] == "error", events
        assert json.loads(events[-1][1])["error"]["type"] == "unavailable"
        assert "done" not in [e for e, _ in events]
        n_progress = sum(e == "progress" for e, _ in events)
        if running == "plain":
            assert t_plain - t_term >= 0.9 and n_progress == 0  # the running one had its grace period
            report("SIGTERM, plain adaptation running (64 steps) + stream queued, grace 1 s",
                   f"queued job ended at once, running one cancelled after the grace; clean exit ({rc}) "
                   f"in {exited:.1f} s",
                   f"plain: 503 unavailable after {t_plain - t_term:.1f} s, Retry-After: {headers['retry-after']}, "
                   f"x-refine-retry-safe: true, x-request-id; stream: 200 then 'event: error' (unavailable) "
                   f"after {t_stream - t_term:.1f} s")
        else:
            assert t_stream - t_term >= 0.9 and n_progress >= 1
            report("SIGTERM, streamed adaptation running (64 steps) + plain queued, grace 1 s",
                   f"queued job ended at once, running one cancelled after the grace; clean exit ({rc}) "
                   f"in {exited:.1f} s",
                   f"stream: {n_progress} progress events then 'event: error' (unavailable) after "
                   f"{t_stream - t_term:.1f} s; plain: 503 unavailable after {t_plain - t_term:.1f} s, "
                   f"Retry-After, x-refine-retry-safe: true")
        assert "cancelling the running adapt job after the 1 s grace period" in proc.log()
        proc.stop()
    assert not [p for p in state.iterdir() if p.name.startswith("sess_")]  # nothing half-stored


# ---------------------------------------------------------------------------------- two servers
def test_a_second_server_on_the_same_state_dir_refuses_to_start(tiny, tmp_path):
    state = tmp_path / "state"
    first = start(tiny, state)
    try:
        second = ServerProcess(tiny, state, env=ENV)
        try:
            rc = second.proc.wait(120)
        finally:
            second.stop()
        assert rc != 0
        log = second.log()
        assert "refusing to start" in log and "is already in use by another refine-tta process" in log
        assert f"pid {first.proc.pid}" in log
        line = next(x for x in log.splitlines() if "refusing to start" in x)
        report("second server on the same --state-dir", f"the second exits with status {rc} before loading "
               "the model", line.split(": ", 1)[-1])
        assert httpx.get(first.url + "/health", timeout=10).status_code == 200
    finally:
        first.stop()
