"""The data model of a study: StudySpec (a validated study file) and ParamSpec, and the samplers a study runs
with (GridSampler, TrialSeededSampler). A spec is data (search space, sampler, pruner, fixed training values);
nothing here knows any study. studies.loader builds specs from files and checks them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna

from mtbert.config import TrainConfig
from studies.compare import OVERRIDES

STUDIES_DIR = Path(__file__).resolve().parent
REPO_DIR = STUDIES_DIR.parent  # relative [train] data_dir values are resolved against it
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler}
PRUNERS = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "hyperband": optuna.pruners.HyperbandPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "none": optuna.pruners.NopPruner}


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler for parallel ask/tell workers.

    Optuna gives trial k grid point k of a list it shuffles by the sampler's seed, so workers with different
    seeds run some points twice and others never; here the list keeps the file's order whatever the seed
    (the seed then only picks among the points left after a failure). And Optuna's after_trial calls
    study.stop() once the grid is exhausted, which raises outside study.optimize (our workers tell trials
    themselves); here the budget (n_trials = grid size) stops the study instead.
    """

    def __init__(self, search_space: dict[str, list[Any]], seed: int | None = None) -> None:
        super().__init__(search_space, seed)
        self._all_grids = list(itertools.product(*self._search_space.values()))  # Optuna's order, unshuffled

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001 - Optuna's signature
        pass


def trial_seed(study_seed: int, number: int) -> int:
    """The seed of trial `number`'s draws: a hash of the study's seed and the trial number (0 .. 2**32 - 1)."""
    return int.from_bytes(hashlib.sha256(f"{int(study_seed)}/{int(number)}".encode()).digest()[:4], "big")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler whose draws for trial k are seeded by (study seed, k), not by the process.

    Each trial gets a fresh inner sampler (`make(trial_seed(seed, k))`: TPE, random or grid, cheap to build),
    so a second search.py, an extra worker.py or a rerun after a stop never repeats a configuration by
    reseeding, and a random-sampler study draws the same configurations however many processes take
    part. TPE's startup trials are random draws of the same kind; after them TPE still models the study's
    finished trials, which depend on timing (as they would with one process and constant_liar).
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self.seed = make, int(seed)
        self._current: tuple[int, optuna.samplers.BaseSampler] | None = None

    def for_trial(self, number: int) -> optuna.samplers.BaseSampler:
        """The inner sampler of trial `number` (one process runs one trial at a time: the last is kept)."""
        if self._current is None or self._current[0] != number:
            self._current = (number, self._make(trial_seed(self.seed, number)))
        return self._current[1]

    def infer_relative_search_space(self, study, trial):  # noqa: ANN001 - Optuna's signatures
        return self.for_trial(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # noqa: ANN001
        return self.for_trial(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # noqa: ANN001
        return self.for_trial(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:  # noqa: ANN001
        self.for_trial(trial.number).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001
        self.for_trial(trial.number).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # seeds come from the trial number: nothing per process to reseed
        pass


class StudySpecError(ValueError):
    """A problem in a study file; the message is always "<file>: <field>: <problem>"."""


def grid_key(value: Any) -> str:
    """The one spelling of a grid value used as a [reference] key and to look a trial's row up:
    a preset or categorical string as is, true/false, an int in decimal, a float as Python's repr
    (1e-05, 2e-05, 0.0001, 0.35)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _display(path: Path) -> str:
    """How messages name a study file: relative to the repository where it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter; a preset is a categorical over the names of its bundles."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None
    presets: dict[str, dict[str, Any]] | None = None

    def grid_values(self) -> list[Any] | None:
        """Every value a grid tries, or None where the param cannot be enumerated."""
        if self.type in ("categorical", "preset"):
            return list(self.choices or self.presets or ())
        if self.type == "int" and self.step is not None and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step)))
        return None

    def controls(self) -> set[str]:
        """The TrainConfig fields this param sets."""
        return {k for b in self.presets.values() for k in b} if self.presets else {self.name}

    def to_dict(self) -> dict[str, Any]:
        """The TOML table of this param."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None and v is not False}
        return {**out, "choices": list(self.choices)} if self.choices else out


@dataclass(frozen=True)
class StudySpec:
    """A validated study file; build it with load_spec()."""

    name: str
    path: Path
    description: str
    direction: str
    metric: str
    n_trials: int
    keep_best: int
    train: dict[str, Any]
    space: dict[str, ParamSpec]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    # published scores per grid point: {grid_key(value): {"sst": .., "para": .., "sts": .., "overall": ..}}
    reference: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    reference_source: str = ""  # where the reference numbers come from
    # [confirm]: re-train the top `top` configurations with `seeds` fresh training seeds (service.confirm)
    confirm: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return self.train.get("epochs", TrainConfig().epochs)

    @property
    def grid_size(self) -> int | None:
        """Number of grid points for a grid sampler; None for the other samplers."""
        if self.sampler["type"] != "grid":
            return None
        return math.prod(len(p.grid_values() or ()) for p in self.space.values())

    def grid_key(self, params: dict[str, Any]) -> str:
        """The [reference] key of a trial of this (one-parameter) grid, from its params."""
        (name,) = self.space
        return grid_key(params[name])

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        """The sampler; `seed`, when given, overrides [sampler].seed."""
        kwargs = {k: v for k, v in self.sampler.items() if k != "type"} | ({} if seed is None else {"seed": seed})
        if self.sampler["type"] == "grid":
            return GridSampler({p.name: p.grid_values() for p in self.space.values()}, **kwargs)
        return SAMPLERS[self.sampler["type"]](**kwargs)

    def trial_seeded_sampler(self, study_seed: int) -> TrialSeededSampler:
        """The sampler a study runs with: trial k's draws seeded by (study_seed, k) (TrialSeededSampler)."""
        return TrialSeededSampler(self.make_sampler, study_seed)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        """The pruner; hyperband's max_resource defaults to epochs, the halving pruners' min_resource to 1."""
        kwargs = {k: v for k, v in self.pruner.items() if k != "type"}
        if self.pruner["type"] in ("hyperband", "successive_halving"):
            kwargs.setdefault("min_resource", 1)
        if self.pruner["type"] == "hyperband":
            kwargs.setdefault("max_resource", self.epochs)
        return PRUNERS[self.pruner["type"]](**kwargs)

    def pruning_problem(self) -> str | None:
        """Why Hyperband's brackets do not fit `epochs`, or None. Each bracket b judges a trial at epochs
        min_resource * reduction_factor**(b + k) below `epochs`; Hyperband's point is that its last bracket
        judges no trial before the end (it keeps the late bloomers). When `epochs` is not min_resource times a
        power of reduction_factor, every bracket judges at a rung just before the end (10 epochs, 1, 3: epoch 9),
        where a prune saves little and throws away a nearly trained trial: only complete trials can be best."""
        if self.pruner.get("type") != "hyperband":
            return None
        low, eta = self.pruner.get("min_resource", 1), self.pruner.get("reduction_factor", 3)
        high = self.pruner.get("max_resource", self.epochs)
        if "auto" in (low, high) or not all(isinstance(v, int) for v in (low, high, eta)) or low > high:
            return None
        brackets = int(math.floor(math.log(high / low, eta) + 1e-9)) + 1  # Optuna's count (_hyperband.py)
        if low * eta ** (brackets - 1) >= self.epochs:
            return None  # the last bracket's first rung is at or past the end: it trains to the end unjudged
        every = [low * eta ** k for k in range(self.epochs) if low * eta ** k < self.epochs]  # rungs below the end
        below = low * eta ** len(every)  # the first power past the last rung; a fitting epochs is it or the rung
        fits = f"{every[-1]} or {below}" if below != self.epochs else f"{below}"
        return (f"epochs = {self.epochs} does not fit Hyperband (min_resource {low}, reduction_factor {eta}): "
                f"it judges trials at epochs {', '.join(map(str, every))}, every bracket at epoch {every[-1]} of "
                f"{self.epochs}, so no trial trains to the end unjudged and a trial stopped at epoch {every[-1]} "
                f"saves {self.epochs - every[-1]} epoch(s) but cannot be the best (only complete trials are); "
                f"epochs = {fits} (min_resource x reduction_factor^k) gives a bracket that is never pruned")

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """TrainConfig overrides for this trial: the fixed [train] values plus the sampled ones, presets expanded."""
        values = dict(self.train)
        for p in self.space.values():
            if p.type == "float":
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            elif p.type == "int":
                values[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
            elif p.type == "categorical":
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            else:
                values.update(p.presets[trial.suggest_categorical(p.name, list(p.presets))])
        return values

    def with_overrides(self, *, n_trials: int | None = None, epochs: int | None = None,
                       max_examples: int | None = None, model: str | None = None,
                       data_dir: str | None = None) -> tuple[StudySpec, dict[str, Any]]:
        """A revalidated copy with the given values (None = not given), and a dict of those applied."""
        given = {k: v for k, v in dict(n_trials=n_trials, epochs=epochs, max_examples=max_examples,
                                       model=model, data_dir=data_dir).items() if v is not None}
        raw = {k: v for k, v in self.to_dict().items() if k not in ("name", "path")}
        for key, value in given.items():
            section, _, field_name = OVERRIDES[key].rpartition(".")  # "" (top level) or "train"
            if section and any(key in p.controls() for p in self.space.values()):
                raise StudySpecError(f"{_display(self.path)}: {key}: searched in [space], cannot override it")
            (raw[section] if section else raw)[field_name] = value
        from studies.loader import parse  # the loader builds specs: imported here, where one is rebuilt

        return parse(raw, self.path, self.name), given

    def renamed(self, name: str) -> StudySpec:
        """The same study under another storage name (--study-name), validated like a file's name."""
        from studies.loader import parse

        raw = {k: v for k, v in self.to_dict().items() if k not in ("name", "path")}
        return parse(raw, self.path, name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the TOML layout plus name and path, for recording on the study."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "path": _display(self.path), "train": dict(self.train), "sampler": dict(self.sampler),
                "pruner": dict(self.pruner), "space": {n: p.to_dict() for n, p in self.space.items()},
                "reference": {k: dict(v) for k, v in self.reference.items()}, "confirm": dict(self.confirm)}

