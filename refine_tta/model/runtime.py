"""Reading tokens into a document state: the one forward pass everything else is built on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refine_tta.model.state import DocumentState, cache_adapter


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
) -> ReadOutput:
    """Read input_ids [B, T] (T >= 1) starting from ``state`` (None = nothing read).

    Gradients flow into the model's parameters and, through the state's tensors, into whatever
    produced ``state``. The input state is never modified.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    state = state or DocumentState.empty()
    if not state.is_empty and state.batch_size != input_ids.shape[0]:
        raise ValueError(f"state batch {state.batch_size} != input batch {input_ids.shape[0]}")
    adapter = cache_adapter(model)
    cache = adapter.to_cache(state)
    out = model.model(input_ids=input_ids, past_key_values=cache, use_cache=True, return_dict=True)
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
