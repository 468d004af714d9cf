"""LaCT's tensor math: the fast-weight SwiGLU, its large-chunk update, and sliding-window attention.

LaCT (Zhang et al., "Test-Time Training Done Right", arXiv 2505.23884) keeps per head a fast-weight
SwiGLU ``f_W(x) = W1 (silu(W0 x) * (W2 x))`` beside sliding-window softmax attention. The sequence
is cut into chunks of C tokens from position 0. Chunk i is *applied then used to update*:

    o_t   = f_{W_i}(q_t)                          for every t in chunk i   (apply)
    g     = sum_{t in chunk i} lr_t * d/dW [v_t . f_W(k_t)]               (dot-product TTT "loss")
    g     = g + m_i * g_prev,  m_i = mean_t momentum_t        (momentum; g_prev = this g next time)
    g     = NewtonSchulz5(g)                                   (Muon, optional)
    W     = rownorm(W + g) * ||rows of the initial W||                     -> W_{i+1}

so a chunk's queries see the weights after the previous complete chunk; the attention covers
what the chunk itself holds. Learning rates are per token and per weight (lr0, lr1, lr2).

Two forms, tested against each other:

* :func:`lact_swiglu_reference` -- whole sequence from the initial weights, chunk by chunk, the
  way the authors' ``block_causal_lact_swiglu`` computes it (re-run for every prefix, it is also
  their generation: no cache).
* :func:`lact_swiglu_step` -- resumes from a :class:`FastWeightState` (the weights after the last
  complete chunk, the momentum, the incomplete chunk's keys, values, learning rates and momenta)
  with a position per batch row, so branches at different offsets run as one batch.

Same for attention: :func:`window_attention_reference` (full causal mask, no cache) and
:func:`window_attention` (the last ``window - 1`` keys/values carried, query blocks).
Layouts: fast weights w0, w2 [B, H, Dh, Din], w1 [B, H, Dout, Dh]; fast q, k [B, H, T, Din],
v [B, H, T, Dout]; lr [B, H, T, 3 * R] (R = lr dim per weight); momentum [B, H, T].
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

# Newton-Schulz coefficients (a, b, c) of the five iterations LaCT's Muon uses.
NS_COEFFICIENTS = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                   (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))


def l2_normalize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x / (||x|| + eps) over the last dim (the norm in fp32), in x's dtype."""
    return (x / (x.float().norm(dim=-1, keepdim=True) + eps)).to(x.dtype)


def newton_schulz5(g: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate orthogonalisation (the zeroth power U V^T of g = U S V^T) of each matrix.

    g: [..., m, n]. Runs in ``dtype`` (the authors' code: bf16) and returns that dtype. The wide side is kept
    last so that X X^T is the small Gram matrix; Frobenius-normalised first so the spectral norm <= 1.
    """
    x = g.to(dtype)
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.transpose(-1, -2)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in NS_COEFFICIENTS:
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-1, -2) if tall else x


def swiglu_apply(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f_W(x) = W1 (silu(W0 x) * (W2 x)) per head. x [B, H, L, Din] -> [B, H, L, Dout]."""
    x = x.to(w0.dtype)
    return (F.silu(x @ w0.transpose(-1, -2)) * (x @ w2.transpose(-1, -2))) @ w1.transpose(-1, -2)


def swiglu_fast_grads(w0, w1, w2, k, v, lr0, lr1, lr2):
    """Learning-rate-weighted gradient of sum_t v_t . f_W(k_t) over one chunk (to be *added* to W).

    k [B, H, C, Din], v [B, H, C, Dout], lr* [B, H, C, R] (R = 1 or matching the dim).
    Returns dw0 [B, H, Dh, Din], dw1 [B, H, Dout, Dh], dw2 [B, H, Dh, Din].
    """
    k, v = k.to(w0.dtype), v.to(w0.dtype)
    gate_pre = k @ w0.transpose(-1, -2)  # [B, H, C, Dh]
    up = k @ w2.transpose(-1, -2)
    gate = F.silu(gate_pre)
    hidden = gate * up
    d_hidden = v @ w1  # [B, H, C, Dh]: d(v . W1 h)/dh
    d_up = d_hidden * gate
    sig = torch.sigmoid(gate_pre)
    d_gate_pre = d_hidden * up * sig * (1 + gate_pre * (1 - sig))  # silu'(x) = s (1 + x (1 - s))
    dw1 = v.transpose(-1, -2) @ (hidden * lr1).to(v.dtype)
    dw0 = d_gate_pre.transpose(-1, -2) @ (k * lr0).to(k.dtype)
    dw2 = d_up.transpose(-1, -2) @ (k * lr2).to(k.dtype)
    return dw0, dw1, dw2


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """||w[..., r, :]||: the per-row norms the update keeps. w [..., R, C] -> [..., R, 1]."""
    return w.norm(dim=-1, keepdim=True)


@dataclass(frozen=True)
class FastWeightRule:
    """How a chunk updates the weights. muon_dtype: the Newton-Schulz compute dtype (the authors'
    code: bf16, which makes results depend on summation order; see LaCTSWIGLUConfig)."""

    use_muon: bool
    use_momentum: bool
    muon_dtype: torch.dtype = torch.float32


def fast_weight_update(ws, norms, grads, prev, momentum, rule: FastWeightRule):
    """One chunk's update. ws, norms, grads: (w0, w1, w2)-shaped triples; prev: the previous
    momentum-carried grads (triple) or None; momentum: [B, H] mean momentum of the chunk or None.
    Returns (new ws, new prev)."""
    if rule.use_momentum:
        m = momentum[..., None, None]
        grads = tuple(g + p * m for g, p in zip(grads, prev))
        prev = grads
    if rule.use_muon:
        grads = tuple(newton_schulz5(g, rule.muon_dtype) for g in grads)
    new = []
    for w, n, g in zip(ws, norms, grads):
        w = w + g
        new.append(w / (w.norm(dim=-1, keepdim=True) + 1e-5) * n)
    return tuple(new), prev


def split_lr(lr: torch.Tensor):
    """[..., 3 * R] -> (lr0, lr1, lr2), each [..., R]."""
    return lr.chunk(3, dim=-1)


def lact_swiglu_reference(w0, w1, w2, q, k, v, lr, momentum, chunk: int, rule: FastWeightRule) -> torch.Tensor:
    """The whole sequence from the initial weights (batch-shared [H, ...] or [B, H, ...]).

    q, k [B, H, T, Din], v [B, H, T, Dout], lr [B, H, T, 3R], momentum [B, H, T] or None.
    Returns o [B, H, T, Dout]. The last chunk (complete or not) is applied and never used.
    """
    B, H, T, _ = q.shape
    ws = tuple(w.expand(B, *w.shape[-3:]) for w in (w0, w1, w2))
    norms = tuple(row_norms(w) for w in ws)
    prev = tuple(torch.zeros_like(w) for w in ws) if rule.use_momentum else None
    out = []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        out.append(swiglu_apply(*ws, q[:, :, a:b]))
        if b < T:
            lr0, lr1, lr2 = split_lr(lr[:, :, a:b])
            grads = swiglu_fast_grads(*ws, k[:, :, a:b], v[:, :, a:b], lr0, lr1, lr2)
            m = momentum[:, :, a:b].mean(-1) if rule.use_momentum else None
            ws, prev = fast_weight_update(ws, norms, grads, prev, m, rule)
    return torch.cat(out, dim=2)


@dataclass
class FastWeightState:
    """One layer's fast-weight memory, per batch row.

    w0, w2 [B, H, Dh, Din], w1 [B, H, Dout, Dh]: the weights after the last complete chunk;
    m0, m1, m2: the momentum-carried grads (None without momentum); buf_k [B, H, C, Din],
    buf_v [B, H, C, Dout], buf_lr [B, H, C, 3R], buf_mom [B, H, C] (or None): the incomplete
    chunk, slots [0, pos % C) filled, the rest zero; pos [B] int64: tokens read.
    """

    w0: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    m0: torch.Tensor | None
    m1: torch.Tensor | None
    m2: torch.Tensor | None
    buf_k: torch.Tensor
    buf_v: torch.Tensor
    buf_lr: torch.Tensor
    buf_mom: torch.Tensor | None
    pos: torch.Tensor

    @classmethod
    def initial(cls, w0, w1, w2, batch: int, chunk: int, lr_width: int, v_dim: int,
                use_momentum: bool, dtype: torch.dtype) -> FastWeightState:
        """Nothing read: the slow initial weights [H, ...] broadcast to the batch (still connected)."""
        ws = [w.to(dtype).expand(batch, *w.shape) for w in (w0, w1, w2)]
        H, _, din = w0.shape
        dev = w0.device
        moms = [torch.zeros_like(w) for w in ws] if use_momentum else [None] * 3
        return cls(*ws, *moms,
                   buf_k=torch.zeros(batch, H, chunk, din, device=dev, dtype=dtype),
                   buf_v=torch.zeros(batch, H, chunk, v_dim, device=dev, dtype=dtype),
                   buf_lr=torch.zeros(batch, H, chunk, lr_width, device=dev, dtype=torch.float32),
                   buf_mom=torch.zeros(batch, H, chunk, device=dev, dtype=torch.float32) if use_momentum else None,
                   pos=torch.zeros(batch, dtype=torch.long, device=dev))

    def named(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_named(cls, d: dict[str, torch.Tensor]) -> FastWeightState:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


def _chunk_cuts(fill: list[int], T: int, chunk: int) -> list[int]:
    """Offsets t in (0, T] where some row completes a chunk (fill + t = 0 mod chunk), plus T."""
    cuts = {T}
    for f in fill:
        cuts.update(range(chunk - f, T + 1, chunk))
    return sorted(c for c in cuts if c > 0)


def _write_slots(buf: torch.Tensor, x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """buf [B, H, C, *], x [B, H, L, *]: rows b get x at slots start[b] .. start[b] + L - 1 (a new tensor)."""
    B, H, L = x.shape[:3]
    idx = start.view(B, 1, 1) + torch.arange(L, device=buf.device).view(1, 1, L)  # [B, 1, L]
    idx = idx.expand(B, H, L)
    if x.dim() == 4:
        idx = idx.unsqueeze(-1).expand(*x.shape)
    return buf.scatter(2, idx, x.to(buf.dtype))


def lact_swiglu_step(state: FastWeightState, norms, q, k, v, lr, momentum, rule: FastWeightRule):
    """Read T more tokens from ``state``: apply, fill the chunk buffer, update where a chunk completes.

    norms: row norms of the *initial* weights, (w0, w1, w2)-shaped [H, R, 1]. q, k, v, lr, momentum
    as in the module docstring. Rows may sit at different positions. Returns o [B, H, T, Dout] and
    the new state (the input state is not modified).
    """
    B, H, T, _ = q.shape
    C = state.buf_k.shape[2]
    fill = (state.pos % C).tolist()
    st = state
    out, a = [], 0
    for b in _chunk_cuts(fill, T, C):
        out.append(swiglu_apply(st.w0, st.w1, st.w2, q[:, :, a:b]))
        start = (st.pos % C)
        buf = dict(buf_k=_write_slots(st.buf_k, k[:, :, a:b], start),
                   buf_v=_write_slots(st.buf_v, v[:, :, a:b], start),
                   buf_lr=_write_slots(st.buf_lr, lr[:, :, a:b].float(), start))
        if rule.use_momentum:
            buf["buf_mom"] = _write_slots(st.buf_mom, momentum[:, :, a:b].float(), start)
        st = replace(st, **buf, pos=st.pos + (b - a))
        done = [i for i, f in enumerate(fill) if (f + b) % C == 0]
        if done:
            st = _complete_chunks(st, norms, torch.tensor(done, device=q.device), rule)
        a = b
    return torch.cat(out, dim=2), st


def _complete_chunks(st: FastWeightState, norms, rows: torch.Tensor, rule: FastWeightRule) -> FastWeightState:
    """Rows whose buffer is full: update their weights from it and empty it."""
    pick = lambda t: t.index_select(0, rows)  # noqa: E731
    ws = tuple(pick(w) for w in (st.w0, st.w1, st.w2))
    lr0, lr1, lr2 = split_lr(pick(st.buf_lr))
    grads = swiglu_fast_grads(*ws, pick(st.buf_k), pick(st.buf_v), lr0, lr1, lr2)
    prev = tuple(pick(m) for m in (st.m0, st.m1, st.m2)) if rule.use_momentum else None
    m = pick(st.buf_mom).mean(-1) if rule.use_momentum else None
    ws, prev = fast_weight_update(ws, norms, grads, prev, m, rule)
    new = {name: getattr(st, name).index_copy(0, rows, w.to(getattr(st, name).dtype))
           for name, w in zip(("w0", "w1", "w2"), ws)}
    if rule.use_momentum:
        new.update({name: getattr(st, name).index_copy(0, rows, p.to(getattr(st, name).dtype))
                    for name, p in zip(("m0", "m1", "m2"), prev)})
    keep = torch.ones(st.pos.shape[0], device=st.pos.device).index_fill(0, rows, 0.0)
    for name in ("buf_k", "buf_v", "buf_lr", "buf_mom"):
        t = getattr(st, name)
        if t is not None:
            new[name] = t * keep.view(-1, *([1] * (t.dim() - 1))).to(t.dtype)
    return replace(st, **new)


# --- sliding-window attention -------------------------------------------------------------------

def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention where query i sees keys i - window + 1 .. i. q, k, v [B, T, H, D] -> [B, T, H, D]."""
    T = q.shape[1]
    i = torch.arange(T, device=q.device)
    rel = i.view(-1, 1) - i.view(1, -1)
    mask = (rel >= 0) & (rel < window)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def window_attention(q, k, v, cache_k, cache_v, pos, window: int, block: int = 1024):
    """Sliding-window attention continuing from a cache of the last ``window - 1`` keys/values.

    q, k, v [B, T, H, D] (positions pos[b] + t, RoPE applied); cache_k, cache_v [B, S, H, D],
    S = window - 1, slot S - 1 = position pos - 1 (slots of positions < 0 are ignored); pos [B].
    Queries run in blocks of ``block`` so memory is O(T * (window + block)).
    Returns o [B, T, H, D] and the new cache (a new tensor pair).
    """
    B, T = q.shape[:2]
    S = cache_k.shape[1]
    if S != window - 1:
        raise ValueError(f"cache holds {S} positions; window {window} needs {window - 1}")
    keys = torch.cat([cache_k.to(k.dtype), k], dim=1)  # [B, S + T, H, D]; index j <-> position pos - S + j
    vals = torch.cat([cache_v.to(v.dtype), v], dim=1)
    out = []
    for a in range(0, T, block):
        b = min(a + block, T)
        kk, vv = keys[:, a:S + b], vals[:, a:S + b]  # what queries a..b-1 can see
        ii = torch.arange(b - a, device=q.device).view(-1, 1)
        jj = torch.arange(S + b - a, device=q.device).view(1, -1)
        rel = S + ii - jj  # query position - key position
        causal = (rel >= 0) & (rel <= S)
        exists = (pos.view(B, 1) - S + a + jj) >= 0  # [B, K]
        mask = causal.unsqueeze(0) & exists.unsqueeze(1)  # [B, Q, K]
        o = F.scaled_dot_product_attention(q[:, a:b].transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                           attn_mask=mask.unsqueeze(1))
        out.append(o.transpose(1, 2))
    n = keys.shape[1]
    return torch.cat(out, dim=1), keys[:, n - S:], vals[:, n - S:]


def rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX RoPE (halves rotated). x [B, T, H, D]; positions [B, T]; inv_freq [D / 2] fp32."""
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [B, T, D/2]
    cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(x.dtype).unsqueeze(2)  # [B, T, 1, D]
    sin = torch.cat([freqs.sin(), freqs.sin()], -1).to(x.dtype).unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
