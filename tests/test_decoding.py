"""Batched decoding (continuous batching) gives every sequence exactly the tokens of decoding it alone.

The reference is :func:`generate_tokens` on one sequence (a batch of one), itself checked against
transformers' ``generate`` in test_runtime.py. Sequences differ in document length, prompt length
(including none), sampling (greedy, sampled with their own seeds, nucleus), length limit, stop
tokens and weights (base model or one of two deltas); they join and leave mid-batch and are
cancelled. Tiny random models of both supported families on the CPU (torch) backend.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from refine_tta.model import BatchDecoder, DocumentState, TokenSampling, generate_tokens, prepare_model, read_document
from refine_tta.model.loading import register_fla_models, weights_hash

VOCAB = 128


def build(model_type: str) -> torch.nn.Module:
    register_fla_models()
    from fla.models import DeltaNetConfig, GatedDeltaNetConfig
    from transformers import AutoModelForCausalLM

    if model_type == "delta_net":
        config = DeltaNetConfig(hidden_size=64, num_heads=2, num_hidden_layers=2, vocab_size=VOCAB)
    else:
        config = GatedDeltaNetConfig(hidden_size=64, num_heads=2, head_dim=32, num_hidden_layers=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    prepare_model(model, torch.device("cpu"))
    return model


@pytest.fixture(scope="module", params=["delta_net", "gated_deltanet"])
def model(request):
    return build(request.param)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass
class Delta:
    """A test stand-in for an adaptation's delta: adds fixed noise to some parameters while applied."""

    tensors: dict[str, torch.Tensor]

    @classmethod
    def random(cls, model: torch.nn.Module, seed: int, scale: float = 0.05) -> Delta:
        gen = torch.Generator().manual_seed(seed)
        chosen = [n for n, _ in model.named_parameters()][::3]
        params = dict(model.named_parameters())
        return cls({n: scale * torch.randn(params[n].shape, generator=gen) for n in chosen})

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.tensors}
        with torch.no_grad():
            for n, d in self.tensors.items():
                params[n].add_(d)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in saved.items():
                    params[n].copy_(p)


@dataclass
class Request:
    key: str
    state: DocumentState | None
    prompt: list[int]
    sampling: TokenSampling
    weights: Delta | None = None

    def alone(self, model) -> list[int]:
        out = generate_tokens(model, self.state, self.prompt, self.sampling, self.weights)
        return out.tokens, out.finish_reason


SAMPLINGS = [
    TokenSampling(max_new_tokens=12),
    TokenSampling(max_new_tokens=9, temperature=1.0, seed=5),
    TokenSampling(max_new_tokens=14, temperature=0.7, top_p=0.8, seed=6),
    TokenSampling(max_new_tokens=5, temperature=1.3, seed=7),
    TokenSampling(max_new_tokens=11, temperature=1.0, seed=8, stop_token_ids={3, 17, 29, 41, 77, 90}),
]


def requests(model, n: int, deltas: list[Delta | None] | None = None) -> list[Request]:
    """n different sequences: documents of 20..(20 + 13 n) tokens (one none), prompts of 0..4 tokens."""
    out = []
    for i in range(n):
        state = None if i == 2 else read_document(model, torch.tensor([ids(20 + 13 * i, seed=100 + i)]))
        prompt = ids(i % 5 if state is not None else 3, seed=200 + i)
        weights = deltas[i % len(deltas)] if deltas else None
        out.append(Request(f"r{i}", state, prompt, SAMPLINGS[i % len(SAMPLINGS)], weights))
    return out


def run_batched(model, schedule: dict[int, list[Request]], cancel: dict[int, str] | None = None):
    """Decode with one BatchDecoder: schedule[step] joins before that step, cancel[step] leaves
    before it. Returns key -> (tokens, finish_reason) and the decoder."""
    decoder = BatchDecoder(model)
    seqs = {}
    step = 0
    while step <= max(schedule) or len(decoder):
        for r in schedule.get(step, []):
            seqs[r.key] = decoder.add(r.key, r.state, r.prompt, r.sampling, r.weights)
        if cancel and step in cancel:
            decoder.finish(cancel[step], "cancelled")
        if len(decoder):
            decoder.step()
        step += 1
    return {k: (s.tokens, s.finish_reason) for k, s in seqs.items()}, decoder


@pytest.mark.parametrize("n", [1, 3, 8], ids=lambda n: f"N{n}")
def test_batched_equals_alone(model, n):
    reqs = requests(model, n)
    alone = {r.key: r.alone(model) for r in reqs}
    decoder = BatchDecoder(model)
    seqs = {s.key: s for s in decoder.add_many([(r.key, r.state, r.prompt, r.sampling, r.weights) for r in reqs])}
    forwards_before, steps = decoder.forwards, 0
    while len(decoder):
        assert decoder.n_groups == 1, "sequences with the same weights decode as one batch"
        decoder.step()
        steps += 1
    batched = {k: (s.tokens, s.finish_reason) for k, s in seqs.items()}
    assert batched == alone
    assert {f for _, f in alone.values()} >= ({"length"} if n < 5 else {"length", "eos"})
    assert decoder.forwards - forwards_before <= steps, "one forward per token for the whole batch"


def test_joining_and_leaving_mid_batch(model):
    reqs = requests(model, 8)
    alone = {r.key: r.alone(model) for r in reqs}
    schedule = {0: reqs[:2], 2: reqs[2:5], 3: [reqs[5]], 7: reqs[6:]}
    batched, _ = run_batched(model, schedule)
    assert batched == alone


def test_sessions_with_different_deltas(model):
    base = weights_hash(model)
    deltas = [None, Delta.random(model, 1), Delta.random(model, 2)]
    reqs = requests(model, 7, deltas)
    alone = {r.key: r.alone(model) for r in reqs}
    assert weights_hash(model) == base
    assert len({tuple(t) for t, _ in alone.values()}) == len(alone)
    decoder = BatchDecoder(model)
    decoder.add_many([(r.key, r.state, r.prompt, r.sampling, r.weights) for r in reqs[:4]])
    assert decoder.n_groups == 3, "one batch per set of weights"
    batched, _ = run_batched(model, {0: reqs[:4], 2: reqs[4:]})
    assert batched == alone
    assert weights_hash(model) == base, "the base weights are back once the batch is empty"


def test_cancelling_one_leaves_the_others_untouched(model):
    reqs = requests(model, 4)
    reqs = [Request(r.key, r.state, r.prompt, TokenSampling(12, r.sampling.temperature, r.sampling.top_p,
                                                            r.sampling.seed)) for r in reqs]
    alone = {r.key: r.alone(model) for r in reqs}
    batched, _ = run_batched(model, {0: reqs}, cancel={4: "r1"})
    tokens, finish = batched.pop("r1")
    assert finish == "cancelled" and tokens == alone["r1"][0][:4]
    assert batched == {k: v for k, v in alone.items() if k != "r1"}


def test_prompts_of_one_length_are_prefilled_together(model):
    reqs = requests(model, 8)
    same = [Request(r.key, r.state, ids(4, seed=300 + i), r.sampling) for i, r in enumerate(reqs) if r.state]
    alone = {r.key: r.alone(model) for r in same}
    decoder = BatchDecoder(model)
    seqs = decoder.add_many([(r.key, r.state, r.prompt, r.sampling, r.weights) for r in same])
    assert decoder.forwards == 1
    while len(decoder):
        decoder.step()
    assert {s.key: (s.tokens, s.finish_reason) for s in seqs} == alone


def test_bad_requests(model):
    decoder = BatchDecoder(model)
    with pytest.raises(ValueError, match="nothing to continue from"):
        decoder.add("a", None, [], TokenSampling())
    state = read_document(model, torch.tensor([ids(10, 1), ids(10, 2)]))
    with pytest.raises(ValueError, match="batch 1"):
        decoder.add("a", state, [1], TokenSampling())
    decoder.add("a", None, [1], TokenSampling())
    with pytest.raises(ValueError, match="unique"):
        decoder.add("a", None, [2], TokenSampling())
    assert decoder.finish("nobody") is None
