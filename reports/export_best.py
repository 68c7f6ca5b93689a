"""The study's best model: its checkpoint and CS224N-format predictions, in one folder.

    python search.py --study lr_dropout --export-best DIR

The best trial is the best seed of the best confirmed configuration when the study has a confirmation
(search.py --confirm, service.confirm), else the search's best complete trial; best_trial.json says which.

DIR/checkpoint/     a copy of the best trial's run folder (loads with mtbert.checkpoint.load_model)
DIR/predictions/    sst/para/sts-dev-output.csv and -test-output.csv for the data files that exist
DIR/best_trial.json trial number, value, params, and the dev metrics of the written predictions
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import optuna

from service.confirm import export_choice
from studies import StudySpec

logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """Nothing to export; the message says why."""


def export_best(study: optuna.Study, spec: StudySpec, out_dir: Path, data_dir: str | Path | None = None) -> Path:
    """Copy the best trial's checkpoint to out_dir (see the module docstring for which) and write its
    dev/test-student predictions.

    data_dir: default the trial's config data_dir, else $MTBERT_DATA_DIR, else ./data. The predictions
    cover the full data files (the search itself may have scored a max_examples-capped dev set).
    """
    from mtbert.checkpoint import load_model
    from mtbert.config import resolve_data_dir
    from mtbert.evaluate import predict_files
    from mtbert.config import resolve_device

    best, chosen, facts = export_choice(study, spec)
    if best is None:
        raise ExportError(f"study {study.study_name} has no complete trial to export")
    source = Path(best.user_attrs.get("checkpoint") or "")
    if not (source / "checkpoint.pt").is_file():
        kept = ("the best seed of each confirmed configuration" if "confirmed" in facts
                else f"the best keep_best = {spec.keep_best} complete trials")
        of = f" of {facts['study']}" if "confirmed" in facts else ""
        raise ExportError(f"the checkpoint of the best trial #{best.number}{of} is not at {source} (workers keep the "
                          f"checkpoints of {kept}, on the node that ran them: set MTBERT_CHECKPOINT_DIR to a shared "
                          f"folder, or run this on that node)")
    out_dir = Path(out_dir)
    shutil.copytree(source, out_dir / "checkpoint", dirs_exist_ok=True)
    logger.info("exporting %s: checkpoint copied to %s", chosen, out_dir / "checkpoint")

    device = resolve_device("auto")
    model, tokenizer, cfg = load_model(out_dir / "checkpoint", device)
    data = resolve_data_dir(str(data_dir) if data_dir else cfg.data_dir)
    metrics = predict_files(model, tokenizer, data, out_dir / "predictions", cfg.max_length, cfg.eval_batch_size,
                            device, amp=cfg.amp and device.type == "cuda")
    summary = {"study": study.study_name, "trial": best.number, spec.metric: best.value, "params": best.params,
               **facts, "chosen": chosen, "data_dir": str(data), "full_dev_metrics": metrics}
    (out_dir / "best_trial.json").write_text(json.dumps(summary, indent=2))
    return out_dir
