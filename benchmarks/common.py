"""What every benchmark script shares: the machine it ran on, statistics, tables, JSON and plots.

A result file is one JSON object with at least::

    {"benchmark": "quality", "command": "python -m benchmarks.quality ...", "machine": {...},
     "started": "2026-11-28T23:10:00Z", "seconds": 123.4, "tables": [Table, ...], "notes": [...],
     "plot": "quality.png", ...benchmark-specific data...}

where a Table is ``{"title": str, "columns": [str], "rows": [[str]]}`` holding the *formatted*
cells. The script prints those tables and ``benchmarks/report.py`` pastes the same cells into
BENCHMARKS.md, so the document shows exactly what the script wrote.
"""

from __future__ import annotations

import argparse

import datetime as _dt
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
SHARED_DIR = REPO_ROOT.parent / "shared"


# --- statistics -------------------------------------------------------------------------------

def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (n = 0 gives (0, 1))."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: list[bool], b: list[bool], z: float = 1.959964) -> dict:
    """Difference of two paired proportions, mean(a) - mean(b), with a 95% interval.

    The interval is Newcombe's (1998, method 10): Wilson intervals of each proportion combined
    with the correlation of the pairs; it behaves at small n and near 0 or 1, where the Wald
    interval does not. ``a_only`` / ``b_only`` are the discordant pairs, and ``mcnemar_p`` the
    exact two-sided McNemar test (binomial on the discordant pairs).
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in size: {len(a)} != {len(b)}")
    n = len(a)
    both = sum(1 for x, y in zip(a, b) if x and y)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - a_only - b_only
    if n == 0:
        return {"n": 0, "diff": 0.0, "lo": -1.0, "hi": 1.0, "a_only": 0, "b_only": 0, "mcnemar_p": 1.0}
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_interval(both + a_only, n, z)
    l2, u2 = wilson_interval(both + b_only, n, z)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / math.sqrt(margins) if margins > 0 else 0.0
    d = p1 - p2
    lo_sq = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    hi_sq = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return {"n": n, "diff": d, "lo": max(-1.0, d - math.sqrt(max(lo_sq, 0.0))),
            "hi": min(1.0, d + math.sqrt(max(hi_sq, 0.0))), "a_only": a_only, "b_only": b_only,
            "mcnemar_p": mcnemar_exact_p(a_only, b_only)}


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(as extreme) under Binomial(b + c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


# --- parsing ----------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    """'1024,2048' -> [1024, 2048]; accepts K suffixes ('1K,2k' -> [1024, 2048])."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        out.append(int(part[:-1]) * 1024 if part[-1] in "kK" else int(part))
    return out


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def per_item_counts(text: str, items: list, what: str) -> list[int]:
    """'40' -> [40] * len(items); '60,40,20,10' -> one count per item (lengths must match)."""
    counts = int_list(text)
    if len(counts) == 1:
        return counts * len(items)
    if len(counts) != len(items):
        raise SystemExit(f"{what}: {len(counts)} counts for {len(items)} items ({items})")
    return counts


# --- provenance -------------------------------------------------------------------------------

def arg_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a benchmark script: ``doc``'s first paragraph as its description, the rest
    (how to read the figures) after the options in ``--help``."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(doc.split("\n\n")[1:]))


def command_line(prog: str | None = None, argv: list[str] | None = None) -> str:
    """The command that produced a result: ``prog`` (default: how this process was started, e.g.
    ``python -m benchmarks.quality``) and the parsed arguments ``argv`` (default: the process's)."""
    if prog is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        prog = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([prog, *map(shlex.quote, args)])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str = "cpu") -> dict:
    """Where the numbers come from: CPU, cores, threads, accelerator, library versions, commit."""
    import torch

    info = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
        "torch": torch.__version__, "platform": platform.platform(), "device": device,
        "commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        from importlib.metadata import version

        info["fla"] = version("flash-linear-attention")
    except Exception:  # not installed as a distribution (e.g. carried as source)
        info["fla"] = None
    return info


def machine_summary(m: dict) -> str:
    """One line: 'Intel Xeon ... (2 cores, 2 torch threads), torch 2.13.0, device cpu'."""
    where = m.get("gpu") or m.get("device", "cpu")
    return (f"{m.get('cpu')} ({m.get('cores')} cores, {m.get('torch_threads')} torch threads), "
            f"torch {m.get('torch')}, device {where}")


def new_result(benchmark: str, device: str = "cpu", *, command: str | None = None) -> dict:
    """The common head of a result file; fill in the rest and pass it to ``write_result``.
    ``command``: what reproduces it (default: this process's command line)."""
    return {"benchmark": benchmark, "command": command or command_line(), "machine": machine_info(device),
            "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tables": [], "notes": []}


class Budget:
    """A wall-clock budget in minutes (None = unlimited), started at construction."""

    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def exhausted(self) -> bool:
        return self.minutes is not None and self.elapsed > self.minutes * 60


# --- output -----------------------------------------------------------------------------------

def table(title: str, columns: list[str], rows: list[list]) -> dict:
    return {"title": title, "columns": columns, "rows": [[str(c) for c in row] for row in rows]}


def markdown_table(t: dict) -> str:
    """A Table dict as a GitHub markdown table (numbers right-aligned)."""
    cols = t["columns"]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in t["rows"]]
    return "\n".join(lines)


def text_table(t: dict) -> str:
    """A Table dict as aligned plain text for the terminal."""
    cols, rows = t["columns"], t["rows"]
    widths = [max(len(str(x)) for x in [c, *(r[i] for r in rows)]) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([t["title"], fmt(cols), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def print_result(result: dict) -> None:
    for t in result["tables"]:
        print()
        print(text_table(t))
    for note in result["notes"]:
        print(f"note: {note}")


def write_result(result: dict, out: Path, t0: float) -> Path:
    """Write the JSON (creating its folder); records the elapsed seconds."""
    result["seconds"] = round(time.perf_counter() - t0, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    print(f"\nwrote {out}" + (f" and {out.parent / result['plot']}" if result.get("plot") else ""))
    return out


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def plot_path(out: Path) -> Path:
    """The PNG written beside a result JSON: results/quality.json -> results/quality.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_suffix(".png")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}"


def fmt_ci(lo: float, hi: float, scale: float = 100) -> str:
    return f"[{scale * lo:.0f}, {scale * hi:.0f}]"


# --- text and models --------------------------------------------------------------------------

def heldout_texts() -> list[str]:
    """Held-out prose (never used in training), shipped in the package."""
    from refine_tta.train.corpus import HELDOUT_TEXT_PATH, iter_documents

    return iter_documents(HELDOUT_TEXT_PATH)


def prose_ids(tok, texts: list[str], n_tokens: int, seed: str) -> list[int]:
    """Exactly ``n_tokens`` token ids of held-out prose (BOS first), from a seeded random window."""
    from refine_tta.train.needles import filler_window

    rng = random.Random(seed)
    text = filler_window(rng, texts, n_tokens * 6 + 1000)
    ids = tok.encode(text)
    if len(ids) < n_tokens:
        raise ValueError(f"held-out window of {len(ids)} tokens is shorter than {n_tokens}")
    return ids[:n_tokens]


def load_or_init(path: Path, device: str, tokenizer: Path | None = None):
    """(model, tokenizer or None, info dict, note or None). Random initialisation from the
    directory's config.json when it has no weights; ``tokenizer``: a directory to take the
    tokenizer from when ``path`` has none (a config-only directory such as a LaCT config)."""
    import torch

    from refine_tta.model import load_model
    from refine_tta.model.loading import fingerprint_model, prepare_model, register_fla_models

    has_config = (path / "config.json").is_file()
    has_weights = any(path.glob("*.safetensors"))
    if has_config and has_weights:
        loaded = load_model(path, device=device, load_tokenizer=tokenizer is None)
        model, tok = loaded.model, loaded.tokenizer or _tokenizer_or_none(tokenizer)
        weights = "trained"
        note = None
    else:
        register_fla_models()
        from transformers import AutoConfig, AutoModelForCausalLM

        tok = _tokenizer_or_none(tokenizer or path)
        if has_config:
            config = AutoConfig.from_pretrained(path)
            weights = f"random init from {path / 'config.json'}"
        else:
            from fla.models import DeltaNetConfig

            from refine_tta.train.train import parse_args as train_defaults

            d = train_defaults([])
            config = DeltaNetConfig(hidden_size=d.hidden, num_hidden_layers=d.layers, num_heads=d.heads,
                                    vocab_size=len(tok) if tok is not None else 8192, tie_word_embeddings=True,
                                    fuse_cross_entropy=False, use_cache=True)
            weights = "random init with the training script's default architecture (no config.json)"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(device)
        if device == "cpu":
            model.float()
        prepare_model(model, torch.device(device))
        note = (f"no trained weights in {path}: timing a RANDOMLY INITIALISED model ({weights}); "
                "the cost of a step depends on the shapes, not on the weights")
    cfg = model.config
    info = {"path": str(path), "weights": weights, "model_type": cfg.model_type,
            "parameters": sum(p.numel() for p in model.parameters()), "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "backend": getattr(model, "refine_tta_backend", None),
            "fingerprint": fingerprint_model(model).to_dict()}
    if weights == "trained":
        info["training_step"] = _training_step(path)
    return model, tok, info, note


def _training_step(path: Path) -> int | None:
    """The optimizer step of the checkpoint, from the training script's log beside the weights."""
    import json

    try:
        return int(json.loads((path / "training_log.json").read_text())["steps"][-1]["step"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _tokenizer_or_none(path: Path):
    if path is None or not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load(model: str | None, device: str):
    """Load the model (default: the embedded one); prints where and how."""
    from refine_tta.defaults import default_model_path
    from refine_tta.model import load_model

    t = time.perf_counter()
    loaded = load_model(model or default_model_path(), device=device)
    print(f"loaded {loaded.name} on {loaded.device} ({loaded.backend.name} kernels, {loaded.dtype}) "
          f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return loaded


def model_info(loaded, path: str | None) -> dict:
    from refine_tta.defaults import default_model_path

    cfg = loaded.config
    return {"name": loaded.name, "path": path or default_model_path(), "model_type": cfg.model_type,
            "parameters": sum(p.numel() for p in loaded.model.parameters()), "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "fingerprint": loaded.fingerprint.to_dict(),
            "backend": loaded.backend.name, "dtype": str(loaded.dtype).replace("torch.", "")}


def quiet_logs() -> None:
    """Warnings only; fla's 'Triton is not supported' notice is expected on CPU."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="Triton is not supported")
