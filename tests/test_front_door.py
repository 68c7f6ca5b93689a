"""What a newcomer meets first (issue 20) and hand-backs that are not failures (issue 17, finding 4)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from service.progress import print_summary
from service.ranking import leaderboard
from service.study import open_study
from studies import load_spec
from test_search import write_study
from worker import Worker

ROOT = Path(__file__).resolve().parents[1]


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
