"""The private Optuna APIs the service relies on (storage/optuna_compat.py): fails when Optuna moves them."""
from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState

import storage as storage_lib
from storage import optuna_compat


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.setenv("MTBERT_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("MTBERT_HEARTBEAT_GRACE", "2")
    rdb = storage_lib.open_storage(f"sqlite:///{tmp_path / 'compat.db'}")
    return optuna.create_study(study_name="compat", storage=rdb, direction="maximize")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_adapter_reaches_every_private_api_it_wraps(study):
    assert isinstance(optuna_compat.rdb_storage(study), optuna.storages.RDBStorage)
    assert optuna_compat.rdb_storage(optuna_compat.study_storage(study)) is optuna_compat.rdb_storage(study)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert isinstance(optuna_compat.trial_id(trial), int)
    assert optuna_compat.retry_history(study, trial) == []
    with optuna_compat.heartbeat(study, trial):  # the thread writes heartbeats while the block runs
        time.sleep(1.5)
    trial.report(0.25, 1)
    frozen = study.tell(trial, state=TrialState.FAIL)
    optuna_compat.queue_retry(study, frozen)  # the retry is a waiting trial with the same params
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.params == frozen.params and retry.intermediate_values == {1: 0.25}
    again = study.ask()
    assert optuna_compat.retry_history(study, again) == [frozen.number]


def test_the_retried_storage_methods_are_every_database_call_optuna_makes():
    """storage.RetryingRDBStorage retries RDB_DATABASE_METHODS through an outage: each must exist, and every
    call Optuna's study wrapper (_CachedStorage) and heartbeat code make on an RDBStorage must be one of them."""
    import inspect
    import re

    from optuna.storages import RDBStorage, _cached_storage, _heartbeat

    for name in optuna_compat.RDB_DATABASE_METHODS:
        assert callable(getattr(RDBStorage, name, None)), name
    no_database = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "remove_session"}
    called = set(re.findall(r"self\._backend\.(\w+)\(", inspect.getsource(_cached_storage)))
    called |= set(re.findall(r"storage\.(_\w+)\(", inspect.getsource(_heartbeat)))
    assert called, "Optuna's code moved: read _cached_storage.py and _heartbeat.py again"
    assert called - no_database <= set(optuna_compat.RDB_DATABASE_METHODS), called - no_database
    for name in optuna_compat.RDB_DATABASE_METHODS:
        if name != "record_heartbeat":
            assert getattr(storage_lib.RetryingRDBStorage, name) is not getattr(RDBStorage, name), name
