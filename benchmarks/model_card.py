"""Scores of the embedded model with no adaptation, for its model card (issue 3).

    python benchmarks/model_card.py --model models/refine-tiny-deltanet

Measures, on text the model never trained on (``refine_tta/train/data/heldout_prose.txt.gz``):

* next-token loss and perplexity over ``--ppl-windows`` windows of 1024 tokens;
* needle-retrieval exact match at each length in ``--lengths`` (default 512..8192), with
  ``--needles`` documents per length: each document is held-out prose with 3 key-value facts
  (``refine_tta.train.needles.make_needle_document``: multi-token values, varied wording, uniform
  random depth) and a question about one of them; the model reads document + question and answers
  greedily (stop at newline); exact match of the value (``needles.is_correct``), 95% Wilson interval.

Also draws the training loss curve from ``<model>/training_log.json``. Writes
``benchmarks/results/model_card.json``, ``benchmarks/results/model_card_retrieval.png`` and
``<model>/loss_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def heldout_perplexity(model, tok, texts, windows: int, seed: int) -> dict:
    from refine_tta.model import read
    from refine_tta.refine.rollout import ce_sum
    from refine_tta.train.needles import filler_window

    rng = random.Random(seed)
    total, count, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for _ in range(windows):
            ids = tok.encode(filler_window(rng, texts, 6000))[:1024]
            x = torch.tensor([ids])
            logits = read(model, x).logits[0]
            total += float(ce_sum(logits[:-1], x[0, 1:]))
            count += len(ids) - 1
            nbytes += len(tok.decode(ids[1:]).encode("utf-8"))  # the UTF-8 bytes of the predicted tokens
    loss = total / count
    return {"windows": windows, "tokens": count, "bytes": nbytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total / math.log(2) / nbytes}


def retrieval(model, tok, texts, length: int, n_docs: int, seed: int) -> dict:
    from refine_tta.engine.text import SamplingConfig, TextCodec, generate_text
    from refine_tta.model import read_document
    from refine_tta.train.needles import filler_window, is_correct, make_needle_document

    rng = random.Random(seed * 100003 + length)
    cfg = SamplingConfig(max_new_tokens=24, stop=("\n",))
    codec = TextCodec(tok)
    hits, examples = 0, []
    for _ in range(n_docs):
        doc = make_needle_document(rng, filler_window(rng, texts, length * 6), n_needles=3, target_tokens=length,
                                   count_tokens=lambda s: len(tok.encode(s, add_special_tokens=False)))
        context = tok.encode(doc.context)
        question = tok.encode(doc.text[len(doc.context):], add_special_tokens=False)
        state = read_document(model, torch.tensor([context]))
        out = generate_text(model, state, question, cfg, codec)
        ok = is_correct(out.text, doc.answer)
        hits += ok
        if len(examples) < 3:
            examples.append({"answer": doc.answer, "output": out.text, "correct": ok, "depth": round(doc.depth, 3)})
    lo, hi = wilson(hits, n_docs)
    return {"length": length, "docs": n_docs, "exact_match": hits / n_docs, "ci95": [lo, hi], "examples": examples}


def plot_loss_curve(log_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(log_path.read_text())
    # x: tokens seen (the staged recipe's log has them; older logs: steps of 4096 tokens)
    x = [s.get("tokens", s["step"] * 4096) / 1e6 for s in log["steps"]]
    losses = [s["loss"] for s in log["steps"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, losses, lw=0.8, alpha=0.5, label="train loss (logged steps; answer-weighted in phases A-C)")
    w = 20
    smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]
    ax.plot(x, smooth, lw=1.5, label=f"train loss ({w}-point mean)")
    evals = [e for e in log.get("evals", []) if e.get("heldout_loss") is not None]
    if evals:
        ax.plot([e.get("tokens", e["step"] * 4096) / 1e6 for e in evals], [e["heldout_loss"] for e in evals], "o-",
                label="held-out prose loss")
    for phase in log.get("phases", [])[1:]:  # the curriculum's phase changes
        ax.axvline(phase["tokens"] / 1e6, color="grey", lw=0.8, ls="--")
        ax.text(phase["tokens"] / 1e6, ax.get_ylim()[1], f" {phase['phase']}", va="top", fontsize=8)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("refine-tiny-deltanet training")
    ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def plot_retrieval(rows: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["length"] for r in rows]
    ys = [r["exact_match"] for r in rows]
    err = [[y - r["ci95"][0] for y, r in zip(ys, rows)], [r["ci95"][1] - y for y, r in zip(ys, rows)]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("needle exact match (no adaptation)")
    ax.set_ylim(0, 1)
    ax.set_title("retrieval of the base model, 95% Wilson CI")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--needles", type=int, default=100, help="documents per length")
    p.add_argument("--ppl-windows", type=int, default=50)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from refine_tta.defaults import default_model_path
    from refine_tta.model import load_model
    from refine_tta.train.corpus import HELDOUT_TEXT_PATH, iter_documents

    model_dir = Path(args.model or default_model_path())
    loaded = load_model(model_dir)
    texts = iter_documents(HELDOUT_TEXT_PATH)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ppl = heldout_perplexity(loaded.model, loaded.tokenizer, texts, args.ppl_windows, args.seed)
    print(f"held-out next-token loss {ppl['loss']:.3f} nats, perplexity {ppl['perplexity']:.1f}, "
          f"{ppl['bits_per_byte']:.3f} bits per byte ({ppl['windows']} windows, {ppl['tokens']} tokens)")
    rows = []
    print(f"{'length':>7} {'docs':>5} {'exact match':>12} {'95% CI':>16}")
    for length in [int(x) for x in args.lengths.split(",")]:
        r = retrieval(loaded.model, loaded.tokenizer, texts, length, args.needles, args.seed)
        rows.append(r)
        print(f"{length:>7} {r['docs']:>5} {r['exact_match']:>12.2f} {r['ci95'][0]:>7.2f}-{r['ci95'][1]:.2f}")
    result = {
        "model": str(model_dir), "n_params": sum(p.numel() for p in loaded.model.parameters()),
        "heldout": ppl, "retrieval": rows, "seconds": time.perf_counter() - t0,
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__, "device": str(loaded.device),
                    "platform": platform.platform()},
        "command": "python benchmarks/model_card.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (args.out / "model_card.json").write_text(json.dumps(result, indent=1))
    plot_retrieval(rows, args.out / "model_card_retrieval.png")
    if (model_dir / "training_log.json").exists():
        plot_loss_curve(model_dir / "training_log.json", model_dir / "loss_curve.png")
    print(f"wrote {args.out / 'model_card.json'} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
