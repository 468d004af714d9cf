"""Tier 0: refine_tta.kernels against fla's naive references (fp32, CPU).

Every delta-rule case compares outputs, final states and the gradients of every input (q, k, v,
beta, g and the initial state) on awkward shapes: T = 1, 63, 64, 65, 257 around the chunk size of
64, head dims that differ (K=32, V=60). k is l2-normalised and beta in (0, 1), so the recurrence is
a contraction and fp32 errors stay at the 1e-6 level; the bound used is 1e-4 of the reference's
largest magnitude (plus 1e-4 absolute).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fla.modules.norm.layernorm import rms_norm_ref
from fla.modules.norm.layernorm_gated import rms_norm_ref as gated_rms_norm_ref
from fla.ops.delta_rule.naive import delta_rule_recurrence
from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

from refine_tta.kernels import (
    causal_conv1d,
    delta_rule,
    delta_rule_chunked,
    delta_rule_recurrent,
    gated_rms_norm,
    l2norm,
    rms_norm,
    swiglu_mlp,
)

H = 2
TOL = 1e-4


# (B, T, K, V): every T around the chunk size, both head dims, a V that is not a power of two.
SHAPES = [
    (1, 1, 32, 32),
    (3, 1, 64, 64),
    (1, 63, 32, 60),
    (3, 63, 64, 64),
    (1, 64, 64, 32),
    (3, 64, 32, 32),
    (1, 65, 32, 64),
    (3, 65, 32, 60),
    (1, 257, 64, 64),
    (3, 257, 32, 60),
]
SHAPE_IDS = [f"B{b}-T{t}-K{k}-V{v}" for b, t, k, v in SHAPES]
KERNELS = {"chunked": delta_rule_chunked, "recurrent": delta_rule_recurrent}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float = TOL) -> None:
    """max |actual - expected| <= tol * (1 + max |expected|)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    bound = tol * (1.0 + expected.abs().max().item())
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def make_inputs(B, T, K, V, gated: bool, with_h0: bool, seed: int = 0):
    """Leaf tensors in fla's [B, T, H, D] layout. g is a log decay in (-inf, 0)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), p=2, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    beta = torch.randn(B, T, H, generator=gen).sigmoid()
    g = -F.softplus(torch.randn(B, T, H, generator=gen)) if gated else None
    h0 = torch.randn(B, H, K, V, generator=gen) if with_h0 else None
    leaves = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "h0": h0}
    return {n: t.requires_grad_() for n, t in leaves.items() if t is not None}


def reference(x: dict, scale=None):
    """fla's naive recurrences: returns o [B, T, H, V], S [B, H, K, V]."""
    if "g" in x:
        return naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], scale=scale,
                                                initial_state=x.get("h0"), output_final_state=True)
    assert scale is None, "delta_rule_recurrence hard-codes scale K^-0.5"
    q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))
    o, S = delta_rule_recurrence(q, k, v, x["beta"].transpose(1, 2), initial_state=x.get("h0"))
    return o.transpose(1, 2), S


def run(kernel, x: dict, **kw):
    return kernel(x["q"], x["k"], x["v"], x["beta"], g=x.get("g"), initial_state=x.get("h0"), **kw)


def grads(x: dict, o: torch.Tensor, S: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """Gradients of a random linear function of (o, S) with respect to every leaf."""
    gen = torch.Generator().manual_seed(seed)
    do, dS = torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)
    names = list(x)
    gs = torch.autograd.grad((o * do).sum() + (S * dS).sum(), [x[n] for n in names])
    return dict(zip(names, gs))


@pytest.mark.parametrize("with_h0", [False, True], ids=["h0-none", "h0"])
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("kernel", list(KERNELS), ids=list(KERNELS))
@pytest.mark.parametrize("B,T,K,V", SHAPES, ids=SHAPE_IDS)
def test_delta_rule_matches_fla_naive(B, T, K, V, kernel, gated, with_h0):
    x = make_inputs(B, T, K, V, gated, with_h0)
    o_ref, S_ref = reference(x)
    o, S = run(KERNELS[kernel], x)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert_close(o, o_ref, "o")
    assert_close(S, S_ref, "final state")
    g_ref, g_ours = grads(x, o_ref, S_ref), grads(x, o, S)
    for name in x:
        assert_close(g_ours[name], g_ref[name], f"d{name}")


@pytest.mark.parametrize("chunk_size", [16, 64], ids=["C16", "C64"])
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("B,T,K,V", [(2, 65, 32, 60), (1, 257, 64, 64)], ids=["B2-T65-K32-V60", "B1-T257-K64-V64"])
def test_chunked_equals_recurrent(B, T, K, V, gated, chunk_size):
    x = make_inputs(B, T, K, V, gated, with_h0=True, seed=3)
    o_r, S_r = run(delta_rule_recurrent, x)
    o_c, S_c = run(delta_rule_chunked, x, chunk_size=chunk_size)
    assert_close(o_c, o_r, "o")
    assert_close(S_c, S_r, "final state")
    g_r, g_c = grads(x, o_r, S_r), grads(x, o_c, S_c)
    for name in x:
        assert_close(g_c[name], g_r[name], f"d{name}")


@pytest.mark.parametrize("T", [63, 65, 130], ids=lambda t: f"T{t}")
def test_gated_matches_fla_naive_chunk(T):
    """A second fla reference for the gated form: its chunked (WY) naive implementation."""
    x = make_inputs(2, T, 32, 60, gated=True, with_h0=True, seed=5)
    o_ref, S_ref = naive_chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                                output_final_state=True)
    o, S = run(delta_rule_chunked, x)
    assert_close(o, o_ref, "o")
    assert_close(S, S_ref, "final state")


def test_custom_scale_matches_fla_naive():
    x = make_inputs(2, 65, 32, 60, gated=True, with_h0=True, seed=7)
    o_ref, S_ref = reference(x, scale=0.3)
    for kernel in KERNELS.values():
        o, S = run(kernel, x, scale=0.3)
        assert_close(o, o_ref, "o")
        assert_close(S, S_ref, "final state")


def test_strong_decay_stays_finite():
    """Log decays of -20 per token underflow exp(cumsum(g)) inside a chunk; nothing may become NaN."""
    x = make_inputs(1, 130, 32, 32, gated=True, with_h0=True, seed=9)
    with torch.no_grad():
        x["g"].mul_(30.0)
    o_ref, S_ref = reference(x)
    o, S = run(delta_rule_chunked, x)
    assert_close(o, o_ref, "o")
    assert_close(S, S_ref, "final state")
    g_ref, g_ours = grads(x, o_ref, S_ref), grads(x, o, S)
    for name in x:
        assert_close(g_ours[name], g_ref[name], f"d{name}")


def test_split_sequence_carries_state():
    """Reading T tokens at once == reading a prefix, then the rest from the prefix's final state."""
    x = make_inputs(2, 130, 32, 60, gated=True, with_h0=False, seed=11)
    x = {n: t.detach() for n, t in x.items()}
    o_full, S_full = run(delta_rule, x)
    first = {n: t[:, :70] for n, t in x.items()}
    rest = {n: t[:, 70:] for n, t in x.items()}
    o1, S1 = run(delta_rule, first)
    o2, S2 = run(delta_rule, {**rest, "h0": S1})
    assert_close(torch.cat([o1, o2], dim=1), o_full, "o")
    assert_close(S2, S_full, "final state")


def test_delta_rule_keeps_dtypes_and_inputs():
    """o comes back in v's dtype, the state in fp32, and the initial state is not written to."""
    x = make_inputs(1, 70, 32, 32, gated=True, with_h0=True)
    x = {n: t.detach() for n, t in x.items()}
    h0 = x["h0"].clone()
    low = {n: (t.bfloat16() if n != "h0" else t) for n, t in x.items()}
    for kernel in (delta_rule_chunked, delta_rule_recurrent):
        o, S = run(kernel, low)
        assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
        assert torch.equal(x["h0"], h0)


def test_l2norm_matches_normalize():
    x = torch.randn(3, 5, 2, 32)
    assert_close(l2norm(x), F.normalize(x, p=2, dim=-1, eps=1e-6), "l2norm", tol=1e-6)
    assert l2norm(x.bfloat16()).dtype == torch.bfloat16


# --- norms ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["plain", "prenorm"])
def test_rms_norm_matches_fla_ref(prenorm, with_residual, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 48, generator=gen)
    residual = torch.randn(2, 7, 48, generator=gen) if with_residual else None
    weight = torch.randn(48, generator=gen)
    bias = torch.randn(48, generator=gen) if with_bias else None
    ours = rms_norm(x, weight, bias, eps=1e-6, residual=residual, prenorm=prenorm)
    ref = rms_norm_ref(x, weight, bias, residual=residual, eps=1e-6, prenorm=prenorm)
    if prenorm:
        assert_close(ours[0], ref[0], "y", tol=1e-6)
        assert_close(ours[1], ref[1], "residual out", tol=1e-6)
    else:
        assert_close(ours, ref, "y", tol=1e-6)


def test_rms_norm_low_precision_residual_in_fp32():
    """bf16 inputs: computed in fp32 (fla's upcast); y in bf16, the residual sum in fp32 on request."""
    gen = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(3, 64, generator=gen).bfloat16() for _ in range(2))
    weight = torch.randn(64, generator=gen)
    y, res = rms_norm(x, weight, residual=residual, prenorm=True, residual_in_fp32=True)
    y_ref, res_ref = rms_norm_ref(x, weight, None, residual=residual, prenorm=True, upcast=True)
    assert y.dtype == torch.bfloat16 and res.dtype == torch.float32
    assert torch.equal(res, res_ref)
    assert_close(y.float(), y_ref.float(), "y", tol=1e-2)
    _, res_low = rms_norm(x, weight, residual=residual, prenorm=True)
    assert res_low.dtype == torch.bfloat16


def test_gated_rms_norm_swish_matches_fla_ref():
    gen = torch.Generator().manual_seed(2)
    x, gate = torch.randn(2, 9, 2, 60, generator=gen), torch.randn(2, 9, 2, 60, generator=gen)
    weight = torch.randn(60, generator=gen)
    ref = gated_rms_norm_ref(x, weight, None, z=gate, eps=1e-5, norm_before_gate=True)
    for act in ("swish", "silu"):
        assert_close(gated_rms_norm(x, gate, weight, eps=1e-5, activation=act), ref, act, tol=1e-6)


def test_gated_rms_norm_sigmoid_by_hand():
    gen = torch.Generator().manual_seed(3)
    x, gate = torch.randn(4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    weight = torch.randn(32, generator=gen)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight * torch.sigmoid(gate)
    assert_close(gated_rms_norm(x, gate, weight, eps=1e-5, activation="sigmoid"), expected, "y", tol=1e-6)
    with pytest.raises(ValueError, match="relu"):
        gated_rms_norm(x, gate, weight, activation="relu")


def test_gated_rms_norm_bf16_gates_the_fp32_norm():
    """Like fla's fused kernel, the norm is gated in fp32 and rounded once, at the end."""
    gen = torch.Generator().manual_seed(4)
    x, gate = (torch.randn(64, 128, generator=gen).bfloat16() for _ in range(2))
    weight = torch.randn(128, generator=gen)
    expected = gated_rms_norm_ref(x, weight, None, z=gate, eps=1e-5, norm_before_gate=True, upcast=True)
    y = gated_rms_norm(x, gate, weight, eps=1e-5)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)


# --- short convolution --------------------------------------------------------------------------

def _conv_inputs(B=2, T=11, D=24, W=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, D, generator=gen), torch.randn(D, W, generator=gen), torch.randn(D, generator=gen))


@pytest.mark.parametrize("activation", [None, "silu"], ids=["linear", "silu"])
def test_causal_conv1d_equals_left_padded_conv(activation):
    x, weight, bias = _conv_inputs()
    W = weight.shape[1]
    y, cache = causal_conv1d(x, weight, bias, activation=activation)
    expected = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[-1])
    if activation == "silu":
        expected = F.silu(expected)
    assert_close(y, expected.transpose(1, 2), "y", tol=1e-6)
    assert torch.equal(cache, x[:, -W:].transpose(1, 2)), "cache holds the last W inputs, newest last"


@pytest.mark.parametrize("split", [1, 2, 3, 7], ids=lambda s: f"split{s}")
def test_causal_conv1d_cache_resumes(split):
    """Full sequence == first part then the rest carrying the cache (parts shorter than W included)."""
    x, weight, bias = _conv_inputs(T=11)
    y_full, cache_full = causal_conv1d(x, weight, bias)
    y1, cache1 = causal_conv1d(x[:, :split], weight, bias)
    cache1_before = cache1.clone()
    y2, cache2 = causal_conv1d(x[:, split:], weight, bias, cache=cache1)
    assert_close(torch.cat([y1, y2], dim=1), y_full, "y", tol=1e-6)
    assert torch.equal(cache2, cache_full)
    assert torch.equal(cache1, cache1_before), "the incoming cache is never updated in place"


def test_causal_conv1d_token_by_token():
    x, weight, bias = _conv_inputs(T=9)
    y_full, cache_full = causal_conv1d(x, weight, bias)
    cache, ys = None, []
    for t in range(x.shape[1]):
        y, cache = causal_conv1d(x[:, t:t + 1], weight, bias, cache=cache)
        ys.append(y)
    assert_close(torch.cat(ys, dim=1), y_full, "y", tol=1e-6)
    assert torch.equal(cache, cache_full)


def test_causal_conv1d_gradient_reaches_cache():
    x, weight, bias = _conv_inputs(T=3)
    cache = torch.randn(2, 24, 4, requires_grad=True)
    y, _ = causal_conv1d(x, weight, bias, activation=None, cache=cache)
    (grad,) = torch.autograd.grad(y.sum(), cache)
    # y_t uses cache slots t+1 .. W-1: slot 0 never, slot 3 by all three outputs.
    expected = torch.stack([torch.zeros(24), weight[:, 0], weight[:, :2].sum(1), weight[:, :3].sum(1)], dim=-1)
    assert_close(grad[0], expected, "dcache", tol=1e-6)


def test_swiglu_mlp_by_hand():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 16, generator=gen)
    wg, wu, wd = torch.randn(40, 16, generator=gen), torch.randn(40, 16, generator=gen), torch.randn(16, 40, generator=gen)
    bd = torch.randn(16, generator=gen)
    gate, up = x @ wg.T, x @ wu.T
    expected = (gate * torch.sigmoid(gate) * up) @ wd.T
    assert_close(swiglu_mlp(x, wg, wu, wd), expected, "y", tol=1e-5)
    assert_close(swiglu_mlp(x, wg, wu, wd, bd), expected + bd, "y+bias", tol=1e-5)
