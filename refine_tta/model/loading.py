"""Load a DeltaNet / Gated DeltaNet / LaCT checkpoint through transformers' Auto classes.

``load_model`` is the only place that decides device, dtype and kernel backend; it logs all three
with the reason. ``import fla.models`` (which registers fla's model types with transformers and
costs seconds) and the registration of LaCT (``refine_tta.model.lact``) happen here, on first
load, never at import of this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refine_tta.model.backend import BackendChoice, choose_backend, install_backend

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("delta_net", "gated_deltanet", "lact_swiglu")
# Model types implemented in refine_tta itself (pure PyTorch on every device; no fla kernels to swap).
OWN_MODEL_TYPES = ("lact_swiglu",)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Config keys that do not change what the model computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "_name_or_path", "architectures",
                         "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_cache", "output_hidden_states",
                         "output_attentions", "return_dict"}


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the exact base model a state or adapter was computed with."""

    architecture: str
    config_hash: str
    weights_hash: str
    dtype: str

    def to_dict(self) -> dict[str, str]:
        return {"architecture": self.architecture, "config_hash": self.config_hash,
                "weights_hash": self.weights_hash, "dtype": self.dtype}

    def mismatch(self, other: dict) -> list[str]:
        """Names of the fields where ``other`` (a saved fingerprint dict) differs from this one."""
        mine = self.to_dict()
        return [key for key in mine if other.get(key) != mine[key]]


@dataclass
class LoadedModel:
    """A model ready to run: the fla module, its tokenizer, and where/how it runs."""

    model: torch.nn.Module
    tokenizer: object | None
    name: str
    device: torch.device
    dtype: torch.dtype
    backend: BackendChoice
    fingerprint: ModelFingerprint
    extra: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers


def register_fla_models() -> None:
    """Make transformers' Auto classes know every supported model type: fla's families (importing
    ``fla.models`` registers them) and ours (LaCT).

    fla warns "Triton is not supported on current platform" when it is imported without a GPU:
    expected here (the CPU backend is chosen and logged by ``choose_backend``), so it is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Triton is not supported", category=UserWarning)
        import fla.models  # noqa: F401  (registers DeltaNetConfig, GatedDeltaNetConfig, ...)

    from refine_tta.model.lact import register_lact

    register_lact()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> tuple[torch.dtype, str]:
    """Decide the compute dtype once, with the reason to log."""
    if isinstance(dtype, torch.dtype):
        return dtype, "requested"
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype], "requested"
    if device.type == "cuda":
        return torch.bfloat16, "CUDA default: bf16"
    return torch.float32, "CPU default: fp32 (bf16 is no faster on CPU and less exact)"


def _read_model_type(path_or_id: str) -> str:
    path = Path(path_or_id)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; pass the model directory (config.json, *.safetensors, tokenizer)")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?")
        try:
            return json.loads(cfg_file.read_text())["model_type"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{cfg_file} is not a valid model config: {exc}") from exc
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise ModelLoadError(f"model path {path_or_id!r} does not exist (and is not a hub id like 'org/name')")
    register_fla_models()  # AutoConfig must know fla's model types before it reads a hub config
    from transformers import AutoConfig

    try:  # a hub id: transformers resolves it unchanged (offline this fails)
        return AutoConfig.from_pretrained(path_or_id).model_type
    except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors here
        raise ModelLoadError(f"could not resolve {path_or_id!r} as a local path or hub id: {exc}") from exc


def config_hash(config) -> str:
    """sha256 of the config's computation-relevant fields (sorted JSON)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, shape, dtype, bytes), device independent."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fingerprint_model(model: torch.nn.Module) -> ModelFingerprint:
    dtype = next(model.parameters()).dtype
    return ModelFingerprint(model.config.model_type, config_hash(model.config), weights_hash(model),
                            str(dtype).replace("torch.", ""))


def prepare_model(model: torch.nn.Module, device: torch.device, backend: str | None = None) -> BackendChoice:
    """Validate an fla model's config, put it in eval mode and install its kernel backend."""
    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(model.config, "attn", None):
        raise ModelLoadError("hybrid models with softmax-attention layers (config.attn) are not supported yet")
    if getattr(model.config, "attnres_block_size", None) is not None:
        raise ModelLoadError("attention-residual models (attnres_block_size) are not supported")
    model.eval()
    if model_type in OWN_MODEL_TYPES:
        if backend not in (None, "torch"):
            raise ModelLoadError(f"{model_type} has no {backend!r} kernels; it runs in PyTorch on every device")
        choice = BackendChoice("torch", f"{model_type} is implemented in PyTorch (SDPA) on every device ({device})")
        model.refine_tta_backend = choice.name
        log.info("kernel backend: torch (%s)", choice.reason)
        return choice
    choice = choose_backend(device, backend)
    install_backend(model, choice)
    return choice


def load_model(
    path_or_hub_id: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    load_tokenizer: bool = True,
) -> LoadedModel:
    """Load a supported fla model (local HF directory or hub id) ready for refine_tta.

    Raises ModelLoadError for a missing path, an unsupported model type or a corrupt checkpoint.
    """
    source = str(path_or_hub_id)
    device = torch.device(device)
    model_type = _read_model_type(source)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    torch_dtype, dtype_reason = resolve_dtype(dtype, device)
    register_fla_models()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except Exception as exc:  # corrupt safetensors, shape mismatch, missing weights ...
        raise ModelLoadError(f"could not load weights of {source!r}: {type(exc).__name__}: {exc}") from exc
    model.to(device)
    choice = prepare_model(model, device, backend)
    tokenizer = None
    if load_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:
            raise ModelLoadError(f"could not load the tokenizer of {source!r}: {exc}") from exc
    fp = fingerprint_model(model)
    name = Path(source).name if Path(source).exists() else source
    log.info("loaded %s (%s, %.1fM params) on %s, dtype %s (%s), backend %s", name, model_type,
             sum(p.numel() for p in model.parameters()) / 1e6, device, torch_dtype, dtype_reason, choice.name)
    return LoadedModel(model, tokenizer, name, device, torch_dtype, choice, fp)
