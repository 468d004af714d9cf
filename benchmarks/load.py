"""Concurrent clients against the HTTP server on loopback: throughput, latency percentiles, errors.

What is measured: for each client count N (default 1, 4, 16, 32), N clients start together;
each adapts to its own ~512-token document of held-out prose (``POST /v1/adapt``, mode refine,
``--steps`` steps), asks ``--generates`` questions from that session (``POST /v1/generate``,
greedy, ``--max-tokens`` tokens) and deletes it. Reported per N: wall time, requests/s and
adapts/s over that wall time, p50/p90/p99 latency per request kind (client-side, end to end,
including any waits after a 429), errors (anything but a 2xx, and transport failures: must be 0),
and 429 answers, retried after ``Retry-After`` and counted apart.

How: the server is started as a subprocess (``python -m server.cli serve`` on a free loopback
port, a temporary state directory, ``--queue-size`` at least 2x the largest N so that N clients
fit in the queue) unless ``--url`` points at a running one. Requests go through ``httpx``
directly, so the figures are the server's, not the SDK's retry policy. One warm-up client runs
first. ``--max-seconds`` bounds the whole run: a level that would start past it is skipped and
unfinished clients are cancelled, and the JSON/table say so. Only loopback addresses are used.

``--replicas 2`` starts ``refine-tta serve --replicas 2`` instead (two replicas under Ray Serve,
one CPU thread each, session-affine routing; docs/ray.md); its wait for health includes Ray's
start. Its queue size is per replica.

    python -m benchmarks.load                  # ~4 min on 2 CPU cores with the default model
    python -m benchmarks.load --replicas 2 --out benchmarks/results/load_2_replicas.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bc  # noqa: E402

QUESTION = "\n\nQuestion: What is the main topic of the text above? Answer:"
KINDS = ("adapt", "generate", "delete")


@dataclass
class LevelStats:
    """What one level's clients saw. latencies: kind -> seconds of each successful request."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    rate_limited: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    error_samples: list[str] = field(default_factory=list)
    clients_finished: int = 0
    document_tokens: list[int] = field(default_factory=list)


# --- the server ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, device: str, queue_size: int, state_dir: Path,
                 log_path: Path, replicas: int = 1) -> tuple[subprocess.Popen, str]:
    """``python -m server.cli serve`` on a free loopback port; returns the process and its base URL.
    ``replicas`` > 1: that many replicas under Ray Serve (one CPU thread each)."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--state-dir", str(state_dir), "--queue-size", str(queue_size), "--device", device,
           "--log-level", "warning", "--replicas", str(replicas)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=bc.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float, log_path: Path | None) -> dict:
    """Poll GET /health until 200; fail with the server's log if it exits or takes too long."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path else ""
            raise SystemExit(f"the server exited with code {proc.returncode} before becoming healthy:\n{tail}")
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not healthy after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server we started (graceful shutdown), SIGKILL it if it does not exit."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# --- the clients --------------------------------------------------------------------------------

async def call(http, method: str, path: str, body: dict | None, kind: str, stats: LevelStats,
               deadline: float) -> dict | None:
    """One request, retried after 429 (``Retry-After``) until the deadline. Records its latency
    (first attempt to success) or its error; returns the JSON body or None."""
    import httpx

    t0 = time.monotonic()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.CancelledError
        try:
            r = await http.request(method, path, json=body, timeout=remaining)
        except httpx.TransportError as exc:
            if time.monotonic() >= deadline:  # cut off by --max-seconds: unfinished, not an error
                raise asyncio.CancelledError from exc
            stats.errors[kind] += 1
            stats.error_samples.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
            return None
        if r.status_code == 429:
            stats.rate_limited[kind] += 1
            await asyncio.sleep(min(float(r.headers.get("retry-after", "0.5")), max(0.0, remaining)))
            continue
        if r.status_code >= 300:
            stats.errors[kind] += 1
            stats.error_samples.append(f"{kind}: HTTP {r.status_code}: {r.text[:300]}")
            return None
        stats.latencies[kind].append(time.monotonic() - t0)
        return r.json() if r.content else {}


async def client(url: str, document: str, args, stats: LevelStats, deadline: float, seed: int) -> None:
    """Adapt, ask ``args.generates`` questions, delete the session."""
    import httpx

    async with httpx.AsyncClient(base_url=url) as http:
        settings = {"mode": args.mode, "steps": args.steps, "seed": seed}
        session = await call(http, "POST", "/v1/adapt", {"document": document, "settings": settings}, "adapt",
                             stats, deadline)
        if session is None:
            return
        stats.document_tokens.append(session.get("document_tokens", 0))
        sid = session["session_id"]
        for j in range(args.generates):
            body = {"session_id": sid, "prompt": QUESTION, "max_tokens": args.max_tokens, "temperature": 0.0,
                    "seed": j, "stop": ["\n"]}
            await call(http, "POST", "/v1/generate", body, "generate", stats, deadline)
        await call(http, "DELETE", f"/v1/sessions/{sid}", None, "delete", stats, deadline)
    stats.clients_finished += 1


async def run_level(url: str, documents: list[str], n: int, args, deadline: float) -> tuple[LevelStats, float]:
    """n clients at once; returns their stats and the wall time until the last one finished."""
    stats = LevelStats()
    t0 = time.monotonic()
    tasks = [asyncio.create_task(client(url, documents[i % len(documents)], args, stats, deadline, seed=i))
             for i in range(n)]
    await asyncio.gather(*tasks, return_exceptions=True)  # a task past the deadline ends cancelled
    return stats, time.monotonic() - t0


def make_documents(model: str, n: int, n_tokens: int) -> list[str]:
    """n distinct windows of held-out prose of about n_tokens tokens each (text, no BOS)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(model)
    texts = bc.heldout_texts()
    return [tok.decode(bc.prose_ids(tok, texts, n_tokens + 1, seed=f"load:{i}")[1:]) for i in range(n)]


# --- report -------------------------------------------------------------------------------------

def level_summary(n: int, stats: LevelStats, wall: float, skipped: bool = False) -> dict:
    ok = {k: len(v) for k, v in stats.latencies.items()}
    pct = {k: {f"p{q}": bc.percentile(v, q) for q in (50, 90, 99)} for k, v in stats.latencies.items()}
    return {"clients": n, "skipped": skipped, "wall_s": wall, "clients_finished": stats.clients_finished,
            "requests_ok": ok, "requests_per_s": sum(ok.values()) / wall if wall > 0 else 0.0,
            "adapts_per_s": ok["adapt"] / wall if wall > 0 else 0.0, "latency_s": pct,
            "errors": stats.errors, "rate_limited_retried": stats.rate_limited,
            "error_samples": stats.error_samples[:5],
            "document_tokens_median": bc.median(stats.document_tokens) if stats.document_tokens else 0}


def load_table(levels: list[dict], replicas: int = 1) -> dict:
    def lat(level, kind):
        p = level["latency_s"][kind]
        return "-" if p["p50"] != p["p50"] else f"{p['p50']:.2f} / {p['p90']:.2f} / {p['p99']:.2f}"

    rows = []
    for lv in levels:
        if lv["skipped"]:
            rows.append([str(lv["clients"]), "skipped (--max-seconds)"] + [""] * 7)
            continue
        rows.append([str(lv["clients"]), f"{lv['wall_s']:.1f}", f"{lv['clients_finished']}/{lv['clients']}",
                     f"{lv['requests_per_s']:.2f}", f"{lv['adapts_per_s']:.2f}", lat(lv, "adapt"), lat(lv, "generate"),
                     str(sum(lv["errors"].values())), str(sum(lv["rate_limited_retried"].values()))])
    cols = ["clients", "wall s", "finished", "requests/s", "adapts/s", "adapt s p50 / p90 / p99",
            "generate s p50 / p90 / p99", "errors", "429s (retried)"]
    where = f" ({replicas} replicas, Ray Serve)" if replicas > 1 else ""
    return bc.table(f"Concurrent clients{where}: adapt + generates + delete each", cols, rows)


def plot(levels: list[dict], path: Path, title: str) -> None:
    plt = bc.pyplot()
    done = [lv for lv in levels if not lv["skipped"]]
    xs = [lv["clients"] for lv in done]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(xs, [lv["requests_per_s"] for lv in done], marker="o", label="requests/s")
    ax1.plot(xs, [lv["adapts_per_s"] for lv in done], marker="s", label="adapts/s")
    ax1.set_ylabel("throughput (1/s)")
    for kind, style in (("adapt", "-"), ("generate", "--")):
        for q, marker in (("p50", "o"), ("p99", "^")):
            ax2.plot(xs, [lv["latency_s"][kind][q] for lv in done], linestyle=style, marker=marker, label=f"{kind} {q}")
    ax2.set_ylabel("latency (s)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------

async def run_levels(url: str, documents: list[str], args, t_start: float) -> list[dict]:
    deadline = t_start + args.max_seconds
    warm = LevelStats()
    await client(url, documents[0], args, warm, deadline, seed=10_000)  # warm-up, not reported
    levels = []
    for n in bc.int_list(args.clients):
        if time.monotonic() >= deadline:
            levels.append(level_summary(n, LevelStats(), 0.0, skipped=True))
            continue
        stats, wall = await run_level(url, documents, n, args, deadline)
        levels.append(level_summary(n, stats, wall))
        lv = levels[-1]
        print(f"{n} clients: {lv['wall_s']:.1f} s, {lv['requests_per_s']:.2f} req/s, "
              f"errors {sum(lv['errors'].values())}, 429s {sum(lv['rate_limited_retried'].values())}",
              file=sys.stderr, flush=True)
    return levels


def parse_args(argv=None) -> argparse.Namespace:
    p = bc.arg_parser("python -m benchmarks.load", __doc__)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--url", default=None, help="use the server already running there (loopback only)")
    p.add_argument("--replicas", type=int, default=1,
                   help="replicas of the server started here (> 1: under Ray Serve, one thread each; docs/ray.md)")
    p.add_argument("--clients", default="1,4,16,32", help="client counts, one level each")
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--mode", default="refine", choices=["refine", "sft", "none"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--generates", type=int, default=3, help="questions per client")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    p.add_argument("--queue-size", type=int, default=None, help="server queue (default: 2 x the largest client count)")
    p.add_argument("--max-seconds", type=float, default=900, help="bound on the whole run (after the server is up)")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--out", type=Path, default=bc.RESULTS_DIR / "load.json")
    args = p.parse_args(argv)
    args.command = bc.command_line("python -m benchmarks.load", argv)
    if args.url and not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("--url must be a loopback address (127.0.0.0/8, localhost or [::1])")
    return args


def main(argv=None) -> int:
    from refine_tta.defaults import default_model_path

    args = parse_args(argv)
    bc.quiet_logs()
    t0 = time.perf_counter()
    model = args.model or default_model_path()
    queue_size = args.queue_size or 2 * max(bc.int_list(args.clients))
    documents = make_documents(model, max(bc.int_list(args.clients)), args.doc_tokens)
    with tempfile.TemporaryDirectory(prefix="refine-load-") as tmp:
        proc, log_path = None, Path(tmp) / "server.log"
        url = args.url
        if url is None:
            proc, url = start_server(model, args.device, queue_size, Path(tmp) / "state", log_path, args.replicas)
        try:
            t = time.monotonic()
            health = wait_healthy(url, proc, args.startup_timeout, log_path if proc else None)
            startup_s = time.monotonic() - t
            print(f"server {url} healthy after {startup_s:.1f} s: {health}", file=sys.stderr)
            levels = asyncio.run(run_levels(url, documents, args, time.monotonic()))
        finally:
            if proc is not None:
                stop_server(proc)
    result = bc.new_result("load", args.device, command=args.command)
    result.update(server={"url": url if args.url else "subprocess on 127.0.0.1", "health": health,
                          "queue_size": None if args.url else queue_size, "startup_s": startup_s,
                          "replicas": None if args.url else args.replicas},
                  workload={"doc_tokens": args.doc_tokens, "mode": args.mode, "steps": args.steps,
                            "generates": args.generates, "max_tokens": args.max_tokens},
                  max_seconds=args.max_seconds, levels=levels,
                  tables=[load_table(levels, 1 if args.url else args.replicas)],
                  plot=bc.plot_path(args.out).name)
    if any(lv["skipped"] or lv["clients_finished"] < lv["clients"] for lv in levels):
        result["notes"].append(f"--max-seconds {args.max_seconds:g} reached: some clients or levels did not run")
    n_err = sum(sum(lv["errors"].values()) for lv in levels)
    if n_err:
        result["notes"].append(f"{n_err} requests failed: " + "; ".join(
            s for lv in levels for s in lv["error_samples"])[:600])
    replicas = f", {args.replicas} replicas" if args.replicas > 1 and not args.url else ""
    plot(levels, bc.plot_path(args.out), f"{health.get('model')} on {health.get('device')}{replicas}: "
                                         f"{args.doc_tokens}-token documents, {args.steps} {args.mode} steps")
    bc.print_result(result)
    bc.write_result(result, args.out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
