"""The ``refine-tta`` command: ``serve`` (the HTTP server, with uvicorn) on top of the library's
commands (``ask``, ``demo``: see :mod:`refine_tta.cli`).

``serve`` options override the ``REFINE_TTA_*`` environment, which overrides the defaults of
:class:`server.settings.ServerSettings`. Heavy imports (torch, fla, uvicorn) happen only inside
the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (HF format) or hub id; default: the embedded "
                                   "models/refine-tiny-deltanet (env REFINE_TTA_MODEL)")
    p.add_argument("--model-name", help="name reported by /health and /v1/models")
    p.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--state-dir", type=Path, help="directory where sessions are kept")
    p.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                   help="accept this API key (repeatable; env REFINE_TTA_API_KEYS=k1,k2); none = no auth")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", choices=["fla", "torch"], help="kernel backend (default: per device)")
    p.add_argument("--refine-preset", help="named adaptation defaults: auto (default: from the model), embedded, safe, paper, library")
    p.add_argument("--max-document-tokens", type=int)
    p.add_argument("--max-prompt-tokens", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--queue-size", type=int)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--session-memory-bytes", type=int)
    p.add_argument("--session-disk-bytes", type=int)
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])


def build_parser() -> argparse.ArgumentParser:
    from refine_tta.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="refine-tta", description="refine-tta: test-time adaptation of "
                                     "fast-weight language models (server and command line).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP server",
                                description="Run the refine-tta HTTP server (docs/http-api.md, docs/server.md).")
    _add_serve_options(serve)
    add_subcommands(commands)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    skip = {"command", "func"}
    return {k: v for k, v in vars(args).items() if k not in skip and v is not None}


def _model_problem(model: str) -> str | None:
    """Why ``model`` cannot be loaded, when that is clear before loading (else None)."""
    path = Path(model).expanduser()
    if path.exists():
        return None if (path / "config.json").is_file() else f"{model} is not a model directory (no config.json)"
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        return f"model {model!r} does not exist (and is not a hub id like 'org/name')"
    return None  # a hub id: resolved when the model loads


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from server.app import create_app
    from server.settings import ServerSettings

    try:
        settings = ServerSettings(**_overrides(args))
    except ValidationError as exc:
        print(f"refine-tta serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = _model_problem(settings.model)
    if problem:
        print(f"refine-tta serve: {problem}", file=sys.stderr)
        return 2
    app = create_app(settings)
    # One process, one worker thread: the device is owned by exactly one engine.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=10, access_log=settings.log_level == "debug")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    from refine_tta.cli import main as library_main  # ask, demo: the library's own error handling

    return library_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
