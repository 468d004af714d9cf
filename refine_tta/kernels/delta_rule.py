"""The (gated) delta rule in pure PyTorch, recurrent and chunked, differentiable end to end.

Layout follows fla's kernels: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta and g ``[B, T, H]``,
state ``[B, H, K, V]``. ``g`` is the per-token log decay (``None`` for plain DeltaNet). For each t::

    S <- exp(g_t) * S
    u_t = beta_t * (v_t - k_t S)
    S <- S + k_t^T u_t
    o_t = (scale * q_t) S

The chunked form is the WY representation: inside a chunk of C tokens the updates u solve a
unit-lower-triangular system, so a chunk costs a few [C, C] and [C, K] x [K, V] matmuls instead of C
sequential rank-one updates. Both forms compute in fp32 and return o in the input dtype and the
state in fp32, as fla does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_SIZE = 64
# Single-token reads (decoding) use the recurrent form. Anything longer uses the chunked form:
# on CPU its backward is much faster than back-propagating through a Python loop over tokens,
# which matters for REFINE's short prefix segments and k-token branches.
RECURRENT_MAX_TOKENS = 1


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, computed in fp32 (fla's ``l2norm``)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def _prepare(q, k, v, beta, g, scale, initial_state):
    """Cast to fp32 and move heads first: [B, T, H, D] -> [B, H, T, D]."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))
    beta = beta.float().transpose(1, 2)  # [B, H, T]
    g = None if g is None else g.float().transpose(1, 2)  # [B, H, T]
    if initial_state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    else:
        state = initial_state.float()
    return q * scale, k, v, beta, g, state


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token (gated) delta rule. Returns o [B, T, H, V] and final state [B, H, K, V]."""
    dtype = v.dtype
    q, k, v, beta, g, S = _prepare(q, k, v, beta, g, scale, initial_state)
    outs = []
    for t in range(q.shape[2]):
        if g is not None:
            S = S * g[:, :, t].exp()[..., None, None]
        k_t = k[:, :, t]  # [B, H, K]
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t.unsqueeze(-1) * u.unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return o.transpose(1, 2).to(dtype), S


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    trace: list[ChunkTrace] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY) (gated) delta rule; any T (the last chunk may be short).

    Returns o [B, T, H, V] and final state [B, H, K, V]. With ``trace`` (a list), appends one
    :class:`ChunkTrace` per chunk, from which ``state_within_chunk`` gives the state after any
    token of the input, with gradients, without reading anything again.
    """
    dtype = v.dtype
    q, k, v, beta, g, S = _prepare(q, k, v, beta, g, scale, initial_state)
    T = q.shape[2]
    outs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        k_c = k[:, :, start:end]
        o_c, S_next, U, G = _chunk_step(
            q[:, :, start:end], k_c, v[:, :, start:end], beta[:, :, start:end],
            None if g is None else g[:, :, start:end], S,
        )
        if trace is not None:
            trace.append(ChunkTrace(start, S, k_c, U, G))
        S = S_next
        outs.append(o_c)
    o = torch.cat(outs, dim=2) if outs else v.new_zeros(v.shape)
    return o.transpose(1, 2).to(dtype), S


@dataclass
class ChunkTrace:
    """One chunk of a chunked read: start (token offset in the input), S [B, H, K, V] the state
    before it (fp32), k [B, H, C, K] its keys, U [B, H, C, V] its WY updates, G [B, H, C] the
    within-chunk cumulative log decay (None without gates). All autograd-connected."""

    start: int
    S: torch.Tensor
    k: torch.Tensor
    U: torch.Tensor
    G: torch.Tensor | None


def state_within_chunk(chunk: ChunkTrace, m: int) -> torch.Tensor:
    """The state after the first m tokens of a traced chunk (0 <= m <= C). [B, H, K, V] fp32.

    U's rows depend only on earlier rows (a unit-lower-triangular solve), so the first m rows of
    a chunk's U are those of a chunk cut after m tokens, and the chunk's state update restricted
    to them is the state after m tokens::

        S_m = exp(G_{m-1}) S + (exp(G_{m-1} - G_i) k_i)^T U_i, i < m   (G = 0 without gates)
    """
    C = chunk.k.shape[2]
    if not 0 <= m <= C:
        raise ValueError(f"m must be in [0, {C}], got {m}")
    if m == 0:
        return chunk.S
    k, U = chunk.k[:, :, :m], chunk.U[:, :, :m]
    if chunk.G is None:
        return chunk.S + k.transpose(-1, -2) @ U
    G = chunk.G[..., :m]  # [B, H, m]
    last = G[..., -1:]  # [B, H, 1]
    return chunk.S * last.exp().unsqueeze(-1) + (k * (last - G).exp().unsqueeze(-1)).transpose(-1, -2) @ U


def traced_state(trace: list[ChunkTrace], p: int) -> torch.Tensor:
    """The state after the first p tokens (0 <= p <= T) of a read traced by ``delta_rule_chunked``."""
    if not trace:
        raise ValueError("empty trace")
    end = trace[-1].start + trace[-1].k.shape[2]
    if not 0 <= p <= end:
        raise ValueError(f"position {p} is outside the traced read of {end} tokens")
    chunk = next((c for c in reversed(trace) if c.start < p), trace[0])
    return state_within_chunk(chunk, p - chunk.start)


def _chunk_step(q, k, v, beta, g, S):
    """One chunk. q, k [B, H, C, K]; v [B, H, C, V]; beta, g [B, H, C]; S [B, H, K, V].

    Returns o [B, H, C, V], the new state, U [B, H, C, V] and G [B, H, C] (None without gates).

    With G = cumsum(g) inside the chunk and D[t, i] = exp(G_t - G_i) (1 without gates):
      (I + strict_lower(beta_t D[t, i] k_t.k_i)) U = diag(beta) (V - diag(exp G) K S)
      O = diag(exp G) Q S + lower(D * Q K^T) U
      S' = exp(G_C) S + (exp(G_C - G) * K)^T U
    """
    C = q.shape[2]
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    strict = torch.tril(ones, diagonal=-1)
    incl = torch.tril(ones)
    kk = k @ k.transpose(-1, -2)  # [B, H, C, C]
    qk = q @ k.transpose(-1, -2)
    if g is None:
        decay_in = decay_out = None
        kk_d, qk_d = kk, qk
    else:
        G = g.cumsum(-1)  # [B, H, C]
        diff = G.unsqueeze(-1) - G.unsqueeze(-2)  # G_t - G_i
        D = torch.where(incl, diff, torch.full_like(diff, float("-inf"))).exp()
        kk_d, qk_d = kk * D, qk * D
        decay_in = G.exp()  # [B, H, C]
        decay_out = (G[..., -1:] - G).exp()  # [B, H, C]
    kS = k @ S  # [B, H, C, V]
    if decay_in is not None:
        kS = kS * decay_in.unsqueeze(-1)
    A = torch.eye(C, device=q.device, dtype=q.dtype) + (beta.unsqueeze(-1) * kk_d).masked_fill(~strict, 0.0)
    rhs = beta.unsqueeze(-1) * (v - kS)
    U = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # [B, H, C, V]
    qS = q @ S
    if decay_in is not None:
        qS = qS * decay_in.unsqueeze(-1)
    o = qS + qk_d.masked_fill(~incl, 0.0) @ U
    if decay_out is None:
        S_new = S + k.transpose(-1, -2) @ U
    else:
        S_new = S * decay_in[..., -1, None, None] + (k * decay_out.unsqueeze(-1)).transpose(-1, -2) @ U
    return o, S_new, U, (None if g is None else G)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    trace: list[ChunkTrace] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent form for short inputs (decode, short branches), chunked form otherwise (always
    with a ``trace``: see ``delta_rule_chunked``)."""
    if trace is not None:
        return delta_rule_chunked(q, k, v, beta, g, scale, initial_state, trace=trace)
    if q.shape[1] <= RECURRENT_MAX_TOKENS:
        return delta_rule_recurrent(q, k, v, beta, g, scale, initial_state)
    return delta_rule_chunked(q, k, v, beta, g, scale, initial_state)
