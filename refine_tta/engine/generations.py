"""The generations the worker is decoding now: one :class:`BatchDecoder` plus each request's text.

The decoder (model tier) sees token ids only; here every running request also has its
:class:`TextStream` (detokenization and stop strings) and its ``on_text`` callback. Requests join
at a token boundary (:meth:`GenerationBatch.admit`), every :meth:`GenerationBatch.step` gives each
of them one token, and they leave when they finish, hit a stop string or are cancelled, without
disturbing the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from refine_tta.engine.errors import Cancelled
from refine_tta.engine.text import GenerationResult, SamplingConfig, TextCodec, TextStream
from refine_tta.model.decoding import BatchDecoder, DecodeResult, Sequence
from refine_tta.model.state import DocumentState

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """What a generation needs from the engine: where to continue from and how to sample."""

    key: Hashable  # the job's handle
    state: DocumentState | None
    weights: Any  # the session's delta (None: the base model)
    prompt_ids: list[int]
    sampling: SamplingConfig
    on_text: Callable[[str, int], None] | None
    should_stop: Callable[[], bool]


@dataclass
class Finished:
    """A generation that left the batch: its result, or the error it ended with."""

    key: Hashable
    result: GenerationResult | None
    error: BaseException | None
    tokens: int
    seconds: float


class GenerationBatch:
    """Running generations on ``model`` (the worker's thread only)."""

    def __init__(self, model: torch.nn.Module, codec: TextCodec):
        self.decoder = BatchDecoder(model)
        self.codec = codec
        self._requests: dict[Hashable, tuple[GenerationRequest, TextStream, Sequence]] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def min_tokens_left(self) -> int | None:
        """Tokens until the first running generation reaches its length limit (None if none run)."""
        left = [r.sampling.max_new_tokens - len(seq.tokens) for r, _, seq in self._requests.values()]
        return min(left) if left else None

    def admit(self, requests: list[GenerationRequest]) -> None:
        """Prefill the requests' prompts (batched where lengths allow); they decode from the next step."""
        eos = self.codec.eos_token_id
        seqs = self.decoder.add_many([(r.key, r.state, r.prompt_ids, r.sampling.tokens(eos), r.weights)
                                      for r in requests])
        for r, seq in zip(requests, seqs):
            self._requests[r.key] = (r, self.codec.stream(r.sampling), seq)

    def step(self) -> list[Finished]:
        """Drop cancelled generations, give every other one a token, return those that ended."""
        done = [self._end(k, "cancelled") for k, (r, _, _) in list(self._requests.items()) if r.should_stop()]
        if not self._requests:
            return done
        for event in self.decoder.step():
            request, stream, _ = self._requests[event.key]
            if event.token is not None:
                piece = stream.push(event.token)
                if piece:
                    _call(request.on_text, piece, event.token)
                if stream.stopped and event.finish_reason is None:
                    self.decoder.finish(event.key, "stop")
            if stream.stopped or event.finish_reason is not None:
                done.append(self._end(event.key, None))
        return done

    def fail_all(self, error: BaseException) -> list[Finished]:
        """End every running generation with ``error`` (shutdown, or a failed step) and start over
        with an empty decoder."""
        done = [Finished(k, None, error, len(seq.tokens), seq.total_s) for k, (_, _, seq) in self._requests.items()]
        self._requests.clear()
        try:
            self.decoder.release()
        finally:
            self.decoder = BatchDecoder(self.decoder.model)
        return done

    def release(self) -> None:
        self.decoder.release()

    def _end(self, key: Hashable, reason: str | None) -> Finished:
        request, stream, seq = self._requests.pop(key)
        if reason is not None:
            self.decoder.finish(key, reason)
        decoded = DecodeResult.of(seq)
        if decoded.finish_reason == "cancelled":
            return Finished(key, None, Cancelled("generation cancelled"), len(decoded.tokens), decoded.total_s)
        rest = stream.close()
        if rest:
            _call(request.on_text, rest, decoded.tokens[-1] if decoded.tokens else -1)
        return Finished(key, stream.result(decoded), None, len(decoded.tokens), decoded.total_s)


def _call(callback: Callable[..., None] | None, *args: Any) -> None:
    """A caller's callback; its exceptions are logged, never allowed to break the batch."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("on_text callback failed")
