"""SessionStore over SessionStorage: LRU memory budget over a verified disk copy, restart recovery,
quarantine instead of deletion, transient errors, disk budget, last_used bookkeeping, the state
directory lock and the shared mode. Hand-made tensors, no model."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from refine_tta.engine import (
    LockMode,
    NotFound,
    Session,
    SessionDamaged,
    SessionRefused,
    SessionStorage,
    SessionStore,
    StateDirLock,
    StateDirLocked,
    StorageFull,
    Unavailable,
    new_session_id,
)
from refine_tta.engine import storage as storage_module
from refine_tta.engine.storage import LAST_USED_FILE, META_FILE, QUARANTINE_DIR, REASON_FILE, SESSION_FORMAT
from refine_tta.model.loading import ModelFingerprint
from refine_tta.model.state import DocumentState, LayerState
from refine_tta.refine.delta import ParameterDelta

FP = ModelFingerprint(architecture="delta_net", config_hash="c0ffee", weights_hash="abc123", dtype="float32")
OTHER_FP = ModelFingerprint(architecture="delta_net", config_hash="c0ffee", weights_hash="def456", dtype="float32")
STATE_FILE, DELTA_FILE = "state.safetensors", "delta.safetensors"


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def make_session(seed: int, owner: str | None = None, clock: FakeClock | None = None, kind: str = "full") -> Session:
    g = torch.Generator().manual_seed(seed)
    layers = [LayerState(torch.randn(1, 2, 8, 8, generator=g), tuple(torch.randn(1, 16, 4, generator=g)
                                                                      for _ in range(3)))
              for _ in range(2)]
    state = DocumentState(layers, n_tokens=100 + seed, next_logits=torch.randn(1, 32, generator=g))
    if kind == "lora":
        delta = ParameterDelta("lora", {"model.layers.0.attn.q_proj.lora_A": torch.randn(4, 16, generator=g),
                                        "model.layers.0.attn.q_proj.lora_B": torch.randn(16, 4, generator=g)}, 0.5)
    elif kind == "none":
        delta = ParameterDelta("none")
    else:
        delta = ParameterDelta(kind, {"model.layers.0.attn.q_proj.weight": torch.randn(16, 16, generator=g)})
    now = None if clock is None else clock()
    return Session.create(owner, {"mode": "refine", "seed": seed}, {"steps": [{"step": 1}], "total": {"seconds": 0.5}},
                          100 + seed, state, delta, now=now)


def assert_same_tensors(a: Session, b: Session) -> None:
    assert a.state.n_tokens == b.state.n_tokens
    for x, y in zip(a.state.tensors(), b.state.tensors(), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert (a.delta.kind, a.delta.scale) == (b.delta.kind, b.delta.scale)
    assert a.delta.tensors.keys() == b.delta.tensors.keys()
    for key in a.delta.tensors:
        assert torch.equal(a.delta.tensors[key], b.delta.tensors[key])


def reopen(store: SessionStore, fingerprint: ModelFingerprint = FP, **options) -> SessionStore:
    """A restart: close the store (flush, release the lock) and open the directory again."""
    store.close()
    return SessionStore.open(store.directory, fingerprint, **options)


def quarantine_entries(root: Path) -> list[Path]:
    q = root / QUARANTINE_DIR
    return sorted(q.iterdir()) if q.is_dir() else []


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", ["full", "lora", "none"])
def test_put_get_round_trip_and_metadata(tmp_path, kind):
    store = SessionStore.open(tmp_path, FP)
    s = make_session(1, kind=kind)
    stored = store.put(s)
    assert stored.id == s.id and stored.id.startswith("sess_") and len(stored.id) == 37
    assert not stored.loaded and stored.nbytes == s.state.nbytes + s.delta.nbytes
    assert sorted(p.name for p in (tmp_path / s.id).iterdir()) == [DELTA_FILE, META_FILE, STATE_FILE]
    assert_same_tensors(store.get(s.id, None), s)
    info = store.info(s.id, None)
    assert info.document_tokens == 101 and info.settings == {"mode": "refine", "seed": 1}
    assert info.stats["total"]["seconds"] == 0.5 and info.state is None
    assert [x.id for x in store.list(None)] == [s.id]
    assert store.memory_bytes == s.nbytes and store.disk_bytes == stored.disk_bytes > 0
    assert_same_tensors(reopen(store).get(s.id, None), s)  # from disk, verified


def test_meta_json_records_format_fingerprint_sizes_and_checksums(tmp_path):
    import hashlib

    store = SessionStore.open(tmp_path, FP)
    s = make_session(3, owner="x")
    stored = store.put(s)
    meta = json.loads((tmp_path / s.id / META_FILE).read_text())
    assert meta["format"] == SESSION_FORMAT and meta["session_id"] == s.id
    assert meta["fingerprint"] == FP.to_dict() and meta["owner"] == "x"
    for name in (STATE_FILE, DELTA_FILE):
        data = (tmp_path / s.id / name).read_bytes()
        assert meta["files"][name]["bytes"] == len(data)
        assert meta["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["files"][DELTA_FILE]["description"] == {"kind": "full", "scale": 1.0}
    assert meta["files"][STATE_FILE]["description"] == {"n_tokens": 103}
    assert sum(f["bytes"] for f in meta["files"].values()) == stored.disk_bytes


def test_memory_budget_evicts_lru_and_keeps_disk_copy(tmp_path):
    sessions = [make_session(i) for i in range(4)]
    per = sessions[0].state.nbytes + sessions[0].delta.nbytes
    store = SessionStore.open(tmp_path, FP, memory_budget_bytes=2 * per)
    for s in sessions[:3]:
        store.put(s)
    assert store.loaded_count == 2 and store.memory_bytes <= 2 * per
    assert len(store) == 3  # the evicted one is still a session
    store.get(sessions[1].id, None)  # session 2 is now the least recently used; 0 comes back from disk
    assert_same_tensors(store.get(sessions[0].id, None), sessions[0])
    assert store.loaded_count == 2 and store.memory_bytes <= 2 * per
    store.put(sessions[3])
    assert store.loaded_count == 2
    for s in sessions:  # every one is still served, from memory or disk
        assert_same_tensors(store.get(s.id, None), s)


def test_restart_restores_every_acknowledged_session(tmp_path):
    store = SessionStore.open(tmp_path, FP, memory_budget_bytes=1)
    sessions = [make_session(i, owner="owner-a" if i % 2 else None) for i in range(5)]
    infos = {s.id: store.put(s) for s in sessions}
    store.get(sessions[2].id, None)
    used = store.info(sessions[2].id, None).last_used
    reopened = reopen(store)
    assert len(reopened) == 5 and reopened.loaded_count == 0  # metadata only until used
    for s in sessions:
        info = reopened.info(s.id, s.owner)
        assert (info.created, info.document_tokens, info.settings, info.owner) == \
            (infos[s.id].created, infos[s.id].document_tokens, infos[s.id].settings, s.owner)
        assert_same_tensors(reopened.get(s.id, s.owner), s)
    assert reopened.info(sessions[2].id, None).last_used >= used


# --------------------------------------------------------------------------- last_used bookkeeping
def test_use_does_not_rewrite_metadata_and_last_used_is_flushed_rarely(tmp_path):
    clock = FakeClock()
    store = SessionStore.open(tmp_path, FP, clock=clock, last_used_flush_s=100.0)
    s = make_session(1)
    store.put(s)
    meta = tmp_path / s.id / META_FILE
    before = (meta.read_bytes(), meta.stat().st_ino, meta.stat().st_mtime_ns)
    for _ in range(20):
        store.get(s.id, None)
    assert (meta.read_bytes(), meta.stat().st_ino, meta.stat().st_mtime_ns) == before
    assert not (tmp_path / s.id / LAST_USED_FILE).exists()  # 20 uses within the flush interval: no write
    clock.t += 200
    store.get(s.id, None)  # the interval has passed: one small file, still no metadata rewrite
    assert float((tmp_path / s.id / LAST_USED_FILE).read_text()) == store.info(s.id, None).last_used
    assert (meta.read_bytes(), meta.stat().st_ino) == before[:2]
    store.get(s.id, None)
    last = store.info(s.id, None).last_used
    assert reopen(store).info(s.id, None).last_used == last  # close() flushes


def test_torn_last_used_file_is_only_a_hint(tmp_path):
    store = SessionStore.open(tmp_path, FP)
    s = store.put(make_session(1))
    store.close()
    (tmp_path / s.id / LAST_USED_FILE).write_text("12")
    (tmp_path / s.id / f".{LAST_USED_FILE}.tmp-1-2").write_text("garbage")  # an interrupted rewrite
    reopened = SessionStore.open(tmp_path, FP)
    assert reopened.info(s.id, None).last_used == s.created  # older than created: ignored
    assert not (tmp_path / s.id / f".{LAST_USED_FILE}.tmp-1-2").exists()
    (tmp_path / s.id / LAST_USED_FILE).write_text("not a number")
    assert reopen(reopened).info(s.id, None).last_used == s.created


# ---------------------------------------------------------------------------------- quarantine
def flip_bytes(path: Path, offset_from_end: int = 100, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) - offset_from_end + i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", [STATE_FILE, DELTA_FILE])
def test_flipped_byte_in_a_tensor_file_is_quarantined_never_served(tmp_path, victim, caplog):
    store = SessionStore.open(tmp_path, FP)
    s, other = make_session(1), make_session(2)
    store.put(s)
    store.put(other)
    store = reopen(store)  # same size: the start-up scan (sizes only) indexes it
    flip_bytes(tmp_path / s.id / victim)
    store = reopen(store)
    assert s.id in store
    with caplog.at_level(logging.ERROR, logger="refine_tta.engine.storage"):
        with pytest.raises(SessionDamaged, match=f"damaged on disk.*{victim} fails its checksum") as info:
            store.get(s.id, None)
    assert "quarantined" in str(info.value) and str(tmp_path) not in str(info.value)
    assert "quarantined" in caplog.text and s.id in caplog.text and "checksum" in caplog.text
    assert not (tmp_path / s.id).exists() and s.id not in store
    [moved] = quarantine_entries(tmp_path)
    assert moved.name.startswith(s.id + ".")
    assert sorted(p.name for p in moved.iterdir()) == sorted([DELTA_FILE, META_FILE, REASON_FILE, STATE_FILE])
    assert "checksum" in json.loads((moved / REASON_FILE).read_text())["reason"]
    with pytest.raises(SessionDamaged, match="quarantined"):  # asked again: still a clear answer
        store.info(s.id, None)
    store = reopen(store)
    with pytest.raises(SessionDamaged, match="quarantined"):  # and after a restart
        store.get(s.id, None)
    assert_same_tensors(store.get(other.id, None), other)


@pytest.mark.parametrize("n_bytes", [1, 4096])
def test_flipped_bytes_in_memory_evicted_session_are_caught_on_reload(tmp_path, n_bytes):
    s, b = make_session(1), make_session(2)
    s.delta.tensors["model.layers.0.attn.q_proj.weight"] = torch.randn(64, 64)  # room for 4 KiB
    store = SessionStore.open(tmp_path, FP, memory_budget_bytes=1)
    store.put(s)
    store.put(b)  # evicts s from memory
    flip_bytes(tmp_path / s.id / DELTA_FILE, offset_from_end=n_bytes + 8, n=n_bytes)
    with pytest.raises(SessionDamaged, match="checksum"):
        store.get(s.id, None)
    assert s.id not in store and len(quarantine_entries(tmp_path)) == 1
    assert_same_tensors(store.get(b.id, None), b)


GARBLED_META = {
    "not-json": lambda m: "{\"format\": ",
    "not-an-object": lambda m: "[1, 2]",
    "no-files": lambda m: json.dumps({k: v for k, v in m.items() if k != "files"}),
    "files-null": lambda m: json.dumps({**m, "files": None}),
    "no-created": lambda m: json.dumps({k: v for k, v in m.items() if k != "created"}),
    "owner-not-a-string": lambda m: json.dumps({**m, "owner": 7}),
    "other-session-id": lambda m: json.dumps({**m, "session_id": new_session_id()}),
}


@pytest.mark.parametrize("garble", GARBLED_META.values(), ids=GARBLED_META.keys())
def test_garbled_metadata_is_quarantined_with_its_tensors(tmp_path, garble, caplog):
    store = SessionStore.open(tmp_path, FP)
    s, good = make_session(1), make_session(2)
    store.put(s)
    store.put(good)
    store.close()
    tensors = {name: (tmp_path / s.id / name).read_bytes() for name in (STATE_FILE, DELTA_FILE)}
    meta = json.loads((tmp_path / s.id / META_FILE).read_text())
    (tmp_path / s.id / META_FILE).write_text(garble(meta))
    with caplog.at_level(logging.ERROR, logger="refine_tta.engine.storage"):
        store = SessionStore.open(tmp_path, FP)
    assert [x.id for x in store.list(None)] == [good.id]
    assert "quarantined" in caplog.text and s.id in caplog.text
    [moved] = quarantine_entries(tmp_path)
    for name, data in tensors.items():  # the tensors are kept, byte for byte
        assert (moved / name).read_bytes() == data
    with pytest.raises(NotFound):
        store.get(s.id, None)
    assert_same_tensors(store.get(good.id, None), good)


def test_truncated_or_missing_files_are_quarantined_at_start(tmp_path):
    store = SessionStore.open(tmp_path, FP)
    truncated, missing, good = make_session(1), make_session(2), make_session(3)
    for s in (truncated, missing, good):
        store.put(s)
    store.close()
    path = tmp_path / truncated.id / STATE_FILE
    path.write_bytes(path.read_bytes()[:-100])
    (tmp_path / missing.id / DELTA_FILE).unlink()
    no_meta = tmp_path / new_session_id()  # not written by the storage: kept aside, not deleted
    no_meta.mkdir()
    shutil.copy(tmp_path / good.id / STATE_FILE, no_meta / STATE_FILE)
    store = SessionStore.open(tmp_path, FP)
    assert [x.id for x in store.list(None)] == [good.id]
    assert sorted(p.name.split(".")[0] for p in quarantine_entries(tmp_path)) == \
        sorted([truncated.id, missing.id, no_meta.name])
    reasons = {sid: why for sid, (_, why) in store.quarantined.items()}
    assert "has" in reasons[truncated.id] and "recorded" in reasons[truncated.id]
    assert "None bytes" in reasons[missing.id] and "no meta.json" in reasons[no_meta.name]


def test_unfinished_writes_are_removed_and_never_visible(tmp_path, monkeypatch):
    store = SessionStore.open(tmp_path, FP)
    good = store.put(make_session(1))

    def crash(self, step, path):
        if step == DELTA_FILE:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(SessionStorage, "_reached", crash)
    s = make_session(2)
    with pytest.raises(KeyboardInterrupt):
        store.put(s)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", good.id]  # the failed write cleaned up
    assert s.id not in store
    # A writer killed outright leaves its staging directory: removed at the next start, never indexed.
    staging = tmp_path / f"{storage_module.STAGING_PREFIX}{s.id}-99-abcd"
    staging.mkdir()
    (staging / STATE_FILE).write_bytes(b"partial")
    deleting = tmp_path / f"{storage_module.DELETING_PREFIX}{new_session_id()}-abcd"
    deleting.mkdir()
    store = reopen(store)
    assert [x.id for x in store.list(None)] == [good.id]
    assert not staging.exists() and not deleting.exists() and quarantine_entries(tmp_path) == []


def test_sessions_of_another_model_or_format_are_refused_and_kept(tmp_path, caplog):
    store = SessionStore.open(tmp_path, FP)
    s, old = make_session(1), make_session(2)
    store.put(s)
    store.put(old)
    store.close()
    meta_path = tmp_path / old.id / META_FILE
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format": "refine-tta-session/3"}))
    with caplog.at_level(logging.WARNING, logger="refine_tta.engine.storage"):
        other = SessionStore.open(tmp_path, OTHER_FP)
    assert other.list(None) == [] and len(other) == 0
    assert "another model" in caplog.text and "weights_hash" in caplog.text and "config_hash" not in caplog.text
    with pytest.raises(SessionRefused, match="another model"):
        other.get(s.id, None)
    with pytest.raises(SessionRefused, match="format 'refine-tta-session/3'"):
        other.get(old.id, None)
    assert (tmp_path / s.id / META_FILE).is_file() and quarantine_entries(tmp_path) == []  # kept in place
    assert_same_tensors(reopen(other).get(s.id, None), s)


def write_format_1(root: Path, s: Session, fp: ModelFingerprint) -> None:
    """``s`` as refine-tta 0.1.0 wrote it (format 1: sizes in meta.json, descriptions in the
    safetensors headers, no checksums)."""
    from safetensors.torch import save_file

    path = root / s.id
    path.mkdir(parents=True)
    fp_json = json.dumps(fp.to_dict(), sort_keys=True)
    save_file(s.state.state_dict(), str(path / STATE_FILE),
              metadata={"format": "refine-tta-state/1", "fingerprint": fp_json, "n_tokens": str(s.state.n_tokens),
                        "n_layers": str(len(s.state.layers)), "extra": json.dumps({"session_id": s.id})})
    save_file(dict(s.delta.tensors) or {"__empty__": torch.zeros(0)}, str(path / DELTA_FILE),
              metadata={"format": "refine-tta-delta/1", "kind": s.delta.kind, "scale": repr(s.delta.scale),
                        "fingerprint": fp_json})
    meta = {"format": "refine-tta-session/1", "session_id": s.id, "owner": s.owner, "created": s.created,
            "last_used": s.created + 5, "document_tokens": s.document_tokens, "state_bytes": s.state_bytes,
            "delta_bytes": s.delta_bytes, "settings": s.settings, "stats": s.stats, "fingerprint": fp.to_dict(),
            "files": {name: (path / name).stat().st_size for name in (STATE_FILE, DELTA_FILE)}}
    (path / META_FILE).write_text(json.dumps(meta))


def test_format_1_sessions_are_upgraded_in_place(tmp_path, caplog):
    old = [make_session(1, kind="full"), make_session(2, kind="lora"), make_session(3, kind="none")]
    for s in old:
        write_format_1(tmp_path, s, FP)
    foreign = make_session(4)
    write_format_1(tmp_path, foreign, OTHER_FP)
    before = {s.id: {n: (tmp_path / s.id / n).read_bytes() for n in (STATE_FILE, DELTA_FILE)} for s in old}
    with caplog.at_level(logging.INFO, logger="refine_tta.engine.storage"):
        store = SessionStore.open(tmp_path, FP)
    assert caplog.text.count("upgraded sess_") == 3
    assert {x.id for x in store.list(None)} == {s.id for s in old}
    for s in old:
        assert_same_tensors(store.get(s.id, None), s)
        info = store.info(s.id, None)
        assert (info.created, info.settings, info.stats) == (s.created, s.settings, s.stats)
        assert json.loads((tmp_path / s.id / META_FILE).read_text())["format"] == SESSION_FORMAT
        for name, data in before[s.id].items():  # the tensor files themselves are untouched
            assert (tmp_path / s.id / name).read_bytes() == data
    assert store.info(old[0].id, None).last_used >= old[0].created + 5
    with pytest.raises(SessionRefused, match="refine-tta-session/1"):  # another model's: kept as it was
        store.get(foreign.id, None)
    flip_bytes(tmp_path / old[0].id / STATE_FILE)  # from now on the checksums guard them
    store = reopen(store)
    with pytest.raises(SessionDamaged, match="checksum"):
        store.get(old[0].id, None)


# ---------------------------------------------------------------------------- transient errors
def failing_reads(monkeypatch, times: int, err: int = errno.EMFILE) -> list[Path]:
    """Path.read_bytes raises OSError(err) on session tensor files ``times`` times."""
    calls: list[Path] = []
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.suffix == ".safetensors" and len(calls) < times:
            calls.append(self)
            raise OSError(err, os.strerror(err), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(storage_module, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    return calls


@pytest.mark.parametrize("err", [errno.EMFILE, errno.EIO, errno.ENFILE])
def test_transient_error_on_reload_is_retried(tmp_path, monkeypatch, err):
    store = SessionStore.open(tmp_path, FP, memory_budget_bytes=1)
    s = make_session(1)
    store.put(s)
    store.put(make_session(2))
    calls = failing_reads(monkeypatch, times=2, err=err)
    assert_same_tensors(store.get(s.id, None), s)
    assert len(calls) == 2


def test_persistent_emfile_on_reload_answers_unavailable_and_keeps_the_session(tmp_path, monkeypatch):
    store = SessionStore.open(tmp_path, FP, memory_budget_bytes=1)
    s = make_session(1)
    store.put(s)
    store.put(make_session(2))
    calls = failing_reads(monkeypatch, times=1000)
    with pytest.raises(Unavailable, match="EMFILE.*kept") as info:
        store.get(s.id, None)
    assert info.value.retry_after > 0 and len(calls) == 4
    assert s.id in store and (tmp_path / s.id / META_FILE).is_file() and quarantine_entries(tmp_path) == []
    monkeypatch.undo()
    assert_same_tensors(store.get(s.id, None), s)


def test_enospc_during_write_is_unavailable_and_leaves_nothing(tmp_path, monkeypatch):
    store = SessionStore.open(tmp_path, FP)
    real = storage_module.write_file

    def full_disk(path, data, *, durable=True):
        if path.name == DELTA_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, durable=durable)

    monkeypatch.setattr(storage_module, "write_file", full_disk)
    s = make_session(1)
    with pytest.raises(Unavailable, match="ENOSPC.*nothing was stored"):
        store.put(s)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"] and len(store) == 0
    monkeypatch.undo()
    assert store.put(s).id == s.id


# --------------------------------------------------------------------------------- disk budget
def test_disk_budget_removes_least_recently_used_while_running(tmp_path, caplog):
    clock = FakeClock()
    store = SessionStore.open(tmp_path, FP, clock=clock)
    first = store.put(make_session(0, clock=clock))
    budget = 2 * first.disk_bytes + 10
    store = reopen(store, disk_budget_bytes=budget, clock=clock)
    second = store.put(make_session(1, clock=clock))
    store.get(first.id, None)  # first is now more recently used than second
    with caplog.at_level(logging.WARNING, logger="refine_tta.engine.sessions"):
        third = store.put(make_session(2, clock=clock))
    assert {s.id for s in store.list(None)} == {first.id, third.id}
    assert not (tmp_path / second.id).exists() and store.disk_bytes <= budget
    assert "disk budget" in caplog.text and second.id in caplog.text


def test_lowered_disk_budget_at_start_refuses_new_sessions_instead_of_deleting(tmp_path, caplog):
    clock = FakeClock()
    store = SessionStore.open(tmp_path, FP, clock=clock)
    sessions = [store.put(make_session(i, clock=clock)) for i in range(3)]
    store.get(sessions[0].id, None)  # 1 is now the least recently used
    one = sessions[0].disk_bytes
    with caplog.at_level(logging.WARNING, logger="refine_tta.engine.sessions"):
        store = reopen(store, disk_budget_bytes=one + 10, clock=clock)
    assert "over the disk budget" in caplog.text and "nothing is deleted" in caplog.text
    assert len(store) == 3 and all((tmp_path / s.id).is_dir() for s in sessions)
    with pytest.raises(StorageFull, match="over its disk budget session_disk_bytes"):
        store.check_room()
    with pytest.raises(StorageFull):
        store.put(make_session(9, clock=clock))
    assert len(store) == 3
    for s in sessions[:2]:  # the owner deletes two: room again
        store.delete(s.id, None)
    store.check_room()
    # An explicit flag prunes at start instead: the least recently used go, the newest stays.
    store = reopen(store, clock=clock)
    extra = [store.put(make_session(i, clock=clock)) for i in (4, 5)]
    pruned = reopen(store, disk_budget_bytes=one + 10, prune_at_start=True, clock=clock)
    assert [s.id for s in pruned.list(None)] == [extra[-1].id]


# ----------------------------------------------------------------------------- owners, ids, lock
def test_owner_isolation(tmp_path):
    store = SessionStore.open(tmp_path, FP)
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


def test_quarantined_sessions_of_another_owner_look_unknown(tmp_path):
    store = SessionStore.open(tmp_path, FP)
    s = make_session(1, owner="alice")
    store.put(s)
    store = reopen(store)
    flip_bytes(tmp_path / s.id / STATE_FILE)
    with pytest.raises(SessionDamaged):
        store.get(s.id, "alice")
    with pytest.raises(NotFound, match="not found") as info:
        store.get(s.id, "bob")
    assert not isinstance(info.value, SessionDamaged)
    assert json.loads((quarantine_entries(tmp_path)[0] / REASON_FILE).read_text())["owner"] == "alice"
    with pytest.raises(SessionDamaged):
        reopen(store).info(s.id, "alice")


@pytest.mark.parametrize("bad_id", ["../etc", "sess_", "sess_" + "g" * 32, "", "sess_" + "0" * 31 + "/"])
def test_malformed_ids_are_not_found(tmp_path, bad_id):
    store = SessionStore.open(tmp_path, FP)
    with pytest.raises(NotFound):
        store.get(bad_id, None)
    with pytest.raises(NotFound):
        store.delete(bad_id, None)


def test_one_exclusive_holder_per_state_directory(tmp_path):
    store = SessionStore.open(tmp_path, FP)
    with pytest.raises(StateDirLocked, match="already in use by another refine-tta process .*pid"):
        SessionStore.open(tmp_path, FP)
    with pytest.raises(StateDirLocked):
        StateDirLock.acquire(tmp_path, LockMode.SHARED)
    store.close()
    lock = StateDirLock.acquire(tmp_path, LockMode.SHARED)
    second = StateDirLock.acquire(tmp_path, LockMode.SHARED)  # shared holders coexist...
    with pytest.raises(StateDirLocked):  # ...and keep an exclusive one out
        StateDirLock.acquire(tmp_path)
    lock.release()
    second.release()
    SessionStore.open(tmp_path, FP).close()


def test_shared_mode_processes_see_each_others_writes_and_deletes(tmp_path):
    a = SessionStore(SessionStorage(tmp_path, FP, StateDirLock.acquire(tmp_path, LockMode.SHARED)))
    b = SessionStore(SessionStorage(tmp_path, FP, StateDirLock.acquire(tmp_path, LockMode.SHARED)))
    s = make_session(1)
    a.put(s)
    assert_same_tensors(b.get(s.id, None), s)  # written by a, found on disk by b
    t = make_session(2)
    b.put(t)
    assert {x.id for x in a.list(None)} == {s.id, t.id}
    a.get(s.id, None)
    b.delete(s.id, None)
    with pytest.raises(NotFound):  # a had it in memory: still not served once gone from disk
        a.get(s.id, None)
    assert [x.id for x in a.list(None)] == [t.id]
    # A shared holder does not remove staging directories: another process may be writing.
    staging = tmp_path / f"{storage_module.STAGING_PREFIX}{new_session_id()}-1-abcd"
    staging.mkdir()
    SessionStore(SessionStorage(tmp_path, FP, StateDirLock.acquire(tmp_path, LockMode.SHARED)))
    assert staging.is_dir()


def test_replica_preloads_another_replicas_session_and_drops_it_once_deleted(tmp_path):
    """What a replica of a deployment does (server.ray_app): load a session written by another
    replica before serving it, release it when the router forgets it, drop it once deleted."""
    a = SessionStore(SessionStorage(tmp_path, FP, StateDirLock.acquire(tmp_path, LockMode.SHARED)))
    b = SessionStore(SessionStorage(tmp_path, FP, StateDirLock.acquire(tmp_path, LockMode.SHARED)))
    s, t = make_session(1, owner="alice"), make_session(2)
    a.put(s)
    a.put(t)
    assert a.take_new_ids() == [s.id, t.id] and a.take_new_ids() == []
    assert b.take_new_ids() == []
    assert a.preload(s.id) is False  # a wrote it: already in memory
    assert (b.loaded_count, b.preload(s.id), b.loaded_count) == (0, True, 1)  # read and verified from disk
    assert b.preload(s.id) is False
    assert_same_tensors(b.get(s.id, "alice"), s)  # the request itself is still the owner's
    with pytest.raises(NotFound):
        b.get(s.id, None)
    b.release(s.id)
    assert b.loaded_count == 0 and s.id in b  # tensors dropped, still indexed; the next use reloads
    assert b.preload(s.id) is True
    b.preload(t.id)
    a.delete(s.id, "alice")
    assert b.drop_deleted() == [s.id]
    assert b.loaded_count == 1 and s.id not in b and t.id in b
    with pytest.raises(NotFound):
        b.preload(s.id)
    with pytest.raises(NotFound):
        b.preload("sess_" + "0" * 32)


def test_preload_of_a_damaged_session_quarantines_it(tmp_path):
    a = SessionStore(SessionStorage(tmp_path, FP, StateDirLock.acquire(tmp_path, LockMode.SHARED)))
    b = SessionStore(SessionStorage(tmp_path, FP, StateDirLock.acquire(tmp_path, LockMode.SHARED)))
    s = a.put(make_session(3))
    flip_bytes(tmp_path / s.id / "delta.safetensors")
    with pytest.raises(SessionDamaged):
        b.preload(s.id)
    assert not (tmp_path / s.id).exists() and len(quarantine_entries(tmp_path)) == 1
