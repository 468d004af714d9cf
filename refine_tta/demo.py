"""The demo: what adaptation does to one generated document, measured and said plainly.

A document of held-out prose (text the embedded model never trained on) with facts stated in it,
one of them asked. For the base model (mode ``none``: the document read, nothing adapted) and for
each adaptation mode, from the same base weights:

- the gold answer's log-probability (teacher-forced after the question, nats; and per token) and
  the rank of its first token among the whole vocabulary (1 = the model's top choice);
- the greedy answer (stopped at a newline) and whether it is right (``is_correct``: exact match
  of its first line);
- the adaptation's time and the session's bytes (recurrent state + parameter delta).

The document comes from ``seed`` and nothing else: no seed or document is picked for a good
result (a different ``--seed`` is a different document).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from refine_tta.engine.text import SamplingConfig, TextCodec, generate_text
from refine_tta.model import read
from refine_tta.model.loading import LoadedModel
from refine_tta.model.state import DocumentState
from refine_tta.refine.config import RefineConfig
from refine_tta.refine.loop import adapt


@dataclass(frozen=True)
class AnswerScore:
    """logprob: sum of the answer tokens' log-probabilities (nats); per_token: -logprob / tokens;
    rank: rank of the answer's first token in the next-token distribution (1 = argmax)."""

    logprob: float
    per_token: float
    rank: int


@dataclass(frozen=True)
class DemoDocument:
    """context_ids: the document with BOS; prompt_ids: the question after it; answer_ids: the gold
    completion (" " + answer) as it follows the prompt."""

    context_ids: list[int]
    prompt_ids: list[int]
    answer_ids: list[int]
    question: str
    answer: str
    fact: str
    depth: float
    n_facts: int


@dataclass(frozen=True)
class DemoRow:
    """One mode's result on the demo document."""

    mode: str
    steps: int
    score: AnswerScore
    answer: str
    correct: bool
    seconds_adapt: float
    state_bytes: int
    delta_bytes: int
    ntp_before: float
    ntp_after: float


@torch.no_grad()
def score_answer(model: torch.nn.Module, state: DocumentState, prompt_ids: list[int],
                 answer_ids: list[int]) -> AnswerScore:
    """Teacher-forced score of ``answer_ids`` [A] after ``prompt_ids`` [P], read from ``state``."""
    if not prompt_ids or not answer_ids:
        raise ValueError("score_answer needs a non-empty prompt and answer")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids[:-1]], device=device)  # [1, P + A - 1]
    logits = read(model, ids, state).logits[0, len(prompt_ids) - 1:].float()  # [A, V]
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(answer_ids, device=device)  # [A]
    token_logp = logp.gather(1, target[:, None])[:, 0]  # [A]
    first = logp[0]
    rank = int((first > first[target[0]]).sum()) + 1
    total = float(token_logp.sum())
    return AnswerScore(total, -total / len(answer_ids), rank)


def make_demo_document(tokenizer, seed: int, target_tokens: int, n_facts: int = 2) -> DemoDocument:
    """The document for ``seed``: held-out prose of about ``target_tokens`` tokens, ``n_facts`` facts."""
    from refine_tta.train.corpus import HELDOUT_TEXT_PATH, iter_documents
    from refine_tta.train.needles import filler_window, make_needle_document

    rng = random.Random(f"refine-tta demo:{seed}")
    doc = make_needle_document(rng, filler_window(rng, iter_documents(HELDOUT_TEXT_PATH), target_tokens * 6),
                               n_needles=n_facts, target_tokens=target_tokens,
                               count_tokens=lambda s: len(tokenizer.encode(s, add_special_tokens=False)))
    prompt_text = doc.text[len(doc.context):]
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    joint = tokenizer.encode(prompt_text + doc.completion, add_special_tokens=False)
    if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        answer_ids = joint[len(prompt_ids):]  # the answer's tokens as they follow the prompt
    else:
        answer_ids = tokenizer.encode(doc.completion, add_special_tokens=False)
    return DemoDocument(tokenizer.encode(doc.context), prompt_ids, answer_ids, doc.question, doc.answer,
                        doc.needles[doc.query_index].statement, doc.depth, len(doc.needles))


def run_mode(loaded: LoadedModel, doc: DemoDocument, config: RefineConfig, max_new_tokens: int,
             on_step=None) -> DemoRow:
    """Adapt to the document with ``config`` (from the base weights), then score and answer."""
    from refine_tta.train.needles import is_correct

    tok = loaded.tokenizer
    result = adapt(loaded.model, torch.tensor([doc.context_ids], device=loaded.device), config, on_step=on_step)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop=("\n",))
    with result.delta.applied(loaded.model):
        score = score_answer(loaded.model, result.state, doc.prompt_ids, doc.answer_ids)
    gen = generate_text(loaded.model, result.state, doc.prompt_ids, sampling, TextCodec(tok), weights=result.delta)
    total = result.stats["total"]
    return DemoRow(config.mode, total["steps"], score, gen.text.strip(), is_correct(gen.text, doc.answer),
                   total["seconds_adapt"], total["state_bytes"], total["delta_bytes"],
                   total["ntp_loss_before"], total["ntp_loss_after"])


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def format_header(doc: DemoDocument, seed: int, model_name: str) -> list[str]:
    return [
        f"model: {model_name}",
        f"document (seed {seed}; every seed is another document, none was picked): {len(doc.context_ids)} tokens "
        f"of held-out prose with {doc.n_facts} facts; asked: {doc.fact!r} (at {doc.depth:.0%} of the document)",
        f"question: {doc.question!r}   gold answer: {doc.answer!r} ({len(doc.answer_ids)} tokens)",
    ]


def format_rows(rows: list[DemoRow]) -> list[str]:
    """A table, then one plain sentence per adapted mode. The first row is the base model (mode none)."""
    head = ("mode", "steps", "gold log-prob", "per token", "rank", "greedy answer", "right?", "adapt s",
            "state", "delta")
    table = [head] + [
        (r.mode, str(r.steps), f"{r.score.logprob:.2f}", f"{r.score.per_token:.2f}", str(r.score.rank),
         repr(r.answer[:40] + ("..." if len(r.answer) > 40 else "")), "right" if r.correct else "wrong",
         f"{r.seconds_adapt:.1f}", _kib(r.state_bytes), _kib(r.delta_bytes))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    base = rows[0]
    for r in rows[1:]:
        change = r.score.logprob - base.score.logprob
        lines.append(
            f"{r.mode}: gold answer log-prob {base.score.logprob:.2f} -> {r.score.logprob:.2f} nats "
            f"({'up' if change >= 0 else 'down'} {abs(change):.2f}), first-token rank {base.score.rank} -> "
            f"{r.score.rank}; greedy answer {'right' if r.correct else 'wrong'}; document NTP loss "
            f"{r.ntp_before:.3f} -> {r.ntp_after:.3f}; {r.steps} step{'s' if r.steps != 1 else ''} in {r.seconds_adapt:.1f} s; session "
            f"{_kib(r.state_bytes + r.delta_bytes)}")
    return lines
