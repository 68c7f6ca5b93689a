"""A study's report: report.md plus PNG plots, every number read from the study's storage.

    python search.py --study lr_dropout --report [--out DIR]      # default DIR: reports/lr_dropout/
"""
from __future__ import annotations

import logging
import shlex
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

import storage as storage_lib
from mtbert.tasks import SCORE_NAMES
from service.confirm import report_markdown as confirmation_section
from service.ranking import best_trial, leaderboard
from service.markdown import markdown_table, number
from studies import StudySpec

logger = logging.getLogger(__name__)

PLOTS = {  # file stem: (title, optuna.visualization.matplotlib function name)
    "optimization_history": ("Optimisation history", "plot_optimization_history"),
    "intermediate_values": ("Intermediate values (pruned trials stop early)", "plot_intermediate_values"),
    "parallel_coordinate": ("Parallel coordinates", "plot_parallel_coordinate"),
    "param_importances": ("Parameter importances", "plot_param_importances"),
}
TOP = 10


def write_report(study: optuna.Study, spec: StudySpec, out_dir: Path, storage_url: str) -> Path:
    """Write out_dir/report.md and its PNGs; return the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study, spec)
    sections = [
        header(study, spec, trials, storage_url),
        best_section(spec, best),
        confirmation_section(study),
        pruning_section(spec, trials),
        top_trials_section(study, spec),
        plots_section(study, trials, out_dir),
    ]
    path = out_dir / "report.md"
    path.write_text("\n\n".join(s for s in sections if s) + "\n")
    logger.info("report written to %s", path)
    return path


# ------------------------------------------------------------ sections


def header(study: optuna.Study, spec: StudySpec, trials: list[FrozenTrial], storage_url: str) -> str:
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    finished = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
    lines = [
        f"# Study `{study.study_name}`",
        "",
        *([spec.description, ""] if spec.description else []),
        f"- storage: `{storage_lib.redact(storage_url)}`",
        f"- objective: {spec.direction} `{spec.metric}` on dev",
        f"- trials: {finished} finished of a budget of {recorded_budget(study, spec)}: "
        f"{count[TrialState.COMPLETE]} complete, {count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed, "
        f"{count[TrialState.RUNNING]} running",
        f"- browse every trial: `python search.py --study {spec.name} --dashboard`",
    ]
    return "\n".join(lines)


def best_section(spec: StudySpec, best: FrozenTrial | None) -> str:
    if best is None:
        return "## Best trial\n\nNo complete trial yet."
    attrs = best.user_attrs
    epochs = len(best.intermediate_values)
    lines = [
        "## Best trial",
        "",
        f"Trial **#{best.number}**: {spec.metric} **{best.value:.4f}** after {epochs} epoch(s)"
        + (f" on {attrs['device']}" if attrs.get("device") else "") + ".",
        "",
        markdown_table(["dev score", "value"], [[name, number(attrs.get(key))] for key, name in SCORE_NAMES.items()]),
        "",
        markdown_table(["param", "value"], [[name, repr(value)] for name, value in best.params.items()]),
        "",
        "Reproduce it:",
        "",
        "```bash",
        train_command(attrs.get("config") or best.params, f"runs/{spec.name}-trial{best.number}"),
        "```",
    ]
    return "\n".join(lines)


def pruning_section(spec: StudySpec, trials: list[FrozenTrial]) -> str:
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    saved = sum(planned_epochs(t, spec) - len(t.intermediate_values) for t in pruned)
    total = sum(planned_epochs(t, spec) for t in finished)
    share = f"{100 * saved / total:.1f}%" if total else "0%"
    lines = [
        "## Pruning",
        "",
        f"Pruned trials: **{len(pruned)}** of {len(finished)} finished. Compute saved: **{saved} epoch(s)**, "
        f"{share} of the {total} epochs these trials would have trained without pruning.",
    ]
    if pruned:
        rows = [[f"#{t.number}", f"{len(t.intermediate_values)} of {planned_epochs(t, spec)}",
                 number(t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)]
                for t in pruned]
        lines += ["", markdown_table(["pruned trial", "epochs trained", f"last {spec.metric}"], rows)]
    return "\n".join(lines)


def top_trials_section(study: optuna.Study, spec: StudySpec, top: int = TOP) -> str:
    df = leaderboard(study, spec)
    if not df.empty:
        df = df[df["state"] == TrialState.COMPLETE.name]
    if df.empty:
        return "## Top trials\n\nNo complete trial yet."
    columns = ["number", spec.metric, *[k for k in SCORE_NAMES if k != spec.metric], *sorted(spec.space),
               "epochs_done", "duration"]
    df = df[[c for c in dict.fromkeys(columns) if c in df.columns]].head(top)
    names = {**SCORE_NAMES, "number": "trial", "epochs_done": "epochs", "duration": "seconds"}
    return f"## Top trials\n\nThe {len(df)} best complete trials, dev scores of their last epoch.\n\n" \
           + dataframe_table(df.rename(columns=names), {*SCORE_NAMES.values(), spec.metric})


def plots_section(study: optuna.Study, trials: list[FrozenTrial], out_dir: Path) -> str:
    lines = ["## Plots"]
    if not any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials):
        return "## Plots\n\nSkipped: no finished trial yet."
    for stem, (title, function) in PLOTS.items():
        lines += ["", f"### {title}", ""]
        reason = importance_problem(trials) if stem == "param_importances" else None
        if reason is None:
            reason = save_plot(lambda f=function: getattr(plots_module(), f)(study), out_dir / f"{stem}.png")
        lines.append(f"Skipped: {reason}." if reason else f"![{title}]({stem}.png)")
    return "\n".join(lines)


# ------------------------------------------------------------ helpers


def recorded_budget(study: optuna.Study, spec: StudySpec) -> int:
    """The trial budget recorded on the study: its latest --n-trials override, else its spec's."""
    attrs = study.user_attrs
    given = [attrs[k]["n_trials"] for k in sorted(attrs)
             if k.startswith("overrides ") and isinstance(attrs[k], dict) and "n_trials" in attrs[k]]
    return given[-1] if given else (attrs.get("spec") or {}).get("n_trials", spec.n_trials)


def planned_epochs(trial: FrozenTrial, spec: StudySpec) -> int:
    """Epochs the trial was set to train: its recorded config, else the study's."""
    return int((trial.user_attrs.get("config") or {}).get("epochs") or spec.epochs)


def train_command(config: dict[str, Any], out: str) -> str:
    """`python -m mtbert.train` with the flags of every value that differs from TrainConfig's defaults."""
    from mtbert.config import TrainConfig

    defaults = TrainConfig().to_dict()
    args = ["python", "-m", "mtbert.train"]
    for name, value in config.items():
        if name not in defaults or value == defaults[name]:
            continue
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", shlex.quote(str(value))]
    return " ".join(args + ["--out", shlex.quote(out)])


def importance_problem(trials: list[FrozenTrial]) -> str | None:
    """Why parameter importances cannot be computed, or None."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return f"parameter importances need at least 2 complete trials, the study has {len(complete)}"
    varied = {name for name in {n for t in complete for n in t.params}
              if len({repr(t.params.get(name)) for t in complete}) > 1}
    if not varied:
        return "parameter importances need a parameter that takes more than one value among the complete trials"
    return None


def plots_module():
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    return plots


def save_plot(draw: Callable[[], Any], path: Path) -> str | None:
    """Draw one optuna matplotlib plot and save it as a PNG; return why it failed, or None."""
    import matplotlib.pyplot as plt
    import numpy as np

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = draw()
        figure = np.ravel(axes)[0].figure
        figure.set_size_inches(8, 5)
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
    except Exception as exc:  # a plot the study's trials cannot support must not sink the report
        logger.warning("%s not drawn: %s: %s", path.name, type(exc).__name__, exc)
        plt.close("all")
        return f"{type(exc).__name__}: {exc}".rstrip(".")
    return None


def dataframe_table(df: pd.DataFrame, score_columns: set[str]) -> str:
    """Markdown table of `df`: score columns to 4 decimals, seconds to 1, other floats to 4 significant digits."""
    specs = [".4f" if c in score_columns else ".1f" if c == "seconds" else ".4g" for c in df.columns]
    rows = [[number(v, f) for v, f in zip(row, specs)] for row in df.itertuples(index=False)]
    return markdown_table([str(c) for c in df.columns], rows)
