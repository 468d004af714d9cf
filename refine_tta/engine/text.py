"""The text layer: the only place that turns text into token ids and token ids back into text.

Below it the model tier decodes token ids (:mod:`refine_tta.model.decoding`); here live the
tokenizer (:class:`TextCodec`), the request's text settings (:class:`SamplingConfig`: stop strings
and whether the model's EOS ends a completion), incremental UTF-8-safe detokenization
(:class:`IncrementalDetokenizer`, O(window) per token instead of re-decoding the whole completion)
and stop-string matching (:class:`StopMatcher`), joined per request by :class:`TextStream`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from refine_tta.engine.errors import InvalidSettings
from refine_tta.model.decoding import MIN_TEMPERATURE, DecodeResult, TokenSampling, Weights, generate_tokens
from refine_tta.model.state import DocumentState

__all__ = ["MIN_TEMPERATURE", "GenerationResult", "IncrementalDetokenizer", "SamplingConfig", "StopMatcher",
           "TextCodec", "TextStream", "generate_text"]

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character


@dataclass(frozen=True)
class SamplingConfig:
    """How a completion is sampled and when it ends. temperature 0 = greedy; stop: strings that end
    the completion (not included in its text); stop_at_eos: the model's EOS token ends it."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        self.tokens(None)  # the numeric checks live in TokenSampling
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    def tokens(self, eos_token_id: int | None) -> TokenSampling:
        """The token-level part, for the decoder."""
        stop_ids = frozenset({eos_token_id}) if self.stop_at_eos and eos_token_id is not None else frozenset()
        return TokenSampling(self.max_new_tokens, self.temperature, self.top_p, self.seed, stop_ids)


@dataclass
class GenerationResult:
    """A finished completion. finish_reason: "stop" | "eos" | "length" | "cancelled"."""

    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    ttft_s: float
    tokens_per_s: float
    total_s: float


class TextCodec:
    """Text <-> token ids with the model's tokenizer, safe to call from several threads.

    Uses the Rust ``tokenizers.Tokenizer`` behind a fast tokenizer directly (its encode/decode only
    borrow it immutably; the transformers wrapper reconfigures truncation on every call, which
    fails under concurrent use). ``add_special_tokens=True`` adds BOS exactly as ``tokenizer(text)``.
    """

    def __init__(self, tokenizer: Any):
        if tokenizer is None:
            raise ValueError("the engine needs a model loaded with its tokenizer")
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # only for slow (Python) tokenizers
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates, e.g. from a JSON "\ud800"
            raise InvalidSettings(f"text is not valid Unicode: {exc.reason} at position {exc.start}") from None
        if self._backend is not None:
            return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        with self._lock:
            return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        with self._lock:
            return self._tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self, sampling: SamplingConfig) -> TextStream:
        return TextStream(self.decode, sampling.stop)


class IncrementalDetokenizer:
    """Token ids in, text out, one token at a time, never re-decoding the whole completion.

    Decodes only the window of tokens since the last emitted boundary (plus the tokens before it
    as context, for tokenizers whose pieces depend on their left neighbour), and holds text back
    while it ends in an incomplete UTF-8 character. The pieces it returns, followed by ``flush()``,
    add up to ``decode(all ids)``.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start (context already emitted)
        self._read = 0  # tokens up to here are emitted

    def push(self, token: int) -> str:
        """The new text that ``token`` completes ('' while a character is still incomplete)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD, as ``decode`` does)."""
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return now[len(before):]


class StopMatcher:
    """Finds the earliest stop string in text that arrives in pieces, O(piece + longest stop) each.

    Text that could be the start of a stop string is held back until the next piece decides it, so
    what :meth:`push` returns never has to be taken back.
    """

    def __init__(self, stops: tuple[str, ...]):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = stops
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is now certain to be part of the output (cut before a stop string)."""
        if self.stopped:
            return ""
        window = self._held + piece
        hits = [i for i in (window.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return window[:min(hits)]
        hold = self._longest_stop_prefix_suffix(window)
        self._held = window[len(window) - hold:] if hold else ""
        return window[:len(window) - hold]

    def flush(self) -> str:
        """The held-back text, once no more text will come."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class TextStream:
    """One completion's text: feed it token ids, get the pieces to show; it says when a stop string
    has ended the completion."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self._detok = IncrementalDetokenizer(decode)
        self._stops = StopMatcher(stops)
        self._pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def push(self, token: int) -> str:
        """The text that ``token`` adds to the output ('' if none yet, or after a stop string)."""
        if self.stopped:
            return ""
        piece = self._stops.push(self._detok.push(token))
        self._pieces.append(piece)
        return piece

    def close(self) -> str:
        """The rest of the text once decoding has ended (held-back characters and stop prefixes)."""
        piece = "" if self.stopped else self._stops.push(self._detok.flush()) + self._stops.flush()
        self._pieces.append(piece)
        return piece

    def result(self, decoded: DecodeResult) -> GenerationResult:
        """The completion's result (call after :meth:`close`)."""
        finish = "stop" if self.stopped else decoded.finish_reason
        return GenerationResult(decoded.tokens, self.text, finish, decoded.prompt_tokens, decoded.ttft_s,
                                decoded.tokens_per_s, decoded.total_s)


def generate_text(
    model: torch.nn.Module,
    state: DocumentState | None,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    codec: TextCodec,
    weights: Weights | None = None,
    on_text: Callable[[str, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Complete ``prompt_ids`` after the document held in ``state``, alone (batch 1).

    on_text(piece, token_id) is called with each non-empty piece of new text; should_stop() is
    polled between tokens (True ends with finish_reason "cancelled").
    """
    stream = codec.stream(sampling)

    def on_token(token: int) -> bool:
        piece = stream.push(token)
        if piece and on_text is not None:
            on_text(piece, token)
        return stream.stopped

    decoded = generate_tokens(model, state, prompt_ids, sampling.tokens(codec.eos_token_id), weights,
                              on_token, should_stop)
    rest = stream.close()
    if rest and on_text is not None:
        on_text(rest, decoded.tokens[-1] if decoded.tokens else -1)
    return stream.result(decoded)
