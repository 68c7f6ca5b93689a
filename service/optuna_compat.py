"""Every private Optuna API the service uses, in one place (tests/test_optuna_compat.py pins them).

We run trials with ask/tell rather than `study.optimize` (the budget is checked under our own lock),
so we start Optuna's heartbeat thread ourselves, read a trial's retry history, and queue a retry
by hand when a worker hands its trial back. When Optuna moves any of these, the adapter's test
fails first, and this file is the only one to change.
"""
from __future__ import annotations

import contextlib

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread  # private: the heartbeat study.optimize runs


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage a study talks to (Optuna's `_CachedStorage` wrapper around the RDBStorage)."""
    return study._storage


def rdb_storage(storage_or_study) -> RDBStorage:
    """The RDBStorage under a study, its cached wrapper or an RDBStorage itself."""
    storage = study_storage(storage_or_study) if isinstance(storage_or_study, optuna.Study) else storage_or_study
    return getattr(storage, "_backend", storage)


def trial_id(trial: optuna.Trial) -> int:
    """The storage's id of a live trial (unique across studies of one storage)."""
    return trial._trial_id


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> contextlib.AbstractContextManager:
    """Beat for `trial` while the block runs (a no-op when the storage has no heartbeat)."""
    return get_heartbeat_thread(trial_id(trial), study_storage(study))


def retry_history(study: optuna.Study, trial: optuna.Trial) -> list[int]:
    """Numbers of the trials this one retries, oldest first (empty for a first attempt)."""
    frozen = study_storage(study).get_trial(trial_id(trial))
    return RetryHeartbeatStaleTrialCallback.retry_history(frozen)


def queue_retry(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
    """Queue the storage's retry of a failed trial, as its heartbeat callback would for a dead worker."""
    callback = getattr(study_storage(study), "get_heartbeat_stale_trial_callback", lambda: None)()
    if callback is not None:
        callback(study, frozen)
