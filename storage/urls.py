"""Storage URLs and their secrets: which URL a command opens (flag, storage file, environment), how it
is passed on to the processes it starts, and how it is shown (redacted) and scrubbed from text."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote, unquote

from sqlalchemy.engine import URL, make_url

from storage.errors import StorageUnavailable
from storage.folders import STORAGE_DIR

__all__ = ["DEFAULT_URL", "resolve_url", "url_problem", "read_url_file", "add_storage_arguments",
           "worker_environment", "redact", "secrets_of", "scrub", "normalize_url", "parse_url", "sqlite_file"]

DEFAULT_URL: str = f"sqlite:///{STORAGE_DIR / 'mtbert.db'}"


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
    u = parse_url(url)
    if u is not None and u.get_backend_name() == "sqlite" and u.host:  # sqlite://storage/x.db: "storage" is a host
        path = f"{u.host}/{u.database}" if u.database else u.host
        return (f"storage {url}: a SQLite URL has no host; write sqlite:///{path} (three slashes: relative to this "
                f"folder) or sqlite:////absolute/path.db (four)")
    return None


def _absolute_sqlite(url: str, base: Path) -> str:
    """A SQLite URL with a relative path (``sqlite:///x.db``) made absolute against ``base``: a worker
    started in another folder must open the same file."""
    u = parse_url(url)
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
    parsed = parse_url(normalize_url(url))  # what the driver will be given
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


def parse_url(url: str) -> URL | None:
    try:
        return make_url(url)
    except Exception:
        return None


def sqlite_file(url: str) -> Path | None:
    """The database file of a file-backed SQLite URL, else None."""
    u = parse_url(url)
    if u is None or u.get_backend_name() != "sqlite":
        return None
    if not u.database or u.database == ":memory:" or u.database.startswith("file:"):
        return None
    return Path(u.database).expanduser().resolve()
