"""Study specs: one small TOML file per study, validated here and turned into Optuna objects.

A spec is data (search space, sampler, pruner, fixed training values); nothing here knows any study.
Every problem in a file is one StudySpecError whose message reads "<file>: <field>: <problem>".
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import re
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import optuna

from mtbert.config import RUNTIME_FIELDS, TrainConfig, config_fields
from mtbert.tasks import METRICS, TASK_TABLE

STUDIES_DIR = Path(__file__).resolve().parent
REPO_DIR = STUDIES_DIR.parent  # relative [train] data_dir values are resolved against it
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler}
PRUNERS = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "hyperband": optuna.pruners.HyperbandPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "none": optuna.pruners.NopPruner}
TOP_KEYS = ("description", "direction", "metric", "n_trials", "keep_best", "train", "space", "sampler", "pruner",
            "reference", "reference_source", "confirm")
CONFIRM_KEYS = {"top": 1, "seeds": 2, "seed_base": 0}  # [confirm] key: its minimum (seeds: a spread needs 2)
REFERENCE_METRICS = tuple(t.report_key for t in TASK_TABLE.values()) + ("overall",)  # a [reference] row: published scores of one grid point
PARAM_KEYS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "step", "log"),
              "categorical": ("choices",), "preset": ("presets",)}
_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


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


def _accepts(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance in the TOML sense: a bool is no int, an int is fine where a float is expected."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, tuple(t for t in types if t is not bool)) or (isinstance(value, int) and float in types)


def _types_in(annotation: Any) -> tuple[type, ...]:
    """The scalar types an annotation names ("int | None", "str | int", float, ...)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return tuple(_SCALARS[n] for n in dict.fromkeys(re.findall(r"\b(bool|int|float|str)\b", text)))


def _field_types() -> dict[str, tuple[type, ...]]:
    """Accepted types of each TrainConfig field: its default's type, else its annotation's."""
    return {f.name: (type(f.default),) if f.default not in (None, dataclasses.MISSING) else _types_in(f.type) or (str,)
            for f in dataclasses.fields(TrainConfig)}


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(STUDIES_DIR.parent))
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
        return _Loader(self.path).parse(raw, self.name), given

    def renamed(self, name: str) -> StudySpec:
        """The same study under another storage name (--study-name), validated like a file's name."""
        raw = {k: v for k, v in self.to_dict().items() if k not in ("name", "path")}
        return _Loader(self.path).parse(raw, name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the TOML layout plus name and path, for recording on the study."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "path": _display(self.path), "train": dict(self.train), "sampler": dict(self.sampler),
                "pruner": dict(self.pruner), "space": {n: p.to_dict() for n, p in self.space.items()},
                "reference": {k: dict(v) for k, v in self.reference.items()}, "confirm": dict(self.confirm)}


class _Loader:
    """Validates the parsed TOML of one file, raising at the first problem."""

    def __init__(self, path: Path) -> None:
        self.file, self.path, self.fields, self.types = _display(path), path, config_fields(), _field_types()

    def fail(self, field: str, problem: str) -> NoReturn:
        raise StudySpecError(f"{self.file}: {field}: {problem}")

    def choice(self, field: str, value: Any, valid: Any) -> Any:
        if value not in valid:
            self.fail(field, f"{'missing' if value is None else f'unknown value {value!r}'} (valid: {', '.join(valid)})")
        return value

    def integer(self, field: str, value: Any, minimum: int) -> int:
        if not _accepts(value, (int,)) or value < minimum:
            self.fail(field, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def table(self, field: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, "missing" if value is None else f"must be a table, got {value!r}")
        return dict(value)

    def train_value(self, field: str, key: str, value: Any) -> None:
        if key not in self.fields:
            self.fail(field, f"{key!r} is not a TrainConfig field")
        if key == "amp" and isinstance(value, bool):  # amp was a boolean before it had three values
            now = '"auto"' if value else '"off"'
            self.fail(field, f'amp is "auto", "bf16" or "off" now: write amp = {now} for the old {str(value).lower()}')
        if not _accepts(value, self.types[key]):
            self.fail(field, f"expected {' or '.join(t.__name__ for t in self.types[key])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(field, f"must be a finite number, got {value!r}")

    def check_config(self, field: str, values: dict[str, Any]) -> None:
        """TrainConfig's own checks (ranges, enums) on these values over the defaults."""
        try:
            TrainConfig().replace(**values).validate()
        except ValueError as exc:
            self.fail(field, str(exc))

    def parse(self, raw: dict[str, Any], name: str | None = None) -> StudySpec:
        for key in raw:
            if key not in TOP_KEYS:
                self.fail(key, f"unknown key (allowed: {', '.join(TOP_KEYS)})")
        if not isinstance(raw.get("description", ""), str):
            self.fail("description", "must be a string")
        train = self.table("train", raw.get("train", {}))
        for key, value in train.items():
            self.train_value(f"train.{key}", key, value)
        if isinstance(train.get("data_dir"), str):  # a study names its data relative to the repository, not the cwd
            train["data_dir"] = str(REPO_DIR / Path(train["data_dir"]).expanduser())
        self.check_config("train", train)
        space = {n: self.param(n, self.table(f"space.{n}", v), train)
                 for n, v in self.table("space", raw.get("space", {})).items()} or self.fail("space", "no parameters")
        owner: dict[str, str] = {}
        for p in space.values():
            for key in sorted(p.controls()):
                if key in train or key in owner:
                    where = "fixed in [train]" if key in train else f"searched by space.{owner[key]}"
                    self.fail(f"space.{p.name}", f"{key!r} is searched here and also {where}")
                owner[key] = p.name
        sampler = self.options("sampler", raw.get("sampler", {"type": "tpe"}), SAMPLERS, skip=("search_space",))
        pruner = self.options("pruner", raw.get("pruner", {"type": "none"}), PRUNERS)
        grid = None
        if sampler["type"] == "grid":
            for p in space.values():
                if p.grid_values() is None:
                    self.fail(f"space.{p.name}", f"a grid sampler needs categorical, preset or int-with-step params, "
                              f"not {p.type}{'' if p.type == 'float' else ' without step'}")
            grid = math.prod(len(p.grid_values()) for p in space.values())
        if "n_trials" not in raw and grid is None:
            self.fail("n_trials", "missing")
        n_trials = self.integer("n_trials", raw.get("n_trials", grid), 1)
        if grid is not None and n_trials > grid:
            self.fail("n_trials", f"{n_trials} exceeds the grid size ({grid})")
        if not isinstance(raw.get("reference_source", ""), str):
            self.fail("reference_source", "must be a string")
        reference = self.reference(raw.get("reference", {}), space, grid is not None)
        name = name or self.path.stem
        if not re.fullmatch(r"\w[\w.-]{0,99}(:confirm)?", name):  # X:confirm: a confirmation (service.confirm)
            self.fail("name", f"{name!r}: a study's name (its file's name or --study-name) must be letters, digits, '_', '-' or "
                              f"'.', not starting with '.' or '-': it names the study's folders and logs")
        spec = StudySpec(name, self.path, raw.get("description", ""),
                         self.choice("direction", raw.get("direction"), DIRECTIONS),
                         self.choice("metric", raw.get("metric"), METRICS), n_trials,
                         self.integer("keep_best", raw.get("keep_best", 1), 0), train, space, sampler, pruner,
                         reference, raw.get("reference_source", ""), self.confirm(raw.get("confirm", {}), space))
        for section, build in (("sampler", spec.make_sampler), ("pruner", spec.make_pruner)):
            try:
                build()
            except (TypeError, ValueError) as exc:
                self.fail(section, str(exc))
        if pruner["type"] == "hyperband":
            low, high = pruner.get("min_resource", 1), pruner.get("max_resource", spec.epochs)
            if "auto" not in (low, high) and low > high:
                self.fail("pruner.min_resource", f"{low} exceeds max_resource ({high}"
                          f"{'' if 'max_resource' in pruner else ', the epochs'}): Hyperband would never prune")
        self.rehearse(spec)
        return spec

    def rehearse(self, spec: StudySpec, trials: int = 3) -> None:
        """Run the study's sampler and pruner as workers will, on a throwaway in-memory study: a few trials
        sampled from the space, their values checked by TrainConfig, a score reported after every epoch
        with a pruning decision. A setting Optuna accepts but cannot use (Hyperband's reduction_factor = 1,
        a max_resource below min_resource, a space the sampler cannot draw from) fails here, with the
        file, instead of in every trial."""
        from mtbert.config import TrainConfig

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        section = "sampler"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study = optuna.create_study(direction=spec.direction, sampler=spec.make_sampler(seed=0),
                                            pruner=spec.make_pruner())
                for i in range(min(trials, spec.grid_size or trials)):
                    section = "sampler"
                    trial = study.ask()
                    values = spec.suggest(trial)
                    section = "space"
                    TrainConfig().replace(**values).validate()
                    section = "pruner"
                    for epoch in range(1, spec.epochs + 1):
                        trial.report(0.5 + 0.01 * ((i * 7 + epoch) % 5), epoch)
                        if trial.should_prune():
                            break
                    study.tell(trial, 0.5 + 0.01 * i)
        except Exception as exc:  # noqa: BLE001 - whatever Optuna raises, the file is the cause
            self.fail(section, f"cannot be used ({type(exc).__name__}: {exc})")
        finally:
            optuna.logging.set_verbosity(verbosity)

    def param(self, name: str, raw: dict[str, Any], train: dict[str, Any]) -> ParamSpec:
        where = f"space.{name}"
        kind = self.choice(f"{where}.type", raw.get("type"), tuple(PARAM_KEYS))
        for key in raw.keys() - {"type", *PARAM_KEYS[kind]}:
            self.fail(f"{where}.{key}", f"unknown key for a {kind} param (allowed: type, {', '.join(PARAM_KEYS[kind])})")
        if kind == "preset":
            presets = self.table(f"{where}.presets", raw.get("presets")) or self.fail(f"{where}.presets", "empty")
            if name in self.fields:
                self.fail(where, "a preset's name must not be a TrainConfig field (its value is a bundle name)")
            for bundle_name, bundle in presets.items():
                presets[bundle_name] = self.table(f"{where}.presets.{bundle_name}", bundle)
                for key, value in bundle.items():
                    self.train_value(f"{where}.presets.{bundle_name}.{key}", key, value)
                self.check_config(f"{where}.presets.{bundle_name}", {**train, **bundle})
            return ParamSpec(name, kind, presets=presets)
        if name not in self.fields:
            self.fail(where, "not a TrainConfig field (a bundle of values needs type = \"preset\")")
        if kind == "categorical":
            choices = raw.get("choices")
            if not isinstance(choices, list) or not choices:
                self.fail(f"{where}.choices", "must be a non-empty list")
            for value in choices:
                self.train_value(f"{where}.choices", name, value)
                self.check_config(where, {**train, name: value})
            if len({repr(c) for c in choices}) != len(choices):
                self.fail(f"{where}.choices", "duplicate choices")
            return ParamSpec(name, kind, choices=tuple(choices))
        number = int if kind == "int" else float
        if not _accepts(number(1), self.types[name]):
            self.fail(where, f"{name} is not a number in TrainConfig; use type = \"categorical\"")
        for key in ("low", "high", "step"):
            if key in raw and not _accepts(raw[key], (number,)):
                self.fail(f"{where}.{key}", f"must be {'an integer' if kind == 'int' else 'a number'}, got {raw[key]!r}")
            if key in raw and not math.isfinite(raw[key]):
                self.fail(f"{where}.{key}", f"must be a finite number, got {raw[key]!r}")
            if key != "step" and key not in raw:
                self.fail(f"{where}.{key}", "missing")
        low, high, step, log = raw["low"], raw["high"], raw.get("step"), raw.get("log", False)
        checks = [  # (ok, field, problem), first failure wins
            (low <= high, where, f"low ({low}) > high ({high})"),
            (isinstance(log, bool), f"{where}.log", f"must be true or false, got {log!r}"),
            (not log or low > 0, f"{where}.low", f"log scale needs low > 0, got {low}"),
            (step is None or step > 0, f"{where}.step", f"must be > 0, got {step}"),
            (step is None or not log, where, "log and step cannot be combined"),
            (step is None or step <= 0 or kind == "float" or (high - low) % step == 0, f"{where}.step",
             f"high - low ({high - low}) is not a multiple of step ({step})"),
        ]
        for ok, field, problem in checks:
            if not ok:
                self.fail(field, problem)
        for value in (low, high):
            self.check_config(where, {**train, name: number(value)})
        return ParamSpec(name, kind, number(low), number(high), log, None if step is None else number(step))

    def confirm(self, raw: Any, space: dict[str, ParamSpec]) -> dict[str, int]:
        """[confirm]: top (>= 1) and seeds (>= 2) are required, seed_base (>= 0) is optional."""
        raw = self.table("confirm", raw)
        for key in raw:
            if key not in CONFIRM_KEYS:
                self.fail(f"confirm.{key}", f"unknown key (allowed: {', '.join(CONFIRM_KEYS)})")
        if raw:
            for key in ("top", "seeds"):
                if key not in raw:
                    self.fail(f"confirm.{key}", "missing")
            searched = [p.name for p in space.values() if "seed" in p.controls()]
            if searched:
                self.fail("confirm", f"space.{searched[0]} searches the training seed, which a confirmation varies")
        return {k: self.integer(f"confirm.{k}", v, CONFIRM_KEYS[k]) for k, v in raw.items()}

    def reference(self, raw: Any, space: dict[str, ParamSpec], is_grid: bool) -> dict[str, dict[str, float]]:
        """[reference]: one row of published scores per grid point, keyed by the point's grid_key()."""
        raw = self.table("reference", raw)
        if raw and not (is_grid and len(space) == 1):
            self.fail("reference", "needs a grid sampler over one parameter (its keys are that parameter's values)")
        out: dict[str, dict[str, float]] = {}
        for key, row in raw.items():
            where = f"reference.{key}"
            (param,) = space.values()
            value = self.grid_value(where, key, param)
            if grid_key(value) in out:
                self.fail(where, f"the same grid value as another row ({grid_key(value)})")
            row = self.table(where, row)
            if not row:
                self.fail(where, f"empty (give any of: {', '.join(REFERENCE_METRICS)})")
            for metric, score in row.items():
                if metric not in REFERENCE_METRICS:
                    self.fail(f"{where}.{metric}", f"unknown metric (allowed: {', '.join(REFERENCE_METRICS)})")
                if not _accepts(score, (float,)) or not -1.0 <= score <= 1.0:
                    self.fail(f"{where}.{metric}", f"must be a number in [-1, 1], got {score!r}")
            out[grid_key(value)] = {m: float(row[m]) for m in REFERENCE_METRICS if m in row}
        return out

    def grid_value(self, where: str, key: str, param: ParamSpec) -> Any:
        """The grid value of `param` that a [reference] key names: numbers compare as numbers."""
        values = param.grid_values()
        for value in values:
            if key == grid_key(value):
                return value
        if all(_accepts(v, (float,)) for v in values):
            try:
                number = float(key)
            except ValueError:
                number = None
            for value in values:
                if number is not None and math.isclose(number, value, rel_tol=1e-9, abs_tol=0.0):
                    return value
        self.fail(where, f"not a value of space.{param.name} (grid: {', '.join(grid_key(v) for v in values)})")

    def options(self, section: str, raw: Any, classes: dict[str, type], skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """[sampler] / [pruner]: a known type plus keyword arguments its Optuna class accepts."""
        raw = self.table(section, raw)
        cls = classes[self.choice(f"{section}.type", raw.get("type"), tuple(classes))]
        params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
                  if n not in ("self", *skip) and "Callable" not in str(p.annotation)
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for key, value in raw.items():
            if key != "type" and key not in params:
                self.fail(f"{section}.{key}", f"unknown option for {cls.__name__} (allowed: {', '.join(params) or 'none'})")
            types = (_types_in(params[key].annotation) if key != "type" else (str,)) or (bool, int, float, str)
            if not _accepts(value, types):
                self.fail(f"{section}.{key}", f"expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(f"{section}.{key}", f"must be a finite number, got {value!r}")
        for key in ("reduction_factor",) if raw["type"] in ("hyperband", "successive_halving") else ():
            if key in raw and (not _accepts(raw[key], (int,)) or raw[key] < 2):
                self.fail(f"{section}.{key}", f"must be an integer >= 2 (each rung keeps 1/{key}), got {raw[key]!r}")
        for key in ("min_resource", "max_resource") if raw["type"] in ("hyperband", "successive_halving") else ():
            if key in raw and raw[key] != "auto" and (not _accepts(raw[key], (int,)) or raw[key] < 1):
                self.fail(f"{section}.{key}", f"must be an integer >= 1 or \"auto\", got {raw[key]!r}")
        return raw


# RUNTIME_FIELDS (mtbert.config, from each field's declared role): the speed settings and the data folder, which
# a worker on another machine may differ in from the study's recorded spec (the data's content is compared
# instead: service.study.check_data).
# What a command line may override (StudySpec.with_overrides): override name -> its key in a recorded spec.
# The flag of each is `override_flag(name)`; service.study builds worker argv from the same table.
OVERRIDES: dict[str, str] = {"n_trials": "n_trials", "epochs": "train.epochs", "max_examples": "train.max_examples",
                             "model": "train.model", "data_dir": "train.data_dir"}


def override_flag(name: str) -> str:
    """The command-line flag of override `name` (`max_examples` -> `--max-examples`)."""
    return f"--{name.replace('_', '-')}"


def _result_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a recorded spec (StudySpec.to_dict()) that change results, flattened to dotted keys:
    direction, metric, [train] without RUNTIME_FIELDS, every [space] param's keys, [sampler] without its
    seed (the study records its own: trial k draws with trial_seed(seed, k)), [pruner]."""
    out: dict[str, Any] = {"direction": spec.get("direction"), "metric": spec.get("metric")}
    for key, value in (spec.get("train") or {}).items():
        if key not in RUNTIME_FIELDS:
            out[f"train.{key}"] = value
    for name, param in (spec.get("space") or {}).items():
        for key, value in (param if isinstance(param, dict) else {"": param}).items():
            out[f"space.{name}.{key}".rstrip(".")] = value
    for section, skip in (("sampler", ("seed",)), ("pruner", ())):
        for key, value in (spec.get(section) or {}).items():
            if key not in skip:
                out[f"{section}.{key}"] = value
    return out


def _normal(value: Any) -> Any:
    """Compare as JSON does (tuples are lists; 3 == 3.0)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def spec_differences(recorded: dict[str, Any], spec: StudySpec, overrides: dict[str, Any] | None = None) -> list[str]:
    """Where ``spec`` (a study file plus this command's ``overrides``) differs from the spec ``recorded`` on
    the study (its user attr "spec") in anything that changes results, one "field: recorded X, file Y"
    per field (``--epochs Y`` where an override gave the value), in a stable order. The budget
    (n_trials), keep_best, the description and the [reference] may differ."""
    old, new = _result_fields(recorded), _result_fields(spec.to_dict())
    given = {OVERRIDES[k]: override_flag(k) for k in (overrides or {})}  # spec key -> the flag that set it
    lines = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, _UNSET), new.get(key, _UNSET)
        if before is not _UNSET and after is not _UNSET and _normal(before) == _normal(after):
            continue
        source = given.get(key, "file")
        lines.append(f"{key}: recorded {_show(before)}, {source} {_show(after)}")
    return lines


_UNSET = object()


def _show(value: Any) -> str:
    return "(not set)" if value is _UNSET else json.dumps(_normal(value))


def list_studies() -> list[str]:
    """Names of the studies in STUDIES_DIR."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))


def spec_from_dict(data: dict[str, Any]) -> StudySpec:
    """A spec recorded on a study (StudySpec.to_dict(), the study's user attr "spec"), validated again."""
    path = Path(data.get("path") or f"{data['name']}.toml")
    raw = {k: v for k, v in data.items() if k not in ("name", "path")}
    return _Loader(path if path.is_absolute() else STUDIES_DIR.parent / path).parse(raw, data["name"])


def load_spec(name_or_path: str | Path) -> StudySpec:
    """Load a study: a path to a .toml file, or a name looked up as STUDIES_DIR/<name>.toml."""
    text = str(name_or_path)
    by_name = not (isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text)
    path = STUDIES_DIR / f"{text}.toml" if by_name else Path(name_or_path)
    if by_name and not path.is_file():
        raise StudySpecError(f"{_display(path)}: study: unknown study {text!r} "
                             f"(available: {', '.join(list_studies()) or 'none'}; a study started with --study-name: its "
                             f"file with --study, its name with --study-name)")
    if not path.is_file():
        raise StudySpecError(f"{_display(path)}: file: not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise StudySpecError(f"{_display(path)}: syntax: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudySpecError(f"{_display(path)}: file: cannot read ({exc})") from None
    return _Loader(path).parse(raw)
