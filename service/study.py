"""Opening a study and what every command of the service shares: the study-file overrides,
trial counts and logging. search.py, worker.py and the reports import these; nothing here trains.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import warnings
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.trial import TrialState

import storage as storage_lib
from studies import StudySpec, load_spec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OVERRIDE_FLAGS = ("n_trials", "epochs", "max_examples", "model", "data_dir")


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """The study-file overrides shared by worker.py and search.py."""
    group = parser.add_argument_group("overrides of the study file, recorded on the study")
    group.add_argument("--n-trials", type=int,
                       help="global budget of finished (complete or pruned) trials (default: the study file's)")
    group.add_argument("--epochs", type=int, help="epochs per trial (default: the study file's)")
    group.add_argument("--max-examples", type=int,
                       help="examples per task and split, 0 = all (default: the study file's, else 0)")
    group.add_argument("--model", help="HF model id or local folder (default: the study file's, else the packaged "
                                       "all-MiniLM-L6-v2 or $MTBERT_DEFAULT_MODEL)")
    group.add_argument("--data-dir", type=absolute_path,
                       help="CS224N-format data folder (default: the study file's [train] data_dir, else "
                            "$MTBERT_DATA_DIR, else ./data)")


def absolute_path(text: str) -> str:
    """A command-line path made absolute against the current directory: workers run elsewhere (cwd = repository)."""
    return os.path.abspath(os.path.expanduser(text))


def load_study_spec(name: str, args: argparse.Namespace) -> tuple[StudySpec, dict[str, Any]]:
    """The study file with this command line's overrides applied, and the overrides given."""
    return load_spec(name).with_overrides(**{k: getattr(args, k) for k in OVERRIDE_FLAGS})


def open_study(spec: StudySpec, url: str | None, overrides: dict[str, Any], seed: int | None = None,
               role: str = "worker") -> optuna.Study:
    """Create or load the study in storage; record the spec and this run's overrides on it."""
    rdb = storage_lib.open_storage(url)
    study = optuna.create_study(study_name=spec.name, storage=rdb, direction=spec.direction,
                                sampler=spec.make_sampler(seed), pruner=spec.make_pruner(), load_if_exists=True)
    attrs = study.user_attrs
    if "spec" not in attrs:
        study.set_user_attr("spec", spec.to_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.metric])
    if overrides:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        study.set_user_attr(f"overrides {stamp} {role}@{socket.gethostname()}:{os.getpid()}", overrides)
    return study


def trial_counts(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def configure_logging(url: str | None, quiet: bool = False) -> None:
    """Log format and levels; the storage URL's password is masked in every record from here on."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # we run trials with ask/tell and start optuna's heartbeat thread ourselves (Worker.run_trial)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    try:
        storage_lib.install_secret_filter(storage_lib.resolve_url(url))
    except storage_lib.StorageUnavailable:  # reported by the caller when it opens the storage
        pass
