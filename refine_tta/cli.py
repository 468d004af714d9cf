"""Command line of the library: adapt to a document and answer a question, in one process.

    refine-tta ask --document FILE --question "..." [--mode refine --steps 4 ...]
    refine-tta demo            # a generated document with a fact in it: the gold answer's
                               # log-prob and rank, and the greedy answer, before and after adaptation

The server (``refine-tta serve``) adds its subcommand on top of these (see ``server/cli.py``).
Heavy imports (torch, fla) happen inside the commands, after the thread policy is set
(:mod:`refine_tta.threads`), so ``--help`` is instant and OpenMP never spins on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from refine_tta.defaults import default_model_path

DEMO_MODES = ("sft", "refine")


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory or hub id (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="embedded", help="named defaults (refine_tta.refine.config.PRESETS)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--scope", default=None, choices=["full", "lora", "layers"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: chosen from the CPUs not busy with other work)")


def add_subcommands(sub) -> None:
    ask = sub.add_parser("ask", help="adapt to a document and answer a question about it")
    ask.add_argument("--document", required=True, help="text file ('-' for stdin)")
    ask.add_argument("--question", required=True)
    add_common_options(ask)
    ask.add_argument("--mode", default="refine", choices=["refine", "sft", "none"])
    ask.add_argument("--json", action="store_true", help="print the full statistics as JSON")
    ask.set_defaults(func=cmd_ask)
    demo = sub.add_parser("demo", help="a generated document with a fact: the gold answer's log-prob and rank, "
                                       "and the greedy answer, before and after adaptation")
    add_common_options(demo)
    demo.add_argument("--modes", default=",".join(DEMO_MODES),
                      help=f"adaptation modes to compare with the base model (default {','.join(DEMO_MODES)})")
    demo.add_argument("--tokens", type=int, default=768, help="document length in tokens")
    demo.set_defaults(func=cmd_demo)


def _config(args, mode: str):
    from refine_tta.refine.config import RefineConfig, preset

    overrides = {k: v for k, v in {"mode": mode, "steps": args.steps, "lr": args.lr,
                                   "scope": args.scope, "seed": args.seed}.items() if v is not None}
    return RefineConfig.from_dict({**preset(args.preset), **overrides})


def _progress(steps: int, label: str, disable: bool):
    """A tqdm bar shown from the start of the adaptation (0/steps), moved by ``on_step``."""
    from tqdm import tqdm

    bar = tqdm(total=steps, desc=f"adapt [{label}]", unit="step", file=sys.stderr, disable=disable)

    def on_step(s):
        reward = s.get("reward_mean")
        bar.set_postfix(**({"reward": f"{reward:.2f}"} if reward is not None else {}), ntp=f"{s['ntp_loss']:.3f}")
        bar.update(1)

    return bar, on_step


def _print_result(label, result, gen, as_json):
    t = result.stats["total"]
    print(f"[{label}] answer: {gen.text.strip()!r}")
    print(f"[{label}] document {t['document_tokens']} tokens, {t['steps']} steps in {t['seconds_adapt']:.1f} s, "
          f"NTP loss {t['ntp_loss_before']:.3f} -> {t['ntp_loss_after']:.3f}, "
          f"state {t['state_bytes'] / 1024:.0f} KiB, delta {t['delta_bytes'] / 1024:.0f} KiB, "
          f"time to first token {gen.ttft_s * 1000:.0f} ms, {gen.tokens_per_s:.0f} tok/s")
    if as_json:
        print(json.dumps(result.stats, indent=1))


def _start(args):
    """Check the model path (no torch yet), set the thread policy, then load the model."""
    from refine_tta.preflight import model_problem
    from refine_tta.threads import configure_threads

    model = args.model or default_model_path()
    problem = model_problem(model)
    if problem:
        raise ValueError(problem)
    policy = configure_threads(args.threads)
    print(f"threads: {policy.describe()}", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    from refine_tta.model import ModelLoadError, load_model

    hf_logging.disable_progress_bar()  # a 0.1 s "Loading weights" bar says nothing

    t = time.perf_counter()
    try:
        loaded = load_model(model, device=args.device)
    except ModelLoadError as exc:
        raise ValueError(str(exc)) from None
    print(f"loaded {loaded.name} on {loaded.device} ({loaded.backend.name} kernels) in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    return loaded


def cmd_ask(args) -> int:
    document = sys.stdin.read() if args.document == "-" else open(args.document, encoding="utf-8").read()
    cfg = _config(args, args.mode)
    loaded = _start(args)
    import torch

    tok = loaded.tokenizer
    ids = tok.encode(document)
    cfg.validate_document(len(ids))
    from refine_tta.engine.text import SamplingConfig, TextCodec, generate_text
    from refine_tta.refine.loop import adapt

    bar, on_step = _progress(cfg.steps, cfg.mode, disable=cfg.mode == "none")
    result = adapt(loaded.model, torch.tensor([ids], device=loaded.device), cfg, on_step=on_step)
    bar.close()
    prompt = tok.encode(args.question, add_special_tokens=False)
    gen = generate_text(loaded.model, result.state, prompt, SamplingConfig(max_new_tokens=args.max_tokens, stop=("\n",)),
                        TextCodec(tok), weights=result.delta)
    _print_result(cfg.mode, result, gen, args.json)
    return 0


def cmd_demo(args) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in DEMO_MODES]
    if unknown or not modes:
        raise ValueError(f"--modes must name some of {', '.join(DEMO_MODES)}; got {args.modes!r}")
    configs = [_config(args, "none")] + [_config(args, m) for m in modes]  # checked before loading anything
    loaded = _start(args)
    from refine_tta.demo import format_header, format_rows, make_demo_document, run_mode

    doc = make_demo_document(loaded.tokenizer, args.seed, args.tokens)
    for line in format_header(doc, args.seed, loaded.name):
        print(line, flush=True)
    rows = []
    for cfg in configs:
        bar, on_step = _progress(cfg.steps, cfg.mode, disable=cfg.mode == "none")
        rows.append(run_mode(loaded, doc, cfg, args.max_tokens, on_step))
        bar.close()
    for line in format_rows(rows):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refine-tta", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"refine-tta {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
