"""RULER SQuAD-QA at 4K tokens (the paper's test set): answer a question about 20 passages.

What is measured: accuracy of arms ``none`` / ``sft`` / ``refine`` (same steps, learning rate,
scope and seed) on the first ``--rows`` rows of ``ruler_squadqa_delta_net_4096_200_test.parquet``,
scored as the paper does: the first line of the answer is correct when any gold answer is a
case-insensitive substring of it. Paired differences refine - sft carry Newcombe's interval.

How the prompt is split: every prompt of the set is

    <instruction> The following are given passages.\\nDocument 1: ... Document 20: ...
    \\n\\nAnswer the question based on the given passages. Only give me the answer ...
    \\n\\nQuestion: <question>\\nAnswer:

and the trailing block starting at its last ``"\\n\\nAnswer the question based on the given
passages."`` is the *query*. The adaptation sees the instruction and the passages (the
context) only; the query is read from the adapted session state at generation time, as in the
product. A prompt without that marker is adapted to whole (all but its last token, which is read
at generation time); the JSON counts such rows (``rows_without_split``; none in the shared sets).

Generation is greedy, at most ``2 * max_answer_length + 8`` tokens (the set's answer lengths are
counted in DeltaNet-1.3B's tokenizer; ours uses ~15% more tokens), without stop strings: the
first line is taken after stripping leading newlines. The gold-answer NLL uses the first alias.

Needs ``../shared/data/ruler`` (beside the checkout; never shipped). Cost on 2 CPU cores with the
default model: about 1 min per row for the three arms at 4 steps (~3.5K-token contexts).

    python -m benchmarks.ruler --rows 40 --time-budget-min 40
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import arms  # noqa: E402
from benchmarks import common as bc  # noqa: E402

DEFAULT_DATA = bc.SHARED_DIR / "data" / "ruler" / "ruler_squadqa_delta_net_4096_200_test.parquet"
QUERY_MARKER = "\n\nAnswer the question based on the given passages."


def split_prompt(prompt: str) -> tuple[str, str]:
    """(context, query): the query is the trailing instruction + question + answer cue, or '' if absent."""
    cut = prompt.rfind(QUERY_MARKER)
    if cut <= 0:
        return prompt, ""
    return prompt[:cut], prompt[cut:]


def ruler_correct(completion: str, answers: list[str]) -> bool:
    """The paper's RULER QA metric: first line of the answer contains any gold answer (case-insensitive)."""
    first = completion.lstrip("\n").split("\n", 1)[0].lower()
    return any(a.lower() in first for a in answers)


def load_rows(path: Path, n: int) -> list[dict]:
    """The first n rows as dicts (prompt, answers, max_answer_length, index)."""
    if not path.is_file():
        raise SystemExit(f"RULER data not found at {path}: it lives in ../shared/data/ruler beside the checkout "
                         f"(not shipped with refine-tta); pass --data PATH to a ruler_*.parquet file")
    import pandas as pd

    df = pd.read_parquet(path)
    missing = {"prompt", "answer"} - set(df.columns)
    if missing:
        raise SystemExit(f"{path} lacks columns {sorted(missing)}; is it a RULER test set?")
    rows = []
    for i, r in enumerate(df.head(n).itertuples(index=False)):
        answers = [str(a) for a in (r.answer if not isinstance(r.answer, str) else [r.answer])]
        rows.append({"row": i, "index": int(getattr(r, "index", i)), "prompt": r.prompt, "answers": answers,
                     "max_answer_length": int(getattr(r, "max_answer_length", 16)),
                     "group": int(getattr(r, "max_seq_length", 4096))})
    return rows


def evaluate_row(loaded, row: dict, configs: dict) -> dict:
    tok = loaded.tokenizer
    context, query = split_prompt(row["prompt"])
    context_ids = tok.encode(context)
    prompt_ids = tok.encode(query, add_special_tokens=False) if query else []
    answer_ids = arms.completion_ids(tok, query, " " + row["answers"][0], prompt_ids)
    if not prompt_ids:  # no split: adapt to the whole prompt but its last token, read at generation time
        context_ids, prompt_ids = context_ids[:-1], context_ids[-1:]
    max_new = 2 * row["max_answer_length"] + 8
    rec = {"group": row["group"], "row": row["row"], "index": row["index"], "answers": row["answers"],
           "context_tokens": len(context_ids), "query_tokens": len(prompt_ids), "split": bool(query)}
    rec["arms"] = {mode: arms.evaluate(loaded, context_ids, prompt_ids, answer_ids, cfg, max_new, (),
                                       lambda text: ruler_correct(text, row["answers"]))
                   for mode, cfg in configs.items()}
    return rec


def plot_bars(summary: dict, modes: list[str], path: Path, title: str) -> None:
    plt = bc.pyplot()
    s = summary["all"]["arms"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    acc = [100 * s[m]["accuracy"] for m in modes]
    err = [[a - 100 * s[m]["lo"] for a, m in zip(acc, modes)], [100 * s[m]["hi"] - a for a, m in zip(acc, modes)]]
    ax.bar(modes, acc, yerr=err, capsize=5, color=["tab:blue", "tab:orange", "tab:green"][:len(modes)])
    ax.set_ylabel("accuracy % (95% Wilson CI)")
    ax.set_ylim(0, max(10, max(100 * s[m]["hi"] for m in modes) + 5))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args, loaded) -> dict:
    rows = load_rows(args.data, args.rows)
    modes = bc.str_list(args.arms)
    configs = {mode: arms.arm_config(args, mode) for mode in modes}
    budget = bc.Budget(args.time_budget_min)
    records = []
    for row in rows:
        if budget.exhausted():
            break
        t = time.perf_counter()
        rec = evaluate_row(loaded, row, configs)
        records.append(rec)
        marks = " ".join(f"{a} {'ok' if r['correct'] else '--'}" for a, r in rec["arms"].items())
        print(f"[{len(records)}/{len(rows)}] row {row['row']} ({rec['context_tokens']} tokens): {marks}  "
              f"({time.perf_counter() - t:.1f} s, {budget.elapsed / 60:.1f} min)", file=sys.stderr, flush=True)
    summary = arms.summarize(records, modes, [])  # one set: only the 'all' row
    result = bc.new_result("ruler", args.device, command=args.command)
    result.update(
        model=bc.model_info(loaded, args.model), data=str(args.data), dataset=args.data.stem, arms=modes,
        configs={a: c.to_dict() for a, c in configs.items()}, rows_planned=len(rows), rows_done=len(records),
        rows_without_split=sum(not r["split"] for r in records), seed=args.seed,
        split="context = prompt before its last QUERY_MARKER; query = the rest, asked from the adapted state",
        scoring="first line of the completion contains any gold answer, case-insensitive",
        time_budget_min=args.time_budget_min, budget_exhausted=len(records) < len(rows),
        summary=summary, records=records)
    result["tables"] = arms.accuracy_tables(summary, modes, {}, f"RULER {args.data.stem}: accuracy",
                                            "rows")[:1] + [_cost_table(summary, modes)]
    if result["budget_exhausted"]:
        result["notes"].append(f"time budget of {args.time_budget_min} min reached after {len(records)} of "
                               f"{len(rows)} rows")
    if result["rows_without_split"]:
        result["notes"].append(f"{result['rows_without_split']} rows had no query marker and were adapted whole")
    if records:
        result["plot"] = bc.plot_path(args.out).name
        cfg = configs.get("refine") or next(iter(configs.values()))
        plot_bars(summary, modes, bc.plot_path(args.out),
                  f"{loaded.name} on {args.data.stem}\n{len(records)} rows, steps {cfg.steps}, lr {cfg.lr:g}")
    return result


def _cost_table(summary: dict, modes: list[str]) -> dict:
    s = summary.get("all", {}).get("arms", {})
    rows = [[m, f"{s[m]['seconds_adapt']:.1f}", f"{s[m]['ntp_before']:.3f} -> {s[m]['ntp_after']:.3f}",
             f"{s[m]['answer_nll']:.3f}"] for m in modes if m in s]
    return bc.table("Cost and fit per arm (means over rows)",
                    ["arm", "adapt s", "context NTP loss before -> after", "gold answer NLL (nats/token)"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = bc.arg_parser("python -m benchmarks.ruler", __doc__)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a RULER parquet file")
    p.add_argument("--rows", type=int, default=40, help="evaluate the first N rows")
    arms.add_arm_options(p)
    p.add_argument("--time-budget-min", type=float, default=40.0,
                   help="stop starting new rows after this many minutes (0 or negative: no limit)")
    p.add_argument("--out", type=Path, default=bc.RESULTS_DIR / "ruler.json")
    args = p.parse_args(argv)
    args.command = bc.command_line("python -m benchmarks.ruler", argv)
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        args.time_budget_min = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():  # fail before loading the model
        load_rows(args.data, 0)
    bc.quiet_logs()
    t0 = time.perf_counter()
    loaded = bc.load(args.model, args.device)
    result = run(args, loaded)
    bc.print_result(result)
    bc.write_result(result, args.out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
