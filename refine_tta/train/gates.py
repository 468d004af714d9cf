"""Gate evaluations of the staged recipe: does the model use the document?

* ``lookup_gate`` (phase A -> B): fact sheets of ``length`` tokens (``phases.sample_fact_sheet``,
  fixed seed). *Exact match*: every answer token (value + newline) is the argmax, teacher-forced --
  what greedy decoding would produce. *Present vs removed*: mean answer-token loss of one asked fact
  with its statement in the sheet vs the same sheet with the statement left out; a model that reads
  the document has a large gap, one that guesses from the question has none.
* ``needle_gate`` (phase B -> C): the benchmark's prompt (held-out prose, 3 facts, one asked;
  ``phases.benchmark_example``), exact match at ``length`` tokens.

Both run forward passes only, in batches, and put the model back in training mode.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refine_tta.train.phases import Example, TokenCoder, benchmark_example, sample_fact_sheet


@dataclass(frozen=True)
class GateResult:
    exact_match: float
    present_loss: float | None = None
    removed_loss: float | None = None

    @property
    def gap(self) -> float | None:
        """Removed minus present answer loss (nats per answer token)."""
        if self.present_loss is None or self.removed_loss is None:
            return None
        return self.removed_loss - self.present_loss

    def to_dict(self) -> dict:
        return {"exact_match": self.exact_match, "present_loss": self.present_loss,
                "removed_loss": self.removed_loss, "gap": self.gap}


def pad_batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: ids [B, T] long, weights [B, T] float (padding weight 0)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    w = torch.zeros(len(examples), T)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        w[i, :len(e.weights)] = torch.tensor(e.weights)
    return ids, w


def weighted_runs(weights: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of non-zero weights in a 1-D tensor."""
    runs, start = [], None
    for t, on in enumerate((weights > 0).tolist()):
        if on and start is None:
            start = t
        elif not on and start is not None:
            runs.append((start, t))
            start = None
    if start is not None:
        runs.append((start, len(weights)))
    return runs


@torch.no_grad()
def answer_scores(model, examples: Sequence[Example], pad_id: int,
                  batch_size: int = 16) -> list[list[tuple[float, int, bool]]]:
    """Per example, per run of weighted tokens (one answer each): (summed loss, tokens, all argmax-correct)."""
    out = []
    for i in range(0, len(examples), batch_size):
        ids, w = pad_batch(examples[i:i + batch_size], pad_id)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        logits = model.lm_head(hidden).float()  # [B, T-1, V]
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)
        ok = logits.argmax(-1) == ids[:, 1:]
        for b in range(ids.shape[0]):
            out.append([(float(ce[b, s:e].sum()), e - s, bool(ok[b, s:e].all()))
                        for s, e in weighted_runs(w[b, 1:])])
    return out


def lookup_gate(model, coder: TokenCoder, length: int = 256, n_docs: int = 200, seed: int = 7) -> GateResult:
    """Exact match over all answers of ``n_docs`` fact sheets, and the present-vs-removed loss of one
    random fact per sheet (see module doc)."""
    was_training = model.training
    model.eval()
    rng = random.Random(seed)
    sheets = [sample_fact_sheet(rng, coder, length) for _ in range(n_docs)]
    asked = [rng.randrange(len(s.needles)) for s in sheets]
    present = answer_scores(model, [Example(*coder.render(s.segments())) for s in sheets], coder.eos)
    removed = answer_scores(model, [Example(*coder.render(s.segments(skip=a))) for s, a in zip(sheets, asked)],
                            coder.eos)
    model.train(was_training)
    answers = [run for runs in present for run in runs]
    p = [runs[s.order.index(a)] for runs, s, a in zip(present, sheets, asked)]
    r = [runs[s.order.index(a)] for runs, s, a in zip(removed, sheets, asked)]
    return GateResult(exact_match=sum(x[2] for x in answers) / len(answers),
                      present_loss=sum(x[0] for x in p) / sum(x[1] for x in p),
                      removed_loss=sum(x[0] for x in r) / sum(x[1] for x in r))


def needle_gate(model, coder: TokenCoder, texts: Sequence[str], length: int = 512, n_docs: int = 100,
                seed: int = 11) -> GateResult:
    """Teacher-forced exact match on the benchmark's prompt (3 facts in ``texts``, one asked)."""
    was_training = model.training
    model.eval()
    rng = random.Random(seed)
    docs = [benchmark_example(rng, coder, texts, length) for _ in range(n_docs)]
    scores = [runs[-1] for runs in answer_scores(model, docs, coder.eos, batch_size=8)]
    model.train(was_training)
    return GateResult(exact_match=sum(x[2] for x in scores) / len(scores),
                      present_loss=sum(x[0] for x in scores) / sum(x[1] for x in scores))


@torch.no_grad()
def prose_loss(model, coder: TokenCoder, stream: Sequence[int], windows: int = 8, length: int = 1024,
               seed: int = 13) -> float:
    """Mean next-token loss over ``windows`` windows of ``length`` tokens of a (held-out) token stream."""
    was_training = model.training
    model.eval()
    rng = random.Random(seed)
    total, count = 0.0, 0
    for _ in range(windows):
        start = rng.randrange(0, len(stream) - length)
        ids = torch.tensor([[coder.bos] + list(stream[start:start + length - 1])])
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        total += float(F.cross_entropy(model.lm_head(hidden).float(), ids[0, 1:], reduction="sum"))
        count += length - 1
    model.train(was_training)
    return total / count
