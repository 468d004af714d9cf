"""The text layer: incremental detokenization and stop strings, checked against decoding everything at once.

The tokenizer is the shipped model's (byte-level BPE: single tokens can be parts of a UTF-8
character). Stop strings are checked on hand-made pieces and through a real decode.
"""

from __future__ import annotations

import random

import pytest
import torch
from server_fixtures import TOKENIZER_DIR

from refine_tta.engine.text import IncrementalDetokenizer, SamplingConfig, StopMatcher, TextCodec, TextStream, generate_text
from refine_tta.model import TokenSampling, generate_tokens, prepare_model, read_document
from refine_tta.model.loading import register_fla_models

TEXTS = ["The keeper counted forty-one vessels.", "naïve café — déjà vu, Ærø, 東京タワー 🗼🌊 ok", "🙂" * 5 + " end",
         "a\n\nb  c\t", ""]


@pytest.fixture(scope="module")
def codec():
    from transformers import AutoTokenizer

    return TextCodec(AutoTokenizer.from_pretrained(TOKENIZER_DIR))


def pieces_of(ids: list[int], decode) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(decode)
    pieces = [detok.push(t) for t in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_pieces_add_up_to_the_whole_decode(codec, text):
    ids = codec.encode(text, add_special_tokens=False)
    pieces, rest = pieces_of(ids, codec.decode)
    assert "".join(pieces) + rest == codec.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), "no piece shows half a character"
    assert rest == ""


def test_split_characters_are_held_back(codec):
    ids = codec.encode("🗼", add_special_tokens=False)
    assert len(ids) > 1, "the shipped tokenizer splits this emoji across tokens"
    pieces, rest = pieces_of(ids, codec.decode)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🗼" and rest == ""
    pieces, rest = pieces_of(ids[:-1], codec.decode)  # ends mid-character: flushed as U+FFFD, like decode
    assert "".join(pieces) == "" and rest == codec.decode(ids[:-1]) and "\ufffd" in rest


def test_random_ids_add_up_and_decode_a_bounded_window(codec):
    """Arbitrary ids (invalid byte runs included): same text as one decode, and each step decodes only
    a few tokens rather than the whole completion (no O(n^2) re-decoding)."""
    rng = random.Random(0)
    vocab = 8192  # the shipped tokenizer's
    for trial in range(20):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 200))]
        windows: list[int] = []

        def decode(chunk: list[int]) -> str:
            windows.append(len(chunk))
            return codec.decode(chunk)

        pieces, rest = pieces_of(ids, decode)
        assert "".join(pieces) + rest == codec.decode(ids), f"trial {trial}"
    text_ids = codec.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    windows.clear()
    pieces_of(text_ids, decode)
    assert len(text_ids) > 300 and max(windows) <= 8


@pytest.mark.parametrize("pieces, stops, expected", [
    (["hello wor", "ld\nnext"], ("\n",), "hello world"),
    (["ab", "c", "d"], ("cd",), "ab"),
    (["xa", "a", "b"], ("aab",), "x"),
    (["aa", "ac"], ("aab",), "aaac"),
    (["one END two", " STOP"], ("STOP", "END"), "one "),
    (["no stop here"], ("zz",), "no stop here"),
    (["St", "o"], ("Stop",), "Sto"),
], ids=["newline", "split", "overlap", "false-start", "earliest", "none", "prefix-at-end"])
def test_stop_matcher(pieces, stops, expected):
    matcher = StopMatcher(stops)
    shown = "".join(matcher.push(p) for p in pieces) + matcher.flush()
    assert shown == expected
    assert matcher.stopped == any(s in "".join(pieces) for s in stops)


def test_stop_matcher_never_shows_a_stop_prefix_it_takes_back():
    matcher = StopMatcher(("\n\nQ:",))
    assert matcher.push("answer\n") == "answer"
    assert matcher.push("\n") == ""
    assert matcher.push("Q") == ""
    assert matcher.push(":") == "" and matcher.stopped


def test_sampling_config_validation():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(seed=2**64),
                dict(stop=("",))):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    assert SamplingConfig(stop=["a"]).stop == ("a",)
    assert SamplingConfig().tokens(0).stop_token_ids == {0}
    assert SamplingConfig(stop_at_eos=False).tokens(0).stop_token_ids == frozenset()


# --- through a model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(codec):
    register_fla_models()
    from fla.models import DeltaNetConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(DeltaNetConfig(hidden_size=64, num_heads=2, num_hidden_layers=2,
                                                            vocab_size=8192))
    prepare_model(model, torch.device("cpu"))
    return model


def test_stop_string_cuts_the_text(model, codec):
    state = read_document(model, torch.tensor([codec.encode("The keeper wrote in his ledger.", True)]))
    prompt = codec.encode(" He", add_special_tokens=False)
    free = generate_text(model, state, prompt, SamplingConfig(max_new_tokens=10, stop_at_eos=False), codec)
    assert free.finish_reason == "length" and free.text == codec.decode(free.tokens)
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    cut = free.text.find(stop)
    pieces = []
    stopped = generate_text(model, state, prompt, SamplingConfig(max_new_tokens=10, stop=(stop,), stop_at_eos=False),
                            codec, on_text=lambda piece, _: pieces.append(piece))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:cut] and stop not in stopped.text
    assert stopped.tokens == free.tokens[:len(stopped.tokens)]
    assert codec.decode(stopped.tokens).startswith(stopped.text + stop)
    assert "".join(pieces) == stopped.text, "streamed pieces add up to the final text"


def test_text_stream_equals_decoding_the_tokens(model, codec):
    decoded = generate_tokens(model, None, [0, 5, 9], TokenSampling(max_new_tokens=40, temperature=1.0, seed=4))
    stream = TextStream(codec.decode)
    text = "".join(stream.push(t) for t in decoded.tokens) + stream.close()
    assert text == stream.text == codec.decode(decoded.tokens)
    assert stream.result(decoded).finish_reason == "length"
