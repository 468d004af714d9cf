"""The fast-weight memory of a document: what a recurrent model knows after reading it.

A :class:`DocumentState` holds, for every layer, the delta-rule state and the short-convolution
windows, plus the number of tokens read and the next-token logits after the last one. It is a plain
value: :meth:`DocumentState.to_cache` hands the model *copies* (fla's kernels update caches in
place), so a state can be resumed, branched and saved without ever being changed by a read.
Saving is :meth:`state_dict` / :meth:`from_state_dict` (plain tensors); files are the session
storage's business (``refine_tta.engine.storage``).
Tensors may carry autograd history (REFINE back-propagates through them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerState:
    """One layer. recurrent: [B, H, K, V] (DeltaNet) or [B, HV, V, K] (Gated DeltaNet);
    conv: (q, k, v) windows, each [B, D, W], or None for models without short convolutions."""

    recurrent: torch.Tensor
    conv: tuple[torch.Tensor, ...] | None

    def tensors(self) -> list[torch.Tensor]:
        return [self.recurrent, *(self.conv or ())]

    def map(self, fn) -> LayerState:
        return LayerState(fn(self.recurrent), None if self.conv is None else tuple(fn(c) for c in self.conv))


@dataclass
class DocumentState:
    """layers: one LayerState per block (empty list = nothing read yet);
    n_tokens: tokens read; next_logits: [B, V] fp32 prediction of the next token (None if nothing read)."""

    layers: list[LayerState] = field(default_factory=list)
    n_tokens: int = 0
    next_logits: torch.Tensor | None = None

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls) -> DocumentState:
        return cls()

    @classmethod
    def from_cache(cls, cache, n_tokens: int, next_logits: torch.Tensor | None) -> DocumentState:
        """Take the tensors out of an fla ``Cache`` after a read (no copy)."""
        layers = []
        for layer in cache:
            conv = layer.get("conv_state")
            layers.append(LayerState(layer["recurrent_state"], None if conv is None else tuple(conv)))
        return cls(layers, n_tokens, next_logits)

    def to_cache(self):
        """A fresh fla ``Cache`` holding clones of this state's tensors (autograd-connected)."""
        from fla.models.utils import Cache

        if self.is_empty:
            return Cache()
        legacy = tuple(
            {"recurrent_state": layer.recurrent.clone(),
             "conv_state": None if layer.conv is None else tuple(c.clone() for c in layer.conv),
             "attn_state": None, "ffn_state": None}
            for layer in self.layers
        )
        return Cache.from_legacy_cache(legacy, seen_tokens=self.n_tokens)

    # --- properties ---------------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        return not self.layers

    @property
    def batch_size(self) -> int:
        if self.is_empty:
            return 1 if self.next_logits is None else self.next_logits.shape[0]
        return self.layers[0].recurrent.shape[0]

    @property
    def device(self) -> torch.device:
        return self.layers[0].recurrent.device if self.layers else torch.device("cpu")

    def tensors(self) -> list[torch.Tensor]:
        out = [t for layer in self.layers for t in layer.tensors()]
        return out + ([self.next_logits] if self.next_logits is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # --- value operations ---------------------------------------------------------------------
    def map(self, fn) -> DocumentState:
        return DocumentState([layer.map(fn) for layer in self.layers], self.n_tokens,
                             None if self.next_logits is None else fn(self.next_logits))

    def clone(self) -> DocumentState:
        return self.map(torch.clone)

    def detach(self) -> DocumentState:
        return self.map(torch.Tensor.detach)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DocumentState:
        """Move (and optionally cast the recurrent/conv tensors; logits stay fp32)."""
        return DocumentState([layer.map(lambda t: t.to(device=device, dtype=dtype)) for layer in self.layers],
                             self.n_tokens, None if self.next_logits is None else self.next_logits.to(device))

    def expand(self, n: int) -> DocumentState:
        """Batch of n identical branches from a batch-1 state: every tensor [1, ...] -> [n, ...]."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a batch-1 state, got batch {self.batch_size}")
        return self.map(lambda t: t.expand(n, *t.shape[1:]).contiguous())

    def select(self, index: int | torch.Tensor) -> DocumentState:
        """Rows of the batch: an int keeps a batch dim of 1; a LongTensor selects several."""
        idx = torch.as_tensor([index] if isinstance(index, int) else index, device=self.device)
        return self.map(lambda t: t.index_select(0, idx.to(t.device)))

    @staticmethod
    def stack(states: list[DocumentState]) -> DocumentState:
        """Concatenate batch-b states along the batch dim (states must have the same structure)."""
        if not states:
            raise ValueError("stack needs at least one state")
        first = states[0]
        layers = []
        for i, layer in enumerate(first.layers):
            rec = torch.cat([s.layers[i].recurrent for s in states])
            conv = None if layer.conv is None else tuple(
                torch.cat([s.layers[i].conv[j] for s in states]) for j in range(len(layer.conv)))
            layers.append(LayerState(rec, conv))
        logits = None if first.next_logits is None else torch.cat([s.next_logits for s in states])
        n_tokens = first.n_tokens if all(s.n_tokens == first.n_tokens for s in states) else -1
        return DocumentState(layers, n_tokens, logits)

    # --- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            out[f"layers.{i}.recurrent"] = layer.recurrent
            for j, c in enumerate(layer.conv or ()):
                out[f"layers.{i}.conv.{j}"] = c
        if self.next_logits is not None:
            out["next_logits"] = self.next_logits
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], n_tokens: int) -> DocumentState:
        """Inverse of :meth:`state_dict` (the keys say how many layers and conv windows there are).
        Raises ValueError for keys that do not describe a state."""
        n_layers = 0
        while f"layers.{n_layers}.recurrent" in tensors:
            n_layers += 1
        layers = []
        for i in range(n_layers):
            conv = tuple(tensors[f"layers.{i}.conv.{j}"] for j in range(3) if f"layers.{i}.conv.{j}" in tensors)
            layers.append(LayerState(tensors[f"layers.{i}.recurrent"], conv or None))
        known = set(cls(layers, n_tokens, tensors.get("next_logits")).state_dict())
        if known != set(tensors):
            raise ValueError(f"not a document state: unexpected tensors {sorted(set(tensors) - known)[:3]}")
        return cls(layers, n_tokens, tensors.get("next_logits"))
