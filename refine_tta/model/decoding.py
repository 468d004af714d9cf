"""Decoding in token ids: prefill and one-token steps for many sequences at once.

This tier never sees text. A sequence is a :class:`DocumentState` (what was read so far), prompt
ids, a :class:`TokenSampling` and an optional set of *weights* (an adaptation's delta: any object
with an ``applied(model)`` context manager). :class:`BatchDecoder` decodes every sequence it holds
together (continuous batching): sequences that share weights are one batch — their recurrent and
convolution states stacked along the batch dim, one forward per token for all of them — and
sequences join and leave at token boundaries. Sequences with different weights form separate
groups, one forward per group per token.

Each sequence samples with its own ``torch.Generator`` seeded from its request, row by row, so a
sequence gets exactly the tokens it would get decoded alone (up to the last-bit differences of
batched matrix products, which only matter at an exact tie).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, ContextManager, Protocol

import torch

from refine_tta.model.runtime import read
from refine_tta.model.state import CacheAdapter, DocumentState, cache_adapter

# Below this, logits / T overflows fp32; use 0 for greedy decoding.
MIN_TEMPERATURE = 1e-3

FINISH_REASONS = ("eos", "length", "stop", "cancelled")


@dataclass(frozen=True)
class TokenSampling:
    """How one sequence picks its tokens. temperature 0 = greedy; ``stop_token_ids`` end the
    sequence (the stop token is not part of the output)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Weights(Protocol):
    """What a sequence decodes with besides the base model (e.g. a ParameterDelta)."""

    def applied(self, model: torch.nn.Module) -> ContextManager[Any]: ...


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] (greedy at temperature 0, else temperature + nucleus)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest prefix with mass >= top_p
        keep[..., 0] = True  # the most likely token always stays (a top_p below fp32's range keeps nothing else)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, samplings: list[TokenSampling],
                generators: list[torch.Generator]) -> list[int]:
    """One token per row of logits [B, V]; row i samples with samplings[i] and generators[i] only,
    so its draw does not depend on the other rows. Greedy rows share one argmax."""
    if len(samplings) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(samplings)} samplings")
    greedy = logits.argmax(-1).tolist() if any(s.greedy for s in samplings) else None
    out = []
    for i, (s, g) in enumerate(zip(samplings, generators)):
        out.append(greedy[i] if s.greedy else int(sample_next(logits[i:i + 1], s.temperature, s.top_p, g)[0]))
    return out


@dataclass
class Sequence:
    """One sequence being decoded. tokens: generated so far (stop tokens excluded)."""

    key: Hashable
    sampling: TokenSampling
    weights: Weights | None
    generator: torch.Generator
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft_s(self) -> float:
        return 0.0 if self.first_token_at is None else self.first_token_at - self.started

    @property
    def total_s(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.started

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token."""
        decode_s = self.total_s - self.ttft_s
        return (len(self.tokens) - 1) / decode_s if len(self.tokens) > 1 and decode_s > 0 else 0.0


@dataclass(frozen=True)
class TokenEvent:
    """What one step produced for one sequence: a new token (None when it ended without one, e.g.
    at a stop token) and the finish reason once it is done."""

    key: Hashable
    token: int | None
    finish_reason: str | None


@dataclass
class _Group:
    """Sequences with the same weights: the rows of one batched state. ``logits`` [B, V] are every
    row's next-token logits; ``cache`` (an fla Cache, [B, ...] per layer) is what they have read."""

    weights: Weights | None
    adapter: CacheAdapter  # the model family's cache <-> DocumentState conversion
    rows: list[Sequence] = field(default_factory=list)
    cache: Any = None
    logits: torch.Tensor | None = None

    def state(self) -> DocumentState:
        """The rows as a DocumentState (views of the cache's tensors)."""
        return self.adapter.from_cache(self.cache, 0, self.logits)

    def set_state(self, state: DocumentState) -> None:
        self.cache, self.logits = self.adapter.to_cache(state), state.next_logits


class BatchDecoder:
    """Continuous batching over token ids on one model (one thread; not thread-safe).

    ``add`` prefills a sequence (several at once with ``add_many``, batched where prompt lengths
    allow) and makes it part of the next ``step``; ``step`` gives every sequence one token (one
    forward per weights group) and drops those that finished; ``finish`` ends one from outside
    (cancelled, or a stop string seen by the text layer) at the next token boundary.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self._groups: dict[int, _Group] = {}
        self._sequences: dict[Hashable, Sequence] = {}
        self._applied: tuple[Weights | None, contextlib.ExitStack] | None = None
        self.forwards = 0  # model calls made (prefill + steps), for tests and benchmarks

    # ------------------------------------------------------------------------------ membership
    def __len__(self) -> int:
        return len(self._sequences)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sequences

    def sequence(self, key: Hashable) -> Sequence:
        return self._sequences[key]

    @property
    def n_groups(self) -> int:
        return len(self._groups)

    def add(self, key: Hashable, state: DocumentState | None, prompt_ids: list[int], sampling: TokenSampling,
            weights: Weights | None = None) -> Sequence:
        """Prefill one sequence (its prompt read from ``state``, never re-reading the document)."""
        return self.add_many([(key, state, prompt_ids, sampling, weights)])[0]

    @torch.no_grad()
    def add_many(self, requests: Iterable[tuple[Hashable, DocumentState | None, list[int], TokenSampling,
                                                 Weights | None]]) -> list[Sequence]:
        """Prefill several sequences; those with the same weights, prompt length and state emptiness
        are read as one batch. Each request: (key, state, prompt_ids, sampling, weights)."""
        t0 = time.perf_counter()  # time to first token counts from here (the prompt's read included)
        requests = list(requests)
        keys = [r[0] for r in requests]
        if len(set(keys)) != len(keys) or any(k in self._sequences for k in keys):
            raise ValueError("sequence keys must be unique")
        batches: dict[tuple, list[int]] = {}
        for i, (key, state, prompt, sampling, weights) in enumerate(requests):
            state = state or DocumentState.empty()
            if not prompt and state.next_logits is None:
                raise ValueError(f"sequence {key!r}: nothing to continue from (empty prompt and an empty state)")
            if state.batch_size != 1:
                raise ValueError(f"sequence {key!r}: state must have batch 1, got {state.batch_size}")
            batches.setdefault((id(weights), len(prompt), state.is_empty), []).append(i)
        added: list[tuple[Sequence, DocumentState] | None] = [None] * len(requests)
        for (_, n_prompt, empty), members in batches.items():
            weights = requests[members[0]][4]
            states = [requests[i][1] or DocumentState.empty() for i in members]
            if n_prompt:
                ids = torch.tensor([requests[i][2] for i in members], device=self.device)
                with self._weights(weights):
                    state = read(self.model, ids, None if empty else DocumentState.stack(states),
                                 only_last_logits=True).state
                self.forwards += 1
            else:
                state = DocumentState.stack(states)
            for row, i in enumerate(members):
                key, _, prompt, sampling, _ = requests[i]
                gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
                added[i] = (Sequence(key, sampling, weights, gen, len(prompt), started=t0), state.select(row))
        for seq, state in added:  # all prefilled: join together (nothing joins if a prefill failed)
            self._join(seq, state)
        return [seq for seq, _ in added]

    def _join(self, seq: Sequence, state: DocumentState) -> None:
        """Append a prefilled sequence (batch-1 state with next_logits) as a new row of its group."""
        group = self._groups.setdefault(id(seq.weights), _Group(seq.weights, cache_adapter(self.model)))
        group.set_state(DocumentState.stack([group.state(), state]) if group.rows else state)
        group.rows.append(seq)
        self._sequences[seq.key] = seq

    def finish(self, key: Hashable, reason: str = "cancelled") -> Sequence | None:
        """End a sequence now (it leaves the batch; the others are untouched). None if unknown."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        seq = self._sequences.get(key)
        if seq is None:
            return None
        self._leave([seq], reason)
        return seq

    def _leave(self, seqs: list[Sequence], reason: str | None = None) -> None:
        now = time.perf_counter()
        by_group: dict[int, set[Hashable]] = {}
        for seq in seqs:
            if reason is not None and seq.finish_reason is None:
                seq.finish_reason = reason
            seq.finished_at = seq.finished_at or now
            self._sequences.pop(seq.key, None)
            by_group.setdefault(id(seq.weights), set()).add(seq.key)
        for gid, keys in by_group.items():
            group = self._groups[gid]
            keep = [i for i, s in enumerate(group.rows) if s.key not in keys]
            if not keep:
                del self._groups[gid]
                continue
            group.set_state(group.state().select(torch.tensor(keep, device=self.device)))
            group.rows = [group.rows[i] for i in keep]
        if not self._sequences:
            self.release()

    # ------------------------------------------------------------------------------------ steps
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One token for every sequence: sample from each row's logits, drop the rows that finished,
        and read the new tokens of the others (one [B, 1] forward per weights group).
        Returns one event per sequence."""
        events: list[TokenEvent] = []
        for group in list(self._groups.values()):
            tokens = sample_rows(group.logits, [s.sampling for s in group.rows], [s.generator for s in group.rows])
            now = time.perf_counter()
            finished = []
            for seq, token in zip(group.rows, tokens):
                seq.first_token_at = seq.first_token_at or now
                if token in seq.sampling.stop_token_ids:
                    seq.finish_reason = "eos"
                    events.append(TokenEvent(seq.key, None, "eos"))
                else:
                    seq.tokens.append(token)
                    if len(seq.tokens) >= seq.sampling.max_new_tokens:
                        seq.finish_reason = "length"
                    events.append(TokenEvent(seq.key, token, seq.finish_reason))
                if seq.done:
                    finished.append(seq)
            if finished:
                self._leave(finished)
            if group.rows and group is self._groups.get(id(group.weights)):
                self._read_next([seq.tokens[-1] for seq in group.rows], group)
        return events

    def _read_next(self, tokens: list[int], group: _Group) -> None:
        """Read one token per row: ids [B, 1] -> the group's next logits [B, V] (fp32)."""
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        with self._weights(group.weights):
            out = self.model.model(input_ids=ids, past_key_values=group.cache, use_cache=True, return_dict=True)
            group.logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
        group.cache = out.past_key_values
        self.forwards += 1

    # ---------------------------------------------------------------------------------- weights
    @contextlib.contextmanager
    def _weights(self, weights: Weights | None):
        """Make ``weights`` the model's current weights (kept applied between calls, so a single
        adapted group does not swap its delta in and out every token)."""
        if self._applied is None or self._applied[0] is not weights:
            self.release()
            stack = contextlib.ExitStack()
            if weights is not None:
                stack.enter_context(weights.applied(self.model))
            self._applied = (weights, stack)
        yield

    def release(self) -> None:
        """Put the base model's weights back (call before anything else uses the model)."""
        if self._applied is not None:
            _, stack = self._applied
            self._applied = None
            stack.close()


@dataclass
class DecodeResult:
    """A finished sequence: generated ids (no stop token), why it ended, and its timings."""

    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_s: float
    tokens_per_s: float
    total_s: float

    @classmethod
    def of(cls, seq: Sequence) -> DecodeResult:
        return cls(list(seq.tokens), seq.finish_reason or "cancelled", seq.prompt_tokens, seq.ttft_s,
                   seq.tokens_per_s, seq.total_s)


def generate_tokens(
    model: torch.nn.Module,
    state: DocumentState | None,
    prompt_ids: list[int],
    sampling: TokenSampling,
    weights: Weights | None = None,
    on_token: Callable[[int], bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DecodeResult:
    """Decode one sequence alone (a batch of one).

    on_token(id) is called for every generated token; returning True ends the sequence with
    finish_reason "stop" (the caller's own stop condition, e.g. a stop string). should_stop() is
    polled after every token; True ends it with "cancelled".
    """
    decoder = BatchDecoder(model)
    try:
        seq = decoder.add("only", state, prompt_ids, sampling, weights)
        stopped = False
        while not seq.done:
            for event in decoder.step():
                if event.token is not None and on_token is not None and on_token(event.token):
                    stopped = True
            if stopped:
                decoder.finish(seq.key, "stop")
                seq.finish_reason = "stop"
            elif not seq.done and should_stop is not None and should_stop():
                decoder.finish(seq.key, "cancelled")
    finally:
        decoder.release()
    return DecodeResult.of(seq)
