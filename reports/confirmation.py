"""The results of a confirmation (service/confirm.py runs it): what a finished or running X:confirm says.

Its complete trials grouped by configuration (mean and sd over seeds, service.stats), the best against
the runner-up (paired t over shared seeds) and against the search's single-seed best, in sentences and a
markdown table for X's report and search.py's summary; and which trial --export-best takes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mtbert.tasks import SCORE_NAMES, SCORES
from service import confirm
from service.markdown import markdown_table, number
from service.ranking import best_trial
from service.stats import PairedComparison, mean_sd, paired_t, verdict
from service.study import study_uuid, trial_counts
from storage import optuna_compat
from studies import StudySpec


@dataclass
class ConfigResult:
    """One confirmed configuration: its parent trial and its complete trials by seed."""

    parent: dict[str, Any]
    runs: dict[int, FrozenTrial] = field(default_factory=dict)  # seed -> complete confirmation trial

    @property
    def number(self) -> int:
        return self.parent["trial"]

    def values(self, key: str | None = None, seeds: list[int] | None = None) -> list[float]:
        """Per seed: the study's metric (key None) or a recorded score."""
        seeds = sorted(self.runs) if seeds is None else seeds
        return [self.runs[s].value if key is None else self.runs[s].user_attrs.get(key) for s in seeds]

    def mean_sd(self, key: str | None = None) -> tuple[float | None, float | None]:
        return mean_sd([v for v in self.values(key) if v is not None])

    def best_run(self, maximize: bool) -> FrozenTrial | None:
        runs = sorted(self.runs.values(), key=lambda t: t.value, reverse=maximize)
        return runs[0] if runs else None


@dataclass
class Summary:
    """A confirmation's results: configurations best first by mean metric, and best against runner-up."""

    name: str
    plan: dict[str, Any]
    configs: list[ConfigResult]
    counts: dict[TrialState, int]
    comparison: PairedComparison | None = None
    failed: int = 0  # (configuration, seed) slots whose every attempt failed (see failed_slots)

    @property
    def maximize(self) -> bool:
        return self.plan["direction"] == "maximize"

    @property
    def slots(self) -> int:
        return len(self.plan["parents"]) * len(self.plan["seeds"])

    @property
    def complete(self) -> int:
        return sum(len(c.runs) for c in self.configs)

    def verdict(self) -> str:
        if len(self.plan["parents"]) < 2 and self.plan.get("top", 2) < 2:
            return "One configuration was asked for (--confirm 1): there is no runner-up to compare it with."
        if len(self.plan["parents"]) < 2:
            return ("The search completed one distinct configuration (its other trials were pruned, failed or "
                    "repeated it): there is no runner-up to compare it with. A larger budget (--n-trials) gives a "
                    "confirmation more to compare.")
        if len(self.configs) < 2:
            return "Only one configuration has complete seeds: nothing to compare it with."
        a, b = self.configs[:2]
        text = verdict(f"configuration #{a.number}", f"configuration #{b.number}", self.comparison, self.maximize)
        return text[0].upper() + text[1:]

    def search_best_sentence(self) -> str:
        """Whether the search's single-seed winner is also the winner under fresh seeds."""
        winner = next((c for c in self.configs if c.parent["search_rank"] == 1), None)
        best = self.configs[0] if self.configs else None
        if best is None:
            return "No confirmation trial is complete yet."
        if self.complete + self.failed < self.slots:  # a verdict on part of the seeds would read as final
            return (f"So far {self.complete} of {self.slots} confirmation trials are complete: "
                    f"no verdict on the search's best until all are.")
        if len(self.configs) < 2:  # "also the best" of one would be empty
            return (f"Under fresh seeds #{best.number} scores {best.mean_sd()[0]:.4f} on average "
                    f"against {best.parent['value']:.4f} in the search.")
        if winner is best:
            return f"The search's single-seed best, #{best.number}, is also the best under fresh seeds."
        first = next(p for p in self.plan["parents"] if p["search_rank"] == 1)
        text = (f"The search's single-seed best was #{first['trial']}; under fresh seeds #{best.number} "
                f"(search rank {best.parent['search_rank']}) is best.")
        if winner is not None and winner is not self.configs[1]:  # the verdict above compared another pair
            shared = sorted(set(best.runs) & set(winner.runs))
            against = verdict(f"configuration #{best.number}", f"configuration #{winner.number}",
                              paired_t(best.values(seeds=shared), winner.values(seeds=shared)), self.maximize)
            text += f" Against the search's best: {against}"
        return text


def failed_slots(trials: list[FrozenTrial]) -> int:
    """(configuration, seed) slots whose every attempt failed: an attempt handed back by a stopped or
    killed worker is FAIL too, but its slot was retried, so it is not a failure of the slot."""
    states: dict[tuple, set] = {}
    for t in trials:
        states.setdefault(confirm.slot(t), set()).add(t.state)
    return sum(1 for v in states.values() if v == {TrialState.FAIL})


def summarize(study: optuna.Study) -> Summary:
    """Group the complete trials of a confirmation study by parent; rank by mean metric over seeds."""
    plan = study.user_attrs["confirm"]
    configs = {p["trial"]: ConfigResult(p) for p in plan["parents"]}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        parent, seed = confirm.slot(t)
        if parent in configs and t.value is not None:
            configs[parent].runs.setdefault(seed, t)
    maximize = plan["direction"] == "maximize"
    ranked = sorted((c for c in configs.values() if c.runs), key=lambda c: c.mean_sd()[0], reverse=maximize)
    summary = Summary(study.study_name, plan, ranked, trial_counts(study),
                      failed=failed_slots(study.get_trials(deepcopy=False)))
    if len(ranked) >= 2:
        shared = sorted(set(ranked[0].runs) & set(ranked[1].runs))
        summary.comparison = paired_t(ranked[0].values(seeds=shared), ranked[1].values(seeds=shared))
    return summary


def load_confirmation(parent: optuna.Study) -> optuna.Study | None:
    """X:confirm of study X in X's storage, or None; confirm.ConfirmError when it confirms an earlier X."""
    name = parent.user_attrs.get("confirmed_by") or confirm.confirmation_name(parent.study_name)
    try:
        study = optuna.load_study(study_name=name, storage=optuna_compat.rdb_storage(parent))
    except KeyError:
        return None
    plan = study.user_attrs.get("confirm")
    if plan is None:
        return None
    confirm.check_parent(plan, study_uuid(parent, create=False), name)
    return study


def compute(study: optuna.Study) -> tuple[int, int, float]:
    """Trials, epochs trained (resumed epochs not counted twice) and seconds of trial time of a study."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    epochs = sum(len(t.user_attrs.get("epoch_seconds") or []) for t in trials)
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    return len(trials), epochs, seconds


def cost_sentence(parent: optuna.Study, study: optuna.Study) -> str:
    s_trials, s_epochs, s_seconds = compute(parent)
    c_trials, c_epochs, c_seconds = compute(study)
    ratio = (f": {c_epochs / s_epochs:.2f}x the search's epochs, {c_seconds / s_seconds:.2f}x its trial time"
             if s_epochs and s_seconds else "")
    return (f"Compute: the confirmation trained {c_epochs} epochs in {c_trials} trials ({c_seconds:.0f} s of trial "
            f"time), the search {s_epochs} epochs in {s_trials} trials ({s_seconds:.0f} s){ratio}.")


def confirmation_table(summary: Summary) -> str:
    """Markdown: per configuration, mean ± sd over seeds of the metric and of each task, the search's score beside."""
    metric = summary.plan["metric"]
    params = sorted({k for p in summary.plan["parents"] for k in p["params"]})
    tasks = [k for k in SCORES if k != metric]
    header = ["config", f"search {metric}", f"{metric} mean ± sd", *[f"{SCORE_NAMES[k]} mean ± sd" for k in tasks],
              "seeds", "best seed (trial)", *params]
    rows = []
    for c in summary.configs:
        best = c.best_run(summary.maximize)
        rows.append([f"#{c.number} (search rank {c.parent['search_rank']})", number(c.parent["value"]),
                     _mean_sd(c.mean_sd()), *[_mean_sd(c.mean_sd(k)) for k in tasks],
                     f"{len(c.runs)} of {len(summary.plan['seeds'])}",
                     f"{best.user_attrs.get('seed')} (#{best.number})" if best else "",
                     *[number(c.parent["params"].get(k), ".4g") for k in params]])
    return markdown_table(header, rows)


def _mean_sd(pair: tuple[float | None, float | None]) -> str:
    mean, sd = pair
    if mean is None:
        return ""
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def report_markdown(parent: optuna.Study, heading: str = "## Confirmation under fresh seeds") -> str | None:
    """The confirmation section of X's report and summary; None where X has no confirmation."""
    try:
        study = load_confirmation(parent)
    except confirm.ConfirmError as exc:
        return f"{heading}\n\n{exc}"
    if study is None:
        return None
    summary = summarize(study)
    counts = summary.counts
    lines = [heading, "",
             f"Study `{summary.name}`: the top {len(summary.plan['parents'])} configurations of the search, "
             f"each re-trained with seeds {', '.join(map(str, summary.plan['seeds']))} (full epochs, no pruning); "
             f"{summary.complete} of {summary.slots} trials complete, {counts.get(TrialState.RUNNING, 0)} running, "
             f"{counts.get(TrialState.WAITING, 0)} waiting, {summary.failed} failed. "
             f"Configurations are named by their search trial; mean ± sample standard deviation over seeds."]
    if summary.configs:
        lines += ["", confirmation_table(summary), "", summary.verdict(), summary.search_best_sentence()]
    lines += ["", cost_sentence(parent, study)]
    return "\n".join(lines)


def print_confirmation(parent: optuna.Study) -> None:
    """The confirmation section under search.py's leaderboard (--status and after a run)."""
    text = report_markdown(parent, heading=f"confirmation ({confirm.confirmation_name(parent.study_name)}):")
    if text:
        print("\n" + text)


def export_choice(study: optuna.Study, spec: StudySpec
                  ) -> tuple[optuna.Study, FrozenTrial | None, str, dict[str, Any]]:
    """The study that holds the trial whose checkpoint --export-best takes, that trial, a sentence saying
    why, and facts for best_trial.json: the best confirmed configuration's best seed (a trial of X:confirm)
    when X has a confirmation, else X's best trial."""
    confirmation = load_confirmation(study)
    summary = summarize(confirmation) if confirmation is not None else None
    if summary is None or not summary.configs:
        best = best_trial(study, spec)
        why = "no confirmation under fresh seeds" if summary is None else "its confirmation has no complete trial yet"
        text = f"the search's best trial #{best.number} (single seed; {why})" if best else ""
        return study, best, text, {"study": study.study_name}
    config = summary.configs[0]
    best = config.best_run(summary.maximize)
    mean, sd = config.mean_sd()
    text = (f"the best confirmed configuration, #{config.number} of {study.study_name} ({spec.metric} {_mean_sd((mean, sd))} "
            f"over {len(config.runs)} seeds): its best seed {best.user_attrs['seed']}, trial #{best.number} of "
            f"{summary.name}")
    facts = {"study": summary.name, "confirmed": {"parent_study": study.study_name, "parent_trial": config.number,
                                                  "seed": best.user_attrs["seed"], "mean": mean, "sd": sd,
                                                  "seeds": sorted(config.runs), "verdict": summary.verdict()}}
    return confirmation, best, text, facts
