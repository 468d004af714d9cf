"""What an adaptation may change (its *scope*) and what it produced (a :class:`ParameterDelta`).

Scopes:
  * ``full``   -- every parameter; the delta is ``adapted - base`` for each of them.
  * ``layers`` -- every parameter of the chosen blocks (``model.layers.{i}.*``).
  * ``lora``   -- low-rank adapters ``W + (alpha / r) B A`` on the chosen linear layers of every block,
    attached with ``torch.nn.utils.parametrize`` so that removing them restores ``W`` exactly.

``trainable_scope`` is a context manager that prepares the model for training in a scope and puts
everything back on exit (requires_grad flags, parametrizations, and in-place-updated weights), so
the base model is bit-identical after any adaptation, successful or not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from refine_tta.refine.config import RefineConfig


class LoRA(torch.nn.Module):
    """Parametrization W -> W + scale * B @ A. A: [r, in] (small random), B: [out, r] (zeros)."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        out_f, in_f = weight.shape
        a = torch.randn(rank, in_f, generator=generator, device=weight.device, dtype=torch.float32) / in_f ** 0.5
        self.lora_A = torch.nn.Parameter(a.to(weight.dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_f, rank, device=weight.device, dtype=weight.dtype))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)


def block_index(name: str) -> int | None:
    """Index of the block a parameter name belongs to ('model.layers.3.attn.q_proj.weight' -> 3)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def lora_modules(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The nn.Linear modules inside blocks whose attribute name is in ``targets``."""
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets and block_index(name + ".w") is not None}
    if not found:
        raise ValueError(f"no linear layers named {list(targets)} in the model's blocks")
    return found


@dataclass
class ParameterDelta:
    """The adapted parameters as a change over the base model.

    kind "full"/"layers": tensors[name] = adapted - base, for parameter ``name``.
    kind "lora": tensors[f"{module}.lora_A"] [r, in] and [f"{module}.lora_B"] [out, r]; scale = alpha / r.
    kind "none": no tensors.
    """

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: float = 1.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """parameter name -> additive change of that parameter (LoRA factors multiplied out)."""
        if self.kind != "lora":
            return dict(self.tensors)
        out = {}
        for key, a in self.tensors.items():
            if key.endswith(".lora_A"):
                module = key[: -len(".lora_A")]
                out[module + ".weight"] = self.scale * (self.tensors[module + ".lora_B"].float() @ a.float())
        return out

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Temporarily add the delta to the model's weights; the originals are copied back on exit."""
        params = dict(model.named_parameters())
        deltas = self.weight_deltas()
        missing = [n for n in deltas if n not in params]
        if missing:
            raise ValueError(f"delta names parameters the model lacks: {missing[:3]}")
        saved = {n: params[n].detach().clone() for n in deltas}
        try:
            with torch.no_grad():
                for n, d in deltas.items():
                    params[n].add_(d.to(device=params[n].device, dtype=torch.float32).to(params[n].dtype))
            yield model
        finally:
            with torch.no_grad():
                for n, orig in saved.items():
                    params[n].copy_(orig)


class TrainableScope:
    """Handle returned by :func:`trainable_scope`: the parameters to optimise and how to read the delta."""

    def __init__(self, model, config: RefineConfig, generator: torch.Generator):
        self.model = model
        self.config = config
        self.kind = config.scope
        self.lora: dict[str, LoRA] = {}
        self.base: dict[str, torch.Tensor] = {}
        if self.kind == "lora":
            scale = config.lora_alpha / config.lora_rank
            try:
                for name, linear in lora_modules(model, config.lora_targets).items():
                    adapter = LoRA(linear.weight, config.lora_rank, scale, generator)
                    parametrize.register_parametrization(linear, "weight", adapter)
                    self.lora[name] = adapter
            except BaseException:
                self.restore()  # trainable_scope only restores a scope that was fully built
                raise
            self.params = [p for a in self.lora.values() for p in (a.lora_A, a.lora_B)]
        else:
            named = self._scoped_parameters()
            self.base = {n: p.detach().clone() for n, p in named.items()}
            self.params = list(named.values())

    def _scoped_parameters(self) -> dict[str, torch.nn.Parameter]:
        named = dict(self.model.named_parameters())
        if self.kind == "full":
            return named
        layers = set(self.config.layers or ())
        n_blocks = self.model.config.num_hidden_layers
        bad = [i for i in layers if i >= n_blocks]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
        return {n: p for n, p in named.items() if block_index(n) in layers}

    def delta(self) -> ParameterDelta:
        """The change made so far (detached copies)."""
        if self.kind == "lora":
            tensors = {}
            for name, a in self.lora.items():
                tensors[name + ".lora_A"] = a.lora_A.detach().clone()
                tensors[name + ".lora_B"] = a.lora_B.detach().clone()
            scale = next(iter(self.lora.values())).scale
            return ParameterDelta("lora", tensors, scale)
        params = dict(self.model.named_parameters())
        tensors = {n: (params[n].detach().float() - b.float()).to(b.dtype) for n, b in self.base.items()}
        return ParameterDelta(self.kind, tensors)

    def restore(self) -> None:
        if self.kind == "lora":
            for name in self.lora:
                linear = self.model.get_submodule(name)
                parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
            self.lora.clear()
        else:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, b in self.base.items():
                    params[n].copy_(b)


@contextlib.contextmanager
def trainable_scope(model: torch.nn.Module, config: RefineConfig, generator: torch.Generator):
    """Make exactly the scope's parameters trainable; restore the base model on exit, always."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    scope = None
    try:
        scope = TrainableScope(model, config, generator)
        for p in scope.params:
            p.requires_grad_(True)
        yield scope
    finally:
        if scope is not None:
            scope.restore()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
            p.grad = None
