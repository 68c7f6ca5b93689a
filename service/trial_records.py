"""What a finished trial leaves for optuna-dashboard: a note with its per-epoch dev scores, and artifacts.

The worker calls record_trial for every complete or pruned trial just before `study.tell`: Optuna
attaches artifacts to running trials only. The note is optuna-dashboard's (kept in the study's system
attrs); the artifacts (metrics.json and the dev prediction CSVs) go to Optuna's artifact store,
storage.artifact_store(), a folder. With workers on several nodes that folder must be shared by all of
them and by the dashboard (set MTBERT_ARTIFACT_DIR to a shared file system), or the dashboard cannot
open the artifacts of trials that ran elsewhere.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from mtbert.tasks import SCORE_NAMES, SCORES, TASK_TABLE
from service.markdown import markdown_table, number

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

logger = logging.getLogger(__name__)

NOTE_COLUMNS = {"epoch": "epoch", **SCORE_NAMES, "seconds": "seconds"}
_warned_no_dashboard = False


def record_trial(study: optuna.Study, trial: optuna.Trial, dev_data: dict[str, Any] | None,
                 artifact_store: "ArtifactStore", state: TrialState, value: float | None = None,
                 predictions: dict[str, Any] | None = None) -> None:
    """Save the dashboard note of `trial` (still running, about to be told `state`) and upload its artifacts.

    dev_data: the worker's tokenised dev splits (mtbert TaskData per task, capped by max_examples);
    predictions: the trainer's dev predictions of the trial's last trained epoch (EpochResult.predictions),
    written as CS224N CSVs; without either (e.g. a retry pruned on a replayed epoch), no CSVs.
    """
    metric = (study.metric_names or ["value"])[0]
    save_trial_note(trial, trial_note(trial, state, value, dev_data, metric))
    with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-") as tmp:
        folder = Path(tmp)
        files = [write_metrics_json(folder / "metrics.json", trial, state, value, dev_data)]
        if dev_data is not None and predictions is not None:
            files += write_dev_predictions(dev_data, predictions, folder)
        else:
            logger.info("trial %d: no dev predictions of a trained epoch, no prediction CSVs", trial.number)
        for path in files:
            upload_artifact(artifact_store=artifact_store, file_path=str(path), study_or_trial=trial)
    logger.info("trial %d: note and %d artifact(s) recorded", trial.number, len(files))


# ------------------------------------------------------------ note


def trial_note(trial: optuna.Trial, state: TrialState, value: float | None, dev_data: dict[str, Any] | None,
               metric: str = "value") -> str:
    """Markdown: a headline, the per-epoch table of user attr `history`, and what the dev scores cover."""
    history = trial.user_attrs.get("history", [])
    epochs = trial.user_attrs.get("config", {}).get("epochs")
    of = f" of {epochs}" if epochs else ""
    if state == TrialState.PRUNED:
        headline = f"**Trial {trial.number}: pruned after epoch {len(history)}{of}**"
    else:
        headline = f"**Trial {trial.number}: complete, {len(history)}{of} epochs**"
    if value is not None:
        headline += f" ({metric} {value:.4f})"
    rows = [[str(h.get("epoch", ""))] + [number(h.get(k)) for k in SCORES] + [number(h.get("seconds"), ".1f")]
            for h in history]
    lines = [headline, "", markdown_table(list(NOTE_COLUMNS.values()), rows), "", dev_scope(trial, dev_data)]
    return "\n".join(lines) + "\n"


def dev_scope(trial: optuna.Trial, dev_data: dict[str, Any] | None) -> str:
    """One sentence on which dev examples the scores are computed on."""
    cap = trial.user_attrs.get("config", {}).get("max_examples", 0)
    sizes = ", ".join(f"{TASK_TABLE[t].display if t in TASK_TABLE else t} {len(d)}" for t, d in (dev_data or {}).items())
    sizes = f" ({sizes} examples)" if sizes else ""
    if cap:
        return (f"Dev scores on a fixed subset of at most {cap} dev examples per task (max_examples = {cap})"
                f"{sizes}, not the full dev sets.")
    return f"Dev scores on the full dev sets{sizes}."


def save_trial_note(trial: optuna.Trial, body: str) -> None:
    """optuna_dashboard.save_note; without the package (e.g. a bare GPU node) warn once and skip."""
    global _warned_no_dashboard
    try:
        from optuna_dashboard import save_note
    except ImportError:
        if not _warned_no_dashboard:
            logger.warning("optuna_dashboard is not installed: trials get no dashboard notes")
            _warned_no_dashboard = True
        return
    save_note(trial, body)


# ------------------------------------------------------------ artifacts


def write_metrics_json(path: Path, trial: optuna.Trial, state: TrialState, value: float | None,
                       dev_data: dict[str, Any] | None) -> Path:
    attrs = trial.user_attrs
    payload = {
        "trial": trial.number,
        "state": state.name,
        "value": value,
        "params": trial.params,
        "final": {k: attrs[k] for k in SCORES if k in attrs},
        "history": attrs.get("history", []),
        "dev_examples": {t: len(d) for t, d in (dev_data or {}).items()},
        "device": attrs.get("device"),
        "config": attrs.get("config"),
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def write_dev_predictions(dev_data: dict[str, Any], predictions: dict[str, Any], out_dir: Path) -> list[Path]:
    """CS224N-format dev prediction CSVs (ids from the tokenised dev splits, values from the trainer)."""
    from mtbert.evaluate import write_predictions
    from mtbert.tasks import TASK_TABLE

    paths = []
    for task, data in dev_data.items():
        path = out_dir / f"{TASK_TABLE[task].output_stem}-dev-output.csv"
        write_predictions(path, task, data.ids, predictions[task])
        paths.append(path)
    return paths
