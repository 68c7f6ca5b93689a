"""What search.py shows and returns: per-epoch event lines (plain lines when not on a terminal), a
rerun of a finished study that runs nothing, a non-zero exit with the worker's error line when
workers fail, and no export into a tracked folder of the repository."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers import ROOT, without_fast_heartbeats, write_study
from service.progress import last_error_line
from service.study import open_study
from studies import load_spec
from tiny import write_data

STAMP = r"\d\d:\d\d:\d\d "  # each event line starts with the time


@pytest.fixture
def env(env) -> dict:
    """conftest's worker environment (private checkpoint and artifact folders, one thread per worker: shared
    cores) without its fast heartbeats: these searches have always run with the default ones, and they keep
    them so that they run as they did."""
    return without_fast_heartbeats(env)


def search(study_file: Path, url: str, env: dict, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "search.py", "--study", str(study_file), "--storage", url, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_search_prints_one_line_per_event_then_a_rerun_says_the_budget_is_met(tmp_path, tiny_model, tiny_data, env):
    # as in test_search's pruning test: two good trials, then one with a 100x lower lr that the median pruner stops
    study_file = write_study(tmp_path, "events", tiny_model, tiny_data, n_trials=3, epochs=3,
                             pruner='type = "median"\nn_startup_trials = 2\nn_warmup_steps = 0')
    url = f"sqlite:///{tmp_path / 'e.db'}"
    study = open_study(load_spec(study_file), url, {})
    for lr in (1e-2, 1e-2, 1e-4):
        study.enqueue_trial({"lr": lr, "hidden_dropout_prob": 0.0})
    proc = search(study_file, url, env, "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "\r" not in out and "trial/s" not in out + proc.stderr  # no progress-bar redraws off a terminal
    events = [line for line in out.splitlines() if re.match(STAMP, line)]
    for n in (0, 1):
        assert any(re.fullmatch(rf"{STAMP}trial {n} started: lr 0\.01, hidden_dropout_prob 0", e) for e in events), out
        for epoch in (1, 2, 3):
            assert any(re.fullmatch(rf"{STAMP}trial {n} epoch {epoch}/3: overall 0\.\d{{4}} \| SST acc 0\.\d{{3}} "
                                    rf"Quora acc [01]\.\d{{3}} STS r -?[01]\.\d{{3}} \| \d+ s", e) for e in events), events
        assert any(re.fullmatch(rf"{STAMP}trial {n} complete: overall 0\.\d{{4}} \((best so far|best: #0 0\.\d{{4}})\)", e)
                   for e in events), events
    assert any(re.fullmatch(rf"{STAMP}trial 2 pruned after epoch [12]/3: overall 0\.\d{{4}}", e) for e in events), events
    assert len(events) == 2 * (1 + 3 + 1) + len([e for e in events if "trial 2 " in e])  # nothing else, no repeats
    assert "study events: complete 2 pruned 1" in out and f"report written to {tmp_path / 'report' / 'report.md'}" in out

    again = search(study_file, url, env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "budget met: 3 of 3 trials finished; nothing to run" in again.stdout
    assert "worker 0 on" not in again.stderr  # no worker was started


@pytest.mark.slow
def test_search_exits_nonzero_and_prints_the_worker_s_error_when_its_workers_fail(tmp_path, tiny_model, env):
    data = write_data(tmp_path / "broken-data")
    (data / "ids-sst-train.csv").write_text("no\tcolumns\there\n")  # there (search.py checks that), unreadable
    study_file = write_study(tmp_path, "broken", tiny_model, data, n_trials=2, epochs=1)
    proc = search(study_file, f"sqlite:///{tmp_path / 'b.db'}", env, "--workers", "2", timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    error = r"broken-data/ids-sst-train\.csv: missing column"
    for i in (0, 1):
        assert re.search(rf"ERROR search: worker {i} exited with 2: .*{error}.* \(log: .*worker-{i}\.log\)",
                         proc.stderr), proc.stderr
        assert re.search(rf"^{STAMP}worker {i} exited with 2: .*{error}", proc.stdout, re.M), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_the_error_line_is_this_run_s_last_error_else_the_log_s_last_line(tmp_path):
    log = tmp_path / "worker-0.log"
    log.write_text("2026-01-01 10:00:00,000 ERROR worker: an old run's error\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("2026-01-01 11:00:00,000 INFO worker: trial 0 ...\n"
                "2026-01-01 11:00:01,000 ERROR worker: /data/x.csv: file not found\n"
                "2026-01-01 11:00:01,000 INFO worker: bye\n")
    assert last_error_line(log, start) == "worker: /data/x.csv: file not found"
    with open(log, "a") as f:
        start = f.tell()
        f.write("Traceback (most recent call last):\n  File ...\nMemoryError: out of memory\n\n")
    assert last_error_line(log, start) == "MemoryError: out of memory"
    assert last_error_line(tmp_path / "missing.log") is None


def edge_study(folder: Path) -> tuple[Path, str]:
    """A study with one complete trial recorded by hand (no checkpoint): enough for --export-best's checks."""
    study_file = write_study(folder, "edge", Path("unused"), Path("unused"), n_trials=1)
    url = f"sqlite:///{folder / 'edge.db'}"
    study = open_study(load_spec(study_file), url, {})
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=0.5, params={"lr": 1e-3, "hidden_dropout_prob": 0.1},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                       "hidden_dropout_prob": optuna.distributions.FloatDistribution(0.0, 0.3)},
        user_attrs={"overall": 0.5, "checkpoint": str(folder / "gone")}))
    return study_file, url


@pytest.mark.slow  # a subprocess (search.py, mtbert.train) or real training: ~8-25 s
def test_export_best_refuses_a_folder_of_the_repository_that_git_does_not_ignore(tmp_path, env):
    study_file, url = edge_study(tmp_path)
    target = f"best-{time.time_ns()}"  # README's old example was `best/`: 286 MB in the repository root
    proc = search(study_file, url, env, "--export-best", target, timeout=120)
    assert proc.returncode == 2
    assert f"refusing to export into {target}: it is inside the repository and not git-ignored" in proc.stderr
    assert "runs/best" in proc.stderr and not (ROOT / target).exists()
    # runs/ is git-ignored: allowed (here it then fails further on, for want of the trial's checkpoint)
    proc = search(study_file, url, env, "--export-best", "runs/never-written", timeout=120)
    assert proc.returncode == 2 and "refusing" not in proc.stderr
    assert "the checkpoint of the best trial #0 is not at" in proc.stderr
    proc = search(study_file, url, env, "--export-best", str(tmp_path / "outside"), timeout=120)
    assert "refusing" not in proc.stderr


def test_override_argv_gives_workers_the_overrides_this_command_was_given():
    import argparse

    from service.study import override_argv
    args = argparse.Namespace(n_trials=None, epochs=3, max_examples=0, model=None, data_dir="/d")
    assert override_argv(args) == ["--epochs", "3", "--max-examples", "0", "--data-dir", "/d"]  # 0 is a value
    assert override_argv(args, skip=("data_dir",)) == ["--epochs", "3", "--max-examples", "0"]
    assert override_argv(argparse.Namespace()) == []  # a namespace without them (e.g. --status)


def test_a_logged_warning_quoting_an_exception_is_not_the_worker_s_error(tmp_path):
    log = tmp_path / "w.log"
    log.write_text("2026-01-01 10:00:05,100 ERROR worker: trial 0 failed: OutOfMemoryError: CUDA out of memory\n"
                   "2026-01-01 10:00:07,100 WARNING worker: trial 1: note not recorded: OSError: disk\n"
                   "2026-01-01 10:00:08,100 INFO mtbert.train: training step: static (graphs off: RuntimeError: x)\n"
                   "2026-01-01 10:00:09,100 INFO mtbert.train: epoch 1/3: loss 0.9\n")
    assert last_error_line(log) == "worker: trial 0 failed: OutOfMemoryError: CUDA out of memory"


def test_a_missing_worker_log_is_said_to_be_missing_not_empty(tmp_path):
    from service.launch import LocalWorker
    worker = LocalWorker.__new__(LocalWorker)  # only the log fields matter here
    worker.log_path, worker.log_start = tmp_path / "gone.log", 0
    assert worker.last_error() == f"(log {tmp_path / 'gone.log'} unreadable or missing)"
    worker.log_path.write_text("")
    assert worker.last_error() == f"(nothing in its log {tmp_path / 'gone.log'})"
