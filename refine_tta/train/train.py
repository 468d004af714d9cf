"""Train the embedded default model: a small DeltaNet that reads long documents and recalls facts.

    python -m refine_tta.train.train --out models/refine-tiny-deltanet

Seeded and reproducible (given the same thread count): data order, needle facts, initialisation
and the length curriculum all come from ``--seed``. Runs on CPU with refine_tta's PyTorch kernels.
The mixture is real prose (``refine_tta/train/data/longbench_prose.txt.gz``, shipped) and synthetic
key-value retrieval (``refine_tta.train.needles.training_example``: facts hidden in prose with
questions about them at the end). Every ``--save-every`` steps the model directory is rewritten
(bf16 weights, tokenizer kept), so an early model is usable while training continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from refine_tta.train.corpus import HELDOUT_TEXT_PATH, TRAIN_TEXT_PATH, iter_documents
from refine_tta.train.needles import filler_window, make_needle_document, training_example

log = logging.getLogger("refine_tta.train")

# (fraction of training done, {length: probability}): longer documents as training goes on.
CURRICULUM = (
    (0.0, {256: 0.3, 512: 0.4, 1024: 0.3}),
    (0.25, {512: 0.3, 1024: 0.4, 2048: 0.3}),
    (0.6, {512: 0.15, 1024: 0.3, 2048: 0.35, 4096: 0.2}),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("models/refine-tiny-deltanet"),
                   help="model directory; must already hold the tokenizer (python -m refine_tta.train.tokenizer)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--needle-frac", type=float, default=0.5, help="share of sequences that are retrieval examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop early (and say so in the log) after this many minutes")
    p.add_argument("--run-dir", type=Path, default=Path("runs/train"), help="fp32 checkpoints and logs")
    p.add_argument("--resume", type=Path, default=None,
                   help="continue from a checkpoint.pt (model, optimizer, step, log); the schedule follows the "
                        "new --steps and the data stream is reseeded with seed + step")
    return p.parse_args(argv)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of base."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def pick_length(rng: random.Random, frac_done: float) -> int:
    table = [t for start, t in CURRICULUM if frac_done >= start][-1]
    lengths, weights = zip(*table.items())
    return rng.choices(lengths, weights)[0]


class Batcher:
    """Yields token lists (BOS + text + EOS) of a chosen length: prose windows or retrieval examples."""

    def __init__(self, tokenizer, texts: list[str], seed: int, needle_frac: float):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.texts = texts
        self.needle_frac = needle_frac
        log.info("tokenizing %d training documents", len(texts))
        ids = []
        for t in texts:
            ids.extend(tokenizer.encode(t, add_special_tokens=False))
            ids.append(tokenizer.eos_token_id)
        self.stream = torch.tensor(ids, dtype=torch.long)
        log.info("prose stream: %d tokens", len(self.stream))

    def count(self, s: str) -> int:
        return len(self.tok.encode(s, add_special_tokens=False))

    def sample(self, length: int) -> list[int]:
        bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
        if self.rng.random() < self.needle_frac:
            text = training_example(self.rng, self.texts, length - 2, self.count)
            return [bos] + self.tok.encode(text, add_special_tokens=False) + [eos]
        start = self.rng.randrange(0, len(self.stream) - length)
        return [bos] + self.stream[start:start + length - 1].tolist()


def build_model(tokenizer, args):
    from fla.models import DeltaNetConfig
    from transformers import AutoModelForCausalLM

    from refine_tta.model.loading import prepare_model, register_fla_models

    register_fla_models()
    config = DeltaNetConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads, vocab_size=len(tokenizer),
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=16384, fuse_cross_entropy=False,
        use_cache=True,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    prepare_model(model, torch.device("cpu"))
    return model


def token_loss_sum(model, ids: list[int]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of one sequence, and the number of predicted tokens."""
    x = torch.tensor([ids])
    hidden = model.model(input_ids=x, use_cache=False, return_dict=True).last_hidden_state
    logits = model.lm_head(hidden[:, :-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), x[0, 1:], reduction="sum"), len(ids) - 1


@torch.no_grad()
def evaluate(model, tok, heldout: list[str], seed: int) -> dict:
    """Held-out prose loss (2 x 1K windows) and teacher-forced needle recall at 512/1K tokens."""
    model.eval()
    rng = random.Random(seed)
    losses = []
    for _ in range(2):
        text = filler_window(rng, heldout, 6000)
        ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)[:1023]
        loss, n = token_loss_sum(model, ids)
        losses.append(loss.item() / n)
    recall = {}
    for length in (512, 1024):
        hits = 0
        for _ in range(8):
            doc = make_needle_document(rng, filler_window(rng, heldout, length * 6), n_needles=3,
                                       target_tokens=length, count_tokens=lambda s: len(tok.encode(s)))
            prompt = [tok.bos_token_id] + tok.encode(doc.text, add_special_tokens=False)
            answer = tok.encode(doc.completion, add_special_tokens=False)
            x = torch.tensor([prompt + answer])
            h = model.model(input_ids=x, use_cache=False, return_dict=True).last_hidden_state
            pred = model.lm_head(h[0, len(prompt) - 1:-1]).argmax(-1).tolist()
            hits += int(pred == answer)
        recall[length] = hits / 8
    model.train()
    return {"heldout_loss": sum(losses) / len(losses), "needle_tf_recall": recall}


def save_model(model, tok, out: Path) -> None:
    """Write config.json + bf16 model.safetensors into ``out`` atomically (tokenizer files untouched)."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    model.to(torch.float32)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tmp / name).exists():
            (tmp / name).replace(out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.out)
    texts = iter_documents(TRAIN_TEXT_PATH)
    heldout = iter_documents(HELDOUT_TEXT_PATH)
    batcher = Batcher(tok, texts, args.seed, args.needle_frac)
    model = build_model(tok, args)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    args.run_dir.mkdir(parents=True, exist_ok=True)
    history = {"args": {k: str(v) for k, v in vars(args).items()}, "n_params": n_params, "steps": [], "evals": []}
    t0 = time.time()
    tokens_seen = 0
    first_step = 0
    if args.resume is not None:
        ckpt = torch.load(args.resume, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        first_step = ckpt["step"]
        previous = ckpt.get("history") or json.loads((args.out / "training_log.json").read_text())
        history["steps"], history["evals"] = previous["steps"][:first_step], previous["evals"]
        history["resumed"] = {"from_step": first_step, "previous_args": previous["args"]}
        tokens_seen = history["steps"][-1]["tokens"]
        t0 -= history["steps"][-1]["seconds"]
        batcher.rng = random.Random(args.seed + first_step)
        log.info("resumed from %s at step %d", args.resume, first_step)
    stopped_early = False
    for step in range(first_step, args.steps):
        if args.max_minutes is not None and time.time() - t0 > args.max_minutes * 60:
            stopped_early = True
            log.info("stopping early at step %d: --max-minutes %.0f reached", step, args.max_minutes)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        seqs, n_tok = [], 0
        while n_tok < args.tokens_per_step:
            length = min(pick_length(batcher.rng, step / args.steps), args.tokens_per_step)
            seqs.append(batcher.sample(length))
            n_tok += len(seqs[-1])
        total_pred = sum(len(s) - 1 for s in seqs)
        loss_total = 0.0
        for s in seqs:
            loss, _ = token_loss_sum(model, s)
            (loss / total_pred).backward()
            loss_total += loss.item()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += n_tok
        elapsed = time.time() - t0
        history["steps"].append({"step": step + 1, "loss": loss_total / total_pred, "lr": opt.param_groups[0]["lr"],
                                 "grad_norm": gnorm, "tokens": tokens_seen, "seconds": elapsed})
        if (step + 1) % 10 == 0:
            log.info("step %d/%d loss %.3f gnorm %.2f tok/s %.0f elapsed %.1f min", step + 1, args.steps,
                     loss_total / total_pred, gnorm, tokens_seen / elapsed, elapsed / 60)
        if (step + 1) % args.eval_every == 0:
            ev = evaluate(model, tok, heldout, args.seed + 1)
            ev.update(step=step + 1, seconds=elapsed)
            history["evals"].append(ev)
            log.info("eval %s", ev)
        if (step + 1) % args.save_every == 0:
            save_model(model, tok, args.out)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1, "history": history},
                       args.run_dir / "checkpoint.pt")
            (args.out / "training_log.json").write_text(json.dumps(history, indent=1))
    history["wall_seconds"] = time.time() - t0
    history["stopped_early"] = stopped_early
    history["final_eval"] = evaluate(model, tok, heldout, args.seed + 1)
    save_model(model, tok, args.out)
    (args.out / "training_log.json").write_text(json.dumps(history, indent=1))
    log.info("done in %.1f min; final eval %s", history["wall_seconds"] / 60, history["final_eval"])


if __name__ == "__main__":
    main()
