"""The report's experiments as grid studies (studies/ablation, seed_lr, seed_dropout): the shipped files define
the report's grids and numbers, and running them gives every configuration exactly once, with one training
seed, no pruning, and a stop when the grid is exhausted — also with three worker processes at once."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

import storage as storage_lib
from helpers import ROOT
from mtbert.config import TrainConfig
from studies import grid_key, load_spec
from service.study import open_study
from service.worker import Worker

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
GRIDS = ("ablation", "seed_lr", "seed_dropout")
EXTENSIONS = ("multitask", "cosine", "stack", "relu")

# The copy of the report's numbers (SST, Para, STS, Overall), independent of the study files.
REPORT = {
    "ablation": {
        "baseline": (0.293, 0.541, 0.048, 0.294), "multitask": (0.322, 0.551, 0.095, 0.323),
        "cosine": (0.331, 0.670, 0.230, 0.407), "stack": (0.382, 0.579, 0.124, 0.362),
        "stack_cosine": (0.390, 0.692, 0.345, 0.496), "relu": (0.297, 0.584, 0.102, 0.328),
        "everything": (0.531, 0.724, 0.569, 0.608)},
    "seed_lr": {
        "1e-05": (0.531, 0.724, 0.569, 0.608), "2e-05": (0.522, 0.725, 0.550, 0.599),
        "5e-05": (0.503, 0.715, 0.539, 0.586), "0.0001": (0.509, 0.709, 0.547, 0.588)},
    "seed_dropout": {
        "0.2": (0.501, 0.707, 0.542, 0.583), "0.3": (0.510, 0.714, 0.552, 0.592),
        "0.35": (0.512, 0.718, 0.559, 0.596), "0.4": (0.531, 0.724, 0.569, 0.608),
        "0.5": (0.522, 0.709, 0.554, 0.595)},
}
PRESETS = {"baseline": (), "multitask": ("multitask",), "cosine": ("cosine",), "stack": ("stack",),
           "stack_cosine": ("stack", "cosine"), "relu": ("relu",), "everything": EXTENSIONS}


def configs(name: str) -> dict[str, TrainConfig]:
    """grid key -> the full training config of that grid point."""
    spec = load_spec(name)
    (param,) = spec.space.values()
    return {grid_key(v): TrainConfig().replace(**spec.suggest(optuna.trial.FixedTrial({param.name: v})))
            for v in param.grid_values()}


# ---------------------------------------------------------------- the shipped files


@pytest.mark.parametrize("name", GRIDS)
def test_shipped_grid_runs_each_point_once_without_pruning(name: str) -> None:
    spec = load_spec(name)
    assert spec.sampler["type"] == "grid" and spec.pruner == {"type": "none"}
    assert spec.n_trials == spec.grid_size == len(REPORT[name])  # the study stops when the grid is exhausted
    assert "seed" in spec.sampler  # every worker shuffles the grid alike: trial k is grid point k everywhere
    assert spec.train["seed"] == 0 and spec.train["batch_size"] == 16 and spec.epochs == 10
    published = {k: tuple(v[m] for m in ("sst", "para", "sts", "overall")) for k, v in spec.reference.items()}
    assert published == REPORT[name]
    assert "test set" in spec.reference_source.lower()


def test_ablation_grid_is_the_report_s() -> None:
    cfgs = configs("ablation")
    assert list(cfgs) == list(PRESETS)
    for key, cfg in cfgs.items():
        assert {e for e in EXTENSIONS if getattr(cfg, e)} == set(PRESETS[key]), key
        assert (cfg.lr, cfg.hidden_dropout_prob, cfg.batch_size, cfg.seed) == (1e-5, 0.4, 16, 0)


def test_seed_lr_and_seed_dropout_grids_are_the_report_s() -> None:
    lr = configs("seed_lr")
    assert [c.lr for c in lr.values()] == [1e-5, 2e-5, 5e-5, 1e-4]
    dropout = configs("seed_dropout")
    assert [c.hidden_dropout_prob for c in dropout.values()] == [0.2, 0.3, 0.35, 0.4, 0.5]
    for cfg in lr.values():
        assert all(getattr(cfg, e) for e in EXTENSIONS) and (cfg.hidden_dropout_prob, cfg.batch_size) == (0.4, 16)
    for cfg in dropout.values():
        assert all(getattr(cfg, e) for e in EXTENSIONS) and (cfg.lr, cfg.batch_size) == (1e-5, 16)


# ---------------------------------------------------------------- running them


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "MTBERT_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "MTBERT_ARTIFACT_DIR": str(tmp_path / "art"),
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def assert_grid_ran_once(study: optuna.Study, name: str, epochs: int = 1) -> None:
    spec = load_spec(name)
    (param,) = spec.space.values()
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * spec.grid_size  # none pruned, failed or extra
    assert Counter(grid_key(t.params[param.name]) for t in trials) == Counter(list(REPORT[name]))
    assert {t.user_attrs["config"]["seed"] for t in trials} == {0}
    expected = configs(name)
    for t in trials:
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1))  # ran to its last epoch
        cfg = t.user_attrs["config"]
        want = expected[grid_key(t.params[param.name])]
        assert {k: cfg[k] for k in (*EXTENSIONS, "lr", "hidden_dropout_prob", "batch_size")} == {
            k: getattr(want, k) for k in (*EXTENSIONS, "lr", "hidden_dropout_prob", "batch_size")}


@pytest.mark.slow
def test_ablation_with_three_worker_processes_runs_each_configuration_once(tmp_path, tiny_model, tiny_data, env):
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    cmd = [sys.executable, str(ROOT / "worker.py"), "--study", "ablation", "--model", str(tiny_model),
           "--data-dir", str(tiny_data), "--epochs", "1", "--device", "cpu", "--no-progress", "--poll-seconds", "0.5"]
    # one worker overrides the sampler seed: the grid's order must not depend on it
    procs = [subprocess.Popen(cmd + extra, cwd=ROOT, env={**env, "MTBERT_STORAGE": url}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for extra in ([], [], ["--seed", "7"])]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert not any("re-evaluating a configuration" in out for out in outputs), outputs
    study = optuna.load_study(study_name="ablation", storage=storage_lib.open_storage(url, heartbeat=False))
    assert_grid_ran_once(study, "ablation")


@pytest.fixture
def one_thread():
    """One torch thread in this process, like the worker processes above: on shared cores (CI, 2 CPUs) two
    threads per process spin against each other and a tiny trial takes 30 s instead of 0.5 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["seed_lr", "seed_dropout"])
def test_lr_and_dropout_grids_run_once_and_stop(name, tmp_path, tiny_model, tiny_data, monkeypatch, one_thread):
    monkeypatch.setenv("MTBERT_ARTIFACT_DIR", str(tmp_path / "art"))
    spec, overrides = load_spec(name).with_overrides(model=str(tiny_model), data_dir=str(tiny_data), epochs=1)
    study = open_study(spec, f"sqlite:///{tmp_path / 'grid.db'}", overrides)
    worker = Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ckpt")
    assert worker.run() == spec.grid_size
    assert_grid_ran_once(study, name)
    # the grid is exhausted: another worker joining now runs nothing
    again = Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ckpt")
    assert again.run() == 0
    assert len(study.trials) == spec.grid_size
