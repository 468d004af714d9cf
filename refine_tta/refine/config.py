"""The frozen configuration of one REFINE adaptation (see shared/refine-algorithm.md).

Plain Python, no torch: the HTTP edge can build and validate it without touching a device.
Defaults are the paper's test-time defaults (n_chunks 8, k 5, n 1, reward ``binary``, sft_coef 1.0,
ppo_coef 0.4, clip 0.2/0.2, dual clip 3, weight decay 0.01, grad clip 1.0) except ``lr``
(paper: 1e-6 on all parameters; ours defaults to 1e-4 because the default scope may be small) and
``steps``.

``PRESETS`` are named sets of overrides for a deployment, chosen explicitly by name (the server's
``refine_preset`` setting, the CLI's ``--preset``) or from the model by :func:`preset_for_model`:

* ``embedded``: what the sweep in BENCHMARKS.md chose for the embedded 4.7M model (every parameter,
  lr 3e-4, hybrid reward, 4 steps). Only for that model: on a 1.3B model it would move every weight
  by up to ~1e-3.
* ``safe``: the default for every other model. LoRA rank 8 on q/k/v/o, lr 1e-3, 4 steps. It
  cannot destroy a model: B starts at zero and AdamW moves each factor entry by about lr per step,
  so after 4 steps the adapter is a rank-8 change with factor entries moved by at most ~4e-3; the
  session stays small (37 MiB for DeltaNet-1.3B, docs/adaptation.md), and every adaptation reports
  its *drift* (NTP loss change on a fixed generic text) so damage is visible. lr 1e-3, not 1e-4:
  a fresh LoRA at 1e-4 moves the logits by ~2e-3 of their norm, under bf16's resolution
  (benchmarks/results/mixed_precision.json).
* ``safe-lact``: ``safe`` for LaCT models (LoRA on their fused ``qkv`` and ``o_proj``).
* ``paper``: the paper's test-time setting for its 1.3B model (lr 1e-6, every parameter, reset per
  document); at bf16 resolution its change is mostly invisible to a bf16 read.
* ``library``: RefineConfig's own defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODES = ("refine", "sft", "none")
SELECTION_MODES = ("entropy", "uniform", "argmax", "argmin")
REWARD_KINDS = ("cosine", "binary", "hybrid")
SCOPES = ("full", "lora", "layers", "projections")

_TUPLE_FIELDS = ("lora_targets", "layers")

PRESETS: dict[str, dict[str, Any]] = {
    # benchmarks/results/sweep_refine.json (the embedded model since issue 18): full scope, hybrid
    # reward, lr 3e-4, 4 steps had the best exact match, then the lowest answer NLL, on the dev
    # documents; lr 3e-3 (the previous model's choice) destroys this model's reading (25-50%).
    "embedded": {"steps": 4, "lr": 3e-4, "reward": "hybrid", "scope": "full"},
    "safe": {"steps": 4, "lr": 1e-3, "reward": "binary", "scope": "lora", "lora_rank": 8, "lora_alpha": 16.0,
             "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj")},
    # the same for LaCT, whose blocks project q/k/v with one fused linear layer (``qkv``)
    "safe-lact": {"steps": 4, "lr": 1e-3, "reward": "binary", "scope": "lora", "lora_rank": 8, "lora_alpha": 16.0,
                  "lora_targets": ("qkv", "o_proj")},
    "paper": {"lr": 1e-6, "reward": "binary", "scope": "full"},
    "library": {},
}

# ``refine_tta.model.loading.config_hash`` of models/refine-tiny-deltanet (any dtype); a test keeps
# it equal to the shipped model's.
EMBEDDED_CONFIG_HASH = "f06c65528b061c85"
LACT_MODEL_TYPE = "lact_swiglu"  # refine_tta.model.lact.LaCTSWIGLUConfig.model_type (no torch import here)


def preset_for_model(architecture: str, config_hash: str) -> str:
    """The preset a model gets by default (from its fingerprint's ``architecture``, the config's
    model_type, and ``config_hash``): ``embedded`` for the embedded model, ``safe-lact`` for LaCT
    models, ``safe`` for any other."""
    if config_hash == EMBEDDED_CONFIG_HASH:
        return "embedded"
    return "safe-lact" if architecture == LACT_MODEL_TYPE else "safe"


def preset(name: str) -> dict[str, Any]:
    """The overrides of a named preset (a copy). Unknown names raise ValueError listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclass(frozen=True)
class RefineConfig:
    """How to adapt a model to one document.

    mode: ``refine`` (NTP + PPO on next-sequence rollouts), ``sft`` (NTP only, the paper's
    baseline) or ``none`` (no adaptation: ``steps`` becomes 0). Other modes need ``steps >= 1``.
    steps, lr, weight_decay, grad_clip: the AdamW inner loop (constant schedule).
    n_chunks, k, n: positions per document (one per chunk), rollout length, rollouts per position.
    selection: ``entropy`` (sample from softmax of smoothed entropy per chunk), ``uniform``,
    ``argmax``, ``argmin``.
    reward: ``binary`` (token match), ``cosine`` (hidden-state cosine), ``hybrid`` (their sum).
    sft_coef, ppo_coef: loss = sft_coef * NTP + ppo_coef * PPO.
    clip_low, clip_high, dual_clip: PPO ratio clip to [1 - clip_low, 1 + clip_high]; dual clip c.
    temperature: sampling temperature of the rollouts (paper: 1; H_t is always at temperature 1).
    edge_margin: rollout starts are kept >= edge_margin tokens after the start of the document and
    >= edge_margin tokens (plus the k continuation tokens) before its end.
    scope: which parameters are trained: ``full`` (all), ``lora`` (low-rank adapters of rank
    ``lora_rank``, scale ``lora_alpha / lora_rank``, on the linear layers named in
    ``lora_targets``), ``layers`` (all parameters of the blocks whose indices are in ``layers``),
    ``projections`` (the fast-weight projections q/k/v/beta of every block). The optimizer steps
    fp32 master tensors of the scope (``refine_tta.refine.delta``); weight decay pulls them toward
    the base model (it decays the change, not the base weight).
    seed: base seed of the adaptation's ``torch.Generator``.
    """

    mode: str = "refine"
    steps: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    n_chunks: int = 8
    k: int = 5
    n: int = 1
    selection: str = "entropy"
    reward: str = "binary"
    sft_coef: float = 1.0
    ppo_coef: float = 0.4
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 3.0
    temperature: float = 1.0
    edge_margin: int = 20
    scope: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    layers: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Lists (e.g. from JSON) become tuples so the config stays hashable and immutable.
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.mode == "none" and isinstance(self.steps, int) and not isinstance(self.steps, bool):
            object.__setattr__(self, "steps", 0)  # nothing is adapted: no preset's steps recorded as if run
        self._validate_loop()
        self._validate_objective()
        self._validate_scope()

    def _validate_loop(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_int("steps", self.steps, 0)
        if self.steps == 0 and self.mode != "none":
            raise ValueError(f"steps is 0 with mode {self.mode!r}: nothing would be adapted; use mode 'none' to "
                             f"read the document without adapting, or steps >= 1")
        if _check_float("lr", self.lr) <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if _check_float("weight_decay", self.weight_decay) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if _check_float("grad_clip", self.grad_clip) <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        _check_int("seed", self.seed, 0)
        if self.seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {self.seed}")

    def _validate_objective(self) -> None:
        _check_int("n_chunks", self.n_chunks, 1)
        _check_int("k", self.k, 1)
        _check_int("n", self.n, 1)
        _check_int("edge_margin", self.edge_margin, 0)
        _check_choice("selection", self.selection, SELECTION_MODES)
        _check_choice("reward", self.reward, REWARD_KINDS)
        for name in ("sft_coef", "ppo_coef"):
            if _check_float(name, getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mode == "refine" and self.sft_coef == 0 and self.ppo_coef == 0:
            raise ValueError("sft_coef and ppo_coef are both 0: mode 'refine' would have no loss")
        for name in ("clip_low", "clip_high"):
            value = _check_float(name, getattr(self, name))
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if _check_float("dual_clip", self.dual_clip) <= 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if _check_float("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def _validate_scope(self) -> None:
        _check_choice("scope", self.scope, SCOPES)
        _check_int("lora_rank", self.lora_rank, 1)
        if _check_float("lora_alpha", self.lora_alpha) <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        targets = self.lora_targets
        if not isinstance(targets, tuple) or not targets:
            raise ValueError(f"lora_targets must be a non-empty tuple of names, got {targets!r}")
        if not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"lora_targets must hold non-empty strings, got {targets!r}")
        if self.layers is None:
            if self.scope == "layers":
                raise ValueError("scope 'layers' needs a non-empty layers tuple, got None")
            return
        if self.scope != "layers":
            raise ValueError(f"layers is only used with scope 'layers' (scope is {self.scope!r})")
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError(f"layers must be a non-empty tuple of indices, got {self.layers!r}")
        for index in self.layers:
            _check_int("layers[i]", index, 0)
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must not repeat an index, got {self.layers!r}")

    def min_document_tokens(self) -> int:
        """The fewest tokens a document may have under this config (see ``validate_document``)."""
        if self.mode == "refine":
            return 2 * self.edge_margin + self.k + self.n_chunks
        if self.mode == "sft":
            return 2
        return 1

    def validate_document(self, n_tokens: int) -> None:
        """Raise ValueError if a document of ``n_tokens`` tokens is too short for this config.

        mode ``refine`` needs ``n_tokens >= 2 * edge_margin + k + n_chunks``: rollout starts r are
        clamped to ``[edge_margin, n_tokens - edge_margin - k]`` (so the true continuation
        x[r:r+k] exists), and this bound keeps that range at least ``n_chunks + 1`` positions wide
        and every one of the ``n_chunks`` chunks non-empty. mode ``sft`` needs 2 tokens (one
        next-token target); ``none`` needs 1.
        """
        _check_int("n_tokens", n_tokens, 0)
        need = self.min_document_tokens()
        if n_tokens < need:
            message = f"the document has {n_tokens} tokens; mode {self.mode!r} needs at least {need}"
            if self.mode == "refine":
                message += (f" ({self.n_chunks} rollout positions (n_chunks), each followed by k={self.k} true "
                            f"tokens, at least edge_margin={self.edge_margin} tokens from either end): send a "
                            f"longer document, lower n_chunks or edge_margin, or use mode 'sft' (needs 2 tokens)")
            raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: tuples become lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefineConfig:
        """Build from a dict (missing keys take defaults); unknown keys raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"RefineConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RefineConfig keys: {', '.join(map(str, unknown))}")
        values = {
            key: tuple(value) if key in _TUPLE_FIELDS and isinstance(value, list) else value
            for key, value in d.items()
        }
        return cls(**values)
