"""Mixed precision: fp32 master tensors for a bf16 model, and terms beside the frozen weights.

* bf16 model (a small random model cast to bf16), lr 1e-6, 4 steps: >= 95% of the trainable
  entries change in the fp32 masters, and the logit change they make on a probe text is within
  10% (relative L2) of the change made by the same adaptation run in fp32 on the same weights.
  Both changes are read in fp32: a read in bf16 cannot resolve them (they are ~1e-3 of the
  logits, under bf16's 2^-8 resolution), see docs/adaptation.md.
* the optimizer only ever steps fp32 tensors; the bf16 base model is bit-identical afterwards.
* a delta below a bf16 weight's resolution still reaches a layer's output (term beside W),
  whereas adding it into the weight would lose it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from refine_tta.model.runtime import read
from refine_tta.refine.config import RefineConfig
from refine_tta.refine.delta import ParameterDelta, scope_for
from refine_tta.refine.loop import adapt
from test_refine_loop import assert_same_model, doc, make_model, snapshot

SCOPES = {
    "full": dict(scope="full"),
    "projections": dict(scope="projections"),
    "lora-r8": dict(scope="lora", lora_rank=8),
    "layers1": dict(scope="layers", layers=(1,)),
}


@pytest.fixture(scope="module")
def twins():
    """The same weights as a bf16 model and as an fp32 model (the bf16 values, widened)."""
    bf16 = make_model().to(torch.bfloat16)
    return bf16, copy.deepcopy(bf16).float()


def probe_logits(model, probe, delta: ParameterDelta | None = None) -> torch.Tensor:
    with torch.no_grad():
        if delta is None:
            return read(model, probe).logits.float()
        with delta.applied(model):
            return read(model, probe).logits.float()


@pytest.mark.parametrize("scope", list(SCOPES))
def test_bf16_adaptation_matches_fp32_through_fp32_masters(twins, scope, monkeypatch):
    bf16, fp32 = twins
    cfg = RefineConfig(steps=4, lr=1e-6, n=2, reward="hybrid", seed=5, **SCOPES[scope])
    ids, probe = doc(400, seed=11), doc(100, seed=12)

    stepped: list[torch.dtype] = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        stepped.extend(p.dtype for g in self.param_groups for p in g["params"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    before = snapshot(bf16)
    low = adapt(bf16, ids, cfg)
    assert_same_model(bf16, before)
    assert stepped and set(stepped) == {torch.float32}
    high = adapt(fp32, ids, cfg)

    start = scope_for(cfg).new_delta(bf16, torch.Generator().manual_seed(cfg.seed))
    changed = sum(int((low.delta.tensors[n] != t).sum()) for n, t in start.tensors.items())
    total = sum(t.numel() for t in start.tensors.values())
    assert changed / total >= 0.95, f"only {changed / total:.3f} of the master entries changed"
    assert all(t.dtype == torch.float32 for t in low.delta.tensors.values())

    base = probe_logits(fp32, probe)
    want = probe_logits(fp32, probe, high.delta) - base
    got = probe_logits(fp32, probe, low.delta) - base
    rel = float((got - want).norm() / want.norm())
    print(f"\n{scope}: {changed / total:.4f} of the master entries changed (bf16, lr 1e-6, 4 steps); "
          f"probe logit change vs fp32's: {rel:.4f} relative L2")  # the figures (pytest -s)
    assert float(want.norm()) > 0
    assert rel <= 0.10, f"bf16-trained change differs from fp32's by {rel:.3f} (relative L2)"


def test_a_delta_below_bf16_resolution_reaches_the_output():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    sign = torch.randint(0, 2, (32, 64), generator=g) * 2 - 1
    with torch.no_grad():  # |w| in [0.07, 0.12): bf16 spacing 2^-11, so |d| = 2e-4 < half of it
        linear.weight.copy_(sign * (0.07 + 0.05 * torch.rand(32, 64, generator=g)))
    model = torch.nn.Sequential(linear)
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    # a gradient-like update (outer product with an input) adds up coherently along x
    d = 2e-4 * torch.outer(torch.randn(32, generator=g).sign(), x[0].float().sign())
    folded = (linear.weight.float() + d).to(torch.bfloat16)
    assert torch.equal(folded, linear.weight)  # adding it into the weight loses all of it

    from refine_tta.refine import delta as delta_mod

    monkey_called = frozenset({"0"})
    delta_mod._CALLED[model] = monkey_called
    delta = ParameterDelta({"kind": "projections", "targets": ["0"]}, {"0.weight": d})
    base = model(x)
    with delta.applied(model):
        out = model(x)
    assert torch.equal(model(x), base)  # removed on exit
    expect = (base.float() + F.linear(x, d.to(torch.bfloat16)).float()).to(torch.bfloat16)
    assert torch.equal(out, expect)
    assert not torch.equal(out, base)


def test_embedding_delta_keeps_the_padding_row_frozen_like_the_module():
    """nn.Embedding(padding_idx=p) gives row p no gradient from lookups; neither may its delta."""
    from refine_tta.refine import delta as delta_mod

    emb = torch.nn.Embedding(10, 4, padding_idx=0)
    model = torch.nn.Sequential(emb)
    delta_mod._CALLED[model] = frozenset({"0"})
    d = torch.zeros(10, 4, requires_grad=True)
    with delta_mod.attached(model, {"kind": "full"}, {"0.weight": d}):
        model(torch.tensor([[0, 3, 0, 5]])).sum().backward()
    assert float(d.grad[0].abs().sum()) == 0 and float(d.grad[3].abs().sum()) > 0
