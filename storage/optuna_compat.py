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
from optuna.storages._rdb import models as rdb_models  # private: the heartbeat table, read for staleness
from optuna.storages._rdb.storage import _create_scoped_session  # private: Optuna's session scope
from optuna.trial import TrialState


# The RDBStorage methods that talk to the database, which storage.RetryingRDBStorage retries through an
# outage: the public ones, and the private ones that Optuna's `_CachedStorage` (the wrapper every Study
# puts around an RDBStorage) and `fail_stale_trials` call on it. Pinned by tests/test_optuna_compat.py.
RDB_DATABASE_METHODS: tuple[str, ...] = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
    "get_n_trials", "get_best_trial", "record_heartbeat",
    "_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id", "_get_stale_trial_ids",
)


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


def study_id(study: optuna.Study) -> int:
    """The storage's id of a study (a rename gives the study a new id: Optuna copies it)."""
    return study._study_id


def adopt_unbeaten_trials(study: optuna.Study) -> list[int]:
    """Give every RUNNING trial of the study that has no heartbeat row one heartbeat now, and return their ids.

    Optuna judges staleness only for trials with a heartbeat row, so a RUNNING trial without one (copied
    by a study rename, or left by a worker killed between `ask` and its first beat) would stay RUNNING
    forever. With one beat, it is stale after the grace period unless a live worker goes on beating it;
    the beat is written the way live workers write theirs (record_heartbeat), so both are on one clock.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState
    from sqlalchemy.orm import selectinload

    rdb = rdb_storage(study)
    with _create_scoped_session(rdb.scoped_session) as session:
        running = (session.query(models.TrialModel).options(selectinload(models.TrialModel.heartbeats))
                   .filter(models.TrialModel.state == TrialState.RUNNING,
                           models.TrialModel.study_id == study_id(study)).all())
        unbeaten = [t.trial_id for t in running if not t.heartbeats]
    for trial_id_ in unbeaten:
        rdb.record_heartbeat(trial_id_)
    return unbeaten


# ------------------------------------------------------------ hand-backs are not failures

HANDBACKS_ATTR = "mtbert_handbacks"  # system attr: numbers of the trials of a retry chain that were handed back


def mark_handed_back(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record on the running trial that its worker hands it back (SIGTERM/SIGINT), not that it crashed.
    A system attr (the dashboard cannot write those); Optuna copies it into the retry, so the chain carries it."""
    frozen = study_storage(study).get_trial(trial_id(trial))
    numbers = [*frozen.system_attrs.get(HANDBACKS_ATTR, []), trial.number]
    study_storage(study).set_trial_system_attr(trial_id(trial), HANDBACKS_ATTR, numbers)


def handed_back(trial: optuna.trial.FrozenTrial) -> bool:
    """A FAIL trial whose worker handed it back (stopped by a signal), rather than one that crashed."""
    return trial.number in trial.system_attrs.get(HANDBACKS_ATTR, [])


def resumes_hand_back(trial: optuna.trial.FrozenTrial) -> bool:
    """A retry (WAITING, or later) of a trial that was handed back."""
    history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return bool(history) and history[-1] in trial.system_attrs.get(HANDBACKS_ATTR, [])


class CrashRetryCallback(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a failed trial, where `max_retry` counts only crashes (a dead worker, a failure):
    a graceful hand-back (a preemption's SIGTERM, Ctrl-C) is not one, so a trial preempted any number of
    times keeps its checkpointed epochs. Optuna's own callback counts every attempt of the chain."""

    def __init__(self, max_retry: int | None = None, inherit_intermediate_values: bool = False) -> None:
        super().__init__(max_retry=None, inherit_intermediate_values=inherit_intermediate_values)
        self.max_crashes = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        attempts = len(RetryHeartbeatStaleTrialCallback.retry_history(trial)) + 1
        crashes = attempts - len(trial.system_attrs.get(HANDBACKS_ATTR, []))
        if self.max_crashes is not None and crashes > self.max_crashes:
            return
        super().__call__(study, trial)


def study_system_attrs(study: optuna.Study) -> dict:
    """The study's system attributes (Optuna deprecated Study.system_attrs; the storage keeps them)."""
    return study_storage(study).get_study_system_attrs(study._study_id)


def set_study_system_attr(study: optuna.Study, key: str, value) -> None:
    """Record a study system attribute: what the service itself decided (seed, identity), not a user's note."""
    study_storage(study).set_study_system_attr(study._study_id, key, value)


def running_heartbeats(storage: RDBStorage, study_id: int) -> dict[int, object]:
    """{trial id: its stored heartbeat} of the study's RUNNING trials that have beaten at least once (the
    values are only compared with each other, never with a clock: storage.RetryingRDBStorage)."""
    beat, trial = rdb_models.TrialHeartbeatModel, rdb_models.TrialModel
    with _create_scoped_session(storage.scoped_session) as session:
        rows = (session.query(beat.trial_id, beat.heartbeat).join(trial, trial.trial_id == beat.trial_id)
                .filter(trial.study_id == study_id, trial.state == TrialState.RUNNING).all())
    return {int(trial_id): value for trial_id, value in rows}


def set_trial_system_attr(study: optuna.Study, trial: optuna.Trial, key: str, value) -> None:
    """Record a trial system attribute (Optuna deprecated Trial.set_system_attr)."""
    study_storage(study).set_trial_system_attr(trial_id(trial), key, value)
