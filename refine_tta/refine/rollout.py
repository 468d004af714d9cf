"""Reading a document with the states at chosen positions kept, and k-token branches from them.

Two ways to get the same numbers:

* **branch** (ours): the document is read once with gradients (``read_for_step``); that read's
  own logits give the NTP loss and the entropy that picks the rollout starts, and it keeps what it
  takes to give the state after any prefix, so the states at the starts come from it after the
  selection; rollouts, their old log-probs and the update all run from those states, batched, and
  the gradient reaches the prefix through the carried states.
* **reference** (the paper's code): every rollout re-reads its prefix, once to sample, once for old
  log-probs and once, with gradients, for the update.

Sampling uses pre-drawn uniforms and the inverse CDF, so the tokens do not depend on how rollouts
are batched: both paths sample the same rollouts from the same generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refine_tta.model.runtime import BOUNDARY_TOKENS, PrefixStates, read, read_keeping_states
from refine_tta.model.state import DocumentState
from refine_tta.refine.objective import entropy_from_logprobs


def sample_with_uniform(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """Inverse-CDF sample. logits [N, V], u [N] in [0, 1) -> tokens [N] (independent of batching).

    Picks the first token whose cumulative probability exceeds u * total, so a token of probability
    0 (an underflowed or -inf logit) is never drawn, not even for u = 0 or u * total rounding up.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(-1)  # [N, V]
    total = cdf[:, -1:]  # [N, 1]
    target = torch.minimum(u.float().unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_max(logits.shape[-1] - 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(tokens) under softmax(logits / T). logits [..., V], tokens [...] -> [...] fp32."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class SegmentedRead:
    """ntp_sum: summed next-token CE over the document (with grad); n_targets: L - 1;
    states: rollout start r -> state after reading x[0:r] (batch 1, with grad)."""

    ntp_sum: torch.Tensor
    n_targets: int
    states: dict[int, DocumentState]


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy, fp32. logits [T, V], targets [T]."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def read_segmented(model, ids: torch.Tensor, cuts: list[int]) -> SegmentedRead:
    """Read ids [1, L] in segments ending at each cut (sorted, unique, 0 < cut < L), with grad."""
    L = ids.shape[1]
    bounds = [0, *cuts, L]
    state = None
    total = ids.new_zeros((), dtype=torch.float32)
    states: dict[int, DocumentState] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = read(model, ids[:, a:b], state)
        # position t predicts token t+1; the last position of the document predicts nothing
        n_pred = min(b, L - 1) - a
        total = total + ce_sum(out.logits[0, :n_pred], ids[0, a + 1:a + 1 + n_pred])
        state = out.state
        if b < L:
            states[b] = state
    return SegmentedRead(total, L - 1, states)


def branch_states(states: dict[int, DocumentState], starts: list[int], n: int) -> DocumentState:
    """Stack the states at each start (in order) and repeat each n times: batch [P * n]."""
    return repeat_branches(DocumentState.stack([states[r] for r in starts]), n)


def repeat_branches(stacked: DocumentState, n: int) -> DocumentState:
    """Each row of a batch-P state repeated n times in place: batch [P * n]."""
    return stacked if n == 1 else stacked.map(lambda t: t.repeat_interleave(n, dim=0))


@dataclass
class StepRead:
    """One read of the document with gradients, for one REFINE step.

    ntp_sum: summed next-token CE (with grad); n_targets: L - 1; entropy [L] (nats, no grad) and
    hidden [L, D] (last layer after the final norm, no grad): the per-position scores the
    selection and the cosine reward use; prefixes: the state after any prefix (with grad).
    """

    ntp_sum: torch.Tensor
    n_targets: int
    entropy: torch.Tensor
    hidden: torch.Tensor
    prefixes: PrefixStates


def read_for_step(model, ids: torch.Tensor, every: int = BOUNDARY_TOKENS) -> StepRead:
    """Read ids [1, L] once with gradients: the NTP loss, the scores and the prefix states.

    One log-softmax over the logits serves both the cross-entropy (``F.cross_entropy`` is
    ``nll_loss(log_softmax)``: the same numbers) and the entropy.
    """
    L = ids.shape[1]
    kept = read_keeping_states(model, ids, every)
    logp = F.log_softmax(kept.logits[0].float(), dim=-1)  # [L, V]
    ntp_sum = F.nll_loss(logp[:L - 1], ids[0, 1:], reduction="sum")
    with torch.no_grad():  # in blocks of rows: each block's exp stays in cache (half the time of one pass)
        entropy = torch.cat([entropy_from_logprobs(block) for block in logp.split(64)])  # [L]
    return StepRead(ntp_sum, L - 1, entropy, kept.hidden[0].detach(), kept.prefixes)


@torch.no_grad()
def sample_rollouts(model, start: DocumentState, uniforms: torch.Tensor, temperature: float):
    """Sample k tokens for each branch of ``start`` (batch N, next_logits set).

    uniforms [N, k]. Returns tokens [N, k] and their log-probs [N, k] (the "old" policy).
    """
    N, k = uniforms.shape
    logits = start.next_logits
    state = start
    tokens, logps = [], []
    for i in range(k):
        tok = sample_with_uniform(logits, uniforms[:, i], temperature)
        tokens.append(tok)
        logps.append(token_logprobs(logits, tok, temperature))
        if i + 1 < k:
            state = read(model, tok.unsqueeze(1), state, only_last_logits=True).state
            logits = state.next_logits
    return torch.stack(tokens, 1), torch.stack(logps, 1)


def branch_forward(model, start: DocumentState, tokens: torch.Tensor, temperature: float):
    """Re-score the rollouts from their (grad-carrying) start states.

    start: batch N; tokens [N, k]. Returns logp [N, k] (with grad) and hidden [N, k, D] of the
    rollout tokens (the model's reading of y_1..y_k, for the cosine reward).
    """
    out = read(model, tokens, start)
    logits = torch.cat([start.next_logits.unsqueeze(1), out.logits[:, :-1].float()], dim=1)  # [N, k, V]
    return token_logprobs(logits, tokens, temperature), out.hidden


# --- the paper's way: re-read the prefix for every rollout ----------------------------------

@torch.no_grad()
def reference_sample(model, ids: torch.Tensor, r: int, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """Re-read x[0:r], then sample k tokens (u [k]) feeding each back. Returns tokens [k]."""
    state = read(model, ids[:, :r], None, only_last_logits=True).state
    out = []
    for i in range(u.shape[0]):
        tok = sample_with_uniform(state.next_logits, u[i:i + 1], temperature)
        out.append(tok)
        if i + 1 < u.shape[0]:
            state = read(model, tok.unsqueeze(1), state, only_last_logits=True).state
    return torch.cat(out)


def reference_score(model, ids: torch.Tensor, r: int, tokens: torch.Tensor, temperature: float):
    """Read x[0:r] + rollout from scratch. Returns logp [k] and hidden [k, D] of the rollout tokens."""
    k = tokens.shape[0]
    seq = torch.cat([ids[0, :r], tokens]).unsqueeze(0)
    out = read(model, seq)
    logits = out.logits[0, r - 1:r - 1 + k]  # predictions of the k rollout tokens
    return token_logprobs(logits, tokens, temperature), out.hidden[0, r:r + k]
