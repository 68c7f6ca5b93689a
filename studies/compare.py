"""A study file against the spec recorded on its study: which differences change results (spec_differences),
and what a command line may override (OVERRIDES, override_flag)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from mtbert.config import RUNTIME_FIELDS

if TYPE_CHECKING:
    from studies.model import StudySpec

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
