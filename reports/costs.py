"""How a study spent its epochs and its time, read from the trials alone (report.md's cost sections).

Epochs: how many each finished trial trained, per rung (the epochs a pruned trial reached), against the
epochs the same trials would have trained unpruned. Time: the study's wall clock, the worker time inside
trials, and of that the epochs' own seconds (training and dev evaluation, split where the trainer recorded
`eval_seconds`), checkpoint writes (`checkpoint_seconds`), and the rest (a trial's start: its config,
model load or reuse, resume; reporting to the storage).
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

from optuna.trial import FrozenTrial, TrialState

from service.markdown import markdown_table
from service.progress import planned_epochs
from studies import StudySpec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def rung_rows(spec: StudySpec, trials: list[FrozenTrial]) -> list[list[str]]:
    """One row per number of epochs trained: pruned and complete trials that stopped there."""
    stops = Counter((len(t.intermediate_values), t.state) for t in trials if t.state in FINISHED)
    rows = []
    for epochs in sorted({e for e, _ in stops}):
        pruned, complete = stops[(epochs, TrialState.PRUNED)], stops[(epochs, TrialState.COMPLETE)]
        rows.append([str(epochs), str(pruned), str(complete), str(epochs * (pruned + complete))])
    return rows


def epochs_section(spec: StudySpec, trials: list[FrozenTrial]) -> str:
    finished = [t for t in trials if t.state in FINISHED]
    if not finished:
        return ""
    trained = sum(len(t.intermediate_values) for t in finished)
    planned = sum(planned_epochs(t, spec) for t in finished)
    return "\n".join([
        "## Epochs by rung",
        "",
        f"The finished trials trained **{trained}** epochs of the {planned} they would have trained unpruned "
        f"({100 * trained / planned:.0f}%). Where they stopped:",
        "",
        markdown_table(["epochs trained", "pruned there", "complete there", "epochs"], rung_rows(spec, trials)),
    ])


def _busy(intervals: list[tuple[datetime, datetime]]) -> timedelta:
    """Length of the union of the intervals: wall time when at least one trial ran (a stop's gap excluded)."""
    total, end = timedelta(0), None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def time_section(trials: list[FrozenTrial]) -> str:
    timed = [t for t in trials if t.datetime_start is not None and t.datetime_complete is not None]
    if not timed:
        return ""
    intervals = [(t.datetime_start, t.datetime_complete) for t in timed]
    wall = max(e for _, e in intervals) - min(s for s, _ in intervals)
    busy = _busy(intervals)
    in_trials = sum((e - s).total_seconds() for s, e in intervals)
    if in_trials <= 0 or busy.total_seconds() <= 0:  # e.g. trials told at once (tests, imported studies)
        return ""

    def attr_sum(key: str) -> float:
        return sum(sum(t.user_attrs.get(key) or []) for t in timed)

    epochs, evals, saves = attr_sum("epoch_seconds"), attr_sum("eval_seconds"), attr_sum("checkpoint_seconds")
    rest = in_trials - epochs - saves

    def row(name: str, seconds: float, what: str) -> list[str]:
        return [name, f"{seconds:,.0f}", f"{100 * seconds / in_trials:.1f}%", what]

    rows = [row("epochs", epochs, "training steps and dev evaluation (`epoch_seconds`)")]
    if evals:
        rows += [row("of which training", epochs - evals, "optimizer steps"),
                 row("of which evaluation", evals, "dev scoring after each epoch (`eval_seconds`)")]
    if saves:
        rows.append(row("checkpoints", saves, "writing each epoch's checkpoint (`checkpoint_seconds`)"))
    rows.append(row("trial overhead", rest, "start (config, model reuse or load, resume), storage writes"
                    + ("" if saves else ", checkpoint writes")))
    gap = wall - busy
    return "\n".join([
        "## Where the time went",
        "",
        f"Wall clock from the first trial's start to the last trial's end: **{_hms(wall)}**"
        + (f" ({_hms(busy)} with a trial running; {_hms(gap)} with none, e.g. a stop before a resume)"
           if gap > timedelta(seconds=60) else "")
        + f". Worker time inside the {len(timed)} trials (failed and handed-back ones included): "
        f"{in_trials:,.0f} s, {in_trials / busy.total_seconds():.2f} trials running at once on average.",
        "",
        markdown_table(["where", "worker-seconds", "share", "what"], rows),
    ])


def _hms(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else \
        f"{seconds // 60} min {seconds % 60:02d} s"
