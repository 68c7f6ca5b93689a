"""What a newcomer meets first (issue 20) and hand-backs that are not failures (issue 17, finding 4)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from helpers import ROOT, write_study
from service.progress import print_summary
from service.ranking import leaderboard
from service.study import open_study
from studies import load_spec
from service.worker import Worker


def run(*args: str, env: dict | None = None, cwd: Path = ROOT, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------ a hand-back is not a failure


def hand_back_once(study, spec, worker: Worker) -> None:
    """Claim the next trial (a first attempt or a queued retry) and hand it back, as SIGTERM would."""
    trial = worker.claim()
    assert trial not in ("done", "wait"), trial
    if not trial.params:
        spec.suggest(trial)
    trial.set_user_attr("epochs_done", 2)
    worker.hand_back(trial)


def test_hand_backs_do_not_count_against_max_retry(tmp_path, tiny_model, tiny_data, monkeypatch, capsys):
    monkeypatch.setenv("MTBERT_MAX_RETRY", "1")
    study_file = write_study(tmp_path, "preempted", tiny_model, tiny_data, n_trials=1, epochs=3)
    spec = load_spec(study_file)
    study = open_study(spec, f"sqlite:///{tmp_path / 's.db'}", {})
    worker = Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck")
    for _ in range(4):  # preempted four times: more than MTBERT_MAX_RETRY
        hand_back_once(study, spec, worker)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] * 4 + [TrialState.WAITING], "the chain was dropped"
    assert trials[-1].system_attrs["retry_history"] == [0, 1, 2, 3]  # same chain: it resumes trial 0's checkpoint

    print_summary(study, spec)
    out = capsys.readouterr().out
    assert "failed 0" in out and "stopped 1 (will resume from epoch 2)" in out, out
    df = leaderboard(study, spec)
    assert list(df["state"]) == ["STOPPED"] * 4 and "WAITING" not in set(df["state"]), df
    assert df["fail_reason"].iloc[-1] == "stopped by a signal; will resume from epoch 2"
    from reports.study_report import header  # the report's count line
    text = header(study, spec, trials, f"sqlite:///{tmp_path / 's.db'}")
    assert "0 complete, 0 pruned, 0 failed, 0 running, 1 stopped (will resume from epoch 2)" in text, text

    # crashes still count: with MTBERT_MAX_RETRY=1 one crash is retried, the second is not
    from storage import optuna_compat
    for expect_retry in (True, False):
        trial = worker.claim()
        frozen = study.tell(trial, state=TrialState.FAIL)
        optuna_compat.queue_retry(study, frozen)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        assert bool(waiting) == expect_retry
        if not expect_retry:
            break


# ------------------------------------------------------------ from the smoke test to the real run


def commands_in(message: str) -> dict[str, list[str]]:
    """The two commands a mismatch names: 'continue' and 'beside', as argv after `python search.py`."""
    import re
    import shlex

    found = dict(re.findall(r"(continue it|beside it): python search\.py ([^;]+?)(?:;|$)", message))
    assert set(found) == {"continue it", "beside it"}, message
    return {k.split()[0]: shlex.split(v) for k, v in found.items()}


def test_the_real_run_after_a_smoke_test_names_both_commands_and_each_works(tmp_path, tiny_model, tiny_data):
    import argparse

    from service.study import StudyMismatch, add_override_arguments, load_study_spec

    parser = argparse.ArgumentParser()
    parser.add_argument("--study")
    add_override_arguments(parser)

    def open_with(argv: list[str]):
        args = parser.parse_args(argv)
        spec, overrides = load_study_spec(args.study, args)
        return open_study(spec, url, overrides, role="search")

    study_file = write_study(tmp_path, "real", tiny_model, tiny_data, n_trials=6, epochs=3)
    url = f"sqlite:///{tmp_path / 's.db'}"
    smoke = open_with(["--study", str(study_file), "--epochs", "1", "--max-examples", "20", "--n-trials", "2"])
    with pytest.raises(StudyMismatch) as caught:
        open_with(["--study", str(study_file)])  # the real run, flags dropped: the file was never edited
    message = str(caught.value)
    assert "train.epochs: recorded 1, file 3" in message and "train.max_examples: recorded 20" in message
    commands = commands_in(message)
    assert commands["continue"] == ["--study", str(study_file), "--epochs", "1", "--max-examples", "20"]
    assert open_with(commands["continue"]).study_name == smoke.study_name == "real"
    real = open_with(commands["beside"])  # the real study, beside the smoke test
    assert real.study_name == "real-full" and commands["beside"][-2:] == ["--study-name", "real-full"]
    assert real.user_attrs["spec"]["train"]["epochs"] == 3 and smoke.user_attrs["spec"]["train"]["epochs"] == 1


def test_study_name_travels_to_the_workers(tmp_path):
    import argparse

    from service.study import add_override_arguments, override_argv

    parser = argparse.ArgumentParser()
    add_override_arguments(parser)
    args = parser.parse_args(["--study-name", "lr_dropout-full", "--epochs", "2"])
    assert override_argv(args) == ["--epochs", "2", "--study-name", "lr_dropout-full"]
    bad = run("search.py", "--study", "quickstart", "--study-name", "../x", "--status",
              "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert bad.returncode == 2 and "'../x': a study's name" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------ one clear error, exit 2, nothing created


def test_a_missing_data_folder_is_one_error_before_any_worker_and_no_study(tmp_path, tiny_model):
    study_file = write_study(tmp_path, "nodata", tiny_model, tmp_path / "no-such-folder", n_trials=2, epochs=1)
    db = tmp_path / "n.db"
    proc = run("search.py", "--study", str(study_file), "--storage", f"sqlite:///{db}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "no CS224N data in" in errors[0], proc.stderr
    assert "--data-dir" in errors[0] and "MTBERT_DATA_DIR" in errors[0]
    assert "worker 0 on" not in proc.stderr  # no worker was started
    import optuna

    import storage as storage_lib
    assert not db.exists() or optuna.get_all_study_names(storage_lib.open_storage(f"sqlite:///{db}")) == []


@pytest.mark.parametrize("url, hint", [
    ("postgres://u:secret@localhost:1/db", "postgresql://u:***@localhost:1/db"),
    ("sqlite://storage/x.db", "sqlite:///storage/x.db"),
])
def test_storage_urls_that_mean_something_else_are_refused_with_the_fix(tmp_path, url, hint):
    proc = run("search.py", "--study", "quickstart", "--status", "--storage", url, cwd=ROOT)
    assert proc.returncode == 2 and hint in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "secret" not in proc.stderr
    assert not (ROOT / "storage" / "storage").exists()


# ------------------------------------------------------------ the suite leaves the user's folders alone


def test_outputs_go_to_the_suite_s_temporary_folders_and_report_is_announced_once(tmp_path, tiny_model, tiny_data):
    import os

    import storage as storage_lib

    assert not storage_lib.STORAGE_DIR.is_relative_to(ROOT)  # logs and CSVs of every test: not in storage/
    study_file = write_study(tmp_path, "announce", tiny_model, tiny_data, n_trials=1, epochs=1)
    url = f"sqlite:///{tmp_path / 's.db'}"
    open_study(load_spec(study_file), url, {})
    proc = run("search.py", "--study", str(study_file), "--report", "--storage", url)
    assert proc.returncode == 0, proc.stderr
    expected = Path(os.environ["MTBERT_REPORTS_DIR"]) / "announce" / "report.md"
    assert (proc.stdout + proc.stderr).count("report written to") == 1, proc.stdout + proc.stderr
    assert f"report written to {expected}" in proc.stdout and expected.is_file()
    assert not (ROOT / "reports" / "announce").exists()


# ------------------------------------------------------------ installable


def test_pyproject_installs_every_package_and_its_commands_run_search_and_worker():
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"}
    assert packages == on_disk == {"mtbert", "service", "storage", "studies", "reports"}
    scripts = project["project"]["scripts"]
    assert scripts == {"mtbert-search": "search:main", "mtbert-worker": "worker:main"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function))
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    assert "torch>=2.3" in requirements


def test_printed_commands_reach_a_renamed_study():
    from service.study import study_option

    assert study_option(load_spec("lr_dropout")) == "--study lr_dropout"
    assert study_option(load_spec("lr_dropout").renamed("lr_dropout-smoke")) == \
        "--study lr_dropout --study-name lr_dropout-smoke"
