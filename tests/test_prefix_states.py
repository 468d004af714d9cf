"""The state after any prefix of one read with gradients (refine_tta.model.trace / runtime).

* kernel: ``state_within_chunk`` / ``traced_state`` == the recurrent delta rule run on the prefix,
  at every position of awkward lengths (T = 1, 63, 64, 65, 130), gated and not, values and gradients.
* model: ``read_keeping_states(...).prefixes.states_at(p)`` == the state of ``read(x[0:p])``, on
  DeltaNet and Gated DeltaNet, traced (torch backend) and by boundaries + re-read (any model): every
  tensor of the state, and the parameter gradients of a loss computed from those states.

Tolerances: the same fp32 sums in a different order (chunked vs token by token, one read vs a
read cut at p): 1e-5 on values of size ~1; kernel gradients to 1e-4 of their largest magnitude,
model gradients rtol 1e-4 / atol 1e-6 (as tests/test_refine_loop.py).
"""

from __future__ import annotations

import pytest
import torch

from refine_tta.kernels.delta_rule import delta_rule_chunked, delta_rule_recurrent, traced_state
from refine_tta.model.runtime import read, read_keeping_states
from refine_tta.model.trace import supports_trace
from test_refine_loop import doc, make_model

TOL = 1e-5


def _inputs(T: int, gated: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, H, K, V = 2, 2, 16, 12
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    gate = -torch.rand(B, T, H, generator=g) * 0.3 if gated else None
    S0 = torch.randn(B, H, K, V, generator=g) * 0.1
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, beta, gate, S0)]


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_traced_state_equals_recurrence_at_every_position(T, gated):
    q, k, v, beta, g, S0 = _inputs(T, gated, seed=T)
    trace = []
    delta_rule_chunked(q, k, v, beta, g, initial_state=S0, trace=trace)
    assert [c.start for c in trace] == list(range(0, T, 64))
    for p in range(T + 1):
        got = traced_state(trace, p)
        _, want = delta_rule_recurrent(q[:, :p], k[:, :p], v[:, :p], beta[:, :p],
                                       None if g is None else g[:, :p], initial_state=S0)
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL, msg=lambda m: f"p={p}: {m}")
    # gradients of a prefix state reach every input it depends on (not q), as the recurrence's do
    p = max(1, T - 3)
    inputs = [t for t in (k, v, beta, g, S0) if t is not None]
    w = torch.randn(traced_state(trace, p).shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((traced_state(trace, p) * w).sum(), inputs)
    _, want_state = delta_rule_recurrent(q[:, :p], k[:, :p], v[:, :p], beta[:, :p],
                                         None if g is None else g[:, :p], initial_state=S0)
    want = torch.autograd.grad((want_state * w).sum(), inputs)
    for a, b in zip(got, want):  # as tests/test_kernels.py: 1e-4 of the largest magnitude
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_traced_state_rejects_positions_outside_the_read():
    q, k, v, beta, g, S0 = _inputs(10, False)
    trace = []
    delta_rule_chunked(q, k, v, beta, initial_state=S0, trace=trace)
    with pytest.raises(ValueError, match="outside the traced read of 10 tokens"):
        traced_state(trace, 11)


FAMILIES = ["delta_net", "gated_deltanet"]
POSITIONS = [1, 2, 3, 4, 5, 63, 64, 65, 100, 128, 149, 150, 64]  # around chunks/windows, repeats, the end


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return make_model(request.param)


@pytest.mark.parametrize("how", ["traced", "boundaries"])
def test_states_at_equal_reading_each_prefix(family_model, how):
    model, ids = family_model, doc(150, seed=1)
    assert supports_trace(model)
    if how == "boundaries":
        model.refine_tta_traceable = False  # the path of models the torch kernels cannot trace
    try:
        kept = read_keeping_states(model, ids, every=32)
        got = kept.prefixes.states_at(POSITIONS)
        reread = sum(p % 32 for p in set(POSITIONS) if p != 150)  # the end is a boundary too
        assert kept.prefixes.tokens_read == (0 if how == "traced" else reread)
    finally:
        model.refine_tta_traceable = True
    full = read(model, ids)
    torch.testing.assert_close(kept.logits, full.logits, rtol=TOL, atol=TOL)
    torch.testing.assert_close(kept.hidden, full.hidden, rtol=TOL, atol=TOL)
    for x, y in zip(kept.state.tensors(), full.state.tensors()):
        torch.testing.assert_close(x, y, rtol=TOL, atol=TOL)
    assert got.batch_size == len(POSITIONS)
    for i, p in enumerate(POSITIONS):
        want = read(model, ids[:, :p]).state
        row = got.select(i)
        assert len(row.layers) == len(want.layers)
        for x, y in zip(row.tensors(), want.tensors()):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, rtol=TOL, atol=TOL, msg=lambda m: f"p={p}: {m}")


def test_states_at_carry_the_prefix_gradient(family_model):
    """d(loss of a branch read from the states)/d(params) == the same through re-read prefixes."""
    model, ids = family_model, doc(130, seed=2)
    positions = [7, 64, 90]
    branch = torch.tensor([[3, 4], [5, 6], [7, 8]])
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(states):
        out = read(model, branch, states)
        return out.logits.float().square().mean() + states.next_logits.square().mean()

    kept = read_keeping_states(model, ids)
    got = torch.autograd.grad(loss_of(kept.prefixes.states_at(positions)), params, allow_unused=True)
    from refine_tta.model.state import DocumentState

    want_states = DocumentState.stack([read(model, ids[:, :p]).state for p in positions])
    want = torch.autograd.grad(loss_of(want_states), params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(a.abs().max()) for a in got if a is not None) > 1e-3


def test_states_at_rejects_bad_positions(family_model):
    kept = read_keeping_states(family_model, doc(40))
    for bad in ([], [0], [41]):
        with pytest.raises(ValueError, match=r"positions must be a non-empty list in \[1, 40\]"):
            kept.prefixes.states_at(bad)
