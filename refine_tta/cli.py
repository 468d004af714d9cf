"""Command line of the library: adapt to a document and answer a question, in one process.

    refine-tta ask --document FILE --question "..." [--mode refine --steps 4 ...]
    refine-tta demo            # a generated document with a fact in it; base vs adapted answer

The server (``refine-tta serve``) adds its subcommand on top of these (see ``server/cli.py``).
Heavy imports (torch, fla) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from refine_tta.defaults import default_model_path


def add_refine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory or hub id (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="auto", help="named defaults (refine_tta.refine.config.PRESETS); auto: "
                                                     "from the model (embedded for the embedded model, else safe)")
    p.add_argument("--mode", default="refine", choices=["refine", "sft", "none"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--scope", default=None, choices=["full", "lora", "layers", "projections"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the full statistics as JSON")


def add_subcommands(sub) -> None:
    ask = sub.add_parser("ask", help="adapt to a document and answer a question about it")
    ask.add_argument("--document", required=True, help="text file ('-' for stdin)")
    ask.add_argument("--question", required=True)
    add_refine_options(ask)
    ask.set_defaults(func=cmd_ask)
    demo = sub.add_parser("demo", help="generated document with a fact; answer before and after adaptation")
    add_refine_options(demo)
    demo.add_argument("--tokens", type=int, default=768, help="document length in tokens")
    demo.set_defaults(func=cmd_demo)


def _config(args, loaded):
    from refine_tta.refine.config import RefineConfig, preset, preset_for_model

    overrides = {k: v for k, v in {"mode": args.mode, "steps": args.steps, "lr": args.lr,
                                   "scope": args.scope, "seed": args.seed}.items() if v is not None}
    name = preset_for_model(loaded.fingerprint.config_hash) if args.preset == "auto" else args.preset
    return RefineConfig.from_dict({**preset(name), **overrides})


def _adapt_and_answer(loaded, document: str, question: str, args, label: str):
    """Adapt (with a progress bar), then answer greedily from the session state."""
    import torch
    from tqdm import tqdm

    from refine_tta.model import SamplingConfig, generate
    from refine_tta.refine.loop import adapt

    tok = loaded.tokenizer
    cfg = _config(args, loaded)
    ids = torch.tensor([tok.encode(document)], device=loaded.device)
    bar = tqdm(total=cfg.steps, desc=f"adapt [{label}]", unit="step", file=sys.stderr, disable=cfg.mode == "none")

    def on_step(s):
        bar.set_postfix(reward=f"{s.get('reward_mean', float('nan')):.2f}", ntp=f"{s['ntp_loss']:.3f}")
        bar.update(1)

    result = adapt(loaded.model, ids, cfg, on_step=on_step)
    bar.close()
    prompt = tok.encode(question, add_special_tokens=False)
    with result.delta.applied(loaded.model):
        gen = generate(loaded.model, result.state, prompt, SamplingConfig(max_new_tokens=args.max_tokens, stop=("\n",)),
                       lambda t: tok.decode(t, skip_special_tokens=True), tok.eos_token_id)
    return result, gen


def _print_result(label, result, gen, as_json):
    t = result.stats["total"]
    print(f"[{label}] answer: {gen.text.strip()!r}")
    print(f"[{label}] document {t['document_tokens']} tokens, {t['steps']} steps in {t['seconds_adapt']:.1f} s, "
          f"NTP loss {t['ntp_loss_before']:.3f} -> {t['ntp_loss_after']:.3f}, "
          f"state {t['state_bytes'] / 1024:.0f} KiB, delta {t['delta_bytes'] / 1024:.0f} KiB, "
          f"time to first token {gen.ttft_s * 1000:.0f} ms, {gen.tokens_per_s:.0f} tok/s")
    if as_json:
        print(json.dumps(result.stats, indent=1))


def _load(args):
    from refine_tta.model import load_model

    t = time.perf_counter()
    loaded = load_model(args.model or default_model_path(), device=args.device)
    print(f"loaded {loaded.name} on {loaded.device} ({loaded.backend.name} kernels) in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    return loaded


def cmd_ask(args) -> int:
    document = sys.stdin.read() if args.document == "-" else open(args.document, encoding="utf-8").read()
    loaded = _load(args)
    result, gen = _adapt_and_answer(loaded, document, args.question, args, args.mode)
    _print_result(args.mode, result, gen, args.json)
    return 0


def cmd_demo(args) -> int:
    import random

    from refine_tta.train.corpus import HELDOUT_TEXT_PATH, iter_documents
    from refine_tta.train.needles import filler_window, make_needle_document

    loaded = _load(args)
    tok = loaded.tokenizer
    rng = random.Random(args.seed)
    doc = make_needle_document(rng, filler_window(rng, iter_documents(HELDOUT_TEXT_PATH), args.tokens * 6),
                               n_needles=2, target_tokens=args.tokens,
                               count_tokens=lambda s: len(tok.encode(s, add_special_tokens=False)))
    asked = doc.needles[doc.query_index]
    print(f"document: {len(tok.encode(doc.context))} tokens of held-out prose with the fact {asked.statement!r} "
          f"at depth {doc.depth:.2f}")
    print(f"question: {doc.question!r}   expected: {doc.answer!r}")
    mode = args.mode
    for label in ("none", mode) if mode != "none" else ("none",):
        args.mode = label
        result, gen = _adapt_and_answer(loaded, doc.context, doc.text[len(doc.context):], args, label)
        _print_result(label, result, gen, args.json)
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
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
