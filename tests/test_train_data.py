"""Training data, needle generator and shipped tokenizer (refine_tta.train.{corpus,needles,tokenizer}).

Fast (a few seconds): uses only files shipped in the repo, never ../shared.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from refine_tta.train import corpus
from refine_tta.train.needles import (
    Needle,
    NeedleDocument,
    filler_window,
    is_correct,
    make_needle_document,
    question_prompt,
    sample_needles,
    synthetic_filler,
    training_example,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "refine-tiny-deltanet"


@pytest.fixture(scope="module")
def hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def count_tokens(hf_tokenizer):
    return lambda s: len(hf_tokenizer.encode(s, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def heldout_docs() -> list[str]:
    return corpus.iter_documents(corpus.HELDOUT_TEXT_PATH)


@pytest.fixture(scope="module")
def train_docs() -> list[str]:
    return corpus.iter_documents(corpus.TRAIN_TEXT_PATH)


# --- needles ----------------------------------------------------------------------------------

def test_needle_document_contains_statements_and_ends_with_question():
    rng = random.Random(0)
    doc = make_needle_document(rng, synthetic_filler(rng, 3000), n_needles=3)
    assert isinstance(doc, NeedleDocument)
    assert len(doc.needles) == 3
    for n in doc.needles:
        assert doc.context.count(n.statement) == 1
        assert n.answer == n.value and n.value in n.statement
    asked = doc.needles[doc.query_index]
    assert (doc.question, doc.answer) == (asked.question, asked.answer)
    assert doc.text == doc.context + question_prompt(asked.question)
    assert doc.text.endswith(f"\n\nQuestion: {asked.question} Answer:")
    assert doc.completion == " " + asked.value
    assert doc.context.find(asked.statement) == pytest.approx(doc.depth * len(doc.context), abs=1)


def test_needles_are_in_document_order_with_distinct_keys_and_values():
    rng = random.Random(1)
    doc = make_needle_document(rng, synthetic_filler(rng, 5000), n_needles=8)
    positions = [doc.context.index(n.statement) for n in doc.needles]
    assert positions == sorted(positions)
    assert len({n.key for n in doc.needles}) == 8 and len({n.value for n in doc.needles}) == 8


def test_needle_is_inserted_at_a_sentence_boundary():
    filler = " ".join(f"Sentence number {i} is here." for i in range(100))
    doc = make_needle_document(random.Random(2), filler, depth=0.5)
    statement = doc.needles[0].statement
    before, after = doc.context.split(statement)
    assert before.endswith("is here. ") and after.startswith(" Sentence number")
    assert doc.depth == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("depth", [0.0, 1.0])
def test_extreme_depths(depth):
    filler = " ".join(f"Sentence {i}." for i in range(50))
    doc = make_needle_document(random.Random(3), filler, depth=depth)
    statement = doc.needles[0].statement
    assert doc.context.startswith(statement) if depth == 0.0 else doc.context.endswith(statement)


def test_given_needles_query_index_and_bad_arguments():
    rng = random.Random(4)
    given = sample_needles(rng, 3)
    doc = make_needle_document(rng, synthetic_filler(rng, 2000), needles=given, query_index=2)
    assert doc.answer == given[2].value and set(doc.needles) == set(given)
    with pytest.raises(ValueError):
        make_needle_document(rng, "Some text.", needles=given, query_index=3)
    with pytest.raises(ValueError):
        make_needle_document(rng, "Some text.", depth=1.5)


def test_target_length_in_tokens(count_tokens, heldout_docs):
    rng = random.Random(5)
    filler = filler_window(rng, heldout_docs, 4000 * 5)
    doc = make_needle_document(rng, filler, n_needles=4, target_tokens=2000, count_tokens=count_tokens)
    n = count_tokens(doc.text)
    assert 1800 <= n <= 2000
    # Without a tokenizer: the character estimate.
    doc = make_needle_document(rng, filler, target_tokens=500, chars_per_token=4.0)
    assert 1600 <= len(doc.text) <= 2000


def test_same_seed_same_output_and_different_seed_differs(heldout_docs):
    def build(seed: int) -> tuple[NeedleDocument, str]:
        rng = random.Random(seed)
        doc = make_needle_document(rng, filler_window(rng, heldout_docs, 3000), n_needles=3, target_tokens=600)
        return doc, training_example(rng, heldout_docs, 400)

    assert build(7) == build(7)
    assert build(7) != build(8)


def test_training_example_asks_and_answers_inserted_needles(count_tokens, train_docs):
    rng = random.Random(9)
    for _ in range(20):
        text = training_example(rng, train_docs, 512, count_tokens)
        assert count_tokens(text) <= 512
        context, qa = text.rsplit("\n\n", 1)
        lines = qa.split("\n")
        assert 1 <= len(lines) <= 4
        for line in lines:
            assert line.startswith("Question: ") and " Answer: " in line
            value = line.rsplit(" Answer: ", 1)[1]
            assert value in context


def test_training_example_with_synthetic_filler_only():
    text = training_example(random.Random(10), [], 300)
    assert "Question: " in text and len(text) <= 300 * 4


def test_is_correct():
    assert is_correct(" blue-harbor-42", "blue-harbor-42")
    assert is_correct(" Blue-Harbor-42.\nQuestion: next", "blue-harbor-42")
    assert is_correct(' "4417093"', "4417093")
    assert not is_correct(" blue-harbor-43", "blue-harbor-42")
    assert not is_correct(" The answer is blue-harbor-42", "blue-harbor-42")
    assert not is_correct("", "blue-harbor-42")


def test_needle_frozen():
    n = sample_needles(random.Random(0), 1)[0]
    assert isinstance(n, Needle)
    with pytest.raises(AttributeError):
        n.value = "x"  # type: ignore[misc]


# --- corpus -----------------------------------------------------------------------------------

def test_unwrap_strips_instruction_question_and_splits_passages():
    prompt = ("Answer the question based on the given passages. Only give me the answer and do not output "
              "any other words.\n\nThe following are given passages.\nPassage 1:\nTitle A\nText  of A.\r\n\n"
              "Passage 2:\nTitle B\nText of B.\n\nAnswer the question based on the given passages. Only give "
              "me the answer and do not output any other words.\n\nQuestion: Who?\nAnswer:")
    assert corpus.unwrap_prompt("hotpotqa", prompt) == ["Title A\nText of A.", "Title B\nText of B."]


def test_unwrap_drops_unanswered_few_shot_query():
    prompt = ("Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
              "Dialogue: A: hi\r\nB: hello\nSummary: They greet.\n\nDialogue: A: bye\nSummary: ")
    assert corpus.unwrap_prompt("samsum", prompt) == ["Dialogue: A: hi\nB: hello\nSummary: They greet."]


def test_documents_round_trip(tmp_path):
    docs = ["first doc\n\nwith a paragraph", "second — ünïcode 🙂", "third"]
    path = tmp_path / "docs.txt.gz"
    corpus.write_documents(docs, path)
    assert corpus.iter_documents(path) == docs


def test_shipped_corpora_are_disjoint(train_docs, heldout_docs):
    assert len(train_docs) > 1000 and len(heldout_docs) > 100
    assert sum(map(len, train_docs)) > 10_000_000 and sum(map(len, heldout_docs)) > 2_500_000

    def paragraph_hashes(docs: list[str]) -> set[str]:
        return {hashlib.sha1(p.encode()).hexdigest() for d in docs for p in d.split("\n") if len(p) >= 100}

    assert not {hashlib.sha1(d.encode()).hexdigest() for d in train_docs} & {
        hashlib.sha1(d.encode()).hexdigest() for d in heldout_docs}
    assert not paragraph_hashes(train_docs) & paragraph_hashes(heldout_docs)
    assert corpus.DOC_SEPARATOR not in "".join(heldout_docs[:50])


# --- tokenizer --------------------------------------------------------------------------------

def _random_unicode(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
             (0x1F300, 0x1F64F), (0x10000, 0x10FFF), (0xE000, 0xE0FF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_tokenizer_round_trips_arbitrary_text(hf_tokenizer):
    rng = random.Random(11)
    texts = [_random_unicode(rng, rng.randint(0, 200)) for _ in range(200)]
    texts += ["", " ", "  leading and trailing  ", "a . b , c", "tab\tnew\nline\r\n", "4417093", "blue-harbor-42"]
    texts += [n.statement + question_prompt(n.question) + " " + n.value for n in sample_needles(rng, 50)]
    for text in texts:
        ids = hf_tokenizer.encode(text, add_special_tokens=False).ids
        assert hf_tokenizer.decode(ids) == text


def test_auto_tokenizer_loads_shipped_files_offline(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert tok.is_fast
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 0
    assert len(tok) == 8192
    text = "Remember: the access code for the north gate is blue-harbor-42 .  Done ,"
    ids = tok(text).input_ids
    assert ids[0] == 0 and 0 not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_digits_are_single_tokens(hf_tokenizer):
    tokens = hf_tokenizer.encode(" 4417093", add_special_tokens=False).tokens
    assert tokens[-7:] == list("4417093")
