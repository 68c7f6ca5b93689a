"""search.py's display reads the study's trials once per poll and once per summary (service.progress),
and what it shows is what reading them piecemeal showed."""
from __future__ import annotations

import datetime as dt
import io
import warnings
from collections import Counter

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from service import progress
from service.ranking import best_trial, leaderboard
from studies import load_spec

START = dt.datetime(2024, 1, 1, 12, 0, 0)


def trial(seconds: float | None = None, **kwargs) -> FrozenTrial:
    """optuna.trial.create_trial, finished `seconds` after it started (so that it has a duration)."""
    made = create_trial(**kwargs)
    if seconds is not None:
        made.datetime_start, made.datetime_complete = START, START + dt.timedelta(seconds=seconds)
    return made


@pytest.fixture
def study_and_spec():
    """An in-memory study with a trial in every state, uneven params and user attrs, metric names set."""
    spec = load_spec("quickstart")
    study = optuna.create_study(study_name=spec.name, direction=spec.direction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([spec.metric])  # as service.study.open_study records it
    lr, drop = FloatDistribution(1e-5, 1e-4, log=True), FloatDistribution(0.2, 0.5)
    trials = [
        trial(state=TrialState.COMPLETE, value=0.61, params={"lr": 3e-5, "hidden_dropout_prob": 0.3},
              distributions={"lr": lr, "hidden_dropout_prob": drop}, intermediate_values={1: 0.5, 2: 0.61},
              user_attrs={"sst_acc": 0.4, "epochs_done": 2, "history": [{"epoch": 1}, {"epoch": 2}]}, seconds=91.26),
        trial(state=TrialState.PRUNED, params={"lr": 5e-5}, distributions={"lr": lr},
              intermediate_values={1: 0.3}, user_attrs={"device": "cpu"}, seconds=12),
        trial(state=TrialState.COMPLETE, value=0.7,
              params={"lr": 2e-5, "hidden_dropout_prob": 0.25, "batch_size": 16},
              distributions={"lr": lr, "hidden_dropout_prob": drop, "batch_size": IntDistribution(8, 40, step=8)},
              user_attrs={"sst_acc": 0.5, "quora_acc": 0.6, "sts_corr": 0.3}, seconds=200),
        trial(state=TrialState.FAIL, params={"lr": 9e-5}, distributions={"lr": lr},
              user_attrs={"fail_reason": "NaN loss"}, seconds=3),
        trial(state=TrialState.RUNNING, params={"hidden_dropout_prob": 0.4},
              distributions={"hidden_dropout_prob": drop}, intermediate_values={1: 0.55}),
        trial(state=TrialState.COMPLETE, value=0.7, params={"lr": 4e-5}, distributions={"lr": lr},
              seconds=50),  # ties with #2, which ranks first
    ]
    for t in trials:
        study.add_trial(t)
    study.enqueue_trial({"lr": 1e-5})  # WAITING
    return study, spec


def counting(study, monkeypatch) -> list[int]:
    """Count the study's get_trials calls (every read of its trials goes through it)."""
    calls: list[int] = []
    real = study.get_trials

    def get_trials(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(study, "get_trials", get_trials)
    return calls


def test_the_leaderboard_of_a_trial_in_every_state(study_and_spec):
    study, spec = study_and_spec
    df = leaderboard(study, spec)
    assert list(df.columns) == ["number", "state", "overall", "sst_acc", "quora_acc", "sts_corr", "batch_size",
                                "hidden_dropout_prob", "lr", "epochs_done", "device", "duration", "fail_reason"]
    assert list(df["number"])[:3] == [2, 5, 0]  # complete first, best first; then the rest, no value last
    rows = {r["number"]: r for r in df.to_dict("records")}
    assert (rows[0]["overall"], rows[0]["sst_acc"], rows[0]["epochs_done"], rows[0]["duration"]) == (0.61, 0.4, 2, 91.3)
    assert rows[3]["state"] == "FAIL" and rows[3]["fail_reason"] == "NaN loss" and rows[3]["duration"] == 3.0
    assert rows[1]["device"] == "cpu" and pd.isna(rows[1]["overall"])  # a pruned trial made without a value
    assert rows[4]["state"] == "RUNNING" and pd.isna(rows[4]["duration"]) and rows[4]["hidden_dropout_prob"] == 0.4
    assert rows[6]["state"] == "WAITING" and pd.isna(rows[6]["lr"])  # enqueued params are not params yet
    assert df["overall"].dtype == float and df["duration"].dtype == float


def test_best_and_leaderboard_from_a_snapshot_match_reading_the_storage(study_and_spec):
    study, spec = study_and_spec
    trials = study.get_trials(deepcopy=False)
    assert best_trial(study, spec, trials).number == best_trial(study, spec).number == 2  # the first of a tie
    pd.testing.assert_frame_equal(leaderboard(study, spec, trials), leaderboard(study, spec))
    counts = Counter(t.state for t in trials)
    assert progress.progress_text(study, spec, counts, trials) == progress.progress_text(study, spec, counts)


def test_print_summary_reads_the_trials_once(study_and_spec, monkeypatch, capsys):
    study, spec = study_and_spec
    calls = counting(study, monkeypatch)
    df = progress.print_summary(study, spec)
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert (f"study {spec.name}: complete 3 pruned 1 failed 1 running 1 | best 0.7000 (#2) | budget {spec.n_trials}"
            in out)
    assert list(df["number"])[:3] == [2, 5, 0]


def test_a_poll_reads_the_trials_once(study_and_spec, monkeypatch):
    study, spec = study_and_spec
    display = progress.BarDisplay(io.StringIO(), spec)
    trials = study.get_trials(deepcopy=False)
    calls = counting(study, monkeypatch)
    display.status(study, spec, trials)  # the poll's snapshot, taken by follow(): nothing more is read
    assert calls == []
    assert "best 0.7000 (#2)" in display.bar.postfix
    display.close()
