"""Answer latency after a long document: from the saved state vs re-reading the document per query.

What is measured, per document length (512 to 8K tokens of held-out prose):

* (a) **state** -- the product's path: the document is read once into a ``DocumentState``
  (``read_document``, timed separately as "read once"), then each query is answered from that
  state: ``generate_text(model, state, prompt_ids, ...)``;
* (b) **re-read** -- what a model without saved state does: every query re-reads the document
  with the prompt, ``generate_text(model, DocumentState.empty(), document_ids + prompt_ids, ...)``.

Both go through ``refine_tta.engine.text.generate_text``, greedy, ``--max-new-tokens`` tokens without
stopping early. Time to first token (TTFT) is from the call to the first sampled token (reading
the prompt, plus the document for (b)); decode speed is tokens/s after the first token. Each
figure is the median of ``--reps`` repetitions after one warm-up. The table also checks that
both paths give the same greedy completion and shows the state's size, which does not grow with
the document.

    python -m benchmarks.latency                  # ~1-2 min on 2 CPU cores with the default model
    python -m benchmarks.latency --model benchmarks/configs/lact-small --tokenizer models/refine-tiny-deltanet \
        --lengths 1024,4096,8192                  # the small LaCT configuration (random weights)

``--model`` may be a directory with only a config.json (any supported model type): the model is
then initialised at random (timing depends on the shapes, not the weights), with the tokenizer
from ``--tokenizer``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bc  # noqa: E402

PROMPT = "\n\nQuestion: What is the access code for the north gate? Answer:"


def time_state_path(model, doc_ids, prompt_ids, sampling, codec) -> dict:
    """(a): read the document once, then answer from the state."""
    import torch

    from refine_tta.engine.text import generate_text
    from refine_tta.model import read_document

    device = next(model.parameters()).device
    t = time.perf_counter()
    state = read_document(model, torch.tensor([doc_ids], device=device))
    read_s = time.perf_counter() - t
    g = generate_text(model, state, prompt_ids, sampling, codec)
    return {"read_s": read_s, "ttft_s": g.ttft_s, "tokens_per_s": g.tokens_per_s, "text": g.text,
            "state_bytes": state.nbytes, "n_generated": len(g.tokens)}


def time_reread_path(model, doc_ids, prompt_ids, sampling, codec) -> dict:
    """(b): read document + prompt from nothing for the query."""
    from refine_tta.engine.text import generate_text
    from refine_tta.model import DocumentState

    g = generate_text(model, DocumentState.empty(), doc_ids + prompt_ids, sampling, codec)
    return {"ttft_s": g.ttft_s, "tokens_per_s": g.tokens_per_s, "text": g.text, "n_generated": len(g.tokens)}


def measure_length(model, tok, texts, length: int, reps: int, max_new_tokens: int) -> dict:
    from refine_tta.engine.text import SamplingConfig, TextCodec

    doc_ids = bc.prose_ids(tok, texts, length, seed=f"latency:{length}")
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_at_eos=False)
    args = (model, doc_ids, prompt_ids, sampling, TextCodec(tok))
    time_state_path(*args)  # warm-up (allocator, first-call overheads)
    state_runs = [time_state_path(*args) for _ in range(reps)]
    reread_runs = [time_reread_path(*args) for _ in range(reps)]
    med = lambda runs, key: bc.median([r[key] for r in runs])  # noqa: E731
    return {
        "length": length, "document_tokens": len(doc_ids), "prompt_tokens": len(prompt_ids), "reps": reps,
        "state": {"read_s": med(state_runs, "read_s"), "ttft_s": med(state_runs, "ttft_s"),
                  "tokens_per_s": med(state_runs, "tokens_per_s"), "state_bytes": state_runs[0]["state_bytes"]},
        "reread": {"ttft_s": med(reread_runs, "ttft_s"), "tokens_per_s": med(reread_runs, "tokens_per_s")},
        "same_completion": state_runs[0]["text"] == reread_runs[0]["text"],
        "runs": {"state": [{k: v for k, v in r.items() if k != "text"} for r in state_runs],
                 "reread": [{k: v for k, v in r.items() if k != "text"} for r in reread_runs]},
    }


def latency_table(rows: list[dict], max_new_tokens: int) -> dict:
    out = []
    for r in rows:
        s, b = r["state"], r["reread"]
        out.append([str(r["length"]), f"{s['read_s'] * 1000:.0f}", f"{s['ttft_s'] * 1000:.1f}",
                    f"{b['ttft_s'] * 1000:.1f}", f"{b['ttft_s'] / s['ttft_s']:.0f}x", f"{s['tokens_per_s']:.0f}",
                    f"{b['tokens_per_s']:.0f}", f"{s['state_bytes'] / 1024:.0f}",
                    "yes" if r["same_completion"] else "NO"])
    cols = ["document tokens", "read once (ms)", "TTFT from state (ms)", "TTFT re-reading (ms)", "TTFT ratio",
            "decode tok/s (state)", "decode tok/s (re-read)", "state KiB", "same completion"]
    return bc.table(f"Time to first token and decode speed ({max_new_tokens} new tokens, median of reps)", cols, out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = bc.pyplot()
    xs = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [1000 * r["state"]["ttft_s"] for r in rows], marker="o", label="(a) from the saved state")
    ax.plot(xs, [1000 * r["reread"]["ttft_s"] for r in rows], marker="s", label="(b) re-reading the document")
    ax.plot(xs, [1000 * r["state"]["read_s"] for r in rows], linestyle=":", color="grey",
            label="reading the document once (a, not per query)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x // 1024}K" if x % 1024 == 0 else str(x) for x in xs])
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("time to first token (ms, median)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = bc.arg_parser("python -m benchmarks.latency", __doc__)
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (default: the embedded model); config.json only = random weights")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory when --model has none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192", help="document lengths in tokens")
    p.add_argument("--reps", type=int, default=3, help="repetitions per length (median reported)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=bc.RESULTS_DIR / "latency.json")
    args = p.parse_args(argv)
    args.command = bc.command_line("python -m benchmarks.latency", argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bc.quiet_logs()
    t0 = time.perf_counter()
    from refine_tta.defaults import default_model_path

    model, tok, info, note = bc.load_or_init(args.model or Path(default_model_path()), args.device, args.tokenizer)
    if tok is None:
        raise SystemExit(f"no tokenizer in {args.model}; pass --tokenizer DIR")
    texts = bc.heldout_texts()
    rows = []
    for length in bc.int_list(args.lengths):
        rows.append(measure_length(model, tok, texts, length, args.reps, args.max_new_tokens))
        r = rows[-1]
        print(f"{length} tokens: TTFT state {r['state']['ttft_s'] * 1000:.1f} ms, re-read "
              f"{r['reread']['ttft_s'] * 1000:.1f} ms", file=sys.stderr, flush=True)
    result = bc.new_result("latency", args.device, command=args.command)
    if note:
        result["notes"].append(note)
    result.update(model=info, prompt=PROMPT, max_new_tokens=args.max_new_tokens,
                  reps=args.reps, rows=rows, tables=[latency_table(rows, args.max_new_tokens)],
                  plot=bc.plot_path(args.out).name)
    if not all(r["same_completion"] for r in rows):
        result["notes"].append("the two paths gave different greedy completions at some length (numerical "
                               "differences between chunked and step-wise reading can flip a near-tie)")
    name = Path(info["path"]).name + ("" if info["weights"] == "trained" else " (random weights)")
    plot(rows, bc.plot_path(args.out), f"{name} on {args.device}: answering after a document")
    bc.print_result(result)
    bc.write_result(result, args.out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
