"""Opening a storage: engine settings per backend (SQLite, PostgreSQL), and checking that what a run
opened is still there."""

from __future__ import annotations

import contextlib
import sqlite3
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import RDBStorage

from storage import optuna_compat
from storage.errors import StorageLost, StorageUnavailable
from storage.locks import init_lock
from storage.outage import Outage, RetryingRDBStorage, failure_reason
from storage.settings import heartbeat_settings, outage_seconds
from storage.urls import normalize_url, parse_url, redact, resolve_url, secrets_of, sqlite_file

__all__ = ["open_storage", "check_storage"]


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    dbapi_conn.execute("PRAGMA synchronous=NORMAL")


def _utc_session(dbapi_conn, _record: object) -> None:
    """Every PostgreSQL session in UTC: Optuna stores heartbeats as the server's now() in a column without
    time zone, i.e. in the session's zone, so a worker under another PGTZ (or a server default) would write
    instants hours apart and fail live trials as stale. Set after connecting: a libpq PGTZ startup
    setting cannot win over it."""
    with contextlib.closing(dbapi_conn.cursor()) as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
    dbapi_conn.commit()


def open_storage(url: str | None = None, *, heartbeat: bool = True, create: bool = True) -> RDBStorage:
    """Open (creating tables if needed) the Optuna RDB storage at ``resolve_url(url)``.

    SQLite gets WAL mode and a 60 s busy timeout; PostgreSQL gets a small,
    pre-pinged, recycled pool. With ``heartbeat``, stale trials (worker died)
    are failed after ``MTBERT_HEARTBEAT_GRACE`` s and retried up to
    ``MTBERT_MAX_RETRY`` times. Once open, the storage rides out outages of up to
    ``MTBERT_STORAGE_OUTAGE_SECONDS`` (:class:`RetryingRDBStorage`). Without ``create``
    (commands that only read), a missing SQLite file is "no storage at PATH" and
    nothing is created. Raises :class:`StorageUnavailable`.
    """
    url = normalize_url(resolve_url(url))
    shown = redact(url)
    secrets = secrets_of(url)
    parsed = parse_url(url)
    backend = parsed.get_backend_name() if parsed else None
    if parsed is None:
        raise StorageUnavailable(f"cannot reach storage {shown}: not a valid SQLAlchemy URL")
    if parsed.drivername == "postgresql":  # SQLAlchemy 2.1 defaults to psycopg 3; we ship psycopg2
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    db_file = sqlite_file(url)
    if not create and db_file is not None and not db_file.is_file():
        raise StorageUnavailable(f"no storage at {db_file}")
    limit = outage_seconds()
    kwargs: dict = {"skip_table_creation": not create}
    if backend == "sqlite":
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    elif backend == "postgresql":
        kwargs["engine_kwargs"] = {
            "pool_pre_ping": True,
            "pool_size": 4,
            "max_overflow": 4,
            "pool_recycle": 1800,
            "connect_args": {"connect_timeout": 10},
        }
    settings = heartbeat_settings() if heartbeat else None

    failure = None
    try:  # a command that only reads takes no setup lock and never switches a foreign file to WAL
        with init_lock(url, db_file) if create else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if settings is not None:
                interval, grace, max_retry = settings
                kwargs.update(heartbeat_interval=interval, grace_period=grace,
                              heartbeat_stale_trial_callback=optuna_compat.CrashRetryCallback(
                                  max_retry=max_retry, inherit_intermediate_values=True))
            storage = RetryingRDBStorage(url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the user gets one line
        failure = failure_reason(exc, secrets)
        if not create and ("no such table" in failure or "version_info" in failure):
            failure = "no Optuna tables in it (not a study storage)"
    if failure is not None:  # raised outside `except`: no chained exception carries the URL
        raise StorageUnavailable(f"cannot reach storage {shown}: {failure}") from None
    storage._outage = Outage(shown, secrets, limit)

    if backend == "sqlite":
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # pooled connections were opened before the listener
        storage._file_identity = _file_identity(db_file) if db_file is not None else None
    elif backend == "postgresql":
        sqlalchemy.event.listen(storage.engine, "connect", _utc_session)
        storage.engine.dispose()
    return storage


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_storage(storage: RDBStorage, study_name: str | None = None, study_id: int | None = None) -> None:
    """Raise StorageLost when the SQLite file this storage opened is no longer the file at its path
    (deleted, or replaced by another file: open connections keep writing to the old one, unseen), or when
    `study_id` no longer names the study `study_name` (deleted, or renamed: a rename copies the study)."""
    recorded = getattr(storage, "_file_identity", None)
    if recorded is not None:
        db_file = sqlite_file(storage.url)
        now = _file_identity(db_file)
        if now != recorded:
            what = "deleted" if now is None else "replaced by another file"
            raise StorageLost(f"the SQLite file {db_file} was {what} while this run used it: nothing it wrote since "
                              f"is in the storage; stopping (restore the file, or start the study again)")
    if study_id is not None:
        try:
            name = storage.get_study_name_from_id(study_id)
        except KeyError:
            name = None
        if name != study_name:
            now = f"is now called {name!r}" if name else "no longer exists"
            raise StorageLost(f"study {study_name!r} {now} in {redact(storage.url)}: it was deleted or renamed "
                              f"while this run used it (e.g. through a dashboard started with --dashboard-writable); "
                              f"stopping")
