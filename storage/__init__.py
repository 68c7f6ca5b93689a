"""Storage for mtbert-search: every storage URL and engine setting lives here.

Workers share one Optuna study in SQL storage: SQLite (one machine, the default)
or PostgreSQL (many nodes; see ``storage/postgres.sh``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import math
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from sqlalchemy.engine import URL, make_url

from storage import optuna_compat
from storage.optuna_compat import RDB_DATABASE_METHODS

__all__ = [
    "STORAGE_DIR",
    "DEFAULT_URL",
    "StorageUnavailable",
    "StorageConfigError",
    "StorageOutage",
    "RetryingRDBStorage",
    "is_connection_error",
    "env_number",
    "heartbeat_settings",
    "outage_seconds",
    "resolve_url",
    "normalize_url",
    "secrets_of",
    "read_url_file",
    "add_storage_arguments",
    "worker_environment",
    "redact",
    "open_storage",
    "trial_slot_lock",
    "StorageLost",
    "check_storage",
    "artifact_store",
    "checkpoint_dir",
    "install_secret_filter",
]

logger = logging.getLogger("storage")

# the default SQLite file, worker logs, trials CSVs, artifacts and checkpoints: storage/, or $MTBERT_STORAGE_DIR
# (the test suite points it at a temporary folder, so that it never writes into a user's storage/)
STORAGE_DIR: Path = Path(os.environ.get("MTBERT_STORAGE_DIR") or Path(__file__).resolve().parent).expanduser().resolve()
DEFAULT_URL: str = f"sqlite:///{STORAGE_DIR / 'mtbert.db'}"


class StorageUnavailable(RuntimeError):
    """The storage cannot be opened; the message names the redacted URL and the reason."""


# --------------------------------------------------------------------------- URLs


def resolve_url(url: str | None = None, url_file: str | os.PathLike | None = None) -> str:
    """``url``, else the URL in ``url_file``, else env ``MTBERT_STORAGE``, else the URL in the file
    named by env ``MTBERT_STORAGE_FILE``, else :data:`DEFAULT_URL`.

    A bare file path ending in ``.db`` becomes an absolute ``sqlite:///`` URL, and a relative SQLite path
    is made absolute: against the current folder, or for a URL read from a storage file against that
    file's folder (so every process that reads the file opens the same database). A storage file keeps a
    URL with a password out of every command line and environment (see :func:`read_url_file`).
    """
    base = None
    if not url and url_file:
        url, base = read_url_file(url_file), Path(url_file).expanduser().resolve().parent
    if not url and os.environ.get("MTBERT_STORAGE"):
        url = os.environ["MTBERT_STORAGE"]
    if not url and os.environ.get("MTBERT_STORAGE_FILE"):
        path = os.environ["MTBERT_STORAGE_FILE"]
        url, base = read_url_file(path), Path(path).expanduser().resolve().parent
    url = (url or "").strip() or DEFAULT_URL  # a pasted URL's stray blank or newline
    if "://" not in url and url.endswith(".db"):
        url = f"sqlite:///{url}"
    if problem := url_problem(url):
        raise StorageUnavailable(problem)
    return _absolute_sqlite(url, base or Path.cwd())


def url_problem(url: str) -> str | None:
    """A storage URL that SQLAlchemy would refuse, or read as another database than meant, in one line
    saying what to write instead; None for any other URL (the driver reports the rest)."""
    scheme = url.partition("://")[0].lower()
    if scheme == "postgres" or scheme.startswith("postgres+"):  # Heroku's and libpq's spelling
        fixed = "postgresql" + url[len("postgres"):]
        return f"storage {redact(url)}: SQLAlchemy knows this scheme as postgresql://, not postgres:// (use {redact(fixed)})"
    u = _parse(url)
    if u is not None and u.get_backend_name() == "sqlite" and u.host:  # sqlite://storage/x.db: "storage" is a host
        path = f"{u.host}/{u.database}" if u.database else u.host
        return (f"storage {url}: a SQLite URL has no host; write sqlite:///{path} (three slashes: relative to this "
                f"folder) or sqlite:////absolute/path.db (four)")
    return None


def _absolute_sqlite(url: str, base: Path) -> str:
    """A SQLite URL with a relative path (``sqlite:///x.db``) made absolute against ``base``: a worker
    started in another folder must open the same file."""
    u = _parse(url)
    if u is None or u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:" \
            or u.database.startswith("file:"):
        return url
    path = Path(u.database).expanduser()
    if path.is_absolute() and str(path) == u.database:
        return url
    return u.set(database=str((base / path).resolve())).render_as_string(hide_password=False)


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
    """How a process this one starts gets the storage ``url`` (as resolve_url gave it), never on its
    command line: the path of the storage file it came from (``--storage-file`` given as ``url_file``, or
    ``MTBERT_STORAGE_FILE``) in ``MTBERT_STORAGE_FILE``, else the URL itself in ``MTBERT_STORAGE``.

    """
    if url_file is None and not os.environ.get("MTBERT_STORAGE") and os.environ.get("MTBERT_STORAGE_FILE"):
        url_file = os.environ["MTBERT_STORAGE_FILE"]
    if url_file:
        try:  # only the file the URL came from (a --storage URL wins over MTBERT_STORAGE_FILE)
            same = resolve_url(None, url_file) == url
        except StorageUnavailable:
            same = False
        if same:
            return {"MTBERT_STORAGE_FILE": str(Path(url_file).expanduser().resolve())}
    return {"MTBERT_STORAGE": url}


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.S)
_HOST = r"(?:\[[0-9A-Za-z:.%]*\]|[\w.%\-]*)(?::\d*)?"
_HOSTS = re.compile(rf"^{_HOST}(?:,{_HOST})*$")  # libpq allows host1:5432,host2:5432
_QUERY_KEY = re.compile(r"^[\w.\-%\[\]]+$")
# query keys whose values are secrets (case-insensitive substrings): password, sslpassword, passwd, pwd,
# secret, token, api_key...
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|api_?key|credential", re.I)


class _Parts(tuple):
    """A storage URL split as written: (scheme, userinfo or None, hosts+path, query or None)."""

    scheme = property(lambda self: self[0])
    userinfo = property(lambda self: self[1])
    location = property(lambda self: self[2])
    query = property(lambda self: self[3])


def _split(url: str) -> _Parts | None:
    """Split ``url`` as written, or None where it cannot be read safely.

    Everything before the last ``@`` of the authority is userinfo, so an unencoded ``@`` (or ``/``,
    ``?``, ``#``, ``:``) inside a password stays in the password. A URL without an authority
    (``sqlite:///path``) has no userinfo. What follows the userinfo must be host[:port] (a list, for
    libpq) with an optional path, and a query of ``key=value`` pairs. Readings, first valid wins: the
    userinfo ends at the last ``@`` before the first ``?``; no userinfo (any ``@`` is in the query);
    the userinfo ends at the last ``@`` (a password holding ``?``).
    """
    m = _SCHEME.match(url)
    if m is None:
        return None
    scheme, rest = m.groups()
    if not rest or rest.startswith("/"):  # no authority: sqlite:///path, sqlite://
        location, q, query = rest.partition("?")
        return _Parts((scheme, None, location, query if q else None)) if not q or _valid_query(query) else None
    head = rest.partition("?")[0]
    readings = []
    if "@" in head:
        userinfo, _, tail = head.rpartition("@")
        readings.append((userinfo, tail + rest[len(head):]))
    else:
        readings.append((None, rest))
    if "@" in rest:
        userinfo, _, tail = rest.rpartition("@")
        readings.append((userinfo, tail))
    for userinfo, tail in readings:
        location, q, query = tail.partition("?")
        if _HOSTS.match(location.split("/", 1)[0]) and (not q or _valid_query(query)):
            return _Parts((scheme, userinfo, location, query if q else None))
    return None


def _valid_query(query: str) -> bool:
    for pair in query.split("&"):
        key, eq, _ = pair.partition("=")
        if not (eq and _QUERY_KEY.match(key)):
            return False
    return True


def _is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(unquote(key)))


def redact(url: str) -> str:
    """``url`` with every secret replaced by ``***``; never raises.

    Hidden: the userinfo password (``user:***@``; everything before the last ``@`` of the authority is
    userinfo) and the values of secret query keys (``password``, ``sslpassword``, ``passwd``, ``pwd``,
    ``secret``, ``token``..., any case). A URL that cannot be read safely is shown as ``scheme://***``
    (``***`` without a scheme).
    """
    url = str(url)
    parts = _split(url)
    if parts is None:
        m = _SCHEME.match(url)
        return f"{m.group(1)}://***" if m else ("" if not url else "***")
    out = f"{parts.scheme}://"
    if parts.userinfo is not None:
        user, colon, _ = parts.userinfo.partition(":")
        out += f"{user}{':***' if colon else ''}@"
    out += parts.location
    if parts.query is not None:
        pairs = []
        for pair in parts.query.split("&"):
            key, _, value = pair.partition("=")
            pairs.append(f"{key}=***" if _is_secret_key(key) and value else pair)
        out += "?" + "&".join(pairs)
    return out


def secrets_of(url: str) -> list[str]:
    """Every secret in ``url`` in the forms it may appear in (as written, decoded, percent-encoded),
    longest first: the userinfo password and the values of secret query keys. An unreadable URL's
    whole text after the scheme counts as secret."""
    url = str(url)
    found: set[str] = set()
    parts = _split(url)
    if parts is None:
        m = _SCHEME.match(url)
        found.add(m.group(2) if m else url)
    else:
        if parts.userinfo is not None and ":" in parts.userinfo:
            found.add(parts.userinfo.partition(":")[2])
        for pair in (parts.query or "").split("&"):
            key, _, value = pair.partition("=")
            if _is_secret_key(key):
                found.add(value)
    parsed = _parse(normalize_url(url))  # what the driver will be given
    if parsed is not None:
        found.add(parsed.password or "")
        found.update(str(v) for k, v in parsed.query.items() if _is_secret_key(k) and isinstance(v, str))
    variants = {v for s in found if s for v in (s, unquote(s), quote(unquote(s), safe=""))}
    return sorted((v for v in variants if v), key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret replaced by ``***``. A short secret (under 8 characters) only where it
    stands alone, not inside a longer word: a password "p" must not turn "port" into "***ort"."""
    for secret in secrets:
        if len(secret) >= 8:
            text = text.replace(secret, "***")
        else:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
    return text


def normalize_url(url: str) -> str:
    """``url`` as the user meant it: a password with an unencoded ``@``, ``/``, ``?``, ``#`` or ``:`` is
    percent-encoded (SQLAlchemy would otherwise split it at the first ``@``); anything else unchanged."""
    parts = _split(str(url))
    if parts is None or parts.userinfo is None or ":" not in parts.userinfo:
        return url
    user, _, password = parts.userinfo.partition(":")
    if not re.search(r"[@/?#:]", password):
        return url
    encoded = quote(unquote(password), safe="")
    query = "" if parts.query is None else "?" + parts.query
    return f"{parts.scheme}://{user}:{encoded}@{parts.location}{query}"


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


# --------------------------------------------------------------------------- settings


class StorageConfigError(StorageUnavailable):
    """A storage setting in the environment is malformed; the message names the variable."""


def env_number(name: str, default: float, minimum: float, integer: bool = True) -> float:
    """The number in env ``name`` (``default`` when unset or empty); :class:`StorageConfigError` when it
    is not a finite number >= ``minimum`` (a whole number with ``integer``)."""
    text = (os.environ.get(name) or "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum:
        kind = "a whole number" if integer else "a number"
        raise StorageConfigError(f"{name}={text!r}: must be {kind} >= {minimum:g}")
    return value


def heartbeat_settings() -> tuple[int, int, int]:
    """(interval, grace, max_retry) from ``MTBERT_HEARTBEAT_INTERVAL`` (30 s), ``MTBERT_HEARTBEAT_GRACE``
    (120 s, more than the interval) and ``MTBERT_MAX_RETRY`` (3); StorageConfigError when malformed."""
    interval = env_number("MTBERT_HEARTBEAT_INTERVAL", 30, 1)
    grace = env_number("MTBERT_HEARTBEAT_GRACE", 120, 1)
    if grace <= interval:
        raise StorageConfigError(f"MTBERT_HEARTBEAT_GRACE={grace} must be more than MTBERT_HEARTBEAT_INTERVAL="
                                 f"{interval}: a live worker's trial would be taken for dead")
    return interval, grace, env_number("MTBERT_MAX_RETRY", 3, 0)


def outage_seconds() -> float:
    """How long a process waits for an unreachable storage before giving up (``MTBERT_STORAGE_OUTAGE_SECONDS``,
    default 120 s; 0: give up at once)."""
    return env_number("MTBERT_STORAGE_OUTAGE_SECONDS", 120, 0, integer=False)


# --------------------------------------------------------------------------- engines


def _reason(exc: BaseException, secrets: list[str]) -> str:
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


class StorageOutage(StorageUnavailable):
    """The storage stayed unreachable longer than ``MTBERT_STORAGE_OUTAGE_SECONDS``; the message is one line."""


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


class _Outage:
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
                               self.shown, _reason(exc, self.secrets), self.limit)
            left = self.since + self.limit - now
        if left <= 0:
            raise StorageOutage(f"storage {self.shown} unreachable for {now - self.since:.0f} s "
                                f"({_reason(exc, self.secrets)}); giving up (MTBERT_STORAGE_OUTAGE_SECONDS="
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

    _outage: _Outage

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
    parsed = _parse(url)
    backend = parsed.get_backend_name() if parsed else None
    if parsed is None:
        raise StorageUnavailable(f"cannot reach storage {shown}: not a valid SQLAlchemy URL")
    if parsed.drivername == "postgresql":  # SQLAlchemy 2.1 defaults to psycopg 3; we ship psycopg2
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    db_file = _sqlite_file(url)
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
        with _init_lock(url, db_file) if create else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if settings is not None:
                interval, grace, max_retry = settings
                kwargs.update(heartbeat_interval=interval, grace_period=grace,
                              heartbeat_stale_trial_callback=optuna_compat.CrashRetryCallback(
                                  max_retry=max_retry, inherit_intermediate_values=True))
            storage = RetryingRDBStorage(url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the user gets one line
        failure = _reason(exc, secrets)
        if not create and ("no such table" in failure or "version_info" in failure):
            failure = "no Optuna tables in it (not a study storage)"
    if failure is not None:  # raised outside `except`: no chained exception carries the URL
        raise StorageUnavailable(f"cannot reach storage {shown}: {failure}") from None
    storage._outage = _Outage(shown, secrets, limit)

    if backend == "sqlite":
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # pooled connections were opened before the listener
        storage._file_identity = _file_identity(db_file) if db_file is not None else None
    elif backend == "postgresql":
        sqlalchemy.event.listen(storage.engine, "connect", _utc_session)
        storage.engine.dispose()
    return storage


class StorageLost(StorageUnavailable):
    """The storage a run opened is gone: its SQLite file was deleted or replaced, or the study was deleted
    or renamed. Nothing written since is in the storage users will read: an error, never a leaderboard."""


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
        db_file = _sqlite_file(storage.url)
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
def _pg_advisory_lock(engine: sqlalchemy.Engine, key: int, outage: _Outage | None = None) -> Iterator[None]:
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
        return _pg_advisory_lock(storage.engine, _lock_key(study_name), getattr(storage, "_outage", None))
    if backend == "sqlite":
        db_file = _sqlite_file(storage.url)
        if db_file is None:  # in-memory: only this process can see it
            return contextlib.nullcontext()
        return _flock(db_file.with_name(_lock_file_name(db_file.name, study_name)))
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


def _folder(variable: str, sub: str) -> Path:
    """``$MTBERT_SHARED_DIR/<sub>`` when that is set (cluster/slurm/worker.sbatch gives its tasks the
    same, so commands run afterwards on a login node find what the tasks wrote), else the folder in env
    ``variable``, else ``storage/<sub>``; created. StorageConfigError when it cannot be."""
    if os.environ.get("MTBERT_SHARED_DIR"):
        source, path = "MTBERT_SHARED_DIR", Path(os.environ["MTBERT_SHARED_DIR"]) / sub
    elif os.environ.get(variable):
        source, path = variable, Path(os.environ[variable])
    else:
        source, path = variable, STORAGE_DIR / sub
    path = path.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageConfigError(f"{source}: {str(path)!r}: cannot create the folder ({exc.strerror or exc})") \
            from None
    return path


def artifact_store() -> optuna.artifacts.FileSystemArtifactStore:
    """Artifact store under ``$MTBERT_SHARED_DIR/artifacts``, ``MTBERT_ARTIFACT_DIR`` or ``storage/artifacts``."""
    return optuna.artifacts.FileSystemArtifactStore(str(_folder("MTBERT_ARTIFACT_DIR", "artifacts")))


def checkpoint_dir() -> Path:
    """``$MTBERT_SHARED_DIR/checkpoints``, ``MTBERT_CHECKPOINT_DIR`` or ``storage/checkpoints`` (created)."""
    return _folder("MTBERT_CHECKPOINT_DIR", "checkpoints")


# --------------------------------------------------------------------------- logging


class _SecretFilter(logging.Filter):
    """Replaces known secrets in a record's final message (and traceback) by ``***``."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def _scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

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
    """Scrub ``url``'s secrets (see :func:`secrets_of`: the password, also as a query parameter) from
    every log record, in any logger or handler. Idempotent.

    Records are scrubbed when created (covers all loggers and handlers added later);
    the filter is also attached to the root logger and its current handlers.
    """
    global _base_factory
    for secret in secrets_of(url):
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
