"""A session's on-disk format, and the only code that reads or writes it (docs/session-storage.md).

Layout of a state directory::

    <dir>/.lock                        flock: one server (exclusive) or one deployment (shared)
    <dir>/sess_<32 hex>/<part>.safetensors   one tensor file per part ("state", "delta", ...)
    <dir>/sess_<32 hex>/meta.json      written last: format, fingerprint, size + SHA-256 of each file
    <dir>/sess_<32 hex>/last_used      a float, rewritten rarely (not part of the checksummed record)
    <dir>/quarantine/sess_<id>.<UTC>/  sessions that could not be read, moved aside with REASON.json
    <dir>/.staging-...                 a session being written (invisible; removed if its writer died)

Writes are invisible until complete: every file of a session is written and fsynced inside a
staging directory, ``meta.json`` last, then the directory is renamed to ``sess_<id>`` (one atomic
rename) and the parent fsynced. So any ``sess_*`` directory another process can see is complete,
and a crash leaves at most a staging directory, which was never acknowledged. Deletion renames the
directory away first, so it disappears atomically too.

Reads verify everything: the format, the model fingerprint (:meth:`ModelFingerprint.mismatch`),
and each file's size and SHA-256 over exactly the bytes that are then parsed. Content that does not
verify is never served and never deleted: the directory is moved to ``quarantine/`` with the reason
(logged). Transient I/O errors (EMFILE, EIO, ENOSPC, ...) are retried, then reported as
:class:`~refine_tta.engine.errors.Unavailable` (HTTP 503 + Retry-After) with the session left as is.

No model objects here: callers hand over plain ``dict[str, Tensor]`` per part plus JSON-able
descriptions (see :class:`SessionRecord`).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from refine_tta.engine.errors import EngineError, NotFound, Unavailable
from refine_tta.model.loading import ModelFingerprint

log = logging.getLogger(__name__)

SESSION_FORMAT = "refine-tta-session/2"
FORMAT_1 = "refine-tta-session/1"  # upgraded in place at start (see SessionStorage._upgrade_format_1)
META_FILE = "meta.json"
LAST_USED_FILE = "last_used"
LOCK_FILE = ".lock"
QUARANTINE_DIR = "quarantine"
REASON_FILE = "REASON.json"
STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"
_ID_RE = re.compile(r"^sess_[0-9a-f]{32}$")
_PART_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EAGAIN,
                              errno.EINTR, errno.ENOMEM, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE})
"""OSError numbers that say "not now" rather than "this data is bad": retried, then 503."""

RETRY_DELAYS_S = (0.05, 0.25, 1.0)
RETRY_AFTER_S = 2.0

T = TypeVar("T")


def new_session_id() -> str:
    """``sess_`` + 128 random bits in hex (unguessable: the id is the handle to a user's document)."""
    return "sess_" + secrets.token_hex(16)


def is_session_id(value: object) -> bool:
    """True for a well-formed session id (anything else can never name a session directory)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


# ------------------------------------------------------------------------------------------ errors
class StateDirLocked(RuntimeError):
    """Another process holds the state directory's lock (a second server on one ``--state-dir``)."""


class SessionDamaged(NotFound):
    """The session's files did not verify; it was moved to quarantine and will not be served."""

    def __init__(self, session_id: str, reason: str):
        self.session_id, self.reason = session_id, reason
        super().__init__(f"session {session_id!r} is damaged on disk ({reason}); it was quarantined and cannot be "
                         "served: adapt the document again")


class SessionRefused(NotFound):
    """The session was made with another model (or an unknown format); kept on disk, not served."""


class StorageFull(EngineError):
    """The store is over its disk budget; nothing new is stored until sessions are deleted."""

    def __init__(self, used: int, budget: int):
        self.used, self.budget = used, budget
        super().__init__(f"the session store holds {used} bytes, over its disk budget session_disk_bytes={budget}; "
                         "delete sessions (DELETE /v1/sessions/{id}) or raise the budget; nothing was stored")


class _Corrupt(Exception):
    """Internal: the content of a session directory does not verify (the message says why)."""


# ------------------------------------------------------------------------------------------ values
@dataclass(frozen=True)
class StoredPart:
    """One tensor file of a session: plain CPU tensors and a JSON-able description of them
    (e.g. ``{"n_tokens": 812}`` for a state, ``{"kind": "lora", "scale": 2.0}`` for a delta)."""

    tensors: dict[str, torch.Tensor]
    description: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionRecord:
    """What is stored for one session: its id, JSON-able metadata (owner, created, settings, stats,
    sizes: anything the caller wants back), and its parts by name (``[a-z][a-z0-9_]*``)."""

    session_id: str
    meta: dict[str, Any]
    parts: dict[str, StoredPart]


@dataclass(frozen=True)
class IndexEntry:
    """A session found on disk without reading its tensors: metadata, bytes on disk, last use."""

    session_id: str
    meta: dict[str, Any]
    disk_bytes: int
    last_used: float


@dataclass(frozen=True)
class ScanReport:
    """What :meth:`SessionStorage.scan` found: servable sessions, refused ones (id -> (owner, why)),
    quarantined ones (id -> (owner, why), earlier runs' too), and leftover staging directories removed."""

    sessions: list[IndexEntry]
    refused: dict[str, tuple[str | None, str]]
    quarantined: dict[str, tuple[str | None, str]]
    staging_removed: int


class LockMode(enum.Enum):
    """EXCLUSIVE: one server owns the directory (the default). SHARED: several processes of one
    deployment use it together (each sees the others' sessions; see docs/session-storage.md)."""

    EXCLUSIVE = "exclusive"
    SHARED = "shared"


# ----------------------------------------------------------------------------------- low-level I/O
def fsync_dir(path: Path) -> None:
    """fsync a directory (makes a rename in it durable); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` and (``durable``) fsync it. For files in a directory nobody sees yet."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically: a temporary file in the same directory, (fsync,)
    rename, (fsync the directory). On any failure the temporary file is removed and ``path`` is
    untouched. The one writer for files that are visible while being replaced."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write_file(tmp, data, durable=durable)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def _describe_os_error(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return f"{name}: {exc.strerror or exc}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= len(data) - 8:
        raise ValueError("not a safetensors file")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


# --------------------------------------------------------------------------------------------- lock
class StateDirLock:
    """An ``flock`` on ``<dir>/.lock``, held for the life of the process (the kernel drops it when
    the process dies, even by kill -9). Exclusive: one server. Shared: many processes of one
    deployment, and no exclusive holder. Raises :class:`StateDirLocked` at once when taken."""

    def __init__(self, directory: Path, mode: LockMode, fd: int):
        self.directory, self.mode, self._fd = directory, mode, fd

    @classmethod
    def acquire(cls, directory: str | Path, mode: LockMode = LockMode.EXCLUSIVE) -> StateDirLock:
        import fcntl

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        flag = fcntl.LOCK_EX if mode is LockMode.EXCLUSIVE else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, flag | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise StateDirLocked(
                f"the state directory {directory} is already in use by another refine-tta process ({holder}); "
                f"stop it or give this server another --state-dir") from None
        if mode is LockMode.EXCLUSIVE:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, {mode.value}".encode(), 0)
        log.info("state directory %s locked (%s)", directory, mode.value)
        return cls(directory, mode, fd)

    def release(self) -> None:
        if self._fd >= 0:
            if self.mode is LockMode.EXCLUSIVE:
                os.ftruncate(self._fd, 0)  # no stale "in use by pid N" for the next contender
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1

    def __del__(self) -> None:  # an unreachable lock guards nothing
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass

    @property
    def held(self) -> bool:
        return self._fd >= 0


# ------------------------------------------------------------------------------------------ storage
class SessionStorage:
    """The sessions of one base model (``fingerprint``) in one locked directory.

    ``lock``: a held :class:`StateDirLock` on ``directory`` (taken here, exclusive, when None).
    Thread-safe: no state but the lock and the directory itself.
    """

    def __init__(self, directory: str | Path, fingerprint: ModelFingerprint, lock: StateDirLock | None = None):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self._owns_lock = lock is None
        self.lock = lock if lock is not None else StateDirLock.acquire(self.directory)
        if Path(self.lock.directory).resolve() != self.directory.resolve() or not self.lock.held:
            raise ValueError(f"the lock given is not a held lock on {self.directory}")
        self.quarantine_dir = self.directory / QUARANTINE_DIR

    def close(self) -> None:
        """Release the lock if this object took it (a lock handed in is released by its owner)."""
        if self._owns_lock:
            self.lock.release()

    @property
    def shared(self) -> bool:
        return self.lock.mode is LockMode.SHARED

    def path(self, session_id: str) -> Path:
        if not is_session_id(session_id):
            raise NotFound(f"session {session_id!r} not found")
        return self.directory / session_id

    def exists(self, session_id: str) -> bool:
        return is_session_id(session_id) and (self.directory / session_id / META_FILE).is_file()

    def _reached(self, step: str, path: Path) -> None:
        """Called after each step of a write (``staged``, each file name, ``published``) and of a
        delete (``unlisted``). A no-op; fault-injection tests replace it to stop at a chosen point."""

    # ------------------------------------------------------------------------------------ write
    def write(self, record: SessionRecord) -> int:
        """Store a new session; returns its bytes on disk. When this returns, the session survives
        a crash; until then nothing of it is visible. Transient errors -> Unavailable (nothing stored)."""
        target = self.path(record.session_id)
        for name in record.parts:
            if not _PART_RE.fullmatch(name):
                raise ValueError(f"bad part name {name!r}")
        staging = self.directory / f"{STAGING_PREFIX}{record.session_id}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            self._reached("staged", staging)
            files: dict[str, dict[str, Any]] = {}
            for name, part in record.parts.items():
                data = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in part.tensors.items()},
                                        metadata={"format": SESSION_FORMAT, "part": name})
                filename = f"{name}.safetensors"
                write_file(staging / filename, data)
                files[filename] = {"part": name, "bytes": len(data), "sha256": sha256(data),
                                   "description": part.description}
                self._reached(filename, staging)
            meta = {**record.meta, "format": SESSION_FORMAT, "session_id": record.session_id,
                    "fingerprint": self.fingerprint.to_dict(), "files": files}
            write_file(staging / META_FILE, json.dumps(meta, sort_keys=True, allow_nan=False).encode())
            self._reached(META_FILE, staging)
            fsync_dir(staging)
            if target.exists():
                raise FileExistsError(errno.EEXIST, "session already exists", str(target))
            os.rename(staging, target)
            fsync_dir(self.directory)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if is_transient(exc):
                raise Unavailable(f"could not store the session now ({_describe_os_error(exc)}); nothing was "
                                  f"stored; retry later", retry_after=RETRY_AFTER_S) from exc
            raise
        self._reached("published", target)
        return sum(f["bytes"] for f in files.values())

    def set_owner(self, session_id: str, owner: str | None) -> None:
        """Record a new owner: ``meta.json`` replaced atomically (files and checksums unchanged)."""
        path = self.path(session_id)
        meta = self._retrying(lambda: self._load_meta(path), session_id)
        meta["owner"] = owner
        data = json.dumps(meta, sort_keys=True, allow_nan=False).encode()
        self._retrying(lambda: atomic_write(path / META_FILE, data), session_id)

    # ------------------------------------------------------------------------------------- read
    def read_meta(self, session_id: str) -> IndexEntry:
        """The session's metadata, checked (format, fingerprint, file sizes) without reading tensors.

        NotFound if absent; SessionRefused if of another model or format; SessionDamaged (after
        quarantining) if garbled; Unavailable on transient errors."""
        path = self.path(session_id)
        meta = self._retrying(lambda: self._load_meta(path), session_id)
        return self._retrying(lambda: self._entry(path, meta), session_id)

    def read(self, session_id: str) -> tuple[IndexEntry, dict[str, StoredPart]]:
        """Metadata and every part's tensors (CPU), each file checked against its SHA-256 first."""
        path = self.path(session_id)
        meta = self._retrying(lambda: self._load_meta(path), session_id)
        entry = self._retrying(lambda: self._entry(path, meta), session_id)
        parts: dict[str, StoredPart] = {}
        for filename, info in meta["files"].items():
            data = self._retrying(lambda filename=filename: (path / filename).read_bytes(), session_id)
            try:
                if len(data) != info["bytes"]:
                    raise _Corrupt(f"{filename} has {len(data)} bytes, {info['bytes']} recorded")
                digest = sha256(data)
                if digest != info["sha256"]:
                    raise _Corrupt(f"{filename} fails its checksum (SHA-256 {digest[:16]}..., "
                                   f"{info['sha256'][:16]}... recorded)")
                tensors = load_safetensors(data)
            except _Corrupt as exc:
                raise self._damaged(session_id, str(exc)) from None
            except Exception as exc:  # verified bytes that do not parse: written wrong, never served
                raise self._damaged(session_id, f"{filename} does not parse ({type(exc).__name__}: {exc})") from None
            parts[info["part"]] = StoredPart(tensors, dict(info["description"]))
        return entry, parts

    def _load_meta(self, path: Path) -> dict[str, Any]:
        try:
            raw = (path / META_FILE).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"session {path.name!r} not found") from None
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise self._damaged(path.name, f"{META_FILE} is not valid JSON ({exc})") from None
        if meta.get("format") != SESSION_FORMAT:
            raise SessionRefused(f"session {path.name!r} is in format {meta.get('format')!r}; this server reads "
                                 f"{SESSION_FORMAT!r} and does not serve it (kept on disk)")
        try:
            if meta["session_id"] != path.name:
                raise _Corrupt(f"{META_FILE} names session {meta['session_id']!r}")
            for filename, info in meta["files"].items():
                if not (isinstance(info["bytes"], int) and isinstance(info["sha256"], str)
                        and _PART_RE.fullmatch(info["part"]) and filename == f"{info['part']}.safetensors"
                        and isinstance(info["description"], dict)):
                    raise _Corrupt(f"{META_FILE} has a malformed entry for {filename!r}")
            saved_fp = meta["fingerprint"]
            if not isinstance(saved_fp, dict):
                raise _Corrupt(f"{META_FILE} has a malformed fingerprint")
        except (KeyError, TypeError, AttributeError) as exc:
            raise self._damaged(path.name, f"{META_FILE} lacks or garbles a field ({type(exc).__name__}: {exc})") \
                from None
        except _Corrupt as exc:
            raise self._damaged(path.name, str(exc)) from None
        diff = self.fingerprint.mismatch(saved_fp)
        if diff:
            raise SessionRefused(f"session {path.name!r} was made with another model (differs in {', '.join(diff)}); "
                                 "this server does not serve it (kept on disk)")
        return meta

    def _entry(self, path: Path, meta: dict[str, Any]) -> IndexEntry:
        """Sizes checked by stat (cheap; checksums are verified when the tensors are read)."""
        total = 0
        for filename, info in meta["files"].items():
            try:
                size = (path / filename).stat().st_size
            except FileNotFoundError:
                size = None
            if size != info["bytes"]:
                raise self._damaged(path.name, f"{filename} has {size} bytes, {info['bytes']} recorded")
            total += size
        last_used = float(meta.get("created", 0.0))
        try:
            last_used = max(last_used, float((path / LAST_USED_FILE).read_text()))
        except (OSError, ValueError):  # absent or torn: a hint only
            pass
        return IndexEntry(path.name, meta, total, last_used)

    def _retrying(self, fn: Callable[[], T], session_id: str) -> T:
        """``fn()``, retried on transient OSErrors; then Unavailable (the session is left as is)."""
        for delay in (*RETRY_DELAYS_S, None):
            try:
                return fn()
            except OSError as exc:
                if not is_transient(exc):
                    if isinstance(exc, FileNotFoundError):
                        raise NotFound(f"session {session_id!r} not found") from None
                    raise Unavailable(f"session {session_id!r} cannot be read ({_describe_os_error(exc)}); it is "
                                      "kept on disk; see the server log", retry_after=RETRY_AFTER_S) from exc
                if delay is None:
                    log.warning("session storage: %s still unreadable after %d tries (%s); kept, answering 503",
                                session_id, len(RETRY_DELAYS_S) + 1, _describe_os_error(exc))
                    raise Unavailable(f"session {session_id!r} cannot be read right now ({_describe_os_error(exc)}); "
                                      f"it is kept; retry in {RETRY_AFTER_S:g} s", retry_after=RETRY_AFTER_S) from exc
                time.sleep(delay)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------- quarantine
    def _damaged(self, session_id: str, reason: str) -> SessionDamaged:
        """Quarantine the session; the error to raise."""
        self.quarantine(session_id, reason)
        return SessionDamaged(session_id, reason)

    def quarantine(self, session_id: str, reason: str) -> Path | None:
        """Move ``sess_<id>`` to ``quarantine/<id>.<UTC time>/`` with ``REASON.json``; never deletes.
        Returns the new place (None if it could not be moved; logged either way)."""
        src = self.directory / session_id
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        dst = self.quarantine_dir / f"{session_id}.{stamp}"
        owner = self._owner_hint(src)
        try:
            self.quarantine_dir.mkdir(exist_ok=True)
            os.rename(src, dst)
        except FileNotFoundError:  # another process moved or deleted it first
            log.error("session storage: %s is damaged (%s); already gone from %s", session_id, reason, self.directory)
            return None
        except OSError as exc:
            log.error("session storage: %s is damaged (%s) and could not be quarantined (%s); left in place",
                      session_id, reason, _describe_os_error(exc))
            return None
        try:
            note = {"session_id": session_id, "owner": owner, "reason": reason, "time": stamp, "pid": os.getpid()}
            atomic_write(dst / REASON_FILE, json.dumps(note, indent=1).encode())
        except OSError:
            pass
        fsync_dir(self.directory)
        log.error("session storage: quarantined %s: %s (moved to %s)", session_id, reason, dst)
        return dst

    def quarantined(self) -> dict[str, tuple[str | None, str]]:
        """id -> (owner if known, reason), for every session ever quarantined in this directory."""
        out: dict[str, tuple[str | None, str]] = {}
        if not self.quarantine_dir.is_dir():
            return out
        for entry in sorted(self.quarantine_dir.iterdir()):
            session_id = entry.name.split(".", 1)[0]
            if not is_session_id(session_id):
                continue
            try:
                note = json.loads((entry / REASON_FILE).read_text())
                out[session_id] = (note.get("owner"), str(note["reason"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                out[session_id] = (None, "see " + str(entry))
        return out

    # ------------------------------------------------------------------------------- delete, use
    def delete(self, session_id: str) -> None:
        """Remove a session: renamed away first (atomic disappearance), then its files removed."""
        src = self.path(session_id)
        doomed = self.directory / f"{DELETING_PREFIX}{session_id}-{secrets.token_hex(4)}"
        try:
            os.rename(src, doomed)
        except FileNotFoundError:
            raise NotFound(f"session {session_id!r} not found") from None
        fsync_dir(self.directory)
        self._reached("unlisted", doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def write_last_used(self, session_id: str, when: float) -> None:
        """Record a use (a small separate file, replaced atomically, not fsynced: a hint)."""
        try:
            atomic_write(self.path(session_id) / LAST_USED_FILE, repr(float(when)).encode(), durable=False)
        except (FileNotFoundError, NotFound):  # deleted meanwhile
            pass

    # ----------------------------------------------------------------------------- format 1 import
    def _upgrade_format_1(self, path: Path) -> None:
        """Give a format-1 session (sizes but no checksums in ``meta.json``; part descriptions in the
        safetensors headers) a format-2 ``meta.json``, in place and atomically. Its tensor files are
        kept as they are; their checksums are taken now (they had none: trusted as found, sizes
        checked). Sessions of another model, or that do not check out, are left for the scan."""
        try:
            meta = json.loads((path / META_FILE).read_bytes())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT_1:
                return
            if self.fingerprint.mismatch(meta["fingerprint"]):
                return  # refused by the scan, as format 1, kept
            files: dict[str, dict[str, Any]] = {}
            for part in ("state", "delta"):
                filename = f"{part}.safetensors"
                data = (path / filename).read_bytes()
                if len(data) != int(meta["files"][filename]):
                    return  # the scan quarantines it (format 2 checks fail the same way)
                header = _safetensors_metadata(data)
                description = {"n_tokens": int(header["n_tokens"])} if part == "state" else \
                    {"kind": str(header["kind"]), "scale": float(header["scale"])}
                files[filename] = {"part": part, "bytes": len(data), "sha256": sha256(data),
                                   "description": description}
            keep = ("owner", "created", "document_tokens", "state_bytes", "delta_bytes", "settings", "stats")
            new = {**{k: meta[k] for k in keep}, "format": SESSION_FORMAT, "session_id": path.name,
                   "fingerprint": meta["fingerprint"], "files": files}
            if isinstance(meta.get("last_used"), (int, float)):
                atomic_write(path / LAST_USED_FILE, repr(float(meta["last_used"])).encode(), durable=False)
            atomic_write(path / META_FILE, json.dumps(new, sort_keys=True, allow_nan=False).encode())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("session storage: could not upgrade %s from %s (%s: %s)", path.name, FORMAT_1,
                        type(exc).__name__, exc)
            return
        log.info("session storage: upgraded %s from %s (checksums taken of the files as found)", path.name, FORMAT_1)

    # ------------------------------------------------------------------------------------- scan
    def session_ids(self) -> Iterator[str]:
        for entry in sorted(self.directory.iterdir()):
            if is_session_id(entry.name) and entry.is_dir():
                yield entry.name

    def scan(self) -> ScanReport:
        """Every session on disk, checked like :meth:`read_meta`. Leftovers of writers that died
        (staging and deleting directories) are removed when this process holds the lock exclusively."""
        sessions: list[IndexEntry] = []
        refused: dict[str, tuple[str | None, str]] = {}
        removed = 0
        for entry in sorted(self.directory.iterdir()):
            name = entry.name
            if name.startswith((STAGING_PREFIX, DELETING_PREFIX)):
                if not self.shared:
                    log.warning("session storage: removing %s (a write or delete that never finished)", name)
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
                continue
            if name in (LOCK_FILE, QUARANTINE_DIR) or name.startswith("."):
                continue
            if not (is_session_id(name) and entry.is_dir()):
                log.warning("session storage: ignoring unexpected entry %s", entry)
                continue
            if not (entry / META_FILE).exists():  # a writer never publishes such a directory
                self.quarantine(name, f"no {META_FILE} (not a session this storage wrote)")
                continue
            if not self.shared:
                self._upgrade_format_1(entry)
            try:
                sessions.append(self.read_meta(name))
            except SessionRefused as exc:
                log.warning("session storage: refusing %s", exc)
                refused[name] = (self._owner_hint(entry), str(exc))
            except SessionDamaged:
                pass  # quarantined and logged
            except (NotFound, Unavailable) as exc:  # gone meanwhile / unreadable now: not indexed, kept
                log.warning("session storage: skipping %s at scan: %s", name, exc)
            for stray in entry.glob(".*.tmp-*"):  # an interrupted last_used rewrite
                stray.unlink(missing_ok=True)
        return ScanReport(sessions, refused, self.quarantined(), removed)

    @staticmethod
    def _owner_hint(path: Path) -> str | None:
        try:
            owner = json.loads((path / META_FILE).read_text()).get("owner")
        except (OSError, ValueError, AttributeError):
            return None
        return owner if isinstance(owner, str) else None
