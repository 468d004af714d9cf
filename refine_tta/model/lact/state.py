"""LaCT's document state: how a :class:`LaCTCache` and a :class:`DocumentState` convert.

Per layer (all batch-first, so clone / expand / select / stack / save work unchanged):
``w0, w1, w2`` the fast weights after the last complete chunk; ``m0, m1, m2`` their momentum;
``buf_k, buf_v, buf_lr, buf_mom`` the incomplete chunk's keys, values, learning rates and momenta
(slots ``[0, pos % chunk)``); ``attn_k, attn_v`` the last ``window - 1`` attention keys/values;
``pos`` [B] the tokens read, per row (branches at different offsets stack into one batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refine_tta.model.state import DocumentState, NamedLayerState


@dataclass
class LaCTCache:
    """What a LaCT model continues from: per layer a dict of the tensors above. A value: reads
    return a new cache and never change the one they were given."""

    layers: list[dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.layers)


class LaCTCacheAdapter:
    """LaCT reads are functional (never update a cache in place), so no copies are needed."""

    def to_cache(self, state: DocumentState) -> LaCTCache | None:
        if state.is_empty:
            return None
        if not all(isinstance(layer, NamedLayerState) and "pos" in layer.named for layer in state.layers):
            raise ValueError("this document state was not produced by a LaCT model")
        return LaCTCache([dict(layer.named) for layer in state.layers])

    def from_cache(self, cache: LaCTCache, n_tokens: int, next_logits: torch.Tensor | None) -> DocumentState:
        return DocumentState([NamedLayerState(dict(layer)) for layer in cache.layers], n_tokens, next_logits)
