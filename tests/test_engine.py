"""Engine: one worker, bounded queue, cancellation, limits, and generation equal to the library's.

A tiny random DeltaNet with the shipped tokenizer; the real REFINE loop."""

from __future__ import annotations

import time

import pytest
import torch
from server_fixtures import BlockingJob, document, make_tiny_model

from refine_tta.engine import (
    Cancelled,
    Engine,
    EngineLimits,
    InvalidSettings,
    LimitExceeded,
    NotFound,
    QueueFull,
    SamplingConfig,
    SessionStore,
    TextCodec,
    Unavailable,
    generate_text,
)
from refine_tta.model import load_model
from refine_tta.model.loading import weights_hash
from refine_tta.refine.config import RefineConfig

CONFIG = RefineConfig(steps=2, n_chunks=4, k=4, edge_margin=8, seed=3)
SAMPLING = SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=11)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.set_num_threads(1)
    return load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")), device="cpu")


@pytest.fixture()
def engine(loaded, tmp_path):
    store = SessionStore.open(tmp_path / "state", loaded.fingerprint)
    limits = EngineLimits(max_document_tokens=400, max_prompt_tokens=32, max_new_tokens=64, max_steps=8,
                          queue_size=2)
    with Engine(loaded, store, limits) as eng:
        yield eng


@pytest.fixture(scope="module")
def doc(loaded):
    return document(loaded.tokenizer, 150)


def test_adapt_then_generate_equals_the_library_and_leaves_the_base_model(engine, loaded, doc):
    base = weights_hash(loaded.model)
    session = engine.submit_adapt(doc, CONFIG, owner=None).result(120)
    assert session.document_tokens == len(loaded.tokenizer(doc)["input_ids"])
    assert session.settings == CONFIG.to_dict() and len(session.stats["steps"]) == 2
    assert {"ntp_loss_before", "ntp_loss_after", "seconds"} <= session.stats["total"].keys()
    assert weights_hash(loaded.model) == base
    pieces: list[str] = []
    result = engine.submit_generate(session.id, " The keeper", SAMPLING, None,
                                    on_text=lambda piece, token: pieces.append(piece)).result(60)
    assert weights_hash(loaded.model) == base
    assert "".join(pieces) == result.text and len(result.tokens) > 0
    # The same through the library: the session's delta applied, its state, the prompt without BOS.
    full = engine.sessions.get(session.id, None)
    prompt_ids = loaded.tokenizer(" The keeper", add_special_tokens=False)["input_ids"]
    expected = generate_text(loaded.model, full.state, prompt_ids, SAMPLING, TextCodec(loaded.tokenizer),
                             weights=full.delta)
    assert (result.tokens, result.text) == (expected.tokens, expected.text)
    assert weights_hash(loaded.model) == base


def test_same_seed_same_session_same_answer(engine, doc):
    a = engine.submit_adapt(doc, CONFIG, owner=None).result(120)
    b = engine.submit_adapt(doc, CONFIG, owner=None).result(120)
    assert a.id != b.id
    ta = engine.submit_generate(a.id, "The", SAMPLING, None).result(60)
    tb = engine.submit_generate(b.id, "The", SAMPLING, None).result(60)
    assert ta.tokens == tb.tokens


def test_base_model_generation_reads_the_prompt_from_scratch(engine, loaded):
    result = engine.submit_generate(None, "The lighthouse", SAMPLING, None).result(60)
    ids = loaded.tokenizer("The lighthouse")["input_ids"]  # with BOS
    assert ids[0] == loaded.tokenizer.bos_token_id and result.prompt_tokens == len(ids)
    expected = generate_text(loaded.model, None, ids, SAMPLING, TextCodec(loaded.tokenizer))
    assert result.tokens == expected.tokens


def test_limits_and_bad_inputs_fail_before_the_queue(engine, doc):
    with pytest.raises(LimitExceeded, match="max_document_tokens=400"):
        engine.submit_adapt(doc * 4, CONFIG, None)
    with pytest.raises(LimitExceeded, match="max_steps=8"):
        engine.submit_adapt(doc, RefineConfig(steps=9), None)
    with pytest.raises(InvalidSettings, match="needs at least"):
        engine.submit_adapt("too short", CONFIG, None)
    with pytest.raises(InvalidSettings, match="empty"):
        engine.submit_adapt("", CONFIG, None)
    with pytest.raises(LimitExceeded, match="max_prompt_tokens=32"):
        engine.submit_generate(None, doc, SAMPLING, None)
    with pytest.raises(LimitExceeded, match="max_new_tokens=64"):
        engine.submit_generate(None, "x", SamplingConfig(max_new_tokens=65), None)
    with pytest.raises(NotFound):
        engine.submit_generate("sess_" + "0" * 32, "x", SAMPLING, None)
    with pytest.raises(ValueError, match="seed"):  # rejected by the library's config itself
        SamplingConfig(seed=2**64)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=1e-40)
    with pytest.raises(InvalidSettings, match="Unicode"):
        engine.submit_generate(None, "a\ud800", SAMPLING, None)
    with pytest.raises(LimitExceeded, match="max_rollout_tokens"):
        engine.submit_adapt(doc, RefineConfig(steps=1, n=10**6), None)
    assert engine.metrics().queue_depth == 0


def test_model_dependent_settings_are_invalid_not_internal(engine, doc):
    bad = RefineConfig(steps=1, n_chunks=4, k=4, edge_margin=8, scope="layers", layers=(7,))
    with pytest.raises(InvalidSettings, match="out of range"):
        engine.submit_adapt(doc, bad, None).result(60)


def test_queue_full_and_cancellation(engine, loaded, doc):
    blocker = BlockingJob()
    running = engine.submit(blocker)
    assert blocker.started.wait(10)
    queued = engine.submit_generate(None, "a", SAMPLING, None)
    queued2 = engine.submit_adapt(doc, CONFIG, None)
    with pytest.raises(QueueFull) as info:
        engine.submit_generate(None, "b", SAMPLING, None)
    assert info.value.retry_after > 0 and engine.metrics().rejected_total == 1
    assert engine.metrics().queue_depth == 2 and engine.metrics().running == 1
    queued.cancel()
    queued2.cancel()
    blocker.release.set()
    assert running.result(10) == "released"
    for handle in (queued, queued2):
        with pytest.raises(Cancelled, match="before it started"):
            handle.result(10)
    assert engine.metrics().cancelled_total == 2


def test_adaptation_reports_started_before_step_1_then_each_step(engine, loaded, doc):
    heard: list[tuple[str, dict, float]] = []
    handle = engine.submit_adapt(doc, CONFIG, None,
                                 on_progress=lambda event, data: heard.append((event, data, time.perf_counter())))
    session = handle.result(120)
    assert [event for event, _, _ in heard] == ["started", "progress", "progress"]
    started = heard[0][1]
    assert started["of"] == 2 and started["mode"] == "refine" and started["queued_s"] >= 0
    assert started["document_tokens"] == session.document_tokens
    assert [data["step"] for _, data, _ in heard[1:]] == [1, 2]
    # "started" arrives before step 1's work, not with it: at least step 1's own seconds earlier
    assert heard[1][2] - heard[0][2] >= heard[1][1]["seconds"] * 0.9


def test_cancelling_a_running_adaptation_frees_the_worker(engine, loaded, doc):
    base = weights_hash(loaded.model)
    steps: list[dict] = []
    long = RefineConfig(steps=8, n_chunks=4, k=4, edge_margin=8)
    handle = engine.submit_adapt(doc, long, None, on_progress=lambda event, data: steps.append(data)
                                 if event == "progress" else None)
    deadline = time.monotonic() + 60
    while not steps and time.monotonic() < deadline:
        time.sleep(0.01)
    handle.cancel()
    with pytest.raises(Cancelled):
        handle.result(60)
    assert len(steps) < 8 and len(engine.sessions) == 0
    assert weights_hash(loaded.model) == base
    t0 = time.perf_counter()
    engine.submit_generate(None, "a", SamplingConfig(max_new_tokens=2), None).result(30)
    assert time.perf_counter() - t0 < 10


def test_cancelling_a_running_generation(engine):
    pieces: list[str] = []
    handle = engine.submit_generate(None, "a", SamplingConfig(max_new_tokens=64, temperature=1.0), None,
                                    on_text=lambda piece, token: pieces.append(piece))
    deadline = time.monotonic() + 30
    while not pieces and time.monotonic() < deadline:
        time.sleep(0.001)
    handle.cancel()
    try:
        handle.result(30)  # it may have finished before the flag was seen
    except Cancelled:
        pass
    assert engine.metrics().generations_total == 1


def test_stop_ends_queued_and_running_work_as_unavailable(loaded, tmp_path):
    store = SessionStore.open(tmp_path, loaded.fingerprint)
    eng = Engine(loaded, store, EngineLimits(queue_size=4)).start()
    blocker = BlockingJob()
    first = eng.submit(blocker)
    assert blocker.started.wait(10)
    queued = eng.submit_generate(None, "a", SAMPLING, None)
    eng.stop(timeout=10)
    for handle in (first, queued):
        with pytest.raises(Unavailable, match="shutting down") as info:
            handle.result(5)
        assert info.value.retry_after > 0
    with pytest.raises(Unavailable):
        eng.submit_generate(None, "a", SAMPLING, None)


class StuckJob:
    """A job that ignores cancellation until ``release`` (one very long step)."""

    kind = "stuck"

    def __init__(self) -> None:
        import threading

        self.started, self.release = threading.Event(), threading.Event()

    def run(self, engine, handle) -> str:
        self.started.set()
        self.release.wait(30)
        return "late"


def test_shutdown_grace_period(loaded, tmp_path):
    """Queued jobs end at once; the running job may finish within the grace period; after it the
    running job is cancelled; one that does not notice is answered after cancel_wait_s anyway."""
    store = SessionStore.open(tmp_path, loaded.fingerprint)
    eng = Engine(loaded, store, EngineLimits(queue_size=4)).start()
    quick = BlockingJob()
    running = eng.submit(quick)
    assert quick.started.wait(10)
    queued = eng.submit_generate(None, "a", SAMPLING, None)
    eng.begin_shutdown(grace_s=5.0, retry_after=7.0)
    with pytest.raises(Unavailable, match="shutting down") as info:
        queued.result(1)
    assert info.value.retry_after == 7.0 and not running.future.done()
    with pytest.raises(Unavailable):
        eng.submit_generate(None, "a", SAMPLING, None)
    quick.release.set()  # finishes within the grace period: its result stands
    assert running.result(5) == "released"
    eng.stop(timeout=10)

    eng = Engine(loaded, SessionStore.open(tmp_path / "b", loaded.fingerprint)).start()
    slow = BlockingJob()
    running = eng.submit(slow)
    assert slow.started.wait(10)
    t0 = time.monotonic()
    eng.begin_shutdown(grace_s=0.5)
    with pytest.raises(Unavailable, match="shutting down"):
        running.result(10)  # cancelled after the grace period, as a 503
    assert 0.4 < time.monotonic() - t0 < 5
    eng.stop(timeout=10)

    eng = Engine(loaded, SessionStore.open(tmp_path / "c", loaded.fingerprint)).start()
    eng.cancel_wait_s = 0.5
    stuck = StuckJob()
    running = eng.submit(stuck)
    assert stuck.started.wait(10)
    t0 = time.monotonic()
    eng.begin_shutdown(grace_s=0.2)
    with pytest.raises(Unavailable):
        running.result(10)
    assert time.monotonic() - t0 < 5 and not stuck.release.is_set()
    stuck.release.set()
    eng.stop(timeout=10)
    assert eng.metrics().cancelled_total == 1  # counted once, though the worker finished it later
