"""OpenAI ``/v1/completions`` on the engine: batches of prompts, ``n``, ``echo`` and ``logprobs``.

A request becomes engine work in three steps: every prompt is turned into token ids (text, or
ids taken as given); one generation job per choice (prompt ``i``, sample ``j`` with seed
``seed + j``) is queued; if log-probabilities are asked for, one scoring job reads every
``prompt + completion`` in a single batched pass (the completion's logprobs are the model's own,
at temperature 1, whatever the sampling was). ``max_tokens: 0`` with ``echo`` only scores the
prompts: what evaluation tools (lm-evaluation-harness ``loglikelihood``) ask for.

What is not implemented is refused with a 400 that names the parameter: non-zero presence or
frequency penalties, a ``logit_bias``, a ``suffix``, ``best_of`` other than ``n``, and streams of
more than one choice or with ``echo``/``logprobs``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from refine_tta.engine import (
    Engine,
    GenerationResult,
    JobHandle,
    NotFound,
    SamplingConfig,
    TokenScores,
    is_session_id,
)
from server.errors import BadParameter, bad_sampling
from server.schemas import (
    MAX_CHOICES,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
)
from server.streaming import wait_for_job

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
DEFAULT_MAX_TOKENS = 16


def session_of(engine: Engine, model: str) -> str | None:
    """The session a ``model`` field names (None: the base model); NotFound for anything else."""
    if model == engine.model_name:
        return None
    if not is_session_id(model):
        raise NotFound(f"model {model!r} not found: use a session id or the base model {engine.model_name!r}")
    return model


def refuse_unsupported(body: CompletionRequest) -> None:
    """400 naming the first option this server cannot honour (never silently ignored)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise BadParameter(f"{name} is not supported (only 0)", name, "unsupported")
    if body.logit_bias:
        raise BadParameter("logit_bias is not supported (only empty)", "logit_bias", "unsupported")
    if body.suffix:
        raise BadParameter("suffix (insertion) is not supported", "suffix", "unsupported")
    if body.best_of is not None and body.best_of != body.n:
        raise BadParameter("best_of must equal n (completions are not re-ranked)", "best_of", "unsupported")
    if body.max_tokens == 0 and not body.echo:
        raise BadParameter("max_tokens 0 needs echo (it only scores the prompt)", "max_tokens", "invalid_value")
    if len(body.prompts) * body.n > MAX_CHOICES:
        raise BadParameter(f"{len(body.prompts)} prompts * n={body.n} choices is over {MAX_CHOICES}", "n",
                           "limit_exceeded")
    if body.stream and (len(body.prompts) > 1 or body.n > 1 or body.echo or body.logprobs is not None):
        raise BadParameter("a stream carries one choice without echo or logprobs: send one prompt, n=1",
                           "stream", "unsupported")


def sampling_of(engine: Engine, body: CompletionRequest, seed: int) -> SamplingConfig:
    max_tokens = body.max_tokens if body.max_tokens is not None else min(DEFAULT_MAX_TOKENS,
                                                                         engine.limits.max_new_tokens)
    try:
        return SamplingConfig(max_new_tokens=max(max_tokens, 1), temperature=body.temperature, top_p=body.top_p,
                              seed=seed, stop=tuple(body.stops))
    except ValueError as exc:
        raise bad_sampling(exc) from None


@dataclass
class Prompt:
    """One prompt of the batch: the ids the model reads, the echoed text, and how many leading ids
    (an added BOS) are context only, never shown."""

    ids: list[int]
    text: str
    hidden: int


def encode_prompts(engine: Engine, session_id: str | None, body: CompletionRequest) -> list[Prompt]:
    """Checks every prompt against the limits (runs in the thread pool)."""
    prompts = []
    for prompt in body.prompts:
        ids = engine.prompt_ids(session_id, prompt)
        if isinstance(prompt, str):
            hidden = len(ids) - len(engine.encode(prompt, add_special_tokens=False))
            prompts.append(Prompt(ids, prompt, max(hidden, 0)))
        else:
            prompts.append(Prompt(ids, engine.decode(ids), 0))
    return prompts


async def generate_all(engine: Engine, request: Request, session_id: str | None, prompts: list[Prompt],
                       body: CompletionRequest, seed: int, owner: str | None) -> list[GenerationResult | None]:
    """Choice ``i * n + j`` = sample j of prompt i (seed + j); None for each when max_tokens is 0.
    Every job is queued before any is awaited; if one cannot be queued, the others are cancelled."""
    if body.max_tokens == 0:
        return [None] * (len(prompts) * body.n)
    if len(prompts) * body.n > engine.limits.queue_size:  # could never all be queued: retrying would not help
        raise BadParameter(f"{len(prompts)} prompts * n={body.n} generations is over the server's queue_size="
                           f"{engine.limits.queue_size} (each choice is one queued generation)", "n", "limit_exceeded")
    handles: list[JobHandle] = []
    try:
        for prompt in prompts:
            for j in range(body.n):
                sampling = sampling_of(engine, body, (seed + j) % 2**63)
                handles.append(await run_in_threadpool(engine.submit_generate, session_id, prompt.ids, sampling,
                                                       owner))
        return list(await asyncio.gather(*(wait_for_job(h, request) for h in handles)))
    finally:
        for handle in handles:
            handle.cancel()  # a no-op for finished jobs


def _covering(engine: Engine, result: GenerationResult) -> list[int]:
    """The generated tokens a choice's logprobs list: all of them plus the EOS that ended the
    completion (as vLLM lists it; it adds no text), or after a stop string the shortest prefix
    whose text covers what was kept (its last token may hold the stop's start)."""
    if result.finish_reason == "eos" and engine.eos_token_id is not None:
        return [*result.tokens, engine.eos_token_id]
    if result.finish_reason != "stop":
        return result.tokens
    for i in range(len(result.tokens) + 1):
        if len(engine.decode(result.tokens[:i])) >= len(result.text):
            return result.tokens[:i]
    return result.tokens


def logprobs_of(engine: Engine, scores: TokenScores, start: int, split: int, split_offset: int,
                top_k: int) -> CompletionLogprobs:
    """The legacy OpenAI logprobs of ``scores.ids[start:]``. Offsets count characters of the
    choice's text: from 0, and from ``split_offset`` at token ``split`` (where the completion starts
    after an echoed prompt, whose text may not be the exact join of its token pieces)."""
    tokens = [engine.decode([t]) for t in scores.ids[start:]]
    offsets, at = [], 0
    for i, piece in enumerate(tokens, start):
        at = split_offset if i == split else at
        offsets.append(at)
        at += len(piece)
    top = [{engine.decode([t]): lp for t, lp in alternatives} for alternatives in scores.top[start:]]
    return CompletionLogprobs(tokens=tokens, token_logprobs=scores.token_logprobs[start:],
                              top_logprobs=top if top_k > 0 else None, text_offset=offsets)


async def score_choices(engine: Engine, request: Request, session_id: str | None, prompts: list[Prompt],
                        results: list[GenerationResult | None], body: CompletionRequest, owner: str | None,
                        ) -> list[CompletionLogprobs]:
    """Logprobs of each choice: its echoed prompt (if echo) and its completion, from one scoring job."""
    top_k = body.logprobs or 0
    sequences, spans = [], []
    for index, result in enumerate(results):
        prompt = prompts[index // body.n]
        completion = [] if result is None else _covering(engine, result)
        sequences.append(prompt.ids + completion)
        start = prompt.hidden if body.echo else len(prompt.ids)
        spans.append((start, len(prompt.ids), len(prompt.text) if body.echo else 0))
    wanted = [i for i, ids in enumerate(sequences) if ids]
    scored: dict[int, TokenScores] = {}
    if wanted:
        handle = await run_in_threadpool(engine.submit_score, session_id, [sequences[i] for i in wanted], top_k,
                                         owner)
        scored = dict(zip(wanted, await wait_for_job(handle, request)))
    empty = TokenScores([], [], [])
    return [logprobs_of(engine, scored.get(i, empty), *span, top_k) for i, span in enumerate(spans)]


def choices(prompts: list[Prompt], results: list[GenerationResult | None], logprobs: list[CompletionLogprobs | None],
            body: CompletionRequest) -> list[CompletionChoice]:
    """Choice ``i`` (prompt ``i // n``): echoed prompt text (if echo) + completion; a scored-only
    prompt (``max_tokens: 0``) finishes with ``length``."""
    out = []
    for i, result in enumerate(results):
        text = (prompts[i // body.n].text if body.echo else "") + ("" if result is None else result.text)
        finish = "length" if result is None else FINISH[result.finish_reason]
        out.append(CompletionChoice(index=i, text=text, logprobs=logprobs[i], finish_reason=finish))
    return out


def new_seed(body: CompletionRequest) -> int:
    return body.seed if body.seed is not None else secrets.randbelow(2**31)


def usage(prompts: list[Prompt], results: list[GenerationResult | None]) -> CompletionUsage:
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion_tokens = sum(len(r.tokens) for r in results if r is not None)
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


class CompletionBodies:
    """The bodies of one OpenAI completion (one id and creation time): whole, or as stream chunks."""

    def __init__(self, model: str, include_usage: bool):
        self.id, self.created, self.model = "cmpl-" + uuid.uuid4().hex, int(time.time()), model
        self.include_usage = include_usage

    def _body(self, choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage, choices=choices)

    def whole(self, prompts: list[Prompt], results: list[GenerationResult | None],
              logprobs: list[CompletionLogprobs | None], body: CompletionRequest) -> Completion:
        return self._body(choices(prompts, results, logprobs, body), usage(prompts, results))

    def chunk(self, text: str, finish: str | None) -> str:
        return self._body([CompletionChoice(text=text, finish_reason=finish)]).model_dump_json(exclude_none=True)

    def last_chunks(self, prompt: Prompt, result: GenerationResult) -> list[dict[str, str]]:
        """The stream's end: the finish reason, the usage chunk (if asked for), ``[DONE]``."""
        events = [{"data": self.chunk("", FINISH[result.finish_reason])}]
        if self.include_usage:
            events.append({"data": self._body([], usage([prompt], [result])).model_dump_json()})
        return events + [{"data": "[DONE]"}]
