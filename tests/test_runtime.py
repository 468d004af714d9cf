"""Tier 1: document states round-trip exactly; reading, branching, saving and generating from them.

Tiny random fla models (2 layers, hidden 64) on the CPU (torch) backend, both supported families.
The reference for every state operation is a single pass over the whole token sequence.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from refine_tta.model import (
    DocumentState,
    fingerprint_model,
    TokenSampling,
    generate_tokens,
    prepare_model,
    read,
    read_document,
)
from refine_tta.engine.storage import SessionRecord, SessionRefused, SessionStorage, StoredPart, new_session_id
from refine_tta.model.loading import register_fla_models

VOCAB = 128
ATOL = 1e-5  # logits of these models are O(0.1-1); fp32 path differences are O(1e-7)


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    register_fla_models()
    from fla.models import DeltaNetConfig, GatedDeltaNetConfig
    from transformers import AutoModelForCausalLM

    if model_type == "delta_net":
        config = DeltaNetConfig(hidden_size=64, num_heads=2, num_hidden_layers=2, vocab_size=VOCAB)
    else:
        config = GatedDeltaNetConfig(hidden_size=64, num_heads=2, head_dim=32, num_hidden_layers=2, vocab_size=VOCAB)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    prepare_model(model, torch.device("cpu"))
    return model


@pytest.fixture(scope="module", params=["delta_net", "gated_deltanet"])
def model(request):
    return build(request.param)


def tokens(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max abs logit difference {err:.2e}"


def snapshot(state: DocumentState) -> list[torch.Tensor]:
    return [t.detach().clone() for t in state.tensors()]


def assert_unchanged(state: DocumentState, before: list[torch.Tensor]) -> None:
    after = state.tensors()
    assert len(after) == len(before)
    for i, (a, b) in enumerate(zip(after, before)):
        assert torch.equal(a, b), f"state tensor {i} was modified"


# --- one pass == read in parts == token by token ---------------------------------------------------

@pytest.mark.parametrize("doc_len", [63, 64, 65, 130], ids=lambda n: f"doc{n}")
def test_split_read_equals_one_pass(model, doc_len):
    doc, cont = tokens(doc_len, seed=doc_len), tokens(12, seed=1)
    with torch.no_grad():
        full = read(model, torch.cat([doc, cont], dim=1)).logits
        state = read(model, doc).state
        assert state.n_tokens == doc_len
        assert_logits_close(state.next_logits, full[:, doc_len - 1], "next_logits")
        assert_logits_close(read(model, cont, state).logits, full[:, doc_len:], "doc then continuation")
        step, pieces = state, []
        for t in range(cont.shape[1]):
            out = read(model, cont[:, t:t + 1], step)
            pieces.append(out.logits)
            step = out.state
        assert_logits_close(torch.cat(pieces, dim=1), full[:, doc_len:], "doc then token by token")
        assert step.n_tokens == doc_len + cont.shape[1]


def test_read_document_in_segments_equals_one_read(model):
    doc = tokens(150, seed=2)
    with torch.no_grad():
        whole = read(model, doc).state
    segmented = read_document(model, doc, segment_tokens=50)
    assert segmented.n_tokens == 150
    for a, b in zip(segmented.tensors(), whole.tensors()):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_next_logits_do_not_hold_all_logits(model):
    """The state keeps [B, V] next-token logits, not a view that pins the read's [B, T, V] logits."""
    state = read(model, tokens(40, seed=3)).state
    assert state.next_logits.shape == (1, VOCAB)
    assert state.next_logits.untyped_storage().nbytes() == VOCAB * 4


# --- state operations -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def doc_state(model):
    """(state after a 65-token document, continuation, logits of the continuation read from it)."""
    doc, cont = tokens(65, seed=10), tokens(9, seed=11)
    with torch.no_grad():
        state = read(model, doc).state
        return state, cont, read(model, cont, state).logits


@torch.no_grad()
def test_clone_is_exact_and_independent(model, doc_state):
    state, cont, expected = doc_state
    copy = state.clone()
    assert torch.equal(read(model, cont, copy).logits, expected)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copy.tensors(), state.tensors()))


@torch.no_grad()
def test_expand_gives_identical_rows(model, doc_state):
    state, cont, expected = doc_state
    branches = state.expand(3)
    assert branches.batch_size == 3 and branches.n_tokens == state.n_tokens
    logits = read(model, cont.expand(3, -1), branches).logits
    for row in range(3):
        assert_logits_close(logits[row:row + 1], expected, f"row {row}")
    with pytest.raises(ValueError, match="batch-1"):
        branches.expand(2)


@torch.no_grad()
def test_stack_and_select(model, doc_state):
    state_a, cont, expected_a = doc_state
    state_b = read(model, tokens(70, seed=12)).state
    expected_b = read(model, cont, state_b).logits
    both = DocumentState.stack([state_a, state_b])
    assert both.batch_size == 2
    logits = read(model, cont.expand(2, -1), both).logits
    assert_logits_close(logits[:1], expected_a, "stacked row 0")
    assert_logits_close(logits[1:], expected_b, "stacked row 1")
    assert both.n_tokens == -1, "states of different lengths have no common n_tokens"
    picked = both.select(1)
    assert picked.batch_size == 1
    for a, b in zip(picked.tensors(), state_b.tensors()):
        assert torch.equal(a, b)
    assert_logits_close(read(model, cont, picked).logits, expected_b, "selected row")
    reordered = both.select(torch.tensor([1, 0]))
    assert_logits_close(read(model, cont.expand(2, -1), reordered).logits[1:], expected_a, "reordered")


@torch.no_grad()
def test_save_load_round_trip_is_bit_exact(model, doc_state, tmp_path):
    """state_dict -> session storage (a real file, checksummed) -> from_state_dict: the same tensors
    and the same logits for a continuation."""
    state, cont, expected = doc_state
    storage = SessionStorage(tmp_path, fingerprint_model(model))
    sid = new_session_id()
    storage.write(SessionRecord(sid, {}, {"state": StoredPart(state.state_dict(), {"n_tokens": state.n_tokens})}))
    _, parts = storage.read(sid)
    loaded = DocumentState.from_state_dict(parts["state"].tensors, parts["state"].description["n_tokens"])
    assert loaded.n_tokens == state.n_tokens and len(loaded.layers) == len(state.layers)
    for a, b in zip(loaded.tensors(), state.tensors(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(read(model, cont, loaded).logits, expected)
    assert torch.equal(loaded.next_logits, state.next_logits)
    with pytest.raises(ValueError, match="not a document state"):
        DocumentState.from_state_dict({**parts["state"].tensors, "w": torch.zeros(1)}, 1)
    storage.close()


# --- a read never modifies its input state ----------------------------------------------------------

@pytest.mark.parametrize("n_new", [1, 5, 70], ids=lambda n: f"read{n}")
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_read_does_not_modify_input_state(model, doc_state, n_new, grad):
    state = doc_state[0]
    before = snapshot(state)
    with torch.set_grad_enabled(grad):
        read(model, tokens(n_new, seed=13), state)
    assert_unchanged(state, before)


def test_to_cache_hands_out_copies(doc_state):
    """fla's decode step updates conv caches in place (CUDA, no grad, one token): the cache a read
    gets must never share memory with the state it came from."""
    state = doc_state[0]
    ptrs = {t.data_ptr() for t in state.tensors()}
    cache = state.to_cache()
    for layer in cache:
        for t in (layer["recurrent_state"], *layer["conv_state"]):
            assert t.data_ptr() not in ptrs


def test_generate_does_not_modify_state(model, doc_state):
    state = doc_state[0]
    before = snapshot(state)
    generate_tokens(model, state, [5, 6], TokenSampling(max_new_tokens=4))
    generate_tokens(model, state, [], TokenSampling(max_new_tokens=4, temperature=1.0))
    assert_unchanged(state, before)


# --- gradients through the state --------------------------------------------------------------------

def test_gradients_flow_through_state(model):
    """d(loss on the continuation)/d(params) via read(doc) -> read(cont, state) == one-pass gradient."""
    doc, cont = tokens(70, seed=20), tokens(10, seed=21)
    params = [p for p in model.parameters() if p.requires_grad]

    def cont_loss(next_logits, cont_logits):
        # next_logits predicts cont[0]; the continuation's own logits predict cont[1:].
        logits = torch.cat([next_logits.unsqueeze(1), cont_logits[:, :-1]], dim=1)
        return F.cross_entropy(logits.reshape(-1, VOCAB), cont.reshape(-1))

    full = read(model, torch.cat([doc, cont], dim=1)).logits
    ref = torch.autograd.grad(cont_loss(full[:, 69], full[:, 70:]), params)

    state = read(model, doc).state
    split = torch.autograd.grad(cont_loss(state.next_logits, read(model, cont, state).logits), params)
    for p_ref, p_split in zip(ref, split):
        torch.testing.assert_close(p_split, p_ref, atol=1e-6, rtol=1e-4)

    # The state carries real gradient: cutting it changes the result.
    cut = state.detach()
    detached = torch.autograd.grad(cont_loss(cut.next_logits, read(model, cont, cut).logits), params,
                                   allow_unused=True)
    differs = [not torch.allclose(d if d is not None else torch.zeros_like(r), r, atol=1e-6, rtol=1e-3)
               for d, r in zip(detached, ref)]
    assert sum(differs) > len(params) // 2


# --- persistence: the model fingerprint ----------------------------------------------------------

def test_sessions_of_another_model_are_refused_naming_the_fields(tmp_path):
    """One fingerprint check (ModelFingerprint.mismatch) decides; the error names what differs."""
    a = build("delta_net", seed=0)
    fps = {"a": fingerprint_model(a), "other_weights": fingerprint_model(build("delta_net", seed=1)),
           "other_arch": fingerprint_model(build("gated_deltanet", seed=0))}
    storage = SessionStorage(tmp_path, fps["a"])
    sid = new_session_id()
    with torch.no_grad():
        state = read(a, tokens(20, seed=30)).state
    storage.write(SessionRecord(sid, {}, {"state": StoredPart(state.state_dict(), {"n_tokens": 20})}))
    storage.close()
    same = SessionStorage(tmp_path, fps["a"])
    assert same.read(sid)[1]["state"].description == {"n_tokens": 20}
    same.close()
    other = SessionStorage(tmp_path, fps["other_weights"])
    with pytest.raises(SessionRefused, match="weights_hash") as info:
        other.read(sid)
    assert "config_hash" not in str(info.value) and "architecture" not in str(info.value)
    other.close()
    other = SessionStorage(tmp_path, fps["other_arch"])
    with pytest.raises(SessionRefused) as info:
        other.read(sid)
    for field in ("architecture", "config_hash", "weights_hash"):
        assert field in str(info.value)
    assert (tmp_path / sid).is_dir()  # refused, never removed


# --- generation -----------------------------------------------------------------------------------

def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """transformers' own generate over the whole sequence, cut at the model's eos (which ours drops)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.config.eos_token_id
    return new[:new.index(eos)] if eos in new else new


@pytest.fixture(scope="module")
def gen_setup(model):
    doc, prompt = tokens(70, seed=40), tokens(5, seed=41)
    return read_document(model, doc), doc, prompt[0].tolist()


def test_greedy_generate_equals_transformers_generate(model, gen_setup):
    state, doc, prompt = gen_setup
    eos = model.config.eos_token_id
    cfg = TokenSampling(max_new_tokens=12, stop_token_ids={eos})
    ours = generate_tokens(model, state, prompt, cfg)
    assert ours.tokens == hf_greedy(model, torch.cat([doc, torch.tensor([prompt])], dim=1), 12)
    assert ours.prompt_tokens == len(prompt)
    # An empty prompt continues straight from the document's next-token logits.
    ours_empty = generate_tokens(model, state, [], cfg)
    assert ours_empty.tokens == hf_greedy(model, doc, 12)


def test_sampling_is_seeded(model, gen_setup):
    state, _, prompt = gen_setup
    run = lambda seed: generate_tokens(model, state, prompt, TokenSampling(10, temperature=1.0, seed=seed)).tokens
    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert len(first) == 10


def test_tiny_top_p_is_greedy(model, gen_setup):
    state, _, prompt = gen_setup
    greedy = generate_tokens(model, state, prompt, TokenSampling(max_new_tokens=8)).tokens
    nucleus = generate_tokens(model, state, prompt, TokenSampling(8, temperature=1.0, top_p=1e-6, seed=3)).tokens
    assert nucleus == greedy


def test_on_token_can_stop(model, gen_setup):
    state, _, prompt = gen_setup
    free = generate_tokens(model, state, prompt, TokenSampling(max_new_tokens=10))
    seen: list[int] = []
    stopped = generate_tokens(model, state, prompt, TokenSampling(max_new_tokens=10),
                              on_token=lambda t: seen.append(t) or len(seen) == 4)
    assert stopped.finish_reason == "stop" and stopped.tokens == free.tokens[:4] == seen


@pytest.mark.parametrize("n", [1, 3], ids=lambda n: f"max{n}")
def test_max_new_tokens_is_respected(model, gen_setup, n):
    state, _, prompt = gen_setup
    out = generate_tokens(model, state, prompt, TokenSampling(max_new_tokens=n, temperature=1.0))
    assert len(out.tokens) == n and out.finish_reason == "length"


def test_stop_token_ends_generation(model, gen_setup):
    state, _, prompt = gen_setup
    free = generate_tokens(model, state, prompt, TokenSampling(max_new_tokens=6)).tokens
    out = generate_tokens(model, state, prompt, TokenSampling(max_new_tokens=6, stop_token_ids={free[2]}))
    assert out.finish_reason == "eos"
    assert out.tokens == free[:free.index(free[2])]


def test_should_stop_cancels(model, gen_setup):
    state, _, prompt = gen_setup
    polls = []

    def should_stop():
        polls.append(1)
        return len(polls) >= 3

    out = generate_tokens(model, state, prompt, TokenSampling(max_new_tokens=20), should_stop=should_stop)
    assert out.finish_reason == "cancelled"
    assert len(out.tokens) == 3


def test_document_is_never_reread(model, gen_setup, monkeypatch):
    state, _, prompt = gen_setup
    calls: list[int] = []
    inner = model.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[1])
        return inner(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", counting_forward)
    out = generate_tokens(model, state, prompt, TokenSampling(max_new_tokens=8))
    assert len(out.tokens) == 8
    assert calls[0] == len(prompt) and max(calls) == len(prompt)
    assert sum(calls) <= len(prompt) + len(out.tokens)


def test_token_sampling_validation():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(temperature=1e-40), dict(top_p=0.0),
                dict(top_p=1.5), dict(seed=-1), dict(seed=2**64)):
        with pytest.raises(ValueError):
            TokenSampling(**bad)
