"""The engine: one worker thread that owns the device and runs every piece of model work.

Callers (the HTTP server, scripts, tests) never touch the model. They submit jobs and get a
:class:`JobHandle` back at once: ``handle.future`` (a ``concurrent.futures.Future``) resolves to
the job's result or its exception, and ``handle.cancel()`` sets a flag the worker checks before
starting the job and, through ``should_stop``, between adaptation steps and generated tokens.

How the worker schedules (:mod:`refine_tta.engine.scheduler`): generations are decoded together
in one batch (:class:`~refine_tta.engine.generations.GenerationBatch`; they join and leave at
token boundaries) on the one model, whose base weights adaptation never writes (its fp32 masters
act only during a step; the batch takes its sessions' deltas off before each step). Adaptations (and
other exclusive jobs) run one at a time, and between two adaptation steps the worker decodes the
pending generations for about as long as a step takes, so a query never waits for a whole
adaptation and adaptations still progress under a stream of queries. Waiting jobs take turns by
client.

Jobs wait in a bounded queue; a full queue raises :class:`QueueFull` immediately (nothing was
done, the caller may retry) with a ``retry_after`` estimated from what is running and waiting.
Input checks that need no model (token counts against :class:`EngineLimits`, impossible
settings, unknown sessions) happen in ``submit_*`` on the caller's thread, so a bad request fails
before it takes a queue slot.

No HTTP, no JSON parsing here: documents and prompts are text, settings are
:class:`~refine_tta.refine.config.RefineConfig` / :class:`~refine_tta.engine.text.SamplingConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from refine_tta.engine.errors import Cancelled, EngineError, InvalidSettings, LimitExceeded, QueueFull, Unavailable
from refine_tta.engine.generations import Finished, GenerationBatch, GenerationRequest
from refine_tta.engine.scheduler import JobQueue, Stopwatch, Timings, retry_after_s
from refine_tta.engine.scoring import TokenScores, score
from refine_tta.engine.sessions import Session, SessionStore
from refine_tta.engine.text import MIN_TEMPERATURE, SamplingConfig, TextCodec
from refine_tta.model.loading import LoadedModel
from refine_tta.model.state import DocumentState
from refine_tta.refine.config import RefineConfig, preset_for_model
from refine_tta.refine.delta import scope_for

log = logging.getLogger(__name__)

ADAPT_STARTED = "started"
"""``on_progress`` event sent once, when the worker starts the adaptation (before step 1):
``{"of": steps, "document_tokens": L, "mode": mode, "queued_s": seconds waited in the queue}``."""
ADAPT_STEP = "progress"
"""``on_progress`` event sent after every step, with the step's statistics (``step``, ``of``, ...)."""

ProgressFn = Callable[[str, dict[str, Any]], None]
"""``on_progress(event, data)``: :data:`ADAPT_STARTED` once, then :data:`ADAPT_STEP` per step."""

AdaptFn = Callable[..., Any]
"""``adapt(model, document_ids [1, L], config, *, start, probe_ids, on_step, should_stop) -> AdaptResult``
(:func:`refine_tta.refine.loop.adapt`)."""

DRIFT_PROBE = Path(__file__).resolve().parent / "data" / "drift_probe.txt"
"""A fixed generic English text (not any document): its NTP loss, base vs adapted, is each
adaptation's *drift* figure."""


@dataclass(frozen=True)
class EngineLimits:
    """What one request may ask for. Token counts include the BOS the tokenizer adds."""

    max_document_tokens: int = 16384
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_steps: int = 64
    queue_size: int = 16
    max_rollout_tokens: int = 8192  # n_chunks * n * k: tokens sampled per REFINE step
    max_lora_rank: int = 256

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineLimits.{f.name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of the engine's counters (totals since start) and gauges (now)."""

    queue_depth: int
    running: int
    adaptations_total: int
    adaptation_steps_total: int
    adaptation_seconds_total: float
    generations_total: int
    generated_tokens_total: int
    generation_seconds_total: float
    decode_steps_total: int
    cancelled_total: int
    failed_total: int
    rejected_total: int
    sessions: int
    sessions_loaded: int
    session_bytes: int
    session_disk_bytes: int


class JobHandle:
    """A submitted job: its ``future`` and a cancel flag. ``cancel()`` is safe from any thread.

    ``cancel(reason)`` with an :class:`EngineError` makes the job end with that error instead of
    :class:`Cancelled` (the engine's shutdown uses :class:`Unavailable`: 503, retry-safe).
    """

    def __init__(self, job: Job):
        self.job = job
        self.future: Future = Future()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._committed = False
        self.reason: EngineError | None = None

    def cancel(self, reason: EngineError | None = None) -> bool:
        """Ask the worker to drop the job (if queued) or stop it at its next check (if running).
        False (and nothing changes) once the job has committed its result (:meth:`commit`)."""
        with self._lock:
            if self._committed:
                return False
            if reason is not None and not self._cancel.is_set():
                self.reason = reason
            self._cancel.set()
            return True

    def commit(self) -> bool:
        """Called by a job just before an effect that cannot be undone (storing a session): True
        if it may go ahead (from then on it cannot be cancelled), False if it was cancelled."""
        with self._lock:
            if self._cancel.is_set():
                return False
            self._committed = True
            return True

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def should_stop(self) -> bool:
        return self._cancel.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """Block until done (for scripts and tests; the server awaits ``future`` instead)."""
        return self.future.result(timeout)


class Job(Protocol):
    """Exclusive work for the worker thread (besides the engine's own :class:`AdaptJob` and
    :class:`GenerateJob`): ``run`` is called on the worker with the engine and the handle."""

    kind: str

    def run(self, engine: Engine, handle: JobHandle) -> Any: ...


@dataclass
class AdaptJob:
    """Adapt to ``document_ids`` (with BOS) and store the result as a session -> :class:`Session`."""

    document_ids: list[int]
    config: RefineConfig
    owner: str | None
    on_progress: ProgressFn | None = None
    base_session: str | None = None  # continue from this session's delta (same owner, same scope)
    kind: str = "adapt"
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)


@dataclass
class GenerateJob:
    """Complete ``prompt_ids`` after a session's document (None: base model, nothing read)
    -> :class:`~refine_tta.engine.text.GenerationResult`."""

    session_id: str | None
    prompt_ids: list[int]
    sampling: SamplingConfig
    owner: str | None
    on_text: Callable[[str, int], None] | None = None
    kind: str = "generate"


@dataclass
class ScoreJob:
    """Score token sequences after a session's document (None: base model, nothing read), in
    batched forward passes (:func:`~refine_tta.engine.scoring.score`) -> ``list[TokenScores]`` in
    the order given."""

    session_id: str | None
    sequences: list[list[int]]
    top_k: int
    owner: str | None
    kind: str = "score"

    def run(self, engine: Engine, handle: JobHandle) -> list[TokenScores]:
        return engine._run_score(self, handle)


def jsonable(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(allow_nan=False)`` accepts: tensors and numpy scalars
    become numbers or lists, non-finite floats become None, tuples become lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    return str(value)


class Engine:
    """Owns ``loaded`` (the model) and the session store; runs all model work on one thread.

    adapt_fn: the adaptation loop (default :func:`refine_tta.refine.loop.adapt`).
    retry_after: the least ``retry_after`` suggested when the queue is full (the estimate from the
    queue's contents is used when it is longer), and the one sent at shutdown.
    max_batch: how many generations decode together at most.
    """

    cancel_wait_s = 2.0  # at shutdown, how long a cancelled running job gets to notice before its client is answered

    def __init__(
        self,
        loaded: LoadedModel,
        sessions: SessionStore,
        limits: EngineLimits = EngineLimits(),
        *,
        adapt_fn: AdaptFn | None = None,
        retry_after: float = 1.0,
        max_batch: int = 32,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.loaded = loaded
        self.sessions = sessions
        self.limits = limits
        self.retry_after = retry_after
        self._adapt_fn = adapt_fn
        self._codec = TextCodec(loaded.tokenizer)
        self.max_batch = max_batch
        self._queue = JobQueue(limits.queue_size, lane_of=lambda h: "generate" if isinstance(h.job, GenerateJob)
                               else "exclusive", owner_of=lambda h: getattr(h.job, "owner", None))
        self._batch: GenerationBatch | None = None  # built on the worker's start (it copies the model)
        self._timings = Timings()
        self._adapt_steps_left: int | None = None  # of the running adaptation (read by submit's estimate)
        self._decoding = 0  # generations in the batch now (published by the worker)
        self._min_tokens_left: int | None = None
        self._lock = threading.Lock()
        self._inflight: set[JobHandle] = set()
        self._running: JobHandle | None = None
        self._accepting = False
        self._shutdown_at: float | None = None
        self._unavailable = Unavailable("the engine is stopped")
        self._thread: threading.Thread | None = None
        self.default_preset = preset_for_model(loaded.fingerprint.architecture, loaded.fingerprint.config_hash)
        self._probe_ids: list[int] | None = None
        self._counters = {"adaptations_total": 0, "adaptation_steps_total": 0, "adaptation_seconds_total": 0.0,
                          "generations_total": 0, "generated_tokens_total": 0, "generation_seconds_total": 0.0,
                          "decode_steps_total": 0,
                          "cancelled_total": 0, "failed_total": 0, "rejected_total": 0}

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        # Generations decode on the same model as adaptations, no copy: an adaptation never writes
        # the base weights (its fp32 masters act on the model only during a step, see
        # refine_tta.refine.delta), and the batch takes its sessions' deltas off (release) before
        # any exclusive job runs and after each decoding slot between adaptation steps.
        self._batch = GenerationBatch(self.loaded.model, self._codec)
        self._accepting = True
        self._thread = threading.Thread(target=self._work, name="refine-tta-worker", daemon=True)
        self._thread.start()
        log.debug("engine started: model %s on %s, limits %s", self.loaded.name, self.loaded.device, self.limits)
        log.debug("default adaptation preset %r (%s)", self.default_preset,
                  "the embedded model" if self.default_preset == "embedded" else "not the embedded model")
        return self

    def begin_shutdown(self, grace_s: float, retry_after: float | None = None) -> None:
        """Stop accepting; end queued jobs now and the running ones (the exclusive job and the
        generations decoding) after ``grace_s`` seconds (if they have not finished by then), each with :class:`Unavailable` (HTTP 503, Retry-After, retry-safe:
        nothing of the job was applied). Returns at once; :meth:`stop` joins the worker."""
        retry_after = self.retry_after if retry_after is None else retry_after
        with self._lock:
            if self._shutdown_at is not None:
                return
            self._shutdown_at = time.monotonic() + grace_s
            self._accepting = False
            self._unavailable = Unavailable("the server is shutting down; nothing of this request was applied; "
                                            "retry it on a running server", retry_after=retry_after)
        self._drain_queue()
        with self._lock:  # what is left in flight is running: the exclusive job and the generations decoding
            running = list(self._inflight)
        log.info("engine shutting down: queue drained, %s", "no job running" if not running else
                 f"{len(running)} running job(s) ({', '.join(sorted({h.job.kind for h in running}))}) have "
                 f"{grace_s:g} s to finish")
        for handle in running:
            threading.Thread(target=self._end_after_grace, args=(handle, grace_s), name="refine-tta-grace",
                             daemon=True).start()

    def _drain_queue(self) -> None:
        """End every queued job with the shutdown error (the worker would drop them anyway)."""
        pending = []
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                break
            if handle is not None:
                pending.append(handle)
        for handle in pending:
            handle.cancel(self._unavailable)
            self._finish(handle, exc=self._unavailable)

    def _end_after_grace(self, handle: JobHandle, grace_s: float) -> None:
        try:
            handle.future.result(timeout=grace_s)
            return
        except Exception:  # finished with an error, or still running after the grace period
            if handle.future.done():
                return
        if not handle.cancel(self._unavailable):
            return  # it is storing its result: let it finish
        log.warning("engine shutting down: cancelling the running %s job after the %g s grace period",
                    handle.job.kind, grace_s)
        try:
            handle.future.result(timeout=self.cancel_wait_s)
        except Exception:
            if not handle.future.done():  # stuck inside one step: answer now; its result is dropped
                log.warning("engine shutting down: the %s job did not stop within %g s; answering its client now",
                            handle.job.kind, self.cancel_wait_s)
                self._finish(handle, exc=self._unavailable)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new jobs, end queued and running ones (Unavailable), join the worker, flush the
        sessions' bookkeeping. Call :meth:`begin_shutdown` first to give the running job time."""
        self.begin_shutdown(0.0)
        with self._lock:
            for handle in self._inflight:
                handle.cancel(self._unavailable)
        self._drain_queue()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine worker did not stop within %s s", timeout)
            self._thread = None
        self.sessions.close()
        log.info("engine stopped")

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------- intake
    @property
    def model_name(self) -> str:
        return self.loaded.name

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._codec.encode(text, add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self._codec.decode(ids)

    def submit_adapt(self, document: str, config: RefineConfig, owner: str | None,
                     on_progress: ProgressFn | None = None, base_session: str | None = None) -> JobHandle:
        """Check and queue an adaptation. The future resolves to the stored :class:`Session`
        (metadata only). ``on_progress(event, data)`` hears :data:`ADAPT_STARTED` when the worker
        starts it, then :data:`ADAPT_STEP` after each step. ``base_session``: continue from that
        session's adapted weights (it must be the owner's and have the same scope).
        Raises LimitExceeded / InvalidSettings / NotFound / StorageFull / QueueFull / Unavailable."""
        limits = self.limits
        if base_session is not None:
            self._check_base(base_session, config, owner)
        if config.steps > limits.max_steps:
            raise LimitExceeded("max_steps", config.steps, limits.max_steps, what="settings.steps")
        if config.mode == "refine" and config.n_chunks * config.n * config.k > limits.max_rollout_tokens:
            raise LimitExceeded("max_rollout_tokens", config.n_chunks * config.n * config.k, limits.max_rollout_tokens,
                                what="settings n_chunks * n * k")
        if config.scope == "lora" and config.lora_rank > limits.max_lora_rank:
            raise LimitExceeded("max_lora_rank", config.lora_rank, limits.max_lora_rank, what="settings.lora_rank")
        # (seeds are range-checked by RefineConfig and SamplingConfig themselves)
        if config.mode == "refine" and config.temperature < MIN_TEMPERATURE:
            raise InvalidSettings(f"settings.temperature must be at least {MIN_TEMPERATURE}, got {config.temperature}")
        if not document:
            raise InvalidSettings("document is empty")
        ids = self.encode(document, add_special_tokens=True)
        if len(ids) > self.limits.max_document_tokens:
            raise LimitExceeded("max_document_tokens", len(ids), self.limits.max_document_tokens,
                                what="document tokens")
        try:
            config.validate_document(len(ids))
        except ValueError as exc:
            raise InvalidSettings(str(exc)) from None
        self.sessions.check_room()  # StorageFull before spending the device on it
        return self.submit(AdaptJob(ids, config, owner, on_progress, base_session))

    def _check_base(self, base_session: str, config: RefineConfig, owner: str | None) -> None:
        """NotFound for a session that is not the owner's; InvalidSettings for another scope."""
        base = self.sessions.info(base_session, owner)
        try:
            base_scope = scope_for(RefineConfig.from_dict(base.settings)).describe()
        except ValueError as exc:
            raise InvalidSettings(f"base_session {base_session!r} has unusable settings: {exc}") from None
        if base_scope != scope_for(config).describe():
            raise InvalidSettings(f"base_session {base_session!r} was adapted with scope {base_scope}; this "
                                  f"adaptation's scope is {scope_for(config).describe()}: they must be equal")

    @property
    def eos_token_id(self) -> int | None:
        return self._codec.eos_token_id

    def special_tokens(self) -> dict[str, str | None]:
        """The tokenizer's special tokens as text (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``)."""
        tokenizer = self.loaded.tokenizer
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        return {name: value if isinstance(value := getattr(tokenizer, name, None), str) else None for name in names}

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1 (the model's embedding rows)."""
        return int(self.loaded.model.get_input_embeddings().weight.shape[0])

    def prompt_ids(self, session_id: str | None, prompt: str | list[int]) -> list[int]:
        """A prompt as the ids the model reads, checked against ``max_prompt_tokens``.

        Text is encoded with BOS for the base model (``session_id`` None) and without it after a
        session's document. Token ids are taken as given (no BOS added), each checked in range."""
        if isinstance(prompt, str):
            ids = self.encode(prompt, add_special_tokens=session_id is None)
        else:
            ids = self._checked_ids(prompt)
        if len(ids) > self.limits.max_prompt_tokens:
            raise LimitExceeded("max_prompt_tokens", len(ids), self.limits.max_prompt_tokens, what="prompt tokens")
        return ids

    def _checked_ids(self, ids: list[int]) -> list[int]:
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidSettings(f"token id {bad[0]!r} is out of range [0, {self.vocab_size})")
        return list(ids)

    def submit_generate(self, session_id: str | None, prompt: str | list[int], sampling: SamplingConfig,
                        owner: str | None, on_text: Callable[[str, int], None] | None = None) -> JobHandle:
        """Check and queue a generation. ``session_id`` None = the base model with nothing read
        (a text prompt is read from scratch, with BOS); otherwise the prompt continues the session's
        document. ``prompt``: text, or token ids taken as given (:meth:`prompt_ids`). The future
        resolves to a :class:`GenerationResult`."""
        if sampling.max_new_tokens > self.limits.max_new_tokens:
            raise LimitExceeded("max_new_tokens", sampling.max_new_tokens, self.limits.max_new_tokens,
                                what="max_tokens")
        if session_id is not None:
            self.sessions.info(session_id, owner)  # NotFound now rather than after the queue
        ids = self.prompt_ids(session_id, prompt)
        if not ids and session_id is None:
            raise InvalidSettings("the prompt is empty and there is no document to continue")
        return self.submit(GenerateJob(session_id, ids, sampling, owner, on_text))

    def submit_score(self, session_id: str | None, sequences: list[list[int]], top_k: int,
                     owner: str | None) -> JobHandle:
        """Check and queue the scoring of token sequences (a prompt, or a prompt and its completion:
        each at most ``max_prompt_tokens + max_new_tokens`` ids) after a session's document or from
        nothing (base model); one queue slot for all of them. The future resolves to
        ``list[TokenScores]``."""
        if session_id is not None:
            self.sessions.info(session_id, owner)
        if not 0 <= top_k <= self.vocab_size:
            raise InvalidSettings(f"top_k must be in [0, {self.vocab_size}], got {top_k}")
        if not sequences or any(not ids for ids in sequences):
            raise InvalidSettings("nothing to score: every sequence needs at least one token")
        longest = self.limits.max_prompt_tokens + self.limits.max_new_tokens
        for ids in sequences:
            self._checked_ids(ids)
            if len(ids) > longest:
                raise LimitExceeded("max_prompt_tokens", len(ids), longest,
                                    what="prompt and completion tokens (max_prompt_tokens + max_new_tokens)")
        return self.submit(ScoreJob(session_id, [list(ids) for ids in sequences], top_k, owner))

    def submit(self, job: Job) -> JobHandle:
        """Queue any job; raises QueueFull when the queue is full, Unavailable when stopped."""
        handle = JobHandle(job)
        with self._lock:
            if not self._accepting:
                if self._shutdown_at is not None:
                    raise self._unavailable
                raise Unavailable("the engine is not running")
            try:
                self._queue.put_nowait(handle)
            except queue.Full:
                self._counters["rejected_total"] += 1
                raise QueueFull(self.limits.queue_size, self.retry_after_estimate()) from None
            self._inflight.add(handle)
        return handle

    def retry_after_estimate(self) -> float:
        """Seconds until the full queue is expected to have room (at least ``retry_after``)."""
        return retry_after_s(timings=self._timings, waiting_exclusive=self._queue.waiting("exclusive"),
                             waiting_generate=self._queue.waiting("generate"),
                             adapt_steps_left=self._adapt_steps_left, decoding=self._decoding,
                             batch_room=self.max_batch - self._decoding, min_tokens_left=self._min_tokens_left,
                             floor=self.retry_after)

    # ---------------------------------------------------------------------------------- metrics
    def metrics(self) -> EngineMetrics:
        with self._lock:
            counters = dict(self._counters)
            running = int(self._running is not None) + self._decoding
        return EngineMetrics(queue_depth=self._queue.qsize(), running=running, sessions=len(self.sessions),
                             sessions_loaded=self.sessions.loaded_count, session_bytes=self.sessions.memory_bytes,
                             session_disk_bytes=self.sessions.disk_bytes, **counters)

    def _count(self, **increments: float) -> None:
        with self._lock:
            for name, value in increments.items():
                self._counters[name] += value

    # ----------------------------------------------------------------------------------- worker
    def _work(self) -> None:
        """Start waiting generations, run an exclusive job if one waits (generations are decoded
        between its steps), else decode one token for every running generation, else sleep."""
        try:
            while not self._queue.closed:
                self._admit_generations()
                exclusive = self._queue.take("exclusive")
                if exclusive:
                    self._run_exclusive(exclusive[0])
                elif self._decoding:
                    self._decode_step()
                else:
                    self._queue.wait()
        finally:
            for finished in self._batch.fail_all(Cancelled("the server is shutting down")):
                self._finish_generation(finished)
            self._publish_batch()

    def _run_exclusive(self, handle: JobHandle) -> None:
        if not handle.future.set_running_or_notify_cancel():  # cancelled through the future
            self._finish(handle)
            return
        if handle.cancelled:
            self._finish(handle, exc=handle.reason or Cancelled("cancelled before it started"))
            return
        if self._shutting_down(handle):
            return
        with self._lock:
            self._running = handle
        try:
            job = handle.job
            self._batch.release()  # the job starts from the base model
            result = self._run_adapt(job, handle) if isinstance(job, AdaptJob) else job.run(self, handle)
        except Exception as exc:  # delivered to the caller through the future
            if not isinstance(exc, EngineError):
                log.exception("%s job failed", handle.job.kind)
            if isinstance(exc, Cancelled) and handle.reason is not None:
                exc = handle.reason  # e.g. shutdown: 503, nothing applied
            self._finish(handle, exc=exc)
        else:
            self._finish(handle, result=result)

    def _shutting_down(self, handle: JobHandle) -> bool:
        """True (and the job answered 503) if it was taken off the queue as shutdown began."""
        with self._lock:
            shutting_down = self._shutdown_at is not None
        if shutting_down:
            handle.cancel(self._unavailable)
            self._finish(handle, exc=self._unavailable)
        return shutting_down

    def _admit_generations(self) -> None:
        """Move waiting generations into the batch (prefilling their prompts), as room allows."""
        requests = []
        for handle in self._queue.take("generate", self.max_batch - self._decoding):
            if not handle.future.set_running_or_notify_cancel():
                self._finish(handle)
                continue
            if handle.cancelled:
                self._finish(handle, exc=handle.reason or Cancelled("cancelled before it started"))
                continue
            if self._shutting_down(handle):
                continue
            job: GenerateJob = handle.job
            try:
                state, weights = self._session_memory(job)
            except Exception as exc:  # e.g. NotFound: the session was deleted while the job waited
                if not isinstance(exc, EngineError):
                    log.exception("could not load the session of a generation")
                self._finish(handle, exc=exc)
                continue
            requests.append(GenerationRequest(handle, state, weights, job.prompt_ids, job.sampling, job.on_text,
                                              handle.should_stop))
        if requests:
            try:
                self._batch.admit(requests)
            except Exception as exc:  # nothing of these joined the batch
                log.exception("prefilling %d generations failed", len(requests))
                for r in requests:
                    self._finish(r.key, exc=exc)
        self._publish_batch()

    def _session_memory(self, job: GenerateJob | ScoreJob) -> tuple[DocumentState, Any]:
        """The state to continue from and the weights to decode with (None: the base model)."""
        if job.session_id is None:
            return DocumentState.empty(), None
        session = self.sessions.get(job.session_id, job.owner)
        delta = session.delta
        return session.state, (delta if delta is not None and delta.tensors else None)

    def _decode_step(self) -> None:
        """One token for every running generation; those that ended are answered."""
        t = time.perf_counter()
        try:
            finished = self._batch.step()
        except Exception as exc:  # delivered to every running generation; the worker carries on
            log.exception("a decoding step failed; ending the %d running generations", self._decoding)
            finished = self._batch.fail_all(exc)
        self._timings.observe_decode_step(time.perf_counter() - t)
        self._count(decode_steps_total=1)
        for f in finished:
            self._finish_generation(f)
        self._publish_batch()

    def _decode_for(self, seconds: float) -> None:
        """Decode waiting and running generations for about ``seconds`` (or until none is left)."""
        deadline = time.perf_counter() + seconds
        while True:
            self._admit_generations()
            if not self._decoding:
                return
            self._decode_step()
            if time.perf_counter() >= deadline:
                return

    def _publish_batch(self) -> None:
        """What other threads may read about the batch (for metrics and Retry-After)."""
        self._decoding = len(self._batch)
        self._min_tokens_left = self._batch.min_tokens_left()

    def _finish_generation(self, f: Finished) -> None:
        self._count(generations_total=1, generated_tokens_total=f.tokens, generation_seconds_total=f.seconds)
        exc = f.error
        if isinstance(exc, Cancelled) and f.key.reason is not None:
            exc = f.key.reason  # e.g. shutdown: 503, nothing applied
        self._finish(f.key, result=f.result, exc=exc)

    def _finish(self, handle: JobHandle, result: Any = None, exc: BaseException | None = None) -> None:
        with self._lock:
            if handle.future.done() and not handle.future.cancelled():  # answered already (shutdown)
                self._inflight.discard(handle)
                if self._running is handle:
                    self._running = None
                return
            self._inflight.discard(handle)
            if self._running is handle:
                self._running = None
            if isinstance(exc, Cancelled) or handle.future.cancelled() or (exc is not None and exc is handle.reason):
                self._counters["cancelled_total"] += 1
                log.info("%s job cancelled: %s", handle.job.kind, exc or "cancelled through its future")
            elif exc is not None:
                self._counters["failed_total"] += 1
        try:
            if exc is not None:
                handle.future.set_exception(exc)
            elif not handle.future.cancelled():
                handle.future.set_result(result)
        except InvalidStateError:  # already cancelled through the future: nobody is waiting
            pass

    @staticmethod
    def _guarded(callback: Callable[..., None] | None, what: str) -> Callable[..., None] | None:
        """A callback whose exceptions are logged, never allowed to break the model work."""
        if callback is None:
            return None

        def call(*args: Any) -> None:
            try:
                callback(*args)
            except Exception:
                log.exception("%s callback failed", what)

        return call

    def _adapt(self) -> AdaptFn:
        if self._adapt_fn is None:
            from refine_tta.refine.loop import adapt

            self._adapt_fn = adapt
        return self._adapt_fn

    def _run_adapt(self, job: AdaptJob, handle: JobHandle) -> Session:
        from refine_tta.refine.loop import AdaptCancelled

        adapt = self._adapt()
        on_progress = self._guarded(job.on_progress, "progress")
        t0 = time.perf_counter()

        def on_step(step: dict[str, Any]) -> None:
            self._count(adaptation_steps_total=1)
            self._adapt_steps_left = max(0, job.config.steps - int(step.get("step", 0)))
            if on_progress is not None:
                on_progress(ADAPT_STEP, jsonable(step))

        if on_progress is not None:  # before step 1, which may take long: the caller can show progress now
            on_progress(ADAPT_STARTED, {"of": job.config.steps, "document_tokens": len(job.document_ids),
                                        "mode": job.config.mode, "queued_s": round(t0 - job.submitted_at, 3)})

        watch = Stopwatch()

        def between_steps() -> bool:
            """Polled before every step and after the last: decode pending generations for about
            one step's time (the step's own duration is measured from here to the next call)."""
            step_s = watch.lap()
            if step_s is not None:
                self._timings.observe_adapt_step(step_s)
            self._decode_for(self._timings.adapt_step_s)
            self._batch.release()  # the next step trains over the base model, not a session's delta
            watch.lap()
            return handle.should_stop()

        ids = torch.tensor([job.document_ids], dtype=torch.long, device=self.loaded.device)
        start = None
        if job.base_session is not None:
            start = self.sessions.get(job.base_session, job.owner).delta
        probe = torch.tensor([self._drift_probe()], dtype=torch.long, device=self.loaded.device)
        try:
            self._adapt_steps_left = job.config.steps
            result = adapt(self.loaded.model, ids, job.config, start=start, probe_ids=probe, on_step=on_step,
                           should_stop=between_steps)
        except AdaptCancelled as exc:
            raise Cancelled("adaptation cancelled") from exc
        except ValueError as exc:  # model-dependent settings, e.g. layers out of range, unknown lora targets
            raise InvalidSettings(str(exc)) from exc
        finally:
            self._adapt_steps_left = None
            self._count(adaptation_seconds_total=time.perf_counter() - t0)
        if not handle.commit():  # cancelled after the last step: do not store what nobody will see
            raise Cancelled("adaptation cancelled")
        stats = jsonable(result.stats)
        stats["total"]["base_session"] = job.base_session
        session = Session.create(job.owner, job.config.to_dict(), stats, len(job.document_ids),
                                 result.state.detach(), result.delta)
        stored = self.sessions.put(session)
        self._count(adaptations_total=1)
        log.info("adapted %d tokens -> %s (%d state + %d delta bytes) in %.2f s", len(job.document_ids), stored.id,
                 stored.state_bytes, stored.delta_bytes, time.perf_counter() - t0)
        return stored

    def _drift_probe(self) -> list[int]:
        """The drift text's token ids (with BOS), encoded once."""
        if self._probe_ids is None:
            self._probe_ids = self.encode(DRIFT_PROBE.read_text(encoding="utf-8"), add_special_tokens=True)
        return self._probe_ids

    def _run_score(self, job: ScoreJob, handle: JobHandle) -> list[TokenScores]:
        """An exclusive job on the one model (no adaptation runs meanwhile; the generation batch
        took its sessions' deltas off before it started)."""
        state, weights = self._session_memory(job)
        return score(self.loaded.model, state if state is not None else DocumentState.empty(), weights,
                     job.sequences, job.top_k, self.vocab_size, handle.should_stop)
