"""The study report's figures, drawn with matplotlib directly: each answers one question at a glance.

Every function takes the study's trials (and spec) and returns a matplotlib Figure, or raises
NotDrawable with the reason it cannot be drawn. Conventions shared by all of them: complete
trials are blue dots, pruned trials orange crosses (at the value of their last epoch), the best
trial a red star or a thick red line; epochs and trial numbers get integer ticks only; a
log-scaled parameter (lr) gets a log axis.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from mtbert.tasks import SCORE_NAMES, TASK_METRICS
from studies import StudySpec

COMPLETE, PRUNED, BEST = "tab:blue", "tab:orange", "tab:red"
IMPORTANCE_MIN_TRIALS = 10  # below this many complete trials, fANOVA importances are mostly noise
TOP_CURVES = 3  # trials in the per-task curves
SIZE = (7.5, 4.2)  # inches; saved at 100 dpi: 750 x 420 pixels


class NotDrawable(ValueError):
    """The trials cannot support this figure; the message says why."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finished(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Complete and pruned trials that reported at least one epoch, by trial number."""
    return sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and score(t) is not None),
                  key=lambda t: t.number)


def score(trial: FrozenTrial) -> float | None:
    """A complete trial's value; a pruned trial's value at its last epoch."""
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def ranked(trials: Sequence[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
    """Complete trials, best first."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(complete, key=lambda t: t.value, reverse=spec.direction == "maximize")


def trial_seconds(trial: FrozenTrial) -> float | None:
    """Wall-clock seconds the trial's epochs took (training and dev evaluation): its `history` seconds,
    else `epoch_seconds`, else its wall-clock duration."""
    history = trial.user_attrs.get("history") or []
    if history and all(isinstance(h.get("seconds"), (int, float)) for h in history):
        return float(sum(h["seconds"] for h in history))
    if trial.user_attrs.get("epoch_seconds"):
        return float(sum(trial.user_attrs["epoch_seconds"]))
    if trial.duration is not None:
        return trial.duration.total_seconds()
    return None


def _integer_ticks(axis, low: int, high: int) -> None:
    """Integer ticks only: every integer up to 12 of them, else an integer locator."""
    from matplotlib.ticker import MaxNLocator

    if high - low <= 11:
        axis.set_ticks(range(low, high + 1))
    else:
        axis.set_major_locator(MaxNLocator(integer=True))


def _log_axis(axis, ax) -> None:
    """A log-scaled x axis labelled at 1, 2 and 5 of each decade (1e-05, 2e-05, 5e-05, 1e-04), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
    axis.set_minor_formatter(NullFormatter())


def _metric_label(spec: StudySpec) -> str:
    return f"{SCORE_NAMES.get(spec.metric, spec.metric)} (dev)"


def _legend_handles(*items: tuple[str, dict[str, Any]]):
    from matplotlib.lines import Line2D

    return [Line2D([], [], label=label, **style) for label, style in items]


DOT = {"color": COMPLETE, "marker": "o", "linestyle": "none"}
CROSS = {"color": PRUNED, "marker": "x", "linestyle": "none", "markeredgewidth": 2}
STAR = {"color": BEST, "marker": "*", "linestyle": "none", "markersize": 14}


# ------------------------------------------------------------ the figures


def history_figure(trials: Sequence[FrozenTrial], spec: StudySpec):
    """Does the search improve? The metric of every trial in order, and the best so far."""
    done = finished(trials)
    if not done:
        raise NotDrawable("no finished trial yet")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    ax.plot([t.number for t in complete], [t.value for t in complete], **DOT, label="complete")
    ax.plot([t.number for t in pruned], [score(t) for t in pruned], **CROSS, label="pruned (value at its last epoch)")
    if complete:
        xs, ys, best = [], [], None
        for t in complete:
            if best is None or (t.value > best if spec.direction == "maximize" else t.value < best):
                best = t.value
            xs.append(t.number)
            ys.append(best)
        xs.append(max(t.number for t in done))
        ys.append(best)
        ax.step(xs, ys, where="post", color=BEST, label="best so far")
        top = ranked(complete, spec)[0]
        ax.plot([top.number], [top.value], linestyle="none", marker="*", markersize=16, color=BEST,
                markeredgecolor="black", markeredgewidth=0.6, zorder=5, label=f"best: #{top.number}")
    _integer_ticks(ax.xaxis, 0, max(t.number for t in done))
    ax.set_xlabel("trial number")
    ax.set_ylabel(_metric_label(spec))
    ax.set_title(f"Does the search improve? {spec.metric} of each trial")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def learning_curves_figure(trials: Sequence[FrozenTrial], spec: StudySpec):
    """When were trials stopped, and were the stopped ones behind? The metric after every epoch."""
    done = [t for t in finished(trials) if t.intermediate_values]
    if not done:
        raise NotDrawable("no trial reported an epoch yet")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    best = (ranked(done, spec) or [None])[0]
    for t in done:  # one line per trial; best last, on top
        if t is best:
            continue
        epochs = sorted(t.intermediate_values)
        values = [t.intermediate_values[e] for e in epochs]
        if t.state == TrialState.PRUNED:
            ax.plot(epochs, values, color=PRUNED, linestyle="--", linewidth=1.2, alpha=0.9, marker="x",
                    markevery=[len(epochs) - 1], markersize=9, markeredgewidth=2)
        else:
            ax.plot(epochs, values, color=COMPLETE, linewidth=1.2, alpha=0.6, marker="o", markersize=3)
    if best is not None:
        epochs = sorted(best.intermediate_values)
        ax.plot(epochs, [best.intermediate_values[e] for e in epochs], color=BEST, linewidth=2.5, marker="o")
    handles = _legend_handles(("complete", {"color": COMPLETE, "marker": "o", "markersize": 3}),
                              ("pruned (x: where it stopped)", {"color": PRUNED, "linestyle": "--", "marker": "x"}))
    if best is not None:
        handles += _legend_handles((f"best: #{best.number}", {"color": BEST, "linewidth": 2.5, "marker": "o"}))
    last = max(max(t.intermediate_values) for t in done)
    _integer_ticks(ax.xaxis, 1, max(last, spec.epochs))
    ax.set_xlabel("epoch")
    ax.set_ylabel(_metric_label(spec))
    ax.set_title(f"Learning curves: {spec.metric} after each epoch")
    ax.legend(handles=handles, loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def task_curves_figure(trials: Sequence[FrozenTrial], spec: StudySpec, top: int = TOP_CURVES):
    """Which task do the best trials learn, and when? Per-task dev scores per epoch of the top trials."""
    best = [t for t in ranked(trials, spec) if t.user_attrs.get("history")][:top]
    if not best:
        raise NotDrawable("no complete trial recorded per-epoch task scores")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TASK_METRICS), figsize=(SIZE[0] * 1.25, SIZE[1]), sharex=True)
    colors = plt.get_cmap("tab10")
    last = max(max(h["epoch"] for h in t.user_attrs["history"]) for t in best)
    for ax, key in zip(axes, TASK_METRICS):
        for i, t in enumerate(best):
            rows = sorted((h for h in t.user_attrs["history"] if isinstance(h.get(key), (int, float))),
                          key=lambda h: h["epoch"])
            ax.plot([h["epoch"] for h in rows], [h[key] for h in rows], marker="o", color=colors(i),
                    linewidth=2.2 if i == 0 else 1.3, label=f"#{t.number} ({spec.metric} {t.value:.3f})")
        ax.set_title(SCORE_NAMES[key])
        ax.set_xlabel("epoch")
        _integer_ticks(ax.xaxis, 1, max(last, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dev score")
    # one legend for all three panels (the same trials in the same colours), below them: it covers no curve
    lines = axes[0].get_lines()
    fig.legend(lines, [line.get_label() for line in lines], loc="lower center", ncol=len(lines), fontsize="small",
               frameon=False, title=f"top {len(best)} trials", title_fontsize="small")
    fig.suptitle("Per-task dev scores of the best trials")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def params_figure(trials: Sequence[FrozenTrial], spec: StudySpec):
    """Which values of each searched parameter score well? One panel per parameter."""
    done = finished(trials)
    names = [n for n in spec.space if any(n in t.params for t in done)]
    if not names:
        raise NotDrawable("no finished trial has parameters")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(max(SIZE[0], 3.2 * len(names)), SIZE[1]), sharey=True,
                             squeeze=False)
    best = (ranked(done, spec) or [None])[0]
    for ax, name in zip(axes[0], names):
        param = spec.space[name]
        numeric = param.type in ("float", "int")
        categories = [] if numeric else list(param.choices or param.presets or ())

        def x_of(t: FrozenTrial, categories=categories, numeric=numeric, name=name):
            value = t.params[name]
            return value if numeric else categories.index(value) if value in categories else None

        for state, style in ((TrialState.COMPLETE, DOT), (TrialState.PRUNED, CROSS)):
            points = [(x_of(t), score(t)) for t in done if t.state == state and name in t.params]
            points = [p for p in points if p[0] is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], **style, alpha=0.85)
        if best is not None and name in best.params and x_of(best) is not None:
            ax.plot([x_of(best)], [best.value], **STAR)
        if param.log:
            _log_axis(ax.xaxis, ax)
            ax.set_xlim(param.low / 1.15, param.high * 1.15)  # the searched range, not only the tried values
        elif numeric:
            pad = 0.05 * (param.high - param.low) or 0.5
            ax.set_xlim(param.low - pad, param.high + pad)
        if not numeric:
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels([str(c) for c in categories], rotation=30, ha="right")
            ax.set_xlim(-0.5, len(categories) - 0.5)
        elif param.type == "int" and param.step and not param.log and (param.high - param.low) / param.step <= 11:
            ax.set_xticks(range(int(param.low), int(param.high) + 1, int(param.step)))
        elif param.type == "int" and not param.log:
            _integer_ticks(ax.xaxis, int(param.low), int(param.high))
        ax.set_xlabel(name + (" (log scale)" if param.log else ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(_metric_label(spec))
    handles = _legend_handles(("complete", DOT), ("pruned (last epoch)", CROSS),
                              *([(f"best: #{best.number}", STAR)] if best else []))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small", frameon=False)
    fig.suptitle(f"{spec.metric} against each searched parameter")
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # the legend below the panels never covers a point
    return fig


def importances_figure(importances: dict[str, float], n_complete: int):
    """Which parameters mattered? fANOVA importances, with the number of trials they rest on."""
    if not importances:
        raise NotDrawable("no importances")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(SIZE[0], max(2.2, 0.6 * len(importances) + 1.4)))
    names = sorted(importances, key=importances.get)
    color = COMPLETE if n_complete >= IMPORTANCE_MIN_TRIALS else "tab:gray"
    ax.barh(names, [importances[n] for n in names], color=color)
    for i, n in enumerate(names):
        ax.text(importances[n], i, f" {importances[n]:.2f}", va="center", fontsize="small")
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("share of the variance of the metric (fANOVA)")
    title = f"Parameter importances, from {n_complete} complete trials"
    if n_complete < IMPORTANCE_MIN_TRIALS:
        title += f"\n(fewer than {IMPORTANCE_MIN_TRIALS}: a hint, not a ranking)"
    ax.set_title(title)
    fig.tight_layout()
    return fig


def pareto_front(points: Sequence[tuple[float, float, Any]], maximize: bool = True) -> list[tuple[float, float, Any]]:
    """The points (seconds, score, key) no other point beats on both: less or equal time and a better score."""
    front: list[tuple[float, float, Any]] = []
    for p in sorted(points, key=lambda p: (p[0], -p[1] if maximize else p[1])):
        if not front or (p[1] > front[-1][1] if maximize else p[1] < front[-1][1]):
            front.append(p)
    return front


def cost_figure(trials: Sequence[FrozenTrial], spec: StudySpec):
    """What does each extra minute of training buy? Score against wall-clock seconds per trial, Pareto front marked."""
    done = [t for t in finished(trials) if trial_seconds(t) is not None]
    if not done:
        raise NotDrawable("no finished trial recorded its epoch times")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    devices = {("CPU" if t.user_attrs.get("device", "cpu") == "cpu" else "GPU") for t in done}
    on = f" on {next(iter(devices))}" if len(devices) == 1 else ""
    for state, style, label in ((TrialState.COMPLETE, DOT, "complete"), (TrialState.PRUNED, CROSS, "pruned")):
        chosen = [t for t in done if t.state == state]
        ax.plot([trial_seconds(t) for t in chosen], [score(t) for t in chosen], **style, alpha=0.85, label=label)
    # the front over complete trials: a pruned trial's model is not kept, so its point is context, not a choice
    front = pareto_front([(trial_seconds(t), score(t), t.number) for t in done if t.state == TrialState.COMPLETE],
                         spec.direction == "maximize")
    xs, ys = [p[0] for p in front], [p[1] for p in front]
    ax.step(xs, ys, where="post", color=BEST, linewidth=1.5, label="Pareto front (complete trials)")
    ax.plot(xs, ys, linestyle="none", marker="o", markersize=11, markerfacecolor="none", markeredgecolor=BEST,
            markeredgewidth=1.5)
    for x, y, number in front:
        ax.annotate(f"#{number}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize="small", color=BEST)
    # what trial_seconds sums: each epoch's wall-clock seconds, not processor time summed over cores
    ax.set_xlabel(f"wall-clock seconds per trial{on} (sum of its epochs: training and dev evaluation)")
    ax.set_ylabel(_metric_label(spec))
    ax.set_title(f"What does more training time buy? {spec.metric} against wall-clock seconds per trial")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_xlim(0, max(trial_seconds(t) for t in done) * 1.12)  # room for the last front label
    ax.margins(y=0.12)
    return fig


def save(fig, path) -> None:
    """PNG at 100 dpi; the figure is closed."""
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)

