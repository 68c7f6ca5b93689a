"""The report's figures (reports/plots.py), checked as figures and as images: integer epoch and trial
ticks, pruned vs complete trials told apart, a log axis for lr, per-task curves of the top trials,
the Pareto front of score against seconds, and the caution on importances from few trials."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from optuna.distributions import FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import TrialState, create_trial  # noqa: E402
from PIL import Image  # noqa: E402

from helpers import ROOT  # noqa: E402
from reports import plots  # noqa: E402
from service.study import open_study  # noqa: E402
from studies import load_spec  # noqa: E402

SPEC = load_spec("quickstart")  # lr (log), hidden_dropout_prob, batch_size (int, step 8); 3 epochs
DISTRIBUTIONS = {"hidden_dropout_prob": FloatDistribution(0.2, 0.5), "lr": FloatDistribution(1e-5, 1e-4, log=True),
                 "batch_size": IntDistribution(8, 40, step=8)}


def trial(state: TrialState, curve: list[float], lr: float, seconds: float = 20.0, batch: int = 16,
          device: str = "cpu") -> optuna.trial.FrozenTrial:
    """A finished trial: `curve` is its overall per epoch; per-task scores derived from it."""
    history = [{"epoch": e, "sst_acc": v - 0.2, "quora_acc": v + 0.05, "sts_corr": v + 0.15, "overall": v,
                "seconds": seconds} for e, v in enumerate(curve, 1)]
    return create_trial(
        state=state, value=curve[-1] if state == TrialState.COMPLETE else None,
        params={"hidden_dropout_prob": 0.3, "lr": lr, "batch_size": batch}, distributions=DISTRIBUTIONS,
        intermediate_values=dict(enumerate(curve, 1)),
        user_attrs={"history": history, "device": device, "config": {"epochs": 3},
                    **{k: v for k, v in history[-1].items() if k not in ("epoch", "seconds")}})  # as the worker does


# trials 0-4: three complete (best: #3), two pruned after epochs 1 and 2
TRIALS = [trial(TrialState.COMPLETE, [0.50, 0.55, 0.58], 1e-5, seconds=20),
          trial(TrialState.PRUNED, [0.40], 2e-5, seconds=15),
          trial(TrialState.PRUNED, [0.45, 0.47], 3e-5, seconds=25, batch=8),
          trial(TrialState.COMPLETE, [0.55, 0.61, 0.64], 8e-5, seconds=30, batch=40),
          trial(TrialState.COMPLETE, [0.52, 0.56, 0.60], 5e-5, seconds=10, batch=24)]


def numbered(trials):
    """The trials as a study stores them (numbers 0..n-1)."""
    study = optuna.create_study(direction="maximize")
    for t in trials:
        study.add_trial(t)
    return study.get_trials()


def line_color(line) -> tuple[float, float, float]:
    return to_rgb(line.get_color())


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def integer_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low - 1e-9 <= t <= high + 1e-9]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    return ticks


def saved_image(fig, path: Path) -> np.ndarray:
    plots.save(fig, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 500 and image.height >= 250, image.size
        return np.asarray(image.convert("RGB")).astype(int)


def has_color(pixels: np.ndarray, color: str, tolerance: int = 12) -> bool:
    target = np.array([round(c * 255) for c in to_rgb(color)])
    return bool((np.abs(pixels - target).max(axis=-1) <= tolerance).any())


def test_learning_curves_integer_epochs_and_pruned_trials_dashed_with_a_cross(tmp_path):
    trials = numbered(TRIALS)
    fig = plots.learning_curves_figure(trials, SPEC)
    (ax,) = fig.axes
    assert integer_ticks(ax) == [1, 2, 3]  # the stock plot had ticks at 1.25, 1.5
    assert len(ax.lines) == 5  # one line per finished trial
    pruned = [line for line in ax.lines if line_color(line) == to_rgb(plots.PRUNED)]
    assert sorted(len(line.get_xdata()) for line in pruned) == [1, 2]
    assert all(line.get_linestyle() == "--" and line.get_marker() == "x" for line in pruned)
    best = [line for line in ax.lines if line_color(line) == to_rgb(plots.BEST)]
    assert len(best) == 1 and list(best[0].get_ydata()) == [0.55, 0.61, 0.64]
    assert legend_texts(ax) == ["complete", "pruned (x: where it stopped)", "best: #3"]
    pixels = saved_image(fig, tmp_path / "curves.png")
    assert has_color(pixels, plots.PRUNED) and has_color(pixels, plots.BEST) and has_color(pixels, plots.COMPLETE)


def test_history_has_integer_trial_ticks_both_states_and_a_best_so_far_line(tmp_path):
    fig = plots.history_figure(numbered(TRIALS), SPEC)
    (ax,) = fig.axes
    assert integer_ticks(ax) == [0, 1, 2, 3, 4]
    dots, crosses, best, star = ax.lines
    assert list(dots.get_xdata()) == [0, 3, 4] and dots.get_marker() == "o"
    assert list(crosses.get_xdata()) == [1, 2] and list(crosses.get_ydata()) == [0.40, 0.47]
    assert crosses.get_marker() == "x"
    assert list(best.get_ydata()) == [0.58, 0.64, 0.64, 0.64]  # never decreases
    # the best trial itself is marked red, as the report's conventions say
    assert list(star.get_xdata()) == [3] and star.get_marker() == "*" and line_color(star) == to_rgb(plots.BEST)
    assert legend_texts(ax) == ["complete", "pruned (value at its last epoch)", "best so far", "best: #3"]
    saved_image(fig, tmp_path / "history.png")


def test_params_use_a_log_axis_for_lr_and_the_grid_of_batch_sizes(tmp_path):
    fig = plots.params_figure(numbered(TRIALS), SPEC)
    axes = {ax.get_xlabel(): ax for ax in fig.axes}
    assert set(axes) == {"hidden_dropout_prob", "lr (log scale)", "batch_size"}
    assert axes["lr (log scale)"].get_xscale() == "log"
    assert axes["hidden_dropout_prob"].get_xscale() == "linear"
    assert list(axes["batch_size"].get_xticks()) == [8, 16, 24, 32, 40]
    lr = axes["lr (log scale)"]
    dots, crosses, star = lr.lines
    assert (len(dots.get_xdata()), len(crosses.get_xdata())) == (3, 2)
    assert list(star.get_xdata()) == [8e-5] and star.get_marker() == "*"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["complete", "pruned (last epoch)", "best: #3"]
    saved_image(fig, tmp_path / "params.png")


def test_task_curves_show_each_task_for_the_top_trials(tmp_path):
    fig = plots.task_curves_figure(numbered(TRIALS), SPEC)
    assert [ax.get_title() for ax in fig.axes] == ["SST acc", "Quora acc", "STS r"]
    for ax in fig.axes:
        assert integer_ticks(ax) == [1, 2, 3]
        assert len(ax.lines) == 3  # the three complete trials, pruned ones never
    sts = fig.axes[2]
    assert list(sts.lines[0].get_ydata()) == pytest.approx([0.70, 0.76, 0.79])  # the best trial (#3) first
    # one legend for the three panels, outside every panel (it covered curves of the first one)
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["#3 (overall 0.640)", "#4 (overall 0.600)",
                                                                  "#0 (overall 0.580)"]
    saved_image(fig, tmp_path / "tasks.png")


def test_pareto_front_keeps_only_trials_nothing_beats_with_less_time():
    points = [(20, 0.58, 0), (15, 0.40, 1), (50, 0.47, 2), (90, 0.64, 3), (10, 0.60, 4), (30, 0.60, 5)]
    assert [p[2] for p in plots.pareto_front(points)] == [4, 3]
    assert [p[2] for p in plots.pareto_front(points, maximize=False)] == [4, 1]


def test_cost_plot_marks_the_pareto_front_in_wall_clock_seconds(tmp_path):
    fig = plots.cost_figure(numbered(TRIALS), SPEC)
    (ax,) = fig.axes
    # the seconds are each epoch's wall clock, summed: not "CPU-seconds" (processor time over all cores)
    assert ax.get_xlabel().startswith("wall-clock seconds per trial on CPU (sum of its epochs")
    assert "CPU-seconds" not in ax.get_xlabel() + ax.get_title()
    # seconds per trial: 3 x 20, 15, 2 x 25, 3 x 30, 3 x 10; over complete trials the front is #4 (30 s, 0.60)
    # then #3 (90 s, 0.64): #0 (60 s, 0.58) is beaten by #4, and pruned #1 (15 s) is context, not a choice
    front = [line for line in ax.lines if line.get_label() == "Pareto front (complete trials)"]
    assert len(front) == 1 and list(front[0].get_xdata()) == [30, 90]
    assert sorted(t.get_text() for t in ax.texts) == ["#3", "#4"]
    assert legend_texts(ax) == ["complete", "pruned", "Pareto front (complete trials)"]
    gpu = [trial(TrialState.COMPLETE, [0.5, 0.6, 0.7], 1e-5, device="NVIDIA H200")]
    assert plots.cost_figure(numbered(gpu), SPEC).axes[0].get_xlabel().startswith("wall-clock seconds per trial on GPU")
    pixels = saved_image(fig, tmp_path / "cost.png")
    assert has_color(pixels, plots.BEST)


def test_importances_from_few_trials_carry_a_caution_in_the_figure_and_the_report(tmp_path):
    few = plots.importances_figure({"lr": 0.7, "hidden_dropout_prob": 0.2, "batch_size": 0.1}, n_complete=4)
    (ax,) = few.axes
    assert "from 4 complete trials" in ax.get_title() and "a hint, not a ranking" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["batch_size", "hidden_dropout_prob", "lr"]
    many = plots.importances_figure({"lr": 0.7, "hidden_dropout_prob": 0.3}, n_complete=12)
    assert "hint" not in many.axes[0].get_title()

    # the report: the same caution in words, next to a real importance plot of a study with 4 complete trials
    rng = np.random.default_rng(0)
    trials = [trial(TrialState.COMPLETE, [0.5, 0.55, float(v)], float(lr), batch=int(b)) for v, lr, b in
              zip(rng.uniform(0.5, 0.7, 4), rng.uniform(1e-5, 1e-4, 4), (8, 16, 24, 32))]
    url = f"sqlite:///{tmp_path / 'imp.db'}"
    study = open_study(SPEC, url, {})
    for t in trials:
        study.add_trial(t)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "search.py", "--study", "quickstart", "--report", "--out", str(out),
                           "--storage", url], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MTBERT_ARTIFACT_DIR": str(tmp_path / "a")})
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert "**Caution:** 4 complete trials are too few for importances to mean much" in text
    assert "![Parameter importances](importances.png)" in text
    with Image.open(out / "importances.png") as image:
        assert image.format == "PNG" and image.width > 400
