"""What an adaptation may change (its *scope*, a strategy chosen once) and what it produced (a
:class:`ParameterDelta`, fp32 tensors that act *beside* the frozen base weights).

Scopes (one object per kind, made from a config by :func:`scope_for`):

* :class:`FullScope`        -- every parameter.
* :class:`LayersScope`      -- every parameter of the chosen blocks (``model.layers.{i}.*``).
* :class:`ProjectionScope`  -- the fast-weight projections only: q/k/v/beta (``q_proj``,
  ``k_proj``, ``v_proj``, ``b_proj``) of every block, the paper's "fast weights" in the narrow sense.
* :class:`LoraScope`        -- low-rank adapters ``scale * B A`` (``scale = alpha / r``) on the chosen
  linear layers of every block; exported as a standard PEFT adapter by :func:`export_peft`.

Mixed precision. The base model is never written to. The trainable tensors are fp32 *master*
tensors: for the weight-space scopes (full, layers, projections) one ``D`` per parameter, zero at
the start, meaning ``W + D``; for LoRA the factors ``A`` [r, in] and ``B`` [out, r]. The optimizer
steps only these (never a bf16/fp16 tensor); forward and backward run in the model's dtype. How a
tensor acts on the model:

* on a linear layer (or embedding) whose ``forward`` the model calls, as a term *beside* the frozen
  weight: ``y = W x + D x`` (``W x + scale * B (A x)`` for LoRA), the sum formed in fp32 and rounded
  once, so a delta far below the weight's bf16 resolution still reaches the output;
* on anything else (norm and convolution weights, and linear layers the model reads through a
  fused kernel, such as fla's ``mlp.down_proj`` under ``fuse_swiglu``), by a parametrization
  ``W + D`` formed in fp32 and rounded to the model's dtype: exact for fp32 models; in bf16 the
  part of ``D`` below the weight's resolution is lost (``folded_loss`` measures how much).

Both mechanisms are removed completely on exit (hooks and parametrizations), so the base model is
bit-identical after any adaptation or generation, and applying a session copies no base weight.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.utils import parametrize

FAST_WEIGHT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "b_proj")


def block_index(name: str) -> int | None:
    """Index of the block a parameter name belongs to ('model.layers.3.attn.q_proj.weight' -> 3)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


# ---------------------------------------------------------------------------------------------
# Scopes: which tensors an adaptation trains, from parameter names and shapes alone


class Scope(ABC):
    """A strategy for what an adaptation trains. Works from ``{parameter name: shape}`` so the same
    code sizes a session for a model that is not loaded (``tensor_shapes`` of a meta-device model)."""

    kind: ClassVar[str]

    @abstractmethod
    def tensor_shapes(self, param_shapes: dict[str, tuple[int, ...]], n_blocks: int) -> dict[str, tuple[int, ...]]:
        """The fp32 tensors a delta of this scope holds: {tensor name: shape}. ValueError if none."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able description (``kind`` plus the scope's settings); equal iff the scopes are."""

    def new_delta(self, model: torch.nn.Module, generator: torch.Generator) -> ParameterDelta:
        """A delta of this scope that changes nothing yet (fp32, on the model's device)."""
        shapes = self.tensor_shapes(_param_shapes(model), model.config.num_hidden_layers)
        device = next(model.parameters()).device
        return ParameterDelta(self.describe(), {n: torch.zeros(s, device=device) for n, s in shapes.items()})

    def nbytes(self, param_shapes: dict[str, tuple[int, ...]], n_blocks: int) -> int:
        """Bytes of this scope's delta (fp32) for a model with these parameters."""
        return 4 * sum(_numel(s) for s in self.tensor_shapes(param_shapes, n_blocks).values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@dataclass(frozen=True)
class FullScope(Scope):
    kind: ClassVar[str] = "full"

    def tensor_shapes(self, param_shapes, n_blocks):
        return dict(param_shapes)

    def describe(self):
        return {"kind": self.kind}


@dataclass(frozen=True)
class LayersScope(Scope):
    """All parameters of the blocks ``layers``."""

    layers: tuple[int, ...]
    kind: ClassVar[str] = "layers"

    def tensor_shapes(self, param_shapes, n_blocks):
        bad = [i for i in self.layers if i >= n_blocks]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
        return {n: s for n, s in param_shapes.items() if block_index(n) in set(self.layers)}

    def describe(self):
        return {"kind": self.kind, "layers": sorted(self.layers)}


@dataclass(frozen=True)
class ProjectionScope(Scope):
    """The weights of the linear layers named ``targets`` in every block (default q/k/v/beta)."""

    targets: tuple[str, ...] = FAST_WEIGHT_PROJECTIONS
    kind: ClassVar[str] = "projections"

    def tensor_shapes(self, param_shapes, n_blocks):
        found = {n: s for n, s in param_shapes.items()
                 if n.endswith(".weight") and len(s) == 2 and _module_of(n).split(".")[-1] in self.targets
                 and block_index(n) is not None}
        if not found:
            raise ValueError(f"no linear layers named {list(self.targets)} in the model's blocks")
        return found

    def describe(self):
        return {"kind": self.kind, "targets": sorted(self.targets)}


@dataclass(frozen=True)
class LoraScope(Scope):
    """Factors A [r, in] (random, std 1/sqrt(in)) and B [out, r] (zeros) per target linear layer."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    kind: ClassVar[str] = "lora"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def tensor_shapes(self, param_shapes, n_blocks):
        shapes = {}
        for n, s in param_shapes.items():
            if n.endswith(".weight") and len(s) == 2 and _module_of(n).split(".")[-1] in self.targets \
                    and block_index(n) is not None:
                module = _module_of(n)
                shapes[module + ".lora_A"] = (self.rank, s[1])
                shapes[module + ".lora_B"] = (s[0], self.rank)
        if not shapes:
            raise ValueError(f"no linear layers named {list(self.targets)} in the model's blocks")
        return shapes

    def describe(self):
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "targets": sorted(self.targets)}

    def new_delta(self, model, generator):
        delta = super().new_delta(model, generator)
        for name, t in delta.tensors.items():
            if name.endswith(".lora_A"):
                a = torch.randn(t.shape, generator=generator, device=generator.device, dtype=torch.float32)
                t.copy_(a / t.shape[1] ** 0.5)
        return delta


def scope_for(config) -> Scope:
    """The scope strategy of a :class:`~refine_tta.refine.config.RefineConfig` (the one place that
    reads ``config.scope``)."""
    if config.scope == "full":
        return FullScope()
    if config.scope == "layers":
        return LayersScope(tuple(config.layers))
    if config.scope == "projections":
        return ProjectionScope()
    if config.scope == "lora":
        return LoraScope(config.lora_rank, float(config.lora_alpha), tuple(config.lora_targets))
    raise ValueError(f"unknown scope {config.scope!r}")


def scope_from_description(description: dict[str, Any]) -> Scope | None:
    """Inverse of ``Scope.describe`` (None for the empty delta of mode 'none')."""
    kind = description.get("kind")
    if kind == "none":
        return None
    if kind == "full":
        return FullScope()
    if kind == "layers":
        return LayersScope(tuple(description["layers"]))
    if kind == "projections":
        return ProjectionScope(tuple(description["targets"]))
    if kind == "lora":
        return LoraScope(int(description["rank"]), float(description["alpha"]), tuple(description["targets"]))
    raise ValueError(f"unknown delta kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Attaching tensors to a model: terms beside the frozen weights, or parametrizations


_CALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def called_modules(model: torch.nn.Module) -> frozenset[str]:
    """Names of the nn.Linear / nn.Embedding modules whose ``forward`` the model calls (a forward
    hook fires for them). Found once per model with a 2-token read; fused paths that read a
    module's ``.weight`` directly are absent."""
    if model in _CALLED:
        return _CALLED[model]
    seen: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.add(name))
               for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    try:
        from refine_tta.model.runtime import read

        device = next(model.parameters()).device
        with torch.no_grad():
            read(model, torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    _CALLED[model] = frozenset(seen)
    return _CALLED[model]


def _beside(out: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """out + term, summed in fp32 and rounded once to out's dtype."""
    if out.dtype == torch.float32:
        return out + term.float()
    return (out.float() + term.float()).to(out.dtype)


class _AddDelta(torch.nn.Module):
    """Parametrization W -> W + D (fp32 sum, rounded to W's dtype)."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dtype == torch.float32:
            return weight + self.delta
        return (weight.float() + self.delta).to(weight.dtype)


class _AddLowRank(torch.nn.Module):
    """Parametrization W -> W + scale * B A (for linear layers read through a fused kernel)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.a, self.b, self.scale = a, b, scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.float() + self.scale * (self.b @ self.a)).to(weight.dtype)


def _dense_hook(delta: torch.Tensor, embedding: bool):
    def hook(module, args, out):
        x = args[0]
        if embedding:  # the same lookup as the module's (padding_idx: that row gets no gradient)
            return _beside(out, F.embedding(x, delta, module.padding_idx, module.max_norm, module.norm_type,
                                            module.scale_grad_by_freq, module.sparse))
        return _beside(out, F.linear(x, delta.to(x.dtype)))
    return hook


def _lora_hook(a: torch.Tensor, b: torch.Tensor, scale: float):
    def hook(module, args, out):
        x = args[0].to(torch.float32)
        return _beside(out, scale * F.linear(F.linear(x, a), b))
    return hook


@contextlib.contextmanager
def attached(model: torch.nn.Module, description: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """Make ``model`` compute with the delta ``tensors`` (which may require grad) until exit."""
    kind = description.get("kind")
    if kind == "none" or not tensors:
        yield model
        return
    called = called_modules(model)
    modules = dict(model.named_modules())
    handles: list[Any] = []
    parametrized: list[tuple[torch.nn.Module, str]] = []
    try:
        if kind == "lora":
            scale = LoraScope(int(description["rank"]), float(description["alpha"]), ()).scale
            for key, a in tensors.items():
                if not key.endswith(".lora_A"):
                    continue
                name = key[: -len(".lora_A")]
                b = tensors[name + ".lora_B"]
                module = _require_module(modules, name)
                if name in called:
                    handles.append(module.register_forward_hook(_lora_hook(a, b, scale)))
                else:
                    parametrize.register_parametrization(module, "weight", _AddLowRank(a, b, scale), unsafe=True)
                    parametrized.append((module, "weight"))
        else:
            owners = _owners(model)
            for pname, d in tensors.items():
                if pname not in owners:
                    raise ValueError(f"delta names a parameter the model lacks: {pname}")
                for mname, attr in owners[pname]:
                    module = modules[mname]
                    hookable = attr == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
                    if hookable and mname in called:
                        handles.append(module.register_forward_hook(
                            _dense_hook(d, isinstance(module, torch.nn.Embedding))))
                    else:
                        parametrize.register_parametrization(module, attr, _AddDelta(d), unsafe=True)
                        parametrized.append((module, attr))
        yield model
    finally:
        for h in handles:
            h.remove()
        for module, attr in reversed(parametrized):
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)


def _require_module(modules: dict[str, torch.nn.Module], name: str) -> torch.nn.Module:
    if name not in modules:
        raise ValueError(f"delta names a module the model lacks: {name}")
    return modules[name]


def _owners(model: torch.nn.Module) -> dict[str, list[tuple[str, str]]]:
    """Canonical parameter name -> every (module name, attribute) holding that parameter (tied weights
    appear under several modules)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            out.setdefault(canonical[id(p)], []).append((mname, attr))
    return out


# ---------------------------------------------------------------------------------------------
# The delta: plain fp32 tensors plus a JSON description


@dataclass
class ParameterDelta:
    """An adaptation's change over the base model, as plain fp32 tensors.

    ``scope``: the scope's description (``{"kind": "none"}`` for no change). Weight-space kinds
    (full, layers, projections): tensors[parameter name] = D, same shape as the parameter, acting as
    ``W + D``. ``lora``: tensors[f"{module}.lora_A"] [r, in] and [f"{module}.lora_B"] [out, r], acting
    as ``W + (alpha / r) B A``.
    """

    scope: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.scope["kind"]

    @property
    def scale(self) -> float:
        """alpha / r for LoRA, 1 otherwise."""
        return float(self.scope["alpha"]) / int(self.scope["rank"]) if self.kind == "lora" else 1.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def description(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.scope))

    @classmethod
    def from_tensors(cls, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ParameterDelta:
        scope_from_description(description)  # unknown kinds fail here
        return cls(dict(description), {k: v.float() for k, v in tensors.items()})

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """parameter name -> additive fp32 change of that parameter (LoRA factors multiplied out)."""
        if self.kind != "lora":
            return dict(self.tensors)
        out = {}
        for key, a in self.tensors.items():
            if key.endswith(".lora_A"):
                module = key[: -len(".lora_A")]
                out[module + ".weight"] = self.scale * (self.tensors[module + ".lora_B"] @ a)
        return out

    def applied(self, model: torch.nn.Module):
        """Context manager: the model computes with this delta until exit (nothing is copied)."""
        return attached(model, self.scope, self.tensors)

    def folded_loss(self, model: torch.nn.Module) -> float:
        """Fraction of the delta's norm lost if it were added into the model's weights in their dtype:
        ||round(W + D) - W - D|| / ||D|| over all weights (0 for fp32 models up to fp32 rounding)."""
        params = dict(model.named_parameters())
        lost = total = 0.0
        for name, d in self.weight_deltas().items():
            w = params[name].detach()
            folded = (w.float() + d.to(w.device)).to(w.dtype).float() - w.float()
            lost += float((folded - d.to(w.device)).square().sum())
            total += float(d.square().sum())
        return (lost / total) ** 0.5 if total > 0 else 0.0


def scope_from_v1(kind: str, scale: float, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The scope description of a delta stored as ``{"kind", "scale"}`` before scopes were described
    in full (refine-tta-delta/1 files, sessions stored before /2): same tensor names and meaning."""
    if kind in ("none", "full"):
        return {"kind": kind}
    if kind == "layers":
        return {"kind": kind, "layers": sorted({block_index(n) for n in tensors})}
    if kind == "lora":
        a = next(t for n, t in tensors.items() if n.endswith(".lora_A"))
        targets = sorted({n[: -len(".lora_A")].split(".")[-1] for n in tensors if n.endswith(".lora_A")})
        return {"kind": kind, "rank": a.shape[0], "alpha": scale * a.shape[0], "targets": targets}
    raise ValueError(f"unknown delta kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Training: fp32 masters attached to a frozen model


class TrainableScope:
    """Handle returned by :func:`trainable_scope`: ``params`` (fp32 leaf masters, the only tensors the
    optimizer may step), ``attached(model)`` (the model computes with them, for one step) and
    ``delta()`` (a detached copy of what they hold)."""

    def __init__(self, start: ParameterDelta):
        self.scope = dict(start.scope)
        self.masters = {n: t.detach().clone().float().requires_grad_(True) for n, t in start.tensors.items()}
        self.params = list(self.masters.values())

    def attached(self, model: torch.nn.Module):
        """Context manager: ``model`` computes with the masters (gradients reach them) until exit.
        Outside it the model is the base model, so whoever shares it between steps (the engine
        decodes other sessions there) never sees a half-trained delta."""
        return attached(model, self.scope, self.masters)

    def delta(self) -> ParameterDelta:
        return ParameterDelta(dict(self.scope), {n: t.detach().clone() for n, t in self.masters.items()})


@contextlib.contextmanager
def trainable_scope(model: torch.nn.Module, config, generator: torch.Generator,
                    start: ParameterDelta | None = None):
    """Make fp32 masters of ``config``'s scope (starting from ``start`` when given, else from a fresh
    delta drawn with ``generator``) and freeze the model's own parameters until exit, always. The
    masters act on the model only inside ``handle.attached(model)``.

    ValueError if ``start`` was made with another scope, or names what the model lacks.
    """
    scope = scope_for(config)
    if start is None:
        start = scope.new_delta(model, generator)
    elif start.scope != scope.describe():
        raise ValueError(f"the base session's scope {start.scope} differs from this adaptation's {scope.describe()}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        handle = TrainableScope(start)
        with handle.attached(model):  # fail here, before step 1, if the delta does not fit the model
            pass
        yield handle
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
            p.grad = None


# ---------------------------------------------------------------------------------------------
# PEFT export of a LoRA delta


def export_peft(delta: ParameterDelta, directory: str | Path, base_model: str = "") -> Path:
    """Write a LoRA delta as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``peft.PeftModel.from_pretrained(base, directory)`` loads over the base model."""
    if delta.kind != "lora":
        raise ValueError(f"only a LoRA delta is a PEFT adapter; this one is {delta.kind!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = sorted(k[: -len(".lora_A")] for k in delta.tensors if k.endswith(".lora_A"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(delta.scope["rank"]), "lora_alpha": float(delta.scope["alpha"]), "lora_dropout": 0.0,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {}
    for m in modules:
        tensors[f"base_model.model.{m}.lora_A.weight"] = delta.tensors[m + ".lora_A"].detach().cpu().contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = delta.tensors[m + ".lora_B"].detach().cpu().contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
