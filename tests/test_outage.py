"""A storage outage (issue 8, point 5): a real PostgreSQL of this test's own is stopped mid-trial.

A worker rides out an outage shorter than MTBERT_STORAGE_OUTAGE_SECONDS (training goes on, the epoch's
report waits) and its results equal those of a run without one; past the limit it exits with one line,
its trial left RUNNING, and another worker retries that trial from its checkpoint once the storage is back.
The shared server (port 5433) is never touched: each test module starts a private one on a free port.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

import storage as storage_lib
from helpers import ROOT, free_port, load, write_study
from tiny import write_data

pytestmark = pytest.mark.slow  # real processes: see docs/testing.md

SCRIPT = ROOT / "storage" / "postgres.sh"


class PrivateServer:
    """A PostgreSQL of our own (storage/postgres.sh with its own data dir and port)."""

    def __init__(self) -> None:
        # under the temp root itself: the OS user postgres must reach the data dir
        self.dir = Path(tempfile.gettempdir()) / f"mtbert-outage-pg-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "MTBERT_PG_DIR": str(self.dir), "MTBERT_PG_PORT": str(free_port()),
                    "MTBERT_PG_PASSWORD": "outage-Pw7"}
        self.url = ""

    def ctl(self, command: str) -> str:
        proc = subprocess.run([str(SCRIPT), command], env=self.env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def start(self) -> None:
        self.url = self.ctl("start").splitlines()[-1]

    def stop(self) -> None:
        self.ctl("stop")

    def new_database(self) -> str:
        u = make_url(self.url)
        engine = sqlalchemy.create_engine(u.set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT",
                                          poolclass=sqlalchemy.pool.NullPool)
        name = f"outage_{uuid.uuid4().hex[:10]}"
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return u.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def server():
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL server binaries missing (CI=true: the outage tests must not be skipped)")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    srv = PrivateServer()
    srv.start()
    try:
        yield srv
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=srv.env, capture_output=True, timeout=180)
        shutil.rmtree(srv.dir, ignore_errors=True)


@pytest.fixture
def env(env):
    """conftest's worker environment with a grace of 4 s (not 10): the trial that a worker past the outage
    limit leaves RUNNING is failed and retried by the next worker within seconds."""
    return {**env, "MTBERT_HEARTBEAT_GRACE": "4"}


PARAMS = [{"lr": 3e-3, "hidden_dropout_prob": 0.1}, {"lr": 1e-3, "hidden_dropout_prob": 0.2}]


def _study(tmp_path: Path, tiny_model: Path, url: str) -> Path:
    """Two enqueued trials of 3 epochs of a few seconds each: the same params whatever the storage."""
    from service.study import open_study
    from studies import load_spec

    data = write_data(tmp_path / "data", n_train=1200, n_dev=48, malformed=False)
    study_file = write_study(tmp_path, "outage", tiny_model, data, n_trials=2, epochs=3, pruner='type = "none"')
    study = open_study(load_spec(study_file), url, {})
    for params in PARAMS:
        study.enqueue_trial(params)
    return study_file


def _worker(study_file: Path, url: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "--study", str(study_file), "--no-progress",
                             "--poll-seconds", "0.5"], cwd=ROOT, env={**env, "MTBERT_STORAGE": url},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_epoch(url: str, epoch: int, timeout: float = 300) -> None:
    """Until trial 0 is running with `epoch` epochs reported."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.3)
        study = load(url, "outage")
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running and running[0].number == 0 and running[0].user_attrs.get("epochs_done", 0) >= epoch:
            return
    pytest.fail(f"trial 0 did not reach epoch {epoch}")


def _scores(url: str) -> dict[int, dict[int, float]]:
    return {t.number: dict(t.intermediate_values) for t in load(url, "outage").trials}


def test_a_worker_rides_out_a_16_s_outage_with_the_same_results(tmp_path, tiny_model, server, env):
    reference_url = f"sqlite:///{tmp_path / 'reference.db'}"
    study_file = _study(tmp_path / "ref", tiny_model, reference_url)
    # the run without an outage goes on beside the one with it (its own storage and checkpoints; the
    # scores do not depend on what else the CPU runs): the 16 s of the outage are not waited twice
    reference = _worker(study_file, reference_url, {**env, "MTBERT_CHECKPOINT_DIR": str(tmp_path / "ref-ckpt")})

    url = server.new_database()
    study_file = _study(tmp_path, tiny_model, url)
    worker = _worker(study_file, url, {**env, "MTBERT_HEARTBEAT_GRACE": "60"})
    try:
        _wait_for_epoch(url, 1)
        server.stop()  # mid-trial: the worker trains on, its next report waits for the storage
        time.sleep(16)  # past the retries' backoff cap (0.5 s doubling to 8 s: 15.5 s): retries 8 s apart are ridden out too
        assert worker.poll() is None, worker.communicate()[0]
    finally:
        server.start()
    out = worker.communicate(timeout=600)[0]
    reference_out = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, reference_out
    assert worker.returncode == 0, out
    assert "unreachable" in out and "reachable again after" in out and "Traceback" not in out
    study = load(url, "outage")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.params for t in study.trials] == PARAMS
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        assert trial.value == trial.intermediate_values[3]
    assert _scores(url) == _scores(reference_url)  # the outage changed no score


def test_past_the_outage_limit_the_worker_exits_with_one_line_and_the_trial_is_retried(
        tmp_path, tiny_model, server, env):
    url = server.new_database()
    study_file = _study(tmp_path, tiny_model, url)
    env = {**env, "MTBERT_STORAGE_OUTAGE_SECONDS": "5"}
    first = _worker(study_file, url, env)
    try:
        _wait_for_epoch(url, 1)
        server.stop()
        out = first.communicate(timeout=300)[0]
    finally:
        server.start()
    assert first.returncode == 3, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out
    assert "unreachable for" in errors[0] and "MTBERT_STORAGE_OUTAGE_SECONDS=5" in errors[0]
    assert "its running trial is retried by another worker" in errors[0]
    assert "Traceback" not in out and len(out.splitlines()) < 40, out
    assert storage_lib.redact(url) in errors[0] and "outage-Pw7" not in out

    study = load(url, "outage")
    assert study.trials[0].state == TrialState.RUNNING  # left for the heartbeat/retry mechanism
    second = _worker(study_file, url, env)
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out
    study = load(url, "outage")
    assert study.trials[0].state == TrialState.FAIL
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == PARAMS[0]
    assert retry.user_attrs["resumed_from_epoch"] >= 1  # from the checkpoint the first worker wrote
    assert sorted(retry.intermediate_values) == [1, 2, 3]
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 2
