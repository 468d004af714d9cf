"""``refine-tta-client``: a command line over :class:`RefineClient`.

Commands::

    refine-tta-client adapt FILE [--steps N --mode M --lr X --seed S --base-session ID ...]   # FILE may be "-"
    refine-tta-client ask SESSION "question" [--max-tokens N --temperature T --seed S --stop S | --no-stop]
    refine-tta-client sessions
    refine-tta-client delete SESSION
    refine-tta-client health

Global options (before or after the command): ``--base-url``, ``--api-key``, ``--timeout``;
defaults come from ``REFINE_TTA_BASE_URL``, ``REFINE_TTA_API_KEY``, ``REFINE_TTA_TIMEOUT``.
Results go to stdout, the progress bar and errors to stderr. Exit status: 0 success,
1 error (``error: <message>``), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._client import RefineClient
from ._exceptions import RefineError
from ._models import AdaptResponse, SessionInfo

__all__ = ["main", "build_parser", "adapt_summary", "sessions_table"]

ClientFactory = Callable[[str | None, str | None, float | None], RefineClient]
"""``(base_url, api_key, timeout) -> RefineClient``; tests inject one with a mock transport."""

BASE_SESSION = "base"  # ``ask base ...`` uses the base model
DEFAULT_STOP = "\n"  # ``ask`` answers one line unless told otherwise


# --------------------------------------------------------------------------------------------
# parsing


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # In subcommands the defaults are suppressed so that an option given before the command is
    # not overwritten by the subcommand's default.
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--base-url", default=default, help="server URL (env REFINE_TTA_BASE_URL)")
    parser.add_argument("--api-key", default=default, help="API key (env REFINE_TTA_API_KEY)")
    parser.add_argument(
        "--timeout", type=float, default=default, help="seconds per request (env REFINE_TTA_TIMEOUT)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="refine-tta-client", description="Client of a refine-tta test-time adaptation server."
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    adapt = commands.add_parser(
        "adapt", parents=[common], help="adapt to a document; prints the session id and statistics"
    )
    adapt.add_argument("file", metavar="FILE", help="UTF-8 text file, or - for stdin")
    adapt.add_argument("--mode", help="adaptation mode (e.g. refine)")
    adapt.add_argument("--steps", type=int)
    adapt.add_argument("--lr", type=float)
    adapt.add_argument("--n-chunks", type=int)
    adapt.add_argument("--k", type=int)
    adapt.add_argument("--n", type=int)
    adapt.add_argument("--reward")
    adapt.add_argument("--selection")
    adapt.add_argument("--sft-coef", type=float)
    adapt.add_argument("--ppo-coef", type=float)
    adapt.add_argument("--scope")
    adapt.add_argument("--seed", type=int)
    adapt.add_argument("--base-session", metavar="ID", help="continue from this session's adapted weights")
    adapt.add_argument("--no-progress", action="store_true", help="no progress bar (no streaming)")

    ask = commands.add_parser(
        "ask", parents=[common], help="generate from a session (or 'base'), streaming to stdout"
    )
    ask.add_argument("session", metavar="SESSION", help=f"session id, or '{BASE_SESSION}' for the base model")
    ask.add_argument("question", metavar="QUESTION", help="the prompt, sent as is; - for stdin")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--top-p", type=float)
    ask.add_argument("--seed", type=int)
    ask.add_argument(
        "--stop", action="append", help="stop string (repeatable; default: a newline, i.e. one line of answer)"
    )
    ask.add_argument("--no-stop", action="store_true", help="no stop string: generate up to --max-tokens")

    commands.add_parser("sessions", parents=[common], help="list sessions")
    delete = commands.add_parser("delete", parents=[common], help="delete a session")
    delete.add_argument("session", metavar="SESSION")
    commands.add_parser("health", parents=[common], help="check that the server is up")
    return parser


# --------------------------------------------------------------------------------------------
# formatting (pure)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "?"


def adapt_summary(response: AdaptResponse) -> list[tuple[str, str]]:
    """``(label, value)`` rows describing an adaptation.

    Reward is the first and last step's ``reward_mean``; NTP loss is ``stats.total``'s
    ``ntp_loss_before`` -> ``ntp_loss_after`` (shown only when the server reports them); drift is
    ``stats.total["drift"]`` (NTP loss on the server's fixed generic text, base -> adapted);
    seconds is ``stats.total["seconds"]`` or the sum of the steps' ``seconds``.
    """
    steps, total = response.stats.steps, response.stats.total
    rows = [("session", response.session_id), ("document tokens", str(response.document_tokens))]
    rows.append(("steps", str(len(steps) if steps else total.get("steps", "?"))))
    rewards = [step.get("reward_mean") for step in steps if step.get("reward_mean") is not None]
    if rewards:
        rows.append(("reward mean", f"{_num(rewards[0])} -> {_num(rewards[-1])}"))
    if total.get("ntp_loss_before") is not None or total.get("ntp_loss_after") is not None:
        rows.append(
            ("ntp loss", f"{_num(total.get('ntp_loss_before'))} -> {_num(total.get('ntp_loss_after'))}")
        )
    drift = total.get("drift")
    if isinstance(drift, dict) and drift.get("ntp_base") is not None:
        rows.append(("drift (generic text NTP)",
                     f"{_num(drift.get('ntp_base'))} -> {_num(drift.get('ntp_adapted'))}"))
    if total.get("base_session"):
        rows.append(("continued from", str(total["base_session"])))
    seconds = total.get("seconds")
    if seconds is None:
        per_step = [step["seconds"] for step in steps if isinstance(step.get("seconds"), (int, float))]
        seconds = sum(per_step) if per_step else None
    if seconds is not None:
        rows.append(("seconds", f"{seconds:.1f}" if isinstance(seconds, (int, float)) else str(seconds)))
    return rows


def _human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def sessions_table(sessions: Sequence[SessionInfo]) -> str:
    """A plain aligned table: id, document tokens, bytes held (state + delta), created, last used."""
    header = ("ID", "TOKENS", "BYTES", "CREATED", "LAST USED")
    rows = [header] + [
        (
            info.session_id,
            str(info.document_tokens),
            _human_bytes(
                None
                if info.state_bytes is None and info.delta_bytes is None
                else (info.state_bytes or 0) + (info.delta_bytes or 0)
            ),
            _when(info.created),
            _when(info.last_used),
        )
        for info in sessions
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 2}  # numbers right-aligned
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# commands


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as file:
        return file.read()


def _cmd_adapt(client: RefineClient, args: argparse.Namespace) -> None:
    document = _read_text(args.file)
    response = client.adapt(
        document,
        progress=not args.no_progress,
        mode=args.mode,
        steps=args.steps,
        lr=args.lr,
        n_chunks=args.n_chunks,
        k=args.k,
        n=args.n,
        reward=args.reward,
        selection=args.selection,
        sft_coef=args.sft_coef,
        ppo_coef=args.ppo_coef,
        scope=args.scope,
        seed=args.seed,
        base_session=args.base_session,
    )
    rows = adapt_summary(response)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")


def ask_stops(stop: list[str] | None, no_stop: bool) -> list[str] | None:
    """What ``ask`` sends as ``stop``: the given strings, else a newline (one line of answer), or
    nothing with ``--no-stop``."""
    if no_stop:
        if stop:
            raise ValueError("--stop and --no-stop contradict each other")
        return None
    return stop or [DEFAULT_STOP]


def _cmd_ask(client: RefineClient, args: argparse.Namespace) -> None:
    session = None if args.session == BASE_SESSION else args.session
    prompt = _read_text("-") if args.question == "-" else args.question
    out = sys.stdout
    last = ""  # last character written
    with client.generate(
        session,
        prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=ask_stops(args.stop, args.no_stop),
        stream=True,
    ) as events:
        for event in events:
            if event.type == "token":
                last = event.text[-1:] or last
                out.write(event.text)
                out.flush()
    if last != "\n":
        out.write("\n")


def _cmd_sessions(client: RefineClient, args: argparse.Namespace) -> None:
    print(sessions_table(client.sessions.list().sessions))


def _cmd_delete(client: RefineClient, args: argparse.Namespace) -> None:
    print(f"deleted {client.sessions.delete(args.session).session_id}")


def _cmd_health(client: RefineClient, args: argparse.Namespace) -> None:
    health = client.health()
    details = ", ".join(
        f"{name}={value}"
        for name, value in (("model", health.model), ("device", health.device), ("backend", health.backend))
        if value is not None
    )
    print(f"{health.status} ({details})" if details else health.status)


_COMMANDS: dict[str, Callable[[RefineClient, argparse.Namespace], None]] = {
    "adapt": _cmd_adapt,
    "ask": _cmd_ask,
    "sessions": _cmd_sessions,
    "delete": _cmd_delete,
    "health": _cmd_health,
}


def main(argv: Sequence[str] | None = None, *, client_factory: ClientFactory | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 itself on usage errors)."""
    args = build_parser().parse_args(argv)
    factory: ClientFactory = client_factory or (
        lambda base_url, api_key, timeout: RefineClient(base_url=base_url, api_key=api_key, timeout=timeout)
    )
    try:
        with factory(args.base_url, args.api_key, args.timeout) as client:
            _COMMANDS[args.command](client, args)
    except (RefineError, OSError, ValueError) as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
