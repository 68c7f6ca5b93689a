"""Faults of issue 8 (points 3, 4, 6, 8): every one is a clear line or the right result, never a traceback,
a leaked secret or a silently wrong study. Real search.py/worker.py processes where the fault is theirs."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

import storage as storage_lib
from helpers import ROOT, error_lines, load, write_study
from service.study import open_study
from studies import load_spec
from tiny import write_data


def run(script: str, *args: str, environ: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=timeout)


# ================================================================ 3. secrets


@pytest.mark.parametrize("url, shown", [
    # the reported cases: a password as a query parameter, an unencoded @ inside a password
    ("postgresql://u@host/db?password=s3cret-pw", "postgresql://u@host/db?password=***"),
    ("postgresql://u:s3cr@t-pw@host:5432/db", "postgresql://u:***@host:5432/db"),
    # every secret query key, any case, next to harmless ones
    ("postgresql://u@h/db?sslmode=require&sslpassword=s3cret-pw", "postgresql://u@h/db?sslmode=require&sslpassword=***"),
    ("postgresql://u@h/db?PassWord=s3cret-pw", "postgresql://u@h/db?PassWord=***"),
    ("postgresql://u@h/db?passwd=s3cret-pw&pwd=s3cret-pw", "postgresql://u@h/db?passwd=***&pwd=***"),
    ("postgresql://u@h/db?secret=s3cret-pw&token=s3cret-pw", "postgresql://u@h/db?secret=***&token=***"),
    ("postgresql://u@h/db?password=s3cr@t-pw", "postgresql://u@h/db?password=***"),  # @ in a query value
    # a password holding /, ?, # or both @ and ?
    ("postgresql://u:s3cr/t-pw@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:s3cr?t-pw@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:s3cr#t-pw@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:s3@cr?t-pw@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:s3cr%40t-pw@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
    # what cannot be read safely is hidden whole
    ("postgresql://u:s3cret-pw@h:bad-port/db", "postgresql://***"),
    ("postgresql://u@h/db?s3cret-pw", "postgresql://***"),
    ("s3cret-pw", "***"),
    # nothing secret: unchanged
    ("sqlite:////tmp/s3cret-pw/x.db", "sqlite:////tmp/s3cret-pw/x.db"),
    ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
])
def test_redact_hides_every_secret_form(url, shown):
    assert storage_lib.redact(url) == shown
    if shown != url:
        assert "s3cr" not in storage_lib.redact(url) and "t-pw" not in storage_lib.redact(url)


def test_the_log_filter_masks_a_query_password_and_an_unencoded_at(caplog):
    storage_lib.install_secret_filter("postgresql://u@h/db?sslpassword=qu3ry-pw")
    storage_lib.install_secret_filter("postgresql://u:at@pass-w0rd@h/db")
    with caplog.at_level(logging.INFO):
        logging.getLogger("faults").warning("dsn host=h sslpassword=qu3ry-pw password=at@pass-w0rd (at%40pass-w0rd)")
    assert "qu3ry-pw" not in caplog.text and "pass-w0rd" not in caplog.text
    assert caplog.text.count("***") == 3


def test_an_unencoded_at_in_the_password_is_the_password(monkeypatch):
    """Everything before the last @ is userinfo: the driver gets the whole password, encoded."""
    assert storage_lib.normalize_url("postgresql://u:p@ss/w?rd@h:5/db") == "postgresql://u:p%40ss%2Fw%3Frd@h:5/db"
    from sqlalchemy.engine import make_url

    parsed = make_url(storage_lib.normalize_url("postgresql://u:p@ss@h:5/db?sslmode=require"))
    assert (parsed.password, parsed.host, parsed.port, parsed.query) == ("p@ss", "h", 5, {"sslmode": "require"})


def test_a_query_password_is_hidden_from_no_study(tmp_path, clean_pg_url):
    """The reported case: `no study 'x' in postgresql://u@host/db?password=…` printed the password."""
    from sqlalchemy.engine import make_url

    u = make_url(clean_pg_url)
    storage_lib.open_storage(clean_pg_url, heartbeat=False).engine.dispose()  # the Optuna tables, no study
    url = f"postgresql://{u.username}@{u.host}:{u.port}/{u.database}?password={u.password}"
    proc = run("search.py", "--study", "quickstart", "--status", "--storage", url)
    assert proc.returncode == 2, proc.stderr
    assert f"no study 'quickstart' in postgresql://{u.username}@{u.host}:{u.port}/{u.database}?password=***" \
        in proc.stderr
    assert u.password not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["worker.py", "search.py"])
def test_an_unencoded_at_in_the_password_never_shows_its_tail(script):
    proc = run(script, "--study", "quickstart", "--storage", "postgresql://mtbert:s3cr@t-pw@127.0.0.1:1/mtbert")
    assert proc.returncode == 2, proc.stderr
    assert "cannot reach storage postgresql://mtbert:***@127.0.0.1:1/mtbert: connection refused" in proc.stderr
    assert "s3cr" not in proc.stderr and "t-pw" not in proc.stderr and "Traceback" not in proc.stderr


def test_storage_files_reach_workers_and_read_only_commands(tmp_path, monkeypatch, tiny_model, tiny_data):
    """--storage-file: a relative SQLite path in it is relative to the file (every process, whatever its
    folder, opens the same database); --status and --dashboard read it; a --storage URL wins over
    MTBERT_STORAGE_FILE in what the workers get."""
    monkeypatch.delenv("MTBERT_STORAGE", raising=False)
    monkeypatch.delenv("MTBERT_STORAGE_FILE", raising=False)
    folder = tmp_path / "conf"
    folder.mkdir()
    url_file = folder / "db.url"
    url_file.write_text("sqlite:///studies.db\n")
    url_file.chmod(0o600)
    monkeypatch.chdir(tmp_path)
    assert storage_lib.resolve_url(None, "conf/db.url") == f"sqlite:///{folder / 'studies.db'}"
    study_file = write_study(tmp_path, "filed", tiny_model, tiny_data, n_trials=1, epochs=1)
    open_study(load_spec(study_file), storage_lib.resolve_url(None, url_file), {})
    status = run("search.py", "--study", str(study_file), "--status", "--storage-file", str(url_file))
    assert status.returncode == 0 and "budget 1" in status.stdout, status.stderr
    missing = tmp_path / "other.url"
    missing.write_text(f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}\n")
    missing.chmod(0o600)
    dash = run("search.py", "--study", str(study_file), "--dashboard", "--storage-file", str(missing))
    assert dash.returncode == 2 and f"no storage at {tmp_path / 'nowhere' / 'x.db'}" in dash.stderr
    monkeypatch.setenv("MTBERT_STORAGE_FILE", str(url_file))
    assert storage_lib.worker_environment("postgresql://u:pw@h/db") == {"MTBERT_STORAGE": "postgresql://u:pw@h/db"}
    assert storage_lib.worker_environment(storage_lib.resolve_url()) == {"MTBERT_STORAGE_FILE": str(url_file)}


# ================================================================ 4. crashes


def _study_without_scores(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> tuple[Path, str]:
    """A study as Ctrl-C in the first epoch leaves it: one running trial, one handed back (failed, its
    retry waiting), no score anywhere."""
    study_file = write_study(tmp_path, "noscore", tiny_model, tiny_data, n_trials=3, epochs=2)
    url = f"sqlite:///{tmp_path / 'noscore.db'}"
    study = open_study(load_spec(study_file), url, {})
    running = study.ask()
    running.suggest_float("lr", 1e-4, 1e-2, log=True)
    running.set_user_attr("device", "cpu")
    failed = study.ask()
    failed.suggest_float("lr", 1e-4, 1e-2, log=True)
    failed.set_user_attr("fail_reason", "worker stopped by a signal; retried")
    study.enqueue_trial(failed.params)
    study.tell(failed, state=TrialState.FAIL)
    return study_file, url


def test_status_and_report_before_any_score(tmp_path, tiny_model, tiny_data):
    study_file, url = _study_without_scores(tmp_path, tiny_model, tiny_data)
    status = run("search.py", "--study", str(study_file), "--status", "--storage", url)
    assert status.returncode == 0, status.stderr
    assert "complete 0 pruned 0 failed 1 running 1 | best -" in status.stdout
    assert "RUNNING" in status.stdout and "WAITING" in status.stdout
    report = run("search.py", "--study", str(study_file), "--report", "--out", str(tmp_path / "rep"),
                 "--storage", url, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "No complete trial yet." in (tmp_path / "rep" / "report.md").read_text()
    for proc in (status, report):
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_search_stopped_in_the_first_epoch_by_two_sigterms(tmp_path, tiny_model, env):
    """Ctrl-C/SIGTERM before any score, and a second SIGTERM 0.5 s later while the workers are stopping:
    no traceback, the summary is printed, the running trial is handed back for retry."""
    data = write_data(tmp_path / "data", n_train=6000, n_dev=24, malformed=False)  # a first epoch of seconds
    study_file = write_study(tmp_path, "twice", tiny_model, data, n_trials=2, epochs=3, pruner='type = "none"')
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    proc = subprocess.Popen([sys.executable, "search.py", "--study", str(study_file), "--workers", "1"], cwd=ROOT,
                            env={**env, "MTBERT_STORAGE": url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            running = load(url, "twice").get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except (KeyError, storage_lib.StorageUnavailable):
            continue
        if running:
            break
    assert running and "epochs_done" not in running[0].user_attrs, "no trial in its first epoch"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert "Traceback" not in err and "KeyError" not in err, err
    assert proc.returncode in (0, 130), err
    assert "study twice: complete 0 pruned 0 failed 0 running 0 stopped 1 (will start again)" in out  # not "failed"
    study = load(url, "twice")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]  # handed back, retry queued


@pytest.mark.parametrize("script, args, problem", [
    ("search.py", ["--workers", "-3"], "argument --workers: must be a whole number >= 1, got '-3'"),
    ("search.py", ["--workers", "0"], "argument --workers: must be a whole number >= 1, got '0'"),
    ("search.py", ["--workers-per-gpu", "0"], "argument --workers-per-gpu: must be a whole number >= 1"),
    ("search.py", ["--seed", "-1"], "argument --seed: must be a whole number between 0 and"),
    ("search.py", ["--port", "99999"], "argument --port: must be a whole number between 1 and 65535"),
    ("worker.py", ["--max-failures", "0"], "argument --max-failures: must be a whole number >= 1, got '0'"),
    ("worker.py", ["--poll-seconds", "-1"], "argument --poll-seconds: must be a number between"),
    ("worker.py", ["--poll-seconds", "nan"], "argument --poll-seconds: must be a number between"),
    ("worker.py", ["--gpu", "-1"], "argument --gpu: must be a whole number >= 0"),
])
def test_bad_counts_are_usage_errors(tmp_path, script, args, problem):
    proc = run(script, "--study", str(tmp_path / "none.toml"), *args, "--storage", str(tmp_path / "never.db"))
    assert proc.returncode == 2 and problem in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ================================================================ 6. a changed study file


def test_a_changed_study_file_is_refused_naming_the_fields(tmp_path, tiny_model, tiny_data, env):
    from service.study import study_budget

    study_file = write_study(tmp_path, "edited", tiny_model, tiny_data, n_trials=3, epochs=3)
    url = f"sqlite:///{tmp_path / 'edited.db'}"
    open_study(load_spec(study_file), url, {})
    original = study_file.read_text()
    study_file.write_text(original.replace("epochs = 3", "epochs = 1").replace("high = 0.3", "high = 0.95")
                          .replace("n_trials = 3", "n_trials = 4"))
    proc = run("worker.py", "--study", str(study_file), "--no-progress", environ={**env, "MTBERT_STORAGE": url})
    assert proc.returncode == 2, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "differs from study 'edited'" in line
    assert "space.hidden_dropout_prob.high: recorded 0.3, file 0.95" in line
    assert "train.epochs: recorded 3, file 1" in line
    assert "n_trials" not in line  # the budget may change
    assert "Traceback" not in proc.stderr
    assert load(url, "edited").trials == []  # it joined nothing
    # an override differs the same way, and says so
    study_file.write_text(original)
    proc = run("search.py", "--study", str(study_file), "--epochs", "2", environ={**env, "MTBERT_STORAGE": url})
    assert proc.returncode == 2 and "train.epochs: recorded 3, --epochs 2" in proc.stderr, proc.stderr
    # --status of the edited file shows the study as recorded, and says why
    study_file.write_text(original.replace("epochs = 3", "epochs = 1"))
    status = run("search.py", "--study", str(study_file), "--status", environ={**env, "MTBERT_STORAGE": url})
    assert status.returncode == 0 and "train.epochs: recorded 3, file 1" in status.stderr, status.stderr
    # raising the budget stays allowed and is recorded
    study_file.write_text(original.replace("n_trials = 3", "n_trials = 5"))
    study = open_study(load_spec(study_file), url, {})
    assert study_budget(study) == 5  # recorded on the study, not read from the file


def test_spec_differences_cover_what_changes_results_only(tmp_path, tiny_model, tiny_data):
    from service.study import StudyMismatch
    from studies.spec import spec_differences

    spec = load_spec(write_study(tmp_path, "base", tiny_model, tiny_data))
    recorded = spec.to_dict()
    same = load_spec(write_study(tmp_path, "base", tiny_model, tiny_data, n_trials=9))  # only the budget
    text = (tmp_path / "base.toml").read_text()
    (tmp_path / "base.toml").write_text(text.replace('device = "cpu"', 'device = "auto"')
                                        .replace('type = "tpe"', 'type = "tpe"\nseed = 3')
                                        .replace('description = "test study"', 'description = "new words"'))
    runtime = load_spec(tmp_path / "base.toml")
    assert spec_differences(recorded, same) == [] and spec_differences(recorded, runtime) == []
    (tmp_path / "base.toml").write_text(text.replace('direction = "maximize"', 'direction = "minimize"')
                                        .replace('metric = "overall"', 'metric = "sst_acc"')
                                        .replace("n_startup_trials = 1", "n_startup_trials = 4")
                                        .replace("batch_size = 8", "batch_size = 16"))
    assert spec_differences(recorded, load_spec(tmp_path / "base.toml")) == [
        'direction: recorded "maximize", file "minimize"', 'metric: recorded "overall", file "sst_acc"',
        "pruner.n_startup_trials: recorded 1, file 4", "train.batch_size: recorded 8, file 16"]
    open_study(spec, f"sqlite:///{tmp_path / 'b.db'}", {})
    with pytest.raises(StudyMismatch, match="train.batch_size: recorded 8, file 16"):
        open_study(load_spec(tmp_path / "base.toml"), f"sqlite:///{tmp_path / 'b.db'}", {})


# ================================================================ 8. bad data, late validation


def test_a_non_utf8_byte_and_a_10_mb_field_are_skipped_and_counted(tmp_path, caplog):
    from mtbert.data import read_task

    data = write_data(tmp_path / "data", malformed=False)
    path = data / "ids-sst-train.csv"
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3][:-2] + b"\xff\xfe" + lines[3][-2:]  # inside the sentence
    lines[5] = b"5\tbig\t" + b"x" * 10_000_000 + b"\t3"
    path.write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING):
        raw = read_task(path, "sst")
    assert raw.skipped == 2 and len(raw.ids) == 48 - 2
    assert "skipped 2 malformed row(s) (first at line 4)" in caplog.text


def test_an_unreadable_data_file_is_one_clear_error(tmp_path):
    from mtbert.data import DataError, read_task

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    data = write_data(tmp_path / "data", malformed=False)
    (data / "ids-sst-train.csv").chmod(0)
    with pytest.raises(DataError, match="cannot read"):
        read_task(data / "ids-sst-train.csv", "sst")


@pytest.mark.slow  # a subprocess (search.py, mtbert.train) or real training: ~8-25 s
def test_a_cuda_device_without_cuda_is_refused_before_any_trial(tmp_path, tiny_model, tiny_data, env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    study_file = write_study(tmp_path, "nocuda", tiny_model, tiny_data, n_trials=2, epochs=1)
    url = f"sqlite:///{tmp_path / 'nocuda.db'}"
    for extra in (["--device", "cuda"], ["--gpu", "1"]):
        proc = run("worker.py", "--study", str(study_file), "--no-progress", *extra,
                   environ={**env, "MTBERT_STORAGE": url})
        assert proc.returncode == 2, proc.stderr
        assert "CUDA is not available on this machine" in proc.stderr and "Traceback" not in proc.stderr
    bad = run("worker.py", "--study", str(study_file), "--device", "tpu", environ={**env, "MTBERT_STORAGE": url})
    assert bad.returncode == 2 and "unknown device 'tpu'" in bad.stderr
    assert not (tmp_path / "nocuda.db").exists() or load(url, "nocuda").trials == []


@pytest.mark.parametrize("name, value, problem", [
    ("MTBERT_HEARTBEAT_INTERVAL", "abc", "MTBERT_HEARTBEAT_INTERVAL='abc': must be a whole number >= 1"),
    ("MTBERT_HEARTBEAT_INTERVAL", "0", "MTBERT_HEARTBEAT_INTERVAL='0': must be a whole number >= 1"),
    ("MTBERT_HEARTBEAT_GRACE", "-5", "MTBERT_HEARTBEAT_GRACE='-5': must be a whole number >= 1"),
    ("MTBERT_HEARTBEAT_GRACE", "20", "MTBERT_HEARTBEAT_GRACE=20 must be more than MTBERT_HEARTBEAT_INTERVAL=30"),
    ("MTBERT_MAX_RETRY", "1.5", "MTBERT_MAX_RETRY='1.5': must be a whole number >= 0"),
    ("MTBERT_STORAGE_OUTAGE_SECONDS", "soon", "MTBERT_STORAGE_OUTAGE_SECONDS='soon': must be a number >= 0"),
])
def test_bad_heartbeat_settings_are_one_line(tmp_path, tiny_model, tiny_data, name, value, problem):
    study_file = write_study(tmp_path, "beats", tiny_model, tiny_data, n_trials=1, epochs=1)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MTBERT_HEARTBEAT")}
    proc = run("worker.py", "--study", str(study_file), "--storage", f"sqlite:///{tmp_path / 'h.db'}",
               environ={**clean, name: value})
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) and problem in error_lines(proc.stderr)[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode", [["--status"], ["--report"], ["--export-best", "EXPORT"], ["--dashboard"]])
def test_reading_a_missing_sqlite_storage_creates_nothing(tmp_path, mode):
    target = tmp_path / "not" / "there" / "s.db"
    mode = [str(tmp_path / "x") if m == "EXPORT" else m for m in mode]
    proc = run("search.py", "--study", "quickstart", *mode, "--storage", str(target), timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == [error_lines(proc.stderr)[0]]
    assert f"no storage at {target}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "not").exists() and not (tmp_path / "x").exists()
