"""Decode throughput with many sessions at once: batched (continuous batching) vs one at a time.

For each number of concurrent sessions N (default 1, 4, 16, 32) on the embedded model: N
sessions, each with its own document state (held-out prose of different lengths, read before the
clock starts), its own prompt (different lengths) and its own seed (half greedy, half sampled at
temperature 0.8), each asking for ``--max-new-tokens`` tokens without stopping early.

* **one at a time** -- what a worker that serialises requests does: each session decoded alone
  (``generate_tokens``, a batch of one), one after the other;
* **batched** -- all N in one ``BatchDecoder``: prompts prefilled together where their lengths
  match, then one forward per token for all of them.

Throughput is generated tokens per second, all sessions together, from the first prefill to the
last token (the median of ``--reps`` runs after a warm-up, the two ways interleaved so that both see
the same load on a shared machine). Speed-up is batched over one at a time at the same N (one at a
time runs at the single-stream speed), and over the single-stream figure measured at N = 1. The ``same tokens`` column checks
that every session got exactly the tokens it gets alone.

    python -m benchmarks.decode_batch          # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bc  # noqa: E402

PROMPTS = ["\n\nQuestion: What happened next? Answer:", " In short,", "\n\nSummary:", " The keeper",
           "\n\nQuestion: Who wrote the ledger and why? Answer:"]


def make_sessions(loaded, texts: list[str], n: int, doc_tokens: int, max_new_tokens: int) -> list[tuple]:
    """n (key, state, prompt_ids, sampling) with different documents, prompts and seeds."""
    import torch

    from refine_tta.model import TokenSampling, read_document

    tok = loaded.tokenizer
    sessions = []
    for i in range(n):
        length = doc_tokens + 17 * (i % 8)
        ids = bc.prose_ids(tok, texts, length, seed=f"decode_batch:{i}")
        state = read_document(loaded.model, torch.tensor([ids], device=loaded.device))
        prompt = tok.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)
        sampling = TokenSampling(max_new_tokens, temperature=0.0 if i % 2 == 0 else 0.8, seed=1000 + i)
        sessions.append((f"s{i}", state, prompt, sampling))
    return sessions


def run_alone(model, sessions) -> tuple[float, dict]:
    """Every session decoded alone, one after the other. Returns (seconds, key -> tokens)."""
    from refine_tta.model import generate_tokens

    t = time.perf_counter()
    out = {key: generate_tokens(model, state, prompt, sampling).tokens for key, state, prompt, sampling in sessions}
    return time.perf_counter() - t, out


def run_batched(model, sessions) -> tuple[float, dict, int]:
    """All sessions in one BatchDecoder. Returns (seconds, key -> tokens, decode steps)."""
    from refine_tta.model import BatchDecoder

    t = time.perf_counter()
    decoder = BatchDecoder(model)
    seqs = decoder.add_many([(key, state, prompt, sampling, None) for key, state, prompt, sampling in sessions])
    steps = 0
    while len(decoder):
        decoder.step()
        steps += 1
    return time.perf_counter() - t, {s.key: s.tokens for s in seqs}, steps


def measure(loaded, texts, n: int, args) -> dict:
    sessions = make_sessions(loaded, texts, n, args.doc_tokens, args.max_new_tokens)
    model = loaded.model
    run_batched(model, sessions[:2])  # warm-up
    alone_runs, batched_runs = [], []
    for _ in range(args.reps):  # interleaved, so both see the same load on a shared machine
        alone_runs.append(run_alone(model, sessions))
        batched_runs.append(run_batched(model, sessions))
    tokens = sum(len(t) for t in alone_runs[0][1].values())
    alone_s = bc.median([r[0] for r in alone_runs])
    batched_s = bc.median([r[0] for r in batched_runs])
    return {"sessions": n, "generated_tokens": tokens, "alone_s": alone_s, "batched_s": batched_s,
            "alone_tokens_per_s": tokens / alone_s, "batched_tokens_per_s": tokens / batched_s,
            "batched_steps": batched_runs[0][2], "same_tokens": batched_runs[0][1] == alone_runs[0][1],
            "runs": {"alone_s": [r[0] for r in alone_runs], "batched_s": [r[0] for r in batched_runs]}}


def throughput_table(rows: list[dict], max_new_tokens: int) -> dict:
    single = rows[0]["alone_tokens_per_s"] if rows[0]["sessions"] == 1 else None
    out = []
    for r in rows:
        out.append([str(r["sessions"]), f"{r['alone_tokens_per_s']:.0f}", f"{r['batched_tokens_per_s']:.0f}",
                    f"{r['batched_tokens_per_s'] / r['alone_tokens_per_s']:.1f}x",
                    f"{r['batched_tokens_per_s'] / single:.1f}x" if single else "-",
                    f"{1000 * r['batched_s'] / r['batched_steps']:.1f}", "yes" if r["same_tokens"] else "NO"])
    cols = ["sessions", "one at a time (tok/s)", "batched (tok/s)", "batched / one at a time",
            "batched / single stream", "ms per batched step", "same tokens"]
    return bc.table(f"Decode throughput, all sessions together ({max_new_tokens} new tokens each, median of reps)",
                    cols, out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = bc.pyplot()
    xs = [r["sessions"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["batched_tokens_per_s"] for r in rows], marker="o", label="batched (one forward per token)")
    ax.plot(xs, [r["alone_tokens_per_s"] for r in rows], marker="s", label="one at a time")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("generated tokens / s (all sessions)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = bc.arg_parser("python -m benchmarks.decode_batch", __doc__)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sessions", default="1,4,16,32", help="numbers of concurrent sessions")
    p.add_argument("--doc-tokens", type=int, default=256, help="shortest document (others are a little longer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="repetitions per N (median reported)")
    p.add_argument("--out", type=Path, default=bc.RESULTS_DIR / "decode_batch.json")
    args = p.parse_args(argv)
    args.command = bc.command_line("python -m benchmarks.decode_batch", argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bc.quiet_logs()
    t0 = time.perf_counter()
    loaded = bc.load(args.model, args.device)
    texts = bc.heldout_texts()
    rows = []
    for n in bc.int_list(args.sessions):
        rows.append(measure(loaded, texts, n, args))
        r = rows[-1]
        print(f"{n} sessions: batched {r['batched_tokens_per_s']:.0f} tok/s, one at a time "
              f"{r['alone_tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
    result = bc.new_result("decode_batch", args.device, command=args.command)
    result.update(model=bc.model_info(loaded, args.model), max_new_tokens=args.max_new_tokens,
                  doc_tokens=args.doc_tokens, reps=args.reps, rows=rows,
                  tables=[throughput_table(rows, args.max_new_tokens)], plot=bc.plot_path(args.out).name)
    if not all(r["same_tokens"] for r in rows):
        result["notes"].append("some session got different tokens batched than alone (batched matrix products "
                               "round differently in the last bit; this flips only exact near-ties)")
    plot(rows, bc.plot_path(args.out), f"{loaded.name} on {args.device}: decoding many sessions at once")
    bc.print_result(result)
    bc.write_result(result, args.out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
