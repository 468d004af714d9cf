"""Regenerate the result sections of BENCHMARKS.md from the JSON files the benchmarks wrote.

Each section sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` and is rebuilt
from ``benchmarks/results/NAME.json``: the command, the machine, the model, the tables exactly as
the script printed them (the JSON holds the formatted cells), its notes and its plot. Text outside
the markers is left alone. A missing JSON gives a "not run yet" line with the command to run.

    python -m benchmarks.report            # rewrite BENCHMARKS.md
    python -m benchmarks.report --check    # exit 1 if BENCHMARKS.md is out of date
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bc  # noqa: E402

# Section name -> the command that produces its JSON (shown while it has not been run).
SECTIONS = {
    "quality": "python -m benchmarks.quality",
    "quality_previous": "python -m benchmarks.quality   # on the previous embedded model (git history)",
    "sweep": "python -m benchmarks.quality --sweep --sweep-modes refine --sweep-rewards binary,hybrid",
    "sweep_sft": "python -m benchmarks.quality --sweep --sweep-modes sft --out benchmarks/results/sweep_sft.json",
    "sweep_previous": "python -m benchmarks.quality --sweep   # on the previous embedded model (git history)",
    "sweep_reward": "python -m benchmarks.quality --sweep --sweep-modes refine --sweep-rewards hybrid,cosine "
                    "--out benchmarks/results/sweep_reward.json",
    "sweep_lora": "python -m benchmarks.quality --sweep --scope lora --out benchmarks/results/sweep_lora.json",
    "adapt_step": "python -m benchmarks.adapt_step",
    "ruler": "python -m benchmarks.ruler",
    "latency": "python -m benchmarks.latency",
    "decode_batch": "python -m benchmarks.decode_batch",
    "load": "python -m benchmarks.load",
    "latency_lact": "python -m benchmarks.latency --model benchmarks/configs/lact-small --tokenizer "
                    "models/refine-tiny-deltanet --lengths 1024,4096,8192 --out benchmarks/results/latency_lact.json",
    "adapt_step_lact": "python -m benchmarks.adapt_step --model benchmarks/configs/lact-small --tokenizer "
                       "models/refine-tiny-deltanet --lengths 1024 --ns 1,4 --repeats 1 "
                       "--out benchmarks/results/adapt_step_lact.json",
    "load_1_replica": "python -m benchmarks.load --clients 1,4,8 --out benchmarks/results/load_1_replica.json",
    "load_2_replicas": "python -m benchmarks.load --replicas 2 --clients 1,4,8 "
                       "--out benchmarks/results/load_2_replicas.json",
    "session_move": "python -m benchmarks.session_move",
    "gpu": "bash benchmarks/gpu.sh   # on a CUDA machine",
}
MARKER = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def model_line(result: dict) -> str | None:
    m = result.get("model")
    if m:
        name = m.get("name") or Path(m.get("path", "?")).name + (f" ({m['weights']} weights)" if m.get("weights") else "")
        return (f"{name} ({m['parameters'] / 1e6:.1f}M parameters, {m['model_type']}, {m['layers']} layers, "
                f"{m['dtype']}, {m['backend']} kernels; weights {m['fingerprint']['weights_hash']})")
    if "server" in result:
        h = result["server"].get("health", {})
        return f"{h.get('model')} served on {h.get('device')} ({h.get('backend')} kernels)"
    if "config_name" in result:
        n = result.get("parameters")
        return f"DeltaNet {result['config_name']}, random weights" + (f", {n / 1e6:.0f}M parameters" if n else "")
    return None


def render(result: dict, plot_dir: str) -> str:
    """The markdown of one result section."""
    m = result["machine"]
    lines = [f"**Command:** `{result['command']}`  ",
             f"**Machine:** {bc.machine_summary(m)}; commit {m.get('commit') or 'unknown'}  "]
    model = model_line(result)
    if model:
        lines.append(f"**Model:** {model}  ")
    lines += [f"**Run:** {result['started']}, {result.get('seconds', 0):.0f} s", ""]
    for t in result["tables"]:
        lines += [f"*{t['title']}*", "", bc.markdown_table(t), ""]
    for note in result.get("notes", []):
        lines.append(f"- Note: {note}")
    if result.get("notes"):
        lines.append("")
    if result.get("plot"):
        lines += [f"![{result['benchmark']}]({plot_dir}/{result['plot']})", ""]
    return "\n".join(lines)


def section(name: str, results_dir: Path, plot_dir: str) -> str:
    path = results_dir / f"{name}.json"
    if not path.is_file():
        command = SECTIONS.get(name, f"python -m benchmarks.{name}")
        return f"_Not run yet._ Run `{command}` and then `python -m benchmarks.report`.\n"
    return render(json.loads(path.read_text()), plot_dir)


def regenerate(text: str, results_dir: Path, plot_dir: str) -> str:
    """``text`` with every marked section rebuilt."""
    return MARKER.sub(lambda mt: mt.group(1) + section(mt.group("name"), results_dir, plot_dir) + mt.group(4), text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--doc", type=Path, default=bc.REPO_ROOT / "BENCHMARKS.md")
    p.add_argument("--results", type=Path, default=bc.RESULTS_DIR)
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the document is out of date")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    text = args.doc.read_text()
    found = {mt.group("name") for mt in MARKER.finditer(text)}
    missing = sorted(set(SECTIONS) - found)
    if missing:
        print(f"warning: {args.doc} has no section markers for {', '.join(missing)}", file=sys.stderr)
    plot_dir = os.path.relpath(args.results, args.doc.parent)
    new = regenerate(text, args.results, plot_dir)
    if args.check:
        if new != text:
            print(f"{args.doc} is out of date: run python -m benchmarks.report", file=sys.stderr)
            return 1
        print(f"{args.doc} is up to date")
        return 0
    args.doc.write_text(new)
    print(f"rewrote {len(found)} sections of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
