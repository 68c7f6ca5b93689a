"""What search.py shows while a study runs: one line per event (trial started, epoch done, pruned,
complete, failed, worker exited), read from the study's storage, under a progress bar on a terminal
and as plain log lines otherwise; then the leaderboard and the trials CSV.

The workers store everything this needs after every epoch (intermediate values, user attrs
`history`, `config`, `fail_reason`), so the display polls the storage and never talks to a worker.
"""
from __future__ import annotations

import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import optuna
import pandas as pd
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState

import storage as storage_lib
from mtbert.tasks import SCORE_NAMES, TASK_METRICS
from storage.optuna_compat import handed_back
from service.ranking import best_trial, leaderboard, resume_text, tally_text
from service.study import FINISHED, study_budget
from studies import StudySpec


def planned_epochs(trial: FrozenTrial, spec: StudySpec) -> int:
    """Epochs the trial was set to train: its recorded config, else the study's."""
    return int((trial.user_attrs.get("config") or {}).get("epochs") or spec.epochs)


def format_params(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(,\d+)? ")  # logging's asctime
_RECORD = re.compile(_STAMP.pattern + r"(DEBUG|INFO|WARNING) ")  # a logged record below ERROR: never the error
_EXCEPTION = re.compile(r"^\w+(\.\w+)*(Error|Exception)\b")  # a traceback's last line


def last_error_line(path: Path, start: int = 0) -> str | None:
    """What a worker's log (local) or a task's output (SLURM) says went wrong, after byte `start`: the
    last line that reports an error (a logged ERROR: its message; slurmstepd's or a script's `error:`;
    a traceback's exception line), else the last non-empty line; None when there is nothing to read."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        if " ERROR " in line:
            return line.split(" ERROR ", 1)[1]
        if _RECORD.match(line):  # an INFO/WARNING that quotes an exception ("graphs off: RuntimeError: ...")
            continue
        if "error:" in line.lower() or _EXCEPTION.match(line):
            return _STAMP.sub("", line)
    return _STAMP.sub("", lines[-1]) if lines else None


class TrialEvents:
    """Turns successive snapshots of a study's trials into event lines.

    The first snapshot is the baseline: what was there before this run prints nothing.
    """

    def __init__(self, spec: StudySpec, baseline: Sequence[FrozenTrial] = ()):
        self.spec = spec
        self.seen: dict[int, tuple[TrialState, int]] = {t.number: (t.state, self._last_epoch(t)) for t in baseline
                                                         if t.state != TrialState.WAITING}  # queued: not started
        self.best: tuple[int, float] | None = None
        for t in baseline:
            self._note_best(t)

    @staticmethod
    def _last_epoch(trial: FrozenTrial) -> int:
        return max(trial.intermediate_values, default=0)

    def _note_best(self, trial: FrozenTrial) -> bool:
        """Record a complete trial's value; True when it is the best so far."""
        if trial.state != TrialState.COMPLETE or trial.value is None:
            return False
        better = self.best is None or (trial.value > self.best[1] if self.spec.direction == "maximize"
                                       else trial.value < self.best[1])
        if better:
            self.best = (trial.number, trial.value)
        return better

    def update(self, trials: Sequence[FrozenTrial]) -> list[str]:
        lines = []
        for t in sorted(trials, key=lambda t: t.number):
            if t.state == TrialState.WAITING:  # queued (e.g. a retry), not started yet
                continue
            old_state, old_epoch = self.seen.get(t.number, (None, 0))
            epoch = self._last_epoch(t)
            if old_state is None:
                retry = RetryFailedTrialCallback.retried_trial_number(t)  # Optuna's public reader of its record
                again = (f" (retry of trial {retry}: resumes from its last epoch checkpoint, if it wrote one)"
                         if retry is not None else "")
                lines.append(f"trial {t.number} started: {format_params(t.params)}{again}")
            if epoch > old_epoch:
                lines += [self.epoch_line(t, e) for e in sorted(t.intermediate_values) if e > old_epoch]
            if t.state != old_state and t.state != TrialState.RUNNING:
                lines.append(self.end_line(t))
            self.seen[t.number] = (t.state, epoch)
        return lines

    def epoch_line(self, trial: FrozenTrial, epoch: int) -> str:
        metric = self.spec.metric
        row = next((h for h in trial.user_attrs.get("history") or [] if h.get("epoch") == epoch), {})
        tasks = " ".join(f"{SCORE_NAMES[k]} {row[k]:.3f}" for k in TASK_METRICS if isinstance(row.get(k), float))
        seconds = f" | {row['seconds']:.0f} s" if isinstance(row.get("seconds"), (int, float)) else ""
        return (f"trial {trial.number} epoch {epoch}/{planned_epochs(trial, self.spec)}: {metric} "
                f"{trial.intermediate_values[epoch]:.4f}" + (f" | {tasks}" if tasks else "") + seconds)

    def end_line(self, trial: FrozenTrial) -> str:
        metric, n = self.spec.metric, trial.number
        if trial.state == TrialState.PRUNED:
            epoch = self._last_epoch(trial)
            value = f": {metric} {trial.intermediate_values[epoch]:.4f}" if epoch else ""
            return f"trial {n} pruned after epoch {epoch}/{planned_epochs(trial, self.spec)}{value}"
        if trial.state == TrialState.COMPLETE:
            if self._note_best(trial):
                return f"trial {n} complete: {metric} {trial.value:.4f} (best so far)"
            return f"trial {n} complete: {metric} {trial.value:.4f} (best: #{self.best[0]} {self.best[1]:.4f})"
        if handed_back(trial):
            return f"trial {n} stopped: handed back, {resume_text([trial])}"
        reason = trial.user_attrs.get("fail_reason") or "no reason recorded"
        return f"trial {n} failed: {reason}"


class LineDisplay:
    """Not a terminal: one timestamped line per event, nothing redrawn."""

    def __init__(self, out: TextIO):
        self.out = out

    def event(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=self.out, flush=True)

    def status(self, study: optuna.Study, spec: StudySpec, trials: Sequence[FrozenTrial]) -> None:
        pass

    def close(self) -> None:
        pass


class BarDisplay(LineDisplay):
    """A terminal: the event lines scroll above one progress bar of the study's finished trials."""

    def __init__(self, out: TextIO, spec: StudySpec):
        from tqdm.auto import tqdm

        super().__init__(out)
        self.bar = tqdm(total=spec.n_trials, desc=spec.name, unit="trial", dynamic_ncols=True, file=out)

    def event(self, text: str) -> None:
        self.bar.write(f"{time.strftime('%H:%M:%S')} {text}", file=self.out)

    def status(self, study: optuna.Study, spec: StudySpec, trials: Sequence[FrozenTrial]) -> None:
        counts = Counter(t.state for t in trials)
        self.bar.total = budget = study_budget(study, spec)  # the recorded budget: it may change mid-run
        self.bar.n = min(sum(counts[s] for s in FINISHED), budget)
        running = [f"#{t.number} epoch {max(t.intermediate_values, default=0)}/{planned_epochs(t, spec)}"
                   for t in trials if t.state == TrialState.RUNNING]
        text = progress_text(study, spec, counts, trials)  # this poll's snapshot: no second read of the storage
        self.bar.set_postfix_str(text + (f" | {', '.join(running)}" if running else ""), refresh=True)

    def close(self) -> None:
        self.bar.close()


def follow(study: optuna.Study, spec: StudySpec, workers: list, poll: float = 2.0,
           out: TextIO | None = None) -> None:
    """Show the study's events until its budget is met or every worker has exited.

    workers: service.launch.LocalWorker (a process, its log); a worker that exits with an error is
    an event with the last ERROR line of its log.
    """
    out = out or sys.stdout
    events = TrialEvents(spec, study.get_trials(deepcopy=False))
    display = BarDisplay(out, spec) if out.isatty() else LineDisplay(out)
    reported: set[int] = set()
    try:
        while True:
            exited = [w for w in workers if w.proc.poll() is not None]  # before the snapshot: its last trials show
            trials = study.get_trials(deepcopy=False)
            for line in events.update(trials):
                display.event(line)
            for w in exited:
                if w.index not in reported:
                    reported.add(w.index)
                    if w.failed:
                        display.event(f"worker {w.index} {w.exit_text()}: {w.last_error()}")
            display.status(study, spec, trials)
            finished = sum(t.state in FINISHED for t in trials)
            if finished >= study_budget(study, spec) or len(exited) == len(workers):
                break
            time.sleep(poll)
    finally:
        display.close()


def progress_text(study: optuna.Study, spec: StudySpec, counts: Counter,
                  trials: Sequence[FrozenTrial] | None = None) -> str:
    """The one-line state of the study: trials by state and the best so far.

    trials: the snapshot `counts` was taken from, where the caller has it (it is not read again); None
    reads the complete trials from the storage.
    """
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    best = best_trial(study, spec, trials)
    best_text = f"best {best.value:.4f} (#{best.number})" if best else "best -"
    return f"{tally_text(trials)} | {best_text}"


def print_summary(study: optuna.Study, spec: StudySpec, top: int = 10) -> pd.DataFrame:
    """Print the study's state line and its top leaderboard rows; return the whole leaderboard."""
    trials = study.get_trials(deepcopy=False)  # one read: leaderboard, counts and best share this snapshot
    df = leaderboard(study, spec, trials)
    counts = Counter(t.state for t in trials)
    print(f"\nstudy {spec.name}: {progress_text(study, spec, counts, trials)} | budget {study_budget(study, spec)}")
    if not df.empty:
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
            print(df.head(top).to_string(index=False))
    return df


def write_trials_csv(df: pd.DataFrame, name: str) -> Path:
    path = storage_lib.STORAGE_DIR / f"{name}-trials.csv"
    df.to_csv(path, index=False)
    return path
