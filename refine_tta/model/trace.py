"""A traced read: what a read with gradients must keep to give the state after *any* of its prefixes.

REFINE picks its rollout starts from the entropy of the very read that carries the gradient, so it
cannot cut that read at the starts in advance. The chunked delta rule already computes, for every
chunk of C tokens, the state before it and the chunk's WY updates; with those (and the inputs of
the short convolutions) the state after any token is a few small matmuls away
(``refine_tta.kernels.delta_rule.state_within_chunk``), with gradients into the read, and no token
is read twice.

The torch kernel backend (``refine_tta.model.backend``) fills a :class:`StateTrace` when the read
passes one to the layers (``read(..., trace=...)``); :func:`supports_trace` says whether a model
can. Tensors here are the read's own autograd-connected tensors (kept for the backward anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from refine_tta.kernels.delta_rule import ChunkTrace, traced_state
from refine_tta.model.state import LayerState


@dataclass
class ConvTrace:
    """One short convolution: x [B, T, D] its inputs in this read, cache [B, D, W] the window it
    started from (None = zeros)."""

    x: torch.Tensor
    cache: torch.Tensor | None
    width: int

    def windows_at(self, positions: list[int]) -> torch.Tensor:
        """The convolution's window after the first p tokens (its last W inputs), for each p:
        [B * P, D, W], rows ordered (b, p). One gather, so the backward allocates one gradient of
        x's size, not one per position."""
        W = self.width
        B, _, D = self.x.shape
        cache = self.x.new_zeros(B, D, W) if self.cache is None else self.cache.to(self.x.dtype)
        seq = torch.cat([cache, self.x.transpose(1, 2)], dim=-1)  # [B, D, W + T]; input t at W + t
        idx = torch.tensor([p + j for p in positions for j in range(W)], device=seq.device)  # [P * W]
        win = seq.index_select(-1, idx).view(B, D, len(positions), W)
        return win.permute(0, 2, 1, 3).reshape(B * len(positions), D, W)


@dataclass
class LayerTrace:
    """One recurrent layer: its chunk traces, its convolution traces (None without short
    convolutions) and whether the cache stores the state transposed (Gated DeltaNet: [B, HV, V, K])."""

    chunks: list[ChunkTrace]
    conv: tuple[ConvTrace, ...] | None
    v_first: bool

    def states_at(self, positions: list[int]) -> LayerState:
        """This layer's state after the first p tokens, for each p: batch B * P, rows (b, p)."""
        S = torch.stack([traced_state(self.chunks, p) for p in positions], dim=1)  # [B, P, H, K, V]
        S = S.flatten(0, 1)
        if self.v_first:
            S = S.transpose(-1, -2).contiguous()
        return LayerState(S, None if self.conv is None else tuple(c.windows_at(positions) for c in self.conv))


@dataclass
class StateTrace:
    """Filled by one traced read: layer index -> LayerTrace."""

    layers: dict[int, LayerTrace] = field(default_factory=dict)

    def record(self, layer_idx: int, layer: LayerTrace) -> None:
        if layer_idx in self.layers:
            raise RuntimeError(f"layer {layer_idx} traced twice: a StateTrace serves one read")
        self.layers[layer_idx] = layer

    def layer_states_at(self, positions: list[int], n_layers: int) -> list[LayerState]:
        """Every layer's state after the first p tokens of the traced read, for each p (batch B * P)."""
        if sorted(self.layers) != list(range(n_layers)):
            raise RuntimeError(f"the read traced layers {sorted(self.layers)} of {n_layers}: "
                               "a layer type without tracing support ran")
        return [self.layers[i].states_at(positions) for i in range(n_layers)]


def supports_trace(model: torch.nn.Module) -> bool:
    """Whether every recurrent layer of ``model`` records a StateTrace (the torch backend does)."""
    return bool(getattr(model, "refine_tta_traceable", False))
