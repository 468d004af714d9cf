"""Byte-level BPE tokenizer for the small default model.

Design:

* Byte-level BPE (GPT-2 style): a ``ByteLevel`` pre-tokenizer and decoder over the 256 byte
  symbols, so every string -- any Unicode, control characters, emoji -- encodes without an unknown
  token and ``decode(encode(text)) == text`` exactly. No prefix space is added.
* Digits are split one per token (``Digits(individual_digits=True)`` before ``ByteLevel``), so a
  number of any length is spelled the same way wherever it occurs -- helpful to a tiny model that
  must copy the 4-7 digit values of the needle task.
* One special token, ``<|endoftext|>``, id 0 (``SPECIAL_TOKEN_ID``): it is BOS, EOS, PAD and UNK.
  The post-processor prepends it to every encoding made with ``add_special_tokens=True`` (the
  default of ``tokenizer(text)``), so packing ``tokenizer(doc)`` sequences back to back gives the
  GPT-2 layout ``<|endoftext|> doc1 <|endoftext|> doc2 ...``. Decode with
  ``skip_special_tokens=True`` to get the text back.
* Training text: the shipped training prose (``corpus.TRAIN_TEXT_PATH``) plus generated needle
  statements/questions/answers (``needles.sample_needles``), so the retrieval templates get their
  own merges. Held-out prose is not used: it measures characters per token.

Files written to ``out_dir``: ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``; ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads a fast
tokenizer with bos/eos/pad/unk set, offline. CLI::

    python -m refine_tta.train.tokenizer --out models/refine-tiny-deltanet --vocab-size 8192
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from refine_tta.train.corpus import HELDOUT_TEXT_PATH, TRAIN_TEXT_PATH, iter_documents
from refine_tta.train.needles import qa_line, question_prompt, sample_needles

log = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"
SPECIAL_TOKEN_ID = 0
DEFAULT_VOCAB_SIZE = 8192


def build_untrained_tokenizer() -> Tokenizer:
    """An empty byte-level BPE pipeline: digits split, ByteLevel pre-tokenizer/decoder, BOS template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_bos_template(tok: Tokenizer) -> None:
    """Prepend ``<|endoftext|>`` to every encoding with special tokens (pairs: before each part)."""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKEN} $A",
        pair=f"{SPECIAL_TOKEN} $A {SPECIAL_TOKEN} $B:1",
        special_tokens=[(SPECIAL_TOKEN, SPECIAL_TOKEN_ID)],
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer of ``vocab_size`` ids on ``texts`` and save it to ``out_dir``.

    Id 0 is ``<|endoftext|>``, ids 1-256 the byte alphabet, then the merges. Writes
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (other files in
    ``out_dir``, e.g. model weights, are left alone). Returns the ``tokenizers.Tokenizer``.
    """
    tok = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(SPECIAL_TOKEN) != SPECIAL_TOKEN_ID:
        raise RuntimeError(f"{SPECIAL_TOKEN} got id {tok.token_to_id(SPECIAL_TOKEN)}, expected {SPECIAL_TOKEN_ID}")
    _add_bos_template(tok)
    save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write ``tok`` plus the transformers configs that make ``AutoTokenizer`` load it as a fast
    tokenizer with ``<|endoftext|>`` as bos/eos/pad/unk and no space clean-up on decode."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": SPECIAL_TOKEN, "eos_token": SPECIAL_TOKEN, "pad_token": SPECIAL_TOKEN,
               "unk_token": SPECIAL_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        # transformers' default clean-up turns " ." into "." on decode: that would break round-trips.
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "left",
        "added_tokens_decoder": {
            str(SPECIAL_TOKEN_ID): {"content": SPECIAL_TOKEN, "lstrip": False, "normalized": False,
                                    "rstrip": False, "single_word": False, "special": True},
        },
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def needle_texts(rng: random.Random, n: int) -> Iterator[str]:
    """``n`` short needle snippets in the exact formats of ``needles`` (statement, question prompt,
    answered question line) for the tokenizer's training text."""
    for needle in sample_needles(rng, n):
        yield needle.statement + question_prompt(needle.question) + " " + needle.answer + "\n" + qa_line(needle)


def chars_per_token(tok: Tokenizer, texts: Sequence[str]) -> float:
    """Mean characters per token over ``texts`` (no special tokens)."""
    encodings = tok.encode_batch(list(texts), add_special_tokens=False)
    return sum(map(len, texts)) / max(1, sum(len(e.ids) for e in encodings))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train on the shipped prose + needle snippets, save, report chars/token on held-out prose."""
    parser = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer of the small default model.")
    parser.add_argument("--out", type=Path, required=True, help="directory for tokenizer.json and configs")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--train-text", type=Path, default=TRAIN_TEXT_PATH)
    parser.add_argument("--heldout-text", type=Path, default=HELDOUT_TEXT_PATH)
    parser.add_argument("--needle-snippets", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    docs = iter_documents(args.train_text)
    snippets = list(needle_texts(random.Random(args.seed), args.needle_snippets))
    t0 = time.perf_counter()
    tok = train_tokenizer([*docs, *snippets], args.vocab_size, args.out)
    elapsed = time.perf_counter() - t0
    held = iter_documents(args.heldout_text)
    print(f"trained vocab {tok.get_vocab_size()} on {len(docs)} documents + {len(snippets)} needle snippets "
          f"({sum(map(len, docs)) + sum(map(len, snippets)):,} chars) in {elapsed:.1f} s -> {args.out}")
    print(f"chars/token: held-out prose {chars_per_token(tok, held):.3f}, "
          f"needle snippets {chars_per_token(tok, snippets[:2000]):.3f}")


if __name__ == "__main__":
    main()
