"""Riding out a storage outage: which errors are a storage that is down, and an RDBStorage that retries
every database call through one for up to MTBERT_STORAGE_OUTAGE_SECONDS."""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator

import optuna
import sqlalchemy
from optuna.storages import RDBStorage

from storage import optuna_compat
from storage.errors import StorageOutage
from storage.optuna_compat import RDB_DATABASE_METHODS
from storage.urls import scrub

__all__ = ["is_connection_error", "failure_reason", "Outage", "RetryingRDBStorage"]

logger = logging.getLogger("storage")


def failure_reason(exc: BaseException, secrets: list[str]) -> str:
    """A one-line, secret-free reason for a failed connection (the driver's words, not Optuna's wrapper's)."""
    exc = next((e for e in _exception_chain(exc) if isinstance(e, sqlalchemy.exc.DBAPIError)), exc)
    text = str(getattr(exc, "orig", None) or exc).strip()
    low = text.lower()
    if "connection refused" in low:
        text = "connection refused — is the server running? (storage/postgres.sh start)"
    elif "password authentication failed" in low:
        text = "password authentication failed"
    elif "timeout expired" in low or "timed out" in low:
        text = "connection timed out"
    elif "terminating connection" in low or "server closed the connection" in low:
        text = "the server closed the connection (shut down or restarted)"
    elif "the database system is" in low:  # starting up / shutting down / in recovery mode
        text = text.splitlines()[0]
    elif isinstance(exc, ImportError):
        text = f"missing database driver ({exc.__cause__ or exc})"
    elif "can't load plugin" in low:
        text = "unsupported URL scheme"
    else:
        text = text.splitlines()[0] if text else type(exc).__name__
    return scrub(text, secrets)[:300]


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_connection_error(exc: BaseException) -> bool:
    """True for the errors of a storage that is down, restarting or overloaded (worth retrying later):
    a lost or refused connection, a server shutting down, a pool timeout; on SQLite a locked, busy or
    unreachable database file. Never for errors of the request itself (no such table, bad data)."""
    for e in _exception_chain(exc):
        if isinstance(e, StorageOutage):
            return False
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError)):
            return True
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            if isinstance(e.orig, sqlite3.Error):
                text = str(e.orig).lower()
                return any(s in text for s in ("locked", "busy", "unable to open", "disk i/o"))
            return True  # psycopg2: connection refused/lost, admin shutdown, too many connections, deadlock
    return False


class Outage:
    """Shared by the threads of one storage: when the current outage began (monotonic), or None."""

    def __init__(self, shown: str, secrets: list[str], limit: float) -> None:
        self.shown, self.secrets, self.limit = shown, secrets, limit
        self.since: float | None = None
        self.lock = threading.Lock()

    def failed(self, exc: BaseException) -> float:
        """Note a failure; return the seconds left before giving up (raise StorageOutage when none)."""
        now = time.monotonic()
        with self.lock:
            if self.since is None:
                self.since = now
                logger.warning("storage %s unreachable (%s); retrying for up to %g s (MTBERT_STORAGE_OUTAGE_SECONDS)",
                               self.shown, failure_reason(exc, self.secrets), self.limit)
            left = self.since + self.limit - now
        if left <= 0:
            raise StorageOutage(f"storage {self.shown} unreachable for {now - self.since:.0f} s "
                                f"({failure_reason(exc, self.secrets)}); giving up (MTBERT_STORAGE_OUTAGE_SECONDS="
                                f"{self.limit:g})") from None
        return left

    def __getstate__(self) -> dict:  # a pickled storage (another process) starts without an outage
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "since")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, since=None, lock=threading.Lock())

    def ok(self) -> None:
        if self.since is not None:
            with self.lock:
                if self.since is not None:
                    logger.warning("storage %s reachable again after %.0f s", self.shown, time.monotonic() - self.since)
                    self.since = None


def _retrying(name: str, method):
    """`method` of RetryingRDBStorage: retried with exponential backoff while the storage is unreachable."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            try:
                result = method(self, *args, **kwargs)
            except optuna.exceptions.UpdateFinishedTrialError:
                # a retried write that had been committed before its connection broke
                if attempt > 1 and name == "set_trial_state_values" and self._already_set(*args, **kwargs):
                    self._outage.ok()
                    return True
                raise
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                left = self._outage.failed(exc)
                time.sleep(min(delay, left))
                delay = min(2 * delay, 8.0)
                continue
            self._outage.ok()
            return result

    return call


class RetryingRDBStorage(RDBStorage):
    """Optuna's RDBStorage that rides out a storage outage: every database call is retried with
    exponential backoff (0.5 s doubling to 8 s) while the error is a connection error (see
    :func:`is_connection_error`), for up to ``MTBERT_STORAGE_OUTAGE_SECONDS`` from the outage's first
    failure; then :class:`StorageOutage`, one line. A heartbeat is never retried for long: the heartbeat
    thread tries again every second for one heartbeat interval, then skips that beat, so it never dies
    and it resumes within a second once the storage is back.
    """

    _outage: Outage

    def _already_set(self, trial_id: int, state, values=None) -> bool:
        frozen = self.get_trial(trial_id)
        return frozen.state == state and (values is None or list(frozen.values or []) == list(values))

    def record_heartbeat(self, trial_id: int) -> None:
        deadline = time.monotonic() + (self.heartbeat_interval or 1)
        while True:
            try:
                RDBStorage.record_heartbeat(self, trial_id)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                if time.monotonic() >= deadline:
                    logger.debug("heartbeat of trial id %d skipped: storage unreachable", trial_id)
                    return
                time.sleep(1.0)
                continue
            self._outage.ok()
            return


    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_beats_seen", None)  # monotonic times of this process: meaningless in another
        return state

    def _stale_trial_ids(self, study_id: int) -> list[int]:
        """Trials whose workers stopped beating, judged on one clock.

        PostgreSQL: Optuna's rule, on the server's clock (heartbeats are written and judged with the
        server's now(); every session is pinned to UTC, so a worker under another PGTZ stores the same
        instant). SQLite has no server clock: each process's own clock writes its heartbeats, so a
        skewed worker would see everyone else's as old (or its own would look old to them). There a
        trial is stale only when this process has watched its heartbeat stay unchanged for the grace
        period on its monotonic clock: no wall clock is compared, whatever the skew. (A process that
        starts after a worker died waits one grace period before retrying that worker's trial.)
        """
        if self.engine.dialect.name != "sqlite":
            return RDBStorage._get_stale_trial_ids(self, study_id)
        grace = self.grace_period if self.grace_period is not None else 2 * (self.heartbeat_interval or 1)
        now = time.monotonic()
        seen = self.__dict__.setdefault("_beats_seen", {})
        before = seen.get(study_id, {})
        current: dict[int, tuple[object, float]] = {}
        stale = []
        for trial_id, beat in optuna_compat.running_heartbeats(self, study_id).items():
            value, since = before.get(trial_id, (None, None))
            current[trial_id] = (value, since) if since is not None and value == beat else (beat, now)
            if since is not None and value == beat and now - since > grace:
                stale.append(trial_id)
        seen[study_id] = current
        return stale


for _name in RDB_DATABASE_METHODS:
    if _name != "record_heartbeat" and callable(getattr(RDBStorage, _name, None)):
        setattr(RetryingRDBStorage, _name, _retrying(_name, getattr(RDBStorage, _name)))
RetryingRDBStorage._get_stale_trial_ids = _retrying("_get_stale_trial_ids", RetryingRDBStorage._stale_trial_ids)
