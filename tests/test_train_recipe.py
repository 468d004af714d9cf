"""The staged training recipe (refine_tta.train.{phases,gates,recipe}): data, loss masks, resume.

Fast: a 2-layer hidden-64 model, a few optimizer steps, the shipped tokenizer and prose only.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from refine_tta.train import corpus
from refine_tta.train.gates import answer_scores, lookup_gate, weighted_runs
from refine_tta.train.phases import (
    ANSWER_END,
    Example,
    PhaseA,
    PhaseB,
    PhaseC,
    TokenCoder,
    copy_example,
    sample_fact_sheet,
)
from refine_tta.train.recipe import (
    Counters,
    Data,
    batch_loss,
    build_model,
    load_checkpoint,
    lr_at,
    make_optimizer,
    make_sampler,
    save_checkpoint,
    train_step,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "refine-tiny-deltanet"


@pytest.fixture(scope="module")
def coder():
    from transformers import AutoTokenizer

    return TokenCoder(AutoTokenizer.from_pretrained(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def data(coder):
    texts = corpus.iter_documents(corpus.TRAIN_TEXT_PATH)[:40]
    stream = []
    for t in texts:
        stream += coder.encode(t) + [coder.eos]
    return Data(coder, texts, texts, stream, stream)


def weighted_text(coder, ex: Example) -> list[str]:
    """The decoded text of each run of weighted tokens."""
    w = torch.tensor(ex.weights)
    return [coder.tok.decode(ex.ids[s:e]) for s, e in weighted_runs(w)]


@pytest.mark.parametrize("length", [64, 128, 256])
def test_fact_sheet_asks_every_fact_and_weights_only_answers(coder, length):
    rng = random.Random(length)
    for _ in range(20):
        sheet = sample_fact_sheet(rng, coder, length)
        ex = coder.fit(*coder.render(sheet.segments()), length)
        assert len(ex.ids) == len(ex.weights) == length
        assert ex.weights[0] == 0.0
        expected = [f" {sheet.needles[j].answer}{ANSWER_END}" for j in sheet.order]
        assert weighted_text(coder, ex) == expected[:len(weighted_text(coder, ex))]
        assert sorted(sheet.order) == list(range(len(sheet.needles)))
        text = coder.tok.decode(ex.ids, skip_special_tokens=True)
        for n in sheet.needles:
            assert n.statement in text


def test_fact_sheets_mostly_fit_without_truncation(coder):
    rng = random.Random(0)
    full = 0
    for _ in range(50):
        sheet = sample_fact_sheet(rng, coder, 256)
        ids, _ = coder.render(sheet.segments())
        full += len(ids) <= 256
    assert full >= 48


def test_removed_fact_keeps_its_question(coder):
    sheet = sample_fact_sheet(random.Random(3), coder, 256)
    assert len(sheet.needles) >= 2
    text = "".join(s.text for s in sheet.segments(skip=0))
    assert sheet.needles[0].statement not in text
    assert f"Question: {sheet.needles[0].question} Answer:" in text
    assert sheet.needles[1].statement in text


def test_copy_example_weights_the_second_copy(coder, data):
    ex = copy_example(random.Random(1), coder, data.stream, 128)
    sep = coder.encode("\n\n")
    half = (128 - 1 - len(sep)) // 2
    assert len(ex.ids) == 128
    assert ex.ids[1:1 + half] == ex.ids[1 + half + len(sep):1 + 2 * half + len(sep)]
    on = [t for t, w in enumerate(ex.weights) if w > 0]
    assert on[0] == 2 + half + len(sep) and on[-1] == 2 * half + len(sep)
    assert len(on) == half - 1


@pytest.mark.parametrize("phase", ["A", "B", "C"])
def test_phase_batches_have_equal_lengths_and_some_loss(data, phase):
    args = argparse.Namespace(copy_share=0.25)
    sampler = make_sampler(phase, data, args)
    assert isinstance(sampler, {"A": PhaseA, "B": PhaseB, "C": PhaseC}[phase])
    rng = random.Random(5)
    for _ in range(4):
        length, examples = sampler.batch(rng, 0, 4096)
        assert length in sampler.lengths(0)
        assert all(len(e.ids) == len(e.weights) == length for e in examples)
        assert length * len(examples) <= 4096
        assert all(any(w > 0 for w in e.weights) for e in examples)


def test_benchmark_format_batches_weight_the_answer(data):
    sampler = PhaseC(data.coder, data.stream, data.texts, prose_share=0.0)
    _, examples = sampler.batch(random.Random(2), 0, 2048)
    for ex in examples:
        runs = weighted_text(data.coder, ex)
        assert len(runs) == 1 and runs[0].endswith("\n")
        prompt = data.coder.tok.decode(ex.ids, skip_special_tokens=True)
        assert prompt.split("Answer:")[-1].strip() == runs[0].strip()


@pytest.fixture()
def tiny_model(coder):
    tok = coder.tok
    return build_model(len(tok), 64, 2, 2, 0, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_batch_loss_equals_full_head_weighted_mean(tiny_model, data):
    rng = random.Random(0)
    _, examples = PhaseA(data.coder, data.stream).batch(rng, 0, 512)
    loss, n = batch_loss(tiny_model, examples)
    ids = torch.tensor([e.ids for e in examples])
    w = torch.tensor([e.weights for e in examples])[:, 1:]
    with torch.no_grad():
        logits = tiny_model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view_as(w)
    assert n == int((w > 0).sum())
    torch.testing.assert_close(loss.detach(), (ce * w).sum() / w.sum(), rtol=1e-5, atol=1e-5)


def test_answer_scores_match_per_run_reference(tiny_model, coder):
    sheet = sample_fact_sheet(random.Random(9), coder, 128)
    ex = Example(*coder.render(sheet.segments()))
    (runs,) = answer_scores(tiny_model.eval(), [ex], coder.eos)
    ids = torch.tensor([ex.ids])
    with torch.no_grad():
        logits = tiny_model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    ce = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    spans = weighted_runs(torch.tensor(ex.weights[1:]))
    assert len(runs) == len(spans) == len(sheet.needles)
    for (s, e), (loss, n, ok) in zip(spans, runs):
        assert n == e - s
        assert loss == pytest.approx(float(ce[s:e].sum()), rel=1e-5)
        assert ok == bool((logits[s:e].argmax(-1) == ids[0, 1 + s:1 + e]).all())


def test_lookup_gate_of_untrained_model_is_near_zero(tiny_model, coder):
    res = lookup_gate(tiny_model, coder, length=128, n_docs=6)
    assert res.exact_match == 0.0
    assert abs(res.gap) < 0.5
    assert tiny_model.training


def test_lr_warms_up_then_stays_constant():
    assert lr_at(0, 1e-3, 1000) == pytest.approx(1e-6)
    assert lr_at(499, 1e-3, 1000) == pytest.approx(5e-4)
    assert lr_at(1000, 1e-3, 1000) == lr_at(10**9, 1e-3, 1000) == 1e-3


def _run(model, opt, sampler, rng, counters, steps):
    args = argparse.Namespace(lr=1e-3, warmup_tokens=1000, tokens_per_step=512)
    return [train_step(model, opt, sampler, rng, counters, args)["loss"] for _ in range(steps)]


def test_resume_from_checkpoint_is_exact(coder, data, tmp_path):
    tok = coder.tok
    shape = argparse.Namespace(hidden=64, layers=2, heads=2)

    def fresh():
        m = build_model(len(tok), 64, 2, 2, 0, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        return m, make_optimizer(m, 1e-3, 0.1)

    sampler = PhaseA(data.coder, data.stream)
    model, opt = fresh()
    rng, counters = random.Random(0), Counters()
    straight = _run(model, opt, sampler, rng, counters, 4)

    model2, opt2 = fresh()
    rng2, counters2 = random.Random(0), Counters()
    first = _run(model2, opt2, sampler, rng2, counters2, 2)
    save_checkpoint(tmp_path / "checkpoint.pt", model2, opt2, rng2, counters2, shape)
    model3, opt3 = fresh()
    rng3, counters3 = load_checkpoint(tmp_path / "checkpoint.pt", model3, opt3)
    second = _run(model3, opt3, sampler, rng3, counters3, 2)

    assert first + second == straight
    assert counters3.tokens == counters.tokens and counters3.step == 4
    for (name, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), name


def test_runtime_never_imports_training_code():
    import subprocess
    import sys

    code = ("import sys\n"
            "import refine_tta, refine_tta.model, refine_tta.refine, refine_tta.engine\n"
            "import server.app, server.routes, server.runtime, server.cli\n"
            "bad = [m for m in sys.modules if m.startswith('refine_tta.train')]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
