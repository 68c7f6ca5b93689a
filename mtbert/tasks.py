"""The three tasks in one table: files, columns, labels, head, loss, metric and output format.

Everything that differs between SST, Quora and STS is a field of `Task` (the way HF's run_glue.py
keeps `task_to_keys`); the data loader, the trainer, the evaluator and the reports read this table
instead of branching on task names. This module imports no torch at import time, so reports and
CLIs can use the names without paying for it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _sst_outputs(model, vecs):
    return model.sentiment_logits(vecs[0])


def _para_outputs(model, vecs):
    return model.paraphrase_logit(vecs[0], vecs[1])


def _sts_outputs(model, vecs):
    return model.similarity_score(vecs[0], vecs[1])


def _argmax(out):
    return out.argmax(-1)


def _positive(out):
    return (out > 0).long()


def _clamp_0_5(out):
    return out.clamp(0.0, 5.0)


def _cross_entropy(out, y):
    import torch.nn.functional as F

    return F.cross_entropy(out.float(), y)


def _bce(out, y):
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(out.float(), y.float())


def _mse(out, y):
    import torch.nn.functional as F

    return F.mse_loss(out.float(), y.float())


@dataclass(frozen=True)
class Task:
    """One task of the multitask model (see the module docstring)."""

    name: str  # key everywhere: "sst", "quora", "sts"
    display: str  # for people: "SST"
    file: str  # CS224N file name pattern, {split} in train, dev, test-student
    sentence_columns: tuple[str, ...]  # one column: a sentence task; two: a pair task
    label_column: str
    label_low: float
    label_high: float
    integer_labels: bool  # classes (int64 labels) or a score (float32 labels)
    metric: str  # dev metric key: "sst_acc"
    metric_display: str  # "SST acc"
    report_key: str  # the source report's column: "sst", "para", "sts"
    output_stem: str  # CS224N prediction file stem: sst-dev-output.csv, para-..., sts-...
    output_header: str  # that file's header column
    outputs: Callable[[Any, list], Any]  # (model, sentence vectors per column) -> head output
    loss: Callable[[Any, Any], Any]  # (head output, labels) -> scalar loss
    predict: Callable[[Any], Any]  # head output -> class id, 0/1 or a 0-5 score
    correlation: bool  # metric: Pearson r (True) or accuracy (False)

    @property
    def pair(self) -> bool:
        return len(self.sentence_columns) == 2

    def file_name(self, split: str) -> str:
        return self.file.format(split=split)

    def parse_label(self, text: str) -> float | None:
        """The label of one row, or None when it is not a number in range (an integer for classes)."""
        try:
            value = float(text)
        except ValueError:
            return None
        if not self.label_low <= value <= self.label_high:
            return None
        if self.integer_labels and not value.is_integer():
            return None
        return value

    def format_prediction(self, value: float) -> str:
        return f"{value:.4f}" if self.correlation else str(int(value))


TASK_TABLE: dict[str, Task] = {
    "sst": Task("sst", "SST", "ids-sst-{split}.csv", ("sentence",), "sentiment", 0, 4, True,
                "sst_acc", "SST acc", "sst", "sst", "Predicted_Sentiment", _sst_outputs, _cross_entropy, _argmax, False),
    "quora": Task("quora", "Quora", "quora-{split}.csv", ("sentence1", "sentence2"), "is_duplicate", 0, 1, True,
                  "quora_acc", "Quora acc", "para", "para", "Predicted_Is_Paraphrase", _para_outputs, _bce, _positive, False),
    "sts": Task("sts", "STS", "sts-{split}.csv", ("sentence1", "sentence2"), "similarity", 0.0, 5.0, False,
                "sts_corr", "STS r", "sts", "sts", "Predicted_Similiarity",  # sic: the course's spelling
                _sts_outputs, _mse, _clamp_0_5, True),
}
TASKS: tuple[str, ...] = tuple(TASK_TABLE)
TASK_METRICS: tuple[str, ...] = tuple(t.metric for t in TASK_TABLE.values())  # sst_acc, quora_acc, sts_corr
SCORES: tuple[str, ...] = TASK_METRICS + ("overall",)  # what every trial records, per epoch and final
SCORE_NAMES: dict[str, str] = {**{t.metric: t.metric_display for t in TASK_TABLE.values()}, "overall": "overall"}
METRICS: tuple[str, ...] = ("overall", "overall_normalized") + TASK_METRICS  # what a study may optimise


def task_of_file(file_name: str, columns) -> str:
    """The task an unlabelled (or labelled) CS224N-format file belongs to, from its columns and name.

    The columns decide when they fit one task (SST: id, sentence); Quora and STS share theirs (id,
    sentence1, sentence2), so then a word of the file name decides: a task's name, output stem or
    report key ("sst"; "quora" or "para"; "sts"). Raises ValueError saying what did not fit.
    """
    import re

    present = set(columns)
    fits = [t.name for t in TASK_TABLE.values() if {"id", *t.sentence_columns} <= present]
    words = set(re.split(r"[^a-z0-9]+", file_name.lower()))
    named = [t.name for t in TASK_TABLE.values() if words & {t.name, t.output_stem, t.report_key}]
    expected = "; ".join(f"{t.display}: id, {', '.join(t.sentence_columns)}" for t in TASK_TABLE.values())
    if not fits:
        shown = ", ".join(c for c in columns if c) or "none"
        raise ValueError(f"its columns ({shown}) match no task (expected {expected})")
    chosen = [t for t in fits if t in named]
    if len(fits) == 1 and (not named or chosen):
        return fits[0]
    if len(chosen) == 1:
        return chosen[0]
    if named and not chosen:
        raise ValueError(f"its name says {' or '.join(named)} but its columns fit {' or '.join(fits)}")
    raise ValueError(f"its columns fit {' and '.join(fits)}: put one of "
                     f"{', '.join(repr(w) for t in fits for w in sorted({t, TASK_TABLE[t].output_stem}))} "
                     "in the file name")
