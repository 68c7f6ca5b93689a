"""What search.py shows: one progress bar for the study, the leaderboard, the trials CSV."""
from __future__ import annotations

import time
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState
from tqdm.auto import tqdm

import storage as storage_lib
from service.ranking import best_trial, leaderboard
from service.study import FINISHED, trial_counts
from studies import StudySpec


def follow(study: optuna.Study, spec: StudySpec, procs: list, poll: float = 2.0) -> None:
    """One progress bar for the study until its budget is met or every worker has exited."""
    bar = tqdm(total=spec.n_trials, desc=spec.name, unit="trial", dynamic_ncols=True)
    try:
        while True:
            counts = trial_counts(study)
            finished = sum(counts[s] for s in FINISHED)
            bar.n = min(finished, spec.n_trials)
            bar.set_postfix_str(progress_text(study, spec, counts), refresh=True)
            if finished >= spec.n_trials or all(p.poll() is not None for p, _ in procs):
                break
            time.sleep(poll)
    finally:
        bar.close()


def progress_text(study: optuna.Study, spec: StudySpec, counts) -> str:
    best = best_trial(study, spec)
    best_text = f"best {best.value:.4f} (#{best.number})" if best else "best -"
    return (f"complete {counts[TrialState.COMPLETE]} pruned {counts[TrialState.PRUNED]} "
            f"failed {counts[TrialState.FAIL]} running {counts[TrialState.RUNNING]} | {best_text}")


def print_summary(study: optuna.Study, spec: StudySpec, top: int = 10) -> pd.DataFrame:
    df = leaderboard(study, spec)
    counts = trial_counts(study)
    print(f"\nstudy {spec.name}: {progress_text(study, spec, counts)} | budget {spec.n_trials}")
    if not df.empty:
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
            print(df.head(top).to_string(index=False))
    return df


def write_trials_csv(df: pd.DataFrame, name: str) -> Path:
    path = storage_lib.STORAGE_DIR / f"{name}-trials.csv"
    df.to_csv(path, index=False)
    return path
