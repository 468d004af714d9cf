"""LaCT in Hugging Face format, in PyTorch only, with its document state carried between reads.

Parameter names and config fields are the LaCT authors' (``lact_llm``: ``LaCTForCausalLM`` ->
``model.embeddings``, ``model.layers.{i}.{attn_norm, attn, mlp_norm, mlp}``, ``model.norm``,
``lm_head``; in ``attn``: ``qkv``, ``o_proj``, ``w0``/``w2`` (``w_left``/``w_right`` when low
rank), ``w1``, ``lr_proj``, ``qk_scale``, ``qk_offset``, ``ttt_scale_proj``, ``ttt_norm``,
``momentum_proj.0``), so their checkpoints load through transformers' Auto classes.

Unlike the authors' model (flash-attn, and generation that recomputes the whole sequence per
token), every read here continues from a :class:`LaCTCache`: per layer the fast-weight state
(:class:`~refine_tta.kernels.lact.FastWeightState`) and the attention window's keys/values, with a
position per batch row. Reads never modify the cache they are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from refine_tta.kernels import lact as K
from refine_tta.kernels.layers import rms_norm, swiglu_mlp
from refine_tta.model.lact.configuration import LaCTSWIGLUConfig
from refine_tta.model.lact.state import LaCTCache, LaCTCacheAdapter

BASE_LR = 1e-3  # the authors' base learning rate: lr = softplus(lr_proj(x) + softplus^-1(BASE_LR))
FLA_NORM_EPS = 1e-5  # fla RMSNorm default eps: the authors build ttt_norm, q_norm, k_norm without one
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class RMSNorm(nn.Module):
    """RMSNorm with a ``weight`` (fla's names); optional fused residual add (prenorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x, residual=None, prenorm=False):
        return rms_norm(x, self.weight, None, self.eps, residual, prenorm)


class GatedMLP(nn.Module):
    """SwiGLU MLP with fla's sizes and names (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, hidden_ratio: int | None, intermediate_size: int | None, hidden_act: str):
        super().__init__()
        if hidden_act != "swish":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (LaCT uses 'swish')")
        if intermediate_size is None:
            intermediate_size = int(hidden_size * (hidden_ratio or 4) * 2 / 3)
            intermediate_size = 256 * ((intermediate_size + 255) // 256)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


@dataclass
class LayerInputs:
    """What one LaCT layer reads, per token. Attention: q, k, v [B, T, Ha, hd] (RoPE applied).
    Fast weights: fq, fk [B, Hf, T, d] (SiLU, l2-normalised, RoPE unless ttt_nope), fv [B, Hf, T, d],
    lr [B, Hf, T, 3R] fp32 (for w0, w1, w2), mom [B, Hf, T] fp32 or None; scale [B, T, Hf, 1] or None."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fq: torch.Tensor
    fk: torch.Tensor
    fv: torch.Tensor
    lr: torch.Tensor
    mom: torch.Tensor | None
    scale: torch.Tensor | None


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n * d] -> [..., n, d]."""
    return t.unflatten(-1, (n, -1))


class LowRankFastWeight(nn.Module):
    """Initial fast weight W = w_left @ w_right + 0.5 I, [H, out, in] (the authors' low-rank form)."""

    def __init__(self, num_heads: int, out_features: int, in_features: int, rank: int, init_gain: float):
        super().__init__()
        self.rank, self.in_features, self.init_gain = rank, in_features, init_gain
        self.w_left = nn.Parameter(torch.empty(num_heads, out_features, rank))
        self.w_right = nn.Parameter(torch.empty(num_heads, rank, in_features))

    def reset_parameters(self):
        nn.init.normal_(self.w_left, std=self.init_gain / math.sqrt(self.rank))
        nn.init.normal_(self.w_right, std=self.init_gain / math.sqrt(self.in_features))

    def forward(self) -> torch.Tensor:
        w = self.w_left @ self.w_right
        eye = torch.eye(w.shape[-2], w.shape[-1], device=w.device, dtype=w.dtype)
        return w + 0.5 * eye


class LaCTSWIGLULayer(nn.Module):
    """Sliding-window attention + fast-weight SwiGLU heads, summed before the output projection."""

    def __init__(self, config: LaCTSWIGLUConfig, layer_idx: int):
        super().__init__()
        _check_supported(config)
        D = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attn_heads
        self.head_dim = D // config.num_attn_heads
        self.window_size = config.window_size
        self.rope_theta = config.rope_theta
        self.num_fw_heads = config.num_lact_heads
        self.fw_head_dim = D // config.num_lact_heads
        self.d_h = int(self.fw_head_dim * config.inter_multi)
        self.chunk_size = config.lact_chunk_size
        self.qkv_silu, self.no_v_silu, self.ttt_nope = config.qkv_silu, config.no_v_silu, config.ttt_nope
        self.use_momentum = config.use_momentum
        self.fp32_states = config.fp32_states
        self.rule = K.FastWeightRule(config.use_muon, config.use_momentum, _DTYPES[config.muon_dtype])
        self.base_lr_inv = inv_softplus(BASE_LR)
        self.w0_w2_low_rank = config.w0_w2_low_rank

        self.qkv = nn.Linear(D, 3 * D, bias=config.qkv_bias)
        self.attn_qk_norm = config.attn_qk_norm
        if self.attn_qk_norm:
            self.q_norm = RMSNorm(D, eps=FLA_NORM_EPS)
            self.k_norm = RMSNorm(D, eps=FLA_NORM_EPS)
        self.o_proj = nn.Linear(D, D, bias=False)
        H, d = self.num_fw_heads, self.fw_head_dim
        if config.w0_w2_low_rank > 0:
            self.w0 = LowRankFastWeight(H, self.d_h, d, config.w0_w2_low_rank, config.fw_init_gain)
            self.w2 = LowRankFastWeight(H, self.d_h, d, config.w0_w2_low_rank, config.fw_init_gain)
        else:
            self.w0 = nn.Parameter(torch.randn(H, self.d_h, d) / math.sqrt(d))
            self.w2 = nn.Parameter(torch.randn(H, self.d_h, d) / math.sqrt(d))
        self.w1 = nn.Parameter(torch.randn(H, d, self.d_h) / math.sqrt(self.d_h))
        self.lr_width = 3 * config.lr_dim  # per head: lr for w0, w1, w2
        self.lr_proj = nn.Linear(D, self.lr_width * H)
        self.qk_scale = nn.Parameter(torch.ones(D, 2))
        self.qk_offset = nn.Parameter(torch.zeros(D, 2))
        self.learnable_ttt_scale = config.learnable_ttt_scale
        if self.learnable_ttt_scale:
            self.ttt_scale_proj = nn.Linear(D, H)
        self.ttt_norm = RMSNorm(d, eps=FLA_NORM_EPS)
        if self.use_momentum:
            self.momentum_proj = nn.Sequential(nn.Linear(D, H), nn.Sigmoid())

    # --- pieces -----------------------------------------------------------------------------------
    def initial_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slow (initial) fast weights: w0, w2 [H, Dh, d], w1 [H, d, Dh]."""
        w0 = self.w0() if self.w0_w2_low_rank > 0 else self.w0
        w2 = self.w2() if self.w0_w2_low_rank > 0 else self.w2
        return w0, self.w1, w2

    def _state_dtype(self) -> torch.dtype:
        return torch.float32 if self.fp32_states else self.qkv.weight.dtype

    def _inv_freq(self, device) -> torch.Tensor:
        d = self.head_dim
        return 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> LayerInputs:
        """x [B, T, D], positions [B, T] -> what attention and the fast weights read (see LayerInputs)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.attn_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        fq = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]  # the fast weights' own scale and shift
        fk = k * self.qk_scale[:, 1] + self.qk_offset[:, 1]
        fq, fk, fv = (_heads(t, self.num_fw_heads) for t in (fq, fk, v))  # [B, T, Hf, d]
        if self.qkv_silu:
            fq, fk = F.silu(fq), F.silu(fk)
            if not self.no_v_silu:
                fv = F.silu(fv)
        fq, fk = K.l2_normalize(fq), K.l2_normalize(fk)
        inv_freq = self._inv_freq(x.device)
        if not self.ttt_nope:  # the attention's RoPE, applied on the attention heads' split of the channels
            fq, fk = (_heads(K.rotary(_heads(t.flatten(-2), self.num_heads), positions, inv_freq).flatten(-2),
                             self.num_fw_heads) for t in (fq, fk))
        q, k, v = (_heads(t, self.num_heads) for t in (q, k, v))  # [B, T, Ha, hd]
        q, k = K.rotary(q, positions, inv_freq), K.rotary(k, positions, inv_freq)
        lr = F.softplus(self.lr_proj(x).float() + self.base_lr_inv)  # [B, T, Hf * 3R]
        mom = self.momentum_proj(x).float().transpose(1, 2) if self.use_momentum else None
        scale = F.silu(self.ttt_scale_proj(x)).unsqueeze(-1) if self.learnable_ttt_scale else None
        return LayerInputs(q, k, v, fq.transpose(1, 2), fk.transpose(1, 2), fv.transpose(1, 2),
                           _heads(lr, self.num_fw_heads).transpose(1, 2), mom, scale)

    def combine(self, x: torch.Tensor, o_attn: torch.Tensor, o_fw: torch.Tensor, scale) -> torch.Tensor:
        """o_attn [B, T, Ha, hd], o_fw [B, Hf, T, d] -> o_proj(attn + scale * norm(fast)) [B, T, D]."""
        o_fw = self.ttt_norm(o_fw.transpose(1, 2).to(x.dtype))  # [B, T, Hf, d]
        if scale is not None:
            o_fw = o_fw * scale
        return self.o_proj(o_attn.flatten(-2) + o_fw.flatten(-2))

    def initial_state(self, batch: int, device) -> dict[str, torch.Tensor]:
        """Nothing read yet (batch rows at position 0)."""
        fw = K.FastWeightState.initial(*self.initial_weights(), batch=batch, chunk=self.chunk_size,
                                       lr_width=self.lr_width, v_dim=self.fw_head_dim,
                                       use_momentum=self.use_momentum, dtype=self._state_dtype())
        S = self.window_size - 1
        dtype = self.qkv.weight.dtype
        kv = torch.zeros(batch, S, self.num_heads, self.head_dim, device=device, dtype=dtype)
        return {**fw.named(), "attn_k": kv, "attn_v": kv.clone()}

    # --- forwards ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor] | None):
        """x [B, T, D] after the positions in ``state`` (None = from the start).
        Returns the output [B, T, D] and the new layer state."""
        B, T, _ = x.shape
        state = state if state is not None else self.initial_state(B, x.device)
        pos = state["pos"]
        positions = pos.view(B, 1) + torch.arange(T, device=x.device).view(1, T)
        p = self.project(x, positions)
        o_attn, ck, cv = K.window_attention(p.q, p.k, p.v, state["attn_k"], state["attn_v"], pos, self.window_size)
        fw = K.FastWeightState.from_named(state)
        norms = tuple(K.row_norms(w.to(fw.w0.dtype)) for w in self.initial_weights())
        o_fw, fw = K.lact_swiglu_step(fw, norms, p.fq, p.fk, p.fv, p.lr, p.mom, self.rule)
        return self.combine(x, o_attn, o_fw, p.scale), {**fw.named(), "attn_k": ck, "attn_v": cv}

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence x [B, T, D] from position 0 with the reference kernels (no state)."""
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device).expand(B, T)
        p = self.project(x, positions)
        o_attn = K.window_attention_reference(p.q, p.k, p.v, self.window_size)
        ws = tuple(w.to(self._state_dtype()) for w in self.initial_weights())
        o_fw = K.lact_swiglu_reference(*ws, p.fq, p.fk, p.fv, p.lr, p.mom, self.chunk_size, self.rule)
        return self.combine(x, o_attn, o_fw, p.scale)


def _check_supported(config: LaCTSWIGLUConfig) -> None:
    problems = []
    if config.ttt_prenorm:
        problems.append("ttt_prenorm=True")
    if config.window_size is None or config.window_size < 1:
        problems.append(f"window_size={config.window_size!r} (a sliding window is needed to carry a state)")
    if config.ttt_loss_type != "dot_product":
        problems.append(f"ttt_loss_type={config.ttt_loss_type!r}")
    if config.lr_parameterization.lower() != "mamba":
        problems.append(f"lr_parameterization={config.lr_parameterization!r}")
    if config.muon_dtype not in _DTYPES:
        problems.append(f"muon_dtype={config.muon_dtype!r} (choose one of {sorted(_DTYPES)})")
    if config.hidden_size % config.num_attn_heads or config.hidden_size % config.num_lact_heads:
        problems.append("hidden_size must divide into num_attn_heads and num_lact_heads")
    if problems:
        raise ValueError("unsupported LaCT config: " + "; ".join(problems))


class LaCTBlock(nn.Module):
    def __init__(self, config: LaCTSWIGLUConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = LaCTSWIGLULayer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.hidden_ratio, config.intermediate_size, config.hidden_act)

    def _finish(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h, residual = self.mlp_norm(h, residual, True)
        return residual + self.mlp(h)

    def forward(self, x: torch.Tensor, state):
        h, state = self.attn(self.attn_norm(x), state)
        return self._finish(h, x), state

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self.attn.forward_reference(self.attn_norm(x)), x)


class LaCTPreTrainedModel(PreTrainedModel):
    config_class = LaCTSWIGLUConfig
    base_model_prefix = "model"
    _no_split_modules = ["LaCTBlock"]

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        elif isinstance(module, LowRankFastWeight):
            module.reset_parameters()
        elif isinstance(module, LaCTSWIGLULayer):
            nn.init.ones_(module.qk_scale)
            nn.init.zeros_(module.qk_offset)
            if module.w0_w2_low_rank <= 0:
                nn.init.normal_(module.w0, std=1.0 / math.sqrt(module.fw_head_dim))
                nn.init.normal_(module.w2, std=1.0 / math.sqrt(module.fw_head_dim))
            nn.init.normal_(module.w1, std=1.0 / math.sqrt(module.d_h))


class LaCTModel(LaCTPreTrainedModel):
    def __init__(self, config: LaCTSWIGLUConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([LaCTBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                past_key_values: LaCTCache | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        """input_ids [B, T] continuing ``past_key_values`` (None = from the start). Unpadded only."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padding masks are not supported by the LaCT model; run unpadded batches")
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"cache has {len(past_key_values)} layers, model has {len(self.layers)}")
        h = self.embeddings(input_ids)
        states = []
        for i, block in enumerate(self.layers):
            h, s = block(h, None if past_key_values is None else past_key_values.layers[i])
            states.append(s)
        h = self.norm(h)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=LaCTCache(states) if use_cache else None)

    def forward_reference(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Last hidden states [B, T, D] of the whole sequence from scratch, with the reference kernels
        (what the authors' model computes; their generation does this for every token)."""
        h = self.embeddings(input_ids)
        for block in self.layers:
            h = block.forward_reference(h)
        return self.norm(h)


class LaCTForCausalLM(LaCTPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}
    document_cache_adapter = LaCTCacheAdapter()  # how refine_tta's DocumentState maps to LaCTCache

    def __init__(self, config: LaCTSWIGLUConfig):
        super().__init__(config)
        self.model = LaCTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                past_key_values: LaCTCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, V] (the last ``logits_to_keep`` if > 0); with labels [B, T], the mean
        next-token cross-entropy (labels shifted here, as fla's models do)."""
        out = self.model(input_ids, attention_mask, past_key_values, use_cache)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
            loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten().to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


def state_nbytes(config: LaCTSWIGLUConfig, dtype: torch.dtype) -> int:
    """Bytes of one batch row's document state for ``config`` in ``dtype`` (next-token logits not
    counted): built on the meta device, so it is exact and allocates nothing."""
    with torch.device("meta"):
        layer = LaCTSWIGLULayer(config, 0).to(dtype)
        one = layer.initial_state(1, torch.device("meta"))
    return config.num_hidden_layers * sum(t.numel() * t.element_size() for t in one.values())
