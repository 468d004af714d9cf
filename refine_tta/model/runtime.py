"""Reading tokens into a document state: the one forward pass everything else is built on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from refine_tta.model.state import DocumentState, cache_adapter
from refine_tta.model.trace import StateTrace, supports_trace

# The state-keeping read on models that cannot be traced keeps the state every this many tokens;
# the state after a position in between costs a read (with gradients) of the tokens since.
BOUNDARY_TOKENS = 128


@dataclass
class ReadOutput:
    """logits: [B, T, V] (or [B, 1, V] with only_last_logits); hidden: [B, T, D] last-layer hidden
    states after the final norm; state: the state after reading (next_logits = logits[:, -1] in fp32)."""

    logits: torch.Tensor
    hidden: torch.Tensor
    state: DocumentState


def read(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    state: DocumentState | None = None,
    only_last_logits: bool = False,
    trace: StateTrace | None = None,
) -> ReadOutput:
    """Read input_ids [B, T] (T >= 1) starting from ``state`` (None = nothing read).

    Gradients flow into the model's parameters and, through the state's tensors, into whatever
    produced ``state``. The input state is never modified. ``trace``: an empty StateTrace for the
    layers to record this read in (only for models where ``supports_trace``).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    state = state or DocumentState.empty()
    if not state.is_empty and state.batch_size != input_ids.shape[0]:
        raise ValueError(f"state batch {state.batch_size} != input batch {input_ids.shape[0]}")
    adapter = cache_adapter(model)
    cache = adapter.to_cache(state)
    layer_args = {} if trace is None else {"state_trace": trace}
    out = model.model(input_ids=input_ids, past_key_values=cache, use_cache=True, return_dict=True, **layer_args)
    hidden = out.last_hidden_state
    logits = model.lm_head(hidden[:, -1:] if only_last_logits else hidden)
    # A copy, not a view: a view of fp32 logits would keep the whole [B, T, V] tensor alive in the state.
    next_logits = logits[:, -1].to(torch.float32, copy=True)
    new_state = adapter.from_cache(out.past_key_values, state.n_tokens + input_ids.shape[1], next_logits)
    return ReadOutput(logits, hidden, new_state)


@torch.no_grad()
def read_document(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    state: DocumentState | None = None,
    segment_tokens: int = 8192,
) -> DocumentState:
    """Read a long document [1, T] without gradients, in segments to bound activation memory."""
    for start in range(0, input_ids.shape[1], segment_tokens):
        state = read(model, input_ids[:, start:start + segment_tokens], state, only_last_logits=True).state
    return state or DocumentState.empty()


class PrefixStates(Protocol):
    """The states after chosen prefixes of one document read (``read_keeping_states``).

    tokens_read: tokens read again so far to produce the states asked for (0 when traced)."""

    tokens_read: int

    def states_at(self, positions: list[int]) -> DocumentState:
        """The state after x[0:p] for each p (1 <= p <= L), stacked in order: batch len(positions).

        Autograd-connected to the read, so gradients of what is computed from them reach the
        parameters through the document's prefix."""


@dataclass
class KeptRead:
    """logits [1, L, V], hidden [1, L, D] (after the final norm), state after all L tokens, and
    ``prefixes``: the state after any prefix."""

    logits: torch.Tensor
    hidden: torch.Tensor
    state: DocumentState
    prefixes: PrefixStates


def read_keeping_states(model: torch.nn.Module, input_ids: torch.Tensor, every: int = BOUNDARY_TOKENS) -> KeptRead:
    """Read a document [1, L] from nothing, with gradients, keeping the state after every prefix.

    Traceable models (``supports_trace``) read it in one pass and derive any prefix's state from
    the trace (exact, no token read twice). Others read it in segments of ``every`` tokens, keep
    the state at each boundary, and read the few tokens from the boundary before a position to
    it (with gradients) when its state is asked for.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [1, L] with L >= 1, got {tuple(input_ids.shape)}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if supports_trace(model):
        trace = StateTrace()
        out = read(model, input_ids, trace=trace)
        prefixes = _TracedPrefixes(model, trace, out.hidden, len(out.state.layers))
        return KeptRead(out.logits, out.hidden, out.state, prefixes)
    L = input_ids.shape[1]
    logits, hidden, boundaries, state = [], [], {}, None
    for a in range(0, L, every):
        out = read(model, input_ids[:, a:a + every], state)
        state = out.state
        logits.append(out.logits)
        hidden.append(out.hidden)
        boundaries[min(a + every, L)] = state
    prefixes = _BoundaryPrefixes(model, input_ids, boundaries, every)
    return KeptRead(torch.cat(logits, 1), torch.cat(hidden, 1), state, prefixes)


def _check_positions(positions: list[int], L: int) -> None:
    bad = [p for p in positions if not 1 <= p <= L]
    if bad or not positions:
        raise ValueError(f"positions must be a non-empty list in [1, {L}], got {positions}")


class _TracedPrefixes:
    """From a traced read: every layer's state after p tokens from its chunk trace; the next-token
    logits from the hidden state at p - 1 (gathered once: a row of the [L, V] logits would cost
    the backward a zero-filled [L, V] gradient per position)."""

    def __init__(self, model, trace: StateTrace, hidden: torch.Tensor, n_layers: int):
        self.model, self.trace, self.hidden, self.n_layers = model, trace, hidden, n_layers
        self.tokens_read = 0

    def states_at(self, positions: list[int]) -> DocumentState:
        _check_positions(positions, self.hidden.shape[1])
        unique = list(dict.fromkeys(positions))
        idx = torch.tensor([p - 1 for p in unique], device=self.hidden.device)
        logits = self.model.lm_head(self.hidden[0].index_select(0, idx)).to(torch.float32)  # [U, V]
        states = DocumentState(self.trace.layer_states_at(unique, self.n_layers), -1, logits)
        if len(unique) == 1:
            states.n_tokens = unique[0]
        rows = [unique.index(p) for p in positions]
        return states if rows == list(range(len(unique))) else states.select(torch.tensor(rows))


class _BoundaryPrefixes:
    """From a read in segments: the state at the boundary before p, then x[boundary:p] read again."""

    def __init__(self, model, input_ids: torch.Tensor, boundaries: dict[int, DocumentState], every: int):
        self.model, self.ids, self.boundaries, self.every = model, input_ids, boundaries, every
        self.tokens_read = 0

    def _at(self, p: int) -> DocumentState:
        if p in self.boundaries:
            return self.boundaries[p]
        b = p // self.every * self.every
        self.tokens_read += p - b
        return read(self.model, self.ids[:, b:p], self.boundaries.get(b), only_last_logits=True).state

    def states_at(self, positions: list[int]) -> DocumentState:
        _check_positions(positions, self.ids.shape[1])
        at = {p: self._at(p) for p in dict.fromkeys(positions)}
        return DocumentState.stack([at[p] for p in positions])
