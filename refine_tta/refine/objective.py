"""The REFINE objective as small pure tensor functions (shared/refine-algorithm.md, steps 1-6).

No model, no tokenizer: every function takes tensors and returns tensors, so each one can be tested
on hand-made inputs. Shapes use L = document length, V = vocabulary, N = number of rollouts,
k = rollout length, D = hidden size.

Conventions (the paper's official code builds on verl; we follow verl where the spec is silent):

- chunks: position c of ``n_chunks`` covers ``[c*L // n_chunks, (c+1)*L // n_chunks)`` (equal
  floor division; chunk sizes differ by at most one and the last chunk ends at L).
- a rollout start is r = t + 1 for the picked index t, clamped to
  ``[edge_margin, L - edge_margin - k]``.
- GRPO advantages use the unbiased per-group std (``torch.std``); a group of size 1 has mean 0
  and std 1, as in verl's ``compute_grpo_outcome_advantage``.
- the PPO loss is verl's ``compute_policy_loss`` with dual clip and token-mean aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refine_tta.refine.config import REWARD_KINDS, SELECTION_MODES

# verl clamps log-ratios before exp() so that exp never overflows (0 * inf would be NaN).
_MAX_LOG_RATIO = 20.0


# ---------------------------------------------------------------------------------------------
# Step 1-2: entropy and position selection


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy in nats of softmax(logits / temperature) over the last dim.

    logits: [..., V] (any float dtype; computed in fp32). Returns [...] fp32. ``-inf`` logits
    (masked tokens) contribute 0, with finite gradients.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return entropy_from_logprobs(torch.log_softmax(logits.float() / temperature, dim=-1))


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of a distribution given as log-probabilities. logp [..., V] -> [...].

    For a read that has computed ``log_softmax`` already (for its cross-entropy); same values as
    ``token_entropy`` on the logits.
    """
    p = logp.exp()
    # One fused multiply-add pass over V when every log-prob is finite (always, for finite logits).
    entropy = -torch.einsum("...v,...v->...", p, logp)
    if bool(torch.isfinite(entropy).all()):
        return entropy
    # A -inf log-prob made 0 * -inf = NaN: 0 * log 0 = 0; masking logp (not the product) keeps the
    # backward free of 0 * inf.
    logp = logp.masked_fill(~torch.isfinite(logp), 0.0)
    return -(p * logp).sum(dim=-1)


def smoothing_width(k: int) -> int:
    """Width of the entropy box filter: k, or k + 1 when k is even (an odd, centred window)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k if k % 2 == 1 else k + 1


def smooth_entropy(entropy: torch.Tensor, k: int) -> torch.Tensor:
    """Box-filter mean of width ``smoothing_width(k)``, stride 1, zero padding, same length.

    entropy: [L]. Returns [L] fp32. out[i] = sum(entropy[i-w//2 : i+w//2+1]) / w, where indices
    outside [0, L) count as zeros (edge windows are divided by the full width w).
    """
    if entropy.dim() != 1:
        raise ValueError(f"entropy must be 1-D [L], got shape {tuple(entropy.shape)}")
    width = smoothing_width(k)
    kernel = entropy.new_full((1, 1, width), 1.0 / width, dtype=torch.float32)  # [1, 1, w]
    x = entropy.float().view(1, 1, -1)  # [1, 1, L]
    return F.conv1d(x, kernel, padding=width // 2).view(-1)


def chunk_bounds(length: int, n_chunks: int) -> list[tuple[int, int]]:
    """[start, end) of the ``n_chunks`` chunks of positions 0..length-1 (floor division)."""
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    if length < n_chunks:
        raise ValueError(f"cannot cut {length} positions into {n_chunks} non-empty chunks")
    return [(c * length // n_chunks, (c + 1) * length // n_chunks) for c in range(n_chunks)]


def min_selection_length(n_chunks: int, k: int, edge_margin: int) -> int:
    """Shortest document ``select_positions`` accepts: 2*edge_margin + k + n_chunks."""
    return 2 * edge_margin + k + n_chunks


@dataclass(frozen=True)
class SelectedPositions:
    """Result of ``select_positions``.

    starts: [n_chunks] int64, rollout start r per chunk (prefix x[0:r], true continuation
    x[r:r+k]); picked: [n_chunks] int64, the drawn index t before r = t + 1 and the clamp;
    chunk_bounds: [start, end) of each chunk. Several chunks may share a start after the clamp.
    """

    starts: torch.Tensor
    picked: torch.Tensor
    chunk_bounds: list[tuple[int, int]]


def _pick_in_chunk(
    scores: torch.Tensor, mode: str, generator: torch.Generator | None
) -> int:
    """Index into one chunk's smoothed entropy scores [C] according to ``mode``."""
    if mode == "argmax":
        return int(torch.argmax(scores))  # first index on ties
    if mode == "argmin":
        return int(torch.argmin(scores))
    if generator is None:
        raise ValueError(f"selection mode {mode!r} needs a torch.Generator")
    if mode == "uniform":
        draw = torch.randint(scores.numel(), (1,), generator=generator, device=generator.device)
        return int(draw)
    probs = torch.softmax(scores, dim=0)  # mode == "entropy"
    return int(torch.multinomial(probs, 1, generator=generator))


def select_positions(
    entropy: torch.Tensor,
    n_chunks: int,
    k: int,
    mode: str,
    generator: torch.Generator | None,
    edge_margin: int = 20,
) -> SelectedPositions:
    """Pick one rollout start per chunk of the document (spec step 2).

    entropy: [L], H_t = entropy of the prediction made at position t, i.e. of token t+1; that is
    why the rollout for index t starts at r = t + 1. The entropy is smoothed with
    ``smooth_entropy(entropy, k)``, positions 0..L-1 are cut into ``chunk_bounds(L, n_chunks)``,
    and in each chunk one index t is drawn:

    - ``entropy``: sampled from softmax(smoothed H over the chunk) with ``generator``;
    - ``uniform``: sampled uniformly with ``generator``;
    - ``argmax`` / ``argmin``: of the smoothed H, first index on ties (``generator`` unused).

    Then r = t + 1 is clamped to ``[edge_margin, L - edge_margin - k]``. The spec says "at least
    20 tokens after the start and at most 20 before the end"; we also reserve the k tokens of the
    true continuation, so r + k <= L - edge_margin always holds. Requires
    L >= 2*edge_margin + k + n_chunks (else ValueError). Draws happen on ``generator.device``
    (CPU for a CPU generator); the returned tensors are on that device (CPU for argmax/argmin
    without a generator).
    """
    if entropy.dim() != 1:
        raise ValueError(f"entropy must be 1-D [L], got shape {tuple(entropy.shape)}")
    if mode not in SELECTION_MODES:
        raise ValueError(f"selection mode must be one of {SELECTION_MODES}, got {mode!r}")
    if k < 1 or n_chunks < 1 or edge_margin < 0:
        raise ValueError(
            f"need k >= 1, n_chunks >= 1, edge_margin >= 0; got {k}, {n_chunks}, {edge_margin}"
        )
    length = entropy.shape[0]
    need = min_selection_length(n_chunks, k, edge_margin)
    if length < need:
        raise ValueError(
            f"document of {length} tokens is too short: selection needs at least "
            f"2*edge_margin + k + n_chunks = {need}"
        )
    if not bool(torch.isfinite(entropy).all()):
        raise ValueError("entropy contains non-finite values")
    device = generator.device if generator is not None else torch.device("cpu")
    smoothed = smooth_entropy(entropy, k).to(device)  # [L]
    bounds = chunk_bounds(length, n_chunks)
    picked = [lo + _pick_in_chunk(smoothed[lo:hi], mode, generator) for lo, hi in bounds]
    picked_t = torch.tensor(picked, dtype=torch.long, device=device)  # [n_chunks]
    starts = (picked_t + 1).clamp(edge_margin, length - edge_margin - k)
    return SelectedPositions(starts=starts, picked=picked_t, chunk_bounds=bounds)


# ---------------------------------------------------------------------------------------------
# Step 4: rewards


def binary_reward(rollout_tokens: torch.Tensor, true_tokens: torch.Tensor) -> torch.Tensor:
    """Fraction of the k rollout tokens equal to the true ones. [N, k], [N, k] -> [N] fp32."""
    if rollout_tokens.shape != true_tokens.shape or rollout_tokens.dim() != 2:
        raise ValueError(
            f"need two [N, k] token tensors, got {tuple(rollout_tokens.shape)} and "
            f"{tuple(true_tokens.shape)}"
        )
    return (rollout_tokens == true_tokens).float().mean(dim=-1)


def cosine_reward(h_rollout: torch.Tensor, h_true: torch.Tensor) -> torch.Tensor:
    """Mean over k of cos(h_rollout, h_true) in fp32 (eps 1e-8). [N, k, D], [N, k, D] -> [N]."""
    if h_rollout.shape != h_true.shape or h_rollout.dim() != 3:
        raise ValueError(
            f"need two [N, k, D] hidden-state tensors, got {tuple(h_rollout.shape)} and "
            f"{tuple(h_true.shape)}"
        )
    cos = F.cosine_similarity(h_rollout.float(), h_true.float(), dim=-1, eps=1e-8)  # [N, k]
    return cos.mean(dim=-1)


def sequence_rewards(
    kind: str,
    rollout_tokens: torch.Tensor,
    true_tokens: torch.Tensor,
    h_rollout: torch.Tensor | None = None,
    h_true: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Rewards of N rollouts against their true continuations.

    rollout_tokens, true_tokens: [N, k]; h_rollout, h_true: [N, k, D] or None. Returns
    {"reward": [N] of ``kind``, "binary": [N], "cosine": [N] (only when hidden states are given)}.
    ``hybrid`` = cosine + binary (range -1..2). ``cosine``/``hybrid`` need both hidden states.
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}")
    if (h_rollout is None) != (h_true is None):
        raise ValueError("give both h_rollout and h_true, or neither")
    if kind != "binary" and h_rollout is None:
        raise ValueError(f"reward {kind!r} needs the hidden states h_rollout and h_true")
    out = {"binary": binary_reward(rollout_tokens, true_tokens)}
    if h_rollout is not None:
        if h_rollout.shape[:2] != rollout_tokens.shape:
            raise ValueError(
                f"hidden states {tuple(h_rollout.shape)} do not match tokens "
                f"{tuple(rollout_tokens.shape)}"
            )
        out["cosine"] = cosine_reward(h_rollout, h_true)
    if kind == "hybrid":
        out["reward"] = out["cosine"] + out["binary"]
    else:
        out["reward"] = out[kind]
    return out


# ---------------------------------------------------------------------------------------------
# Step 5: GRPO advantages


def group_ids_for(n_positions: int, n: int) -> torch.Tensor:
    """GRPO group id of each rollout, layout [pos0 roll0..n-1, pos1 roll0..n-1, ...].

    n == 1: all positions of the document form one group (all zeros). n > 1: the n rollouts of
    one prefix form a group (id = position index). Returns int64 [n_positions * n].
    """
    if n_positions < 1 or n < 1:
        raise ValueError(f"need n_positions >= 1 and n >= 1, got {n_positions}, {n}")
    if n == 1:
        return torch.zeros(n_positions, dtype=torch.long)
    return torch.arange(n_positions, dtype=torch.long).repeat_interleave(n)


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages A = (R - mean_group) / (std_group + eps), no gradient.

    rewards: [N]; group_ids: int [N] (any values; equal id = same group). Returns [N] in the
    rewards' float dtype (fp32 for integer rewards). verl's convention: std is unbiased
    (``torch.std``); a group of size 1 has mean 0 and std 1, so A = R / (1 + eps). A group whose
    rewards are all equal gets A = 0 exactly (computed in fp64, then forced to 0 so rounding in
    the mean cannot be blown up by 1 / eps).
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"need rewards [N] and group_ids [N], got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    if rewards.numel() == 0:
        raise ValueError("no rewards")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.detach().double()  # [N]
    _, inverse = torch.unique(group_ids, return_inverse=True)  # [N] in 0..G-1
    n_groups = int(inverse.max()) + 1
    count = torch.bincount(inverse, minlength=n_groups).double()  # [G]
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=r.device)  # [G]
    mean = zeros.index_add(0, inverse, r) / count
    sq_dev = (r - mean[inverse]).square()
    var = zeros.index_add(0, inverse, sq_dev) / (count - 1).clamp_min(1)
    std = var.sqrt()
    gmax = torch.full_like(mean, float("-inf")).scatter_reduce(0, inverse, r, reduce="amax")
    gmin = torch.full_like(mean, float("inf")).scatter_reduce(0, inverse, r, reduce="amin")
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = (r - mean[inverse]) / (std[inverse] + eps)  # [N]
    flat = (gmax == gmin) & ~single  # [G]
    adv = torch.where(flat[inverse], torch.zeros_like(adv), adv)
    return adv.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Step 6: losses


@dataclass(frozen=True)
class PolicyLossOut:
    """loss: scalar with grad w.r.t. logp; clip_fraction, approx_kl: detached scalars.

    All three are in logp's dtype promoted to at least fp32 (bf16 -> fp32, fp64 stays fp64).
    """

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (bool, same shape); 0 when the mask is empty."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / mask.sum().clamp_min(1)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
) -> PolicyLossOut:
    """Dual-clip PPO surrogate, token-mean over the masked tokens (verl's ``compute_policy_loss``).

    logp, old_logp: [N, k] log-probs of the rollout tokens under the current / rollout policy;
    advantages: [N], the same A on all k tokens of a rollout; mask: [N, k] (bool or 0/1) or None
    (all tokens). Per token, with ratio = exp(logp - old_logp) (log-ratio clamped to +-20)::

        pg1 = -A * ratio;  pg2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)
        clip_pg = max(pg1, pg2);  pg3 = -A * dual_clip
        loss_t = min(pg3, clip_pg) if A < 0 else clip_pg

    Gradients flow into ``logp`` only (old_logp and advantages are detached).
    clip_fraction: share of tokens with pg2 > pg1 (verl's pg_clipfrac; the dual clip is not
    counted); approx_kl: masked mean of old_logp - logp (verl's ppo_kl). Both detached.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape:
        raise ValueError(
            f"need logp and old_logp [N, k], got {tuple(logp.shape)} and {tuple(old_logp.shape)}"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must be [N] = [{logp.shape[0]}], got {tuple(advantages.shape)}"
        )
    if not (0 < clip_low <= 1 and 0 < clip_high <= 1 and dual_clip > 1):
        raise ValueError(
            f"need clip_low, clip_high in (0, 1] and dual_clip > 1; got {clip_low}, {clip_high}, "
            f"{dual_clip}"
        )
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    elif mask.shape != logp.shape:
        raise ValueError(f"mask must be {tuple(logp.shape)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    dtype = torch.promote_types(logp.dtype, torch.float32)  # at least fp32 (bf16 -> fp32)
    logp = logp.to(dtype)  # differentiable cast
    old_logp = old_logp.detach().to(dtype)
    adv = advantages.detach().to(dtype).unsqueeze(-1)  # [N, 1]

    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [N, k]
    ratio = log_ratio.exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clip_pg = torch.maximum(pg1, pg2)
    pg3 = -adv * dual_clip
    per_token = torch.where(adv < 0, torch.minimum(pg3, clip_pg), clip_pg)  # [N, k]

    loss = _masked_mean(per_token, mask)
    with torch.no_grad():
        clip_fraction = _masked_mean((pg2 > pg1).to(dtype), mask)
        approx_kl = _masked_mean(old_logp - logp, mask)
    return PolicyLossOut(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


def ntp_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32: logits[:, :-1] predict tokens[:, 1:].

    logits: [B, T, V]; tokens: [B, T] int64, T >= 2. Returns a scalar.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"need logits [B, T, V] and tokens [B, T], got {tuple(logits.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if tokens.shape[1] < 2:
        raise ValueError(f"need at least 2 tokens per row, got T = {tokens.shape[1]}")
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [B*(T-1), V]
    target = tokens[:, 1:].reshape(-1)  # [B*(T-1)]
    return F.cross_entropy(pred, target)


def combined_loss(
    ntp: torch.Tensor | None,
    policy: torch.Tensor | None,
    sft_coef: float,
    ppo_coef: float,
) -> torch.Tensor:
    """sft_coef * ntp + ppo_coef * policy, skipping a term that is None (both None: ValueError)."""
    if ntp is None and policy is None:
        raise ValueError("combined_loss needs at least one of ntp and policy")
    if sft_coef < 0 or ppo_coef < 0:
        raise ValueError(f"coefficients must be >= 0, got sft_coef={sft_coef}, ppo_coef={ppo_coef}")
    terms = []
    if ntp is not None:
        terms.append(sft_coef * ntp)
    if policy is not None:
        terms.append(ppo_coef * policy)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]
