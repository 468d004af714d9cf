"""The ``refine-tta`` command: ``serve`` (the HTTP server, with uvicorn) and ``sessions`` (an
operator's view of the session store) on top of the library's commands (``ask``, ``demo``: see
:mod:`refine_tta.cli`).

``serve`` options override the ``REFINE_TTA_*`` environment, which overrides the defaults of
:class:`server.settings.ServerSettings`; every setting has an option (``SETTING_OPTIONS``).
Before anything heavy is imported, ``serve`` checks what it can: the settings, the model path (or
that a hub id is cached or reachable), the state directory, and the port (bound here and handed
to uvicorn). A problem ends the command at once with one line ``refine-tta serve: ...`` and exit
status 2, without loading a model. Then it sets the thread policy (before torch loads), loads the
model in the background and serves.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from refine_tta.preflight import model_problem

__all__ = ["main", "build_parser", "SETTING_OPTIONS", "StartupError", "preflight"]

log = logging.getLogger("server.cli")

class StartupError(Exception):
    """A problem found before loading the model; ``str()`` is the one line printed."""


def _bytes_or_none(text: str) -> int | None:
    if text.strip().lower() in ("none", "unlimited"):
        return None
    return int(text)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"steps\": 2}'")
    return value


# setting name -> (option, add_argument keywords). Every ServerSettings field has exactly one
# (tests/test_startup.py checks it).
SETTING_OPTIONS: dict[str, tuple[str, dict]] = {
    "model": ("--model", {"help": "model directory (HF format) or hub id; default: the embedded "
                                  "models/refine-tiny-deltanet"}),
    "model_name": ("--model-name", {"help": "name reported by /health and /v1/models"}),
    "host": ("--host", {"help": "bind address (default 127.0.0.1; 0.0.0.0 in containers)"}),
    "port": ("--port", {"type": int, "help": "port (default 8000; 0 = any free port)"}),
    "state_dir": ("--state-dir", {"type": Path, "help": "directory where sessions are kept"}),
    "api_keys": ("--api-key", {"action": "append", "metavar": "KEY",
                               "help": "accept this API key (repeatable); none = no auth"}),
    "metrics_key": ("--metrics-key", {"metavar": "KEY", "help": "operator key for /metrics (tenant API keys "
                                                                "get 403 there)"}),
    "docs": ("--docs", {"action": "store_true", "help": "serve Swagger UI (/docs) and ReDoc (/redoc); their "
                                                        "assets load from a CDN"}),
    "device": ("--device", {"help": "auto, cpu, cuda, cuda:N (default auto)"}),
    "dtype": ("--dtype", {"choices": ["float32", "bfloat16", "float16"],
                          "help": "default: bf16 on CUDA, fp32 on CPU"}),
    "backend": ("--backend", {"choices": ["fla", "torch"], "help": "kernel backend (default: per device)"}),
    "max_body_bytes": ("--max-body-bytes", {"type": int}),
    "max_document_tokens": ("--max-document-tokens", {"type": int}),
    "max_prompt_tokens": ("--max-prompt-tokens", {"type": int}),
    "max_new_tokens": ("--max-new-tokens", {"type": int}),
    "max_steps": ("--max-steps", {"type": int, "help": "adaptation steps per request"}),
    "queue_size": ("--queue-size", {"type": int}),
    "max_rollout_tokens": ("--max-rollout-tokens", {"type": int, "help": "n_chunks * n * k of one REFINE step"}),
    "max_lora_rank": ("--max-lora-rank", {"type": int}),
    "retry_after_s": ("--retry-after-s", {"type": int, "help": "Retry-After (seconds) sent with 429"}),
    "session_memory_bytes": ("--session-memory-bytes", {"type": _bytes_or_none, "help": "or 'none'"}),
    "session_disk_bytes": ("--session-disk-bytes", {"type": _bytes_or_none, "help": "or 'none'"}),
    "refine_preset": ("--refine-preset", {"help": "named adaptation defaults: auto (default: from the model), embedded, safe, paper, library"}),
    "refine_defaults": ("--refine-defaults", {"type": _json_object, "metavar": "JSON",
                                              "help": "RefineConfig fields over the preset, e.g. '{\"steps\": 2}'"}),
    "prune_sessions_at_start": ("--prune-sessions-at-start", {
        "action": "store_true", "help": "delete least recently used sessions if over --session-disk-bytes at start"}),
    "shutdown_grace_s": ("--shutdown-grace-s", {"type": float, "help": "seconds a running job may finish after SIGTERM"}),
    "log_level": ("--log-level", {"choices": ["critical", "error", "warning", "info", "debug"]}),
    "threads": ("--threads", {"type": int, "help": "torch CPU threads (default: chosen from the idle CPUs)"}),
}


def _add_setting_options(p: argparse.ArgumentParser) -> None:
    for name, (option, kwargs) in SETTING_OPTIONS.items():
        env = f"REFINE_TTA_{name.upper()}"
        help_text = kwargs.get("help", "")
        # absent options stay absent (SUPPRESS), so that 'none' can set a setting to None
        p.add_argument(option, dest=name, default=argparse.SUPPRESS,
                       **{**kwargs, "help": f"{help_text} (env {env})".strip()})


def build_parser() -> argparse.ArgumentParser:
    from refine_tta.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="refine-tta", description="refine-tta: test-time adaptation of "
                                     "fast-weight language models (server and command line).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP server",
                                description="Run the refine-tta HTTP server (docs/http-api.md, docs/server.md).")
    _add_setting_options(serve)
    serve.add_argument("--replicas", type=int, default=1, metavar="N",
                       help="N > 1: N replicas under Ray Serve with session-affine routing over one shared "
                            "--state-dir (needs the [ray] extra; docs/ray.md). Default 1: this process alone")
    sessions = commands.add_parser(
        "sessions", help="list, adopt or delete stored sessions (an operator's tool; stop the server first)",
        description="Sessions made without --api-key have no owner; under key auth nobody can use them. "
                    "'list' shows them, 'adopt' gives them to an API key, 'delete' removes them.")
    sessions.add_argument("action", choices=["list", "adopt", "delete"])
    sessions.add_argument("session_ids", nargs="*", metavar="SESSION", help="default: every session without an owner")
    for name in ("model", "state_dir", "device", "dtype", "backend"):
        option, kwargs = SETTING_OPTIONS[name]
        sessions.add_argument(option, dest=name, default=argparse.SUPPRESS, **kwargs)
    sessions.add_argument("--api-key", dest="owner_key", metavar="KEY",
                          help="adopt: the key that will own the sessions; list/delete: that key's sessions "
                               "instead of the unowned ones")
    add_subcommands(commands)
    return parser


# ------------------------------------------------------------------------------------- settings
def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """The settings given as options (absent ones fall back to the environment, then the defaults)."""
    return {k: getattr(args, k) for k in names if hasattr(args, k)}


def _option_names(text: str) -> str:
    """``max_steps=2`` -> ``--max-steps=2`` for every setting named (as an identifier) in ``text``."""
    names = [name for name in SETTING_OPTIONS if "_" in name]  # plain words ("model", "port") stay words
    pattern = r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda m: SETTING_OPTIONS[m.group(1)][0], text)


def load_settings(overrides: dict):
    """ServerSettings from options + environment; StartupError naming the options on a bad value."""
    from pydantic import ValidationError

    from server.settings import ServerSettings

    try:
        return ServerSettings(**overrides)
    except ValidationError as exc:
        parts = []
        for error in exc.errors():
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            field = str(error["loc"][0]) if error.get("loc") else None
            if field in SETTING_OPTIONS and field in overrides:
                parts.append(f"{SETTING_OPTIONS[field][0]} {overrides[field]}: {message}")
            elif field in SETTING_OPTIONS:  # from the environment
                parts.append(f"REFINE_TTA_{field.upper()}={error.get('input')}: {message}")
            else:
                parts.append(_option_names(message))
        raise StartupError("invalid settings: " + "; ".join(parts)) from None


# ------------------------------------------------------------------------------------ preflight
def _state_dir_problem(state_dir: Path) -> str | None:
    import os

    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create the state directory {state_dir}: {exc.strerror or exc}"
    if not os.access(state_dir, os.W_OK | os.X_OK):
        return f"the state directory {state_dir} is not writable"
    return None


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket bound to ``host:port`` (StartupError if the address is taken)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot bind to {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = "the port is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise StartupError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def preflight(settings) -> socket.socket:
    """Check the model, the state directory and the port before loading anything; returns the bound
    socket. Raises StartupError with one line."""
    for problem in (model_problem(settings.model), _state_dir_problem(settings.state_dir)):
        if problem:
            raise StartupError(problem)
    return bind_socket(settings.host, settings.port)


# ---------------------------------------------------------------------------------------- serve
def serve_replicas(settings, sock: socket.socket, replicas: int) -> int:
    """Hand over to Ray Serve on the address preflight bound (Ray's proxy binds it again), which
    is imported only here: the single-process path never loads Ray."""
    host, port = sock.getsockname()[:2]
    sock.close()
    try:
        from server.ray_app import serve_replicas as run
    except ImportError as exc:
        print(f"refine-tta serve: --replicas {replicas} needs Ray Serve ({exc}); install it with "
              "pip install 'refine-tta[ray]'", file=sys.stderr)
        return 2
    return run(settings.model_copy(update={"port": port}), replicas)


def serve(args: argparse.Namespace) -> int:
    from server.settings import ServerSettings

    try:
        if args.replicas < 1:
            raise StartupError(f"--replicas must be at least 1, got {args.replicas}")
        settings = load_settings(_overrides(args, list(ServerSettings.model_fields)))
        sock = preflight(settings)
    except StartupError as exc:
        print(f"refine-tta serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.replicas > 1:
        return serve_replicas(settings, sock, args.replicas)
    from refine_tta.threads import configure_threads

    threads = configure_threads(settings.threads)  # before torch loads (nothing above imported it)
    import uvicorn
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in a server's log

    from server.app import create_app

    app = create_app(settings)
    app.state.runtime.threads = threads
    host, port = sock.getsockname()[:2]
    app.state.runtime.address = f"http://{host}:{port}"
    # One process, one worker thread: the device is owned by exactly one engine. Access lines come
    # from our middleware (one per request, with its id and latency), not uvicorn's. uvicorn waits
    # for open requests a little longer than the engine's grace period, so every request is answered
    # by the engine (503 + Retry-After, or a stream's error event), not cut.
    config = uvicorn.Config(app, log_level=settings.log_level, timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 10, access_log=False,
                            log_config=None)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


# ------------------------------------------------------------------------------------- sessions
def sessions_command(args: argparse.Namespace) -> int:
    """``refine-tta sessions list|adopt|delete``: the store of ``--state-dir`` for ``--model``."""
    from refine_tta.engine import SessionStore, StateDirLocked
    from server.runtime import load_for_settings

    try:
        settings = load_settings(_overrides(args, ["model", "state_dir", "device", "dtype", "backend"]))
        problem = model_problem(settings.model)
        if problem:
            raise StartupError(problem)
        if args.action == "adopt" and not args.owner_key:
            raise StartupError("adopt needs --api-key KEY: the key that will own the sessions")
    except StartupError as exc:
        print(f"refine-tta sessions: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_for_settings(settings)  # the store needs the model's fingerprint
    try:
        store = SessionStore.open(settings.state_dir, loaded.fingerprint)  # locked: the server must be stopped
    except StateDirLocked as exc:
        print(f"refine-tta sessions: {exc}", file=sys.stderr)
        return 2
    try:
        return _sessions_action(args, store, settings.state_dir)
    finally:
        store.close()


def _sessions_action(args: argparse.Namespace, store, state_dir: Path) -> int:
    """list / adopt / delete on an open (locked) store; returns the exit status."""
    from refine_tta.engine import NotFound
    from server.middleware import owner_of

    owner = owner_of(args.owner_key) if args.owner_key and args.action != "adopt" else None
    ids = args.session_ids or [s.id for s in store.list(owner)]
    whose = "owned by that key" if owner else "without an owner"
    if args.action == "list":
        print(f"{len(ids)} sessions {whose} in {state_dir}")
        for session in store.list(owner):
            print(f"{session.id}  {session.document_tokens} tokens  created {session.created:.0f}")
        return 0
    status = 0
    for session_id in ids:
        try:
            if args.action == "adopt":
                store.set_owner(session_id, None, owner_of(args.owner_key))
                print(f"adopted {session_id}")
            else:
                store.delete(session_id, owner)
                print(f"deleted {session_id}")
        except NotFound as exc:
            print(f"refine-tta sessions: {exc} ({whose})", file=sys.stderr)
            status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "sessions":
        return sessions_command(args)
    from refine_tta.cli import main as library_main  # ask, demo: the library's own error handling

    return library_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
