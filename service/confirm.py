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
What a confirmation's results say (tables, verdicts, which trial --export-best takes) is reports/confirmation.py;
the statistics (mean and sd over seeds, paired t of the best against the runner-up) are service.stats.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

import storage as storage_lib
from mtbert.tasks import SCORES
from storage import optuna_compat
from service.ranking import ranked_complete
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
            check_parent(plan, parent_id, name)
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


def check_parent(plan: dict[str, Any], parent_id: str | None, name: str) -> None:
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


# ------------------------------------------------------------ what a worker needs (service.worker.TrialSource)


class ConfirmationTrials:
    """The trials of a confirmation study, as a worker claims and trains them (service.worker.TrialSource):
    exactly its enqueued slots (and their retries), never a new sample; each with its parent trial's recorded
    configuration and the slot's seed; the best seed's checkpoint of each configuration kept."""

    def __init__(self, plan: dict[str, Any]):
        self.plan = plan
        self.parents = {p["trial"]: p for p in plan["parents"]}

    @classmethod
    def of(cls, study: optuna.Study) -> ConfirmationTrials | None:
        """The confirmation plan recorded on `study` (X:confirm), or None for a study without one."""
        plan = study.user_attrs.get("confirm")
        return cls(plan) if plan else None

    def claim(self, study: optuna.Study, spec: StudySpec, counts: dict[TrialState, int]) -> optuna.Trial | str:
        """An enqueued trial while one waits; "wait" while others run (one may die and be retried); else "done"."""
        if counts[TrialState.WAITING]:
            return study.ask()
        return "wait" if counts[TrialState.RUNNING] else "done"

    def values(self, trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
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

    def kept(self, ranked: list[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
        """The best seed of each configuration: what --export-best takes of the best configuration."""
        return best_seed_per_configuration(ranked)


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
