"""Decoding from a document state: the document is never re-read.

``generate`` reads the prompt from the state, then decodes token by token with its own loop over
the model's cache (transformers' ``generate`` has changed its cache protocol across versions).
Randomness comes only from an explicit ``torch.Generator`` seeded from the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from refine_tta.model.runtime import read
from refine_tta.model.state import DocumentState


# Below this, logits / T overflows fp32; use 0 for greedy decoding.
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy. stop: strings that end the completion (not included in the text)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" | "eos" | "length" | "cancelled"
    prompt_tokens: int
    ttft_s: float
    tokens_per_s: float
    total_s: float


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] (greedy, or temperature + nucleus sampling)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p  # smallest prefix with mass >= top_p
        keep[..., 0] = True  # the most likely token always stays (a top_p below fp32's range keeps nothing else)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    state: DocumentState | None,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    decode: Callable[[list[int]], str],
    eos_token_id: int | None = None,
    on_text: Callable[[str, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Complete ``prompt_ids`` after the document held in ``state`` (batch 1).

    on_text(piece, token_id) is called for every token with the new text it adds (pieces hold back
    an incomplete UTF-8 character or a possible stop-string prefix until resolved).
    should_stop() is polled between tokens; True ends with finish_reason "cancelled".
    """
    state = state or DocumentState.empty()
    if not prompt_ids and state.next_logits is None:
        raise ValueError("nothing to continue from: empty prompt and an empty state")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if prompt_ids:
        out = read(model, torch.tensor([prompt_ids], device=device), state, only_last_logits=True)
        logits, cache = out.logits[:, -1], out.state.to_cache()
    else:
        logits, cache = state.next_logits, state.to_cache()
    tokens: list[int] = []
    emitted = ""
    finish, ttft = "length", 0.0
    for i in range(cfg.max_new_tokens):
        token = int(sample_next(logits, cfg, generator)[0])
        if i == 0:
            ttft = time.perf_counter() - t0
        if cfg.stop_at_eos and eos_token_id is not None and token == eos_token_id:
            finish = "eos"
            break
        tokens.append(token)
        text = decode(tokens)
        cut = _find_stop(text, cfg.stop)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        if on_text is not None:
            safe = _safe_prefix(text, cfg.stop) if finish != "stop" else text
            if len(safe) > len(emitted):
                on_text(safe[len(emitted):], token)
                emitted = safe
        if finish == "stop":
            break
        if should_stop is not None and should_stop():
            finish = "cancelled"
            break
        if i + 1 < cfg.max_new_tokens:
            hidden = model.model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache,
                                 use_cache=True, return_dict=True)
            cache = hidden.past_key_values
            logits = model.lm_head(hidden.last_hidden_state[:, -1])
    text = decode(tokens)
    cut = _find_stop(text, cfg.stop)
    text = text[:cut] if cut >= 0 else text
    if on_text is not None and len(text) > len(emitted) and text.startswith(emitted):
        on_text(text[len(emitted):], tokens[-1] if tokens else -1)
    total = time.perf_counter() - t0
    decode_s = total - ttft
    tps = (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0
    return GenerationResult(tokens, text, finish, len(prompt_ids), ttft, tps, total)


def _safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Drop a trailing replacement char (partial UTF-8) and any suffix that could start a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold] if hold else text
