"""The study's best model: its checkpoint and CS224N-format predictions, in one folder.

    python search.py --study lr_dropout --export-best DIR

DIR/checkpoint/     a copy of the best complete trial's run folder (loads with mtbert.checkpoint.load_model)
DIR/predictions/    sst/para/sts-dev-output.csv and -test-output.csv for the data files that exist, and
                    predictions of <data dir>/holdout/*.csv (or of --predict FILE...), e.g.
                    sst/para/sts-holdout-output.csv (mtbert.evaluate.output_name)
DIR/best_trial.json trial number, value, params, and the dev metrics of the written predictions
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import optuna

from service.ranking import best_trial
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
    from mtbert.checkpoint import load_model
    from mtbert.config import resolve_data_dir
    from mtbert.data import DataError
    from mtbert.evaluate import predict_files, predict_unlabelled
    from mtbert.config import resolve_device

    best = best_trial(study, spec)
    if best is None:
        raise ExportError(f"study {study.study_name} has no complete trial to export")
    source = Path(best.user_attrs.get("checkpoint") or "")
    if not (source / "checkpoint.pt").is_file():
        raise ExportError(f"the checkpoint of the best trial #{best.number} is not at {source} (workers keep the "
                          f"checkpoints of the best keep_best = {spec.keep_best} complete trials, on the node that "
                          f"ran them: set MTBERT_CHECKPOINT_DIR to a shared folder, or run this on that node)")
    out_dir = Path(out_dir)
    shutil.copytree(source, out_dir / "checkpoint", dirs_exist_ok=True)
    logger.info("trial #%d's checkpoint copied to %s", best.number, out_dir / "checkpoint")

    device = resolve_device("auto")
    model, tokenizer, cfg = load_model(out_dir / "checkpoint", device)
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
