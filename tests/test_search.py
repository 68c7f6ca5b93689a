"""The search service: parallel workers against one study, budget, retries, pruning, failures, secrets."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import storage as storage_lib
from studies import load_spec
from helpers import ROOT, assert_budget_met_exactly, load, start_worker, write_study
from tiny import write_data
from service.study import open_study, study_key
from service.worker import Worker

@pytest.mark.slow
def test_three_workers_meet_the_budget_exactly(tmp_path, tiny_model, tiny_data, storage_url, env):
    study_file = write_study(tmp_path, "par", tiny_model, tiny_data, n_trials=7, epochs=3)
    procs = [start_worker(study_file, storage_url, env) for _ in range(3)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    study = load(storage_url, "par")
    assert_budget_met_exactly(study, 7, 3)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for t in complete:
        assert {"sst_acc", "quora_acc", "sts_corr", "device", "checkpoint", "epoch_seconds"} <= set(t.user_attrs)
        assert len(t.user_attrs["epoch_seconds"]) == 3
    # disk stays bounded: only the best complete trial keeps its checkpoint
    kept = sorted(p.name for p in (tmp_path / "ckpt" / study.user_attrs["study_uuid"]).iterdir())
    best = max(complete, key=lambda t: t.value)
    assert kept == [Path(best.user_attrs["checkpoint"]).name]


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_retried_and_resumes_from_its_checkpoint(tmp_path, tiny_model, env):
    data = write_data(tmp_path / "data", n_train=1200, n_dev=24, malformed=False)  # ~1 s epochs
    study_file = write_study(tmp_path, "kill", tiny_model, data, n_trials=2, epochs=5, pruner='type = "none"')
    url = f"sqlite:///{tmp_path / 'study.db'}"
    victim = start_worker(study_file, url, env)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            running = load(url, "kill").get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # the worker has not created the study yet
            continue
        if running and running[0].user_attrs.get("epochs_done", 0) >= 2:
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    helpers = [start_worker(study_file, url, env) for _ in range(2)]
    for p in helpers:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out
    study = load(url, "kill")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].number == 0
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state == TrialState.COMPLETE
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed >= 2
    assert len(retry.user_attrs["epoch_seconds"]) == 5 - resumed  # only the missing epochs were trained
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4, 5]
    assert retry.params == failed[0].params
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2


def test_a_deliberately_bad_trial_is_pruned(tmp_path, tiny_model, tiny_data):
    study_file = write_study(tmp_path, "prune", tiny_model, tiny_data, n_trials=4, epochs=3,
                             pruner='type = "median"\nn_startup_trials = 2\nn_warmup_steps = 0')
    spec = load_spec(study_file)
    study = open_study(spec, f"sqlite:///{tmp_path / 'p.db'}", {})
    for lr in (1e-2, 1e-2):
        study.enqueue_trial({"lr": lr, "hidden_dropout_prob": 0.0})
    study.enqueue_trial({"lr": 1e-4, "hidden_dropout_prob": 0.0})  # 100x lower: learns next to nothing
    Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    states = [t.state for t in study.trials]
    assert states[:2] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert states[2] == TrialState.PRUNED
    assert len(study.trials[2].intermediate_values) < 3  # stopped before its last epoch


def test_oom_and_nan_fail_their_trial_and_the_worker_goes_on(tmp_path, tiny_model, tiny_data, monkeypatch):
    import mtbert.train

    from mtbert.train import NonFiniteLossError

    real_train = mtbert.train.train
    calls = []

    def flaky_train(cfg, *args, **kwargs):
        calls.append(cfg.lr)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if len(calls) == 2:
            raise NonFiniteLossError(step=7, epoch=1)
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(mtbert.train, "train", flaky_train)
    study_file = write_study(tmp_path, "flaky", tiny_model, tiny_data, n_trials=2, epochs=1, pruner='type = "none"')
    spec = load_spec(study_file)
    study = open_study(spec, f"sqlite:///{tmp_path / 'f.db'}", {})
    ran = Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    assert ran == 4
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "OutOfMemoryError" in study.trials[0].user_attrs["fail_reason"]
    assert "NaN or infinite at step 7" in study.trials[1].user_attrs["fail_reason"]


def test_bad_study_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('direction = "maximize"\nmetric = "overall"\nn_trials = 3\n[space]\n'
                   'lr = { type = "float", low = 0.1, high = 0.01 }\n')
    for script in ("worker.py", "search.py"):
        proc = subprocess.run([sys.executable, script, "--study", str(bad)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2
        assert "bad.toml: space.lr: low (0.1) > high (0.01)" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_unreachable_storage_is_one_clear_error_without_the_password(tmp_path):
    url = "postgresql://mtbert:s3cr3t-pw@127.0.0.1:1/mtbert"
    for script, extra in (("worker.py", []), ("search.py", []), ("search.py", ["--status"])):
        proc = subprocess.run([sys.executable, script, "--study", "quickstart", "--storage", url, *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "cannot reach storage postgresql://mtbert:***@127.0.0.1:1/mtbert" in proc.stderr
        assert "s3cr3t-pw" not in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_search_runs_a_study_and_never_shows_the_password(tmp_path, tiny_model, tiny_data, clean_pg_url, env):
    study_file = write_study(tmp_path, "demo", tiny_model, tiny_data, n_trials=2, epochs=1)
    password = storage_lib.urls.parse_url(clean_pg_url).password
    assert password
    env = {**env, "MTBERT_STORAGE": clean_pg_url}
    proc = subprocess.run([sys.executable, "search.py", "--study", str(study_file), "--workers", "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "study demo: complete" in proc.stdout and "budget 2" in proc.stdout
    status = subprocess.run([sys.executable, "search.py", "--study", str(study_file), "--status", "--storage",
                             clean_pg_url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "budget 2" in status.stdout
    study = load(clean_pg_url, "demo")
    logs = "".join(p.read_text() for p in (storage_lib.STORAGE_DIR / "logs" / study_key(study)).glob("*.log"))
    assert "worker done" in logs
    for text in (proc.stdout, proc.stderr, status.stdout, status.stderr, logs):
        assert password not in text
    assert study.user_attrs["spec"]["name"] == "demo"
    assert len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 2


def test_a_trial_is_never_pruned_after_its_last_epoch(tmp_path, tiny_model, tiny_data, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)  # a pruner that always says stop
    study_file = write_study(tmp_path, "last", tiny_model, tiny_data, n_trials=2, epochs=2)
    spec = load_spec(study_file)
    study = open_study(spec, f"sqlite:///{tmp_path / 'l.db'}", {})
    Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    assert [len(t.intermediate_values) for t in study.trials] == [1, 1]  # pruned after epoch 1 of 2
    spec1, _ = spec.with_overrides(epochs=1, n_trials=3)
    study.set_user_attr("overrides 2099-01-01T00:00:00Z test", {"n_trials": 3})  # workers go by the recorded budget
    Worker(study, spec1, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    assert study.trials[2].state == TrialState.COMPLETE  # its only epoch was its last: the result is kept


def test_search_passes_the_study_file_and_no_per_worker_seed_to_its_workers(tmp_path, monkeypatch):
    import argparse

    from service import launch

    launched = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda cmd, **kw: launched.append((cmd, kw["env"])))
    args = argparse.Namespace(seed=5, n_trials=None, epochs=2, max_examples=None, model=None, data_dir=None)
    launch.start_workers("/some/where/x.toml", "sqlite:///secret.db", ["cpu", "cpu"], args, tmp_path)
    for i, (cmd, env) in enumerate(launched):
        assert cmd[cmd.index("--study") + 1] == "/some/where/x.toml"
        assert "--seed" not in cmd  # the study's recorded seed and the trial number seed every draw
        assert cmd[cmd.index("--epochs") + 1] == "2"
        assert env["MTBERT_STORAGE"] == "sqlite:///secret.db" and "sqlite:///secret.db" not in cmd


def test_missing_data_is_one_clear_error_and_no_failed_trial(tmp_path, tiny_model, env):
    study_file = write_study(tmp_path, "nodata", tiny_model, tmp_path / "no-such-folder", n_trials=2, epochs=1)
    url = f"sqlite:///{tmp_path / 'n.db'}"
    proc = start_worker(study_file, url, env)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2
    assert f"no CS224N data in {tmp_path / 'no-such-folder'} (no such folder): pass --data-dir DIR or set " \
           f"MTBERT_DATA_DIR=DIR" in out and "Traceback" not in out
    with pytest.raises(KeyError):  # no empty study left behind
        load(url, "nodata")


def test_dashboard_on_a_taken_port_is_one_clear_error(tmp_path):
    import socket

    storage_lib.open_storage(f"sqlite:///{tmp_path / 'd.db'}", heartbeat=False)  # the dashboard creates none
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "search.py", "--study", "quickstart", "--dashboard", "--port", str(port),
                               "--storage", f"sqlite:///{tmp_path / 'd.db'}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 2
    assert f"cannot serve the dashboard on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
