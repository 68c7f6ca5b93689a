"""The quick start: a fresh clone with nothing beside it runs `python search.py --study quickstart` on
the sample that ships in sample_data/, which the quickstart study names explicitly; where the data
comes from (--data-dir > the study's [train] data_dir > $MTBERT_DATA_DIR > ./data) is tested here."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from helpers import ROOT
from mtbert.config import TrainConfig, resolve_data_dir
from mtbert.data import read_task
from mtbert.tasks import TASK_TABLE, TASKS
from service.study import absolute_path
from studies import load_spec

SAMPLE = ROOT / "sample_data"
ROWS = {"train": 120, "dev": 120, "test-student": 100}  # what sample_data/README.md documents


def sample_files() -> list[Path]:
    return sorted(p for p in SAMPLE.iterdir() if p.suffix == ".csv")


def test_the_sample_has_every_file_the_loader_needs_and_no_malformed_row():
    names = {p.name for p in sample_files()}
    for task in TASKS:
        for split in ("train", "dev"):
            raw = read_task(SAMPLE / TASK_TABLE[task].file_name(split), task)
            assert (len(raw.ids), raw.skipped) == (ROWS[split], 0), (task, split)
            assert len(set(raw.ids)) == len(raw.ids)
        test = TASK_TABLE[task].file_name("test-student")
        if test in names:
            raw = read_task(SAMPLE / test, task, labelled=False)
            assert (len(raw.ids), raw.skipped) == (ROWS["test-student"], 0)
    assert sum(p.stat().st_size for p in sample_files()) < 400_000  # a sample, not the data set


def test_the_committed_sample_is_what_the_script_draws(real_data_dir, tmp_path):
    proc = subprocess.run([sys.executable, "scripts/make_sample_data.py", "--source", str(real_data_dir), "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in sample_files()]
    for path in sample_files():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_the_quickstart_study_names_the_sample_relative_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the study's relative data_dir must not follow the cwd
    monkeypatch.setenv("MTBERT_DATA_DIR", str(tmp_path / "elsewhere"))
    spec = load_spec("quickstart")
    assert spec.train["data_dir"] == str(SAMPLE)  # the study's folder wins over $MTBERT_DATA_DIR...
    cfg = TrainConfig().replace(**spec.train)
    assert resolve_data_dir(cfg.data_dir) == SAMPLE
    overridden, given = spec.with_overrides(data_dir=absolute_path("full-data"))
    assert overridden.train["data_dir"] == str(tmp_path / "full-data") == given["data_dir"]  # ...--data-dir over both
    # a study without data_dir leaves it to $MTBERT_DATA_DIR, then ./data
    assert resolve_data_dir(TrainConfig().data_dir) == tmp_path / "elsewhere"
    monkeypatch.delenv("MTBERT_DATA_DIR")
    assert resolve_data_dir(None) == Path("data")


@pytest.mark.slow
def test_a_fresh_clone_runs_the_quick_start_on_the_shipped_sample(tmp_path):
    """README's quick start, on a clone in an empty folder (no ../shared beside it), installing nothing."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("quick-start clone test skipped: needs git and a git checkout of the project")
    clone = tmp_path / "mtbert-search"
    proc = subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mtbert-search"]  # nothing beside it: no ../shared
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MTBERT_") or k in ("MTBERT_CACHE_DIR", "MTBERT_DEFAULT_MODEL")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # shared test machines
    # README's command with a small override: 2 trials of 1 epoch on 48 examples per task
    proc = subprocess.run([sys.executable, "search.py", "--study", "quickstart", "--n-trials", "2", "--epochs", "1",
                           "--max-examples", "48"], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for n in (0, 1):
        assert re.search(rf"^\d\d:\d\d:\d\d trial {n} epoch 1/1: overall 0\.\d{{4}}", proc.stdout, re.M), proc.stdout
        assert re.search(rf"^\d\d:\d\d:\d\d trial {n} complete: overall", proc.stdout, re.M), proc.stdout
    assert "study quickstart: complete 2 pruned 0 failed 0" in proc.stdout
    report = clone / "reports" / "quickstart" / "report.md"
    assert f"report written to {report}" in proc.stdout and "![Learning curves](learning_curves.png)" in \
        report.read_text()
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{clone / 'storage' / 'mtbert.db'}")
    assert {t.user_attrs["config"]["data_dir"] for t in study.trials} == {str(clone / "sample_data")}
    assert f"--data-dir {clone / 'sample_data'}" in report.read_text()  # the reproduce command runs anywhere


def test_the_reproduce_command_names_the_folder_a_trial_read_from_the_environment(tmp_path, tiny_model, tiny_data,
                                                                                  monkeypatch):
    """A study naming no data folder trains on $MTBERT_DATA_DIR: the worker records the folder, and the report's
    command names it, so it runs in a fresh shell (it used to leave --data-dir out)."""
    from reports.study_report import best_section
    from service.study import open_study
    from helpers import write_study
    from service.worker import Worker

    path = write_study(tmp_path, "envdata", tiny_model, tiny_data, n_trials=1, epochs=1, pruner='type = "none"')
    path.write_text("\n".join(line for line in path.read_text().splitlines() if not line.startswith("data_dir")))
    spec = load_spec(path)
    assert "data_dir" not in spec.train
    monkeypatch.setenv("MTBERT_DATA_DIR", str(tiny_data))
    study = open_study(spec, f"sqlite:///{tmp_path / 'e.db'}", {})
    Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    (trial,) = study.trials
    assert trial.user_attrs["config"]["data_dir"] is None and trial.user_attrs["data_dir"] == str(tiny_data)
    command = re.search(r"^python -m mtbert\.train .*$", best_section(spec, trial), re.M).group(0)
    assert f"--data-dir {tiny_data} " in command
