"""Training sequences for the staged recipe (``refine_tta.train.recipe``): token ids plus a loss weight per token.

Every sampler returns ``Example``s of exactly the requested length, so a batch is one tensor of
equal-length sequences. ``weights[t]`` is the loss weight of predicting ``ids[t]`` from ``ids[:t]``
(``weights[0] == 0``); the LM head is computed only where a weight is non-zero. Sequences shorter
than the length are padded at the end with EOS at weight 0 (harmless for a causal model).

Phases (what the model must learn, easiest first):

* **A -- the lookup** (``PhaseA``): 64-256 tokens of fact statements (``needles`` templates), some
  separated by grammar filler sentences, then *all* their questions in random order, one
  ``Question: <q> Answer: <value>`` line each; loss on the answers (value + newline). A share of
  sequences is a prose span repeated twice with loss on the copy (the induction/copy skill).
* **B -- facts inside text** (``PhaseB``): 256-512 tokens; facts hidden in filler that moves from
  grammar sentences to real prose as phase-B tokens accumulate; half the batches are plain prose
  with the full next-token loss.
* **C -- the benchmark's format** (``PhaseC``): 512-1K tokens (some 2K), one question after a prose
  document with 3 facts (``make_needle_document``, exactly what ``benchmarks/model_card.py`` asks);
  60% of batches plain prose.

All randomness comes from the ``random.Random`` passed in, so a checkpoint that saves its state
resumes the data stream exactly.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Sequence
from dataclasses import dataclass

from refine_tta.train.needles import (
    Needle,
    filler_window,
    make_needle_document,
    qa_line,
    sample_needles,
    synthetic_filler,
)

# A fact's question and answer as they appear in training text: "Question: <q> Answer:" then " <value>\n".
ANSWER_END = "\n"


@dataclass(frozen=True)
class Example:
    """One training sequence: ``ids`` and ``weights`` of equal length (the sampler's length)."""

    ids: list[int]
    weights: list[float]


@dataclass(frozen=True)
class Segment:
    """A piece of text with the loss weight of the tokens that end inside it."""

    text: str
    weight: float = 0.0


class TokenCoder:
    """Tokenizes segment lists into ids + per-token weights (a token gets the weight of the segment
    holding its last character). Wraps a fast ``transformers`` tokenizer with ``bos == eos``."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def render(self, segments: Sequence[Segment]) -> tuple[list[int], list[float]]:
        """BOS + the segments' tokens, and their weights (BOS: 0)."""
        text, ends, weights = "", [], []
        for seg in segments:
            text += seg.text
            ends.append(len(text))
            weights.append(seg.weight)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, out_w, j = [self.bos], [0.0], 0
        for tid, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            while j < len(ends) - 1 and end > ends[j]:
                j += 1
            ids.append(tid)
            out_w.append(weights[j] if ends else 0.0)
        return ids, out_w

    def fit(self, ids: list[int], weights: list[float], length: int) -> Example:
        """Truncate or EOS-pad (weight 0) to exactly ``length`` tokens."""
        ids, weights = ids[:length], weights[:length]
        pad = length - len(ids)
        return Example(ids + [self.eos] * pad, weights + [0.0] * pad)


# --- phase A -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FactSheet:
    """A phase-A document before rendering: statements (with filler sentences before each) then all
    questions in ``order``. ``render(skip=j)`` leaves fact ``j``'s statement out (its question stays)."""

    needles: tuple[Needle, ...]
    fillers: tuple[str, ...]  # filler text before each statement ("" for none)
    order: tuple[int, ...]    # question order (indices into needles)

    def segments(self, skip: int | None = None, answer_weight: float = 1.0) -> list[Segment]:
        segs: list[Segment] = []
        first = True
        for j, (needle, filler) in enumerate(zip(self.needles, self.fillers)):
            if filler:
                segs.append(Segment(("" if first else " ") + filler))
                first = False
            if j == skip:
                continue
            segs.append(Segment(("" if first else " ") + needle.statement))
            first = False
        segs.append(Segment("\n\n"))
        for j in self.order:
            n = self.needles[j]
            segs.append(Segment(f"Question: {n.question} Answer:"))
            segs.append(Segment(f" {n.answer}{ANSWER_END}", answer_weight))
        return segs


def sample_fact_sheet(rng: random.Random, coder: TokenCoder, length: int, filler_prob: float = 0.35) -> FactSheet:
    """Facts (and occasional grammar filler) while the rendered sheet stays within ``length`` tokens.

    Each fact costs its statement, its QA line and any filler before it; at least one fact, keys and
    values pairwise distinct.
    """
    budget = length - 3  # BOS, the blank line, slack
    needles, fillers, used = [], [], 0
    while not needles:  # a 64-token sheet may need a second pool to find a fact short enough
        for needle in sample_needles(rng, 24):
            filler = ""
            if rng.random() < filler_prob:
                sentences = synthetic_filler(rng, 1).split("\n")[0].split(". ")  # one paragraph
                filler = ". ".join(sentences[: rng.randint(1, 2)]).rstrip(".") + "."
            cost = coder.count(" " + needle.statement) + coder.count(qa_line(needle) + ANSWER_END)
            cost += coder.count(" " + filler) if filler else 0
            if used + cost > budget or any(needle.key == n.key or needle.value == n.value for n in needles):
                continue  # a shorter fact later in the pool may still fit
            needles.append(needle)
            fillers.append(filler)
            used += cost
    order = list(range(len(needles)))
    rng.shuffle(order)
    return FactSheet(tuple(needles), tuple(fillers), tuple(order))


def copy_example(rng: random.Random, coder: TokenCoder, stream: Sequence[int], length: int) -> Example:
    """BOS + a prose span + "\\n\\n" + the same span again; loss on the copy (after its first token)."""
    sep = coder.encode("\n\n")
    span_len = (length - 1 - len(sep)) // 2
    start = rng.randrange(0, len(stream) - span_len)
    span = list(stream[start:start + span_len])
    ids = [coder.bos] + span + sep + span
    weights = [0.0] * (1 + span_len + len(sep)) + [0.0] + [1.0] * (span_len - 1)
    return coder.fit(ids, weights, length)


class Sampler(abc.ABC):
    """Base of the phase samplers: ``batch(rng, tokens_seen_in_phase, tokens_per_step)`` ->
    ``(length, [Example])`` with ``length * len(examples) ~= tokens_per_step``."""

    name = "?"

    @abc.abstractmethod
    def lengths(self, phase_tokens: int) -> dict[int, float]:
        """{sequence length: probability} after ``phase_tokens`` tokens of this phase."""

    def pick_length(self, rng: random.Random, phase_tokens: int) -> int:
        table = self.lengths(phase_tokens)
        return rng.choices(list(table), list(table.values()))[0]

    def batch(self, rng: random.Random, phase_tokens: int, tokens_per_step: int) -> tuple[int, list[Example]]:
        length = self.pick_length(rng, phase_tokens)
        n = max(1, tokens_per_step // length)
        return length, self.examples(rng, phase_tokens, length, n)

    @abc.abstractmethod
    def examples(self, rng: random.Random, phase_tokens: int, length: int, n: int) -> list[Example]:
        """``n`` examples of exactly ``length`` tokens."""


class PhaseA(Sampler):
    """Fact sheets (64-256 tokens) and copy sequences; longer sheets after ``long_after`` phase tokens."""

    name = "A"

    def __init__(self, coder: TokenCoder, stream: Sequence[int], copy_share: float = 0.25,
                 long_after: int = 2_000_000):
        self.coder, self.stream, self.copy_share, self.long_after = coder, stream, copy_share, long_after

    def lengths(self, phase_tokens: int) -> dict[int, float]:
        if phase_tokens < self.long_after:
            return {64: 0.3, 128: 0.4, 256: 0.3}
        return {64: 0.15, 128: 0.35, 256: 0.5}

    def examples(self, rng, phase_tokens, length, n):
        out = []
        for _ in range(n):
            if rng.random() < self.copy_share:
                out.append(copy_example(rng, self.coder, self.stream, length))
            else:
                sheet = sample_fact_sheet(rng, self.coder, length)
                out.append(self.coder.fit(*self.coder.render(sheet.segments()), length))
        return out


def prose_example(rng: random.Random, coder: TokenCoder, stream: Sequence[int], length: int) -> Example:
    """BOS + a window of the prose token stream, full next-token loss."""
    start = rng.randrange(0, len(stream) - length)
    return Example([coder.bos] + list(stream[start:start + length - 1]), [0.0] + [1.0] * (length - 1))


def hidden_facts_example(rng: random.Random, coder: TokenCoder, texts: Sequence[str], length: int,
                         synthetic_prob: float, max_needles: int = 6) -> Example:
    """Filler (grammar sentences with ``synthetic_prob``, else real prose) with 1..``max_needles``
    facts at random depths, then all of them asked and answered (random order); loss on answers."""
    n = rng.randint(1, max_needles)
    needles = sample_needles(rng, n)
    order = list(range(n))
    rng.shuffle(order)
    qa = [Segment("\n\n")]
    for j in order:
        qa += [Segment(f"Question: {needles[j].question} Answer:"), Segment(f" {needles[j].answer}{ANSWER_END}", 1.0)]
    qa_tokens = sum(coder.count(s.text) for s in qa)
    n_chars = int(length * 4 * 1.5) + 200
    filler = synthetic_filler(rng, n_chars) if rng.random() < synthetic_prob else filler_window(rng, texts, n_chars)
    doc = make_needle_document(rng, filler, needles=needles, target_tokens=max(16, length - 2 - qa_tokens),
                               count_tokens=coder.count)
    return coder.fit(*coder.render([Segment(doc.context)] + qa), length)


def benchmark_example(rng: random.Random, coder: TokenCoder, texts: Sequence[str], length: int) -> Example:
    """The benchmark's retrieval prompt (3 facts in prose, one asked) with its answer; loss on the answer."""
    doc = make_needle_document(rng, filler_window(rng, texts, length * 6), n_needles=3,
                               target_tokens=length - 8, count_tokens=coder.count)
    return coder.fit(*coder.render([Segment(doc.text), Segment(doc.completion + ANSWER_END, 1.0)]), length)


class PhaseB(Sampler):
    """256-512 tokens; half the batches plain prose; filler moves from grammar to prose over
    ``prose_after`` phase tokens."""

    name = "B"

    def __init__(self, coder: TokenCoder, stream: Sequence[int], texts: Sequence[str], prose_share: float = 0.5,
                 prose_after: int = 5_000_000):
        self.coder, self.stream, self.texts = coder, stream, texts
        self.prose_share, self.prose_after = prose_share, prose_after

    def lengths(self, phase_tokens: int) -> dict[int, float]:
        return {256: 0.4, 384: 0.2, 512: 0.4}

    def synthetic_prob(self, phase_tokens: int) -> float:
        return max(0.2, 0.8 - 0.6 * phase_tokens / self.prose_after)

    def examples(self, rng, phase_tokens, length, n):
        if rng.random() < self.prose_share:
            return [prose_example(rng, self.coder, self.stream, length) for _ in range(n)]
        p = self.synthetic_prob(phase_tokens)
        return [hidden_facts_example(rng, self.coder, self.texts, length, p) for _ in range(n)]


class PhaseC(Sampler):
    """512-1K (some 2K) tokens; 60% prose batches, else benchmark-format documents (one question)."""

    name = "C"

    def __init__(self, coder: TokenCoder, stream: Sequence[int], texts: Sequence[str], prose_share: float = 0.6):
        self.coder, self.stream, self.texts, self.prose_share = coder, stream, texts, prose_share

    def lengths(self, phase_tokens: int) -> dict[int, float]:
        return {512: 0.45, 1024: 0.4, 2048: 0.15}

    def examples(self, rng, phase_tokens, length, n):
        if rng.random() < self.prose_share:
            return [prose_example(rng, self.coder, self.stream, length) for _ in range(n)]
        return [benchmark_example(rng, self.coder, self.texts, length) for _ in range(n)]
