"""Needle retrieval in long documents: does adapting to a document help the model answer from it?

What is measured: exact match of a fact's value, asked after a long document, for three arms at
the same step budget, learning rate, scope and seed:

* ``none``   -- the base model reads the document (no adaptation);
* ``sft``    -- next-token-prediction test-time training on the document (the paper's baseline);
* ``refine`` -- REFINE test-time training on the document.

How: each document is held-out prose (never seen in training) of 1K-8K tokens with 3-6 facts
("needles": multi-token values, varied wording) at spread-out depths; one of them is asked.
As in the product, the adaptation sees **only the document**: ``adapt`` reads the context, and
the question prompt is appended at generation time from the adapted session state (greedy, stop
at a newline). A completion is correct when ``needles.is_correct`` matches its first line to the
value. Every arm answers the same documents, so arms are compared pairwise (refine - sft with
Newcombe's paired interval and an exact McNemar test). Accuracies carry 95% Wilson intervals.
The mean negative log-likelihood of the gold answer (teacher-forced, nats/token) is reported too:
a smoother signal than exact match on few documents.

Documents are interleaved across lengths, so ``--time-budget-min`` stops with every length
covered in proportion to its planned count; the JSON and the table say when that happened.

``--sweep`` instead runs a small grid of learning rate x steps (x reward) for sft and refine on
a separate *dev* split of documents (same generator, other seeds, so the defaults are not chosen
on the test documents) and writes ``sweep.json``/``sweep.png`` with a recommended setting per
mode: best exact match, then lowest gold-answer NLL, then fewest steps.

    python -m benchmarks.quality                                   # ~40 min on 2 CPU cores
    python -m benchmarks.quality --docs-per-length 60,40,20,10 --time-budget-min 60
    python -m benchmarks.quality --sweep                           # ~20 min
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import arms  # noqa: E402
from benchmarks import common as bc  # noqa: E402

DEFAULT_LENGTHS = "1024,2048,4096,8192"
DEFAULT_DOCS = "40,30,16,8"
SWEEP_LENGTHS = "1024,2048"
SWEEP_DOCS = "6,2"
NEEDLES = (3, 6)  # facts per document (1 asked + 2..5 distractors), uniform
MAX_NEW_TOKENS = 24  # values are at most ~12 tokens


@dataclass(frozen=True)
class NeedleTask:
    """One retrieval task. context_ids: the document as adapted to (BOS first); prompt_ids: the
    question appended at generation time; answer_ids: the gold completion's tokens (" " + value)."""

    length: int
    index: int
    context_ids: list[int]
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    question: str
    depth: float
    n_needles: int


# --- documents --------------------------------------------------------------------------------

def van_der_corput(i: int) -> float:
    """i-th point (i >= 1) of the base-2 van der Corput sequence: 0.5, 0.25, 0.75, 0.125, ...
    Any prefix of it is spread over [0, 1], so a run cut short still covers all depths."""
    x, denom = 0.0, 1.0
    while i:
        i, bit = divmod(i, 2)
        denom *= 2
        x += bit / denom
    return x


def make_document(tok, texts: list[str], length: int, index: int, count: int, seed: int, split: str) -> NeedleTask:
    """The index-th of ``count`` documents of ``length`` tokens (context + question, no BOS)."""
    from refine_tta.train.needles import filler_window, make_needle_document

    rng = random.Random(f"quality:{split}:{seed}:{length}:{index}")
    n_needles = rng.randint(*NEEDLES)
    depth = min(1.0, max(0.0, van_der_corput(index + 1) + rng.uniform(-0.5, 0.5) / count))
    doc = make_needle_document(rng, filler_window(rng, texts, length * 6), n_needles=n_needles, depth=depth,
                               target_tokens=length,
                               count_tokens=lambda s: len(tok.encode(s, add_special_tokens=False)))
    prompt_text = doc.text[len(doc.context):]
    prompt_ids = tok.encode(prompt_text, add_special_tokens=False)
    answer_ids = arms.completion_ids(tok, prompt_text, doc.completion, prompt_ids)
    return NeedleTask(length, index, tok.encode(doc.context), prompt_ids, answer_ids, doc.answer, doc.question,
                   round(doc.depth, 4), n_needles)


def interleaved_plan(lengths: list[int], counts: list[int]) -> list[tuple[int, int, int]]:
    """(length, index, count) for every planned document, ordered so that any prefix holds about
    the same fraction of each length's documents (shorter lengths first on ties)."""
    plan = [(length, i, n) for length, n in zip(lengths, counts) for i in range(n)]
    return sorted(plan, key=lambda p: ((p[1] + 0.5) / p[2], p[0]))


# --- one arm on one document ------------------------------------------------------------------

def evaluate(loaded, doc: NeedleTask, cfg) -> dict:
    """Adapt to the document alone, answer its question from the state (stop at a newline), score it."""
    from refine_tta.train.needles import is_correct

    return arms.evaluate(loaded, doc.context_ids, doc.prompt_ids, doc.answer_ids, cfg, MAX_NEW_TOKENS, ("\n",),
                         lambda text: is_correct(text, doc.answer))


def doc_record(doc: NeedleTask) -> dict:
    return {"group": doc.length, "length": doc.length, "index": doc.index, "document_tokens": len(doc.context_ids),
            "question": doc.question, "answer": doc.answer, "depth": doc.depth, "n_needles": doc.n_needles}


# --- the two modes ----------------------------------------------------------------------------

def quality_tables(summary: dict, modes: list[str], planned: dict[int, int]) -> list[dict]:
    return arms.accuracy_tables(summary, modes, planned, "Needle retrieval: exact match of the value",
                                "length (tokens)")


def resummarize(path: Path) -> dict:
    """Recompute the summary and tables of a saved quality run from its per-document records."""
    result = json.loads(path.read_text())
    planned = {int(k): v for k, v in result["docs_planned"].items()}
    result["summary"] = arms.summarize(result["documents"], result["arms"], result["lengths"])
    result["tables"] = quality_tables(result["summary"], result["arms"], planned)
    return result


def run_quality(args, loaded, texts) -> dict:
    lengths = bc.int_list(args.lengths or DEFAULT_LENGTHS)
    counts = bc.per_item_counts(args.docs_per_length or DEFAULT_DOCS, lengths, "--docs-per-length")
    modes = bc.str_list(args.arms)
    configs = {mode: arms.arm_config(args, mode) for mode in modes}
    plan = interleaved_plan(lengths, counts)
    budget = bc.Budget(args.time_budget_min)
    records = []
    for n_done, (length, index, count) in enumerate(plan):
        if budget.exhausted():
            break
        doc = make_document(loaded.tokenizer, texts, length, index, count, args.seed, "test")
        t = time.perf_counter()
        rec = doc_record(doc)
        rec["arms"] = {mode: evaluate(loaded, doc, configs[mode]) for mode in modes}
        records.append(rec)
        marks = " ".join(f"{a} {'ok' if r['correct'] else '--'}" for a, r in rec["arms"].items())
        print(f"[{n_done + 1}/{len(plan)}] {length} tokens #{index}: {marks}  "
              f"({time.perf_counter() - t:.1f} s, {budget.elapsed / 60:.1f} min)", file=sys.stderr, flush=True)
    planned = dict(zip(lengths, counts))
    summary = arms.summarize(records, modes, lengths)
    result = bc.new_result("quality", args.device, command=args.command)
    result.update(
        model=bc.model_info(loaded, args.model), arms=modes, configs={a: c.to_dict() for a, c in configs.items()},
        lengths=lengths, docs_planned=planned, docs_done={L: sum(r["length"] == L for r in records) for L in lengths},
        needles_per_document=list(NEEDLES), max_new_tokens=MAX_NEW_TOKENS, seed=args.seed,
        time_budget_min=args.time_budget_min, budget_exhausted=len(records) < len(plan),
        summary=summary, documents=records)
    result["tables"] = quality_tables(summary, modes, planned)
    if result["budget_exhausted"]:
        result["notes"].append(f"time budget of {args.time_budget_min} min reached: {len(records)} of {len(plan)} "
                               f"planned documents were run (interleaved, so every length is cut alike)")
    if summary:
        result["plot"] = bc.plot_path(args.out).name
        cfg = configs.get("refine") or configs.get("sft") or next(iter(configs.values()))
        arms.plot_accuracy(summary, modes, bc.plot_path(args.out),
                           f"{loaded.name}: needle retrieval after adaptation (steps {cfg.steps}, lr {cfg.lr:g}, "
                           f"scope {cfg.scope})", "document length (tokens)")
    return result


def sweep_grid(args) -> list[dict]:
    """The adapted configurations of the sweep, cheapest first within each mode."""
    grid = []
    for mode in bc.str_list(args.sweep_modes):
        rewards = bc.str_list(args.sweep_rewards) if mode == "refine" else [None]
        for reward in rewards:
            for lr in bc.float_list(args.sweep_lrs):
                for steps in bc.int_list(args.sweep_steps):
                    extra = {"lr": lr, "steps": steps} | ({"reward": reward} if reward else {})
                    grid.append({"mode": mode, **extra})
    return grid


def config_label(c: dict) -> str:
    return f"{c['mode']}" + (f"/{c['reward']}" if c.get("reward") else "") + f" lr={c['lr']:g} steps={c['steps']}"


def summarize_sweep(records: list[dict], labels: list[str]) -> dict:
    from statistics import fmean

    out = {}
    for label in labels:
        rs = [r["runs"][label] for r in records]
        k = sum(r["correct"] for r in rs)
        lo, hi = bc.wilson_interval(k, len(rs))
        out[label] = {"n": len(rs), "correct": k, "accuracy": k / len(rs) if rs else 0.0, "lo": lo, "hi": hi,
                      "answer_nll": fmean(r["answer_nll"] for r in rs), "ntp_after": fmean(r["ntp_after"] for r in rs),
                      "seconds_adapt": fmean(r["seconds_adapt"] for r in rs)}
    return out


def recommend(summary: dict, grid: list[dict]) -> dict:
    """Per mode: the configuration with the best accuracy, then the lowest answer NLL, then the fewest steps."""
    best = {}
    for c in grid:
        s = summary[config_label(c)]
        key = (-s["accuracy"], s["answer_nll"], c["steps"])
        if c["mode"] not in best or key < best[c["mode"]][0]:
            best[c["mode"]] = (key, c)
    out = {}
    for mode, (_, c) in best.items():
        s = summary[config_label(c)]
        out[mode] = {**c, "label": config_label(c), "accuracy": s["accuracy"], "answer_nll": s["answer_nll"]}
    return out


def plot_sweep(summary: dict, grid: list[dict], path: Path, title: str) -> None:
    plt = bc.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for c in grid:
        name = f"{c['mode']}" + (f"/{c['reward']}" if c.get("reward") else "") + f", {c['steps']} steps"
        series.setdefault(name, []).append((c["lr"], summary[config_label(c)]["answer_nll"]))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if name.startswith("sft") else "-",
                label=name)
    if "none" in summary:
        ax.axhline(summary["none"]["answer_nll"], color="grey", linestyle=":", label="none")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("gold answer NLL (nats/token, lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(args, loaded, texts) -> dict:
    lengths = bc.int_list(args.lengths or SWEEP_LENGTHS)
    counts = bc.per_item_counts(args.docs_per_length or SWEEP_DOCS, lengths, "--docs-per-length")
    grid = sweep_grid(args)
    configs = {"none": arms.arm_config(args, "none")} | {
        config_label(c): arms.arm_config(args, c["mode"], **{k: v for k, v in c.items() if k != "mode"}) for c in grid}
    plan = interleaved_plan(lengths, counts)
    budget = bc.Budget(args.time_budget_min)
    records = []
    for n_done, (length, index, count) in enumerate(plan):
        if budget.exhausted():
            break
        doc = make_document(loaded.tokenizer, texts, length, index, count, args.seed, "dev")
        rec = doc_record(doc)
        rec["runs"] = {}
        for label, cfg in configs.items():
            rec["runs"][label] = evaluate(loaded, doc, cfg)
            print(f"[doc {n_done + 1}/{len(plan)}] {length} tokens #{index} {label}: "
                  f"{'ok' if rec['runs'][label]['correct'] else '--'} nll {rec['runs'][label]['answer_nll']:.3f} "
                  f"({budget.elapsed / 60:.1f} min)", file=sys.stderr, flush=True)
        records.append(rec)
    result = bc.new_result("sweep", args.device, command=args.command)
    summary = summarize_sweep(records, list(configs)) if records else {}
    rec_defaults = recommend(summary, grid) if records else {}
    result.update(model=bc.model_info(loaded, args.model), split="dev", lengths=lengths,
                  docs_planned=dict(zip(lengths, counts)), docs_done=len(records), grid=grid,
                  base_config=arms.arm_config(args, "refine").to_dict(), seed=args.seed,
                  time_budget_min=args.time_budget_min, budget_exhausted=len(records) < len(plan),
                  summary=summary, recommended=rec_defaults, documents=records)
    rows = [[label, f"{bc.fmt_pct(s['accuracy'])} {bc.fmt_ci(s['lo'], s['hi'])}", f"{s['answer_nll']:.3f}",
             f"{s['ntp_after']:.3f}", f"{s['seconds_adapt']:.1f}"] for label, s in summary.items()]
    result["tables"] = [bc.table(f"Sweep on {len(records)} dev documents ({', '.join(map(str, lengths))} tokens)",
                                 ["configuration", "exact match % [95% CI]", "answer NLL", "NTP after", "adapt s"],
                                 rows)]
    for mode, r in rec_defaults.items():
        result["notes"].append(f"recommended {mode}: {r['label']} (accuracy {bc.fmt_pct(r['accuracy'])}%, "
                               f"answer NLL {r['answer_nll']:.3f})")
    if result["budget_exhausted"]:
        result["notes"].append(f"time budget of {args.time_budget_min} min reached after {len(records)} of "
                               f"{len(plan)} documents")
    if records:
        result["plot"] = bc.plot_path(args.out).name
        plot_sweep(summary, grid, bc.plot_path(args.out), f"{loaded.name}: sweep on {len(records)} dev documents")
    return result


# --- command line -----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = bc.arg_parser("python -m benchmarks.quality", __doc__)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default=None, help=f"document lengths in tokens (default {DEFAULT_LENGTHS}; "
                                                   f"sweep {SWEEP_LENGTHS})")
    p.add_argument("--docs-per-length", default=None,
                   help=f"one count, or one per length (default {DEFAULT_DOCS}; sweep {SWEEP_DOCS})")
    arms.add_arm_options(p)
    p.add_argument("--time-budget-min", type=float, default=40.0,
                   help="stop starting new documents after this many minutes (0 or negative: no limit)")
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default benchmarks/results/quality.json, or sweep.json); the PNG goes beside it")
    p.add_argument("--sweep", action="store_true", help="sweep lr x steps (x reward) on dev documents instead")
    p.add_argument("--sweep-modes", default="sft,refine")
    p.add_argument("--sweep-lrs", default="3e-5,1e-4,3e-4,1e-3")
    p.add_argument("--sweep-steps", default="2,4,8")
    p.add_argument("--sweep-rewards", default="binary", help="rewards tried for refine, e.g. binary,hybrid")
    p.add_argument("--resummarize", action="store_true",
                   help="recompute the summary and tables of the saved --out file from its records (no model run)")
    args = p.parse_args(argv)
    args.command = bc.command_line("python -m benchmarks.quality", argv)
    args.set = arms.parse_set(args.set)
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        args.time_budget_min = None
    if args.out is None:
        args.out = bc.RESULTS_DIR / ("sweep.json" if args.sweep else "quality.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.resummarize:
        result = resummarize(args.out)
        bc.print_result(result)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    bc.quiet_logs()
    t0 = time.perf_counter()
    loaded = bc.load(args.model, args.device)
    texts = bc.heldout_texts()
    result = run_sweep(args, loaded, texts) if args.sweep else run_quality(args, loaded, texts)
    bc.print_result(result)
    bc.write_result(result, args.out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
