"""Scoring: log-probabilities of given token sequences after a session's document (OpenAI
``logprobs`` / ``echo``), in batched forward passes over the one model.

:func:`score` is pure model work; the engine runs it as one exclusive job (no adaptation runs
meanwhile, and the generation batch has taken its sessions' deltas off the model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from refine_tta.engine.errors import Cancelled
from refine_tta.model.runtime import read
from refine_tta.model.state import DocumentState

SCORE_LOGITS_BUDGET = 2**26
"""Most logits (batch * tokens * vocab, fp32) one scoring forward pass holds; bigger jobs run in groups."""


@dataclass(frozen=True)
class TokenScores:
    """Log-probabilities of one token sequence under the model (fp32, natural log).

    token_logprobs[i]: log p(ids[i] | everything before it), None for a first token with nothing
    before it (base model, no BOS). top[i]: the ``top_k`` most likely tokens at position i as
    (id, logprob), best first ([] for that first token or when top_k is 0)."""

    ids: list[int]
    token_logprobs: list[float | None]
    top: list[list[tuple[int, float]]]


@torch.no_grad()
def score(model: torch.nn.Module, state: DocumentState, weights: Any, sequences: list[list[int]], top_k: int,
          vocab_size: int, should_stop: Callable[[], bool]) -> list[TokenScores]:
    """Score ``sequences`` (token ids) read after ``state`` with ``weights`` (a session's delta, or
    None) applied, in groups under :data:`SCORE_LOGITS_BUDGET`; in the order given.
    Raises Cancelled when ``should_stop()`` turns true between groups."""
    first = None if state.next_logits is None else torch.log_softmax(state.next_logits.float(), dim=-1)[0]  # [V]
    scores: list[TokenScores] = []
    with weights.applied(model) if weights is not None else contextlib.nullcontext():
        for rows in _groups(sequences, vocab_size):
            if should_stop():
                raise Cancelled("scoring cancelled")
            logprobs = _batch_logprobs(model, rows, state)  # [B, T, V]
            scores += [_scores(ids, logprobs[row, :len(ids) - 1], first, top_k) for row, ids in enumerate(rows)]
    return scores


def _groups(sequences: list[list[int]], vocab_size: int) -> list[list[list[int]]]:
    """Consecutive groups whose padded logits stay under SCORE_LOGITS_BUDGET elements (one row
    alone may exceed it)."""
    groups: list[list[list[int]]] = []
    for ids in sequences:
        group = groups[-1] if groups else None
        if group is not None and (len(group) + 1) * max(len(ids), *map(len, group)) * vocab_size \
                <= SCORE_LOGITS_BUDGET:
            group.append(ids)
        else:
            groups.append([ids])
    return groups


def _batch_logprobs(model: torch.nn.Module, rows: list[list[int]], state: DocumentState) -> torch.Tensor:
    """Log-probabilities [B, T, V] (fp32) after each token of each row, read from ``state``.
    Rows are right-padded: the model is causal, so padding never reaches a row's real tokens."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # [B, T]
    for row, ids in enumerate(rows):
        batch[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    start = state if state.is_empty else state.expand(len(rows))
    return torch.log_softmax(read(model, batch, start).logits.float(), dim=-1)


def _scores(ids: list[int], predicted: torch.Tensor, first: torch.Tensor | None, top_k: int) -> TokenScores:
    """ids [T]; predicted [T-1, V]: log-probs after each of ids[:-1]; first [V] or None: before ids[0]."""
    rows = predicted if first is None else torch.cat([first[None], predicted])  # [T or T-1, V]
    targets = torch.tensor(ids[len(ids) - rows.shape[0]:], device=rows.device)
    chosen = rows.gather(-1, targets[:, None])[:, 0].tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in range(rows.shape[0])]
    if top_k > 0:
        values, indices = rows.topk(top_k, dim=-1)
        top = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    pad = len(ids) - rows.shape[0]  # 1 when the first token has nothing before it
    return TokenScores(list(ids), [None] * pad + chosen, [[] for _ in range(pad)] + top)
