"""Shared pytest fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from helpers import ROOT

# Set before any test imports storage (whose STORAGE_DIR reads it) and inherited by every search.py and
# worker.py a test starts: worker logs, trials CSVs and reports go to a temporary folder, never into the
# user's storage/ and reports/.
_OUTPUTS = Path(tempfile.mkdtemp(prefix="mtbert-tests-"))
os.environ["MTBERT_STORAGE_DIR"] = str(_OUTPUTS / "storage")
os.environ["MTBERT_REPORTS_DIR"] = str(_OUTPUTS / "reports")
atexit.register(shutil.rmtree, _OUTPUTS, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as README and .ci/run run the suite) every `slow` test goes
    to one process, in file order, while the fast tier runs in the other: the slow tests, which start
    workers, kill them and time heartbeats, never run beside each other, only beside unit tests for the
    first minutes. Without xdist the mark does nothing."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("slow"))


# ---------------------------------------------------------------------------
# PostgreSQL fixtures (owner: storage/). A server comes from MTBERT_TEST_PG_URL or
# a running `storage/postgres.sh start`; without one, tests skip, but fail under CI=true.
# ---------------------------------------------------------------------------


def _no_postgres(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def _pg_engine(url: str):
    import sqlalchemy
    from sqlalchemy.engine import make_url

    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project ships psycopg2.
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg2")
    return sqlalchemy.create_engine(
        u, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool,
        connect_args={"connect_timeout": 5},
    )


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of a reachable PostgreSQL database (role `mtbert`, may create databases)."""
    url = os.environ.get("MTBERT_TEST_PG_URL")
    source = "MTBERT_TEST_PG_URL"
    if not url:
        script = str(ROOT / "storage" / "postgres.sh")
        where = (f"MTBERT_PG_DIR={os.environ.get('MTBERT_PG_DIR', 'storage/pg')}, "
                 f"MTBERT_PG_PORT={os.environ.get('MTBERT_PG_PORT', '5433')}")
        if subprocess.run([script, "status"], capture_output=True).returncode != 0:
            _no_postgres(f"PostgreSQL tests skipped: MTBERT_TEST_PG_URL is not set and no local server answers "
                         f"storage/postgres.sh status ({where}); run storage/postgres.sh start, or set "
                         f"MTBERT_TEST_PG_URL to a server's URL")
        url = subprocess.run([script, "url"], capture_output=True, text=True, check=True).stdout
        url = url.strip().splitlines()[-1]
        source = f"storage/postgres.sh url ({where})"
    try:
        with _pg_engine(url).connect():
            pass
    except Exception as exc:  # noqa: BLE001 - any failure means "no server"
        from storage import redact

        _no_postgres(f"PostgreSQL tests skipped: {redact(url)} (from {source}) unreachable: {type(exc).__name__}")
    return url


@pytest.fixture
def clean_pg_url(pg_url: str):
    """URL of a fresh, empty database (created for this test, dropped afterwards)."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = _pg_engine(pg_url)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --------------------------------------------------------------- end PostgreSQL fixtures


# ---------------------------------------------------------------------------
# Trainer fixtures (owner: mtbert/): tiny random BERT, tiny data, the real data.
# ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """Each test that takes it runs twice: on a fresh SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("clean_pg_url")


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    """Token caches, artifacts and checkpoints of the tests go to temp folders, never into the repo."""
    os.environ["MTBERT_CACHE_DIR"] = str(tmp_path_factory.mktemp("token-cache"))
    os.environ["MTBERT_ARTIFACT_DIR"] = str(tmp_path_factory.mktemp("artifacts"))
    os.environ["MTBERT_CHECKPOINT_DIR"] = str(tmp_path_factory.mktemp("checkpoints"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def env(tmp_path) -> dict:
    """Environment of worker processes: fast heartbeats (a grace a busy 2-core machine can keep), private
    checkpoint and artifact folders, one thread each. A file whose workers need something else overrides it
    with its own `env` fixture that takes this one and changes only that."""
    return {**os.environ, "MTBERT_HEARTBEAT_INTERVAL": "1", "MTBERT_HEARTBEAT_GRACE": "10",
            "MTBERT_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "MTBERT_ARTIFACT_DIR": str(tmp_path / "artifacts"),
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    from tiny import write_data

    return write_data(tmp_path / "data")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """../shared/data (or $MTBERT_DATA_DIR); skipped where absent, except under CI."""
    folder = Path(os.environ.get("MTBERT_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (folder / "quora-train.csv").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the shared data set is missing at {folder}", pytrace=False)
        pytest.skip(f"real-data tests skipped: no CS224N data at {folder} (set MTBERT_DATA_DIR to the full data "
                    f"folder, see docs/data.md)")
    return folder
