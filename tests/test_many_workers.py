"""Many workers, many machines (issue 17): per-trial seeding, staleness on one clock, the identity a
trial trained with, one budget, and NaN scores."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import storage as storage_lib
from service.study import open_study
from studies import load_spec
from worker import Worker

ROOT = Path(__file__).resolve().parents[1]

STUDY = """
description = "issue 17"
direction = "maximize"
metric = "overall"
n_trials = {n_trials}

[train]
epochs = 1
batch_size = 8
max_examples = 16
model = "{model}"
data_dir = "{data}"
device = "cpu"
eval_batch_size = 64
{train}

[space]
lr = {{ type = "float", low = 1e-4, high = 1e-2, log = true }}
hidden_dropout_prob = {{ type = "float", low = 0.0, high = 0.3 }}

[sampler]
type = "{sampler}"
{sampler_extra}

[pruner]
type = "none"
"""


def write_study(folder: Path, name: str, model, data, n_trials: int = 4, sampler: str = "random",
                sampler_extra: str = "", train: str = "") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(n_trials=n_trials, model=model, data=data, sampler=sampler,
                                 sampler_extra=sampler_extra, train=train))
    return path


def test_a_nan_score_fails_its_trial_with_its_reason(tmp_path, tiny_model, tiny_data, monkeypatch):
    """A NaN dev score (e.g. diverged weights whose loss check passed: a correlation of inf predictions) is a
    failed trial with its reason: no traceback in study.tell, no trial left RUNNING, the worker goes on and a
    rerun does not retry it (issue 17, finding 6)."""
    import mtbert.train

    real_evaluate = mtbert.train.evaluate

    def nan_evaluate(*args, **kwargs):
        metrics, predictions = real_evaluate(*args, **kwargs)
        return {**metrics, "sts_corr": math.nan, "overall": math.nan}, predictions

    monkeypatch.setattr(mtbert.train, "evaluate", nan_evaluate)
    study_file = write_study(tmp_path, "nan", tiny_model, tiny_data, n_trials=2)
    spec = load_spec(study_file)
    url = f"sqlite:///{tmp_path / 'n.db'}"
    study = open_study(spec, url, {})
    Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck", max_failures=2).run()
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    reason = study.trials[0].user_attrs["fail_reason"]
    assert "overall is nan" in reason, reason
    monkeypatch.setattr(mtbert.train, "evaluate", real_evaluate)  # a rerun trains new trials, retries none
    Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2


def test_a_budget_edited_mid_run_is_one_budget_for_every_worker(tmp_path, tiny_model, tiny_data):
    """A worker started with the file's old budget stops at the budget edited in since (the recorded one);
    a budget below the trials already finished is refused (issue 17, finding 5)."""
    from service.study import StudyMismatch
    from reports.study_report import write_report

    url = f"sqlite:///{tmp_path / 'b.db'}"
    spec4 = load_spec(write_study(tmp_path, "budget", tiny_model, tiny_data, n_trials=4))
    study = open_study(spec4, url, {})
    early = Worker(study, spec4, device="cpu", progress=False, checkpoint_root=tmp_path / "ck")  # holds 4
    spec2 = load_spec(write_study(tmp_path, "budget", tiny_model, tiny_data, n_trials=2))  # the file edited
    open_study(spec2, url, {})  # another worker (or search.py) joins with the edited file
    early.run()
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2 and len(study.trials) == 2
    spec1 = load_spec(write_study(tmp_path, "budget", tiny_model, tiny_data, n_trials=1))
    with pytest.raises(StudyMismatch, match="n_trials: 1 is below the 2 finished and 0 running trials"):
        open_study(spec1, url, {})
    report = write_report(study, spec4, tmp_path / "report", url).read_text()
    assert "2 finished of a budget of 2" in report


# ------------------------------------------------------------ staleness on one clock


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_beating_trial_of_a_skewed_clock_is_never_stale_on_sqlite(tmp_path, monkeypatch):
    """SQLite: a worker whose clock is 10 min slow writes heartbeats that look 10 min old to everyone else's
    clock (and a judge 10 min fast sees everyone's that way). While they keep changing the trial is alive;
    once they stop it is failed after the grace period (issue 17, finding 2)."""
    import sqlite3
    import threading
    from datetime import datetime, timedelta

    from optuna.storages import fail_stale_trials

    from storage import optuna_compat

    monkeypatch.setenv("MTBERT_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("MTBERT_HEARTBEAT_GRACE", "2")
    db = tmp_path / "skew.db"
    study = optuna.create_study(study_name="skew", storage=storage_lib.open_storage(f"sqlite:///{db}"))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    optuna_compat.rdb_storage(study).record_heartbeat(optuna_compat.trial_id(trial))
    stop = threading.Event()

    def skewed_worker() -> None:  # beats as a worker 10 minutes behind would: an old but changing time
        with sqlite3.connect(db, timeout=30) as conn:
            while not stop.is_set():
                beat = (datetime.utcnow() - timedelta(minutes=10)).strftime("%Y-%m-%d %H:%M:%S.%f")
                conn.execute("UPDATE trial_heartbeats SET heartbeat = ? WHERE trial_id = ?",
                             (beat, optuna_compat.trial_id(trial)))
                conn.commit()
                stop.wait(0.5)

    beating = threading.Thread(target=skewed_worker, daemon=True)
    beating.start()
    try:
        for _ in range(10):  # 5 s: more than twice the grace
            fail_stale_trials(study)
            assert study.trials[0].state == TrialState.RUNNING
            time.sleep(0.5)
    finally:
        stop.set()
        beating.join()
    deadline = time.monotonic() + 10
    while study.trials[0].state == TrialState.RUNNING and time.monotonic() < deadline:
        fail_stale_trials(study)  # the worker died: its unchanging heartbeat is stale after the grace
        time.sleep(0.5)
    assert study.trials[0].state == TrialState.FAIL


def test_postgresql_sessions_are_pinned_to_utc(clean_pg_url, monkeypatch):
    """A worker under PGTZ=Asia/Tokyo stores and reads heartbeats in UTC, as every other worker does."""
    import sqlalchemy

    monkeypatch.setenv("PGTZ", "Asia/Tokyo")
    rdb = storage_lib.open_storage(clean_pg_url)
    with rdb.engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SHOW TIME ZONE")).scalar() == "UTC"
