"""The worker's scheduling: generations batched and served between adaptation steps, fairness, Retry-After.

Engine tests use a tiny random DeltaNet with the shipped tokenizer and the real REFINE loop; every
generation the engine returns is compared with the same generation decoded alone by the library
(:func:`generate_text`), so batching and interleaving with adaptation cannot change an answer.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from server_fixtures import BlockingJob, document, make_tiny_model

from refine_tta.engine import (
    Cancelled,
    Engine,
    EngineLimits,
    QueueFull,
    SamplingConfig,
    SessionStore,
    TextCodec,
    generate_text,
)
from refine_tta.engine.scheduler import JobQueue, Timings, retry_after_s
from refine_tta.model import load_model
from refine_tta.model.loading import weights_hash
from refine_tta.refine.config import RefineConfig

CONFIG = RefineConfig(steps=2, n_chunks=4, k=4, edge_margin=8, seed=3)


# --- the queue ----------------------------------------------------------------------------------

@dataclass
class Item:
    owner: str
    lane: str
    name: str


def make_queue(maxsize: int = 100) -> JobQueue:
    return JobQueue(maxsize, lane_of=lambda i: i.lane, owner_of=lambda i: i.owner)


def test_owners_take_turns_within_a_lane():
    q = make_queue()
    for name in ("a1", "a2", "a3", "a4"):
        q.put_nowait(Item("A", "exclusive", name))
    q.put_nowait(Item("B", "exclusive", "b1"))
    q.put_nowait(Item("C", "exclusive", "c1"))
    q.put_nowait(Item("B", "exclusive", "b2"))
    order = [q.take("exclusive")[0].name for _ in range(7)]
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
    assert q.take("exclusive") == []


def test_lanes_are_separate_and_bounded_together():
    q = make_queue(maxsize=3)
    q.put_nowait(Item("A", "exclusive", "adapt"))
    q.put_nowait(Item("A", "generate", "g1"))
    q.put_nowait(Item("B", "generate", "g2"))
    with pytest.raises(queue.Full):
        q.put_nowait(Item("C", "generate", "g3"))
    assert q.qsize() == 3 and q.waiting("generate") == 2
    assert [i.name for i in q.take("generate", 5)] == ["g1", "g2"]
    assert q.get_nowait().name == "adapt"
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_wait_wakes_on_a_job_and_on_close():
    q = make_queue()
    assert q.wait(timeout=0.01)  # nothing yet: times out, still open
    threading.Timer(0.05, q.put_nowait, [Item("A", "generate", "g")]).start()
    assert q.wait(timeout=5) and q.waiting("generate") == 1
    q.put(None)
    assert not q.wait(timeout=5) and q.closed


# --- Retry-After --------------------------------------------------------------------------------

def test_retry_after_follows_the_running_adaptation():
    t = Timings(adapt_step_s=2.0, decode_step_s=0.05)
    busy = dict(timings=t, waiting_exclusive=3, waiting_generate=0, decoding=0, batch_room=32,
                min_tokens_left=None)
    # 5 steps left + the final read, 2 s each
    assert retry_after_s(adapt_steps_left=5, **busy) == 12.0
    assert retry_after_s(adapt_steps_left=1, **busy) == 4.0
    # generations between the steps take about as long as the steps
    assert retry_after_s(adapt_steps_left=1, **{**busy, "decoding": 4}) == 8.0


def test_retry_after_for_waiting_generations():
    t = Timings(adapt_step_s=3.0, decode_step_s=0.1)
    base = dict(timings=t, waiting_exclusive=0, waiting_generate=5)
    # room in the batch: taken at the next step boundary
    assert retry_after_s(adapt_steps_left=4, decoding=2, batch_room=30, min_tokens_left=20, **base) == 3.0
    # batch full, no adaptation: when the first running generation ends (30 tokens x 0.1 s)
    assert retry_after_s(adapt_steps_left=None, decoding=32, batch_room=0, min_tokens_left=30, **base) == 3.0
    # never below the floor
    assert retry_after_s(adapt_steps_left=None, decoding=1, batch_room=31, min_tokens_left=1, floor=1.0,
                         **base) == 1.0


# --- the engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.set_num_threads(1)
    return load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")), device="cpu")


@pytest.fixture()
def engine(loaded, tmp_path):
    store = SessionStore.open(tmp_path / "state", loaded.fingerprint)
    limits = EngineLimits(max_document_tokens=400, max_prompt_tokens=32, max_new_tokens=64, max_steps=16,
                          queue_size=12)
    with Engine(loaded, store, limits) as eng:
        yield eng


@pytest.fixture(scope="module")
def doc(loaded):
    return document(loaded.tokenizer, 150)


def alone(engine, loaded, session_id, prompt, sampling):
    """The same generation through the library, decoded alone on the base model (+ the session's delta)."""
    if session_id is None:
        state, delta, ids = None, None, engine.encode(prompt, add_special_tokens=True)
    else:
        session = engine.sessions.get(session_id, None)
        state, delta, ids = session.state, session.delta, engine.encode(prompt, add_special_tokens=False)
    return generate_text(loaded.model, state, ids, sampling, TextCodec(loaded.tokenizer), weights=delta)


def test_generation_during_an_adaptation_finishes_first_and_uses_the_base_weights(engine, loaded, doc):
    base = weights_hash(loaded.model)
    order: list[str] = []
    submitted: list = []
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=5, stop_at_eos=False)  # sensitive to weights

    def on_progress(event, data):
        if event == "progress" and data["step"] == 4:  # mid-adaptation, its weights well moved: ask a question now
            handle = engine.submit_generate(None, "The lighthouse", sampling, None)
            handle.future.add_done_callback(lambda _: order.append("generate"))
            submitted.append(handle)

    long = RefineConfig(steps=8, n_chunks=4, k=4, edge_margin=8, seed=1, lr=0.05)  # weights move fast
    adapting = engine.submit_adapt(doc, long, None, on_progress=on_progress)
    adapting.future.add_done_callback(lambda _: order.append("adapt"))
    session = adapting.result(300)
    assert order == ["generate", "adapt"]
    result = submitted[0].result(10)
    want = alone(engine, loaded, None, "The lighthouse", sampling)
    assert (result.tokens, result.text) == (want.tokens, want.text)
    # the check can fail: under the adaptation's weights the same sampling gives another answer
    ids = engine.encode("The lighthouse", add_special_tokens=True)
    adapted = generate_text(loaded.model, None, ids, sampling, TextCodec(loaded.tokenizer),
                            weights=engine.sessions.get(session.id, None).delta)
    assert adapted.tokens != want.tokens
    assert len(session.stats["steps"]) == 8
    assert weights_hash(loaded.model) == base


def test_a_session_decoded_between_steps_does_not_change_the_adaptation(engine, loaded, doc):
    """The decoder applies a session's delta to the shared model; the next adaptation step must run
    on the base model again, so the adaptation comes out bit-identical to one run with no generation."""
    session = engine.submit_adapt(doc, CONFIG, None).result(300)
    sampling = SamplingConfig(max_new_tokens=64, temperature=1.0, seed=2, stop_at_eos=False)  # spans several steps
    submitted: list = []

    def on_progress(event, data):
        if event == "progress" and data["step"] == 2:
            submitted.append(engine.submit_generate(session.id, " The keeper", sampling, None))

    long = RefineConfig(steps=4, n_chunks=4, k=4, edge_margin=8, seed=7, lr=0.05)
    interleaved = engine.submit_adapt(doc, long, None, on_progress=on_progress).result(300)
    alone_adapted = engine.submit_adapt(doc, long, None).result(300)
    got = submitted[0].result(10)
    want = alone(engine, loaded, session.id, " The keeper", sampling)
    assert (got.tokens, got.text) == (want.tokens, want.text)
    a = engine.sessions.get(interleaved.id, None).delta.tensors
    b = engine.sessions.get(alone_adapted.id, None).delta.tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_waiting_generations_decode_as_one_batch_and_equal_alone(engine, loaded, doc):
    adapted = engine.submit_adapt(doc, CONFIG, None).result(300)
    blocker = BlockingJob()
    engine.submit(blocker)
    assert blocker.started.wait(10)
    asks = [(None, "The keeper", SamplingConfig(max_new_tokens=12)),
            (adapted.id, " The keeper", SamplingConfig(max_new_tokens=12, temperature=0.9, seed=1)),
            (adapted.id, " He counted", SamplingConfig(max_new_tokens=7, temperature=1.1, top_p=0.9, seed=2)),
            (None, "A storm", SamplingConfig(max_new_tokens=10, temperature=0.7, seed=3)),
            (adapted.id, " The lamp", SamplingConfig(max_new_tokens=12, stop=("e",)))]
    handles = [engine.submit_generate(sid, prompt, sampling, None) for sid, prompt, sampling in asks]
    before = engine.metrics()
    blocker.release.set()
    results = [h.result(60) for h in handles]
    after = engine.metrics()
    for (sid, prompt, sampling), got in zip(asks, results):
        want = alone(engine, loaded, sid, prompt, sampling)
        assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)
    steps = after.decode_steps_total - before.decode_steps_total
    tokens = after.generated_tokens_total - before.generated_tokens_total
    assert tokens == sum(len(r.tokens) for r in results)
    assert steps <= max(len(r.tokens) for r in results) + 1 < tokens, "one step serves every generation"


def test_cancelling_one_generation_leaves_the_others(engine, loaded):
    blocker = BlockingJob()
    engine.submit(blocker)
    assert blocker.started.wait(10)
    asks = [("The keeper", SamplingConfig(max_new_tokens=20, stop_at_eos=False, temperature=0.9, seed=s))
            for s in range(4)]
    victim_pieces: list[str] = []
    handles = []
    for i, (prompt, sampling) in enumerate(asks):
        on_text = (lambda piece, token: (victim_pieces.append(piece), handles[1].cancel())) if i == 1 else None
        handles.append(engine.submit_generate(None, prompt, sampling, None, on_text=on_text))
    blocker.release.set()
    with pytest.raises(Cancelled):
        handles[1].result(60)
    assert victim_pieces
    for i in (0, 2, 3):
        got, want = handles[i].result(60), alone(engine, loaded, None, *asks[i])
        assert (got.tokens, got.text) == (want.tokens, want.text)


def test_adaptations_progress_under_a_stream_of_generations(engine, doc):
    stop = threading.Event()
    answered: list[float] = []

    def ask_forever():
        while not stop.is_set():
            try:
                engine.submit_generate(None, "The", SamplingConfig(max_new_tokens=16, stop_at_eos=False),
                                       None).result(60)
                answered.append(time.perf_counter())
            except QueueFull:
                time.sleep(0.01)

    askers = [threading.Thread(target=ask_forever) for _ in range(3)]
    for t in askers:
        t.start()
    try:
        t0 = time.perf_counter()
        session = engine.submit_adapt(doc, RefineConfig(steps=4, n_chunks=4, k=4, edge_margin=8), None).result(300)
        t1 = time.perf_counter()
    finally:
        stop.set()
        for t in askers:
            t.join(60)
    assert len(session.stats["steps"]) == 4
    assert sum(t0 < t < t1 for t in answered) >= 3, "generations were answered while it adapted"


def test_queue_full_retry_after_is_estimated_from_the_running_adaptation(loaded, tmp_path, doc):
    from refine_tta.refine.loop import AdaptCancelled

    def slow_adapt(model, ids, config, *, on_step, should_stop, **_):
        for i in range(config.steps):
            if should_stop():
                raise AdaptCancelled("cancelled")
            time.sleep(0.4)
            on_step({"step": i + 1, "of": config.steps})
        raise AdaptCancelled("the test adaptation never finishes")

    store = SessionStore.open(tmp_path, loaded.fingerprint)
    with Engine(loaded, store, EngineLimits(queue_size=1, max_steps=64), adapt_fn=slow_adapt) as eng:
        steps: list[dict] = []
        running = eng.submit_adapt(doc, RefineConfig(steps=30, n_chunks=4, k=4, edge_margin=8), None,
                                   on_progress=lambda event, data: steps.append(data) if event == "progress" else None)
        deadline = time.monotonic() + 30
        while len(steps) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        eng.submit_adapt(doc, CONFIG, None)
        with pytest.raises(QueueFull) as info:
            eng.submit_adapt(doc, CONFIG, None)
        # ~27 steps left at ~0.4 s each: far more than the 1 s floor, and not more than the whole adaptation
        assert 5 <= info.value.retry_after <= 31 * 0.4 * 3
        running.cancel()


def test_a_failing_step_fails_its_generations_and_the_worker_carries_on(engine, monkeypatch):
    serving_model = engine._batch.decoder.model  # the model the worker decodes with (white-box: inject a fault)
    calls = {"n": 0}
    inner = serving_model.lm_head.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fault")
        return inner(x)

    monkeypatch.setattr(serving_model.lm_head, "forward", flaky)
    broken = engine.submit_generate(None, "The keeper", SamplingConfig(max_new_tokens=8, stop_at_eos=False), None)
    with pytest.raises(RuntimeError, match="device fault"):
        broken.result(60)
    fine = engine.submit_generate(None, "The keeper", SamplingConfig(max_new_tokens=8, stop_at_eos=False), None)
    assert len(fine.result(60).tokens) == 8
    assert engine.metrics().failed_total == 1


def test_shutdown_gives_decoding_generations_the_grace_period_then_503(loaded, tmp_path):
    from refine_tta.engine import Unavailable

    eng = Engine(loaded, SessionStore.open(tmp_path, loaded.fingerprint)).start()
    try:
        slow = SamplingConfig(max_new_tokens=200, stop_at_eos=False)
        pieces: list[str] = []
        handle = eng.submit_generate(None, "The keeper", slow, None,
                                     on_text=lambda piece, token: (pieces.append(piece), time.sleep(0.05)))
        quick = eng.submit_generate(None, "The keeper", SamplingConfig(max_new_tokens=3, stop_at_eos=False), None)
        deadline = time.monotonic() + 30
        while not pieces and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        eng.begin_shutdown(grace_s=0.5)
        assert len(quick.result(10).tokens) == 3  # finished within the grace period: its result stands
        with pytest.raises(Unavailable, match="shutting down"):
            handle.result(10)
        assert 0.4 < time.monotonic() - t0 < 5
    finally:
        eng.stop(timeout=10)
