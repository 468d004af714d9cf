"""Pure-PyTorch versions of fla's fused norm, gated norm, short convolution and SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
):
    """RMSNorm of (x + residual) over the last dim, computed in fp32 (fla's ``rms_norm``).

    x, residual: [..., D]. Returns y [..., D] in x's dtype, and with ``prenorm`` also the sum
    x + residual (fp32 when ``residual_in_fp32``) that the next block adds to.
    """
    dtype = x.dtype
    s = x.float() if residual is None else x.float() + residual.float()
    y = _rms_norm_fp32(s, weight, bias, eps).to(dtype)
    if not prenorm:
        return y
    return y, (s if residual_in_fp32 else s.to(dtype))


def _rms_norm_fp32(s: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of an fp32 tensor [..., D], affine in fp32; no rounding."""
    y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-5,
    activation: str = "swish",
) -> torch.Tensor:
    """rms_norm(x) * weight * act(gate) (fla's ``FusedRMSNormGated``). x, gate: [..., D].

    All in fp32, rounded to x's dtype once at the end, as fla's fused kernel does.
    """
    y = _rms_norm_fp32(x.float(), weight, None, eps)
    gf = gate.float()
    if activation in ("swish", "silu"):
        y = y * F.silu(gf)
    elif activation == "sigmoid":
        y = y * torch.sigmoid(gf)
    else:
        raise ValueError(f"unsupported gate activation {activation!r}")
    return y.to(x.dtype)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution that carries its input window (fla's ``ShortConvolution``).

    x: [B, T, D]; weight: [D, W]; cache: [B, D, W], the last W inputs seen (newest at W-1),
    zeros when None. Returns y [B, T, D] and the new cache [B, D, W]: a new tensor, never the
    old one updated in place, so earlier states stay valid and differentiable.
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    if cache is None:
        cache = x.new_zeros(B, D, W)
    xt = x.transpose(1, 2)  # [B, D, T]
    window = torch.cat([cache.to(x.dtype), xt], dim=-1)  # [B, D, W + T]
    # y_t = sum_w weight[w] * window[t + 1 + w]: the last W-1 cached inputs, then x_0..x_t.
    y = F.conv1d(window[..., 1:], weight.unsqueeze(1).to(x.dtype), bias=None, groups=D)  # [B, D, T]
    if bias is not None:
        y = y + bias.to(y.dtype).unsqueeze(-1)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported conv activation {activation!r}")
    return y.transpose(1, 2), window[..., -W:].contiguous()


def swiglu_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)). x: [..., D]; gate/up weights [I, D]; down weight [D, I]."""
    return F.linear(F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight), down_weight, down_bias)
