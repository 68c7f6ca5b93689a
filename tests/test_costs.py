"""reports.costs: the report's "Epochs by rung" and "Where the time went", from the trials alone."""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from reports.costs import epochs_section, time_section
from studies import load_spec

T0 = datetime(2026, 12, 3, 10, 0, 0)


def trial(number: int, state: TrialState, start_s: float, end_s: float, epochs: int, **attrs) -> FrozenTrial:
    return FrozenTrial(number=number, state=state, value=0.5 if state == TrialState.COMPLETE else None,
                       datetime_start=T0 + timedelta(seconds=start_s), datetime_complete=T0 + timedelta(seconds=end_s),
                       params={"lr": 1e-4}, distributions={"lr": FloatDistribution(1e-5, 1e-3, log=True)},
                       user_attrs=attrs, system_attrs={}, intermediate_values={e: 0.5 for e in range(1, epochs + 1)},
                       trial_id=number)


def test_rungs_and_time_add_up_with_a_stop_gap_excluded_from_busy_time() -> None:
    spec = load_spec(Path("studies/lr_dropout.toml"))  # 9 epochs
    trials = [
        trial(0, TrialState.PRUNED, 0, 100, 1, epoch_seconds=[90.0], eval_seconds=[10.0], checkpoint_seconds=[2.0]),
        trial(1, TrialState.COMPLETE, 50, 350, 9, epoch_seconds=[30.0] * 9, eval_seconds=[3.0] * 9,
              checkpoint_seconds=[1.0] * 9),
        trial(2, TrialState.FAIL, 350, 400, 1, epoch_seconds=[40.0]),  # handed back, then a gap
        trial(3, TrialState.PRUNED, 1000, 1100, 3, epoch_seconds=[30.0] * 3),
    ]
    epochs = epochs_section(spec, trials)
    assert "trained **13** epochs of the 27" in epochs  # finished trials only: 1 + 9 + 3 of 3 x 9
    assert "| 1 | 1 | 0 | 1 |" in epochs and "| 3 | 1 | 0 | 3 |" in epochs and "| 9 | 0 | 1 | 9 |" in epochs
    text = time_section(trials)
    # wall 0..1100 s; busy 0..400 and 1000..1100 = 500 s; worker time 100 + 300 + 50 + 100 = 550 s
    assert "**18 min 20 s**" in text and "(8 min 20 s with a trial running; 10 min 00 s with none" in text
    assert "550 s, 1.10 trials running at once" in text
    epoch_total, evals, saves = 90 + 270 + 40 + 90, 10 + 27, 2 + 9
    assert f"| epochs | {epoch_total} |" in text
    assert f"| of which evaluation | {evals} |" in text
    assert f"| checkpoints | {saves} |" in text
    assert f"| trial overhead | {550 - epoch_total - saves} |" in text


def test_trials_without_duration_give_no_time_section() -> None:
    same = [trial(0, TrialState.COMPLETE, 5, 5, 1, epoch_seconds=[1.0])]  # told at once: no worker time
    assert time_section(same) == ""
    assert time_section([]) == ""
