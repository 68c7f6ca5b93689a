"""Storage for mtbert-search: every storage URL and engine setting lives here.

Workers share one Optuna study in SQL storage: SQLite (one machine, the default)
or PostgreSQL (many nodes; see ``storage/postgres.sh``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy.engine import URL, make_url

__all__ = [
    "STORAGE_DIR",
    "DEFAULT_URL",
    "StorageUnavailable",
    "resolve_url",
    "read_url_file",
    "add_storage_arguments",
    "worker_environment",
    "redact",
    "open_storage",
    "trial_slot_lock",
    "artifact_store",
    "checkpoint_dir",
    "install_secret_filter",
]

STORAGE_DIR: Path = Path(__file__).resolve().parent
DEFAULT_URL: str = f"sqlite:///{STORAGE_DIR / 'mtbert.db'}"


class StorageUnavailable(RuntimeError):
    """The storage cannot be opened; the message names the redacted URL and the reason."""


# --------------------------------------------------------------------------- URLs


def resolve_url(url: str | None = None, url_file: str | os.PathLike | None = None) -> str:
    """``url``, else the URL in ``url_file``, else env ``MTBERT_STORAGE``, else the URL in the file
    named by env ``MTBERT_STORAGE_FILE``, else :data:`DEFAULT_URL`.

    A bare file path ending in ``.db`` becomes an absolute ``sqlite:///`` URL. A storage file keeps a
    URL with a password out of every command line and environment (see :func:`read_url_file`).
    """
    if not url and url_file:
        url = read_url_file(url_file)
    url = url or os.environ.get("MTBERT_STORAGE")
    if not url and os.environ.get("MTBERT_STORAGE_FILE"):
        url = read_url_file(os.environ["MTBERT_STORAGE_FILE"])
    url = url or DEFAULT_URL
    if "://" not in url and url.endswith(".db"):
        url = f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def read_url_file(path: str | os.PathLike) -> str:
    """The storage URL in a file only its owner can read (first line that is not blank or a # comment).

    Raises :class:`StorageUnavailable` when the file is missing, unreadable, empty, or readable or
    writable by group or others (on a shared cluster anyone could read the password): chmod 600 it.
    """
    path = Path(path).expanduser()
    try:
        st = path.stat()
        if not path.is_file():
            raise StorageUnavailable(f"storage file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise StorageUnavailable(f"storage file {path}: readable or writable by others (mode "
                                     f"{st.st_mode & 0o777:o}); run chmod 600 {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise StorageUnavailable(f"storage file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageUnavailable(f"storage file {path}: cannot read ({type(exc).__name__})") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise StorageUnavailable(f"storage file {path}: no URL in it")


def add_storage_arguments(parser) -> None:
    """--storage URL and --storage-file PATH (mutually exclusive), the same on every command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--storage", default=None, metavar="URL",
                       help="storage URL (default: $MTBERT_STORAGE, else the URL in $MTBERT_STORAGE_FILE, "
                            "else SQLite at storage/mtbert.db)")
    group.add_argument("--storage-file", default=None, metavar="PATH",
                       help="read the storage URL from PATH (mode 600): keeps a password out of every "
                            "process's command line and environment")


def worker_environment(url: str, url_file: str | os.PathLike | None = None) -> dict[str, str]:
    """How a process this one starts gets the storage: the file's path when the URL came from a file
    (``MTBERT_STORAGE_FILE``), else the URL itself (``MTBERT_STORAGE``), never its command line."""
    url_file = url_file or (None if os.environ.get("MTBERT_STORAGE") else os.environ.get("MTBERT_STORAGE_FILE"))
    if url_file:
        return {"MTBERT_STORAGE_FILE": str(Path(url_file).expanduser().resolve())}
    return {"MTBERT_STORAGE": url}


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``; never raises."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(://[^:/?#@]*:).*@", r"\1***@", str(url))


def _parse(url: str) -> URL | None:
    try:
        return make_url(url)
    except Exception:
        return None


def _sqlite_file(url: str) -> Path | None:
    """The database file of a file-backed SQLite URL, else None."""
    u = _parse(url)
    if u is None or u.get_backend_name() != "sqlite":
        return None
    if not u.database or u.database == ":memory:" or u.database.startswith("file:"):
        return None
    return Path(u.database).expanduser().resolve()


# --------------------------------------------------------------------------- engines


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _reason(exc: BaseException, password: str | None) -> str:
    """A one-line, password-free reason for a failed connection."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    low = text.lower()
    if "connection refused" in low:
        text = "connection refused — is the server running? (storage/postgres.sh start)"
    elif "password authentication failed" in low:
        text = "password authentication failed"
    elif "timeout expired" in low or "timed out" in low:
        text = "connection timed out"
    elif isinstance(exc, ImportError):
        text = f"missing database driver ({exc.__cause__ or exc})"
    elif "can't load plugin" in low:
        text = "unsupported URL scheme"
    else:
        text = text.splitlines()[0] if text else type(exc).__name__
    for secret in _variants(password):
        text = text.replace(secret, "***")
    return text[:300]


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    dbapi_conn.execute("PRAGMA synchronous=NORMAL")


@contextlib.contextmanager
def _init_lock(url: str, db_file: Path | None) -> Iterator[None]:
    """Serialise storage setup across processes: Optuna's table creation races otherwise."""
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
        with _flock(db_file.with_name(f"{db_file.name}.lock")):
            with contextlib.closing(sqlite3.connect(db_file, timeout=60)) as conn:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")  # persists in the file
            yield
    elif make_url(url).get_backend_name() == "postgresql":
        engine = sqlalchemy.create_engine(
            url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10}
        )
        try:
            with _pg_advisory_lock(engine, _lock_key("\0init")):
                yield
        finally:
            engine.dispose()
    else:
        yield


def open_storage(url: str | None = None, *, heartbeat: bool = True) -> RDBStorage:
    """Open (creating tables if needed) the Optuna RDB storage at ``resolve_url(url)``.

    SQLite gets WAL mode and a 60 s busy timeout; PostgreSQL gets a small,
    pre-pinged, recycled pool. With ``heartbeat``, stale trials (worker died)
    are failed after ``MTBERT_HEARTBEAT_GRACE`` s and retried up to
    ``MTBERT_MAX_RETRY`` times. Raises :class:`StorageUnavailable`.
    """
    url = resolve_url(url)
    shown = redact(url)
    parsed = _parse(url)
    backend = parsed.get_backend_name() if parsed else None
    if parsed is None:
        raise StorageUnavailable(f"cannot reach storage {shown}: not a valid SQLAlchemy URL")
    if parsed.drivername == "postgresql":  # SQLAlchemy 2.1 defaults to psycopg 3; we ship psycopg2
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    db_file = _sqlite_file(url)
    kwargs: dict = {}
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

    failure = None
    try:
        with _init_lock(url, db_file), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat:
                kwargs.update(
                    heartbeat_interval=_env_int("MTBERT_HEARTBEAT_INTERVAL", 30),
                    grace_period=_env_int("MTBERT_HEARTBEAT_GRACE", 120),
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=_env_int("MTBERT_MAX_RETRY", 3),
                        inherit_intermediate_values=True,
                    ),
                )
            storage = RDBStorage(url, **kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, ImportError, OSError) as exc:
        failure = _reason(exc, parsed.password)
    if failure is not None:  # raised outside `except`: no chained exception carries the URL
        raise StorageUnavailable(f"cannot reach storage {shown}: {failure}") from None

    if backend == "sqlite":
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # pooled connections were opened before the listener
    return storage


# --------------------------------------------------------------------------- locking


class _Slot:
    """Process-local part of a slot lock: re-entrant, and counts nesting depth."""

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0


_slots: dict[str, _Slot] = {}
_slots_guard = threading.Lock()


def _lock_key(study_name: str) -> int:
    """A stable, non-negative 63-bit key for ``pg_advisory_lock``."""
    digest = hashlib.blake2b(f"mtbert:{study_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _pg_advisory_lock(engine: sqlalchemy.Engine, key: int) -> Iterator[None]:
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    released = False
    try:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            released = True
    finally:
        if not released:
            conn.invalidate()  # never pool a connection that may still hold the lock
        conn.close()


def _os_lock(storage: RDBStorage, study_name: str) -> contextlib.AbstractContextManager:
    backend = storage.engine.url.get_backend_name()
    if backend == "postgresql":
        return _pg_advisory_lock(storage.engine, _lock_key(study_name))
    if backend == "sqlite":
        db_file = _sqlite_file(storage.url)
        if db_file is None:  # in-memory: only this process can see it
            return contextlib.nullcontext()
        safe = re.sub(r"[^\w.-]", "_", study_name)
        return _flock(db_file.with_name(f"{db_file.name}.{safe}.lock"))
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


# --------------------------------------------------------------------------- files


def artifact_store() -> optuna.artifacts.FileSystemArtifactStore:
    """Artifact store under ``MTBERT_ARTIFACT_DIR`` or ``storage/artifacts`` (created)."""
    root = Path(os.environ.get("MTBERT_ARTIFACT_DIR") or STORAGE_DIR / "artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return optuna.artifacts.FileSystemArtifactStore(str(root))


def checkpoint_dir() -> Path:
    """``MTBERT_CHECKPOINT_DIR`` or ``storage/checkpoints`` (created)."""
    path = Path(os.environ.get("MTBERT_CHECKPOINT_DIR") or STORAGE_DIR / "checkpoints")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- logging


def _variants(password: str | None) -> list[str]:
    """The password as written and as it appears percent-encoded in a URL."""
    if not password:
        return []
    return sorted({password, quote(password, safe="")}, key=len, reverse=True)


class _SecretFilter(logging.Filter):
    """Replaces known secrets in a record's final message (and traceback) by ``***``."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def _scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets or getattr(record, "_mtbert_scrubbed", False):
            return True
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = self._scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self._scrub(record.stack_info)
        record._mtbert_scrubbed = True
        return True


_secret_filter = _SecretFilter()
_base_factory = None


def install_secret_filter(url: str) -> None:
    """Scrub ``url``'s password from every log record, in any logger or handler. Idempotent.

    Records are scrubbed when created (covers all loggers and handlers added later);
    the filter is also attached to the root logger and its current handlers.
    """
    global _base_factory
    parsed = _parse(url)
    for secret in _variants(parsed.password if parsed else None):
        if secret not in _secret_filter.secrets:
            _secret_filter.secrets.append(secret)
    _secret_filter.secrets.sort(key=len, reverse=True)

    if _base_factory is None:
        _base_factory = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = _base_factory(*args, **kwargs)
            _secret_filter.filter(record)
            return record

        logging.setLogRecordFactory(factory)
    root = logging.getLogger()
    for target in (root, *root.handlers):
        if _secret_filter not in target.filters:
            target.addFilter(_secret_filter)
