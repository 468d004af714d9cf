"""Adapted documents kept as sessions: an in-memory LRU over a directory of complete session files.

Layout on disk, one directory per session::

    <dir>/sess_<32 hex>/state.safetensors   DocumentState (fast-weight memory after the document)
    <dir>/sess_<32 hex>/delta.safetensors   ParameterDelta (adapted parameters over the base model)
    <dir>/sess_<32 hex>/meta.json           written LAST: marks the session complete

Each file is written to a temporary name, fsynced and renamed, and ``meta.json`` (which records
the model fingerprint and the exact size of both tensor files) only after both tensor files are
in place. A directory without ``meta.json``, or whose tensor files do not have the recorded sizes,
was never acknowledged: it is removed when the store starts. Sessions made with another model (a
different fingerprint) are refused (logged, kept on disk, never served).

Memory holds the tensors of recently used sessions within a byte budget (least recently used are
dropped first; their disk copy stays and is loaded again on the next use). The disk has its own
byte budget: beyond it the least recently used sessions are deleted (logged).

Thread safety: every public method may be called from any thread. Tensor files are read and
written outside the lock; the index and the LRU are changed under it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refine_tta.engine.errors import NotFound
from refine_tta.model.state import DocumentState, StateMismatchError, read_state_header
from refine_tta.refine.delta import ParameterDelta

log = logging.getLogger(__name__)

SESSION_FORMAT = "refine-tta-session/1"
STATE_FILE = "state.safetensors"
DELTA_FILE = "delta.safetensors"
META_FILE = "meta.json"
_ID_RE = re.compile(r"^sess_[0-9a-f]{32}$")


def new_session_id() -> str:
    """``sess_`` + 128 random bits in hex (unguessable: the id is the handle to a user's document)."""
    return "sess_" + secrets.token_hex(16)


def is_session_id(value: str) -> bool:
    """True for a well-formed session id (anything else can never name a session directory)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


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
        """The JSON-able metadata (no tensors)."""
        return {"session_id": self.id, "owner": self.owner, "created": self.created, "last_used": self.last_used,
                "document_tokens": self.document_tokens, "state_bytes": self.state_bytes,
                "delta_bytes": self.delta_bytes, "settings": self.settings, "stats": self.stats}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to a temporary file, fsync it, rename it over ``path``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class SessionStore:
    """Sessions of one base model (identified by ``fingerprint``) in ``directory``.

    memory_budget_bytes / disk_budget_bytes: None = unlimited. The session just stored or used is
    always kept, even alone over a budget. ``device``: where loaded tensors are put.
    """

    def __init__(
        self,
        directory: str | Path,
        fingerprint: dict[str, str],
        *,
        memory_budget_bytes: int | None = None,
        disk_budget_bytes: int | None = None,
        device: str | torch.device = "cpu",
        clock: Callable[[], float] = time.time,
    ):
        self.directory = Path(directory)
        self.fingerprint = dict(fingerprint)
        self.memory_budget_bytes = memory_budget_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.device = torch.device(device)
        self._clock = clock
        self._lock = threading.RLock()
        self._index: dict[str, Session] = {}  # every servable session, tensors stripped
        self._loaded: OrderedDict[str, tuple[DocumentState, ParameterDelta]] = OrderedDict()  # LRU, oldest first
        self.refused: dict[str, tuple[str | None, str]] = {}  # id -> (owner, why), sessions of another model
        self.directory.mkdir(parents=True, exist_ok=True)
        self._scan()

    # ------------------------------------------------------------------------------- start-up scan
    def _scan(self) -> None:
        removed = 0
        for entry in sorted(self.directory.iterdir()):
            if not entry.is_dir() or not is_session_id(entry.name):
                if not entry.name.startswith("."):
                    log.warning("session store: ignoring unexpected entry %s", entry)
                continue
            session = self._read_complete(entry)
            if session is None:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
            elif session.id not in self.refused:
                self._index[session.id] = session
        log.info("session store %s: %d sessions indexed, %d incomplete removed, %d refused (other model)",
                 self.directory, len(self._index), removed, len(self.refused))
        with self._lock:
            self._enforce_disk_budget(keep=None)

    def _read_complete(self, path: Path) -> Session | None:
        """The session in ``path`` if it is complete (None if not); records refused sessions."""
        meta_path = path / META_FILE
        if not meta_path.is_file():
            log.warning("session store: %s has no %s (half-written); removing it", path.name, META_FILE)
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != SESSION_FORMAT or meta.get("session_id") != path.name:
                raise ValueError(f"format {meta.get('format')!r}, id {meta.get('session_id')!r}")
            files = {name: int(meta["files"][name]) for name in (STATE_FILE, DELTA_FILE)}
            session = Session(path.name, meta.get("owner"), float(meta["created"]), float(meta["last_used"]),
                              dict(meta["settings"]), dict(meta["stats"]), int(meta["document_tokens"]),
                              int(meta["state_bytes"]), int(meta["delta_bytes"]), disk_bytes=sum(files.values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("session store: %s has an unreadable %s (%s); removing it", path.name, META_FILE, exc)
            return None
        saved_fp = meta.get("fingerprint") or {}
        diff = [k for k in self.fingerprint if saved_fp.get(k) != self.fingerprint[k]]
        if diff:
            why = f"made with another model (differs in {', '.join(diff)})"
            log.warning("session store: refusing %s: %s", path.name, why)
            self.refused[path.name] = (session.owner, why)
            return session
        for name, size in files.items():
            file = path / name
            actual = file.stat().st_size if file.is_file() else None
            if actual != size:
                log.warning("session store: %s/%s has %s bytes, %d recorded (truncated); removing the session",
                            path.name, name, actual, size)
                return None
        try:
            read_state_header(path / STATE_FILE)
        except StateMismatchError as exc:
            log.warning("session store: %s: %s; removing the session", path.name, exc)
            return None
        for stray in path.glob(".*"):  # temporary files of an interrupted rewrite of meta.json
            stray.unlink(missing_ok=True)
        return session

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
    def loaded_count(self) -> int:
        with self._lock:
            return len(self._loaded)

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._index

    # ------------------------------------------------------------------------------------- access
    def _lookup(self, session_id: str, owner: str | None) -> Session:
        """The indexed session; NotFound for unknown ids and for other owners' sessions alike."""
        session = self._index.get(session_id) if is_session_id(session_id) else None
        if session is not None and session.owner == owner:
            return session
        refused = self.refused.get(session_id)
        if refused is not None and refused[0] == owner:
            raise NotFound(f"session {session_id!r} was {refused[1]}; this server does not serve it")
        raise NotFound(f"session {session_id!r} not found")

    def info(self, session_id: str, owner: str | None) -> Session:
        """Metadata of a session (no tensors, does not count as a use)."""
        with self._lock:
            return self._lookup(session_id, owner).without_tensors()

    def list(self, owner: str | None) -> list[Session]:
        """Metadata of the owner's sessions, oldest first."""
        with self._lock:
            mine = [s.without_tensors() for s in self._index.values() if s.owner == owner]
        return sorted(mine, key=lambda s: (s.created, s.id))

    def get(self, session_id: str, owner: str | None) -> Session:
        """The session with its tensors (loaded from disk if evicted); marks it most recently used."""
        with self._lock:
            session = self._lookup(session_id, owner)
            session.last_used = max(session.last_used, self._clock())
            tensors = self._loaded.get(session_id)
            if tensors is not None:
                self._loaded.move_to_end(session_id)
            meta = self._meta_json(session)
        if tensors is None:
            tensors = self._load_tensors(session_id)
            with self._lock:
                if session_id not in self._index:  # deleted while loading
                    raise NotFound(f"session {session_id!r} not found")
                self._loaded[session_id] = tensors
                self._loaded.move_to_end(session_id)
                self._evict_memory(keep=session_id)
        try:
            _write_json_atomic(self.directory / session_id / META_FILE, meta)  # persist last_used
        except FileNotFoundError:  # deleted meanwhile; the caller still gets the tensors it asked for
            pass
        return dataclasses.replace(session, state=tensors[0], delta=tensors[1])

    def _load_tensors(self, session_id: str) -> tuple[DocumentState, ParameterDelta]:
        path = self.directory / session_id
        try:
            state = DocumentState.load(path / STATE_FILE, self.fingerprint, device=self.device)
            delta = ParameterDelta.load(path / DELTA_FILE, self.fingerprint, device=self.device)
        except Exception as exc:  # truncated / corrupt / foreign files: never serve them
            log.error("session store: could not load %s (%s: %s); removing it", session_id, type(exc).__name__, exc)
            self._remove(session_id)
            raise NotFound(f"session {session_id!r} could not be read back from disk and was removed") from exc
        return state, delta

    def put(self, session: Session) -> Session:
        """Write a new session (tensors required) to disk, then index it; returns its metadata.

        When this returns the session is acknowledged: it survives a restart.
        """
        if not session.loaded:
            raise ValueError("put needs a session with its state and delta")
        if not is_session_id(session.id):
            raise ValueError(f"malformed session id {session.id!r}")
        path = self.directory / session.id
        path.mkdir(parents=False, exist_ok=False)
        try:
            state_size = session.state.save(path / STATE_FILE, self.fingerprint, extra={"session_id": session.id})
            delta_size = session.delta.save(path / DELTA_FILE, self.fingerprint)
            stored = dataclasses.replace(session.without_tensors(), state_bytes=session.state.nbytes,
                                         delta_bytes=session.delta.nbytes, disk_bytes=state_size + delta_size)
            meta = self._meta_json(stored, files={STATE_FILE: state_size, DELTA_FILE: delta_size})
            _write_json_atomic(path / META_FILE, meta)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        with self._lock:
            self._index[stored.id] = stored
            self._loaded[stored.id] = (session.state, session.delta)
            self._evict_memory(keep=stored.id)
            self._enforce_disk_budget(keep=stored.id)
            return stored.without_tensors()

    def set_owner(self, session_id: str, owner: str | None, new_owner: str | None) -> Session:
        """Give ``owner``'s session to ``new_owner`` (e.g. a session made before API keys were set);
        NotFound if it is not ``owner``'s. Returns the updated metadata."""
        with self._lock:
            session = self._lookup(session_id, owner)
            session.owner = new_owner
            _write_json_atomic(self.directory / session_id / META_FILE, self._meta_json(session))
            return session.without_tensors()

    def delete(self, session_id: str, owner: str | None) -> None:
        """Remove a session from memory and disk; NotFound if it is not the owner's."""
        with self._lock:
            self._lookup(session_id, owner)
            self._remove(session_id)

    # ----------------------------------------------------------------------------------- internals
    def _meta_json(self, session: Session, files: dict[str, int] | None = None) -> dict[str, Any]:
        if files is None:  # a rewrite keeps the recorded sizes
            files = {STATE_FILE: None, DELTA_FILE: None}
            try:
                old = json.loads((self.directory / session.id / META_FILE).read_text(encoding="utf-8"))
                files = old["files"]
            except (OSError, ValueError, KeyError):
                pass
        return {"format": SESSION_FORMAT, **session.meta(), "fingerprint": self.fingerprint, "files": files}

    def _remove(self, session_id: str) -> None:
        with self._lock:
            self._index.pop(session_id, None)
            self._loaded.pop(session_id, None)
        shutil.rmtree(self.directory / session_id, ignore_errors=True)

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
        """Delete the least recently used sessions beyond the disk budget."""
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
            self._remove(session.id)
