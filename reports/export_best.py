"""The study's best model: its checkpoint and CS224N-format predictions, in one folder.

    python search.py --study lr_dropout --export-best DIR

DIR/checkpoint/     a copy of the best complete trial's run folder (loads with mtbert.checkpoint.load_model)
DIR/predictions/    sst/para/sts-dev-output.csv and -test-output.csv for the data files that exist, and
                    predictions of <data dir>/holdout/*.csv (or of --predict FILE...), e.g.
                    sst/para/sts-holdout-output.csv (mtbert.evaluate.output_name)
DIR/best_trial.json trial number, value, params, and the dev metrics of the written predictions

The checkpoint is found from the study's identity (service.study.trial_dir: the checkpoint root, the
study's UUID and the trial's retry chain), never from the trial's `checkpoint` user attribute, and is
exported only if the run identity inside it names that study and trial.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import optuna

from service.ranking import best_trial
from service.study import StudyIdentityError, run_id, study_uuid, trial_dir, trial_root
from studies import StudySpec

logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """Nothing to export; the message says why."""


def export_best(study: optuna.Study, spec: StudySpec, out_dir: Path, data_dir: str | Path | None = None,
                predict: list[Path] | None = None) -> Path:
    """Copy the best complete trial's checkpoint to out_dir and write its dev/test-student predictions,
    and predictions of `predict` (default: every .csv in <data dir>/holdout/, when that folder exists).

    data_dir: default the trial's config data_dir, else $MTBERT_DATA_DIR, else ./data. The predictions
    cover the full data files (the search itself may have scored a max_examples-capped dev set).
    """
    from mtbert.checkpoint import CheckpointUnreadable, checkpoint_identity, load_model
    from mtbert.config import resolve_data_dir
    from mtbert.data import DataError
    from mtbert.evaluate import predict_files, predict_unlabelled
    from mtbert.config import resolve_device

    best = best_trial(study, spec)
    if best is None:
        raise ExportError(f"study {study.study_name} has no complete trial to export")
    try:
        recorded = study_uuid(study, create=False)
    except StudyIdentityError as exc:
        raise ExportError(str(exc)) from None
    if recorded is None:
        raise ExportError(f"study {study.study_name} has no study_uuid (it was created before checkpoints were "
                          "keyed by the study's identity), so no checkpoint can be trusted to be its own")
    root = trial_root(best)
    source = trial_dir(study, root)
    if not (source / "checkpoint.pt").is_file():
        raise ExportError(f"the checkpoint of the best trial #{best.number} is not at {source} (workers keep the "
                          f"checkpoints of the best keep_best = {spec.keep_best} complete trials, on the node that "
                          f"ran them: set MTBERT_CHECKPOINT_DIR to a shared folder, or run this on that node)")
    try:
        identity = checkpoint_identity(source)
    except CheckpointUnreadable as exc:
        raise ExportError(str(exc)) from None
    if not identity or identity.get("run_id") != run_id(study, root):
        raise ExportError(f"{source} holds the checkpoint of another run (run id "
                          f"{(identity or {}).get('run_id')!r}, expected {run_id(study, root)!r}); not exported")
    out_dir = Path(out_dir)
    shutil.copytree(source, out_dir / "checkpoint", dirs_exist_ok=True)
    logger.info("trial #%d's checkpoint copied to %s", best.number, out_dir / "checkpoint")

    device = resolve_device("auto")
    try:
        model, tokenizer, cfg = load_model(out_dir / "checkpoint", device)
    except CheckpointUnreadable as exc:
        raise ExportError(str(exc)) from None
    data = resolve_data_dir(str(data_dir) if data_dir else cfg.data_dir)
    amp = cfg.amp and device.type == "cuda"
    metrics = predict_files(model, tokenizer, data, out_dir / "predictions", cfg.max_length, cfg.eval_batch_size,
                            device, amp=amp)
    files = predict if predict is not None else sorted((data / "holdout").glob("*.csv"))
    try:
        extra = predict_unlabelled(model, tokenizer, list(files), out_dir / "predictions", cfg.max_length,
                                   cfg.eval_batch_size, device, amp=amp) if files else {}
    except DataError as exc:
        raise ExportError(str(exc)) from None
    summary = {"study": study.study_name, "trial": best.number, spec.metric: best.value, "params": best.params,
               "data_dir": str(data), "full_dev_metrics": metrics,
               "predicted": {f: Path(v["output"]).name for f, v in extra.items()}}
    (out_dir / "best_trial.json").write_text(json.dumps(summary, indent=2))
    return out_dir
