"""Staged, resumable training of the embedded model: learn the lookup first, then read longer text.

    python -m refine_tta.train.recipe --run-dir runs/recipe --max-minutes 120     # train / continue
    python -m refine_tta.train.recipe --run-dir runs/recipe --export DIR --decay-tokens 2000000

The same training command continues from ``<run-dir>/checkpoint.pt`` when it exists, exactly where
it stopped (model, AdamW state, data RNG, token counters, phase and history are all in the
checkpoint, written atomically every ``--checkpoint-minutes`` and on a clean stop). The phases and
their data are ``refine_tta.train.phases``; the gates that advance them are ``refine_tta.train.gates``:

* A (fact sheets + copy, 64-256 tokens) -> B when, at 256 tokens, exact match >= 0.9 and the answer
  loss with the fact removed exceeds the loss with it present by > 2 nats per token;
* B (facts in filler/prose, 256-512 tokens, half plain prose) -> C when exact match >= 0.8 on the
  benchmark's prompt at 512 tokens;
* C (benchmark format 512-2K, 60% prose) runs until stopped.

The curriculum inside a phase follows the tokens seen in that phase, never a planned step count.
The learning rate warms up linearly over ``--warmup-tokens`` and then stays constant; release
weights come from ``--export``, which copies the checkpoint's model and decays the learning rate
linearly to 0 over ``--decay-tokens`` on the current phase's data, then writes bf16 safetensors,
the tokenizer and ``training_log.json`` to ``DIR`` (the checkpoint itself is not changed).

Batches are equal-length sequences (``--tokens-per-step`` tokens); the LM head runs only on the
positions with a loss weight. Throughput is reported in process (CPU) time, so a busy machine does
not distort it. This module is training-only: nothing in the runtime imports ``refine_tta.train``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from refine_tta.train.corpus import HELDOUT_TEXT_PATH, TRAIN_TEXT_PATH, iter_documents
from refine_tta.train.gates import lookup_gate, needle_gate, pad_batch, prose_loss
from refine_tta.train.phases import Example, PhaseA, PhaseB, PhaseC, Sampler, TokenCoder

log = logging.getLogger("refine_tta.train.recipe")

PHASES = ("A", "B", "C")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="checkpoint.pt, metrics.json and train.log live here")
    p.add_argument("--tokenizer", type=Path, default=Path("models/refine-tiny-deltanet"),
                   help="directory holding tokenizer.json (kept: byte-level BPE, digits split)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-tokens", type=int, default=400_000)
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--copy-share", type=float, default=0.25, help="phase A: share of copy sequences")
    p.add_argument("--eval-every-tokens", type=int, default=1_000_000)
    p.add_argument("--gate-docs", type=int, default=200)
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly (with a checkpoint) after this wall time")
    p.add_argument("--max-tokens", type=int, default=None, help="stop cleanly once this many tokens are seen in all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export", type=Path, default=None, help="write release weights here instead of training")
    p.add_argument("--decay-tokens", type=int, default=2_000_000, help="--export: linear LR decay length")
    p.add_argument("--curve", action="store_true", help="print the gate curve of <run-dir>/metrics.json and exit")
    return p.parse_args(argv)


# --- model ------------------------------------------------------------------------------------

def build_model(vocab_size: int, hidden: int, layers: int, heads: int, seed: int, bos: int, eos: int, pad: int):
    """A fresh fla DeltaNet (tied embeddings, short convolutions) with refine_tta's CPU kernels, in train mode."""
    from fla.models import DeltaNetConfig
    from transformers import AutoModelForCausalLM

    from refine_tta.model.loading import prepare_model

    config = DeltaNetConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_heads=heads, vocab_size=vocab_size,
        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        max_position_embeddings=16384, fuse_cross_entropy=False, use_cache=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    prepare_model(model, torch.device("cpu"))
    model.train()
    return model


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, betas (0.9, 0.95); weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def batch_loss(model, examples: list[Example]) -> tuple[torch.Tensor, int]:
    """Weighted mean next-token loss of equal-length examples; the LM head only on weighted positions.

    Returns (loss, number of weighted tokens).
    """
    ids, w = pad_batch(examples, pad_id=0)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # [B, T-1, D]
    weights = w[:, 1:]
    mask = weights > 0
    logits = model.lm_head(hidden[mask]).float()  # [N, V]
    ce = F.cross_entropy(logits, ids[:, 1:][mask], reduction="none")
    wsel = weights[mask]
    return (ce * wsel).sum() / wsel.sum().clamp_min(1e-8), int(mask.sum())


def lr_at(tokens: int, base: float, warmup_tokens: int) -> float:
    """Linear warmup over ``warmup_tokens``, then constant."""
    return base * min(1.0, (tokens + 1) / max(1, warmup_tokens))


# --- state -------------------------------------------------------------------------------------

@dataclass
class Counters:
    """Everything besides model/optimizer that a resume needs."""

    step: int = 0
    tokens: int = 0
    phase: str = "A"
    phase_tokens: int = 0
    next_eval: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    history: dict = field(default_factory=lambda: {"steps": [], "evals": [], "phases": [], "runs": []})


def save_checkpoint(path: Path, model, opt, rng: random.Random, counters: Counters, args: argparse.Namespace) -> None:
    """Write the checkpoint atomically (temp file + rename)."""
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
             "torch_rng": torch.get_rng_state(), "counters": counters.__dict__,
             "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, opt) -> tuple[random.Random, Counters]:
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    if opt is not None:
        opt.load_state_dict(state["opt"])
    rng = random.Random()
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return rng, Counters(**state["counters"])


# --- data ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Data:
    coder: TokenCoder
    texts: list[str]
    heldout: list[str]
    stream: list[int]
    heldout_stream: list[int]


def token_stream(coder: TokenCoder, texts: list[str], cache: Path | None) -> list[int]:
    """All ``texts`` tokenized and joined by EOS (cached as a tensor file)."""
    if cache is not None and cache.exists():
        return torch.load(cache).tolist()
    ids: list[int] = []
    for t in texts:
        ids.extend(coder.encode(t))
        ids.append(coder.eos)
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        torch.save(torch.tensor(ids, dtype=torch.int32), tmp)
        os.replace(tmp, cache)
    return ids


def load_data(tokenizer_dir: Path, cache_dir: Path | None) -> Data:
    from transformers import AutoTokenizer

    coder = TokenCoder(AutoTokenizer.from_pretrained(tokenizer_dir))
    texts, heldout = iter_documents(TRAIN_TEXT_PATH), iter_documents(HELDOUT_TEXT_PATH)
    stream = token_stream(coder, texts, cache_dir / "train_stream.pt" if cache_dir else None)
    held = token_stream(coder, heldout[:200], cache_dir / "heldout_stream.pt" if cache_dir else None)
    return Data(coder, texts, heldout, stream, held)


def make_sampler(phase: str, data: Data, args: argparse.Namespace) -> Sampler:
    if phase == "A":
        return PhaseA(data.coder, data.stream, copy_share=args.copy_share)
    if phase == "B":
        return PhaseB(data.coder, data.stream, data.texts)
    if phase == "C":
        return PhaseC(data.coder, data.stream, data.texts)
    raise ValueError(f"unknown phase {phase!r}; choose one of {PHASES}")


# --- gates --------------------------------------------------------------------------------------

def evaluate(model, data: Data, phase: str, gate_docs: int) -> tuple[dict, bool]:
    """The current phase's gate measurements (plus cheap context figures) and whether it passed."""
    ev: dict = {}
    lookup = lookup_gate(model, data.coder, 256, gate_docs)
    ev["lookup_256"] = lookup.to_dict()
    if phase == "A":
        return ev, lookup.exact_match >= 0.9 and lookup.gap > 2.0
    needle = needle_gate(model, data.coder, data.heldout, 512, max(50, gate_docs // 2))
    ev["needle_512"] = needle.to_dict()
    ev["heldout_loss"] = prose_loss(model, data.coder, data.heldout_stream, windows=4)
    if phase == "B":
        return ev, needle.exact_match >= 0.8
    ev["needle_1024"] = needle_gate(model, data.coder, data.heldout, 1024, 50).to_dict()
    return ev, False


# --- loop ---------------------------------------------------------------------------------------

def train_step(model, opt, sampler: Sampler, rng: random.Random, counters: Counters, args) -> dict:
    lr = lr_at(counters.tokens, args.lr, args.warmup_tokens)
    for group in opt.param_groups:
        group["lr"] = lr
    length, examples = sampler.batch(rng, counters.phase_tokens, args.tokens_per_step)
    loss, n_loss = batch_loss(model, examples)
    loss.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    opt.step()
    opt.zero_grad(set_to_none=True)
    n_tok = length * len(examples)
    counters.step += 1
    counters.tokens += n_tok
    counters.phase_tokens += n_tok
    return {"step": counters.step, "tokens": counters.tokens, "phase": counters.phase, "length": length,
            "loss": float(loss.detach()), "loss_tokens": n_loss, "lr": lr, "grad_norm": gnorm}


def write_metrics(run_dir: Path, counters: Counters) -> None:
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(counters.history, indent=1))
    os.replace(tmp, run_dir / "metrics.json")


class StopFlag:
    """Set by SIGTERM/SIGINT so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.stop = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, *_):
        self.stop = True


def train(args: argparse.Namespace) -> Counters:
    args.run_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(args.tokenizer, args.run_dir)
    tok = data.coder.tok
    model = build_model(len(tok), args.hidden, args.layers, args.heads, args.seed, tok.bos_token_id,
                        tok.eos_token_id, tok.pad_token_id)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    ckpt = args.run_dir / "checkpoint.pt"
    if ckpt.exists():
        rng, counters = load_checkpoint(ckpt, model, opt)
        log.info("resumed from %s: step %d, %d tokens, phase %s", ckpt, counters.step, counters.tokens, counters.phase)
    else:
        rng, counters = random.Random(args.seed), Counters()
        counters.history["phases"].append({"phase": "A", "tokens": 0, "step": 0})
    counters.history["runs"].append({"start_step": counters.step, "args": {k: str(v) for k, v in vars(args).items()}})
    log.info("model %.2fM parameters, phase %s, lr %g", sum(p.numel() for p in model.parameters()) / 1e6,
             counters.phase, args.lr)
    sampler = make_sampler(counters.phase, data, args)
    flag = StopFlag()
    wall0, last_ckpt = time.time(), time.time()
    window_cpu, window_tok, window_loss = 0.0, 0, []
    while not flag.stop:
        if args.max_minutes is not None and time.time() - wall0 > args.max_minutes * 60:
            log.info("--max-minutes %.1f reached", args.max_minutes)
            break
        if args.max_tokens is not None and counters.tokens >= args.max_tokens:
            log.info("--max-tokens %d reached", args.max_tokens)
            break
        c0, w0, t_before = time.process_time(), time.time(), counters.tokens
        rec = train_step(model, opt, sampler, rng, counters, args)
        dc, dw = time.process_time() - c0, time.time() - w0
        counters.cpu_seconds += dc
        counters.wall_seconds += dw
        window_cpu += dc
        window_tok += counters.tokens - t_before
        window_loss.append(rec["loss"])
        if counters.step % 10 == 0:
            rec["tok_per_cpu_s"] = window_tok_rate = window_tok / max(window_cpu, 1e-9)
            rec["mean_loss_10"] = sum(window_loss) / len(window_loss)
            rec["cpu_seconds"] = counters.cpu_seconds
            counters.history["steps"].append(rec)
            log.info("step %d phase %s tokens %.2fM loss %.3f (last 10) gnorm %.2f lr %.2g ~%.0f tok/cpu-s",
                     counters.step, counters.phase, counters.tokens / 1e6, rec["mean_loss_10"], rec["grad_norm"],
                     rec["lr"], window_tok_rate)
            window_cpu, window_tok, window_loss = 0.0, 0, []
        if counters.tokens >= counters.next_eval:
            counters.next_eval = counters.tokens + args.eval_every_tokens
            ev, passed = evaluate(model, data, counters.phase, args.gate_docs)
            ev.update(step=counters.step, tokens=counters.tokens, phase=counters.phase,
                      phase_tokens=counters.phase_tokens, cpu_seconds=counters.cpu_seconds, gate_passed=passed)
            counters.history["evals"].append(ev)
            log.info("eval %s", json.dumps(ev))
            if passed and counters.phase != PHASES[-1]:
                counters.phase = PHASES[PHASES.index(counters.phase) + 1]
                counters.phase_tokens = 0
                counters.history["phases"].append({"phase": counters.phase, "tokens": counters.tokens,
                                                   "step": counters.step})
                sampler = make_sampler(counters.phase, data, args)
                log.info("gate passed: phase %s from %d tokens", counters.phase, counters.tokens)
                save_checkpoint(args.run_dir / f"checkpoint_gate_{counters.phase}.pt", model, opt, rng, counters, args)
            write_metrics(args.run_dir, counters)
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint(ckpt, model, opt, rng, counters, args)
            write_metrics(args.run_dir, counters)
            last_ckpt = time.time()
    save_checkpoint(ckpt, model, opt, rng, counters, args)
    write_metrics(args.run_dir, counters)
    log.info("stopped at step %d, %d tokens, phase %s; checkpoint %s", counters.step, counters.tokens,
             counters.phase, ckpt)
    return counters


def export(args: argparse.Namespace) -> None:
    """Release weights: the checkpoint's model, LR decayed linearly to 0 over ``--decay-tokens``."""
    data = load_data(args.tokenizer, args.run_dir)
    tok = data.coder.tok
    state = torch.load(args.run_dir / "checkpoint.pt", weights_only=False)
    shape = state["shape"]
    model = build_model(len(tok), shape["hidden"], shape["layers"], shape["heads"], args.seed,
                        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    rng, counters = load_checkpoint(args.run_dir / "checkpoint.pt", model, opt)
    rng = random.Random(args.seed + 10_000 + counters.step)  # decay data differs from the training stream
    sampler = make_sampler(counters.phase, data, args)
    base = opt.param_groups[0]["lr"]
    start = counters.tokens
    decay_log = []
    while counters.tokens - start < args.decay_tokens:
        frac = (counters.tokens - start) / args.decay_tokens
        args_lr = copy.copy(args)
        args_lr.lr, args_lr.warmup_tokens = base * (1 - frac), 0
        rec = train_step(model, opt, sampler, rng, counters, args_lr)
        if counters.step % 10 == 0:
            decay_log.append(rec)
            log.info("decay step %d loss %.3f lr %.2g", counters.step, rec["loss"], rec["lr"])
    ev, _ = evaluate(model, data, "C", args.gate_docs)
    counters.history["release"] = {"decay_tokens": args.decay_tokens, "from_tokens": start, "eval": ev,
                                   "decay_steps": decay_log}
    out = args.export
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(args.tokenizer / name, tmp / name)
    (tmp / "training_log.json").write_text(json.dumps(counters.history, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("release weights in %s; eval %s", out, json.dumps(ev))


def curve_table(history: dict) -> str:
    """The gate measurements vs tokens seen, one line per evaluation (markdown table)."""
    lines = ["| tokens | phase | cpu h | EM@256 | answer loss present | removed | gap (nats) | EM@512 | EM@1K "
             "| held-out loss |",
             "| ---: | :-: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(value) -> str:
        return "" if value is None else f"{value:.2f}"

    for ev in history["evals"]:
        lk = ev["lookup_256"]
        em512 = ev.get("needle_512", {}).get("exact_match")
        em1k = ev.get("needle_1024", {}).get("exact_match")
        lines.append(f"| {ev['tokens'] / 1e6:.2f}M | {ev['phase']} | {ev['cpu_seconds'] / 3600:.2f} | "
                     f"{lk['exact_match']:.3f} | {lk['present_loss']:.3f} | {lk['removed_loss']:.3f} | "
                     f"{lk['gap']:.3f} | {cell(em512)} | {cell(em1k)} | {cell(ev.get('heldout_loss'))} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.curve:
        print(curve_table(json.loads((args.run_dir / "metrics.json").read_text())))
        return
    torch.set_num_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(args.run_dir / "train.log")])
    if args.export is not None:
        export(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
