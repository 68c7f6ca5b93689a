"""The study's best model: its checkpoint and CS224N-format predictions, in one folder.

    python search.py --study lr_dropout --export-best DIR

The best trial is the best seed of the best confirmed configuration when the study has a confirmation
(search.py --confirm, service.confirm), else the search's best complete trial; best_trial.json says which.

DIR/checkpoint/     a copy of the best trial's run folder (loads with mtbert.checkpoint.load_model)
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
import tempfile
from pathlib import Path

import optuna

from reports.confirmation import export_choice
from service.confirm import ConfirmError
from service.study import StudyIdentityError, run_id, study_uuid, trial_dir, trial_root
from studies import StudySpec

logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """Nothing to export; the message says why."""


def export_best(study: optuna.Study, spec: StudySpec, out_dir: Path, data_dir: str | Path | None = None,
                predict: list[Path] | None = None) -> Path:
    """Copy the best trial's checkpoint to out_dir (see the module docstring for which) and write its
    dev/test-student predictions, and predictions of `predict` (default: every .csv in <data dir>/holdout/,
    when that folder exists).

    data_dir: default the trial's config data_dir, else $MTBERT_DATA_DIR, else ./data. The predictions
    cover the full data files (the search itself may have scored a max_examples-capped dev set).
    """
    from mtbert.checkpoint import CheckpointUnreadable, checkpoint_identity, load_model
    from mtbert.config import resolve_data_dir
    from mtbert.data import DataError
    from mtbert.evaluate import predict_files, predict_unlabelled, read_unlabelled
    from mtbert.config import resolve_device

    try:
        owner, best, chosen, facts = export_choice(study, spec)  # owner: the study or its confirmation
    except ConfirmError as exc:
        raise ExportError(str(exc)) from None
    if best is None:
        raise ExportError(f"study {study.study_name} has no complete trial to export")
    try:
        recorded = study_uuid(owner, create=False)
    except StudyIdentityError as exc:
        raise ExportError(str(exc)) from None
    if recorded is None:
        raise ExportError(f"study {owner.study_name} has no study_uuid (it was created before checkpoints were "
                          "keyed by the study's identity), so no checkpoint can be trusted to be its own")
    root = trial_root(best)
    source = trial_dir(owner, root)
    if not (source / "checkpoint.pt").is_file():
        kept = ("the best seed of each confirmed configuration" if "confirmed" in facts
                else f"the best keep_best = {spec.keep_best} complete trials")
        of = f" of {owner.study_name}" if owner is not study else ""
        raise ExportError(f"the checkpoint of the best trial #{best.number}{of} is not at {source} (workers keep the "
                          f"checkpoints of {kept}, on the node that ran them: set MTBERT_CHECKPOINT_DIR to a shared "
                          f"folder, or run this on that node)")
    try:
        identity = checkpoint_identity(source)
    except CheckpointUnreadable as exc:
        raise ExportError(str(exc)) from None
    if not identity or identity.get("run_id") != run_id(owner, root):
        raise ExportError(f"{source} holds the checkpoint of another run (run id "
                          f"{(identity or {}).get('run_id')!r}, expected {run_id(owner, root)!r}); not exported")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # a file or an unwritable place fails here, before any work
    device = resolve_device("auto")
    try:
        model, tokenizer, cfg = load_model(source, device)
    except CheckpointUnreadable as exc:
        raise ExportError(str(exc)) from None
    data = resolve_data_dir(str(data_dir) if data_dir else cfg.data_dir)
    files = list(predict) if predict is not None else sorted((data / "holdout").glob("*.csv"))
    try:
        unlabelled = read_unlabelled(files)  # every file to predict is checked before anything is written
    except DataError as exc:
        raise ExportError(str(exc)) from None

    # everything is written to a staging folder beside DIR, then moved into DIR entry by entry: a failure
    # leaves DIR as it was, never a checkpoint of one trial beside the predictions of another
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        shutil.copytree(source, stage / "checkpoint")
        from mtbert.config import resolve_amp

        amp = resolve_amp(cfg.amp, device)[0]  # as the trial trained and evaluated
        try:
            metrics = predict_files(model, tokenizer, data, stage / "predictions", cfg.max_length,
                                    cfg.eval_batch_size, device, amp=amp)
            extra = predict_unlabelled(model, tokenizer, unlabelled, stage / "predictions", cfg.max_length,
                                       cfg.eval_batch_size, device, amp=amp)
        except DataError as exc:
            raise ExportError(str(exc)) from None
        summary = {"study": study.study_name, "trial": best.number, spec.metric: best.value, "params": best.params,
                   **facts, "chosen": chosen, "data_dir": str(data), "full_dev_metrics": metrics,
                   "predicted": {f: Path(v["output"]).name for f, v in extra.items()}}
        (stage / "best_trial.json").write_text(json.dumps(summary, indent=2))
        for entry in ("checkpoint", "predictions", "best_trial.json"):
            target = out_dir / entry
            if target.exists() or target.is_symlink():
                target.rename(stage / f"replaced-{entry}")  # a previous export's: removed with the stage
            (stage / entry).rename(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    logger.info("exported %s to %s", chosen, out_dir)
    return out_dir
