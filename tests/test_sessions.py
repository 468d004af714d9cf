"""SessionStore: LRU memory budget over a disk copy, restart recovery, refusal of incomplete or
foreign sessions, owner isolation, disk budget. Hand-made tensors, no model."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from refine_tta.engine import NotFound, Session, SessionStore, new_session_id
from refine_tta.engine.sessions import DELTA_FILE, META_FILE, STATE_FILE
from refine_tta.model.state import DocumentState, LayerState
from refine_tta.refine.delta import ParameterDelta

FP = {"architecture": "delta_net", "config_hash": "c0ffee", "weights_hash": "abc123", "dtype": "float32"}
OTHER_FP = {**FP, "weights_hash": "def456"}


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def make_session(seed: int, owner: str | None = None, clock: FakeClock | None = None) -> Session:
    g = torch.Generator().manual_seed(seed)
    layers = [LayerState(torch.randn(1, 2, 8, 8, generator=g), tuple(torch.randn(1, 16, 4, generator=g)
                                                                      for _ in range(3)))
              for _ in range(2)]
    state = DocumentState(layers, n_tokens=100 + seed, next_logits=torch.randn(1, 32, generator=g))
    delta = ParameterDelta({"kind": "full"}, {"model.layers.0.attn.q_proj.weight": torch.randn(16, 16, generator=g)})
    now = None if clock is None else clock()
    return Session.create(owner, {"mode": "refine", "seed": seed}, {"steps": [{"step": 1}], "total": {"seconds": 0.5}},
                          100 + seed, state, delta, now=now)


def assert_same_tensors(a: Session, b: Session) -> None:
    assert a.state.n_tokens == b.state.n_tokens
    for x, y in zip(a.state.tensors(), b.state.tensors(), strict=True):
        assert torch.equal(x, y)
    assert a.delta.kind == b.delta.kind and a.delta.tensors.keys() == b.delta.tensors.keys()
    for key in a.delta.tensors:
        assert torch.equal(a.delta.tensors[key], b.delta.tensors[key])


def test_put_get_round_trip_and_metadata(tmp_path):
    store = SessionStore(tmp_path, FP)
    s = make_session(1)
    stored = store.put(s)
    assert stored.id == s.id and stored.id.startswith("sess_") and len(stored.id) == 37
    assert not stored.loaded and stored.nbytes == s.state.nbytes + s.delta.nbytes
    assert sorted(p.name for p in (tmp_path / s.id).iterdir()) == [DELTA_FILE, META_FILE, STATE_FILE]
    got = store.get(s.id, None)
    assert_same_tensors(got, s)
    info = store.info(s.id, None)
    assert info.document_tokens == 101 and info.settings == {"mode": "refine", "seed": 1}
    assert info.stats["total"]["seconds"] == 0.5 and info.state is None
    assert [x.id for x in store.list(None)] == [s.id]
    assert store.memory_bytes == s.nbytes and store.disk_bytes == stored.disk_bytes > 0


def test_memory_budget_evicts_lru_and_keeps_disk_copy(tmp_path):
    sessions = [make_session(i) for i in range(4)]
    per = sessions[0].state.nbytes + sessions[0].delta.nbytes
    store = SessionStore(tmp_path, FP, memory_budget_bytes=2 * per)
    for s in sessions[:3]:
        store.put(s)
    assert store.loaded_count == 2 and store.memory_bytes <= 2 * per
    assert len(store) == 3  # the evicted one is still a session
    # Using session 1 makes session 2 the least recently used; session 0 comes back from disk.
    store.get(sessions[1].id, None)
    assert_same_tensors(store.get(sessions[0].id, None), sessions[0])
    assert store.loaded_count == 2 and store.memory_bytes <= 2 * per
    store.put(sessions[3])
    assert store.loaded_count == 2
    for s in sessions:  # every one is still served, from memory or disk
        assert_same_tensors(store.get(s.id, None), s)
    assert all((tmp_path / s.id / META_FILE).is_file() for s in sessions)


def test_restart_restores_every_acknowledged_session(tmp_path):
    store = SessionStore(tmp_path, FP, memory_budget_bytes=1)
    sessions = [make_session(i, owner="owner-a" if i % 2 else None) for i in range(5)]
    infos = {s.id: store.put(s) for s in sessions}
    store.get(sessions[2].id, None)
    used = store.info(sessions[2].id, None).last_used
    del store
    reopened = SessionStore(tmp_path, FP)
    assert len(reopened) == 5 and reopened.loaded_count == 0  # metadata only until used
    for s in sessions:
        info = reopened.info(s.id, s.owner)
        assert (info.created, info.document_tokens, info.settings, info.owner) == \
            (infos[s.id].created, infos[s.id].document_tokens, infos[s.id].settings, s.owner)
        assert_same_tensors(reopened.get(s.id, s.owner), s)
    assert reopened.info(sessions[2].id, None).last_used >= used


def test_half_written_sessions_are_never_loaded(tmp_path, caplog):
    store = SessionStore(tmp_path, FP)
    good, no_meta, truncated, bad_meta = (make_session(i) for i in range(4))
    for s in (good, no_meta, truncated, bad_meta):
        store.put(s)
    (tmp_path / no_meta.id / META_FILE).unlink()  # crashed before meta.json: never acknowledged
    state_file = tmp_path / truncated.id / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:-100])  # torn write
    (tmp_path / bad_meta.id / META_FILE).write_text("{\"format\": ")
    only_tensors = tmp_path / new_session_id()  # the very first file of a put, nothing else
    only_tensors.mkdir()
    shutil.copy(tmp_path / good.id / STATE_FILE, only_tensors / STATE_FILE)
    (tmp_path / good.id / f".{META_FILE}.tmp-1-2").write_text("{}")  # an interrupted rewrite of meta
    with caplog.at_level(logging.WARNING, logger="refine_tta.engine.sessions"):
        reopened = SessionStore(tmp_path, FP)
    assert [s.id for s in reopened.list(None)] == [good.id]
    for s in (no_meta, truncated, bad_meta):
        with pytest.raises(NotFound):
            reopened.get(s.id, None)
        assert not (tmp_path / s.id).exists()
    assert not only_tensors.exists()
    assert not (tmp_path / good.id / f".{META_FILE}.tmp-1-2").exists()
    assert "half-written" in caplog.text and "truncated" in caplog.text
    assert_same_tensors(reopened.get(good.id, None), good)


def test_file_damaged_while_running_is_removed_not_served(tmp_path):
    store = SessionStore(tmp_path, FP, memory_budget_bytes=1)
    a, b = make_session(1), make_session(2)
    store.put(a)
    store.put(b)  # evicts a from memory
    delta_file = tmp_path / a.id / DELTA_FILE
    delta_file.write_bytes(delta_file.read_bytes()[:20])
    with pytest.raises(NotFound, match="could not be read back"):
        store.get(a.id, None)
    assert a.id not in store and not (tmp_path / a.id).exists()


def test_sessions_of_another_model_are_refused(tmp_path, caplog):
    store = SessionStore(tmp_path, FP)
    s = make_session(1)
    store.put(s)
    with caplog.at_level(logging.WARNING, logger="refine_tta.engine.sessions"):
        other = SessionStore(tmp_path, OTHER_FP)
    assert other.list(None) == [] and len(other) == 0
    assert "another model" in caplog.text and "weights_hash" in caplog.text
    with pytest.raises(NotFound, match="another model"):
        other.get(s.id, None)
    assert (tmp_path / s.id / META_FILE).is_file()  # kept: the right model can still serve it
    assert_same_tensors(SessionStore(tmp_path, FP).get(s.id, None), s)


def test_owner_isolation(tmp_path):
    store = SessionStore(tmp_path, FP)
    mine = make_session(1, owner="alice")
    store.put(mine)
    for owner in ("bob", None):
        assert store.list(owner) == []
        for call in (store.info, store.get, store.delete):
            with pytest.raises(NotFound, match="not found"):
                call(mine.id, owner)
    assert [s.id for s in store.list("alice")] == [mine.id]
    store.delete(mine.id, "alice")
    assert not (tmp_path / mine.id).exists() and len(store) == 0
    with pytest.raises(NotFound):
        store.get(mine.id, "alice")


@pytest.mark.parametrize("bad_id", ["../etc", "sess_", "sess_" + "g" * 32, "", "sess_" + "0" * 31 + "/"])
def test_malformed_ids_are_not_found(tmp_path, bad_id):
    store = SessionStore(tmp_path, FP)
    with pytest.raises(NotFound):
        store.get(bad_id, None)
    with pytest.raises(NotFound):
        store.delete(bad_id, None)


def test_disk_budget_removes_least_recently_used(tmp_path, caplog):
    clock = FakeClock()
    store = SessionStore(tmp_path, FP, clock=clock)
    first = store.put(make_session(0, clock=clock))
    budget = 2 * first.disk_bytes + 10
    store = SessionStore(tmp_path, FP, disk_budget_bytes=budget, clock=clock)
    second = store.put(make_session(1, clock=clock))
    store.get(first.id, None)  # first is now more recently used than second
    with caplog.at_level(logging.WARNING, logger="refine_tta.engine.sessions"):
        third = store.put(make_session(2, clock=clock))
    assert {s.id for s in store.list(None)} == {first.id, third.id}
    assert not (tmp_path / second.id).exists() and store.disk_bytes <= budget
    assert "disk budget" in caplog.text and second.id in caplog.text
    # The budget also applies to what is found on disk at start (last_used is persisted).
    store.get(first.id, None)
    small = SessionStore(tmp_path, FP, disk_budget_bytes=first.disk_bytes + 10, clock=clock)
    assert [s.id for s in small.list(None)] == [first.id]  # first was used last


def test_meta_json_records_fingerprint_and_sizes(tmp_path):
    store = SessionStore(tmp_path, FP)
    s = make_session(3, owner="x")
    stored = store.put(s)
    meta = json.loads((tmp_path / s.id / META_FILE).read_text())
    assert meta["fingerprint"] == FP and meta["owner"] == "x"
    assert meta["files"] == {STATE_FILE: (tmp_path / s.id / STATE_FILE).stat().st_size,
                             DELTA_FILE: (tmp_path / s.id / DELTA_FILE).stat().st_size}
    assert sum(meta["files"].values()) == stored.disk_bytes
