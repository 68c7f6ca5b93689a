"""Dev metrics and CS224N-format predictions; `python -m mtbert.evaluate --checkpoint DIR`."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

if __name__ == "__main__":  # answer --help and bad arguments before the torch import below (seconds)
    from mtbert.cli import evaluate_parser

    evaluate_parser().parse_args()

import numpy as np
import torch
from torch import nn

from .data import DataError, TaskData, joint_inputs, load_task, sorted_batches, task_path
from .inputs import Piece, embed_pieces, input_mode
from .methods import head_output
from .tasks import TASK_TABLE, TASKS

logger = logging.getLogger(__name__)


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if pred.std() == 0 or gold.std() == 0:
        return 0.0  # undefined; a constant predictor carries no correlation
    return float(np.corrcoef(pred, gold)[0, 1])


def summarize(scores: dict[str, float]) -> dict[str, float]:
    """Per-task scores ({task: score}) -> the task metrics, their plain mean `overall` (the source
    report's number) and `overall_normalized` (correlations mapped to [0, 1] first)."""
    tasks = [TASK_TABLE[t] for t in TASKS]
    normalized = [(scores[t.name] + 1) / 2 if t.correlation else scores[t.name] for t in tasks]
    return {**{t.metric: scores[t.name] for t in tasks},
            "overall": sum(scores[t.name] for t in tasks) / len(tasks),
            "overall_normalized": sum(normalized) / len(tasks)}


@torch.inference_mode()
def predict(model: nn.Module, data: TaskData, batch_size: int = 256, amp: bool = False,
            mode: str | None = None) -> np.ndarray:
    """Predictions in data order: class ids (SST), 0/1 (Quora) or 0-5 scores (STS)."""
    model.eval()
    device = data.columns[0].ids.device
    mode = mode or input_mode(device, packing=False)
    per_batch = max(1, batch_size // len(data.columns))
    outputs = []
    order = sorted_batches(data.max_lengths, per_batch)
    column_lengths = [c.lengths.cpu().numpy() for c in data.columns]
    pair_lengths = None if data.pair is None else data.pair.lengths.cpu().numpy()
    task = TASK_TABLE[data.task]
    for b in order:
        rows = torch.from_numpy(b).to(device)
        pieces = [Piece(c, rows, int(n[b].max()), n[b]) for c, n in zip(data.columns, column_lengths)]
        vecs = joint = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if model.uses_vectors(data.task):
                vecs = [v.float() for v in embed_pieces(model, pieces, mode)]
            if model.uses_joint(data.task):  # cross-encoding: the joint "[CLS] s1 [SEP] s2" inputs
                length = int(pair_lengths[b].max())
                joint = model.embed(*joint_inputs(data.pair, rows, length)).float()
        outputs.append(task.predict(head_output(model, task, vecs, joint)).float())
    pred = torch.cat(outputs).cpu().numpy()
    result = np.empty_like(pred)
    result[np.concatenate(order)] = pred
    return result


def score(task: str, pred: np.ndarray, labels: torch.Tensor) -> float:
    gold = labels.cpu().numpy()
    return pearson(pred, gold) if TASK_TABLE[task].correlation else accuracy(pred, gold)


def evaluate(model: nn.Module, dev: dict[str, TaskData], batch_size: int = 256, amp: bool = False,
             mode: str | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Dev metrics of all three tasks (see summarize) and the predictions they were computed from."""
    predictions = {t: predict(model, dev[t], batch_size, amp, mode) for t in TASKS}
    scores = {t: score(t, predictions[t], dev[t].labels) for t in TASKS}
    return summarize(scores), predictions


def write_predictions(path: Path, task: str, ids: list[str], pred: np.ndarray) -> None:
    """One CS224N-format prediction file ("id \\t Predicted_X" header, "id , value" rows)."""
    spec = TASK_TABLE[task]
    with open(path, "w") as f:
        f.write(f"id \t {spec.output_header} \n")
        for i, p in zip(ids, pred):
            f.write(f"{i} , {spec.format_prediction(p)} \n")


def predict_files(model: nn.Module, tokenizer, data_dir: Path, out_dir: Path, max_length: int = 128,
                  batch_size: int = 256, device: torch.device = torch.device("cpu"), amp: bool = False,
                  splits: tuple[str, ...] = ("dev", "test-student")) -> dict[str, float]:
    """Write prediction CSVs for every split file present; return the dev metrics."""
    present = [(s, t) for s in splits for t in TASKS if task_path(data_dir, t, s).is_file()]
    if not present:
        raise DataError(f"{data_dir}: none of the CS224N dev or test-student files is here")
    out_dir.mkdir(parents=True, exist_ok=True)
    scores: dict[str, float] = {}
    for split in splits:
        for task in TASKS:
            if (split, task) not in present:
                logger.warning("%s: not found, no %s predictions for it", task_path(data_dir, task, split), split)
                continue
            data = load_task(data_dir, task, split, tokenizer, max_length).to(device)
            pred = predict(model, data, batch_size, amp)
            name = f"{TASK_TABLE[task].output_stem}-{split.split('-')[0]}-output.csv"
            write_predictions(out_dir / name, task, data.ids, pred)
            if split == "dev":
                scores[task] = score(task, pred, data.labels)
    return summarize(scores) if len(scores) == len(TASKS) else scores


def main(argv: list[str] | None = None) -> None:
    from .checkpoint import CheckpointUnreadable, load_model
    from .config import resolve_data_dir, resolve_device

    from .cli import evaluate_parser

    parser = evaluate_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "predictions"
    try:
        model, tokenizer, cfg = load_model(Path(args.checkpoint), device)
        metrics = predict_files(model, tokenizer, resolve_data_dir(args.data_dir), out, cfg.max_length,
                                args.batch_size, device, amp=device.type == "cuda")
    except (FileNotFoundError, DataError, CheckpointUnreadable) as exc:
        logger.error("%s", exc)
        sys.exit(1)
    logger.info("predictions written to %s", out)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
