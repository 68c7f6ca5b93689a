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


def trials_frame(trials: Sequence[FrozenTrial], attrs: tuple[str, ...]) -> pd.DataFrame:
    """What `study.trials_dataframe(attrs=attrs)` returns, made from trials the caller already has.

    Optuna's method reads every trial from the storage itself (twice), which a caller holding a
    snapshot need not pay again. Same columns, order, names and values (pinned against Optuna's by
    tests/test_progress.py); only attrs without "value"/"values", whose columns Optuna names after the
    study's metric names, which a trial does not carry.
    """
    if "value" in attrs or "values" in attrs:
        raise ValueError("trials_frame: value(s) columns need the study's metric names; use study.trials_dataframe")
    if not trials:
        return pd.DataFrame()
    columns: dict[str, set[tuple[str, object]]] = {attr: set() for attr in attrs}
    records = []
    for trial in trials:
        record: dict[tuple[str, object], object] = {}
        for attr in attrs:
            name = attr[1:] if attr.startswith("_") else attr  # as Optuna: a leading underscore is dropped
            value = getattr(trial, attr)
            if isinstance(value, TrialState):
                value = value.name
            if isinstance(value, dict):
                items = value.items()
            elif isinstance(value, list):
                items = enumerate(value)
            else:
                items = (("", value),)
            for key, item in items:
                record[(name, key)] = item
                columns[attr].add((name, key))
        records.append(record)
    ordered = [column for attr in attrs for column in sorted(columns[attr])]
    df = pd.DataFrame(records, columns=pd.MultiIndex.from_tuples(ordered))
    df.columns = ["_".join(part for part in map(str, column) if part) for column in ordered]
    return df


def leaderboard(study: optuna.Study, spec: StudySpec,
                trials: Sequence[FrozenTrial] | None = None) -> pd.DataFrame:
    """All trials, best first: state, metric, per-task dev scores, params, epochs, duration.

    trials: the study's trials where the caller already fetched them (one storage read for both).
    """
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    df = trials_frame(trials, ("number", "state", "params", "user_attrs", "duration"))
    if df.empty:
        return df
    df = df.rename(columns=lambda c: c.replace("user_attrs_", "").replace("params_", ""))
    # the metric column is the trial's value (its own column even while no trial has one): never the
    # worker's per-epoch user attr of the same name, and never a column Optuna names after metric names
    values = {t.number: t.value for t in trials}
    df[spec.metric] = df["number"].map(values).astype(float)
    df["duration"] = pd.to_timedelta(df["duration"]).dt.total_seconds().round(1)
    keep = ["number", "state", spec.metric, *TASK_METRICS, *sorted(spec.space),
            "epochs_done", "resumed_from_epoch", "device", "duration", "fail_reason"]
    df = df[[c for c in dict.fromkeys(keep) if c in df.columns]]
    # complete trials first: a pruned trial's value is only its last intermediate one
    df = df.assign(_pruned=df["state"] != "COMPLETE")
    df = df.sort_values(["_pruned", spec.metric], ascending=[True, spec.direction != "maximize"],
                        na_position="last")
    return df.drop(columns="_pruned")
