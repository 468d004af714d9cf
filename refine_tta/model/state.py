"""The fast-weight memory of a document: what a recurrent model knows after reading it.

A :class:`DocumentState` holds, for every layer, the delta-rule state and the short-convolution
windows, plus the number of tokens read and the next-token logits after the last one. It is a plain
value: :meth:`DocumentState.to_cache` hands the model *copies* (fla's kernels update caches in
place), so a state can be resumed, branched and saved without ever being changed by a read.
Saving is :meth:`state_dict` / :meth:`from_state_dict` (plain tensors); files are the session
storage's business (``refine_tta.engine.storage``).
Tensors may carry autograd history (REFINE back-propagates through them).

Model families whose memory is not fla's ``Cache`` (LaCT: fast weights, an incomplete chunk and an
attention window) keep their layers as :class:`NamedLayerState` and declare a
:class:`CacheAdapter` as ``document_cache_adapter`` on the model class: :func:`cache_adapter` is
the one extension point through which ``read`` and ``generate`` turn states into caches and back.
Everything else (clone, expand, select, stack, save, load) works on any layer kind, as long as
every tensor is batch-first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

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

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs as saved: recurrent, conv.0, conv.1, conv.2."""
        return [("recurrent", self.recurrent), *((f"conv.{j}", c) for j, c in enumerate(self.conv or ()))]

    @staticmethod
    def cat(layers: list[LayerState]) -> LayerState:
        first = layers[0]
        conv = None if first.conv is None else tuple(
            torch.cat([layer.conv[j] for layer in layers]) for j in range(len(first.conv)))
        return LayerState(torch.cat([layer.recurrent for layer in layers]), conv)


@dataclass
class NamedLayerState:
    """One layer of a model family with its own kind of memory (e.g. LaCT): tensors by name,
    every one batch-first [B, ...]. Names are the family's (its cache adapter reads them); kept
    sorted, the order a saved state loads in, so ``tensors()`` lines up across save/load."""

    named: dict[str, torch.Tensor]

    def __post_init__(self):
        self.named = dict(sorted(self.named.items()))

    def tensors(self) -> list[torch.Tensor]:
        return list(self.named.values())

    def map(self, fn) -> NamedLayerState:
        return NamedLayerState({k: fn(v) for k, v in self.named.items()})

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.named.items())

    @staticmethod
    def cat(layers: list[NamedLayerState]) -> NamedLayerState:
        names = list(layers[0].named)
        if any(list(layer.named) != names for layer in layers):
            raise ValueError("cannot stack layer states with different tensors")
        return NamedLayerState({k: torch.cat([layer.named[k] for layer in layers]) for k in names})


@dataclass
class DocumentState:
    """layers: one LayerState (fla families) or NamedLayerState (e.g. LaCT) per block (empty = nothing read);
    n_tokens: tokens read; next_logits: [B, V] fp32 prediction of the next token (None if nothing read)."""

    layers: list[LayerState | NamedLayerState] = field(default_factory=list)
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
        return self.layers[0].tensors()[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.layers[0].tensors()[0].device if self.layers else torch.device("cpu")

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
        """Move (and optionally cast the floating-point layer tensors; logits stay fp32, counters int)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return DocumentState([layer.map(move) for layer in self.layers],
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
        layers = [type(layer).cat([s.layers[i] for s in states]) for i, layer in enumerate(first.layers)]
        logits = None if first.next_logits is None else torch.cat([s.next_logits for s in states])
        n_tokens = first.n_tokens if all(s.n_tokens == first.n_tokens for s in states) else -1
        return DocumentState(layers, n_tokens, logits)

    # --- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            for name, t in layer.items():
                out[f"layers.{i}.{name}"] = t
        if self.next_logits is not None:
            out["next_logits"] = self.next_logits
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], n_tokens: int) -> DocumentState:
        """Inverse of :meth:`state_dict` (the keys say how many layers and conv windows there are).
        Raises ValueError for keys that do not describe a state."""
        n_layers = 0
        layers = []
        while any(k.startswith(f"layers.{n_layers}.") for k in tensors):
            n_layers += 1
        for i in range(n_layers):
            prefix = f"layers.{i}."
            if f"{prefix}recurrent" not in tensors:  # a family with named tensors (e.g. LaCT)
                layers.append(NamedLayerState({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}))
                continue
            conv = tuple(tensors[f"{prefix}conv.{j}"] for j in range(3) if f"{prefix}conv.{j}" in tensors)
            layers.append(LayerState(tensors[f"{prefix}recurrent"], conv or None))
        known = set(cls(layers, n_tokens, tensors.get("next_logits")).state_dict())
        if known != set(tensors):
            raise ValueError(f"not a document state: unexpected tensors {sorted(set(tensors) - known)[:3]}")
        return cls(layers, n_tokens, tensors.get("next_logits"))


class CacheAdapter(Protocol):
    """How one model family's cache object and a DocumentState convert into each other."""

    def to_cache(self, state: DocumentState):
        """A cache the model's ``forward(past_key_values=...)`` continues from; reading it must
        never change ``state`` (hand out copies if the model updates caches in place)."""

    def from_cache(self, cache, n_tokens: int, next_logits: torch.Tensor | None) -> DocumentState:
        """The state after a read, from the cache the model returned (no copy needed)."""


class FlaCacheAdapter:
    """fla's ``Cache`` (DeltaNet, Gated DeltaNet): the default."""

    def to_cache(self, state: DocumentState):
        return state.to_cache()

    def from_cache(self, cache, n_tokens: int, next_logits: torch.Tensor | None) -> DocumentState:
        return DocumentState.from_cache(cache, n_tokens, next_logits)


FLA_CACHE = FlaCacheAdapter()


def cache_adapter(model: torch.nn.Module) -> CacheAdapter:
    """The extension point: the model's ``document_cache_adapter`` if its class declares one, else fla's."""
    return getattr(model, "document_cache_adapter", None) or FLA_CACHE

