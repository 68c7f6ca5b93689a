"""Dev metrics and CS224N-format predictions.

    python -m mtbert.evaluate --checkpoint DIR                  # dev metrics; dev + test-student CSVs
    python -m mtbert.evaluate --checkpoint DIR --predict FILE... --out OUT   # any CS224N-format files
"""
from __future__ import annotations

import csv
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

from .data import (DataError, RawTask, TaskData, joint_inputs, load_task, read_task, sorted_batches, task_path,
                   tokenize_task)
from .inputs import Piece, embed_pieces, input_mode
from .methods import head_output
from .static_step import bucket
from .tasks import TASK_TABLE, TASKS, task_of_file

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
            mode: str | None = None, widths: tuple[int, ...] | None = None) -> np.ndarray:
    """Predictions in data order: class ids (SST), 0/1 (Quora) or 0-5 scores (STS).

    Batches hold examples of similar length. With `widths` (the static step's) every forward has
    the same number of rows (the last batch is padded with copies of a row, whose outputs are
    dropped) and a width from `widths`, all columns in one forward: at most len(widths) shapes.
    """
    model.eval()
    device = data.columns[0].ids.device
    mode = mode or input_mode(device, packing=False)
    per_batch = max(1, batch_size // len(data.columns))
    order = sorted_batches(data.max_lengths, per_batch)
    column_lengths = [c.lengths.cpu().numpy() for c in data.columns]
    pair_lengths = None if data.pair is None else data.pair.lengths.cpu().numpy()
    # with widths, every batch padded to per_batch rows with copies of its first row
    batches = [np.concatenate([b, np.full(per_batch - len(b), b[0])]) for b in order] if widths else order
    staged = torch.from_numpy(np.concatenate(batches)).to(device)  # every batch's rows in one copy
    task = TASK_TABLE[data.task]
    outputs, start = [], 0
    for b, padded_b in zip(order, batches):
        rows = staged[start:start + len(padded_b)]
        start += len(padded_b)
        vecs = joint = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if model.uses_vectors(data.task):
                longest = max(int(lengths[b].max()) for lengths in column_lengths)
                width = bucket(longest, widths) if widths else None
                pieces = [Piece(c, rows, width or int(lengths[b].max()), lengths[padded_b])
                          for c, lengths in zip(data.columns, column_lengths)]
                vecs = [v.float() for v in embed_pieces(model, pieces, "fused" if widths else mode)]
            if model.uses_joint(data.task):  # cross-encoding: the joint "[CLS] s1 [SEP] s2" inputs
                length = int(pair_lengths[b].max())
                joint = model.embed(*joint_inputs(data.pair, rows, length)).float()
        outputs.append(task.predict(head_output(model, task, vecs, joint)).float()[:len(b)])
    pred = torch.cat(outputs).cpu().numpy()
    result = np.empty_like(pred)
    result[np.concatenate(order)] = pred
    return result


def score(task: str, pred: np.ndarray, labels: torch.Tensor) -> float:
    gold = labels.cpu().numpy()
    return pearson(pred, gold) if TASK_TABLE[task].correlation else accuracy(pred, gold)


def evaluate(model: nn.Module, dev: dict[str, TaskData], batch_size: int = 256, amp: bool = False,
             mode: str | None = None, widths: tuple[int, ...] | None = None
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Dev metrics of all three tasks (see summarize) and the predictions they were computed from."""
    predictions = {t: predict(model, dev[t], batch_size, amp, mode, widths) for t in TASKS}
    scores = {t: score(t, predictions[t], dev[t].labels) for t in TASKS}
    return summarize(scores), predictions


def write_predictions(path: Path, task: str, ids: list[str], pred: np.ndarray) -> None:
    """One CS224N-format prediction file ("id \\t Predicted_X" header, "id , value" rows)."""
    spec = TASK_TABLE[task]
    with open(path, "w") as f:
        f.write(f"id \t {spec.output_header} \n")
        for i, p in zip(ids, pred):
            f.write(f"{i} , {spec.format_prediction(p)} \n")


def output_name(task: str, file_name: str) -> str:
    """The CS224N prediction file name for a data file of `task`.

    A name in the task's own pattern keeps its split, less a trailing "-student":
    ids-sst-test-student.csv -> sst-test-output.csv, quora-holdout-student.csv ->
    para-holdout-output.csv, sts-dev.csv -> sts-dev-output.csv. Any other name keeps its stem:
    my-pairs.csv (STS) -> sts-my-pairs-output.csv.
    """
    spec = TASK_TABLE[task]
    prefix, suffix = spec.file.split("{split}")
    name = Path(file_name).name
    if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
        tag = name[len(prefix):len(name) - len(suffix)]
    else:
        tag = Path(name).stem
    return f"{spec.output_stem}-{tag.removesuffix('-student')}-output.csv"


def file_task(path: Path) -> str:
    """The task of a CS224N-format file, from its header and name (tasks.task_of_file); DataError if none."""
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a file (name the files: {path}/*.csv)")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:  # the header line only; a BOM is dropped, and a stray byte becomes a non-matching character
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            header = next(csv.reader([f.readline()], delimiter="\t"), [])
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return task_of_file(path.name, [c.strip() for c in header])
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None


def read_unlabelled(paths: list[Path]) -> list[tuple[Path, str, str, RawTask]]:
    """Read every file to predict, checking all of them before anything is written: (path, task, output
    name, rows) each. DataError for a file that fits no task or has no usable row, a folder, or two files
    that would write the same output."""
    paths = [Path(p) for p in paths]
    tasks = [file_task(p) for p in paths]
    names = [output_name(t, p.name) for t, p in zip(tasks, paths)]
    for name in set(names):
        clash = [str(p) for p, n in zip(paths, names) if n == name]
        if len(clash) > 1:
            raise DataError(f"{' and '.join(clash)} would both be written to {name}; rename one")
    files = []
    for path, task, name in zip(paths, tasks, names):
        raw = read_task(path, task, labelled=False)
        if not raw.ids:
            raise DataError(f"{path}: no usable rows")
        files.append((path, task, name, raw))
    return files


def predict_unlabelled(model: nn.Module, tokenizer, files: list[tuple[Path, str, str, RawTask]], out_dir: Path,
                       max_length: int = 128, batch_size: int = 256, device: torch.device = torch.device("cpu"),
                       amp: bool = False) -> dict[str, dict]:
    """Predict the files read_unlabelled read (any CS224N-format file, labelled or not; its task from its
    columns and name) into out_dir/<output name>. Returns {file: {"task", "output", "rows", "skipped"}}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for path, task, name, raw in files:
        data = tokenize_task(raw, tokenizer, max_length).to(device)
        write_predictions(out_dir / name, task, data.ids, predict(model, data, batch_size, amp))
        written[str(path)] = {"task": task, "output": str(out_dir / name), "rows": len(raw.ids),
                              "skipped": raw.skipped}
        logger.info("%s (%s): %d predictions in %s%s", path, TASK_TABLE[task].display, len(raw.ids), out_dir / name,
                    f", {raw.skipped} malformed row(s) skipped" if raw.skipped else "")
    return written


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
            name = output_name(task, task_path(data_dir, task, split).name)
            write_predictions(out_dir / name, task, data.ids, pred)
            if split == "dev":
                scores[task] = score(task, pred, data.labels)
    return summarize(scores) if len(scores) == len(TASKS) else scores


def main(argv: list[str] | None = None) -> None:
    from .checkpoint import CheckpointUnreadable, load_model
    from .config import resolve_amp
    from .config import resolve_data_dir, resolve_device

    from .cli import evaluate_parser

    parser = evaluate_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "predictions"
    try:
        model, tokenizer, cfg = load_model(Path(args.checkpoint), device)
        amp, amp_reason = resolve_amp(cfg.amp, device)  # as the run trained and evaluated
        logger.info("compute: %s", amp_reason)
        if args.predict:
            files = read_unlabelled([Path(p) for p in args.predict])  # all checked before anything is written
            result = predict_unlabelled(model, tokenizer, files, out, cfg.max_length, args.batch_size, device,
                                        amp=amp)
        else:
            result = predict_files(model, tokenizer, resolve_data_dir(args.data_dir), out, cfg.max_length,
                                   args.batch_size, device, amp=amp)
    except (FileNotFoundError, DataError, CheckpointUnreadable) as exc:
        logger.error("%s", exc)
        sys.exit(1)
    except OSError as exc:  # --out is a file, under a file, not writable; a full disk
        logger.error("cannot write %s: %s", exc.filename or out, exc.strerror or exc)
        sys.exit(1)
    logger.info("predictions written to %s", out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
