"""The demo: the gold answer's score against an independent computation, and the printed format."""

from __future__ import annotations

import re

import pytest
import torch
from server_fixtures import make_tiny_model

from refine_tta.model import load_model, read_document


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=4)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(tiny, device="cpu")


def test_score_answer_equals_one_full_forward(loaded):
    """The answer's log-prob from the document's state == from one forward over everything with
    transformers' own forward (no states), and the rank counts strictly more likely tokens."""
    from refine_tta.demo import make_demo_document, score_answer

    doc = make_demo_document(loaded.tokenizer, seed=3, target_tokens=160)
    model = loaded.model
    state = read_document(model, torch.tensor([doc.context_ids]))
    got = score_answer(model, state, doc.prompt_ids, doc.answer_ids)

    ids = torch.tensor([doc.context_ids + doc.prompt_ids + doc.answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # [T, V]
    start = len(doc.context_ids) + len(doc.prompt_ids)
    expected = sum(float(logp[start - 1 + i, t]) for i, t in enumerate(doc.answer_ids))
    first = logp[start - 1]
    expected_rank = 1 + sum(1 for v in first.tolist() if v > float(first[doc.answer_ids[0]]))
    assert got.logprob == pytest.approx(expected, abs=1e-3)
    assert got.per_token == pytest.approx(-expected / len(doc.answer_ids), abs=1e-3)
    assert got.rank == expected_rank


def test_demo_document_is_fixed_by_its_seed(loaded):
    from refine_tta.demo import make_demo_document

    a, b = (make_demo_document(loaded.tokenizer, seed=5, target_tokens=200) for _ in range(2))
    assert a == b and a.fact in loaded.tokenizer.decode(a.context_ids)
    assert a.answer in a.fact and a != make_demo_document(loaded.tokenizer, seed=6, target_tokens=200)


ROW = re.compile(r"^(none|sft|refine)\s+(\d+)\s+(-?\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+)\s+'(.*)'\s+(right|wrong)\s+"
                 r"(\d+\.\d)\s+(\d+ KiB|\d+\.\d MiB)\s+(\d+ KiB|\d+\.\d MiB)$")
SENTENCE = re.compile(r"^(sft|refine): gold answer log-prob (-?\d+\.\d\d) -> (-?\d+\.\d\d) nats \((up|down) "
                      r"(\d+\.\d\d)\), first-token rank (\d+) -> (\d+); greedy answer (right|wrong); document NTP "
                      r"loss \d+\.\d{3} -> \d+\.\d{3}; 1 step in \d+\.\d s; session .*$")


def test_demo_output_format(tiny, capsys):
    from refine_tta.cli import main

    assert main(["demo", "--model", str(tiny), "--steps", "1", "--tokens", "200", "--max-tokens", "4",
                 "--seed", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"model: {tiny.name}"
    assert re.match(r"^document \(seed 2; every seed is another document, none was picked\): \d+ tokens of held-out "
                    r"prose with 2 facts; asked: .+ \(at \d+% of the document\)$", lines[1]), lines[1]
    assert re.match(r"^question: .+   gold answer: '.+' \(\d+ tokens\)$", lines[2]), lines[2]
    assert lines[3].split() == ["mode", "steps", "gold", "log-prob", "per", "token", "rank", "greedy", "answer",
                                "right?", "adapt", "s", "state", "delta"]
    rows = [ROW.match(line) for line in lines[4:7]]
    assert all(rows), lines[4:7]
    assert [r.group(1) for r in rows] == ["none", "sft", "refine"]
    assert [int(r.group(2)) for r in rows] == [0, 1, 1]
    assert rows[0].group(10) == "0 KiB"  # the base model has no delta
    sentences = [SENTENCE.match(line) for line in lines[7:]]
    assert len(sentences) == 2 and all(sentences), lines[7:]
    for row, sentence in zip(rows[1:], sentences):  # the sentences say what the table says
        assert sentence.group(2) == rows[0].group(3) and sentence.group(3) == row.group(3)
        assert sentence.group(6) == rows[0].group(5) and sentence.group(7) == row.group(5)
        assert sentence.group(8) == row.group(7)
        assert (sentence.group(4) == "up") == (float(row.group(3)) >= float(rows[0].group(3)))
    assert "threads: " in captured.err  # the thread policy is said, on stderr


def test_demo_rejects_unknown_modes_before_loading(capsys):
    from refine_tta.cli import main

    assert main(["demo", "--modes", "refine,magic"]) == 1
    assert capsys.readouterr().err.strip() == ("refine-tta demo: --modes must name some of sft, refine; "
                                               "got 'refine,magic'")
