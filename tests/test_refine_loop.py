"""The REFINE engine (refine_tta.refine.loop / rollout / delta) on small fp32 models, CPU.

* branch path == reference path: the shared-prefix branches give the same rollout tokens, old
  log-probs, rewards, losses and parameter gradients as re-reading every prefix (the paper's way),
  for n = 1 and 2, every reward kind, every scope, duplicate starts and L not a multiple of 64;
  batched rollouts == one-at-a-time rollouts. And whole steps: the branch step, which selects from
  its own read with gradients (no scoring read), picks the same positions, draws the same
  rollouts and gives the same losses and gradients as the reference step, which selects from a
  scoring read, on DeltaNet and Gated DeltaNet, traced and through boundary states.
* isolation: adapt() leaves the base model bit-identical (also when cancelled), sessions do not
  depend on what was adapted before, the same seed gives the same session bit for bit.
* a non-finite step is skipped and reported; config validation; statistics.
* on the default model (when a checkpoint exists): adaptation lowers the NLL of a fact stated in
  the document.

Tolerances: the two paths read the same tokens in different segmentations (the chunked delta rule
over x[0:r] vs. segments cut at the rollout starts; batched vs single-row matmuls), so fp32
values agree to rounding: log-probs and losses to 1e-5, gradients to rtol 1e-4 / atol 1e-6 of
gradients whose largest entries are ~1e-1..1e+0.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrize

from refine_tta.model.decoding import TokenSampling, generate_tokens
from refine_tta.model.loading import prepare_model, register_fla_models
from refine_tta.model.runtime import read, read_document
from refine_tta.refine import objective as obj
from refine_tta.refine import rollout as ro
from refine_tta.refine.config import RefineConfig
from refine_tta.refine.delta import trainable_scope
from refine_tta.refine.loop import (
    AdaptCancelled,
    _branch_losses,
    _Clock,
    _reference_losses,
    adapt,
    branch_step_inputs,
    final_read,
    score_document,
    step_inputs,
)

VOCAB = 128
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
VALUE_TOL = 1e-5
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "refine-tiny-deltanet"


def make_model(kind: str = "delta_net", seed: int = 0):
    """A tiny randomly initialised fla model (2 blocks, hidden 64, 2 heads, vocab 128), fp32, eval."""
    register_fla_models()
    import fla.models
    from transformers import AutoModelForCausalLM

    cls = {"delta_net": fla.models.DeltaNetConfig, "gated_deltanet": fla.models.GatedDeltaNetConfig}[kind]
    extra = {"head_dim": 32} if kind == "gated_deltanet" else {}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        cls(hidden_size=64, num_heads=2, num_hidden_layers=2, vocab_size=VOCAB, **extra))
    prepare_model(model.float(), torch.device("cpu"))
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def doc(L: int, seed: int = 0) -> torch.Tensor:
    """Random tokens with some repetition (so binary rewards are not all 0). [1, L] int64."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (12,), generator=g)
    noise = torch.randint(0, VOCAB, (L,), generator=g)
    ids = torch.where(torch.rand(L, generator=g) < 0.5, motif.repeat(L // 12 + 1)[:L], noise)
    return ids.unsqueeze(0)


def snapshot(model) -> dict[str, tuple[torch.Tensor, bool]]:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_same_model(model, snap) -> None:
    now = dict(model.named_parameters())
    assert sorted(now) == sorted(snap), "parameter names changed (a parametrization left behind?)"
    for name, (value, flag) in snap.items():
        assert torch.equal(now[name].detach(), value), f"{name} changed"
        assert now[name].requires_grad == flag, f"{name}.requires_grad changed"
        assert now[name].grad is None, f"{name}.grad left set"
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def assert_same_state(a, b) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert len(ta) == len(tb) and a.n_tokens == b.n_tokens
    for x, y in zip(ta, tb):
        assert torch.equal(x, y)


def assert_same_delta(a, b) -> None:
    assert a.kind == b.kind and a.scale == b.scale and sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name


# ---------------------------------------------------------------------------------------------
# 1. branch path == reference path


def both_paths(model, ids, cfg, seed=0, perturb_lora=True):
    """Run _branch_losses and _reference_losses on the same step inputs, grads zeroed before each.

    Returns (branch stats, reference stats, branch grads, reference grads, inputs)."""
    gen = torch.Generator().manual_seed(seed)
    with trainable_scope(model, cfg, gen) as scope:
        if perturb_lora and cfg.scope == "lora":  # B = 0 at init would leave A's gradient at 0
            with torch.no_grad():
                for a in scope.lora.values():
                    a.lora_B.copy_(0.05 * torch.randn(a.lora_B.shape, generator=gen))
        x = step_inputs(model, ids, cfg, gen)
        results = []
        for losses in (_branch_losses, _reference_losses):
            for p in scope.params:
                p.grad = None
            stats = losses(model, ids, cfg, x.starts, x.uniforms, x.true, x.h_true, x.groups, _Clock(ids.device))
            grads = [None if p.grad is None else p.grad.clone() for p in scope.params]
            results.append((stats, grads))
    (sb, gb), (sr, gr) = results
    return sb, sr, gb, gr, x


CASES = {
    # id: (L, RefineConfig kwargs)
    "n1-full-cosine-L150": (150, dict(n=1, reward="cosine")),
    "n2-full-hybrid-L171": (171, dict(n=2, reward="hybrid")),
    "n1-full-binary-L128": (128, dict(n=1, reward="binary")),
    "n2-full-ppo-only-L97": (97, dict(n=2, reward="hybrid", sft_coef=0.0, n_chunks=4, edge_margin=8)),
    "n2-lora-cosine-L150": (150, dict(n=2, reward="cosine", scope="lora", lora_rank=4)),
    "n1-lora-hybrid-L150": (150, dict(n=1, reward="hybrid", scope="lora", lora_rank=4,
                                      lora_targets=("q_proj", "v_proj", "gate_proj"))),
    "n2-layers1-hybrid-L150": (150, dict(n=2, reward="hybrid", scope="layers", layers=(1,))),
    "n1-layers0-cosine-L130": (130, dict(n=1, reward="cosine", scope="layers", layers=(0,))),
    # 2*20 + 5 + 8 = 53 tokens: the clamp puts several chunks on the same start
    "n2-short-duplicate-starts-L53": (53, dict(n=2, reward="hybrid")),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_branch_equals_reference(model, case):
    L, kw = CASES[case]
    cfg = RefineConfig(k=5, n_chunks=kw.pop("n_chunks", 8), **kw)
    ids = doc(L, seed=L)
    sb, sr, gb, gr, x = both_paths(model, ids, cfg)

    if case.startswith("n2-short"):
        starts = x.starts.tolist()
        assert len(set(starts)) < len(starts), f"expected duplicate starts, got {starts}"
    assert sb["rollout_tokens"] == sr["rollout_tokens"]
    for key in ("rollout_logp_mean", "ntp_loss", "policy_loss", "reward_mean", "reward_std", "binary_mean",
                "cosine_mean", "exact_match_rate", "advantage_abs_mean", "clip_fraction", "approx_kl"):
        assert sb[key] == pytest.approx(sr[key], rel=VALUE_TOL, abs=VALUE_TOL), key
    assert float(sb["_loss"]) == pytest.approx(float(sr["_loss"]), rel=VALUE_TOL, abs=VALUE_TOL)
    if cfg.reward != "binary":
        assert sb["advantage_abs_mean"] > 0.1, "PPO term would carry no gradient"

    assert len(gb) == len(gr) and len(gb) > 0
    for i, (a, b) in enumerate(zip(gb, gr)):
        assert (a is None) == (b is None), i
        if a is None:
            continue
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"param {i}: {m}")
    assert max(float(g.abs().max()) for g in gb if g is not None) > 1e-3


def test_branch_equals_reference_gated_deltanet():
    """The other supported family (V-first state [B, HV, V, K]) through the same comparison."""
    m = make_model("gated_deltanet")
    cfg = RefineConfig(n=2, reward="hybrid", n_chunks=4, edge_margin=10)
    sb, sr, gb, gr, _ = both_paths(m, doc(100, seed=3), cfg)
    assert sb["rollout_tokens"] == sr["rollout_tokens"]
    assert sb["policy_loss"] == pytest.approx(sr["policy_loss"], rel=VALUE_TOL, abs=VALUE_TOL)
    for a, b in zip(gb, gr):
        torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def both_steps(model, ids, cfg, seed=0):
    """A whole branch step (selecting from its own read) and a whole reference step (selecting
    from a scoring read), from the same generator state, grads zeroed before each.

    Returns (branch stats, reference stats, branch grads, reference grads, branch inputs,
    reference inputs)."""
    gen = torch.Generator().manual_seed(seed)
    with trainable_scope(model, cfg, gen) as scope:
        if cfg.scope == "lora":  # B = 0 at init would leave A's gradient at 0
            with torch.no_grad():
                for a in scope.lora.values():
                    a.lora_B.copy_(0.05 * torch.randn(a.lora_B.shape, generator=gen))
        rng = gen.get_state()
        xb, doc_read = branch_step_inputs(model, ids, cfg, gen)
        sb = _branch_losses(model, ids, cfg, xb.starts, xb.uniforms, xb.true, xb.h_true, xb.groups,
                            _Clock(ids.device), doc_read)
        gb = [None if p.grad is None else p.grad.clone() for p in scope.params]
        for p in scope.params:
            p.grad = None
        gen.set_state(rng)
        xr = step_inputs(model, ids, cfg, gen)
        sr = _reference_losses(model, ids, cfg, xr.starts, xr.uniforms, xr.true, xr.h_true, xr.groups,
                               _Clock(ids.device))
        gr = [None if p.grad is None else p.grad.clone() for p in scope.params]
    return sb, sr, gb, gr, xb, xr


def assert_same_step(sb, sr, gb, gr, xb, xr, cfg) -> None:
    """Same positions, rollouts, rewards, losses and gradients (to fp32 rounding)."""
    assert torch.equal(xb.selection.picked, xr.selection.picked)
    assert torch.equal(xb.starts, xr.starts) and torch.equal(xb.uniforms, xr.uniforms)
    torch.testing.assert_close(xb.score.entropy, xr.score.entropy, rtol=VALUE_TOL, atol=VALUE_TOL)
    torch.testing.assert_close(xb.h_true, xr.h_true, rtol=VALUE_TOL, atol=VALUE_TOL)
    assert xb.score.ntp == pytest.approx(xr.score.ntp, rel=VALUE_TOL)
    assert sb["rollout_tokens"] == sr["rollout_tokens"]
    for key in ("rollout_logp_mean", "ntp_loss", "policy_loss", "reward_mean", "reward_std", "binary_mean",
                "exact_match_rate", "advantage_abs_mean", "clip_fraction", "approx_kl"):
        assert sb[key] == pytest.approx(sr[key], rel=VALUE_TOL, abs=VALUE_TOL), key
    assert float(sb["_loss"]) == pytest.approx(float(sr["_loss"]), rel=VALUE_TOL, abs=VALUE_TOL)
    if cfg.reward != "binary":
        assert sb["advantage_abs_mean"] > 0.1, "PPO term would carry no gradient"
    assert len(gb) == len(gr) and len(gb) > 0
    for i, (a, b) in enumerate(zip(gb, gr)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"param {i}: {m}")
    assert max(float(g.abs().max()) for g in gb if g is not None) > 1e-3


STEP_CASES = {
    # id: (model family, L, RefineConfig kwargs, how the branch step gets its start states)
    "delta-n1-full-cosine-L150": ("delta_net", 150, dict(n=1, reward="cosine"), "traced"),
    "delta-n2-lora-hybrid-L171": ("delta_net", 171, dict(n=2, reward="hybrid", scope="lora", lora_rank=4), "traced"),
    "delta-n2-layers1-hybrid-L130": ("delta_net", 130, dict(n=2, reward="hybrid", scope="layers", layers=(1,)),
                                     "traced"),
    "delta-n2-short-duplicate-starts-L53": ("delta_net", 53, dict(n=2, reward="hybrid"), "traced"),
    "delta-n1-argmax-binary-L128": ("delta_net", 128, dict(n=1, reward="binary", selection="argmax"), "traced"),
    "delta-n2-hybrid-L150-boundaries": ("delta_net", 150, dict(n=2, reward="hybrid"), "boundaries"),
    "gated-n2-hybrid-L100": ("gated_deltanet", 100, dict(n=2, reward="hybrid", n_chunks=4, edge_margin=10),
                             "traced"),
    "gated-n1-lora-cosine-L150": ("gated_deltanet", 150, dict(n=1, reward="cosine", scope="lora", lora_rank=4),
                                  "traced"),
    "gated-n2-cosine-L97-boundaries": ("gated_deltanet", 97, dict(n=2, reward="cosine", n_chunks=4, edge_margin=8),
                                       "boundaries"),
}


@pytest.fixture(scope="module")
def gated_model():
    return make_model("gated_deltanet")


@pytest.mark.parametrize("case", list(STEP_CASES), ids=list(STEP_CASES))
def test_branch_step_equals_reference_step(model, gated_model, case):
    """The exact variant: selecting from the read with gradients changes nothing but the cost."""
    family, L, kw, how = STEP_CASES[case]
    m = model if family == "delta_net" else gated_model
    cfg = RefineConfig(k=5, n_chunks=kw.pop("n_chunks", 8), **kw)
    ids = doc(L, seed=L + 1)
    m.refine_tta_traceable = how == "traced"
    try:
        sb, sr, gb, gr, xb, xr = both_steps(m, ids, cfg)
    finally:
        m.refine_tta_traceable = True
    if "duplicate" in case:
        starts = xb.starts.tolist()
        assert len(set(starts)) < len(starts), f"expected duplicate starts, got {starts}"
    assert_same_step(sb, sr, gb, gr, xb, xr, cfg)


def test_final_read_is_the_scoring_read_without_scores(model):
    ids = doc(130, seed=9)
    ntp, state = final_read(model, ids, segment_tokens=50)
    score, scored_state = score_document(model, ids, segment_tokens=50)
    assert ntp == pytest.approx(score.ntp, rel=1e-6)
    assert_same_state(state, scored_state)
    torch.testing.assert_close(state.next_logits, read_document(model, ids).next_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_rollout_helpers_match_reference_per_token(model, n):
    """Per rollout: tokens, old log-probs, hidden states and all three rewards agree."""
    L = 150
    ids = doc(L, seed=11)
    cfg = RefineConfig(n=n)
    gen = torch.Generator().manual_seed(5)
    x = step_inputs(model, ids, cfg, gen)
    starts = x.starts.tolist()
    with torch.no_grad():
        seg = ro.read_segmented(model, ids, sorted(set(starts)))
        states = ro.branch_states(seg.states, starts, n)
        tokens, logp_old = ro.sample_rollouts(model, states, x.uniforms, cfg.temperature)
        _, h_roll = ro.branch_forward(model, states, tokens, cfg.temperature)
    rows = [r for r in starts for _ in range(n)]
    ref_tokens = torch.stack([ro.reference_sample(model, ids, r, x.uniforms[i], 1.0) for i, r in enumerate(rows)])
    with torch.no_grad():
        ref = [ro.reference_score(model, ids, r, ref_tokens[i], 1.0) for i, r in enumerate(rows)]
    ref_logp = torch.stack([o[0] for o in ref])
    ref_h = torch.stack([o[1] for o in ref])
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logp_old, ref_logp, rtol=VALUE_TOL, atol=VALUE_TOL)
    torch.testing.assert_close(h_roll, ref_h, rtol=VALUE_TOL, atol=VALUE_TOL)
    for kind in ("binary", "cosine", "hybrid"):
        rb = obj.sequence_rewards(kind, tokens, x.true, h_roll, x.h_true)["reward"]
        rr = obj.sequence_rewards(kind, ref_tokens, x.true, ref_h, x.h_true)["reward"]
        torch.testing.assert_close(rb, rr, rtol=VALUE_TOL, atol=VALUE_TOL)
    # NTP of the segmented read == NTP of one read
    torch.testing.assert_close(seg.ntp_sum / seg.n_targets, obj.ntp_loss(read(model, ids).logits, ids),
                               rtol=VALUE_TOL, atol=VALUE_TOL)


def test_batched_rollouts_equal_one_at_a_time(model):
    ids = doc(150, seed=2)
    gen = torch.Generator().manual_seed(1)
    x = step_inputs(model, ids, RefineConfig(n=3), gen)
    with torch.no_grad():
        seg = ro.read_segmented(model, ids, sorted(set(x.starts.tolist())))
        states = ro.branch_states(seg.states, x.starts.tolist(), 3)
    tokens, logp = ro.sample_rollouts(model, states, x.uniforms, 1.0)
    assert tokens.shape == (24, 5)
    for i in range(tokens.shape[0]):
        t_i, l_i = ro.sample_rollouts(model, states.select(i), x.uniforms[i:i + 1], 1.0)
        assert torch.equal(t_i[0], tokens[i]), i
        torch.testing.assert_close(l_i[0], logp[i], rtol=VALUE_TOL, atol=VALUE_TOL)
    # and the rows differ: the n rollouts of one prefix are not copies
    assert len({tuple(t) for t in tokens.tolist()}) > 12


def test_sample_with_uniform_inverse_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]]))
    for u, want in ((0.0, 0), (0.05, 0), (0.15, 1), (0.29, 1), (0.31, 2), (0.999, 2)):
        assert int(ro.sample_with_uniform(logits, torch.tensor([u]), 1.0)) == want, u


def test_sample_with_uniform_never_draws_a_zero_probability_token():
    inf = float("inf")
    logits = torch.tensor([[-inf, 0.0, 0.0, -inf], [-200.0, 0.0, 0.0, -200.0], [0.0, 1.0, -inf, -inf]])
    for u in (0.0, 1e-30, 0.5, 1 - 2**-24, 1.0):
        toks = ro.sample_with_uniform(logits, torch.full((3,), u), 1.0)
        probs = torch.softmax(logits, -1)
        assert (probs.gather(1, toks[:, None]) > 0).all(), (u, toks)
        assert torch.isfinite(ro.token_logprobs(logits, toks, 1.0)).all()


# ---------------------------------------------------------------------------------------------
# 2. isolation and reproducibility

SCOPES = {
    "full": dict(scope="full"),
    "lora": dict(scope="lora", lora_rank=4),
    "layers": dict(scope="layers", layers=(0,)),
}


@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("mode", ["refine", "sft", "none"])
def test_adapt_leaves_base_model_bit_identical(model, scope, mode):
    model.lm_head.weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    try:
        before = snapshot(model)
        cfg = RefineConfig(mode=mode, steps=2, lr=1e-2, **SCOPES[scope])
        res = adapt(model, doc(90), cfg)
        assert_same_model(model, before)
        assert not model.training
        if mode != "none":
            assert res.delta.kind == scope and any(float(t.abs().max()) > 0 for t in res.delta.tensors.values())
    finally:
        model.lm_head.weight.requires_grad_(True)


@pytest.mark.parametrize("scope,path", [("full", "branch"), ("lora", "reference"), ("layers", "branch"),
                                        ("full", "reference")])
def test_cancel_mid_way_restores_base_model(model, scope, path):
    before = snapshot(model)
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) >= 2  # polled before every step: stop before step 2

    seen = []
    with pytest.raises(AdaptCancelled, match="before step 2"):
        adapt(model, doc(90), RefineConfig(steps=3, lr=1e-2, **SCOPES[scope]), path=path,
              on_step=seen.append, should_stop=should_stop)
    assert len(seen) == 1
    assert_same_model(model, before)


def test_error_mid_way_restores_base_model(model):
    before = snapshot(model)

    def boom(stats):
        raise RuntimeError("client went away")

    model.train()  # the caller's train/eval mode comes back too
    try:
        with pytest.raises(RuntimeError, match="client went away"):
            adapt(model, doc(90), RefineConfig(steps=2, lr=1e-2, scope="lora"), on_step=boom)
        assert model.training
    finally:
        model.eval()
    assert_same_model(model, before)


def test_failure_while_attaching_lora_restores_base_model(model, monkeypatch):
    from refine_tta.refine import delta as delta_mod

    before = snapshot(model)
    real, calls = delta_mod.parametrize.register_parametrization, []

    def flaky(module, name, p):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("attach failed")
        return real(module, name, p)

    monkeypatch.setattr(delta_mod.parametrize, "register_parametrization", flaky)
    with pytest.raises(RuntimeError, match="attach failed"):
        adapt(model, doc(90), RefineConfig(steps=1, scope="lora"))
    assert_same_model(model, before)


@pytest.mark.parametrize("scope", ["full", "lora"])
def test_session_independent_of_earlier_adaptations(scope):
    cfg = RefineConfig(steps=2, lr=1e-2, seed=3, **SCOPES[scope])
    doc_a, doc_b = doc(90, seed=1), doc(110, seed=2)
    alone = adapt(make_model(), doc_b, cfg)
    m = make_model()
    torch.manual_seed(1234)  # global RNG state must not matter either
    adapt(m, doc_a, RefineConfig(steps=2, lr=1e-2, seed=9, n=2, **SCOPES[scope]))
    after_a = adapt(m, doc_b, cfg)
    assert_same_delta(alone.delta, after_a.delta)
    assert_same_state(alone.state, after_a.state)


def test_same_seed_same_session_other_seed_differs(model):
    ids = doc(90, seed=4)
    cfg = RefineConfig(steps=2, lr=1e-2, n=2, reward="hybrid", scope="lora", lora_rank=4)
    a = adapt(model, ids, cfg)
    b = adapt(model, ids, cfg)
    assert_same_delta(a.delta, b.delta)
    assert_same_state(a.state, b.state)
    assert [s["positions"] for s in a.stats["steps"]] == [s["positions"] for s in b.stats["steps"]]
    c = adapt(model, ids, RefineConfig(**{**cfg.to_dict(), "seed": 1, "lora_targets": cfg.lora_targets}))
    assert any(not torch.equal(a.delta.tensors[n], c.delta.tensors[n]) for n in a.delta.tensors)


def test_mode_none_is_the_base_reading(model):
    ids = doc(90, seed=5)
    res = adapt(model, ids, RefineConfig(mode="none"))
    assert res.delta.kind == "none" and res.delta.tensors == {} and res.delta.nbytes == 0
    assert res.stats["steps"] == [] and res.stats["total"]["skipped_steps"] == 0
    base = read_document(model, ids)
    assert res.state.n_tokens == base.n_tokens == 90
    for layer_a, layer_b in zip(res.state.layers, base.layers):
        for x, y in zip(layer_a.tensors(), layer_b.tensors()):
            assert torch.equal(x, y)
    # next_logits: lm_head over all positions vs over the last one: same values to rounding
    torch.testing.assert_close(res.state.next_logits, base.next_logits, rtol=1e-6, atol=1e-6)
    t = res.stats["total"]
    assert t["ntp_loss_before"] == t["ntp_loss_after"]


@pytest.mark.parametrize("scope", list(SCOPES))
def test_session_state_is_the_document_read_with_the_delta(model, scope):
    ids = doc(90, seed=6)
    res = adapt(model, ids, RefineConfig(steps=2, lr=1e-2, **SCOPES[scope]))
    with res.delta.applied(model):
        again = read_document(model, ids)
    for layer_a, layer_b in zip(res.state.layers, again.layers):
        for x, y in zip(layer_a.tensors(), layer_b.tensors()):
            assert torch.equal(x, y)
    torch.testing.assert_close(res.state.next_logits, again.next_logits, rtol=1e-6, atol=1e-6)
    base = read_document(model, ids)
    assert not torch.equal(base.layers[-1].recurrent, res.state.layers[-1].recurrent)


# ---------------------------------------------------------------------------------------------
# 3. a non-finite step is skipped


@pytest.mark.parametrize("how", ["nan-grad-hook/branch", "nan-grad-hook/reference", "nan-grad-hook/sft",
                                 "inf-loss/branch"])
def test_non_finite_step_is_skipped(model, how, monkeypatch):
    poison, path = how.split("/")
    mode = "sft" if path == "sft" else "refine"
    path = "branch" if path == "sft" else path
    ids = doc(90, seed=7)
    base = snapshot(model)
    armed = [True]
    after_step: list[dict[str, torch.Tensor]] = []

    def on_step(stats):
        armed[0] = False
        after_step.append({n: p.detach().clone() for n, p in model.named_parameters()})

    handle = None
    if poison == "nan-grad-hook":
        target = model.model.layers[0].attn.k_proj.weight
        handle = target.register_hook(lambda g: torch.full_like(g, float("nan")) if armed[0] else g)
    else:
        real = obj.combined_loss
        monkeypatch.setattr(obj, "combined_loss",
                            lambda *a, **kw: real(*a, **kw) * (float("inf") if armed[0] else 1.0))
    try:
        res = adapt(model, ids, RefineConfig(mode=mode, steps=2, lr=1e-2), path=path, on_step=on_step)
    finally:
        if handle is not None:
            handle.remove()
    steps = res.stats["steps"]
    assert [s["skipped"] for s in steps] == [True, False]
    assert res.stats["total"]["skipped_steps"] == 1
    assert steps[0]["grad_norm"] is None or not math.isfinite(steps[0]["grad_norm"])
    for name, (value, _) in base.items():  # the skipped step changed nothing
        assert torch.equal(after_step[0][name], value), name
    assert any(not torch.equal(after_step[1][n], base[n][0]) for n in base)  # later steps did
    assert all(math.isfinite(s["grad_norm"]) for s in steps[1:])
    json.dumps(res.stats, allow_nan=False)  # strict JSON even with a skipped step
    assert all(torch.isfinite(t).all() for t in res.state.tensors())
    assert all(torch.isfinite(t).all() for t in res.delta.tensors.values())
    out = generate_tokens(model, res.state, [1, 2, 3], TokenSampling(max_new_tokens=4), weights=res.delta)
    assert len(out.tokens) == 4


# ---------------------------------------------------------------------------------------------
# 4. validation


def test_document_too_short_for_its_chunks(model):
    cfg = RefineConfig(n_chunks=8, k=5, edge_margin=20)
    with pytest.raises(ValueError, match=r"has 52 tokens; mode 'refine' needs at least 53 \(8 rollout positions"):
        adapt(model, doc(52), cfg)
    adapt(model, doc(53), RefineConfig(steps=1))  # exactly the minimum works
    with pytest.raises(ValueError, match="needs at least 2"):
        adapt(model, doc(1), RefineConfig(mode="sft"))


def test_bad_arguments_rejected(model):
    with pytest.raises(ValueError, match="k must be >= 1"):
        RefineConfig(k=0)
    with pytest.raises(ValueError, match="path must be one of"):
        adapt(model, doc(90), RefineConfig(), path="fast")
    with pytest.raises(ValueError, match=r"\[1, L\]"):
        adapt(model, doc(90).expand(2, -1), RefineConfig())
    before = snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        adapt(model, doc(90), RefineConfig(scope="layers", layers=(5,)))
    assert_same_model(model, before)


# ---------------------------------------------------------------------------------------------
# 5. statistics

STEP_KEYS = ("positions", "picked_entropy_mean", "document_entropy_mean", "reward_mean", "reward_std",
             "binary_mean", "cosine_mean", "exact_match_rate", "ntp_loss", "policy_loss", "clip_fraction",
             "approx_kl", "grad_norm", "skipped", "tokens_processed", "seconds_by_phase", "peak_memory_mb")


@pytest.mark.parametrize("path", ["branch", "reference"])
def test_statistics(model, path):
    L = 110
    cfg = RefineConfig(steps=2, n=2, reward="hybrid", lr=1e-2)
    seen = []
    res = adapt(model, doc(L, seed=8), cfg, path=path, on_step=seen.append)
    steps, total = res.stats["steps"], res.stats["total"]
    assert len(steps) == 2 and seen == steps
    for i, s in enumerate(steps):
        missing = [k for k in STEP_KEYS if k not in s]
        assert not missing, missing
        assert s["step"] == i + 1 and s["of"] == 2
        assert len(s["positions"]) == cfg.n_chunks
        assert all(type(r) is int and cfg.edge_margin <= r <= L - cfg.edge_margin - cfg.k for r in s["positions"])
        assert s["positions"] == sorted(s["positions"])  # one per chunk, chunks in order
        assert s["skipped"] is False and s["grad_norm"] > 0
        assert 0 <= s["binary_mean"] <= 1 and -1 <= s["cosine_mean"] <= 1 and 0 <= s["exact_match_rate"] <= 1
        assert s["reward_mean"] == pytest.approx(s["binary_mean"] + s["cosine_mean"], abs=1e-5)
        assert s["reward_std"] >= 0 and 0 <= s["clip_fraction"] <= 1
        assert s["picked_entropy_mean"] > 0 and s["document_entropy_mean"] > 0
        assert s["tokens_processed"] >= (2 if path == "reference" else 1) * L + cfg.n_chunks * cfg.n * cfg.k
        # the branch step reads the document once (no scoring read); the reference step scores it first
        phases = {"branch": {"read", "select", "states", "rollout", "branch", "backward", "update"},
                  "reference": {"score", "select", "read", "rollout", "old_logprobs", "backward", "update"}}[path]
        assert set(s["seconds_by_phase"]) == phases
        assert all(v >= 0 for v in s["seconds_by_phase"].values())
        assert s["peak_memory_mb"] > 0
    assert steps[0]["approx_kl"] == pytest.approx(0.0, abs=1e-5)  # one epoch: ratio 1
    for key in ("ntp_loss_before", "ntp_loss_after", "seconds", "skipped_steps"):
        assert key in total
    assert total["skipped_steps"] == 0 and total["steps"] == 2 and total["document_tokens"] == L
    assert total["ntp_loss_before"] == pytest.approx(steps[0]["ntp_loss"], rel=1e-5)
    assert total["ntp_loss_after"] < total["ntp_loss_before"]  # lr 1e-2 on a repetitive document
    assert total["seconds"] >= total["seconds_adapt"] > 0
    assert total["delta_bytes"] == res.delta.nbytes and total["state_bytes"] == res.state.nbytes
    text = json.dumps(res.stats, allow_nan=False)
    assert json.loads(text)["total"]["steps"] == 2


def test_sft_statistics(model):
    res = adapt(model, doc(90), RefineConfig(mode="sft", steps=2, lr=1e-2))
    for s in res.stats["steps"]:
        for key in ("ntp_loss", "grad_norm", "skipped", "tokens_processed", "seconds_by_phase", "peak_memory_mb"):
            assert key in s
    total = res.stats["total"]
    assert total["ntp_loss_after"] < total["ntp_loss_before"]
    json.dumps(res.stats, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# 6. the default model: adaptation makes a stated fact more likely


@pytest.fixture(scope="module")
def default_model():
    # The embedded model ships in the repository: its absence is a failure, not a reason to skip.
    assert (DEFAULT_MODEL / "config.json").is_file() and any(DEFAULT_MODEL.glob("*.safetensors")), DEFAULT_MODEL
    from refine_tta.model import load_model

    return load_model(DEFAULT_MODEL, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def needle_case(default_model):
    """(document ids [1, L], question-prompt ids, value ids) for one fact in held-out prose."""
    from refine_tta.train.corpus import HELDOUT_TEXT_PATH, iter_documents
    from refine_tta.train.needles import filler_window, make_needle_document, question_prompt

    tok = default_model.tokenizer
    rng = random.Random(0)
    filler = filler_window(rng, iter_documents(HELDOUT_TEXT_PATH)[:50], 2400)
    nd = make_needle_document(rng, filler, depth=0.5, target_tokens=420,
                              count_tokens=lambda s: len(tok.encode(s, add_special_tokens=False)))
    doc_ids = tok.encode(nd.context)  # with BOS
    assert 300 <= len(doc_ids) <= 420, len(doc_ids)
    prompt = tok.encode(question_prompt(nd.question), add_special_tokens=False)
    value = tok.encode(nd.completion, add_special_tokens=False)
    return torch.tensor([doc_ids]), prompt, value


def value_nll(model, state, prompt: list[int], value: list[int]) -> float:
    """Mean NLL of the value tokens after the question, read from the document state."""
    ids = torch.tensor([prompt + value])
    with torch.no_grad():
        logits = read(model, ids, state).logits[0]
    pred = logits[len(prompt) - 1:len(prompt) - 1 + len(value)]
    return float(torch.nn.functional.cross_entropy(pred.float(), torch.tensor(value)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["refine", "sft", "none"])
def test_adaptation_lowers_fact_nll_on_default_model(default_model, needle_case, mode):
    model = default_model.model
    ids, prompt, value = needle_case
    before = snapshot(model)
    base_nll = value_nll(model, read_document(model, ids), prompt, value)
    # 2 steps at lr 2e-3 on the whole model: the fact's NLL drops by ~2 nats on early checkpoints
    cfg = RefineConfig(mode=mode, steps=2, lr=2e-3, scope="full", n_chunks=8, k=5, n=1, seed=0)
    res = adapt(model, ids, cfg)
    assert_same_model(model, before)
    with res.delta.applied(model):
        nll = value_nll(model, res.state, prompt, value)
    if mode == "none":
        assert nll == pytest.approx(base_nll, rel=1e-6, abs=1e-6)
    else:
        assert nll < base_nll - min(0.05, 0.1 * base_nll), (base_nll, nll)
        assert res.stats["total"]["ntp_loss_after"] < res.stats["total"]["ntp_loss_before"]
