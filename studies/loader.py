"""Loading a study file: its structure is pydantic models (the keys of each table, their types, the [space]
params as a union on `type`); this module checks what relates one part to another, to TrainConfig or to Optuna,
then rehearses the sampler and pruner. Every problem is one StudySpecError "<file>: <field>: <problem>",
pydantic's errors worded as the loader always has (tests/test_studies.py: INVALID)."""
import dataclasses
import inspect
import math
import re
import tomllib
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Optional, Union, get_args, get_origin

import optuna
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError, create_model
from pydantic_core import PydanticCustomError

from mtbert.config import TrainConfig, config_fields
from mtbert.tasks import METRICS, TASK_TABLE
from studies.model import (PRUNERS, REPO_DIR, SAMPLERS, STUDIES_DIR, ParamSpec, StudySpec, StudySpecError, _display,
                           grid_key)

REFERENCE_METRICS = tuple(t.report_key for t in TASK_TABLE.values()) + ("overall",)  # a [reference] row: published scores of one grid point


# ---------------------------------------------------------------- the file's structure


class Table(BaseModel):
    """A TOML table: only its own keys, TOML's types (a bool is no int, an int is fine as a float), finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    wording: ClassVar[dict[str, str]] = {}  # pydantic error type -> this table's wording (over _WORDING's)


def _integer(low: int, note: str = "", auto: bool = False) -> Any:
    """An int >= low (or "auto" where `auto`), refused as "must be an integer >= low<note>, got X"."""
    note += ' or "auto"' if auto else ""

    def check(value: Any) -> Any:
        if (auto and value == "auto") or (type(value) is int and value >= low):  # type(): a bool is no integer
            return value
        raise PydanticCustomError("integer", f"must be an integer >= {low}{note}, got {{got}}", {"got": repr(value)})
    return Annotated[int, PlainValidator(check)]


def _old_amp(value: Any) -> Any:
    if isinstance(value, bool):  # amp was a boolean before it had three values
        raise PydanticCustomError("old_amp", 'amp is "auto", "bf16" or "off" now: write amp = {now} for the old {old}',
                                  {"now": '"auto"' if value else '"off"', "old": str(value).lower()})
    return value


# [train] and a preset's bundles: any TrainConfig field, of its type; TrainConfig.validate() checks the values
_TRAIN_TYPES = {**typing.get_type_hints(TrainConfig), "amp": Annotated[str, BeforeValidator(_old_amp)]}
Train = create_model("Train", __base__=Table, **{f.name: (Optional[_TRAIN_TYPES[f.name]], None)
                                                 for f in dataclasses.fields(TrainConfig)})
Train.wording = {"extra_forbidden": "{key} is not a TrainConfig field"}
_BOUNDS = {"bool_type": "must be true or false, got {got}"}  # log


class FloatParam(Table):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: Optional[float] = None
    wording = {**_BOUNDS, "extra_forbidden": "unknown key for a float param (allowed: {allowed})",
               "float_type": "must be a number, got {got}"}


class IntParam(Table):
    type: Literal["int"]
    low: int
    high: int
    step: Optional[int] = None
    log: bool = False
    wording = {**_BOUNDS, "extra_forbidden": "unknown key for a int param (allowed: {allowed})",
               "int_type": "must be an integer, got {got}"}


class CategoricalParam(Table):
    type: Literal["categorical"]
    choices: list[Any] = Field([], min_length=1, validate_default=True)  # each checked against its field below
    wording = {"extra_forbidden": "unknown key for a categorical param (allowed: {allowed})",
               "too_short": "must be a non-empty list", "list_type": "must be a non-empty list"}


class PresetParam(Table):
    type: Literal["preset"]
    presets: dict[str, Train] = Field(min_length=1)  # bundle name -> the TrainConfig values it sets
    wording = {"extra_forbidden": "unknown key for a preset param (allowed: {allowed})", "too_short": "empty"}


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam, PresetParam], Field(discriminator="type")]


def _option_type(kind: str, name: str, annotation: Any) -> Any:
    """The type of one keyword argument of an Optuna class: the scalars its annotation names (Optuna annotates
    with strings: "int | None"), except the halving pruners' rungs, which Optuna accepts at values that fail
    every trial later (issue 8)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    halving = kind in ("hyperband", "successive_halving")  # rungs at min_resource x reduction_factor^k
    if halving and name == "reduction_factor":
        return _integer(2, " (each rung keeps 1/reduction_factor)")
    if halving and name in ("min_resource", "max_resource"):
        return _integer(1, auto="str" in text)
    scalars = {"bool": bool, "int": int, "float": float, "str": str}
    return Union[tuple(scalars[n] for n in dict.fromkeys(re.findall(r"\b(bool|int|float|str)\b", text)) or scalars)]


def _options(kind: str, cls: type, skip: tuple[str, ...] = ()) -> type[Table]:
    """[sampler] or [pruner] of one type: the keyword arguments cls takes, from its signature (pydantic cannot
    know Optuna's classes; callables cannot be written in TOML). Every one optional: a missing required one is
    Optuna's to name when the object is built."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name not in ("self", *skip)
              and "Callable" not in str(p.annotation) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    model = create_model(f"{cls.__name__}Options", __base__=Table, type=(Literal[kind], ...),
                         **{p.name: (Optional[_option_type(kind, p.name, p.annotation)], None) for p in params})
    allowed = ", ".join(p.name for p in params) or "none"
    model.wording = {"extra_forbidden": f"unknown option for {cls.__name__} (allowed: {allowed})"}
    return model


def _union(*members: type[Table]) -> Any:
    return Annotated[Union[members], Field(discriminator="type")]


Row = create_model("Row", __base__=Table, **{m: (Optional[float], Field(None, ge=-1, le=1)) for m in REFERENCE_METRICS})
Row.wording = {"extra_forbidden": "unknown metric (allowed: {allowed})", **dict.fromkeys(
    ("float_type", "finite_number", "greater_than_equal", "less_than_equal"), "must be a number in [-1, 1], got {got}")}


class Confirm(Table):
    """[confirm]: re-train the top `top` configurations with `seeds` fresh training seeds (service.confirm)."""

    top: _integer(1)
    seeds: _integer(2)  # a spread needs two
    seed_base: Optional[_integer(0)] = None


class StudyFile(Table):
    """A whole study file; the order of the fields is the order of the checks."""

    description: str = ""
    direction: Literal["maximize", "minimize"]
    metric: Literal[METRICS]
    n_trials: Optional[_integer(1)] = None  # a grid's default: its size
    keep_best: _integer(0) = 1
    train: Train = Field(default_factory=Train)
    space: dict[str, Param] = {}
    sampler: _union(*(_options(k, c, skip=("search_space",)) for k, c in SAMPLERS.items()))
    pruner: _union(*(_options(k, c) for k, c in PRUNERS.items()))
    reference: dict[str, Row] = {}  # grid value -> published scores
    reference_source: str = ""  # where the reference numbers come from
    confirm: Optional[Confirm] = None
    wording = {"string_type": "must be a string"}


# ---------------------------------------------------------------- pydantic's errors, worded as the loader's

_WORDING = {  # pydantic's error type -> the problem; {got}: the value, {valid}: " (valid: a, b)" where known
    "missing": "missing{valid}", "union_tag_not_found": "missing{valid}",
    "literal_error": "unknown value {got}{valid}", "union_tag_invalid": "unknown value {got}{valid}",
    "extra_forbidden": "unknown key (allowed: {allowed})",
    "finite_number": "must be a finite number, got {got}",
    **dict.fromkeys(("dict_type", "model_type", "model_attributes_type"), "must be a table, got {got}"),
    "bool_type": "expected bool, got {got}", "int_type": "expected int, got {got}",
    "float_type": "expected float, got {got}", "string_type": "expected str, got {got}",
}


def _unwrap(node: Any) -> Any:
    """Annotated[X, ...] and Optional[X] -> X."""
    while get_origin(node) is Annotated:
        node = get_args(node)[0]
    args = [a for a in get_args(node) if a is not type(None)]
    return _unwrap(args[0]) if get_origin(node) in (Union, types.UnionType) and len(args) == 1 else node


def _tags(node: Any) -> dict[str, type[Table]]:
    """The members of a union on `type`, by tag ({} for anything else)."""
    members = get_args(node) if get_origin(node) in (Union, types.UnionType) else ()
    return {get_args(m.model_fields["type"].annotation)[0]: m for m in members
            if isinstance(m, type) and issubclass(m, BaseModel) and "type" in m.model_fields}


def _walk(root: type[Table], loc: tuple[int | str, ...]) -> tuple[str, type[Table], Any]:
    """Pydantic's loc as the file's field ("space.lr.low": a union's tag is no part of it), the table holding
    the field, and the field's annotation (None for an unknown key)."""
    path, table, node = [], root, root
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            table, node = node, node.model_fields[part].annotation if part in node.model_fields else None
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        elif part in _tags(node):
            node = _tags(node)[part]
            continue
        else:
            break  # a list index, or the member of a union of scalars ("int" of str | int): the field ends here
        path.append(str(part))
    return ".".join(path), table, _unwrap(node)


def _explain(exc: ValidationError, root: type[Table]) -> tuple[str, str]:
    """The field and problem of the first error (the loader raises at its first problem)."""
    first = exc.errors(include_url=False)[0]
    field, table, node = _walk(root, first["loc"])
    kind, got = first["type"], first["input"]
    valid = get_args(node) if get_origin(node) is Literal else tuple(_tags(node))
    if kind.startswith("union_tag"):  # pydantic names the table; the file's field is its `type`
        field, got = f"{field}.type", got.get("type")
    template = {**_WORDING, **table.wording}.get(kind, "{msg}")
    return field, template.format(
        got=repr(got), key=repr(first["loc"][-1]), msg=first["msg"],
        allowed=", ".join(table.model_fields),
        valid=f" (valid: {', '.join(valid)})" if valid else "")


# ---------------------------------------------------------------- what relates the parts


class _Loader:
    """Checks one file's parsed TOML, raising at the first problem."""

    def __init__(self, path: Path) -> None:
        self.file, self.path, self.fields = _display(path), path, config_fields()

    def fail(self, field: str, problem: str) -> NoReturn:
        raise StudySpecError(f"{self.file}: {field}: {problem}")

    def validate(self, model: type[Table], raw: Any, field: str | None = None) -> Any:
        """`raw` as `model`; a problem is named at its own field, or at `field` when given."""
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            where, problem = _explain(exc, model)
            self.fail(field or where, problem)

    def check_config(self, field: str, values: dict[str, Any]) -> None:
        """TrainConfig's own checks (ranges, enums) on these values over the defaults."""
        try:
            TrainConfig().replace(**values).validate()
        except ValueError as exc:
            self.fail(field, str(exc))

    def parse(self, raw: dict[str, Any], name: str | None = None) -> StudySpec:
        raw = {"sampler": {"type": "tpe"}, "pruner": {"type": "none"}, **raw}
        if raw.get("confirm") == {}:  # to_dict() records "no confirmation" as an empty table
            del raw["confirm"]
        file: StudyFile = self.validate(StudyFile, raw)
        # The spec keeps the file's values as written (pydantic would make an int a float where the field is
        # one): a trial's recorded identity compares them as JSON. Only the [space] bounds are converted.
        train = dict(raw.get("train", {}))
        if isinstance(train.get("data_dir"), str):  # a study names its data relative to the repository, not the cwd
            train["data_dir"] = str(REPO_DIR / Path(train["data_dir"]).expanduser())
        self.check_config("train", train)
        space = {n: self.param(n, p, raw["space"][n], train) for n, p in file.space.items()} \
            or self.fail("space", "no parameters")
        owner: dict[str, str] = {}
        for p in space.values():
            for key in sorted(p.controls()):
                if key in train or key in owner:
                    where = "fixed in [train]" if key in train else f"searched by space.{owner[key]}"
                    self.fail(f"space.{p.name}", f"{key!r} is searched here and also {where}")
                owner[key] = p.name
        sampler, pruner = dict(raw["sampler"]), dict(raw["pruner"])
        grid = None
        if sampler["type"] == "grid":
            for p in space.values():
                if p.grid_values() is None:
                    self.fail(f"space.{p.name}", f"a grid sampler needs categorical, preset or int-with-step params, "
                              f"not {p.type}{'' if p.type == 'float' else ' without step'}")
            grid = math.prod(len(p.grid_values()) for p in space.values())
        if file.n_trials is None and grid is None:
            self.fail("n_trials", "missing")
        n_trials = grid if file.n_trials is None else file.n_trials
        if grid is not None and n_trials > grid:
            self.fail("n_trials", f"{n_trials} exceeds the grid size ({grid})")
        reference = self.reference(file.reference, space, grid is not None)
        name = name or self.path.stem
        if not re.fullmatch(r"\w[\w.-]{0,99}(:confirm)?", name):  # X:confirm: a confirmation (service.confirm)
            self.fail("name", f"{name!r}: a study's name (its file's name or --study-name) must be letters, digits, '_', '-' or "
                              f"'.', not starting with '.' or '-': it names the study's folders and logs")
        searched = [p.name for p in space.values() if "seed" in p.controls()]
        if file.confirm and searched:
            self.fail("confirm", f"space.{searched[0]} searches the training seed, which a confirmation varies")
        spec = StudySpec(name, self.path, file.description, file.direction, file.metric, n_trials, file.keep_best,
                         train, space, sampler, pruner, reference, file.reference_source, dict(raw.get("confirm", {})))
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

    def param(self, name: str, param: Any, raw: dict[str, Any], train: dict[str, Any]) -> ParamSpec:
        """One [space] param, checked against its TrainConfig field (pydantic has checked its keys and types)."""
        where = f"space.{name}"
        if isinstance(param, PresetParam):
            if name in self.fields:
                self.fail(where, "a preset's name must not be a TrainConfig field (its value is a bundle name)")
            presets = {b: dict(bundle) for b, bundle in raw["presets"].items()}  # as written (see parse)
            for bundle_name, bundle in presets.items():
                self.check_config(f"{where}.presets.{bundle_name}", {**train, **bundle})
            return ParamSpec(name, param.type, presets=presets)
        if name not in self.fields:
            self.fail(where, "not a TrainConfig field (a bundle of values needs type = \"preset\")")
        if isinstance(param, CategoricalParam):
            for value in param.choices:
                self.validate(Train, {name: value}, f"{where}.choices")
                self.check_config(where, {**train, name: value})
            if len({repr(c) for c in param.choices}) != len(param.choices):
                self.fail(f"{where}.choices", "duplicate choices")
            return ParamSpec(name, param.type, choices=tuple(param.choices))
        if _TRAIN_TYPES[name] not in ((int, float) if param.type == "int" else (float,)):  # an int fits a float field
            self.fail(where, f"{name} is not a number in TrainConfig; use type = \"categorical\"")
        low, high, step, log = param.low, param.high, param.step, param.log
        checks = [  # (ok, field, problem), first failure wins
            (low <= high, where, f"low ({low}) > high ({high})"),
            (not log or low > 0, f"{where}.low", f"log scale needs low > 0, got {low}"),
            (step is None or step > 0, f"{where}.step", f"must be > 0, got {step}"),
            (step is None or not log, where, "log and step cannot be combined"),
            (step is None or step <= 0 or param.type == "float" or (high - low) % step == 0, f"{where}.step",
             f"high - low ({high - low}) is not a multiple of step ({step})"),
        ]
        for ok, field, problem in checks:
            if not ok:
                self.fail(field, problem)
        for value in (low, high):
            self.check_config(where, {**train, name: value})
        return ParamSpec(name, param.type, low, high, log, step)

    def reference(self, rows: dict[str, Any], space: dict[str, ParamSpec], is_grid: bool) -> dict[str, dict[str, float]]:
        """[reference]: one row of published scores per grid point, keyed by the point's grid_key()."""
        if rows and not (is_grid and len(space) == 1):
            self.fail("reference", "needs a grid sampler over one parameter (its keys are that parameter's values)")
        out: dict[str, dict[str, float]] = {}
        for key, row in rows.items():
            where = f"reference.{key}"
            (param,) = space.values()
            value = self.grid_value(where, key, param)
            if grid_key(value) in out:
                self.fail(where, f"the same grid value as another row ({grid_key(value)})")
            out[grid_key(value)] = row.model_dump(exclude_none=True) or self.fail(
                where, f"empty (give any of: {', '.join(REFERENCE_METRICS)})")
        return out

    def grid_value(self, where: str, key: str, param: ParamSpec) -> Any:
        """The grid value of `param` that a [reference] key names: numbers compare as numbers."""
        values = param.grid_values()
        for value in values:
            if key == grid_key(value):
                return value
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            try:
                number = float(key)
            except ValueError:
                number = None
            for value in values:
                if number is not None and math.isclose(number, value, rel_tol=1e-9, abs_tol=0.0):
                    return value
        self.fail(where, f"not a value of space.{param.name} (grid: {', '.join(grid_key(v) for v in values)})")


def parse(raw: dict[str, Any], path: Path, name: str | None = None) -> StudySpec:
    """A spec from the parsed TOML (or a recorded to_dict()) of the file at `path`; `name`: its storage name."""
    return _Loader(path).parse(raw, name)


def list_studies() -> list[str]:
    """Names of the studies in STUDIES_DIR."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))


def spec_from_dict(data: dict[str, Any]) -> StudySpec:
    """A spec recorded on a study (StudySpec.to_dict(), the study's user attr "spec"), validated again."""
    path = Path(data.get("path") or f"{data['name']}.toml")
    raw = {k: v for k, v in data.items() if k not in ("name", "path")}
    return parse(raw, path if path.is_absolute() else REPO_DIR / path, data["name"])


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
    return parse(raw, path)
