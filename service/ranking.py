"""Which trials are best: the study's best complete trial and its leaderboard (used by search.py and reports)."""
from __future__ import annotations

from collections.abc import Sequence

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from mtbert.tasks import TASK_METRICS
from studies import StudySpec


def ranked_complete(study: optuna.Study, spec: StudySpec,
                    trials: Sequence[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """The complete trials, best first by the study's direction (pruned trials never rank).

    trials: the study's trials as the caller already fetched them (all states), so that they are not read
    from the storage again; None reads them.
    """
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(complete, key=lambda t: t.value, reverse=spec.direction == "maximize")


def best_trial(study: optuna.Study, spec: StudySpec,
               trials: Sequence[FrozenTrial] | None = None) -> FrozenTrial | None:
    """The best complete trial (of `trials` where the caller already fetched them), or None."""
    ranked = ranked_complete(study, spec, trials)
    return ranked[0] if ranked else None


def leaderboard(study: optuna.Study, spec: StudySpec,
                trials: Sequence[FrozenTrial] | None = None) -> pd.DataFrame:
    """All trials, best first: state, metric, per-task dev scores, params, epochs, duration.

    trials: the study's trials where the caller already fetched them (one storage read for both).
    """
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    if not trials:
        return pd.DataFrame()
    recorded = [*TASK_METRICS, "epochs_done", "resumed_from_epoch", "device", "fail_reason"]  # worker's user attrs
    rows = []
    for t in trials:
        row: dict = {"number": t.number, "state": t.state.name}
        row.update({k: t.params[k] for k in spec.space if k in t.params})
        row.update({k: t.user_attrs[k] for k in recorded if k in t.user_attrs})
        # the metric column is the trial's value (its own column even while no trial has one): never the
        # worker's per-epoch user attr of the same name
        row[spec.metric] = t.value
        row["duration"] = t.duration.total_seconds() if t.duration is not None else None
        rows.append(row)
    df = pd.DataFrame(rows)
    df[spec.metric] = df[spec.metric].astype(float)
    df["duration"] = df["duration"].astype(float).round(1)
    keep = ["number", "state", spec.metric, *TASK_METRICS, *sorted(spec.space),
            "epochs_done", "resumed_from_epoch", "device", "duration", "fail_reason"]
    df = df[[c for c in dict.fromkeys(keep) if c in df.columns]]
    # complete trials first: a pruned trial's value is only its last intermediate one
    df = df.assign(_pruned=df["state"] != "COMPLETE")
    df = df.sort_values(["_pruned", spec.metric], ascending=[True, spec.direction != "maximize"],
                        na_position="last")
    return df.drop(columns="_pruned")
