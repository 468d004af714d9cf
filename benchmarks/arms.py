"""Adapt to a context, then answer from the session state: one *arm* (none / sft / refine) on one task.

Shared by ``quality.py`` (needles) and ``ruler.py`` (RULER QA). The adaptation sees only the
context; the question is read from the adapted state at generation time, as in the product.
Arms differ only in ``mode``: steps, learning rate, scope and seed are the same for all of them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from benchmarks import common as bc


def add_arm_options(p: argparse.ArgumentParser) -> None:
    """--arms, --steps, --lr, --scope, --set, --seed: the adaptation settings shared by all arms."""
    p.add_argument("--arms", default="none,sft,refine", help="comma-separated modes to compare")
    p.add_argument("--steps", type=int, default=None, help="adaptation steps (default: RefineConfig's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: RefineConfig's)")
    p.add_argument("--scope", default=None, choices=["full", "lora", "layers"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other RefineConfig field for the adapted arms, e.g. --set reward=hybrid")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks and of every adaptation")


def parse_set(items: list[str]) -> dict:
    """['reward=hybrid', 'k=8'] -> {'reward': 'hybrid', 'k': 8} (values parsed as JSON when they can be)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def arm_config(args, mode: str, **overrides):
    """An arm's RefineConfig: library defaults, then --set, then --steps/--lr/--scope, then
    ``mode``, --seed and ``overrides``."""
    from refine_tta.refine.config import RefineConfig

    d = parse_set(args.set) if isinstance(args.set, list) else dict(args.set)
    d.update({k: v for k, v in {"steps": args.steps, "lr": args.lr, "scope": args.scope}.items() if v is not None})
    d.update(mode=mode, seed=args.seed, **overrides)
    try:
        return RefineConfig.from_dict(d)
    except ValueError as exc:
        raise SystemExit(f"bad adaptation settings: {exc}") from exc


def answer_nll(model, state, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Mean NLL (nats/token) of ``answer_ids`` after ``prompt_ids``, read from ``state``."""
    import torch
    import torch.nn.functional as F

    from refine_tta.model import read

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids[:-1]], device=device)
    with torch.no_grad():
        logits = read(model, ids, state).logits[0, len(prompt_ids) - 1:]  # [A, V]
    return float(F.cross_entropy(logits.float(), torch.tensor(answer_ids, device=device)))


def completion_ids(tok, prompt_text: str, completion: str, prompt_ids: list[int]) -> list[int]:
    """Tokens of ``completion`` as they follow the prompt (joint tokenisation when it extends the prompt's)."""
    joint = tok.encode(prompt_text + completion, add_special_tokens=False)
    if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return joint[len(prompt_ids):]
    return tok.encode(completion, add_special_tokens=False)


def evaluate(loaded, context_ids: list[int], prompt_ids: list[int], answer_ids: list[int], cfg,
             max_new_tokens: int, stop: tuple[str, ...], score: Callable[[str], bool]) -> dict:
    """Adapt to ``context_ids`` alone, then answer ``prompt_ids`` greedily from the session state.

    Returns whether ``score(completion)`` holds, the completion, the gold answer's NLL and the
    adaptation's cost and fit (seconds, NTP loss of the document before and after).
    """
    import torch

    from refine_tta.engine.text import SamplingConfig, TextCodec, generate_text
    from refine_tta.refine.loop import adapt

    tok = loaded.tokenizer
    result = adapt(loaded.model, torch.tensor([context_ids], device=loaded.device), cfg)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop=stop)
    gen = generate_text(loaded.model, result.state, prompt_ids, sampling, TextCodec(tok), weights=result.delta)
    with result.delta.applied(loaded.model):
        nll = answer_nll(loaded.model, result.state, prompt_ids, answer_ids)
    total = result.stats["total"]
    return {"correct": bool(score(gen.text)), "completion": gen.text, "answer_nll": round(nll, 4),
            "seconds_adapt": round(total["seconds_adapt"], 3), "seconds_total": round(total["seconds"], 3),
            "ntp_before": round(total["ntp_loss_before"], 4), "ntp_after": round(total["ntp_loss_after"], 4),
            "skipped_steps": total["skipped_steps"], "reward_first": total.get("reward_mean_first"),
            "reward_last": total.get("reward_mean_last")}


# --- summaries --------------------------------------------------------------------------------

def value_in_first_line(completion: str, answer: str) -> bool:
    """Looser score: the value appears in the completion's first line (case-insensitive), the way
    the paper scores RULER. An adapted small model often recites the whole statement
    ("Felix's favourite song is jolly anchor.") instead of the bare value."""
    first = completion.strip().split("\n", 1)[0]
    return answer.casefold() in first.casefold()


def summarize(records: list[dict], arms: list[str], groups: list[int]) -> dict:
    """Per group (a record's ``group``, e.g. its length) and 'all': per arm n, accuracy with its
    Wilson interval, mean answer NLL, NTP loss and seconds; and the paired differences
    refine - sft, refine - none and sft - none (Newcombe interval, McNemar p)."""
    from statistics import fmean

    out = {}
    for key in [*groups, "all"]:
        docs = [r for r in records if key == "all" or r["group"] == key]
        if not docs:
            continue
        entry = {"n": len(docs), "arms": {}, "paired": {}}
        for arm in arms:
            rs = [d["arms"][arm] for d in docs]
            k = sum(r["correct"] for r in rs)
            lo, hi = bc.wilson_interval(k, len(rs))
            loose = {}
            if all(isinstance(d.get("answer"), str) for d in docs):
                kc = sum(value_in_first_line(d["arms"][arm]["completion"], d["answer"]) for d in docs)
                clo, chi = bc.wilson_interval(kc, len(rs))
                loose = {"contained": kc, "contained_accuracy": kc / len(rs), "contained_lo": clo, "contained_hi": chi}
            entry["arms"][arm] = {
                **loose,
                "correct": k, "accuracy": k / len(rs), "lo": lo, "hi": hi,
                "answer_nll": fmean(r["answer_nll"] for r in rs),
                "ntp_before": fmean(r["ntp_before"] for r in rs), "ntp_after": fmean(r["ntp_after"] for r in rs),
                "seconds_adapt": fmean(r["seconds_adapt"] for r in rs)}
        for a, b in (("refine", "sft"), ("refine", "none"), ("sft", "none")):
            if a in arms and b in arms:
                entry["paired"][f"{a}-{b}"] = bc.paired_difference(
                    [d["arms"][a]["correct"] for d in docs], [d["arms"][b]["correct"] for d in docs])
        out[str(key)] = entry
    return out


def group_label(key: str) -> str:
    if key == "all":
        return "all"
    n = int(key)
    return f"{n // 1024}K" if n % 1024 == 0 else key


def accuracy_tables(summary: dict, arms: list[str], planned: dict[int, int], title: str, group_name: str) -> list[dict]:
    """The accuracy table (arms side by side, refine - sft paired) and the cost/fit table."""
    acc_cols = [group_name, "n"] + [f"{a} % [95% CI]" for a in arms]
    pair = "refine-sft" if "refine" in arms and "sft" in arms else None
    if pair:
        acc_cols += ["refine - sft (pts) [95% CI]", "refine only / sft only", "McNemar p"]
    acc_rows, cost_rows = [], []
    for key, e in summary.items():
        label = group_label(key)
        n = f"{e['n']}" if key == "all" else f"{e['n']}/{planned[int(key)]}"
        cells = {a: e["arms"][a] for a in arms}
        row = [label, n] + [f"{bc.fmt_pct(c['accuracy'])} {bc.fmt_ci(c['lo'], c['hi'])}" for c in cells.values()]
        if pair:
            p = e["paired"][pair]
            row += [f"{100 * p['diff']:+.1f} [{100 * p['lo']:+.0f}, {100 * p['hi']:+.0f}]",
                    f"{p['a_only']} / {p['b_only']}", f"{p['mcnemar_p']:.2f}"]
        acc_rows.append(row)
        for a in arms:
            s = e["arms"][a]
            cost_rows.append([label, a, f"{s['seconds_adapt']:.1f}", f"{s['ntp_before']:.3f} -> {s['ntp_after']:.3f}",
                              f"{s['answer_nll']:.3f}"])
    tables = [bc.table(title, acc_cols, acc_rows)]
    if all("contained" in c for e in summary.values() for c in e["arms"].values()):
        rows = [[group_label(key), f"{e['n']}"] + [
            f"{bc.fmt_pct(e['arms'][a]['contained_accuracy'])} "
            f"{bc.fmt_ci(e['arms'][a]['contained_lo'], e['arms'][a]['contained_hi'])}" for a in arms]
            for key, e in summary.items()]
        tables.append(bc.table("Value contained in the first line of the answer (RULER-style scoring)",
                               [group_name, "n"] + [f"{a} % [95% CI]" for a in arms], rows))
    return tables + [
            bc.table("Cost and fit per arm (means over tasks)",
                     [group_name, "arm", "adapt s", "context NTP loss before -> after", "gold answer NLL (nats/token)"],
                     cost_rows)]


def plot_accuracy(summary: dict, arms: list[str], path: Path, title: str, xlabel: str) -> None:
    """Accuracy (95% Wilson CI) and gold-answer NLL per group, one line per arm."""
    plt = bc.pyplot()
    keys = [k for k in summary if k != "all"]
    xs = [int(k) for k in keys]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for j, arm in enumerate(arms):
        acc = [100 * summary[k]["arms"][arm]["accuracy"] for k in keys]
        err = [[a - 100 * summary[k]["arms"][arm]["lo"] for a, k in zip(acc, keys)],
               [100 * summary[k]["arms"][arm]["hi"] - a for a, k in zip(acc, keys)]]
        shift = [x * 2 ** (0.04 * (j - (len(arms) - 1) / 2)) for x in xs]  # keep error bars apart
        ax1.errorbar(shift, acc, yerr=err, marker="o", capsize=3, label=arm)
        ax2.plot(xs, [summary[k]["arms"][arm]["answer_nll"] for k in keys], marker="o", label=arm)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [group_label(k) for k in keys])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_ylabel("accuracy % (95% Wilson CI)")
    ax1.set_ylim(-2, 102)
    ax2.set_ylabel("gold answer NLL (nats/token)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
