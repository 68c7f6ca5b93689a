"""Issue 17, findings 7-12: nothing loaded runs code, the dashboard cannot change what is trained or
exported, SLURM tasks get only what a worker needs, and a study or storage that vanishes is one line."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from service.study import open_study, trial_dir
from studies import load_spec
from test_identity import handed_back_after_one_epoch
from test_search import write_study
from worker import Worker


class Payload:
    """Unpickling this creates `marker`: the proof that a load ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """A checkpoint-looking file whose unpickling would run code."""
    torch.save({"model": {}, "optimizer": {}, "scheduler": None, "rng": Payload(marker), "epoch": 1, "step": 1,
                "history": [], "identity": Payload(marker)}, path)


# ------------------------------------------------------------------ 7: no code from a checkpoint


def test_a_planted_checkpoint_runs_nothing_on_a_worker_resume(tmp_path, tiny_model, tiny_data, monkeypatch):
    study, run_worker = handed_back_after_one_epoch(tmp_path, tiny_model, tiny_data, monkeypatch)
    marker = tmp_path / "pwned"
    plant(trial_dir(study, 0, tmp_path / "ck") / "checkpoint.pt", marker)
    run_worker()
    assert not marker.exists(), "the worker's resume ran the pickle planted in the trial's checkpoint"
    retry = study.trials[1]
    assert retry.state == TrialState.COMPLETE  # trained from scratch instead
    assert "refused to load" in retry.user_attrs["restarted_from_scratch"]
    assert "weights_only=False" not in retry.user_attrs["restarted_from_scratch"]


def test_a_planted_checkpoint_runs_nothing_on_export_best(tmp_path, tiny_model, tiny_data, monkeypatch):
    from reports.export_best import ExportError, export_best

    study_file = write_study(tmp_path, "exp", tiny_model, tiny_data, n_trials=1, epochs=1, pruner='type = "none"')
    spec = load_spec(study_file)
    study = open_study(spec, f"sqlite:///{tmp_path / 'e.db'}", {})
    monkeypatch.setenv("MTBERT_CHECKPOINT_DIR", str(tmp_path / "ck"))
    Worker(study, spec, device="cpu", progress=False).run()
    marker = tmp_path / "pwned"
    plant(trial_dir(study, 0) / "checkpoint.pt", marker)
    with pytest.raises(ExportError, match="refused to load: it holds objects other than tensors"):
        export_best(study, spec, tmp_path / "best")
    assert not marker.exists(), "--export-best ran the pickle planted in the trial's checkpoint"


def test_a_planted_token_cache_file_runs_nothing_and_is_rebuilt(tmp_path, tiny_model, tiny_data, monkeypatch):
    from transformers import AutoTokenizer

    from mtbert.data import load_task

    monkeypatch.setenv("MTBERT_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    first = load_task(tiny_data, "sts", "dev", tokenizer, max_length=32)
    [cached] = (tmp_path / "cache").glob("sts-dev-*.pt")
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), cached)
    again = load_task(tiny_data, "sts", "dev", tokenizer, max_length=32)
    assert not marker.exists(), "the token cache ran the pickle planted in its folder"
    assert again.ids == first.ids and torch.equal(again.pair.ids, first.pair.ids)
    assert torch.equal(load_task(tiny_data, "sts", "dev", tokenizer, max_length=32).labels, first.labels)


# ------------------------------------------------------------------ 8: the dashboard is read-only by default

ROOT = Path(__file__).resolve().parents[1]


def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _dashboard(study_file: Path, url: str, *extra: str):
    import subprocess
    import sys

    from test_dashboard_browser import free_port, wait_for_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "search.py", "--study", str(study_file), "--dashboard", "--port", str(port),
                             "--storage", url, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for_port(port, proc)
    return proc, port


def _stop(proc) -> str:
    import subprocess

    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the dashboard did not stop on SIGTERM: {out}")
    return out


def test_the_dashboard_refuses_every_change_over_http_unless_writable(tmp_path, tiny_model, tiny_data):
    import optuna

    from test_dashboard_browser import study_id

    study_file = write_study(tmp_path, "dash", tiny_model, tiny_data, n_trials=1, epochs=1)
    url = f"sqlite:///{tmp_path / 'd.db'}"
    study = open_study(load_spec(study_file), url, {})
    trial = study.ask()
    proc, port = _dashboard(study_file, url)
    try:
        sid = study_id(port, "dash")
        assert _request(port, "GET", f"/api/studies/{sid}")[0] == 200  # reading works
        attacks = [("POST", f"/api/studies/{sid}/rename", {"study_name": "renamed"}),
                   ("DELETE", f"/api/studies/{sid}", None),
                   ("POST", f"/api/trials/{trial._trial_id}/user-attrs", {"user_attrs": {"config": {"model": "/evil"}}}),
                   ("POST", f"/api/trials/{trial._trial_id}/tell", {"state": "Fail"}),
                   ("PUT", f"/api/studies/{sid}/note", {"version": 1, "body": "defaced"}),
                   ("POST", "/api/studies", {"study_name": "new", "directions": ["maximize"]})]
        for method, path, body in attacks:
            status, text = _request(port, method, path, body)
            assert status == 403 and "read-only" in text and "--dashboard-writable" in text, (method, path, status)
    finally:
        log = _stop(proc)
    assert "read-only" in log
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    assert names == ["dash"]
    after = optuna.load_study(study_name="dash", storage=url).trials[0]
    assert after.state.name == "RUNNING" and "config" not in after.user_attrs

    proc, port = _dashboard(study_file, url, "--dashboard-writable")  # the explicit flag: writes go through
    try:
        assert _request(port, "POST", f"/api/studies/{sid}/rename", {"study_name": "renamed"})[0] in (200, 201)
    finally:
        _stop(proc)
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["renamed"]


def test_dashboard_help_says_read_only_and_how_to_allow_writes():
    import subprocess
    import sys

    text = subprocess.run([sys.executable, "search.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stdout
    assert "read-only" in text and "--dashboard-writable" in text


# ------------------------------------------------------------ 8: what is trained comes from the spec and the params


def test_tampered_user_attrs_change_nothing_a_confirmation_trains(tmp_path):
    from optuna.distributions import FloatDistribution

    from service import confirm
    from storage import optuna_compat

    path = write_study(tmp_path, "cf", "m", "d", n_trials=2, epochs=2, pruner='type = "none"')
    spec = load_spec(path)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    parent = open_study(spec, url, {})
    import optuna

    distributions = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "hidden_dropout_prob": FloatDistribution(0.0, 0.3)}
    for value, lr in ((0.7, 1e-3), (0.6, 2e-3)):
        # what the dashboard's POST /api/trials/N/user-attrs left on the trial: another model, another lr
        injected = {"model": "/home/attacker/evil-model", "lr": 0.5, "epochs": 99, "seed": 0, "hidden_dropout_prob": 0.1}
        parent.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=value, params={"lr": lr, "hidden_dropout_prob": 0.1},
            distributions=distributions, user_attrs={"config": injected}))
    study, cspec, _ = confirm.create(parent, spec, url, confirm.Request(2, 2))
    for record in study.user_attrs["confirm"]["parents"]:
        cfg = record["config"]
        assert cfg["model"] == "m" and cfg["epochs"] == 2 and cfg["lr"] == record["params"]["lr"], cfg
    assert cspec.train["model"] == "m" and cspec.epochs == 2
    # the slot (parent, seed) a worker trains comes from system attrs, not from user attrs the dashboard writes
    storage = optuna_compat.study_storage(study)
    for t in study.get_trials(states=(TrialState.WAITING,)):
        storage.set_trial_user_attr(t._trial_id, "seed", 999)
        storage.set_trial_user_attr(t._trial_id, "parent_trial", 1)
    plan = confirm.Confirmation.of(study)
    trial = study.ask()
    values = plan.trial_values(trial, cspec)
    assert values["seed"] in study.user_attrs["confirm"]["seeds"] and values["seed"] != 999
    assert values["model"] == "m" and values["lr"] == trial.params["lr"] == 1e-3  # parent #0, the first slot
