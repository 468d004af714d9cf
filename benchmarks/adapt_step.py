"""Cost of one REFINE adaptation step: shared-prefix branches vs re-reading every prefix.

What is measured: wall-clock seconds of one ``refine_step`` (score the document, select positions,
roll out, reward, PPO + NTP loss, backward, AdamW update) on the **branch** path (read the
document once, roll out and back-propagate k-token branches from the states kept at the rollout
starts) and on the **reference** path (the paper's code: every rollout re-reads its prefix to
sample, again for old log-probs and again, with gradients, for the update), in one process, on
the same model, documents, positions and rollouts (same seed), for each document length L and
rollouts per position n. The spec says the reference step costs about 8-10x an NTP step; the
branch step should cost about one forward + backward over the document plus small branches.

How: held-out prose (never seen in training, shipped with the package) tokenised with the model's
tokenizer to exactly L tokens; n_chunks 8, k 5, scope ``full`` (every parameter trained, the
paper's setting), lr 1e-6. For every (L, n, path): one warm-up step, then ``--repeats`` timed
steps, each inside a fresh ``trainable_scope`` with a fresh AdamW, so every repetition does the
same work from the base weights; the median is reported, with the per-phase split of that step.
With no trained weights in ``--model`` the model is initialised at random from its config.json
(or, without one, from the training script's default architecture); the output says so. Any
supported model type works, e.g. the small LaCT configuration in ``benchmarks/configs/lact-small``.
Timing does not depend on the weights' values, only on their shapes.

    python -m benchmarks.adapt_step                           # L = 1024, 4096; n = 1, 4
    python -m benchmarks.adapt_step --lengths 1024,4096,8192 --repeats 3
    python -m benchmarks.adapt_step --lengths 1024 --ns 1 --threads 2
    python -m benchmarks.adapt_step --model benchmarks/configs/lact-small --tokenizer models/refine-tiny-deltanet
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from benchmarks import common as bc

DEFAULT_MODEL = bc.REPO_ROOT / "models" / "refine-tiny-deltanet"
PATHS = ("branch", "reference")


# --- documents -------------------------------------------------------------------------------

def document(tok, texts: list[str], L: int, vocab: int, device: str):
    """[1, L] ids of held-out prose (BOS first); random ids only when there is no tokenizer."""
    import torch

    if tok is None:
        g = torch.Generator().manual_seed(L)
        return torch.randint(0, vocab, (1, L), generator=g).to(device), "random token ids (no tokenizer)"
    ids = bc.prose_ids(tok, texts, L, seed=f"adapt_step/{L}")
    return torch.tensor([ids], device=device), "held-out prose"


# --- timing -----------------------------------------------------------------------------------

def one_step(model, ids, cfg, path: str) -> dict:
    """One refine_step from the base weights, fresh optimizer; returns its stats + wall seconds."""
    import torch

    from refine_tta.refine.delta import trainable_scope
    from refine_tta.refine.loop import refine_step

    device = ids.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    try:
        with trainable_scope(model, cfg, gen) as scope:
            opt = torch.optim.AdamW(scope.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            _sync(device)
            t = time.perf_counter()
            stats = refine_step(model, ids, cfg, gen, scope.params, opt, path)
            _sync(device)
            stats["wall_s"] = time.perf_counter() - t
    finally:
        model.train(was_training)
    return stats


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, ids, cfg, path: str, repeats: int) -> dict:
    one_step(model, ids, cfg, path)  # warm-up (allocator, first-call overheads)
    runs = [one_step(model, ids, cfg, path) for _ in range(repeats)]
    times = [r["wall_s"] for r in runs]
    mid = sorted(range(len(runs)), key=lambda i: times[i])[(len(runs) - 1) // 2]
    chosen = runs[mid]
    return {"median_s": bc.median(times), "runs_s": [round(t, 4) for t in times],
            "phases_s": chosen["seconds_by_phase"], "tokens_processed": chosen["tokens_processed"],
            "positions": chosen["positions"], "peak_memory_mb": _peak_mb(ids.device),
            "rollout_tokens_sha1": hashlib.sha1(str(chosen["rollout_tokens"]).encode()).hexdigest()[:12],
            "policy_loss": chosen["policy_loss"], "ntp_loss": chosen["ntp_loss"]}


def _peak_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak RSS


# --- output -----------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: seconds per step against L for each path and n (log y). Right: reference / branch."""
    plt = bc.pyplot()
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10, 4.2))
    lengths = sorted({r["L"] for r in rows})
    ns = sorted({r["n"] for r in rows})
    for j, n in enumerate(ns):  # one colour per n; branch: solid, circles; reference: dashed, squares
        cells = sorted((r for r in rows if r["n"] == n), key=lambda r: r["L"])
        for key, style, marker in (("branch_s", "-", "o"), ("reference_s", "--", "s")):
            ax.plot([r["L"] for r in cells], [r[key] for r in cells], style, marker=marker, color=f"C{j}",
                    label=f"{key.split('_')[0]}, n={n}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_yscale("log")
    ax.set_xlabel("document length L (tokens)")
    ax.set_ylabel("seconds per REFINE step (median)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    w = 0.8 / len(ns)
    for j, n in enumerate(ns):
        xs = [i + (j - (len(ns) - 1) / 2) * w for i, L in enumerate(lengths)]
        ratios = [next((r["ratio"] for r in rows if r["L"] == L and r["n"] == n), 0.0) for L in lengths]
        bars = ax_r.bar(xs, ratios, w, label=f"n={n}", color=f"C{j}")
        ax_r.bar_label(bars, [f"{v:.1f}x" for v in ratios], fontsize=8)
    ax_r.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax_r.set_xlabel("document length L (tokens)")
    ax_r.set_ylabel("reference / branch (time per step)")
    ax_r.axhline(1.0, color="grey", lw=0.8)
    ax_r.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.adapt_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="model directory (random init from its config.json if it has no weights)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory when --model has none (e.g. models/refine-tiny-deltanet)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", type=bc.int_list, default=[1024, 4096], help="document lengths (1024,4096,8192)")
    p.add_argument("--ns", type=bc.int_list, default=[1, 4], help="rollouts per position")
    p.add_argument("--n-chunks", type=int, default=8)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per cell after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=bc.RESULTS_DIR / "adapt_step.json",
                   help="result JSON; the PNG goes beside it")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bc.quiet_logs()
    import torch

    from refine_tta.refine.config import RefineConfig

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, info, note = bc.load_or_init(args.model, args.device, args.tokenizer)
    result = bc.new_result("adapt_step", args.device)
    result["model"] = info
    if note:
        result["notes"].append(note)
        print(f"note: {note}", file=sys.stderr)
    texts = bc.heldout_texts() if tok is not None else []
    rows = []
    for L in args.lengths:
        ids, source = document(tok, texts, L, model.config.vocab_size, args.device)
        for n in args.ns:
            cfg = RefineConfig(mode="refine", steps=1, lr=1e-6, n_chunks=args.n_chunks, k=args.k, n=n,
                               scope="full", seed=0)
            cell = {"L": L, "n": n, "document": source}
            for path in PATHS:
                cell[path] = measure(model, ids, cfg, path, args.repeats)
                print(f"L={L} n={n} {path}: {cell[path]['median_s']:.3f} s/step "
                      f"(runs {cell[path]['runs_s']})", file=sys.stderr)
            cell["same_rollouts"] = cell["branch"]["rollout_tokens_sha1"] == cell["reference"]["rollout_tokens_sha1"]
            cell["branch_s"] = cell["branch"]["median_s"]
            cell["reference_s"] = cell["reference"]["median_s"]
            cell["ratio"] = cell["reference_s"] / cell["branch_s"]
            rows.append(cell)
    result["settings"] = {"n_chunks": args.n_chunks, "k": args.k, "scope": "full", "lr": 1e-6,
                          "repeats": args.repeats, "warmup": 1, "statistic": "median"}
    result["machine"]["torch_threads"] = torch.get_num_threads()
    result["rows"] = rows
    result["tables"].append(bc.table(
        f"One REFINE step, {info['model_type']} {info['parameters'] / 1e6:.1f}M ({info['weights']}), "
        f"{bc.machine_summary(result['machine'])}",
        ["L", "n", "branch s/step", "reference s/step", "ratio"],
        [[r["L"], r["n"], f"{r['branch_s']:.3f}", f"{r['reference_s']:.3f}", f"{r['ratio']:.1f}x"] for r in rows]))
    differ = [f"L={r['L']} n={r['n']}" for r in rows if not r["same_rollouts"]]
    if differ:
        result["notes"].append(
            f"the two paths sampled different rollout tokens in {', '.join(differ)}: the paths read the prefix "
            "in different segmentations, so fp32 logits differ by ~1e-6 and a draw that lands that close to a "
            "CDF boundary can flip (the unit tests check token equality on small models); the work per step, "
            "and so the timing, is the same")
    result["plot"] = bc.plot_path(args.out).name
    plot(rows, bc.plot_path(args.out),
         f"One REFINE step, branch vs reference: {info['model_type']} {info['parameters'] / 1e6:.1f}M "
         f"({'trained' if info['weights'] == 'trained' else 'random init'}), "
         f"{result['machine']['device']}, {torch.get_num_threads()} threads, n_chunks {args.n_chunks}, k {args.k}")
    bc.print_result(result)
    bc.write_result(result, args.out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
