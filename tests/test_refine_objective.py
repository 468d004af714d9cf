"""Hand-made cases for the REFINE objective (refine_tta.refine.objective) and its config."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from refine_tta.refine.config import RefineConfig
from refine_tta.refine.objective import (
    PolicyLossOut,
    SelectedPositions,
    binary_reward,
    chunk_bounds,
    clipped_policy_loss,
    combined_loss,
    cosine_reward,
    group_advantages,
    group_ids_for,
    min_selection_length,
    ntp_loss,
    select_positions,
    sequence_rewards,
    smooth_entropy,
    smoothing_width,
    token_entropy,
)

EPS = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# token_entropy


def test_entropy_of_uniform_logits_is_log_v():
    H = token_entropy(torch.zeros(3, 4, 7))
    assert H.shape == (3, 4)
    torch.testing.assert_close(H, torch.full((3, 4), math.log(7)))


def test_entropy_of_one_hot_with_neg_inf_is_zero_with_finite_grad():
    logits = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf], [-math.inf, 5.0, -math.inf, -math.inf]])
    logits.requires_grad_(True)
    H = token_entropy(logits)
    torch.testing.assert_close(H, torch.zeros(2), rtol=0, atol=0)
    H.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_ignores_neg_inf_entries():
    with_masked = token_entropy(torch.tensor([1.0, 2.0, -math.inf, 0.5]))
    without = token_entropy(torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(with_masked, without)


def test_entropy_temperature_and_formula():
    # logits/T = [0, log 3] -> p = [1/4, 3/4]
    T = 2.5
    H = token_entropy(torch.tensor([0.0, math.log(3.0) * T]), temperature=T)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert H.item() == pytest.approx(expected, abs=1e-6)
    logits = torch.randn(5, 11, generator=gen(0))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(token_entropy(logits), -(p * p.log()).sum(-1))
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(logits, temperature=0.0)


def test_entropy_is_fp32_for_bf16_input():
    H = token_entropy(torch.zeros(2, 16, dtype=torch.bfloat16))
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, torch.full((2,), math.log(16)))


# ---------------------------------------------------------------------------------------------
# smooth_entropy


@pytest.mark.parametrize("k, width", [(1, 1), (2, 3), (3, 3), (4, 5), (5, 5), (8, 9)])
def test_smoothing_width_is_odd(k, width):
    assert smoothing_width(k) == width


@pytest.mark.parametrize("k", [4, 5])
def test_smoothing_spike_spreads_to_width_five(k):
    x = torch.zeros(21)
    x[10] = 1.0
    expected = torch.zeros(21)
    expected[8:13] = 0.2
    out = smooth_entropy(x, k)
    assert out.shape == (21,)
    torch.testing.assert_close(out, expected)


def test_smoothing_k3_and_identity_k1():
    x = torch.zeros(9)
    x[4] = 3.0
    expected = torch.zeros(9)
    expected[3:6] = 1.0
    torch.testing.assert_close(smooth_entropy(x, 3), expected)
    y = torch.randn(13, generator=gen(1))
    torch.testing.assert_close(smooth_entropy(y, 1), y)


def test_smoothing_zero_padding_at_edges():
    ones = torch.ones(6)
    torch.testing.assert_close(smooth_entropy(ones, 3), torch.tensor([2 / 3, 1, 1, 1, 1, 2 / 3]))
    torch.testing.assert_close(smooth_entropy(ones, 5), torch.tensor([3 / 5, 4 / 5, 1, 1, 4 / 5, 3 / 5]))
    spike_first = torch.zeros(8)
    spike_first[0] = 1.0
    torch.testing.assert_close(smooth_entropy(spike_first, 5), torch.tensor([0.2, 0.2, 0.2, 0, 0, 0, 0, 0]))
    spike_last = torch.zeros(8)
    spike_last[-1] = 1.0
    torch.testing.assert_close(smooth_entropy(spike_last, 5), torch.tensor([0, 0, 0, 0, 0, 0.2, 0.2, 0.2]))


def test_smoothing_matches_naive_window_sum():
    x = torch.rand(37, generator=gen(2))
    for k in (2, 5, 6):
        w = smoothing_width(k)
        padded = torch.cat([torch.zeros(w // 2), x, torch.zeros(w // 2)])
        naive = torch.stack([padded[i : i + w].sum() / w for i in range(37)])
        torch.testing.assert_close(smooth_entropy(x, k), naive)


def test_smoothing_rejects_bad_shapes():
    with pytest.raises(ValueError, match="1-D"):
        smooth_entropy(torch.zeros(2, 5), 3)
    with pytest.raises(ValueError, match="k"):
        smooth_entropy(torch.zeros(5), 0)


# ---------------------------------------------------------------------------------------------
# chunking and selection


def test_chunk_bounds_floor_division():
    assert chunk_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert chunk_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert chunk_bounds(5, 1) == [(0, 5)]
    bounds = chunk_bounds(16384, 8)
    assert bounds[0][0] == 0 and bounds[-1][1] == 16384
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError):
        chunk_bounds(3, 4)


def bumps(length: int, centres: list[int], scale: float = 1.0) -> torch.Tensor:
    """Zeros with a triangle [1, 2, 3, 4, 5, 4, 3, 2, 1] * scale centred at each centre.

    With k = 5 the smoothed maximum is unique at the centre (19/5 vs 18/5 next to it)."""
    x = torch.zeros(length)
    tri = torch.tensor([1.0, 2, 3, 4, 5, 4, 3, 2, 1]) * scale
    for c in centres:
        x[c - 4 : c + 5] = tri
    return x


CENTRES = [30, 70, 120, 160]  # one per chunk of L=200 cut into 4


def test_argmax_picks_the_bump_of_each_chunk():
    sel = select_positions(bumps(200, CENTRES), n_chunks=4, k=5, mode="argmax", generator=None)
    assert isinstance(sel, SelectedPositions)
    assert sel.chunk_bounds == [(0, 50), (50, 100), (100, 150), (150, 200)]
    assert sel.picked.tolist() == CENTRES
    assert sel.starts.tolist() == [c + 1 for c in CENTRES]
    assert sel.starts.dtype == torch.long and sel.picked.dtype == torch.long


def test_argmin_picks_the_dip_of_each_chunk():
    entropy = 10.0 - bumps(200, CENTRES, scale=3.0)
    sel = select_positions(entropy, n_chunks=4, k=5, mode="argmin", generator=gen(0))
    assert sel.picked.tolist() == CENTRES


def test_argmax_first_index_on_ties():
    x = torch.zeros(100)
    x[50] = 1.0
    x[60] = 1.0
    sel = select_positions(x, n_chunks=1, k=5, mode="argmax", generator=None)
    assert sel.picked.tolist() == [50]
    flat = select_positions(torch.ones(100), n_chunks=2, k=3, mode="argmax", generator=None)
    assert flat.picked.tolist() == [0, 50]


def test_argmax_and_argmin_use_the_raw_entropy_not_the_smoothed_one():
    # a lone spike at 10 vs a broad plateau of 0.6 at 30..34: the raw maximum is the spike, the
    # smoothed one (width 5) the plateau's centre. Likewise for a lone dip.
    x = torch.zeros(60)
    x[10] = 1.0
    x[30:35] = 0.6
    assert int(torch.argmax(smooth_entropy(x, 5))) == 32
    assert select_positions(x, n_chunks=1, k=5, mode="argmax", generator=None, edge_margin=0).picked.tolist() == [10]
    assert select_positions(-x, n_chunks=1, k=5, mode="argmin", generator=None, edge_margin=0).picked.tolist() == [10]


def test_clamp_at_both_ends():
    # spikes at 0 and L-1: argmax picks 0 and 99
    L, m, k = 100, 20, 5
    x = torch.zeros(L)
    x[0] = 1.0
    x[L - 1] = 1.0
    sel = select_positions(x, n_chunks=2, k=k, mode="argmax", generator=None, edge_margin=m)
    assert sel.picked.tolist() == [0, 99]
    assert sel.starts.tolist() == [m, L - m - k]


def test_clamp_with_zero_margin_keeps_true_continuation():
    x = torch.zeros(12)
    x[-1] = 5.0
    sel = select_positions(x, n_chunks=1, k=3, mode="argmax", generator=None, edge_margin=0)
    assert sel.picked.tolist() == [11]
    assert sel.starts.tolist() == [12 - 3]  # r + k <= L


@pytest.mark.parametrize("mode", ["entropy", "uniform", "argmax", "argmin"])
def test_selection_invariants(mode):
    L, n_chunks, k, m = 300, 8, 5, 20
    entropy = torch.rand(L, generator=gen(3)) * 4
    sel = select_positions(entropy, n_chunks, k, mode, gen(4), edge_margin=m)
    assert sel.starts.shape == sel.picked.shape == (n_chunks,)
    assert sel.chunk_bounds == chunk_bounds(L, n_chunks)
    for t, (lo, hi) in zip(sel.picked.tolist(), sel.chunk_bounds):
        assert lo <= t < hi
    assert torch.equal(sel.starts, (sel.picked + 1).clamp(m, L - m - k))
    assert int(sel.starts.min()) >= m and int(sel.starts.max()) + k <= L - m


@pytest.mark.parametrize("mode", ["entropy", "uniform"])
def test_random_modes_reproducible_and_seed_dependent(mode):
    entropy = torch.rand(1000, generator=gen(5)) * 0.1  # nearly flat: many likely picks
    a = select_positions(entropy, 4, 5, mode, gen(7))
    b = select_positions(entropy, 4, 5, mode, gen(7))
    assert torch.equal(a.picked, b.picked) and torch.equal(a.starts, b.starts)
    others = [select_positions(entropy, 4, 5, mode, gen(s)).picked for s in range(8, 13)]
    assert any(not torch.equal(a.picked, o) for o in others)


def test_entropy_mode_picks_overwhelming_position():
    entropy = bumps(200, CENTRES, scale=100.0)  # smoothed centre beats neighbours by 20 nats
    for seed in range(5):
        sel = select_positions(entropy, 4, 5, "entropy", gen(seed))
        assert sel.picked.tolist() == CENTRES


def test_entropy_mode_samples_from_softmax():
    # k=1 (no smoothing), one chunk of 2 positions: p = softmax([0, log 3]) = [1/4, 3/4]
    entropy = torch.tensor([0.0, math.log(3.0)])
    g = gen(11)
    picks = [int(select_positions(entropy, 1, 1, "entropy", g, edge_margin=0).picked) for _ in range(4000)]
    assert sum(picks) / len(picks) == pytest.approx(0.75, abs=0.03)


def test_uniform_mode_ignores_entropy():
    entropy = bumps(200, [100], scale=100.0)
    g = gen(12)
    picks = {int(select_positions(entropy, 1, 5, "uniform", g).picked) for _ in range(200)}
    assert len(picks) > 50


def test_selection_rejects_short_document_and_bad_arguments():
    assert min_selection_length(8, 5, 20) == 53
    assert min_selection_length(8, 5, 20) == RefineConfig().min_document_tokens()
    select_positions(torch.rand(53), 8, 5, "argmax", None)  # exactly long enough
    with pytest.raises(ValueError, match="too short"):
        select_positions(torch.rand(52), 8, 5, "argmax", None)
    with pytest.raises(ValueError, match="mode"):
        select_positions(torch.rand(100), 2, 5, "max", None)
    with pytest.raises(ValueError, match="Generator"):
        select_positions(torch.rand(100), 2, 5, "entropy", None)
    with pytest.raises(ValueError, match="non-finite"):
        select_positions(torch.full((100,), math.nan), 2, 5, "argmax", None)


# ---------------------------------------------------------------------------------------------
# rewards


TRUE = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
ROLL = torch.tensor([[1, 2, 3, 4, 5], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])


def test_binary_reward():
    torch.testing.assert_close(binary_reward(ROLL, TRUE), torch.tensor([1.0, 0.2, 0.0]))
    with pytest.raises(ValueError):
        binary_reward(ROLL[:, :4], TRUE)


def test_cosine_reward_identical_opposite_orthogonal():
    h = torch.randn(3, 5, 8, generator=gen(13))
    torch.testing.assert_close(cosine_reward(h, h), torch.ones(3))
    torch.testing.assert_close(cosine_reward(h, -h), -torch.ones(3))
    torch.testing.assert_close(cosine_reward(h, 7.0 * h), torch.ones(3))  # scale-free
    e0, e1 = torch.eye(2)
    torch.testing.assert_close(cosine_reward(e0.view(1, 1, 2), e1.view(1, 1, 2)), torch.zeros(1))
    # mean over k: one identical and one opposite position -> 0
    pair_r = torch.stack([e0, e0]).unsqueeze(0)
    pair_t = torch.stack([e0, -e0]).unsqueeze(0)
    torch.testing.assert_close(cosine_reward(pair_r, pair_t), torch.zeros(1))
    assert cosine_reward(h.bfloat16(), h.bfloat16()).dtype == torch.float32


def test_sequence_rewards_kinds_and_hybrid_range():
    h_true = torch.randn(3, 5, 8, generator=gen(14))
    h_roll = torch.stack([h_true[0], h_true[1], -h_true[2]])  # cos 1, 1, -1
    out = sequence_rewards("hybrid", ROLL, TRUE, h_roll, h_true)
    torch.testing.assert_close(out["binary"], torch.tensor([1.0, 0.2, 0.0]))
    torch.testing.assert_close(out["cosine"], torch.tensor([1.0, 1.0, -1.0]))
    torch.testing.assert_close(out["reward"], torch.tensor([2.0, 1.2, -1.0]))  # ends of -1..2
    assert torch.equal(sequence_rewards("cosine", ROLL, TRUE, h_roll, h_true)["reward"], out["cosine"])
    assert torch.equal(sequence_rewards("binary", ROLL, TRUE, h_roll, h_true)["reward"], out["binary"])
    binary_only = sequence_rewards("binary", ROLL, TRUE)
    assert set(binary_only) == {"reward", "binary"}


@pytest.mark.parametrize("kind", ["cosine", "hybrid"])
def test_sequence_rewards_need_hidden_states(kind):
    with pytest.raises(ValueError, match="hidden states"):
        sequence_rewards(kind, ROLL, TRUE)


def test_sequence_rewards_bad_arguments():
    h = torch.zeros(3, 5, 4)
    with pytest.raises(ValueError, match="both"):
        sequence_rewards("cosine", ROLL, TRUE, h, None)
    with pytest.raises(ValueError, match="reward kind"):
        sequence_rewards("l2", ROLL, TRUE)
    with pytest.raises(ValueError, match="do not match"):
        sequence_rewards("cosine", ROLL, TRUE, torch.zeros(3, 4, 4), torch.zeros(3, 4, 4))


# ---------------------------------------------------------------------------------------------
# GRPO advantages


def test_group_ids_layout():
    assert group_ids_for(4, 1).tolist() == [0, 0, 0, 0]
    assert group_ids_for(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert group_ids_for(2, 3).tolist() == [0, 0, 0, 1, 1, 1]
    assert group_ids_for(2, 3).dtype == torch.long
    with pytest.raises(ValueError):
        group_ids_for(0, 1)


def test_advantages_one_group_per_document():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    A = group_advantages(rewards, group_ids_for(4, 1))
    std = math.sqrt(1 / 3)  # unbiased: sum of squares 1.0 over n-1 = 3
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + EPS)
    torch.testing.assert_close(A, expected)
    torch.testing.assert_close(A, (rewards - rewards.mean()) / (rewards.std() + EPS))


def test_advantages_group_per_prefix():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.8])
    A = group_advantages(rewards, group_ids_for(3, 2))
    s0 = math.sqrt(0.5)  # (0.25 + 0.25) / 1
    s2 = math.sqrt(0.18)  # (0.09 + 0.09) / 1
    expected = torch.tensor([0.5 / (s0 + EPS), -0.5 / (s0 + EPS), 0.0, 0.0, -0.3 / (s2 + EPS), 0.3 / (s2 + EPS)])
    torch.testing.assert_close(A, expected)


def test_advantages_zero_variance_group_is_exactly_zero():
    for value in (0.6, 0.1, 1.0, 0.0):
        A = group_advantages(torch.full((5,), value), torch.zeros(5, dtype=torch.long))
        assert torch.equal(A, torch.zeros(5))
    three_tenths = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    assert torch.equal(group_advantages(three_tenths, torch.zeros(3, dtype=torch.long)), torch.zeros(3, dtype=torch.float64))


def test_advantages_group_of_one_has_mean_zero_std_one():
    A = group_advantages(torch.tensor([0.7]), torch.tensor([0]))
    torch.testing.assert_close(A, torch.tensor([0.7 / (1 + EPS)]))
    mixed = group_advantages(torch.tensor([0.7, 1.0, 0.0]), torch.tensor([0, 1, 1]))
    s = math.sqrt(0.5)
    torch.testing.assert_close(mixed, torch.tensor([0.7 / (1 + EPS), 0.5 / (s + EPS), -0.5 / (s + EPS)]))


def test_advantages_arbitrary_ids_no_grad_and_dtype():
    rewards = torch.tensor([1.0, 0.2, 0.0, 0.6], requires_grad=True)
    A = group_advantages(rewards, torch.tensor([5, 9, 5, 9]))
    B = group_advantages(rewards.detach()[[0, 2, 1, 3]], torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(A, B[[0, 2, 1, 3]])
    assert not A.requires_grad and A.dtype == torch.float32
    assert group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0])).dtype == torch.float32
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# clipped policy loss


def one_token(ratio: float, advantage: float, **clip: float) -> tuple[PolicyLossOut, torch.Tensor]:
    """Loss of one rollout of one token with the given ratio; returns (out, d loss / d logp)."""
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    out = clipped_policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([advantage]), **clip)
    out.loss.backward()
    return out, logp.grad.view(())


@pytest.mark.parametrize(
    "ratio, adv, loss, grad, clipped",
    [
        (1.1, 2.0, -2.2, -2.2, 0.0),  # inside the range, A > 0: unclipped, grad = -A * ratio
        (1.1, -1.0, 1.1, 1.1, 0.0),  # inside the range, A < 0
        (0.9, 1.0, -0.9, -0.9, 0.0),
        (1.5, 1.0, -1.2, 0.0, 1.0),  # above 1 + eps, A > 0: clipped at 1.2, no grad
        (100.0, 2.0, -2.4, 0.0, 1.0),  # huge ratio, A > 0: clipped at 1 + eps
        (0.5, 1.0, -0.5, -0.5, 0.0),  # below 1 - eps, A > 0: not clipped (pessimistic side)
        (0.5, -1.0, 0.8, 0.0, 1.0),  # below 1 - eps, A < 0: clipped at 0.8, no grad
        (2.0, -1.0, 2.0, 2.0, 0.0),  # above 1 + eps, A < 0, below c: unclipped
        (5.0, -1.0, 3.0, 0.0, 0.0),  # A < 0 with ratio > c = 3: dual clip, loss = -A * 3
        (1e6, -0.5, 1.5, 0.0, 0.0),  # huge ratio, A < 0: dual clip
        (1.7, 0.0, 0.0, 0.0, 0.0),  # A = 0: nothing
    ],
)
def test_policy_loss_one_token(ratio, adv, loss, grad, clipped):
    out, g = one_token(ratio, adv)
    assert out.loss.item() == pytest.approx(loss, abs=1e-9)
    assert g.item() == pytest.approx(grad, abs=1e-9)
    assert out.clip_fraction.item() == clipped
    assert out.approx_kl.item() == pytest.approx(-math.log(ratio), abs=1e-9)


def test_policy_loss_asymmetric_clip():
    out, g = one_token(1.25, 1.0, clip_low=0.2, clip_high=0.28)
    assert out.loss.item() == pytest.approx(-1.25) and g.item() == pytest.approx(-1.25)
    out, g = one_token(0.75, -1.0, clip_low=0.1, clip_high=0.28)
    assert out.loss.item() == pytest.approx(0.9) and g.item() == 0.0
    out, _ = one_token(5.0, -1.0, dual_clip=10.0)
    assert out.loss.item() == pytest.approx(5.0)


def test_policy_loss_token_mean_with_mask_and_grads_by_hand():
    ratios = torch.tensor([[1.1, 1.5], [0.5, 7.0]], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    out = clipped_policy_loss(logp, old, adv, mask)
    # token losses: -1.1 (unclipped), -1.2 (clipped), 2*0.8 = 1.6 (clipped); 4th token masked
    assert out.loss.item() == pytest.approx((-1.1 - 1.2 + 1.6) / 3)
    assert out.clip_fraction.item() == pytest.approx(2 / 3)
    assert out.approx_kl.item() == pytest.approx(-(math.log(1.1) + math.log(1.5) + math.log(0.5)) / 3)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1 / 3, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert old.grad is None and adv.grad is None
    assert not out.clip_fraction.requires_grad and not out.approx_kl.requires_grad


def test_policy_loss_masked_neg_inf_logp_is_harmless():
    logp = torch.tensor([[0.1, -math.inf]], requires_grad=True)
    out = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1, 0]]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1].item() == 0.0


def naive_policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.2, c=3.0) -> float:
    """Per-token Python reference of the dual-clip surrogate (no mask)."""
    losses = []
    for i in range(len(logp)):
        for lp, olp in zip(logp[i], old[i]):
            a, ratio = adv[i], math.exp(lp - olp)
            clip_pg = max(-a * ratio, -a * min(max(ratio, 1 - clip_low), 1 + clip_high))
            losses.append(min(-a * c, clip_pg) if a < 0 else clip_pg)
    return sum(losses) / len(losses)


def test_policy_loss_matches_naive_reference():
    g = gen(21)
    logp = torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.8
    old = torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.8
    adv = torch.randn(6, generator=g, dtype=torch.float64) * 2
    out = clipped_policy_loss(logp, old, adv)
    assert out.loss.item() == pytest.approx(naive_policy_loss(logp.tolist(), old.tolist(), adv.tolist()), rel=1e-6)
    assert out.loss.dtype == torch.float64  # at least fp32: fp64 stays fp64
    bf16 = clipped_policy_loss(logp.bfloat16(), old.bfloat16(), adv.bfloat16())
    assert bf16.loss.dtype == torch.float32


def test_policy_loss_rejects_bad_shapes():
    with pytest.raises(ValueError):
        clipped_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="mask"):
        clipped_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), dual_clip=1.0)


# ---------------------------------------------------------------------------------------------
# ntp and combined losses


def test_ntp_loss_equals_shifted_cross_entropy():
    logits = torch.randn(2, 7, 11, generator=gen(31))
    tokens = torch.randint(11, (2, 7), generator=gen(32))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(ntp_loss(logits, tokens), expected)


def test_ntp_loss_hand_values():
    assert ntp_loss(torch.zeros(1, 4, 9), torch.zeros(1, 4, dtype=torch.long)).item() == pytest.approx(math.log(9))
    # the last logit row predicts nothing; the first predicts token 1
    logits = torch.full((1, 2, 3), -100.0)
    logits[0, 0, 2] = 100.0
    logits[0, 1] = torch.tensor([0.0, 0.0, 0.0])
    assert ntp_loss(logits, torch.tensor([[0, 2]])).item() == pytest.approx(0.0, abs=1e-6)
    half = ntp_loss(torch.zeros(1, 3, 5, dtype=torch.bfloat16), torch.zeros(1, 3, dtype=torch.long))
    assert half.dtype == torch.float32
    with pytest.raises(ValueError):
        ntp_loss(torch.zeros(1, 1, 5), torch.zeros(1, 1, dtype=torch.long))


def test_combined_loss():
    ntp = torch.tensor(2.0, requires_grad=True)
    pol = torch.tensor(3.0, requires_grad=True)
    total = combined_loss(ntp, pol, 1.0, 0.4)
    assert total.item() == pytest.approx(3.2)
    total.backward()
    assert ntp.grad.item() == pytest.approx(1.0) and pol.grad.item() == pytest.approx(0.4)
    assert combined_loss(ntp, None, 0.5, 0.4).item() == pytest.approx(1.0)
    assert combined_loss(None, pol, 1.0, 0.4).item() == pytest.approx(1.2)
    with pytest.raises(ValueError):
        combined_loss(None, None, 1.0, 0.4)
    with pytest.raises(ValueError):
        combined_loss(ntp, pol, -1.0, 0.4)


# ---------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_the_papers():
    cfg = RefineConfig()
    assert (cfg.n_chunks, cfg.k, cfg.n, cfg.reward, cfg.selection) == (8, 5, 1, "binary", "entropy")
    assert (cfg.sft_coef, cfg.ppo_coef, cfg.clip_low, cfg.clip_high, cfg.dual_clip) == (1.0, 0.4, 0.2, 0.2, 3.0)
    assert cfg.edge_margin == 20 and cfg.layers is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3  # type: ignore[misc]
    hash(cfg)


@pytest.mark.parametrize(
    "field, value",
    [
        ("mode", "rl"),
        ("steps", -1),
        ("lr", 0.0),
        ("lr", -1e-4),
        ("weight_decay", -0.1),
        ("grad_clip", 0.0),
        ("n_chunks", 0),
        ("k", 0),
        ("k", True),
        ("k", 2.5),
        ("n", 0),
        ("selection", "max"),
        ("reward", "l2"),
        ("sft_coef", -1.0),
        ("ppo_coef", -0.4),
        ("clip_low", 0.0),
        ("clip_high", 1.5),
        ("dual_clip", 1.0),
        ("temperature", 0.0),
        ("lr", math.nan),
        ("edge_margin", -1),
        ("scope", "adapters"),
        ("lora_rank", 0),
        ("lora_alpha", 0.0),
        ("lora_targets", ()),
        ("lora_targets", ("q_proj", "")),
        ("layers", (0, 1)),  # layers without scope "layers"
        ("seed", -1),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        RefineConfig(**{field: value})


def test_config_scope_layers():
    with pytest.raises(ValueError, match="layers"):
        RefineConfig(scope="layers")
    with pytest.raises(ValueError, match="layers"):
        RefineConfig(scope="layers", layers=())
    with pytest.raises(ValueError, match="repeat"):
        RefineConfig(scope="layers", layers=(1, 1))
    with pytest.raises(ValueError, match="layers"):
        RefineConfig(scope="layers", layers=(0, -2))
    cfg = RefineConfig(scope="layers", layers=[3, 0])  # a list becomes a tuple
    assert cfg.layers == (3, 0)
    hash(cfg)


def test_config_both_coefs_zero_rejected_for_refine_only():
    with pytest.raises(ValueError, match="sft_coef and ppo_coef"):
        RefineConfig(sft_coef=0.0, ppo_coef=0.0)
    RefineConfig(mode="sft", sft_coef=0.0, ppo_coef=0.0)


def test_validate_document():
    cfg = RefineConfig()
    cfg.validate_document(53)  # 2*20 + 5 + 8
    with pytest.raises(ValueError, match="53"):
        cfg.validate_document(52)
    small = RefineConfig(edge_margin=2, k=3, n_chunks=4)
    small.validate_document(11)
    with pytest.raises(ValueError):
        small.validate_document(10)
    sft = RefineConfig(mode="sft")
    sft.validate_document(2)
    with pytest.raises(ValueError):
        sft.validate_document(1)
    none = RefineConfig(mode="none")
    none.validate_document(1)
    with pytest.raises(ValueError):
        none.validate_document(0)


def test_mode_none_records_no_steps_and_zero_steps_needs_mode_none():
    assert RefineConfig(mode="none", steps=4).steps == 0  # a preset's steps are not recorded as if run
    assert RefineConfig.from_dict({"steps": 4, "mode": "none"}).to_dict()["steps"] == 0
    for mode in ("refine", "sft"):
        with pytest.raises(ValueError, match=f"steps is 0 with mode '{mode}': nothing would be adapted; use mode 'none'"):
            RefineConfig(mode=mode, steps=0)


def test_short_document_message_names_the_settings():
    with pytest.raises(ValueError) as err:
        RefineConfig(n_chunks=8, k=5, edge_margin=20).validate_document(30)
    message = str(err.value)
    assert message.startswith("the document has 30 tokens; mode 'refine' needs at least 53")
    assert "n_chunks" in message and "k=5" in message and "edge_margin=20" in message and "mode 'sft'" in message
    assert "2*edge_margin" not in message


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bar, foo"):
        RefineConfig.from_dict({"k": 3, "foo": 1, "bar": 2})
    with pytest.raises(ValueError):
        RefineConfig.from_dict([("k", 3)])  # type: ignore[arg-type]


def test_config_round_trip_through_json():
    cfg = RefineConfig(
        mode="refine", steps=2, k=4, n=3, reward="hybrid", selection="uniform", scope="layers",
        layers=(0, 5), lora_targets=("q_proj", "v_proj"), seed=42,
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["layers"] == [0, 5] and d["lora_targets"] == ["q_proj", "v_proj"]
    back = RefineConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.layers, tuple) and isinstance(back.lora_targets, tuple)
    assert RefineConfig.from_dict({}) == RefineConfig()
    assert RefineConfig.from_dict(RefineConfig().to_dict()) == RefineConfig()


def test_presets_are_valid_configs_and_unknown_names_are_refused():
    from refine_tta.refine.config import PRESETS, RefineConfig, preset

    for name in PRESETS:
        RefineConfig.from_dict(preset(name))
    assert RefineConfig.from_dict(preset("embedded")).reward == "hybrid"
    assert RefineConfig.from_dict(preset("paper")).lr == 1e-6
    with pytest.raises(ValueError, match="embedded"):
        preset("fast")
    before = preset("embedded")["lr"]
    p = preset("embedded")
    p["lr"] = 1.0  # a copy: the table itself is not changed
    assert preset("embedded")["lr"] == before != 1.0
