"""Cross-process locks: one per study around claiming a trial slot, and one around creating a storage's
tables. SQLite: flock on a file beside the database; PostgreSQL: session advisory locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy
from optuna.storages import RDBStorage
from sqlalchemy.engine import make_url

from storage.outage import Outage, is_connection_error
from storage.urls import sqlite_file

__all__ = ["trial_slot_lock", "init_lock", "flock", "pg_advisory_lock", "lock_key"]

logger = logging.getLogger("storage")


class _Slot:
    """Process-local part of a slot lock: re-entrant, and counts nesting depth."""

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0


_slots: dict[str, _Slot] = {}
_slots_guard = threading.Lock()


def lock_key(study_name: str) -> int:
    """A stable, non-negative 63-bit key for ``pg_advisory_lock``."""
    digest = hashlib.blake2b(f"mtbert:{study_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def pg_advisory_lock(engine: sqlalchemy.Engine, key: int, outage: Outage | None = None) -> Iterator[None]:
    """A session advisory lock on a connection of its own. With ``outage``, taking it rides out a storage
    outage like any storage call; a lock whose connection died meanwhile is gone with its session, so
    failing to release it then is no error."""
    while True:
        try:
            conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            except BaseException:
                conn.invalidate()
                conn.close()
                raise
            break
        except Exception as exc:
            if outage is None or not is_connection_error(exc):
                raise
            time.sleep(min(2.0, outage.failed(exc)))
    if outage is not None:
        outage.ok()
    released = False
    try:
        yield
    finally:
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            released = True
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            logger.debug("advisory lock %d lost with its connection: %s", key, type(exc).__name__)
        finally:
            if not released:
                try:  # never pool a connection that may still hold the lock
                    conn.invalidate()
                except Exception:  # noqa: BLE001 - the connection is already gone
                    pass
            conn.close()


def _lock_file_name(db_name: str, study_name: str) -> str:
    """``<db>.<readable prefix>-<hash>.lock``: the hash of the full name tells studies apart (names that differ
    only in characters a file name cannot hold, too), and the name stays far below the 255-byte limit of
    a file name whatever the study is called (100 CJK characters are 300 bytes of UTF-8)."""
    digest = hashlib.sha256(study_name.encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", study_name)[:32]
    return f"{db_name[:150]}.{readable}-{digest}.lock"


def _os_lock(storage: RDBStorage, study_name: str) -> contextlib.AbstractContextManager:
    backend = storage.engine.url.get_backend_name()
    if backend == "postgresql":
        return pg_advisory_lock(storage.engine, lock_key(study_name), getattr(storage, "_outage", None))
    if backend == "sqlite":
        db_file = sqlite_file(storage.url)
        if db_file is None:  # in-memory: only this process can see it
            return contextlib.nullcontext()
        return flock(db_file.with_name(_lock_file_name(db_file.name, study_name)))
    raise NotImplementedError(f"trial_slot_lock: unsupported backend {backend!r}")


@contextlib.contextmanager
def trial_slot_lock(storage: RDBStorage, study_name: str) -> Iterator[None]:
    """Cross-process mutual exclusion per study (hold it briefly).

    Wrap "fail stale trials, count trials, ask" so parallel workers never
    over-run a trial budget. SQLite: ``flock`` on ``<db>.<study>.lock``;
    PostgreSQL: a session advisory lock, released if the process dies.
    Re-entrant within a thread; threads of one process also exclude each other.
    """
    with _slots_guard:
        slot = _slots.setdefault(f"{storage.url}\0{study_name}", _Slot())
    with slot.rlock, contextlib.ExitStack() as stack:
        if slot.depth == 0:
            stack.enter_context(_os_lock(storage, study_name))
        slot.depth += 1
        try:
            yield
        finally:
            slot.depth -= 1


@contextlib.contextmanager
def init_lock(url: str, db_file: Path | None) -> Iterator[None]:
    """Serialise storage setup across processes: Optuna's table creation races otherwise."""
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
        with flock(db_file.with_name(f"{db_file.name}.lock")):
            with contextlib.closing(sqlite3.connect(db_file, timeout=60)) as conn:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")  # persists in the file
            yield
    elif make_url(url).get_backend_name() == "postgresql":
        engine = sqlalchemy.create_engine(
            url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10}
        )
        try:
            with pg_advisory_lock(engine, lock_key("\0init")):
                yield
        finally:
            engine.dispose()
    else:
        yield
