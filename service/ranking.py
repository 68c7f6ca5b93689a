"""Which trials are best: the study's best complete trial and its leaderboard (used by search.py and reports)."""
from __future__ import annotations

from collections.abc import Sequence

import optuna
import pandas as pd
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mtbert.tasks import TASK_METRICS
from storage.optuna_compat import handed_back, resumes_hand_back
from studies import StudySpec


def tally(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials by what they mean to a user, the one count the summary, --status and the report share:
    complete, pruned, failed (crashed: a hand-back is not a failure), running, and stopped (handed back by
    a signal, their resume queued)."""
    return {"complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL and not handed_back(t) for t in trials),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "stopped": len(pending_resumes(trials))}


def pending_resumes(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The queued (WAITING) retries of handed-back trials: stopped, to resume from their checkpoint."""
    return [t for t in trials if t.state == TrialState.WAITING and resumes_hand_back(t)]


def resume_epoch(trial: FrozenTrial) -> int:
    """The epoch a stopped trial (or its queued retry, which inherits it) resumes from."""
    return int(trial.user_attrs.get("epochs_done") or max(trial.intermediate_values, default=0))


def resume_text(trials: Sequence[FrozenTrial]) -> str:
    """What the stopped trials will do: "will resume from epoch 3" ("epochs 3, 1" for several; "will start
    again" when none had finished an epoch)."""
    epochs = [resume_epoch(t) for t in trials]
    if not any(epochs):
        return "will start again"
    return f"will resume from epoch{'s' if len(epochs) > 1 else ''} {', '.join(map(str, epochs))}"


def tally_text(trials: Sequence[FrozenTrial], prose: bool = False) -> str:
    """"complete 2 pruned 1 failed 0 running 1", then "stopped 1 (will resume from epoch 3)" when any is;
    with `prose`, "2 complete, 1 pruned, ..." (the report)."""
    n = tally(trials)
    keys = ("complete", "pruned", "failed", "running")
    text = ", ".join(f"{n[k]} {k}" for k in keys) if prose else " ".join(f"{k} {n[k]}" for k in keys)
    if n["stopped"]:
        stopped = f"{n['stopped']} stopped" if prose else f"stopped {n['stopped']}"
        text += f"{',' if prose else ''} {stopped} ({resume_text(pending_resumes(trials))})"
    return text


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
    resumed_by = {RetryHeartbeatStaleTrialCallback.retry_history(t)[-1]: t for t in trials if resumes_hand_back(t)}
    for t in trials:
        if t.state == TrialState.WAITING and resumes_hand_back(t):
            continue  # its handed-back trial's STOPPED row says it will resume
        row: dict = {"number": t.number, "state": "STOPPED" if t.state == TrialState.FAIL and handed_back(t)
                     else t.state.name}
        row.update({k: t.params[k] for k in spec.space if k in t.params})
        row.update({k: t.user_attrs[k] for k in recorded if k in t.user_attrs})
        if row["state"] == "STOPPED":
            retry = resumed_by.get(t.number)
            row["fail_reason"] = (f"stopped by a signal; {resume_text([t])}"
                                  if retry is None or retry.state == TrialState.WAITING
                                  else f"stopped by a signal; resumed as trial {retry.number}")
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
