"""How many bytes a session takes, computed from a model's config alone (no weights are loaded).

A session is a document state (per block: the delta-rule memory in fp32 and the short-convolution
windows in the model's dtype; the next-token logits in fp32) plus the adaptation's delta (fp32
master tensors of its scope, see ``refine_tta.refine.delta``). ``session_table`` renders the table
kept in docs/adaptation.md; tests check both numbers against the ``nbytes`` of real sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refine_tta.refine.delta import FullScope, LayersScope, LoraScope, ProjectionScope, Scope

# fla-hub/delta_net-1.3B-100B
DELTANET_1_3B = dict(model_type="delta_net", hidden_size=2048, num_hidden_layers=24, num_heads=16, vocab_size=32000,
                     expand_k=1.0, expand_v=1.0, use_short_conv=True, conv_size=4, use_gate=False, qk_norm="l2",
                     qk_activation="silu", hidden_ratio=4, use_beta=True, use_output_norm=True,
                     tie_word_embeddings=False)
# fla's GatedDeltaNetConfig defaults: the Gated DeltaNet 1.3B configuration (fla-hub/gated_deltanet-1.3B)
GATED_DELTANET_1_3B = dict(model_type="gated_deltanet", hidden_size=2048, num_hidden_layers=21, num_heads=6,
                           head_dim=256, expand_v=2.0, vocab_size=32000, hidden_ratio=4, conv_size=4,
                           use_short_conv=True, use_gate=True, tie_word_embeddings=False)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MIB = 2**20


def meta_model(config: dict):
    """An fla model built on the meta device from a config dict with its ``model_type`` (shapes
    only, no memory)."""
    from refine_tta.model.loading import register_fla_models

    register_fla_models()
    import fla.models
    from transformers import AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cls = {"delta_net": fla.models.DeltaNetConfig, "gated_deltanet": fla.models.GatedDeltaNetConfig}[config["model_type"]]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cls(**kwargs))


def param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def state_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of a batch-1 document state of ``model`` run in ``dtype``.

    Per block: recurrent [HV, K, V] fp32 with H*K = q_proj's outputs and HV*V = v_proj's outputs
    (so K*V*HV = key_dim * value_dim / H); each short-convolution window [C, W] in ``dtype``.
    Plus next_logits [V] fp32.
    """
    cfg = model.config
    shapes = param_shapes(model)
    width = torch.empty((), dtype=dtype).element_size()
    total = 4 * cfg.vocab_size
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}.attn."
        key_dim = shapes[prefix + "q_proj.weight"][0]
        value_dim = shapes[prefix + "v_proj.weight"][0]
        total += 4 * key_dim * value_dim // cfg.num_heads
        total += width * sum(s[0] * s[-1] for n, s in shapes.items()
                             if n.startswith(prefix) and n.endswith("_conv1d.weight"))
    return total


def delta_bytes(model: torch.nn.Module, scope: Scope) -> int:
    return scope.nbytes(param_shapes(model), model.config.num_hidden_layers)


@dataclass(frozen=True)
class SizeRow:
    model: str
    scope: str
    delta_bytes: int
    state_bytes: int

    @property
    def session_bytes(self) -> int:
        return self.delta_bytes + self.state_bytes


def table_scopes(n_blocks: int) -> dict[str, Scope]:
    return {
        "full": FullScope(),
        "layers (last 2)": LayersScope((n_blocks - 2, n_blocks - 1)),
        "fast-weight projections (q/k/v/beta)": ProjectionScope(),
        "LoRA r=8 (q/k/v/o)": LoraScope(8, 16.0, LORA_TARGETS),
        "LoRA r=32 (q/k/v/o)": LoraScope(32, 64.0, LORA_TARGETS),
        "LoRA r=64 (q/k/v/o)": LoraScope(64, 128.0, LORA_TARGETS),
    }


def size_rows(name: str, model: torch.nn.Module, dtype: torch.dtype) -> list[SizeRow]:
    state = state_bytes(model, dtype)
    return [SizeRow(name, label, delta_bytes(model, scope), state)
            for label, scope in table_scopes(model.config.num_hidden_layers).items()]


def _fmt(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


def session_table(embedded_config: dict) -> str:
    """The markdown table of session bytes (delta fp32 + state) for the embedded model (fp32) and
    the two 1.3B configurations (bf16)."""
    models = [("embedded (refine-tiny-deltanet, fp32)", embedded_config, torch.float32),
              ("DeltaNet-1.3B (bf16)", DELTANET_1_3B, torch.bfloat16),
              ("Gated DeltaNet-1.3B (bf16)", GATED_DELTANET_1_3B, torch.bfloat16)]
    lines = ["| model | scope | delta | state | session |", "| --- | --- | ---: | ---: | ---: |"]
    for name, config, dtype in models:
        for row in size_rows(name, meta_model(config), dtype):
            lines.append(f"| {row.model} | {row.scope} | {_fmt(row.delta_bytes)} | {_fmt(row.state_bytes)} | "
                         f"{_fmt(row.session_bytes)} |")
    return "\n".join(lines)
