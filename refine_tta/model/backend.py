"""Which kernels a loaded model runs: fla's Triton kernels (CUDA) or ours in PyTorch (CPU).

Chosen once per model, in :func:`choose_backend`, from the model's device, and logged with the
reason. Installing the torch backend replaces ``forward`` on the model's own fla module
*instances* (never on classes or fla's modules), so two models in one process can use different
backends and nothing changes at import time.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass

import torch
from einops import rearrange

from refine_tta.kernels import causal_conv1d, delta_rule, gated_rms_norm, l2norm, rms_norm, swiglu_mlp
from refine_tta.model.trace import ConvTrace, LayerTrace

log = logging.getLogger(__name__)

BACKENDS = ("fla", "torch")


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "fla" | "torch"
    reason: str


def choose_backend(device: torch.device, requested: str | None = None) -> BackendChoice:
    """fla's Triton kernels need a GPU driver; everywhere else use the PyTorch kernels."""
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown kernel backend {requested!r}; choose one of {BACKENDS}")
        if requested == "fla" and device.type != "cuda":
            raise ValueError(f"the 'fla' backend runs Triton kernels and needs CUDA; model is on {device}")
        return BackendChoice(requested, f"requested explicitly for device {device}")
    if device.type == "cuda":
        return BackendChoice("fla", "CUDA device: fla's Triton kernels run untouched")
    return BackendChoice("torch", f"{device.type} device: Triton has no driver here, using refine_tta.kernels")


def install_backend(model: torch.nn.Module, choice: BackendChoice) -> None:
    """Make ``model`` run on ``choice``; logs what was replaced."""
    model.config.fuse_cross_entropy = False  # plain cross-entropy when labels are passed
    model.config.fuse_linear_cross_entropy = False
    model.refine_tta_backend = choice.name
    if choice.name == "fla":
        log.info("kernel backend: fla (%s)", choice.reason)
        return
    from fla.layers.delta_net import DeltaNet
    from fla.layers.gated_deltanet import GatedDeltaNet
    from fla.modules import FusedRMSNormGated, GatedMLP, RMSNorm, ShortConvolution

    replacements = {
        DeltaNet: _delta_net_forward,
        GatedDeltaNet: _gated_deltanet_forward,
        RMSNorm: _rms_norm_forward,
        FusedRMSNormGated: _gated_rms_norm_forward,
        ShortConvolution: _short_conv_forward,
        GatedMLP: _gated_mlp_forward,
    }
    counts: dict[str, int] = {}
    for module in model.modules():
        fn = replacements.get(type(module))
        if fn is not None:
            module.forward = types.MethodType(fn, module)
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    # every block's mixer runs on our kernels: a read can be traced (refine_tta.model.trace)
    mixers = counts.get("DeltaNet", 0) + counts.get("GatedDeltaNet", 0)
    model.refine_tta_traceable = mixers == getattr(model.config, "num_hidden_layers", -1)
    log.info("kernel backend: torch (%s); replaced %s", choice.reason, counts)


# --- forwards installed on module instances (self is the fla module) ---------------------------

def _rms_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    return rms_norm(x, self.weight, self.bias, self.eps, residual, prenorm, residual_in_fp32)


def _gated_rms_norm_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None or prenorm:
        raise NotImplementedError("gated RMSNorm with a residual is not used by supported models")
    return gated_rms_norm(x, g, self.weight, self.eps, self.activation)


def _short_conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False,
                        cu_seqlens=None, **kwargs):
    if cu_seqlens is not None:
        raise NotImplementedError("packed sequences (cu_seqlens) are not supported by the torch backend")
    if mask is not None:
        x = x * mask.unsqueeze(-1)
    weight = rearrange(self.weight, "d 1 w -> d w")
    y, new_cache = causal_conv1d(x, weight, self.bias, self.activation, cache)
    if residual is not None:
        y = y + residual
    return y, (new_cache if output_final_state else None)


def _gated_mlp_forward(self, x, **kwargs):
    if self.hidden_act != "swish":
        raise NotImplementedError(f"hidden_act {self.hidden_act!r} is not supported by the torch backend")
    bias = self.down_proj.bias
    return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, bias)


def _check_unpadded(attention_mask, kwargs):
    if kwargs.get("cu_seqlens") is not None:
        raise NotImplementedError("packed sequences (cu_seqlens) are not supported by the torch backend")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise NotImplementedError("padding masks are not supported by the torch backend; run unpadded batches")


def _conv_qkv(self, hidden_states, last_state, use_cache):
    """Projections through the three short convolutions. Returns q, k, v [B, T, *], the conv
    states, and a ConvTrace per convolution (its inputs and starting window)."""
    caches = (None, None, None)
    if last_state is not None and last_state.get("conv_state") is not None:
        caches = tuple(last_state["conv_state"])
    outs, states, traces = [], [], []
    for proj, conv, cache in zip((self.q_proj, self.k_proj, self.v_proj), (self.q_conv1d, self.k_conv1d, self.v_conv1d),
                                 caches):
        x = proj(hidden_states)
        y, new = conv(x, cache=cache, output_final_state=use_cache)
        outs.append(y)
        states.append(new)
        traces.append(ConvTrace(x, cache, conv.weight.shape[-1]))
    return *outs, tuple(states), tuple(traces)


def _record(self, state_trace, chunks, conv_traces, v_first: bool) -> None:
    """Hand this layer's chunk and convolution traces to the read's StateTrace (if it asked)."""
    if state_trace is None:
        return
    state_trace.record(self.layer_idx, LayerTrace(chunks, conv_traces if self.use_short_conv else None, v_first))


def _finish(self, o, hidden_states, past_key_values, recurrent_state, conv_state, use_cache, q_len):
    """Cache update, output norm (gated or not) and output projection. o: [B, T, H, V]."""
    from fla.layers.utils import update_layer_cache

    if use_cache:
        update_layer_cache(self, past_key_values, recurrent_state=recurrent_state,
                           conv_state=conv_state if self.use_short_conv else None, offset=q_len)
    if self.use_gate:
        g = rearrange(self.g_proj(hidden_states), "... (h d) -> ... h d", d=self.head_v_dim)
        o = self.o_norm(o, g)
    else:
        o = self.o_norm(o)
    return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))


def _delta_net_forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                       output_attentions=False, state_trace=None, **kwargs):
    """fla's DeltaNet layer on refine_tta.kernels. State [B, H, K, V]. ``state_trace``: a
    StateTrace to record this layer's read in (refine_tta.model.trace), or None."""
    from fla.layers.utils import get_layer_cache

    _check_unpadded(attention_mask, kwargs)
    import torch.nn.functional as F

    q_len = hidden_states.shape[1]
    last_state = get_layer_cache(self, past_key_values)
    conv_traces = None
    if self.use_short_conv:
        q, k, v, conv_state, conv_traces = _conv_qkv(self, hidden_states, last_state, use_cache)
    else:
        conv_state = None
        q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)
        if self.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        v = F.silu(self.v_proj(hidden_states))
    q, k = (rearrange(x, "... (h d) -> ... h d", d=self.head_k_dim) for x in (q, k))
    v = rearrange(v, "... (h d) -> ... h d", d=self.head_v_dim)
    if self.qk_activation == "relu":
        q, k = q.relu(), k.relu()
    elif self.qk_activation == "elu":
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    if self.qk_norm == "sum":
        q = F.normalize(q, p=1, dim=-1, eps=1e-6).to(q)
        k = F.normalize(k, p=1, dim=-1, eps=1e-6).to(k)
    elif self.qk_norm == "l2":
        q, k = l2norm(q), l2norm(k)
    beta = self.b_proj(hidden_states).sigmoid() if self.use_beta else torch.ones_like(q[..., 0])
    if self.allow_neg_eigval:
        beta = beta * 2.0
    initial = last_state["recurrent_state"] if last_state is not None else None
    chunks = None if state_trace is None else []
    o, state = delta_rule(q, k, v, beta, initial_state=initial, trace=chunks)
    _record(self, state_trace, chunks, conv_traces, v_first=False)
    return _finish(self, o, hidden_states, past_key_values, state, conv_state, use_cache, q_len), None, past_key_values


def _gated_deltanet_forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                            output_attentions=False, state_trace=None, **kwargs):
    """fla's GatedDeltaNet layer on refine_tta.kernels. Cached state is V-first: [B, HV, V, K].
    ``state_trace``: as in ``_delta_net_forward``."""
    from fla.layers.utils import get_layer_cache
    import torch.nn.functional as F

    _check_unpadded(attention_mask, kwargs)
    q_len = hidden_states.shape[1]
    last_state = get_layer_cache(self, past_key_values)
    conv_traces = None
    if self.use_short_conv:
        q, k, v, conv_state, conv_traces = _conv_qkv(self, hidden_states, last_state, use_cache)
    else:
        conv_state = None
        q, k, v = (F.silu(p(hidden_states)) for p in (self.q_proj, self.k_proj, self.v_proj))
    q, k = (rearrange(x, "... (h d) -> ... h d", d=self.head_k_dim) for x in (q, k))
    v = rearrange(v, "... (h d) -> ... h d", d=self.head_v_dim)
    if self.num_v_heads > self.num_heads:  # grouped values: each q/k head serves HV / H value heads
        rep = self.num_v_heads // self.num_heads
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    q, k = l2norm(q), l2norm(k)
    beta = self.b_proj(hidden_states).float().sigmoid()
    if self.allow_neg_eigval:
        beta = beta * 2.0
    # log decay per token and head: -exp(A_log) * softplus(a + dt_bias)
    g = -self.A_log.float().exp() * F.softplus(self.a_proj(hidden_states).float() + self.dt_bias.float())
    initial = last_state["recurrent_state"] if last_state is not None else None
    if initial is not None:
        initial = initial.transpose(-1, -2)  # [B, HV, V, K] -> [B, HV, K, V]
    chunks = None if state_trace is None else []
    o, state = delta_rule(q, k, v, beta, g=g, initial_state=initial, trace=chunks)
    _record(self, state_trace, chunks, conv_traces, v_first=True)
    state = state.transpose(-1, -2).contiguous()
    return _finish(self, o, hidden_states, past_key_values, state, conv_state, use_cache, q_len), None, past_key_values
