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
from reports.confirmation import report_markdown as confirmation_section
from reports.costs import epochs_section, time_section
from service.progress import planned_epochs
from service.study import recorded_spec, study_budget, study_option, trial_config
from service.ranking import best_trial, leaderboard, tally_text
from service.markdown import markdown_table, number
from studies import StudySpec

logger = logging.getLogger(__name__)

PLOTS = {  # file stem: (title, the question it answers, reports.plots function)
    "history": ("Optimisation history", "Does the search improve? Each trial's score in the order they ran; "
                "pruned trials at their last epoch's score.", "history_figure"),
    "learning_curves": ("Learning curves", "When were trials stopped, and were the stopped ones behind? "
                        "The score after every epoch.", "learning_curves_figure"),
    "task_curves": ("Per-task curves of the best trials", "Which task do the best trials learn, and when?",
                    "task_curves_figure"),
    "params": ("Score against each parameter", "Which values of each searched parameter score well? "
               "A log axis for log-scaled parameters.", "params_figure"),
    "cost": ("Score against compute per trial", "What does each extra minute of training buy? Each trial's "
             "score against the device-seconds its epochs took; the Pareto front joins the complete trials that "
             "no other complete trial beats in less time.", "cost_figure"),
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
        best_section(recorded_spec(study, spec), best),
        confirmation_section(study),
        pruning_section(spec, trials),
        epochs_section(spec, trials),
        time_section(trials),
        top_trials_section(study, spec),
        plots_section(study, trials, spec, out_dir),
    ]
    path = out_dir / "report.md"
    path.write_text("\n\n".join(s for s in sections if s) + "\n")
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
        f"- trials: {finished} finished of a budget of {study_budget(study, spec)}: "
        f"{tally_text(trials, prose=True)}",
        f"- browse every trial: `python search.py {study_option(spec)} --dashboard`",
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
        train_command(reproduce_config(spec, best), f"runs/{spec.name}-trial{best.number}"),
        "```",
    ]
    if not reproduce_config(spec, best).get("data_dir"):
        lines.append("\n(The trial did not record its data folder: add `--data-dir` with the folder it trained on.)")
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


def plots_section(study: optuna.Study, trials: list[FrozenTrial], spec: StudySpec, out_dir: Path) -> str:
    from reports import plots

    if not any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials):
        return "## Plots\n\nSkipped: no finished trial yet."
    lines = ["## Plots", "", "Blue dots: complete trials; orange crosses: pruned trials (at their last epoch's "
             "score); red: the best trial."]
    for stem, (title, question, function) in PLOTS.items():
        lines += ["", f"### {title}", "", question, ""]
        lines.append(draw(lambda f=function: getattr(plots, f)(trials, spec), out_dir / f"{stem}.png", title))
    lines += ["", "### Parameter importances", ""]
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    reason = importance_problem(trials)
    if reason is None:
        lines.append(f"Which parameters mattered? fANOVA's share of the score's variance, from {complete} complete "
                     "trials.")
        if complete < plots.IMPORTANCE_MIN_TRIALS:
            lines.append(f"**Caution:** {complete} complete trials are too few for importances to mean much "
                         f"(below {plots.IMPORTANCE_MIN_TRIALS}, a different seed often reorders them): read the "
                         "bars as a hint, and the parameter plot above for the points themselves.")
        lines.append("")
        lines.append(draw(lambda: plots.importances_figure(param_importances(study), complete),
                          out_dir / "importances.png", "Parameter importances"))
    else:
        lines.append(f"Skipped: {reason}.")
    return "\n".join(lines)


# ------------------------------------------------------------ helpers


def reproduce_config(spec: StudySpec, trial: FrozenTrial) -> dict[str, Any]:
    """The trial's training config rebuilt from the study's recorded spec and its params (never from its
    `config` user attr, which a dashboard can write: a command users copy must not carry an injected
    model path), with the data folder it read when that came from $MTBERT_DATA_DIR (user attr `data_dir`),
    so the command runs in a fresh shell."""
    config = trial_config(spec, trial)
    if not config.get("data_dir") and trial.user_attrs.get("data_dir"):
        config["data_dir"] = trial.user_attrs["data_dir"]
    return config


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


def param_importances(study: optuna.Study) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.importance.get_param_importances(study)


def draw(make: Callable[[], Any], path: Path, title: str) -> str:
    """Draw one figure and save it as a PNG; the markdown that shows it, or says why it is missing."""
    from reports.plots import NotDrawable, save

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save(make(), path)
    except NotDrawable as exc:
        return f"Skipped: {exc}."
    except Exception as exc:  # a plot the study's trials cannot support must not sink the report
        logger.warning("%s not drawn: %s: %s", path.name, type(exc).__name__, exc)
        import matplotlib.pyplot as plt

        plt.close("all")
        return f"Skipped: {type(exc).__name__}: {exc}".rstrip(".") + "."
    return f"![{title}]({path.name})"


def dataframe_table(df: pd.DataFrame, score_columns: set[str]) -> str:
    """Markdown table of `df`: score columns to 4 decimals, seconds to 1, other floats to 4 significant digits."""
    specs = [".4f" if c in score_columns else ".1f" if c == "seconds" else ".4g" for c in df.columns]
    rows = [[number(v, f) for v, f in zip(row, specs)] for row in df.itertuples(index=False)]
    return markdown_table([str(c) for c in df.columns], rows)
