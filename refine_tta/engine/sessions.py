"""Adapted documents kept as sessions: an in-memory LRU over the session storage.

The on-disk format (atomic publication, checksums, quarantine, the state-directory lock) belongs to
:mod:`refine_tta.engine.storage`; this module turns a :class:`Session`'s :class:`DocumentState` and
:class:`ParameterDelta` into plain tensors for it and back, and keeps the index and the budgets.

Memory holds the tensors of recently used sessions within a byte budget (least recently used are
dropped first; their disk copy stays and is loaded, checksum-verified, on the next use). The disk
has its own byte budget: a new session that takes the store over it deletes the least recently used
others (logged). A store found over its budget at start (the budget was lowered) deletes nothing:
it logs and refuses new sessions (:class:`StorageFull`) until enough are deleted, unless
``prune_at_start`` says to delete the least recently used ones.

``last_used`` lives in memory and is written to a small per-session file at most every
``last_used_flush_s`` seconds and on :meth:`SessionStore.close`, never by rewriting the metadata.

Thread safety: every public method may be called from any thread. Files are read and written
outside the lock; the index and the LRU are changed under it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refine_tta.engine.errors import NotFound
from refine_tta.engine.storage import (
    IndexEntry,
    SessionDamaged,
    SessionRecord,
    SessionRefused,
    SessionStorage,
    StorageFull,
    StoredPart,
    is_session_id,
    new_session_id,
)
from refine_tta.model.loading import ModelFingerprint
from refine_tta.model.state import DocumentState
from refine_tta.refine.delta import ParameterDelta

log = logging.getLogger(__name__)

__all__ = ["Session", "SessionStore", "from_parts", "is_session_id", "new_session_id", "to_parts"]


@dataclass
class Session:
    """One adapted document. ``state``/``delta`` are None while only the disk copy exists.

    owner: opaque owner key (a hash of the API key) or None when the server has no keys.
    settings: the RefineConfig used (``to_dict()``); stats: the adaptation's statistics.
    state_bytes / delta_bytes: bytes of the tensors in memory; disk_bytes: bytes of the files.
    """

    id: str
    owner: str | None
    created: float
    last_used: float
    settings: dict[str, Any]
    stats: dict[str, Any]
    document_tokens: int
    state_bytes: int
    delta_bytes: int
    state: DocumentState | None = field(default=None, repr=False)
    delta: ParameterDelta | None = field(default=None, repr=False)
    disk_bytes: int = 0

    @classmethod
    def create(cls, owner: str | None, settings: dict[str, Any], stats: dict[str, Any], document_tokens: int,
               state: DocumentState, delta: ParameterDelta, now: float | None = None) -> Session:
        now = time.time() if now is None else now
        return cls(new_session_id(), owner, now, now, settings, stats, document_tokens, state.nbytes,
                   delta.nbytes, state, delta)

    @property
    def nbytes(self) -> int:
        """Bytes the session's tensors take in memory (state + delta)."""
        return self.state_bytes + self.delta_bytes

    @property
    def loaded(self) -> bool:
        return self.state is not None and self.delta is not None

    def without_tensors(self) -> Session:
        return dataclasses.replace(self, state=None, delta=None)

    def meta(self) -> dict[str, Any]:
        """The JSON-able metadata stored with the tensors (no tensors, no last_used)."""
        return {"owner": self.owner, "created": self.created, "document_tokens": self.document_tokens,
                "state_bytes": self.state_bytes, "delta_bytes": self.delta_bytes, "settings": self.settings,
                "stats": self.stats}

    @classmethod
    def from_entry(cls, entry: IndexEntry) -> Session:
        """The session described by stored metadata (KeyError/TypeError/ValueError if garbled)."""
        m = entry.meta
        owner = m["owner"]
        if owner is not None and not isinstance(owner, str):
            raise TypeError(f"owner is a {type(owner).__name__}")
        return cls(entry.session_id, owner, float(m["created"]), float(entry.last_used), dict(m["settings"]),
                   dict(m["stats"]), int(m["document_tokens"]), int(m["state_bytes"]), int(m["delta_bytes"]),
                   disk_bytes=entry.disk_bytes)


STATE_PART, DELTA_PART = "state", "delta"


def to_parts(state: DocumentState, delta: ParameterDelta) -> dict[str, StoredPart]:
    """A session's tensors as storage parts: plain tensors plus JSON-able descriptions."""
    return {STATE_PART: StoredPart(state.state_dict(), {"n_tokens": state.n_tokens}),
            DELTA_PART: StoredPart(dict(delta.tensors), {"kind": delta.kind, "scale": float(delta.scale)})}


def from_parts(parts: dict[str, StoredPart], device: torch.device) -> tuple[DocumentState, ParameterDelta]:
    """Inverse of :func:`to_parts`, tensors moved to ``device`` (KeyError/ValueError if malformed)."""
    state_part, delta_part = parts[STATE_PART], parts[DELTA_PART]
    state = DocumentState.from_state_dict(state_part.tensors, int(state_part.description["n_tokens"])).to(device)
    delta = ParameterDelta(str(delta_part.description["kind"]),
                           {k: v.to(device) for k, v in delta_part.tensors.items()
                            if k != "__empty__"},  # format 1's marker in a delta without tensors
                           float(delta_part.description["scale"]))
    return state, delta


class SessionStore:
    """Sessions of one base model in one :class:`SessionStorage` (its directory and lock).

    memory_budget_bytes / disk_budget_bytes: None = unlimited. The session just stored or used is
    always kept, even alone over a budget. ``device``: where loaded tensors are put.
    prune_at_start: delete least recently used sessions when the disk budget is exceeded at start
    (default: keep them, log, and refuse new sessions while over budget).
    """

    def __init__(
        self,
        storage: SessionStorage,
        *,
        memory_budget_bytes: int | None = None,
        disk_budget_bytes: int | None = None,
        prune_at_start: bool = False,
        device: str | torch.device = "cpu",
        clock: Callable[[], float] = time.time,
        last_used_flush_s: float = 60.0,
    ):
        self.storage = storage
        self.memory_budget_bytes = memory_budget_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.device = torch.device(device)
        self.last_used_flush_s = last_used_flush_s
        self._clock = clock
        self._lock = threading.RLock()
        self._index: dict[str, Session] = {}  # every servable session, tensors stripped
        self._loaded: OrderedDict[str, tuple[DocumentState, ParameterDelta]] = OrderedDict()  # LRU, oldest first
        self._unflushed: dict[str, float] = {}  # id -> last_used not yet written
        self._new_ids: deque[str] = deque(maxlen=4096)  # stored since the last take_new_ids() (bounded)
        self._last_flush = clock()
        self.refused: dict[str, tuple[str | None, str]] = {}  # id -> (owner, why): another model or format
        self.quarantined: dict[str, tuple[str | None, str]] = {}  # id -> (owner, why)
        self._scan(prune_at_start)

    @classmethod
    def open(cls, directory: str | Path, fingerprint: ModelFingerprint, **options: Any) -> SessionStore:
        """A store on ``directory``, locked exclusively by this process (scripts and tests)."""
        return cls(SessionStorage(directory, fingerprint), **options)

    @property
    def directory(self) -> Path:
        return self.storage.directory

    # ------------------------------------------------------------------------------- start-up scan
    def _scan(self, prune_at_start: bool) -> None:
        report = self.storage.scan()
        self.refused = dict(report.refused)
        self.quarantined = dict(report.quarantined)
        for entry in report.sessions:
            session = self._from_entry(entry)
            if session is not None:
                self._index[session.id] = session
        log.info("session store %s: %d sessions indexed (%d bytes), %d refused (other model or format), "
                 "%d in quarantine, %d unfinished writes removed", self.directory, len(self._index), self.disk_bytes,
                 len(self.refused), len(self.quarantined), report.staging_removed)
        with self._lock:
            if self.over_disk_budget:
                if prune_at_start:
                    self._enforce_disk_budget(keep=None)
                else:
                    log.warning("session store: %d bytes on disk, over the disk budget of %d bytes; nothing is "
                                "deleted: new sessions are refused until sessions are deleted (or start with "
                                "pruning enabled to delete the least recently used)",
                                self.disk_bytes, self.disk_budget_bytes)

    def _from_entry(self, entry: IndexEntry) -> Session | None:
        """The session, or None after quarantining one whose session fields are garbled."""
        try:
            return Session.from_entry(entry)
        except (KeyError, TypeError, ValueError) as exc:
            reason = f"meta.json lacks or garbles a session field ({type(exc).__name__}: {exc})"
            owner = entry.meta.get("owner")
            self.storage.quarantine(entry.session_id, reason)
            self.quarantined[entry.session_id] = (owner if isinstance(owner, str) else None, reason)
            return None

    # ---------------------------------------------------------------------------------- accounting
    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return sum(self._index[i].nbytes for i in self._loaded if i in self._index)

    @property
    def disk_bytes(self) -> int:
        with self._lock:
            return sum(s.disk_bytes for s in self._index.values())

    @property
    def over_disk_budget(self) -> bool:
        return self.disk_budget_bytes is not None and self.disk_bytes > self.disk_budget_bytes

    @property
    def loaded_count(self) -> int:
        with self._lock:
            return len(self._loaded)

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._index

    def check_room(self) -> None:
        """StorageFull while the store is over its disk budget (it was found so at start)."""
        with self._lock:
            if self.over_disk_budget:
                raise StorageFull(self.disk_bytes, self.disk_budget_bytes)

    # ------------------------------------------------------------------------------------- access
    def _lookup(self, session_id: str, owner: str | None) -> Session:
        """The indexed session; NotFound for unknown ids and for other owners' sessions alike
        (SessionDamaged / SessionRefused, both NotFound, for the owner's quarantined or refused ones)."""
        session = self._index.get(session_id) if is_session_id(session_id) else None
        if session is None and self.storage.shared and self.storage.exists(session_id):
            session = self._adopt(session_id)  # written by another process of the deployment
        if session is not None and session.owner == owner:
            return session
        damaged = self.quarantined.get(session_id)
        if damaged is not None and damaged[0] == owner:
            raise SessionDamaged(session_id, damaged[1])
        refused = self.refused.get(session_id)
        if refused is not None and refused[0] == owner:
            raise SessionRefused(refused[1])
        raise NotFound(f"session {session_id!r} not found")

    def _adopt(self, session_id: str) -> Session | None:
        """Shared mode: index a session another process wrote (None if it is not servable)."""
        try:
            session = self._from_entry(self.storage.read_meta(session_id))
        except SessionRefused as exc:
            self.refused[session_id] = (None, str(exc))
            return None
        except NotFound:  # gone again, or damaged (then quarantined and recorded by storage)
            return None
        if session is not None:
            self._index[session_id] = session
        return session

    def _forget(self, session_id: str) -> None:
        with self._lock:
            self._index.pop(session_id, None)
            self._loaded.pop(session_id, None)
            self._unflushed.pop(session_id, None)

    def _quarantined_now(self, session_id: str, reason: str) -> None:
        with self._lock:
            session = self._index.get(session_id)
            self.quarantined[session_id] = (None if session is None else session.owner, reason)
        self._forget(session_id)

    def info(self, session_id: str, owner: str | None) -> Session:
        """Metadata of a session (no tensors, does not count as a use)."""
        with self._lock:
            return self._lookup(session_id, owner).without_tensors()

    def list(self, owner: str | None) -> list[Session]:
        """Metadata of the owner's sessions, oldest first."""
        if self.storage.shared:
            self._refresh()
        with self._lock:
            mine = [s.without_tensors() for s in self._index.values() if s.owner == owner]
        return sorted(mine, key=lambda s: (s.created, s.id))

    def _refresh(self) -> None:
        """Shared mode: follow the sessions other processes added and deleted."""
        on_disk = set(self.storage.session_ids())
        with self._lock:
            for gone in set(self._index) - on_disk:
                self._forget(gone)
            for new in on_disk - set(self._index) - set(self.refused):
                self._adopt(new)

    def get(self, session_id: str, owner: str | None) -> Session:
        """The session with its tensors (loaded and verified from disk if not in memory); marks it
        most recently used. SessionDamaged if its files fail verification (it is quarantined);
        Unavailable if they cannot be read right now (it is kept)."""
        with self._lock:
            session = self._lookup(session_id, owner)
            tensors = self._loaded.get(session_id)
            if tensors is not None:
                self._loaded.move_to_end(session_id)
        if tensors is not None and self.storage.shared and not self.storage.exists(session_id):
            self._forget(session_id)  # deleted by another process
            raise NotFound(f"session {session_id!r} not found")
        if tensors is None:
            tensors = self._load_tensors(session_id)
            self._keep_loaded(session_id, tensors)
        with self._lock:
            session.last_used = max(session.last_used, self._clock())
            self._unflushed[session_id] = session.last_used
            due = self._clock() - self._last_flush >= self.last_used_flush_s
        if due:
            self.flush()
        return dataclasses.replace(session, state=tensors[0], delta=tensors[1])

    def _keep_loaded(self, session_id: str, tensors: tuple[DocumentState, ParameterDelta]) -> None:
        """Hold freshly loaded tensors as the most recently used (NotFound if deleted while loading)."""
        with self._lock:
            if session_id not in self._index:
                raise NotFound(f"session {session_id!r} not found")
            self._loaded[session_id] = tensors
            self._loaded.move_to_end(session_id)
            self._evict_memory(keep=session_id)

    def preload(self, session_id: str) -> bool:
        """Have a session's tensors in memory, read and verified from storage if they are not;
        True when they were read. For a deployment whose router sends a session's requests to the
        replica that holds it: that replica loads it before the request runs. No owner check
        (nothing is returned; the request itself is checked by :meth:`get`). NotFound,
        SessionDamaged and Unavailable as :meth:`get`."""
        with self._lock:
            session = self._index.get(session_id) if is_session_id(session_id) else None
            if session is None and self.storage.shared and self.storage.exists(session_id):
                session = self._adopt(session_id)
            if session is None:
                raise NotFound(f"session {session_id!r} not found")
            if session_id in self._loaded:
                self._loaded.move_to_end(session_id)
                return False
        self._keep_loaded(session_id, self._load_tensors(session_id))
        return True

    def take_new_ids(self) -> list[str]:
        """Ids of the sessions this store wrote since the last call (a deployment's replica
        advertises them to its router), oldest first."""
        with self._lock:
            new = list(self._new_ids)
            self._new_ids.clear()
        return new

    def release(self, session_id: str) -> None:
        """Drop a session's tensors from memory (its disk copy stays; the next use loads it)."""
        with self._lock:
            self._loaded.pop(session_id, None)

    def drop_deleted(self) -> list[str]:
        """Shared mode: forget the sessions held in memory that another process deleted from disk;
        returns their ids. (A request never gets one anyway: :meth:`get` checks the disk first.)"""
        with self._lock:
            held = list(self._loaded)
        gone = [session_id for session_id in held if not self.storage.exists(session_id)]
        for session_id in gone:
            self._forget(session_id)
        return gone

    def _load_tensors(self, session_id: str) -> tuple[DocumentState, ParameterDelta]:
        try:
            _, parts = self.storage.read(session_id)
        except SessionDamaged as exc:
            self._quarantined_now(session_id, exc.reason)
            raise
        except NotFound:
            self._forget(session_id)
            raise
        try:
            return from_parts(parts, self.device)
        except (KeyError, ValueError, TypeError) as exc:  # verified files that do not make a session
            reason = f"the stored parts do not form a session ({type(exc).__name__}: {exc})"
            self._quarantined_now(session_id, reason)
            self.storage.quarantine(session_id, reason)
            raise SessionDamaged(session_id, reason) from None

    def put(self, session: Session) -> Session:
        """Write a new session (tensors required) to disk, then index it; returns its metadata.

        When this returns the session is acknowledged: it survives a restart. StorageFull while the
        store is over its disk budget; Unavailable on transient I/O errors (nothing stored)."""
        if not session.loaded:
            raise ValueError("put needs a session with its state and delta")
        if not is_session_id(session.id):
            raise ValueError(f"malformed session id {session.id!r}")
        self.check_room()
        stored = dataclasses.replace(session.without_tensors(), state_bytes=session.state.nbytes,
                                     delta_bytes=session.delta.nbytes)
        parts = to_parts(session.state, session.delta)
        disk_bytes = self.storage.write(SessionRecord(session.id, stored.meta(), parts))
        stored = dataclasses.replace(stored, disk_bytes=disk_bytes)
        with self._lock:
            self._index[stored.id] = stored
            self._loaded[stored.id] = (session.state, session.delta)
            self._new_ids.append(stored.id)
            self._evict_memory(keep=stored.id)
            self._enforce_disk_budget(keep=stored.id)
            return stored.without_tensors()

    def set_owner(self, session_id: str, owner: str | None, new_owner: str | None) -> Session:
        """Give ``owner``'s session to ``new_owner`` (e.g. a session made before API keys were set);
        NotFound if it is not ``owner``'s. Returns the updated metadata."""
        with self._lock:
            session = self._lookup(session_id, owner)
            self.storage.set_owner(session_id, new_owner)
            session.owner = new_owner
            return session.without_tensors()

    def delete(self, session_id: str, owner: str | None) -> None:
        """Remove a session from memory and disk; NotFound if it is not the owner's."""
        with self._lock:
            self._lookup(session_id, owner)
            self._forget(session_id)
        self.storage.delete(session_id)

    def flush(self) -> None:
        """Write the pending ``last_used`` times (one small file each; no metadata rewrite)."""
        with self._lock:
            pending, self._unflushed = self._unflushed, {}
            self._last_flush = self._clock()
        for session_id, when in pending.items():
            try:
                self.storage.write_last_used(session_id, when)
            except OSError as exc:  # a hint only: never fail a request for it
                log.warning("session store: could not record the last use of %s (%s)", session_id, exc)

    def close(self) -> None:
        """Flush ``last_used``; release the directory's lock if the storage took it itself."""
        self.flush()
        self.storage.close()

    # ----------------------------------------------------------------------------------- internals
    def _evict_memory(self, keep: str | None) -> None:
        """Drop the least recently used tensors beyond the memory budget (disk copies stay)."""
        if self.memory_budget_bytes is None:
            return
        total = self.memory_bytes
        for session_id in list(self._loaded):
            if total <= self.memory_budget_bytes:
                break
            if session_id == keep:
                continue
            self._loaded.pop(session_id)
            total -= self._index[session_id].nbytes if session_id in self._index else 0
            log.debug("session store: evicted %s from memory (kept on disk)", session_id)

    def _enforce_disk_budget(self, keep: str | None) -> None:
        """Delete the least recently used sessions beyond the disk budget (logged)."""
        if self.disk_budget_bytes is None:
            return
        total = self.disk_bytes
        for session in sorted(self._index.values(), key=lambda s: (s.last_used, s.created)):
            if total <= self.disk_budget_bytes:
                break
            if session.id == keep:
                continue
            log.warning("session store: disk budget %d bytes exceeded (%d); deleting least recently used "
                        "session %s (%d bytes)", self.disk_budget_bytes, total, session.id, session.disk_bytes)
            total -= session.disk_bytes
            self._forget(session.id)
            try:
                self.storage.delete(session.id)
            except NotFound:
                pass
