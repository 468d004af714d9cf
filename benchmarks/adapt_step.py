"""Cost of one REFINE adaptation step: shared-prefix branches vs re-reading every prefix vs NTP.

What is measured: wall-clock seconds of one ``refine_step`` (read the document, select positions,
roll out, reward, PPO + NTP loss, backward, AdamW update) on the **branch** path (read the
document once, roll out and back-propagate k-token branches from the states kept on the way) and
on the **reference** path (the paper's code: every rollout re-reads its prefix to sample, again for
old log-probs and again, with gradients, for the update), and of one NTP-only step (``sft_step``:
the paper's "SFT" baseline, one forward + backward over the document), in one process, on the same
model, documents, positions and rollouts (same seed), for each document length L and rollouts per
position n. Two ratios per (L, n): reference / branch (the speed-up of branching) and branch / NTP
(what a REFINE step costs over the NTP step it is built on). The spec says the reference step
costs about 8-10x an NTP step; the branch step should cost about one forward + backward over the
document plus small branches.

How: held-out prose (never seen in training, shipped with the package) tokenised with the model's
tokenizer to exactly L tokens; n_chunks 8, k 5, scope ``full`` (every parameter trained, the
paper's setting), lr 1e-6. For every (L, n): one warm-up NTP step and one warm-up branch step
(allocator, first-call overheads; the reference path runs the same operations, so it gets no
warm-up of its own: at 8K one reference step takes minutes), then ``--repeats`` rounds of one
timed step per kind (NTP, branch, reference, interleaved, so a change in the machine's load hits
all three), each inside a fresh ``trainable_scope`` with a fresh AdamW, so every repetition does
the same work from the base weights; the median is reported, with the per-phase split of that
step. Wall seconds, and the process's CPU seconds (``time.process_time``): on a shared machine
the CPU seconds of a one-thread run are far less disturbed by other processes than wall time,
so the table gives both ratios.
With no trained weights in ``--model`` the model is initialised at random from its config.json
(or, without one, from the training script's default architecture); the output says so. Any
supported model type works, e.g. the small LaCT configuration in ``benchmarks/configs/lact-small``.
Timing does not depend on the weights' values, only on their shapes.

    python -m benchmarks.adapt_step                           # L = 1024, 4096; n = 1, 4
    python -m benchmarks.adapt_step --lengths 1024,4096,8192 --repeats 3 --reference-repeats 1
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
KINDS = ("ntp", *PATHS)  # "ntp": one sft_step (NTP loss only) on the same document and scope


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

def one_step(model, ids, cfg, kind: str) -> dict:
    """One step of ``kind`` (KINDS) from the base weights, fresh optimizer; its stats + wall seconds."""
    import torch

    from refine_tta.refine.delta import trainable_scope
    from refine_tta.refine.loop import refine_step, sft_step

    device = ids.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    try:
        with trainable_scope(model, cfg, gen) as scope, scope.attached(model):
            opt = torch.optim.AdamW(scope.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            _sync(device)
            t, cpu = time.perf_counter(), time.process_time()
            if kind == "ntp":
                stats = sft_step(model, ids, cfg, scope.params, opt)
            else:
                stats = refine_step(model, ids, cfg, gen, scope.params, opt, kind)
            _sync(device)
            stats["wall_s"] = time.perf_counter() - t
            stats["cpu_s"] = time.process_time() - cpu
    finally:
        model.train(was_training)
    return stats


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, ids, cfg, repeats: int, reference_repeats: int) -> dict:
    """Warm-up (NTP, branch), then ``repeats`` rounds of one timed step per kind (the reference path
    only in the first ``reference_repeats`` rounds). Returns {kind: summary}."""
    for kind in ("ntp", "branch"):
        one_step(model, ids, cfg, kind)
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for i in range(max(repeats, reference_repeats)):
        for kind in KINDS:
            if i < (reference_repeats if kind == "reference" else repeats):
                runs[kind].append(one_step(model, ids, cfg, kind))
    return {kind: summarize(runs[kind], ids.device) for kind in KINDS}


def summarize(runs: list[dict], device) -> dict:
    """Median wall time of the runs, and the statistics of the median run."""
    times = [r["wall_s"] for r in runs]
    cpu = [r["cpu_s"] for r in runs]
    mid = sorted(range(len(runs)), key=lambda i: times[i])[(len(runs) - 1) // 2]
    chosen = runs[mid]
    out = {"median_s": bc.median(times), "runs_s": [round(t, 4) for t in times],
           "median_cpu_s": bc.median(cpu), "runs_cpu_s": [round(t, 4) for t in cpu],
           "phases_s": chosen["seconds_by_phase"], "tokens_processed": chosen["tokens_processed"],
           "peak_memory_mb": _peak_mb(device), "ntp_loss": chosen["ntp_loss"]}
    if "rollout_tokens" in chosen:
        out.update(positions=chosen["positions"], policy_loss=chosen["policy_loss"],
                   rollout_tokens_sha1=hashlib.sha1(str(chosen["rollout_tokens"]).encode()).hexdigest()[:12])
    return out


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
    p = bc.arg_parser("python -m benchmarks.adapt_step", __doc__)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="model directory (random init from its config.json if it has no weights)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory when --model has none (e.g. models/refine-tiny-deltanet)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", type=bc.int_list, default=[1024, 4096], help="document lengths (1024,4096,8192)")
    p.add_argument("--ns", type=bc.int_list, default=[1, 4], help="rollouts per position")
    p.add_argument("--n-chunks", type=int, default=8)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="timed NTP and branch steps per cell after the warm-up")
    p.add_argument("--reference-repeats", type=int, default=None,
                   help="timed reference steps per cell (default: --repeats; one takes minutes at 8K)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=bc.RESULTS_DIR / "adapt_step.json",
                   help="result JSON; the PNG goes beside it")
    args = p.parse_args(argv)
    if args.reference_repeats is None:
        args.reference_repeats = args.repeats
    if args.repeats < 1 or args.reference_repeats < 1:
        p.error("--repeats and --reference-repeats must be >= 1")
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
            cell = {"L": L, "n": n, "document": source, **measure(model, ids, cfg, args.repeats, args.reference_repeats)}
            for kind in KINDS:
                print(f"L={L} n={n} {kind}: {cell[kind]['median_s']:.3f} s/step (runs {cell[kind]['runs_s']}; "
                      f"CPU s {cell[kind]['runs_cpu_s']}; "
                      f"phases {cell[kind]['phases_s']})", file=sys.stderr)
            cell["same_positions"] = cell["branch"]["positions"] == cell["reference"]["positions"]
            cell["same_rollouts"] = cell["branch"]["rollout_tokens_sha1"] == cell["reference"]["rollout_tokens_sha1"]
            cell["ntp_s"] = cell["ntp"]["median_s"]
            cell["branch_s"] = cell["branch"]["median_s"]
            cell["reference_s"] = cell["reference"]["median_s"]
            cell["ratio"] = cell["reference_s"] / cell["branch_s"]
            cell["refine_over_ntp"] = cell["branch_s"] / cell["ntp_s"]
            cell["ratio_cpu"] = cell["reference"]["median_cpu_s"] / cell["branch"]["median_cpu_s"]
            cell["refine_over_ntp_cpu"] = cell["branch"]["median_cpu_s"] / cell["ntp"]["median_cpu_s"]
            rows.append(cell)
    result["settings"] = {"n_chunks": args.n_chunks, "k": args.k, "scope": "full", "lr": 1e-6,
                          "repeats": args.repeats, "reference_repeats": args.reference_repeats,
                          "warmup": "one NTP step and one branch step per cell", "statistic": "median"}
    result["machine"]["torch_threads"] = torch.get_num_threads()
    result["rows"] = rows
    result["tables"].append(bc.table(
        f"One REFINE step, {info['model_type']} {info['parameters'] / 1e6:.1f}M ({info['weights']}), "
        f"{bc.machine_summary(result['machine'])}",
        ["L", "n", "NTP s/step", "branch s/step", "reference s/step", "reference / branch", "branch / NTP",
         "reference / branch (CPU s)", "branch / NTP (CPU s)"],
        [[r["L"], r["n"], f"{r['ntp_s']:.3f}", f"{r['branch_s']:.3f}", f"{r['reference_s']:.3f}",
          f"{r['ratio']:.1f}x", f"{r['refine_over_ntp']:.2f}x", f"{r['ratio_cpu']:.1f}x",
          f"{r['refine_over_ntp_cpu']:.2f}x"] for r in rows]))
    differ = [f"L={r['L']} n={r['n']}" for r in rows if not (r["same_positions"] and r["same_rollouts"])]
    if differ:
        result["notes"].append(
            f"the two paths chose different positions or sampled different rollout tokens in {', '.join(differ)}: "
            "the paths read the prefix "
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
