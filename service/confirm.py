"""Confirmation: re-train a finished search's top configurations under fresh training seeds.

    python search.py --study X --confirm 3 --seeds 3      # or a [confirm] table in the study file

A single-seed dev score crowns noise as often as not (the trainer's own seed moves SST by ~0.025), so
the top K complete configurations of study X are trained again, full epochs and never pruned, with N
fresh training seeds each, as the K*N trials of a linked study "X:confirm" in the same storage. Those
trials are enqueued once (idempotent under the study's trial-slot lock: a second call enqueues only
slots not there yet, e.g. more seeds) and any worker runs them (`worker.py --study X:confirm`), with
the service's guarantees: the budget is exactly the enqueued slots, a dead worker's trial is retried
and resumes. A trial that fails with an error (NaN loss, OOM) is not re-run: its seed is missing from
the table, which says so.

Recorded in the storage:
- on X:confirm, user attr "confirm": the plan (parent study and its study_uuid, seeds, and per parent
  trial its number, search rank, value, scores, params and full TrainConfig), "confirms": X, and
  "spec": X's spec with that name, no pruner, a random sampler (every param is fixed) and the budget;
- on each confirmation trial, user attrs "parent_trial" and "seed" (and the usual "config", whose seed
  is that seed);
- on X, user attr "confirmed_by": "X:confirm".
The statistics (mean and sd over seeds, paired t of the best against the runner-up) are service.stats.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

import storage as storage_lib
from mtbert.tasks import SCORE_NAMES, SCORES
from storage import optuna_compat
from service.markdown import markdown_table, number
from service.ranking import best_trial, ranked_complete
from service.stats import PairedComparison, mean_sd, paired_t, verdict
from service.study import (FINISHED, open_study, override_argv, recorded_spec, study_option, study_uuid,
                           trial_config, trial_counts)
from studies import StudySpec, load_spec, spec_from_dict

logger = logging.getLogger(__name__)

SUFFIX = ":confirm"
DEFAULT_SEEDS = 3
# a confirmation trial's (parent trial, seed), in its system attrs: the dashboard can write user attrs, and
# what is trained must not follow them (the user attrs of the same name are for people); retries copy it
SLOT_ATTR = "mtbert_confirm_slot"
DEFAULT_SEED_BASE = 1  # seeds are the first N integers from here that no parent trial trained with


class ConfirmError(ValueError):
    """A confirmation cannot be created or opened; the message says why and what to run."""


def confirmation_name(study_name: str) -> str:
    return f"{study_name}{SUFFIX}"


def is_confirmation(study_arg: str) -> bool:
    """`--study X:confirm` (a study name or file path of X, with the suffix)."""
    return str(study_arg).endswith(SUFFIX)


@dataclass(frozen=True)
class Request:
    top: int
    seeds: int
    seed_base: int = DEFAULT_SEED_BASE


def request_from(spec: StudySpec, top: int | None, seeds: int | None) -> Request | None:
    """The confirmation asked for: --confirm K / --seeds N over the study file's [confirm]; None for none.

    `--confirm 0` turns a file's confirmation off; --seeds alone needs a [confirm] table for K.
    """
    table = spec.confirm
    top = table.get("top") if top is None else top
    if seeds is not None and top is None:
        raise ConfirmError("--seeds needs --confirm K (or a [confirm] table in the study file)")
    if seeds is not None and top == 0:
        raise ConfirmError("--seeds with --confirm 0: no confirmation runs, so the seeds would be ignored")
    if not top:
        return None
    return Request(top, seeds or table.get("seeds", DEFAULT_SEEDS), table.get("seed_base", DEFAULT_SEED_BASE))


def fresh_seeds(n: int, used: set[int], base: int = DEFAULT_SEED_BASE) -> list[int]:
    """The first `n` integers from `base` that are not in `used` (the seeds the search trained with)."""
    seeds, candidate = [], base
    while len(seeds) < n:
        if candidate not in used:
            seeds.append(candidate)
        candidate += 1
    return seeds


# ------------------------------------------------------------ creating and opening


def confirmation_spec(parent: StudySpec, n_trials: int, n_configs: int, train_from: dict[str, Any]) -> StudySpec:
    """X's spec as the confirmation's: named X:confirm, no pruner, a random sampler (every param is fixed
    by its enqueued trial), budget n_trials; [train] values as the top parent trial recorded them (a
    search run with --epochs etc. overrides), so a worker's first data load already fits; keep_best is one
    checkpoint per configuration (the worker keeps each configuration's best seed)."""
    data = parent.to_dict()
    train = {k: train_from.get(k, v) if k != "device" else v for k, v in data["train"].items()}
    data.update(name=confirmation_name(parent.name), n_trials=n_trials, keep_best=n_configs, train=train,
                sampler={"type": "random"}, pruner={"type": "none"}, reference={}, reference_source="", confirm={},
                description=f"Confirmation of {parent.name} under fresh training seeds.")
    return spec_from_dict(data)


def _parent_record(trial: FrozenTrial, rank: int, spec: StudySpec) -> dict[str, Any]:
    """What a confirmation re-trains of a parent trial: its config rebuilt from the study's spec and the
    trial's params (service.study.trial_config), never its `config` user attr, which the dashboard can write."""
    attrs = trial.user_attrs
    return {"trial": trial.number, "search_rank": rank, "value": trial.value,
            "scores": {k: attrs[k] for k in SCORES if k in attrs}, "params": dict(trial.params),
            "config": trial_config(spec, trial)}


def create(parent: optuna.Study, spec: StudySpec, url: str | None, request: Request) -> tuple[optuna.Study, StudySpec, int]:
    """Create (or extend) X:confirm: enqueue every (top-K parent, seed) slot not enqueued yet, exactly once.

    Returns the confirmation study, its spec and how many trials this call enqueued (0 on a rerun).
    Raises ConfirmError when X's search has not met its budget or has no complete trial.
    """
    if any("seed" in p.controls() for p in spec.space.values()):
        raise ConfirmError(f"study {spec.name} searches the training seed, which a confirmation varies")
    counts = trial_counts(parent)
    finished = sum(counts[s] for s in FINISHED)
    if finished < spec.n_trials or counts[TrialState.RUNNING]:
        raise ConfirmError(f"study {spec.name} has {finished} of {spec.n_trials} trials finished and "
                           f"{counts[TrialState.RUNNING]} running: its search must finish before a confirmation "
                           f"(python search.py {study_option(spec)})")
    ranked = distinct_configurations(ranked_complete(parent, spec))
    if not ranked:
        raise ConfirmError(f"study {spec.name} has no complete trial to confirm")
    if len(ranked) < request.top:  # a pruned trial's score is from fewer epochs: not comparable, not a candidate
        logger.warning("study %s has %d distinct complete configuration(s) (%d trial(s) pruned, %d failed): "
                       "confirming those, not %d%s", spec.name, len(ranked), counts[TrialState.PRUNED],
                       counts[TrialState.FAIL], request.top,
                       "; a larger budget (--n-trials) completes more" if counts[TrialState.PRUNED] else "")
    trained = recorded_spec(parent, spec)
    parents = [_parent_record(t, rank, trained) for rank, t in enumerate(ranked[: request.top], start=1)]
    used = {int(p["config"].get("seed", 0)) for p in parents}
    seeds = fresh_seeds(request.seeds, used, request.seed_base)
    name = confirmation_name(spec.name)
    parent_id = study_uuid(parent)  # tells a deleted and re-created X of the same name apart
    rdb = optuna_compat.rdb_storage(parent)
    with storage_lib.trial_slot_lock(rdb, name):
        try:
            plan = optuna.load_study(study_name=name, storage=rdb).user_attrs.get("confirm")
        except KeyError:
            plan = None
        if plan is not None:
            _check_parent(plan, parent_id, name)
            if request.top < len(plan["parents"]) or request.seeds < len(plan["seeds"]):
                logger.info("%s already plans %d configuration(s) x %d seed(s); a confirmation only grows, so "
                            "that plan stays", name, len(plan["parents"]), len(plan["seeds"]))
            known = {p["trial"] for p in plan["parents"]}
            parents = plan["parents"] + [p for p in parents if p["trial"] not in known]
            seeds = plan["seeds"] + [s for s in seeds if s not in plan["seeds"]]
        slots = [(p["trial"], s) for s in seeds for p in parents]  # seed-major: early results pair up
        cspec = confirmation_spec(spec, len(slots), len(parents), parents[0]["config"])
        study = open_study(cspec, url, {}, role="confirm")
        have = {slot(t) for t in study.get_trials(deepcopy=False)}
        params = {p["trial"]: p["params"] for p in parents}
        added = 0
        for trial, seed in slots:
            if (trial, seed) not in have:
                # enqueue_trial, with the slot where the dashboard cannot write it
                study.add_trial(optuna.trial.create_trial(
                    state=TrialState.WAITING, system_attrs={"fixed_params": params[trial],
                                                            SLOT_ATTR: {"parent_trial": trial, "seed": seed}},
                    user_attrs={"parent_trial": trial, "seed": seed}))
                added += 1
        new_plan = {"study": spec.name, "study_uuid": parent_id, "metric": spec.metric, "direction": spec.direction,
                    "seeds": seeds, "parents": parents,
                    "top": max(request.top, (plan or {}).get("top", 0))}  # asked for: 1 is not "the others pruned"
        if new_plan != plan:
            study.set_user_attr("confirm", new_plan)
            study.set_user_attr("spec", cspec.to_dict())
            study.set_user_attr("confirms", spec.name)
            parent.set_user_attr("confirmed_by", name)
            _save_study_note(study, new_plan)
    logger.info("%s: %d configuration(s) x %d seed(s) = %d trials; %d enqueued now", name, len(parents), len(seeds),
                len(slots), added)
    return study, cspec, added


def distinct_configurations(ranked: list[FrozenTrial]) -> list[FrozenTrial]:
    """The best trial of each distinct set of params (a retried or resampled configuration counts once)."""
    seen: list[dict[str, Any]] = []
    out = []
    for t in ranked:
        if t.params not in seen:
            seen.append(t.params)
            out.append(t)
    return out


def _check_parent(plan: dict[str, Any], parent_id: str | None, name: str) -> None:
    """The confirmation must belong to this very study (its UUID), not an earlier one of the same name."""
    if parent_id is None or plan.get("study_uuid") != parent_id:
        raise ConfirmError(f"{name} confirms another study named {plan.get('study')} (study uuid "
                           f"{plan.get('study_uuid')}, this one {parent_id}); delete it first: optuna delete-study "
                           f"--study-name '{name}' --storage URL")


def _save_study_note(study: optuna.Study, plan: dict[str, Any]) -> None:
    """What the dashboard shows on X:confirm's page: what it confirms and how its trials are labelled."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    parents = ", ".join(f"#{p['trial']}" for p in plan["parents"])
    save_note(study, f"**Confirmation of study `{plan['study']}`**: its top configurations (trials {parents}) "
                     f"re-trained with seeds {', '.join(map(str, plan['seeds']))}, full epochs, no pruning. "
                     f"Each trial's user attrs `parent_trial` and `seed` say which.\n")


def open_confirmation(study_arg: str, url: str | None, args: argparse.Namespace,
                      seed: int | None = None) -> tuple[StudySpec, optuna.Study]:
    """What `worker.py --study X:confirm` joins: the spec recorded on X:confirm and the study."""
    given = override_argv(args, skip=("data_dir", "study_name"))[::2]  # the flags; data: where this node has it
    if given:
        raise ConfirmError(f"{' '.join(given)}: a confirmation re-trains the recorded configurations of its "
                           f"parent trials; overrides do not apply")
    parent = load_spec(study_arg[: -len(SUFFIX)])
    if getattr(args, "study_name", None):  # the parent study's storage name (search.py --study-name)
        parent = parent.renamed(args.study_name)
    name = confirmation_name(parent.name)
    try:
        recorded = optuna.load_study(study_name=name, storage=storage_lib.open_storage(url, heartbeat=False))
    except KeyError:
        raise ConfirmError(f"no study {name!r} in {storage_lib.redact(storage_lib.resolve_url(url))} (python "
                           f"search.py {study_option(parent)} --confirm K --seeds N creates it)") from None
    if "confirm" not in recorded.user_attrs:
        raise ConfirmError(f"study {name!r} has no confirmation plan (not made by search.py --confirm)")
    spec = spec_from_dict(recorded.user_attrs["spec"])
    if getattr(args, "data_dir", None) is not None:  # the same data (checked by content) at this node's path
        spec, _ = spec.with_overrides(data_dir=args.data_dir)
    return spec, open_study(spec, url, {}, seed=seed)


# ------------------------------------------------------------ what the worker needs


class Confirmation:
    """The plan of a confirmation study, as a worker uses it: each trial's configuration and seed."""

    def __init__(self, plan: dict[str, Any]):
        self.plan = plan
        self.parents = {p["trial"]: p for p in plan["parents"]}

    @classmethod
    def of(cls, study: optuna.Study) -> Confirmation | None:
        plan = study.user_attrs.get("confirm")
        return cls(plan) if plan else None

    def trial_values(self, trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
        """TrainConfig values of a confirmation trial: its parent's recorded config with the trial's seed
        (the device stays this worker's). The params are suggested too, from the enqueued fixed values,
        so that the dashboard and the leaderboard show them; they must agree with the parent's config."""
        from mtbert.config import config_fields

        parent_number, seed = slot(optuna_compat.study_storage(trial.study).get_trial(optuna_compat.trial_id(trial)))
        parent = self.parents[parent_number]
        suggested = spec.suggest(trial)
        config = {k: v for k, v in parent["config"].items() if k in config_fields() and k != "device"}
        wrong = {k: (v, config[k]) for k, v in suggested.items() if k in config and k in trial.params and v != config[k]}
        if wrong:
            raise ConfirmError(f"trial {trial.number}: params {wrong} differ from parent trial #{parent['trial']}'s config")
        # where this worker runs: its device, and its path to the data (the same files, checked by content)
        here = {k: spec.train[k] for k in ("device", "data_dir") if k in spec.train}
        return {**suggested, **config, **here, "seed": int(seed)}


def slot(trial: FrozenTrial) -> tuple[Any, Any]:
    """(parent trial number, seed) of a confirmation trial, from its system attrs (user attrs: older studies)."""
    recorded = trial.system_attrs.get(SLOT_ATTR) or trial.user_attrs
    return recorded.get("parent_trial"), recorded.get("seed")


def best_seed_per_configuration(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Of complete confirmation trials ranked best first, the first of each parent: whose checkpoint to keep."""
    seen: set[int] = set()
    out = []
    for t in trials:
        parent = slot(t)[0]
        if parent not in seen:
            seen.add(parent)
            out.append(t)
    return out


# ------------------------------------------------------------ results


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
        states.setdefault(slot(t), set()).add(t.state)
    return sum(1 for v in states.values() if v == {TrialState.FAIL})


def summarize(study: optuna.Study) -> Summary:
    """Group the complete trials of a confirmation study by parent; rank by mean metric over seeds."""
    plan = study.user_attrs["confirm"]
    configs = {p["trial"]: ConfigResult(p) for p in plan["parents"]}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        parent, seed = slot(t)
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
    """X:confirm of study X in X's storage, or None; ConfirmError when it confirms an earlier X."""
    name = parent.user_attrs.get("confirmed_by") or confirmation_name(parent.study_name)
    try:
        study = optuna.load_study(study_name=name, storage=optuna_compat.rdb_storage(parent))
    except KeyError:
        return None
    plan = study.user_attrs.get("confirm")
    if plan is None:
        return None
    _check_parent(plan, study_uuid(parent, create=False), name)
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
    except ConfirmError as exc:
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
    text = report_markdown(parent, heading=f"confirmation ({confirmation_name(parent.study_name)}):")
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
