"""The first minutes: start-up errors that stop at once, the thread policy, every setting an option,
start-up and access logs, unowned sessions under key auth.

Each start-up error runs the real command in a fresh process and checks: exit status 2, exactly one
line on stderr, under 2 s from the command's first import to its exit (the interpreter's own start,
slow on a loaded machine, is not the command's), and torch never imported (so no model was loaded)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from server_fixtures import app_client, make_tiny_model

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "models" / "refine-tiny-deltanet"

# Runs a command line in a fresh interpreter; says afterwards whether torch was ever imported.
_PROBE = ("import sys, time\nt0 = time.perf_counter()\nfrom server.cli import main\nrc = main(sys.argv[1:])\n"
          "print('TORCH_IMPORTED=' + str('torch' in sys.modules))\n"
          "print('SECONDS=%.3f' % (time.perf_counter() - t0))\nsys.exit(rc)\n")


def run_command(args: list[str], cwd: Path, **env: str) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, seconds from import to exit) of ``refine-tta ARGS`` in a new process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REFINE_TTA_", "HF_"))}
    full_env = {**base, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "clients")]), **env}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=60)
    out, _, seconds = proc.stdout.rpartition("SECONDS=")
    return proc.returncode, out, proc.stderr, float(seconds)


def assert_stops_at_once(args: list[str], cwd: Path, expect: str, **env: str) -> str:
    rc, out, err, seconds = run_command(args, cwd, **env)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("refine-tta serve: "), err
    assert expect in lines[0], lines[0]
    assert out.strip() == "TORCH_IMPORTED=False", out  # no model was loaded
    assert seconds < 2.0, f"took {seconds:.2f} s: {lines[0]}"
    return lines[0]


# ------------------------------------------------------------------------------- start-up errors
def test_missing_local_model_path(tmp_path):
    assert_stops_at_once(["serve", "--model", str(tmp_path / "no-such-model"), "--state-dir", str(tmp_path / "s")],
                         tmp_path, "does not exist")


def test_typo_next_to_a_local_folder_is_not_taken_for_a_hub_id(tmp_path):
    (tmp_path / "models").mkdir()
    line = assert_stops_at_once(["serve", "--model", "models/nope", "--state-dir", str(tmp_path / "s")], tmp_path,
                                "models/nope does not exist")
    assert "local folder" in line


def test_directory_without_config_and_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert_stops_at_once(["serve", "--model", str(tmp_path / "empty"), "--state-dir", str(tmp_path / "s")],
                         tmp_path, "no config.json")
    assert_stops_at_once(["serve", "--model", str(tmp_path / "weights.bin"), "--state-dir", str(tmp_path / "s")],
                         tmp_path, "is a file")


@pytest.mark.parametrize("offline", ["1", ""], ids=["HF_HUB_OFFLINE", "hub-unreachable-or-404"])
def test_hub_id_that_cannot_be_loaded(tmp_path, offline):
    """Not cached, and either offline or asked of the hub (no network here: unreachable; with a
    network: no such repository). Either way one line, at once."""
    env = {"HF_HOME": str(tmp_path / "hf")}
    if offline:
        env["HF_HUB_OFFLINE"] = offline
    line = assert_stops_at_once(["serve", "--model", "no-such-org-x7/no-such-model-x7", "--state-dir",
                                 str(tmp_path / "s")], tmp_path, "'no-such-org-x7/no-such-model-x7' is not a local "
                                                                 "directory", **env)
    assert ("HF_HUB_OFFLINE" in line) == bool(offline)


def test_port_in_use_is_found_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_stops_at_once(["serve", "--model", str(EMBEDDED), "--port", str(port), "--state-dir",
                              str(tmp_path / "s")], tmp_path, f"cannot listen on 127.0.0.1:{port}: the port is already "
                                                              f"in use")


def test_state_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_stops_at_once(["serve", "--model", str(EMBEDDED), "--state-dir", str(tmp_path / "file" / "sessions")],
                         tmp_path, "cannot create the state directory")


def test_limit_below_the_preset_names_the_options(tmp_path):
    line = assert_stops_at_once(["serve", "--max-steps", "2", "--state-dir", str(tmp_path / "s")], tmp_path,
                                "--max-steps=2 is below the default steps=4 of the preset 'embedded'")
    assert "--refine-defaults" in line
    line = assert_stops_at_once(["serve", "--max-steps", "2", "--refine-defaults", '{"steps": 3}', "--state-dir",
                                 str(tmp_path / "s")], tmp_path, "default steps=3 of --refine-defaults")
    line = assert_stops_at_once(["serve", "--port", "70000", "--state-dir", str(tmp_path / "s")], tmp_path,
                                "--port 70000: Input should be less than or equal to 65535")
    line = assert_stops_at_once(["serve", "--refine-preset", "huge", "--state-dir", str(tmp_path / "s")], tmp_path,
                                "--refine-preset huge: unknown preset 'huge'")
    assert_stops_at_once(["serve", "--state-dir", str(tmp_path / "s")], tmp_path,
                         "REFINE_TTA_MAX_STEPS=0: Input should be greater than or equal to 1", REFINE_TTA_MAX_STEPS="0")


# -------------------------------------------------------------------------------------- settings
def test_every_setting_has_an_option_that_reaches_the_settings(tmp_path):
    from server.cli import SETTING_OPTIONS, _overrides, build_parser
    from server.settings import ServerSettings

    assert set(SETTING_OPTIONS) == set(ServerSettings.model_fields)
    argv = ["serve", "--model", "m/x", "--model-name", "n", "--host", "0.0.0.0", "--port", "9", "--state-dir",
            str(tmp_path), "--api-key", "k1", "--api-key", "k2", "--device", "cpu", "--dtype", "float32",
            "--backend", "torch", "--max-body-bytes", "2048", "--max-document-tokens", "100",
            "--max-prompt-tokens", "10", "--max-new-tokens", "5", "--max-steps", "7", "--queue-size", "3",
            "--max-rollout-tokens", "99", "--max-lora-rank", "4", "--retry-after-s", "2",
            "--session-memory-bytes", "none", "--session-disk-bytes", "1000", "--refine-preset", "library",
            "--refine-defaults", '{"steps": 2, "scope": "lora"}', "--log-level", "debug", "--threads", "3",
            "--prune-sessions-at-start", "--shutdown-grace-s", "4.5", "--metrics-key", "ops", "--docs"]
    args = build_parser().parse_args(argv)
    settings = ServerSettings(**_overrides(args, list(ServerSettings.model_fields)))
    assert settings.model_dump() == {
        "model": "m/x", "model_name": "n", "host": "0.0.0.0", "port": 9, "state_dir": tmp_path,
        "api_keys": ["k1", "k2"], "device": "cpu", "dtype": "float32", "backend": "torch", "max_body_bytes": 2048,
        "max_document_tokens": 100, "max_prompt_tokens": 10, "max_new_tokens": 5, "max_steps": 7, "queue_size": 3,
        "max_rollout_tokens": 99, "max_lora_rank": 4, "retry_after_s": 2, "session_memory_bytes": None,
        "session_disk_bytes": 1000, "refine_preset": "library", "refine_defaults": {"steps": 2, "scope": "lora"},
        "log_level": "debug", "threads": 3, "prune_sessions_at_start": True, "shutdown_grace_s": 4.5,
        "metrics_key": "ops", "docs": True}


# --------------------------------------------------------------------------------- thread policy
def test_thread_policy_choices():
    from refine_tta.threads import choose_thread_policy

    busy = choose_thread_policy(None, {}, cpus=2, load=5.7)  # a shared 2-core box
    assert (busy.threads, busy.wait_policy) == (1, "PASSIVE")
    assert "2 usable CPUs, load average 5.7" in busy.reason and "sleep instead of spinning" in busy.reason
    idle = choose_thread_policy(None, {}, cpus=16, load=0.2)
    assert idle.threads == 16 and idle.wait_policy == "PASSIVE"
    assert choose_thread_policy(None, {}, cpus=16, load=6.4).threads == 10
    env = choose_thread_policy(None, {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "active"}, cpus=16, load=0)
    assert (env.threads, env.wait_policy) == (3, "ACTIVE") and "OMP_NUM_THREADS" in env.reason
    assert choose_thread_policy(5, {"OMP_NUM_THREADS": "3"}, cpus=2, load=9).threads == 5  # --threads wins
    assert choose_thread_policy(None, {"OMP_NUM_THREADS": "lots"}, cpus=4, load=0).threads == 4  # junk ignored
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        choose_thread_policy(0, {}, cpus=2, load=0)


def test_thread_policy_is_set_before_torch_starts_its_pool():
    """In a fresh process with no OpenMP variables: the commands' imports leave torch unloaded, and
    the policy reaches libgomp's environment and torch's pool."""
    code = ("import os, sys\nimport server.cli, refine_tta.cli\nassert 'torch' not in sys.modules\n"
            "from refine_tta.threads import configure_threads\np = configure_threads(None)\nimport torch\n"
            "print(p.threads, p.wait_policy, os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], "
            "torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "clients")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    threads, policy, env_policy, env_threads, torch_threads = out.stdout.split()
    assert policy == env_policy == "PASSIVE" and threads == env_threads == torch_threads and int(threads) >= 1


# --------------------------------------------------------------------------- logs and the server
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_summary_line_access_log_and_one_operation_id(tiny, tmp_path, caplog):
    with caplog.at_level(logging.INFO), app_client(tiny, tmp_path / "state") as c:
        assert c.get("/health", headers={"x-request-id": "req-1"}).status_code == 200
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert c.get("/openapi.json").status_code == 200
        assert not [w for w in caught if "Duplicate Operation ID" in str(w.message)]
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready")]
    assert len(ready) == 1
    for part in (f"model {tiny.name} on cpu (torch kernels, float32)", "threads:", "preset safe (auto)",
                 f"state dir {tmp_path / 'state'}: 0 sessions restored", "auth: none"):
        assert part in ready[0], ready[0]
    access = [r.getMessage() for r in caplog.records if r.name == "server.access"]
    assert any(" GET /health 200 " in line and line.endswith("id=req-1") for line in access), access
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "server.access")


def test_unowned_sessions_under_key_auth_are_logged_and_can_be_adopted(tiny, tmp_path, caplog, capsys):
    from test_sessions import make_session

    from refine_tta.engine import SessionStore
    from refine_tta.model import load_model
    from server.cli import main
    from server.middleware import owner_of

    state = tmp_path / "state"
    fingerprint = load_model(tiny, device="cpu", load_tokenizer=False).fingerprint
    store = SessionStore.open(state, fingerprint)
    ids = [store.put(make_session(i)).id for i in range(2)]
    store.close()  # releases the state directory's lock for the server
    with caplog.at_level(logging.INFO), app_client(tiny, state, api_keys=["k1"]) as c:
        headers = {"authorization": "Bearer k1"}
        assert c.get("/v1/sessions", headers=headers).json() == {"sessions": []}
    warning = [r.getMessage() for r in caplog.records if "have no owner" in r.getMessage()]
    assert len(warning) == 1 and warning[0].startswith("2 sessions in")
    assert "refine-tta sessions adopt" in warning[0] and "refine-tta sessions delete" in warning[0]

    common = ["--model", str(tiny), "--state-dir", str(state), "--device", "cpu"]
    assert main(["sessions", "list", *common]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("2 sessions without an owner") and all(i in listed for i in ids)
    assert main(["sessions", "adopt", ids[0], *common]) == 2  # adopt needs --api-key
    assert main(["sessions", "adopt", ids[0], *common, "--api-key", "k1"]) == 0
    assert main(["sessions", "delete", *common]) == 0  # the remaining unowned one
    reopened = SessionStore.open(state, fingerprint)
    assert [s.id for s in reopened.list(owner_of("k1"))] == [ids[0]] and reopened.list(None) == []
