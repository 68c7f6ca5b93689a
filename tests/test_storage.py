"""Tests for the storage package (SQLite always; PostgreSQL via the pg fixtures)."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import time
import uuid

import optuna
import pytest
from sqlalchemy import text

import storage
from storage import optuna_compat
from storage import StorageUnavailable, open_storage, redact, resolve_url, trial_slot_lock


@pytest.fixture(autouse=True)
def _fast_heartbeat(monkeypatch):
    monkeypatch.setenv("MTBERT_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("MTBERT_HEARTBEAT_GRACE", "3")


# ----------------------------------------------------------------------------- URLs


def test_resolve_url_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MTBERT_STORAGE", raising=False)
    assert resolve_url() == storage.DEFAULT_URL
    assert storage.DEFAULT_URL == f"sqlite:///{storage.STORAGE_DIR / 'mtbert.db'}"
    monkeypatch.setenv("MTBERT_STORAGE", "postgresql://u:p@h/db")
    assert resolve_url() == "postgresql://u:p@h/db"
    monkeypatch.chdir(tmp_path)
    assert resolve_url("sub/a.db") == f"sqlite:///{tmp_path / 'sub' / 'a.db'}"
    # a relative SQLite URL is made absolute: workers started elsewhere must open the same file
    assert resolve_url("sqlite:///x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    assert resolve_url("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_url("sqlite://") == "sqlite://"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://mtbert:s3cret@127.0.0.1:5433/mtbert",
        "postgresql+psycopg2://mtbert:s3cret@db.example:5432/x?sslmode=require",
        "postgresql://mtbert:s3cr%40et@127.0.0.1:bad-port/mtbert",  # unparsable port
        "weird://mtbert:s3cret@@host/",
    ],
)
def test_redact_hides_password(url):
    shown = redact(url)
    assert "s3cr" not in shown and "***" in shown


@pytest.mark.parametrize("url", ["sqlite:////tmp/x.db", "sqlite://", "", "::::", "not a url"])
def test_redact_never_raises(url):
    assert isinstance(redact(url), str)
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


# ----------------------------------------------------------------------------- SQLite


def test_open_sqlite_wal_and_heartbeat(tmp_path):
    st = open_storage(str(tmp_path / "new" / "s.db"))
    assert (tmp_path / "new" / "s.db").exists()
    with st.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
    assert st.get_heartbeat_interval() == 1 and st.grace_period == 3
    callback = st.get_heartbeat_stale_trial_callback()
    assert isinstance(callback, optuna.storages.RetryHeartbeatStaleTrialCallback)
    assert open_storage(str(tmp_path / "h.db"), heartbeat=False).get_heartbeat_interval() is None


def test_open_storage_silences_experimental_warning(tmp_path, recwarn):
    open_storage(str(tmp_path / "w.db"))
    assert not [w for w in recwarn if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "url, reason",
    [
        ("postgresql://mtbert:hunter2@127.0.0.1:1/x", "connection refused"),
        ("nosuchdb://mtbert:hunter2@127.0.0.1/x", "unsupported URL scheme"),
        ("sqlite:////proc/hunter2/nope/x.db", "hunter2"),  # path, not a password
    ],
)
def test_storage_unavailable(url, reason):
    with pytest.raises(StorageUnavailable) as info:
        open_storage(url)
    exc, message = info.value, str(info.value)
    assert redact(url) in message and reason in message
    assert "\n" not in message
    if "@" in url:
        assert "hunter2" not in message
    assert exc.__cause__ is None and exc.__suppress_context__


# ----------------------------------------------------------------------------- logging


def test_secret_filter_scrubs_logs(caplog):
    url = "postgresql://mtbert:t0p-s%40cret@127.0.0.1:5433/mtbert"  # password "t0p-s@cret"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        storage.install_secret_filter(url)
        storage.install_secret_filter(url)  # idempotent
        late = logging.StreamHandler(stream)  # a handler added after installing
        child = logging.getLogger("mtbert.test.child")
        child.addHandler(late)
        with caplog.at_level(logging.INFO):
            child.info("connecting to %s (pw=%s)", url, "t0p-s@cret")
            try:
                raise RuntimeError("boom t0p-s@cret")
            except RuntimeError:
                child.exception("failed")
        child.removeHandler(late)
    finally:
        root.removeHandler(handler)
    out = stream.getvalue() + caplog.text
    assert "connecting to" in out and "boom" in out
    assert "t0p-s" not in out
    assert out.count("mtbert:***@127.0.0.1") >= 2


# ----------------------------------------------------------------------------- locking


def _hold_lock(url: str, study: str, out: str, barrier, rounds: int) -> None:
    st = open_storage(url, heartbeat=False)  # all start together: also tests the init race
    barrier.wait(timeout=20)
    for _ in range(rounds):
        with trial_slot_lock(st, study):
            start = time.monotonic()
            time.sleep(0.03)
            end = time.monotonic()
            with open(out, "a") as f:
                f.write(f"{os.getpid()} {start} {end}\n")


def _assert_exclusive(url: str, tmp_path, workers: int = 3, rounds: int = 4) -> None:
    ctx = multiprocessing.get_context("fork")
    out = str(tmp_path / "intervals.txt")
    barrier = ctx.Barrier(workers)
    study = f"lock-{uuid.uuid4().hex[:6]}"
    procs = [
        ctx.Process(target=_hold_lock, args=(url, study, out, barrier, rounds), daemon=True)
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * workers
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    rows = sorted(
        (float(s), float(e), pid) for pid, s, e in (line.split() for line in open(out))
    )
    assert len(rows) == workers * rounds and len({pid for *_, pid in rows}) == workers
    for (_, prev_end, _), (start, _, _) in zip(rows, rows[1:]):
        assert start >= prev_end, "two processes held the trial slot lock at once"


def test_trial_slot_lock_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    _assert_exclusive(url, tmp_path)
    assert list(tmp_path.glob("l.db.lock-*.lock"))


def test_trial_slot_lock_reentrant(tmp_path):
    st = open_storage(str(tmp_path / "r.db"), heartbeat=False)
    with trial_slot_lock(st, "s"), trial_slot_lock(st, "s"):
        pass
    for _ in range(3):
        with trial_slot_lock(st, "s"):
            pass
    with trial_slot_lock(open_storage("sqlite://", heartbeat=False), "mem"):
        pass


def test_trial_slot_lock_postgres(clean_pg_url, tmp_path):
    _assert_exclusive(clean_pg_url, tmp_path)
    st = open_storage(clean_pg_url, heartbeat=False)
    with trial_slot_lock(st, "s"), trial_slot_lock(st, "s"):
        pass
    with st.engine.connect() as conn:  # released: no advisory locks left behind
        held = conn.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        ))
        assert held.scalar() == 0


# ----------------------------------------------------------------------------- PostgreSQL


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_postgres_round_trip(clean_pg_url):
    st = open_storage(clean_pg_url)
    assert st.get_heartbeat_interval() == 1
    study = optuna.create_study(study_name="rt", storage=st, direction="maximize")
    with trial_slot_lock(optuna_compat.rdb_storage(study), "rt"):
        pass
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
    study.tell(trial, 0.5)
    again = optuna.load_study(study_name="rt", storage=open_storage(clean_pg_url))
    (frozen,) = again.get_trials()
    assert frozen.state == optuna.trial.TrialState.COMPLETE and frozen.value == 0.5
    assert 1e-5 <= frozen.params["lr"] <= 1e-3


def test_postgres_bad_password(pg_url):
    from sqlalchemy.engine import make_url

    bad = make_url(pg_url).set(password="wr0ng-pw").render_as_string(hide_password=False)
    with pytest.raises(StorageUnavailable, match="password authentication failed") as info:
        open_storage(bad)
    assert "wr0ng-pw" not in str(info.value)


# ----------------------------------------------------------------------------- storage files


def test_a_storage_file_gives_the_url_and_must_be_private(tmp_path, monkeypatch):
    from storage import read_url_file, worker_environment

    monkeypatch.delenv("MTBERT_STORAGE", raising=False)
    path = tmp_path / "db.url"
    path.write_text("# the study's database\n\npostgresql://u:s3cret@db/x\n")
    path.chmod(0o600)
    assert read_url_file(path) == "postgresql://u:s3cret@db/x"
    assert resolve_url(None, path) == "postgresql://u:s3cret@db/x"
    monkeypatch.setenv("MTBERT_STORAGE_FILE", str(path))
    assert resolve_url() == "postgresql://u:s3cret@db/x"
    # processes started from here get the file's path, never the URL
    assert worker_environment(resolve_url()) == {"MTBERT_STORAGE_FILE": str(path.resolve())}
    path.chmod(0o644)
    with pytest.raises(StorageUnavailable, match="chmod 600"):
        read_url_file(path)
    with pytest.raises(StorageUnavailable, match="not found"):
        read_url_file(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    empty.chmod(0o600)
    with pytest.raises(StorageUnavailable, match="no URL"):
        read_url_file(empty)


def test_search_with_a_storage_file_keeps_the_url_out_of_argv_and_env(tmp_path, monkeypatch):
    import argparse

    from service import launch

    monkeypatch.delenv("MTBERT_STORAGE", raising=False)
    path = tmp_path / "db.url"
    path.write_text("sqlite:///secret-x.db\n")
    path.chmod(0o600)
    launched = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda cmd, **kw: launched.append((cmd, kw["env"])))
    args = argparse.Namespace(seed=None, n_trials=None, epochs=None, max_examples=None, model=None, data_dir=None,
                              storage_file=str(path))
    launch.start_workers("x", resolve_url(None, path), ["cpu"], args, tmp_path)
    ((cmd, env),) = launched
    assert "secret-x" not in " ".join(cmd) and all("secret-x" not in v for v in env.values())
    assert env["MTBERT_STORAGE_FILE"] == str(path.resolve())


# ----------------------------------------------------------------------------- outages (issue 8)


def test_connection_errors_are_told_from_request_errors():
    import sqlite3

    import psycopg2
    import sqlalchemy

    def wrapped(orig, cls=sqlalchemy.exc.OperationalError):
        try:
            try:
                raise cls("SELECT 1", {}, orig)
            except sqlalchemy.exc.SQLAlchemyError as exc:
                raise optuna.exceptions.StorageInternalError("commit failed") from exc
        except optuna.exceptions.StorageInternalError as outer:
            return outer

    assert storage.is_connection_error(wrapped(psycopg2.OperationalError("connection refused")))
    assert storage.is_connection_error(wrapped(sqlite3.OperationalError("database is locked")))
    assert storage.is_connection_error(wrapped(sqlite3.OperationalError("disk I/O error")))
    assert not storage.is_connection_error(wrapped(sqlite3.OperationalError("no such table: trials")))
    assert not storage.is_connection_error(wrapped(psycopg2.IntegrityError("dup"), sqlalchemy.exc.IntegrityError))
    assert not storage.is_connection_error(ValueError("x"))
    assert not storage.is_connection_error(storage.StorageOutage("gave up"))


def _failing(st, times: list[int]):
    """Make the next `times[0]` statements of `st` fail as a vanished database would."""
    import sqlite3

    import sqlalchemy

    def fail(conn, cursor, statement, parameters, context, executemany):
        if times[0] > 0:
            times[0] -= 1
            raise sqlalchemy.exc.OperationalError(statement, parameters, sqlite3.OperationalError("disk I/O error"))

    sqlalchemy.event.listen(st.engine, "before_cursor_execute", fail)


def test_a_storage_call_rides_out_an_outage_and_gives_up_past_the_limit(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MTBERT_STORAGE_OUTAGE_SECONDS", "30")
    st = open_storage(str(tmp_path / "o.db"), heartbeat=False)
    study = optuna.create_study(study_name="o", storage=st, direction="maximize")
    times = [3]
    _failing(st, times)
    with caplog.at_level(logging.WARNING, logger="storage"):
        trial = study.ask()  # three failures, then it goes through
        study.tell(trial, 0.5)
    assert times == [0] and study.trials[0].value == 0.5
    assert "unreachable (disk I/O error); retrying for up to 30 s" in caplog.text
    assert "reachable again after" in caplog.text
    monkeypatch.setenv("MTBERT_STORAGE_OUTAGE_SECONDS", "1")
    st = open_storage(str(tmp_path / "o.db"), heartbeat=False)
    _failing(st, [10**6])
    started = time.monotonic()
    with pytest.raises(storage.StorageOutage) as info:
        optuna.load_study(study_name="o", storage=st).trials
    assert time.monotonic() - started < 10
    assert str(info.value).startswith(f"storage sqlite:///{tmp_path / 'o.db'} unreachable for ")
    assert "MTBERT_STORAGE_OUTAGE_SECONDS=1" in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_and_artifact_folders_follow_the_shared_folder(tmp_path, monkeypatch):
    """After a SLURM launch with a shared folder, $MTBERT_SHARED_DIR alone finds the tasks' checkpoints and
    artifacts (export, dashboard, cleanup on a login node); it decides over a per-kind folder, as on the tasks."""
    for name in ("MTBERT_CHECKPOINT_DIR", "MTBERT_ARTIFACT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MTBERT_SHARED_DIR", str(tmp_path / "shared"))
    assert storage.checkpoint_dir() == tmp_path / "shared" / "checkpoints"
    storage.artifact_store().write("a1", io.BytesIO(b"x"))
    assert (tmp_path / "shared" / "artifacts" / "a1").read_bytes() == b"x"
    monkeypatch.setenv("MTBERT_CHECKPOINT_DIR", str(tmp_path / "mine"))
    assert storage.checkpoint_dir() == tmp_path / "shared" / "checkpoints"
    monkeypatch.delenv("MTBERT_SHARED_DIR")
    assert storage.checkpoint_dir() == tmp_path / "mine"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MTBERT_CHECKPOINT_DIR", str(tmp_path / "file" / "sub"))
    with pytest.raises(storage.StorageConfigError, match="MTBERT_CHECKPOINT_DIR: .*cannot create the folder"):
        storage.checkpoint_dir()
