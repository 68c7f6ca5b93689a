"""TrainConfig's fields: each declares its role (and its names, where its values are names) once, on the field;
the lists the checkpoint, the study comparison and the static step use are derived from those declarations."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from helpers import ROOT
from mtbert import config
from mtbert.config import CHOICES, ROLES, RUNTIME_FIELDS, SPEED_FIELDS, STATIC_FIELDS, TrainConfig, fields_with_role


def test_every_field_declares_one_known_role_and_a_help():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("role") in ROLES, f"TrainConfig.{f.name} declares no known role"
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help"
    everything = {f.name for f in dataclasses.fields(TrainConfig)}
    by_role = [fields_with_role(role) for role in ROLES]
    assert sum(len(s) for s in by_role) == len(everything) and set().union(*by_role) == everything
    with pytest.raises(ValueError, match="unknown role"):
        fields_with_role("fast")


def test_the_lists_other_modules_use_are_derived_from_the_roles():
    """The four lists that once disagreed (packing was speed-only on resume but result-changing between
    workers) are one declaration: the checkpoint's, the study comparison's and the static step's."""
    from mtbert import checkpoint, static_step
    from mtbert.methods import STEP_FIELDS
    from studies import spec

    assert checkpoint.SPEED_FIELDS is SPEED_FIELDS and spec.RUNTIME_FIELDS is RUNTIME_FIELDS
    assert static_step.COVERED_FIELDS is STATIC_FIELDS
    assert RUNTIME_FIELDS == SPEED_FIELDS | {"data_dir"} and {"packing", "amp", "step"} <= SPEED_FIELDS
    assert STATIC_FIELDS.isdisjoint(fields_with_role("method")) and set(STEP_FIELDS) <= fields_with_role("method")
    assert fields_with_role("encoder") == {"model"} and fields_with_role("data") == {"data_dir"}


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_a_named_field_accepts_its_names_only_in_validate_and_on_the_command_line(name):
    choices = CHOICES[name]
    assert getattr(TrainConfig(), name) in choices
    for value in choices:
        TrainConfig(**{name: value}).validate()  # the other fields at their defaults: no conflict
    with pytest.raises(ValueError, match=f"^{name} must be one of {', '.join(repr(c) for c in choices)}, "
                                         "got 'nonsense'$"):
        TrainConfig(**{name: "nonsense"}).validate()
    parser = argparse.ArgumentParser()
    config.add_config_arguments(parser, [name])
    with pytest.raises(SystemExit):
        parser.parse_args([f"--{name.replace('_', '-')}", "nonsense"])


def test_a_study_file_that_differs_only_in_packing_joins_the_study(tmp_path, tiny_model, tiny_data):
    """packing is a speed setting (same functions, block-diagonal attention): a worker whose study file turns it
    on joins a study recorded without it, as it may resume a checkpoint (old: 'train.packing' refused it)."""
    from studies.spec import load_spec, spec_differences
    from helpers import write_study

    spec = load_spec(write_study(tmp_path, "packed", tiny_model, tiny_data))
    packed = dataclasses.replace(spec, train={**spec.train, "packing": True})
    assert spec_differences(spec.to_dict(), packed) == []
    seeded = dataclasses.replace(spec, train={**spec.train, "seed": 7})
    assert spec_differences(spec.to_dict(), seeded) == ["train.seed: recorded (not set), file 7"]  # a result setting


def test_mtbert_modules_import_each_other_without_a_circle():
    """Every import between mtbert's modules, at module top or inside a function, forms no circle (issue 22,
    item 2: config -> tasks -> methods -> config was held apart only by imports inside functions)."""
    import ast
    import graphlib

    graph: dict[str, set[str]] = {}
    for path in (ROOT / "mtbert").glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mtbert."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mtbert."))
        graph[path.stem] = deps - {path.stem}
    assert graph["tasks"] <= {"losses"}, graph["tasks"]  # the task table depends on nothing of the trainer
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the circle
