"""Study specs (studies/): shipped files load, Optuna objects build, every validation error names file and field."""
from __future__ import annotations

import copy
import itertools
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest

from helpers import ROOT
from mtbert.config import TrainConfig, config_fields
from studies import STUDIES_DIR, ParamSpec, StudySpec, StudySpecError, list_studies, load_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE: dict[str, Any] = {
    "description": "test study",
    "direction": "maximize",
    "metric": "overall",
    "n_trials": 10,
    "keep_best": 1,
    "train": {"epochs": 4},
    "space": {
        "hidden_dropout_prob": {"type": "float", "low": 0.2, "high": 0.5},
        "lr": {"type": "float", "low": 1e-5, "high": 1e-4, "log": True},
        "batch_size": {"type": "int", "low": 8, "high": 40, "step": 8},
    },
    "sampler": {"type": "tpe", "constant_liar": True, "n_startup_trials": 3},
    "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
}
PRESETS = {
    "type": "preset",
    "presets": {
        "baseline": {"stack": False, "relu": False, "cosine": False, "multitask": False},
        "everything": {"stack": True, "relu": True, "cosine": True, "multitask": True},
    },
}
GRID: dict[str, Any] = {
    **BASE,
    "space": {
        "pooling": {"type": "categorical", "choices": ["mean", "cls"]},
        "extensions": PRESETS,
        "batch_size": {"type": "int", "low": 8, "high": 24, "step": 8},
    },
    "sampler": {"type": "grid", "seed": 3},
}
del GRID["n_trials"]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)  # "0.35" is no bare key


def to_toml(data: dict[str, Any]) -> str:
    """Just enough TOML writing for these tests: top-level scalars, then one [table] per dict."""
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += [f"[{key}]"] + [f"{_key(k)} = {_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else to_toml(data))
    return path


def load(tmp_path: Path, data: dict[str, Any] | str) -> StudySpec:
    return load_spec(write(tmp_path, data))


def error(tmp_path: Path, data: dict[str, Any] | str) -> str:
    with pytest.raises(StudySpecError) as info:
        load(tmp_path, data)
    return str(info.value)


# ---------------------------------------------------------------- shipped studies


def test_shipped_studies_load_and_build() -> None:
    names = list_studies()
    assert {"lr_dropout", "quickstart"} <= set(names)
    for name in names:
        spec = load_spec(name)
        assert spec.name == name and spec.path == STUDIES_DIR / f"{name}.toml"
        assert isinstance(spec.make_sampler(), optuna.samplers.BaseSampler)
        assert isinstance(spec.make_pruner(), optuna.pruners.BasePruner)
        assert set(spec.suggest(optuna.trial.FixedTrial(_midpoints(spec)))) <= config_fields()
        TrainConfig().replace(**spec.suggest(optuna.trial.FixedTrial(_midpoints(spec)))).validate()
        json.dumps(spec.to_dict())


def test_lr_dropout_is_the_documented_example() -> None:
    spec = load_spec("lr_dropout")
    assert (spec.direction, spec.metric, spec.n_trials, spec.keep_best) == ("maximize", "overall", 40, 1)
    assert spec.train == {"epochs": 9} and spec.epochs == 9  # 9 = 3^2: Hyperband's last bracket runs to the end
    assert spec.pruning_problem() is None
    assert spec.space["lr"] == ParamSpec("lr", "float", 1e-5, 1e-4, log=True)
    assert spec.space["batch_size"] == ParamSpec("batch_size", "int", 8, 40, step=8)
    assert spec.space["hidden_dropout_prob"] == ParamSpec("hidden_dropout_prob", "float", 0.2, 0.5)
    assert spec.sampler == {"type": "tpe", "constant_liar": True, "n_startup_trials": 8}
    assert spec.pruner == {"type": "hyperband", "min_resource": 1, "reduction_factor": 3}  # docs/pruning.md
    assert isinstance(spec.make_sampler(), optuna.samplers.TPESampler)
    assert isinstance(spec.make_pruner(), optuna.pruners.HyperbandPruner)
    assert spec.grid_size is None


def test_quickstart_is_cpu_sized() -> None:
    spec = load_spec("quickstart")  # the numbers are tuned by measurement (README); these are its bounds
    assert spec.space == load_spec("lr_dropout").space
    assert 0 < spec.train["max_examples"] <= 500 and spec.epochs <= 3 and spec.n_trials <= 10
    assert spec.pruner["type"] != "none" and spec.sampler["n_startup_trials"] < spec.n_trials
    assert "CPU" in spec.description


def test_load_by_path_and_by_name_agree() -> None:
    assert load_spec(STUDIES_DIR / "lr_dropout.toml") == load_spec("lr_dropout")
    assert load_spec(str(STUDIES_DIR / "lr_dropout.toml")) == load_spec("lr_dropout")


def test_importing_studies_does_not_import_torch() -> None:
    code = "import sys, studies; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=STUDIES_DIR.parent)


# ---------------------------------------------------------------- suggest


def _midpoints(spec: StudySpec) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in spec.space.values():
        if p.type in ("float", "int"):
            values[p.name] = p.low if p.type == "int" else (p.low + p.high) / 2
        else:
            values[p.name] = (p.grid_values() or [None])[0]
    return values


def test_suggest_fixed_trial_returns_train_plus_sampled(tmp_path: Path) -> None:
    spec = load(tmp_path, BASE)
    trial = optuna.trial.FixedTrial({"hidden_dropout_prob": 0.3, "lr": 3e-5, "batch_size": 16})
    assert spec.suggest(trial) == {"epochs": 4, "hidden_dropout_prob": 0.3, "lr": 3e-5, "batch_size": 16}


def test_suggest_in_a_real_study_stays_in_bounds(tmp_path: Path) -> None:
    spec = load(tmp_path, {**BASE, "sampler": {"type": "random", "seed": 1}})
    seen: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        seen.append(spec.suggest(trial))
        return 0.0

    study = optuna.create_study(direction=spec.direction, sampler=spec.make_sampler(), pruner=spec.make_pruner())
    study.optimize(objective, n_trials=30)
    for values in seen:
        assert 0.2 <= values["hidden_dropout_prob"] <= 0.5
        assert 1e-5 <= values["lr"] <= 1e-4
        assert values["batch_size"] in (8, 16, 24, 32, 40)
        assert values["epochs"] == 4
        TrainConfig().replace(**values).validate()
    assert len({v["lr"] for v in seen}) > 1


def test_suggest_expands_presets(tmp_path: Path) -> None:
    spec = load(tmp_path, {**BASE, "space": {**BASE["space"], "extensions": PRESETS}})
    params = {"hidden_dropout_prob": 0.3, "lr": 3e-5, "batch_size": 16}
    everything = spec.suggest(optuna.trial.FixedTrial({**params, "extensions": "everything"}))
    baseline = spec.suggest(optuna.trial.FixedTrial({**params, "extensions": "baseline"}))
    assert "extensions" not in everything
    assert {k: everything[k] for k in ("stack", "relu", "cosine", "multitask")} == dict.fromkeys(
        ("stack", "relu", "cosine", "multitask"), True)
    assert baseline["stack"] is False and baseline["multitask"] is False
    TrainConfig().replace(**baseline).validate()

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: float(spec.suggest(t)["stack"]), n_trials=10)
    assert {t.params["extensions"] for t in study.trials} <= {"baseline", "everything"}


def test_suggest_categorical_and_int_log(tmp_path: Path) -> None:
    space = {"pooling": {"type": "categorical", "choices": ["mean", "cls"]},
             "eval_batch_size": {"type": "int", "low": 16, "high": 512, "log": True},
             "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05}}
    spec = load(tmp_path, {**BASE, "space": space})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = []
    study.optimize(lambda t: values.append(spec.suggest(t)) or 0.0, n_trials=20)
    for v in values:
        assert v["pooling"] in ("mean", "cls") and 16 <= v["eval_batch_size"] <= 512
        assert any(abs(v["warmup_ratio"] - x) < 1e-9 for x in (0.0, 0.05, 0.1, 0.15, 0.2))


# ---------------------------------------------------------------- grid


def test_grid_size_and_every_point_exactly_once(tmp_path: Path) -> None:
    spec = load(tmp_path, GRID)
    assert spec.grid_size == 2 * 2 * 3 and spec.n_trials == 12
    sampler = spec.make_sampler()
    assert isinstance(sampler, optuna.samplers.GridSampler)
    combos = []

    def objective(trial: optuna.Trial) -> float:
        values = spec.suggest(trial)
        combos.append((values["pooling"], trial.params["extensions"], values["stack"], values["batch_size"]))
        return 0.0

    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=spec.n_trials)
    expected = {(pool, ext, ext == "everything", bs)
                for pool in ("mean", "cls") for ext in ("baseline", "everything") for bs in (8, 16, 24)}
    assert Counter(combos) == Counter(expected)


def test_grid_seed_argument_overrides_file_seed(tmp_path: Path) -> None:
    """The seed reaches the sampler (it picks among the points left after a failure), but the grid runs in the
    file's order whatever the seed: workers started with different seeds still run every point once."""
    spec = load(tmp_path, GRID)

    def draws(seed: int | None) -> list[int]:
        return spec.make_sampler(seed)._rng.rng.randint(1 << 30, size=4).tolist()

    assert draws(None) == draws(3) != draws(4)

    def order(seed: int | None) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=spec.make_sampler(seed))
        study.optimize(lambda t: spec.suggest(t) and 0.0, n_trials=spec.n_trials)
        return [t.params for t in study.trials]

    names = sorted(spec.space)
    in_file_order = [dict(zip(names, point)) for point in
                     itertools.product(*(spec.space[n].grid_values() for n in names))]
    assert order(None) == order(3) == order(4) == in_file_order

    storage = optuna.storages.InMemoryStorage()  # two workers, two seeds, one study
    workers = [optuna.create_study(study_name="g", storage=storage, sampler=spec.make_sampler(3)),
               optuna.load_study(study_name="g", storage=storage, sampler=spec.make_sampler(4))]
    for i in range(spec.n_trials):
        trial = workers[i % 2].ask()
        spec.suggest(trial)
        workers[i % 2].tell(trial, 0.0)  # Optuna's GridSampler would raise here at the end (study.stop)
    assert sorted(str(sorted(t.params.items())) for t in workers[0].trials) == sorted(
        str(sorted(p.items())) for p in in_file_order)


def test_grid_n_trials_below_size_and_categorical_only(tmp_path: Path) -> None:
    spec = load(tmp_path, {**GRID, "n_trials": 5})
    assert spec.n_trials == 5 and spec.grid_size == 12
    msg = error(tmp_path, {**GRID, "n_trials": 13})
    assert ": n_trials: " in msg and "grid size (12)" in msg


@pytest.mark.parametrize("param, fragment", [
    ({"type": "float", "low": 0.1, "high": 0.3}, "not float"),
    ({"type": "float", "low": 0.1, "high": 0.3, "step": 0.1}, "not float"),
    ({"type": "int", "low": 8, "high": 24}, "int without step"),
    ({"type": "int", "low": 8, "high": 32, "log": True}, "int without step"),
])
def test_grid_rejects_params_it_cannot_enumerate(tmp_path: Path, param: dict, fragment: str) -> None:
    field = "warmup_ratio" if param["type"] == "float" else "batch_size"
    msg = error(tmp_path, {**GRID, "space": {**GRID["space"], field: param}})
    assert f": space.{field}: " in msg and fragment in msg


# ---------------------------------------------------------------- sampler / pruner


def test_sampler_seed_override_is_passed_through(tmp_path: Path) -> None:
    spec = load(tmp_path, {**BASE, "sampler": {"type": "tpe", "seed": 1, "n_startup_trials": 2}})

    def first(seed: int | None) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=spec.make_sampler(seed))
        study.optimize(lambda t: spec.suggest(t)["lr"], n_trials=4)
        return [t.params for t in study.trials]

    assert first(None) == first(1)
    assert first(7) == first(7) != first(1)
    assert spec.sampler["seed"] == 1  # make_sampler did not modify the spec


def test_hyperband_epochs_that_judge_every_bracket_just_before_the_end_are_named(tmp_path: Path) -> None:
    # the real-shape lr_dropout run (10 epochs, min 1, factor 3): every bracket judged at epoch 9 of 10, and
    # 5 trials were pruned there after 9 epochs (docs/cpu/lr_dropout-real-shape.md)
    ten = load(tmp_path, {**BASE, "train": {"epochs": 10}, "pruner": {"type": "hyperband", "reduction_factor": 3}})
    problem = ten.pruning_problem()
    assert problem is not None and "judges trials at epochs 1, 3, 9, every bracket at epoch 9 of 10" in problem
    assert "epochs = 9 or 27" in problem
    assert ten.with_overrides(epochs=9)[0].pruning_problem() is None
    assert load(tmp_path, {**BASE, "train": {"epochs": 4}, "pruner": {"type": "hyperband", "reduction_factor": 2}}
                ).pruning_problem() is None  # 4 = 2^2
    assert load(tmp_path, {**BASE, "train": {"epochs": 10}, "pruner": {"type": "median"}}).pruning_problem() is None
    for name in list_studies():  # every shipped study fits its pruner
        assert load_spec(name).pruning_problem() is None, name


def test_pruner_kinds_and_resource_defaults(tmp_path: Path) -> None:
    hyper = load(tmp_path, {**BASE, "pruner": {"type": "hyperband", "reduction_factor": 2}})
    pruner = hyper.make_pruner()
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource) == (1, 4)  # max_resource follows train.epochs
    assert hyper.with_overrides(epochs=7)[0].make_pruner()._max_resource == 7
    explicit = load(tmp_path, {**BASE, "pruner": {"type": "hyperband", "max_resource": 9}})
    assert explicit.make_pruner()._max_resource == 9
    halving = load(tmp_path, {**BASE, "pruner": {"type": "successive_halving"}})
    assert isinstance(halving.make_pruner(), optuna.pruners.SuccessiveHalvingPruner)
    assert halving.make_pruner()._min_resource == 1
    percentile = load(tmp_path, {**BASE, "pruner": {"type": "percentile", "percentile": 25.0}})
    assert isinstance(percentile.make_pruner(), optuna.pruners.PercentilePruner)
    assert isinstance(load(tmp_path, {**BASE, "pruner": {"type": "none"}}).make_pruner(), optuna.pruners.NopPruner)
    assert isinstance(load(tmp_path, {**BASE, "sampler": {"type": "random"}}).make_sampler(),
                      optuna.samplers.RandomSampler)


def test_defaults_when_sections_are_omitted(tmp_path: Path) -> None:
    data = {k: v for k, v in BASE.items() if k not in ("sampler", "pruner", "keep_best", "description", "train")}
    spec = load(tmp_path, data)
    assert spec.sampler == {"type": "tpe"} and spec.pruner == {"type": "none"}
    assert spec.keep_best == 1 and spec.description == "" and spec.epochs == TrainConfig().epochs


# ---------------------------------------------------------------- with_overrides / to_dict


def test_with_overrides_returns_applied_and_leaves_original(tmp_path: Path) -> None:
    spec = load(tmp_path, BASE)
    before = copy.deepcopy(spec.to_dict())
    new, applied = spec.with_overrides(n_trials=3, epochs=2, max_examples=50, model="some/model", data_dir="/d")
    assert applied == {"n_trials": 3, "epochs": 2, "max_examples": 50, "model": "some/model", "data_dir": "/d"}
    assert new.n_trials == 3 and new.epochs == 2
    assert new.train == {"epochs": 2, "max_examples": 50, "model": "some/model", "data_dir": "/d"}
    assert spec.to_dict() == before and spec.train == {"epochs": 4}
    assert new.name == spec.name and new.space == spec.space

    same, none = spec.with_overrides()
    assert none == {} and same == spec
    assert spec.with_overrides(max_examples=0)[1] == {"max_examples": 0}  # 0 is a value, not "not given"


def test_with_overrides_is_validated(tmp_path: Path) -> None:
    grid = load(tmp_path, GRID)
    with pytest.raises(StudySpecError, match=r": n_trials: 13 exceeds the grid size \(12\)"):
        grid.with_overrides(n_trials=13)
    assert grid.with_overrides(n_trials=12)[0].n_trials == 12
    spec = load(tmp_path, BASE)
    with pytest.raises(StudySpecError, match=r": n_trials: must be an integer >= 1"):
        spec.with_overrides(n_trials=0)
    with pytest.raises(StudySpecError, match=r": train: epochs must be >= 1"):
        spec.with_overrides(epochs=0)
    searched = load(tmp_path, {**BASE, "train": {}, "space": {**BASE["space"], "epochs": {
        "type": "int", "low": 1, "high": 3}}})
    with pytest.raises(StudySpecError, match=r": epochs: searched in \[space\]"):
        searched.with_overrides(epochs=2)


def test_to_dict_is_json_and_round_trips(tmp_path: Path) -> None:
    for spec in [load_spec(n) for n in list_studies()] + [load(tmp_path, GRID)]:
        data = json.loads(json.dumps(spec.to_dict()))
        assert data["name"] == spec.name and data["n_trials"] == spec.n_trials
        again = load(tmp_path, {k: v for k, v in data.items() if k not in ("name", "path")})
        assert (again.space, again.train, again.sampler, again.pruner, again.n_trials) == (
            spec.space, spec.train, spec.sampler, spec.pruner, spec.n_trials)


# ---------------------------------------------------------------- validation errors


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with one dotted key set (value None deletes it)."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


INVALID = [
    # (dotted key, value, field in the message, fragment of the problem)
    ("colour", "blue", "colour", "unknown key"),
    ("direction", "up", "direction", "valid: maximize, minimize"),
    ("direction", None, "direction", "missing"),
    ("metric", "f1", "metric", "valid: overall, overall_normalized"),
    ("n_trials", 0, "n_trials", ">= 1"),
    ("n_trials", None, "n_trials", "missing"),
    ("n_trials", True, "n_trials", "integer"),
    ("keep_best", -1, "keep_best", ">= 0"),
    ("description", 3, "description", "string"),
    ("train.colour", 1, "train.colour", "not a TrainConfig field"),
    ("train.epochs", "ten", "train.epochs", "expected int"),
    ("train.epochs", 2.5, "train.epochs", "expected int"),
    ("train.lr", True, "train.lr", "expected float"),
    ("train.stack", 1, "train.stack", "expected bool"),
    ("train.epochs", 0, "train", "epochs must be >= 1"),
    ("train.lr", 3e-5, "space.lr", "fixed in [train]"),
    ("space", {}, "space", "no parameters"),
    ("space.colour", {"type": "float", "low": 0.0, "high": 1.0}, "space.colour", "not a TrainConfig field"),
    ("space.lr.type", "complex", "space.lr.type", "valid: float, int, categorical, preset"),
    ("space.lr.type", None, "space.lr.type", "missing"),
    ("space.lr.choices", [1], "space.lr.choices", "unknown key for a float param"),
    ("space.lr.low", None, "space.lr.low", "missing"),
    ("space.lr.high", None, "space.lr.high", "missing"),
    ("space.lr.low", 0.1, "space.lr", "low (0.1) > high (0.0001)"),
    ("space.lr.low", "small", "space.lr.low", "must be a number"),
    ("space.lr.low", 0.0, "space.lr.low", "log scale needs low > 0"),
    ("space.lr.log", "yes", "space.lr.log", "true or false"),
    ("space.lr", {"type": "float", "low": 1e-5, "high": 1e-4, "log": True, "step": 1e-5}, "space.lr",
     "log and step"),
    ("space.hidden_dropout_prob.step", 0.0, "space.hidden_dropout_prob.step", "> 0"),
    ("space.hidden_dropout_prob.high", 1.0, "space.hidden_dropout_prob", "hidden_dropout_prob must be in [0, 1)"),
    ("space.batch_size.step", -8, "space.batch_size.step", "> 0"),
    ("space.batch_size.step", 7, "space.batch_size.step", "not a multiple of step"),
    ("space.batch_size.low", 8.5, "space.batch_size.low", "must be an integer"),
    ("space.batch_size.type", "float", "space.batch_size", "not a number"),
    ("space.batch_size", {"type": "int", "low": 0, "high": 8}, "space.batch_size", "batch_size must be >= 1"),
    ("space.pooling", {"type": "categorical", "choices": []}, "space.pooling.choices", "non-empty"),
    ("space.pooling", {"type": "categorical"}, "space.pooling.choices", "non-empty"),
    ("space.pooling", {"type": "categorical", "choices": ["mean", 3]}, "space.pooling.choices", "expected str"),
    ("space.pooling", {"type": "categorical", "choices": ["mean", "max"]}, "space.pooling", "pooling must be"),
    ("space.pooling", {"type": "categorical", "choices": ["mean", "mean"]}, "space.pooling.choices", "duplicate"),
    ("space.stack", {"type": "categorical", "choices": [True, 1]}, "space.stack.choices", "expected bool"),
    ("space.ext", {"type": "preset", "presets": {}}, "space.ext.presets", "empty"),
    ("space.ext", {"type": "preset"}, "space.ext.presets", "missing"),
    ("space.ext", {"type": "preset", "presets": [1]}, "space.ext.presets", "must be a table"),
    ("space.ext", {"type": "preset", "presets": {"a": 1}}, "space.ext.presets.a", "must be a table"),
    ("space.ext", {"type": "preset", "presets": {"a": {"colour": 1}}}, "space.ext.presets.a.colour",
     "not a TrainConfig field"),
    ("space.ext", {"type": "preset", "presets": {"a": {"stack": "yes"}}}, "space.ext.presets.a.stack",
     "expected bool"),
    ("space.ext", {"type": "preset", "presets": {"a": {"epochs": 2}}}, "space.ext", "fixed in [train]"),
    ("space.ext", {"type": "preset", "presets": {"a": {"lr": 1e-3}}}, "space.ext", "searched by space.lr"),
    ("space.stack", {"type": "preset", "presets": {"a": {"relu": True}}}, "space.stack",
     "must not be a TrainConfig field"),
    ("sampler.type", "cmaes", "sampler.type", "valid: tpe, random, grid"),
    ("sampler.type", None, "sampler.type", "missing"),
    ("sampler.colour", 1, "sampler.colour", "unknown option for TPESampler"),
    ("sampler.gamma", 1, "sampler.gamma", "unknown option for TPESampler"),
    ("sampler.n_startup_trials", "8", "sampler.n_startup_trials", "expected int"),
    ("sampler", {"type": "random", "constant_liar": True}, "sampler.constant_liar", "unknown option for RandomSampler"),
    ("sampler", {"type": "random", "seed": [1]}, "sampler.seed", "expected int"),
    ("pruner.type", "patient", "pruner.type", "valid: median, percentile, hyperband, successive_halving, none"),
    ("pruner.n_warmup", 1, "pruner.n_warmup", "unknown option for MedianPruner"),
    ("pruner", {"type": "none", "n_startup_trials": 1}, "pruner.n_startup_trials", "unknown option for NopPruner"),
    ("pruner", {"type": "percentile"}, "pruner", "percentile"),
    ("pruner", {"type": "percentile", "percentile": 150.0}, "pruner", "percentile"),
    ("pruner", {"type": "successive_halving", "reduction_factor": 1}, "pruner.reduction_factor", "integer >= 2"),
    # accepted by Optuna's constructors, failing every trial later (issue 8): refused with the file
    ("pruner", {"type": "hyperband", "reduction_factor": 1}, "pruner.reduction_factor", "integer >= 2"),
    ("pruner", {"type": "hyperband", "min_resource": 9}, "pruner.min_resource", "Hyperband would never prune"),
    ("space.lr", {"type": "float", "low": 1e-5, "high": float("inf")}, "space.lr.high", "finite"),
    ("space.lr", {"type": "float", "low": float("-inf"), "high": 1e-3}, "space.lr.low", "finite"),
    ("space.lr", {"type": "float", "low": float("nan"), "high": 1e-3}, "space.lr.low", "finite"),
    ("train.lr", float("inf"), "train.lr", "finite"),
    ("train.device", "tpu", "train", "unknown device 'tpu'"),
    ("train.device", "cuda:x", "train", "unknown device 'cuda:x'"),
    ("pruner", {"type": "percentile", "percentile": float("nan")}, "pruner.percentile", "finite"),
    ("pruner.n_startup_trials", -1, "pruner", "cannot be negative"),
    ("pruner", "median", "pruner", "must be a table"),
]


@pytest.mark.parametrize("key, value, field, fragment", INVALID, ids=[f"{k}={v!r}"[:60] for k, v, *_ in INVALID])
def test_invalid_files_name_file_and_field(tmp_path: Path, key: str, value: Any, field: str, fragment: str) -> None:
    path = write(tmp_path, _with(key, value), name="bad.toml")
    with pytest.raises(StudySpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {field}: "), msg
    assert fragment in msg, msg
    assert isinstance(info.value, ValueError)


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'direction = "maximize"\nmetric = \nn_trials = 3\n')
    with pytest.raises(StudySpecError, match=r": syntax: .*line 2"):
        load_spec(path)
    assert str(path) in error(tmp_path, 'direction = "maximize"\nmetric = \n')


def test_unknown_study_name_lists_available() -> None:
    with pytest.raises(StudySpecError) as info:
        load_spec("no_such_study")
    msg = str(info.value)
    assert msg.startswith("studies/no_such_study.toml: study: unknown study 'no_such_study'")
    assert "lr_dropout" in msg and "quickstart" in msg


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(StudySpecError, match=r"nope\.toml: file: not found"):
        load_spec(tmp_path / "nope.toml")


def test_shipped_example_error_format(tmp_path: Path) -> None:
    """The message layout from the brief: "<file>: space.lr: low (0.1) > high (0.01)"."""
    data = _with("space.lr", {"type": "float", "low": 0.1, "high": 0.01})
    path = write(tmp_path, data, name="x.toml")
    with pytest.raises(StudySpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: space.lr: low (0.1) > high (0.01)"


# ---------------------------------------------------------------- [reference]: published numbers per grid point

LR_GRID: dict[str, Any] = {**{k: v for k, v in BASE.items() if k != "n_trials"},
                           "space": {"lr": {"type": "categorical", "choices": [1e-5, 2e-5, 1e-4]}},
                           "sampler": {"type": "grid", "seed": 0}, "pruner": {"type": "none"}}
ROW = {"sst": 0.5, "para": 0.7, "sts": 0.55, "overall": 0.583}


def test_reference_keys_are_normalised_grid_values(tmp_path: Path) -> None:
    from studies import grid_key, spec_from_dict

    spec = load(tmp_path, {**LR_GRID, "reference_source": "report, test set",
                           "reference": {"1e-5": ROW, "2e-05": {"overall": 0.5}, "0.0001": {"sts": -0.1}}})
    assert spec.reference == {"1e-05": ROW, "2e-05": {"overall": 0.5}, "0.0001": {"sts": -0.1}}
    assert spec.reference_source == "report, test set"
    assert [grid_key(v) for v in (1e-5, 2e-5, 1e-4, 0.35, 16, True, "stack")] == [
        "1e-05", "2e-05", "0.0001", "0.35", "16", "true", "stack"]
    study = optuna.create_study(sampler=spec.make_sampler())
    study.optimize(lambda t: spec.suggest(t) and 0.0, n_trials=3)
    assert {spec.grid_key(t.params) for t in study.trials} == {"1e-05", "2e-05", "0.0001"}
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["reference"] == spec.reference and data["reference_source"] == "report, test set"
    assert spec_from_dict(data) == spec
    assert spec.with_overrides(epochs=1)[0].reference == spec.reference
    assert load(tmp_path, LR_GRID).reference == {} and load(tmp_path, LR_GRID).reference_source == ""


def test_reference_keys_of_a_preset_grid(tmp_path: Path) -> None:
    spec = load(tmp_path, {**LR_GRID, "space": {"extensions": PRESETS}, "reference": {"everything": ROW}})
    assert spec.reference == {"everything": ROW}
    assert spec.grid_key({"extensions": "everything"}) == "everything"


REFERENCE_INVALID = [
    # (changes to LR_GRID, field in the message, fragment of the problem)
    ({"reference": {"3e-5": ROW}}, "reference.3e-5", "not a value of space.lr (grid: 1e-05, 2e-05, 0.0001)"),
    ({"reference": {"fast": ROW}}, "reference.fast", "not a value of space.lr"),
    ({"reference": {"1e-5": ROW, "1e-05": ROW}}, "reference.1e-05", "same grid value as another row (1e-05)"),
    ({"reference": {"1e-5": {**ROW, "f1": 0.3}}}, "reference.1e-5.f1", "unknown metric (allowed: sst, para, sts"),
    ({"reference": {"1e-5": {"sst": 53.1}}}, "reference.1e-5.sst", "must be a number in [-1, 1], got 53.1"),
    ({"reference": {"1e-5": {"sst": "0.5"}}}, "reference.1e-5.sst", "must be a number"),
    ({"reference": {"1e-5": {"sst": True}}}, "reference.1e-5.sst", "must be a number"),
    ({"reference": {"1e-5": {}}}, "reference.1e-5", "empty"),
    ({"reference": {"1e-5": 0.5}}, "reference.1e-5", "must be a table"),
    ({"reference": [1]}, "reference", "must be a table"),
    ({"reference_source": 3}, "reference_source", "must be a string"),
    ({"sampler": {"type": "tpe"}, "n_trials": 3, "reference": {"1e-5": ROW}}, "reference",
     "needs a grid sampler over one parameter"),
    ({"space": {**LR_GRID["space"], "pooling": {"type": "categorical", "choices": ["mean", "cls"]}},
      "reference": {"1e-5": ROW}}, "reference", "needs a grid sampler over one parameter"),
]


@pytest.mark.parametrize("changes, field, fragment", REFERENCE_INVALID, ids=[f for _, f, _ in REFERENCE_INVALID])
def test_invalid_reference_names_file_and_field(tmp_path: Path, changes: dict, field: str, fragment: str) -> None:
    path = write(tmp_path, {**LR_GRID, **changes}, name="bad.toml")
    with pytest.raises(StudySpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: {field}: "), str(info.value)
    assert fragment in str(info.value)


def test_an_old_boolean_amp_is_refused_with_the_value_to_write(tmp_path):
    """amp became auto/bf16/off: a study file with the old `amp = true` gets one line saying what to write."""
    from studies import StudySpecError, load_spec

    source = (ROOT / "studies" / "quickstart.toml").read_text()
    path = tmp_path / "old.toml"
    path.write_text(source.replace("[train]\n", "[train]\namp = true\n", 1))
    with pytest.raises(StudySpecError, match='train.amp: amp is "auto", "bf16" or "off" now: write amp = "auto"'):
        load_spec(str(path))
