"""The three tasks in one table: files, columns, labels, head, loss, metric and output format.

Everything that differs between SST, Quora and STS is a field of `Task` (the way HF's run_glue.py
keeps `task_to_keys`); the data loader, the trainer, the evaluator and the reports read this table
instead of branching on task names. This module imports no torch at import time, so reports and
CLIs can use the names without paying for it.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .losses import cosent_loss, mnr_loss, symmetric_kl, symmetric_kl_binary


def _sst_outputs(model, vecs):
    return model.sentiment_logits(vecs[0])


def _para_outputs(model, vecs):
    return model.paraphrase_logit(vecs[0], vecs[1])


def _sts_outputs(model, vecs):
    return model.similarity_score(vecs[0], vecs[1])


def _para_joint_outputs(model, joint, vecs):
    return model.paraphrase_logit_joint(joint, vecs)


def _sts_joint_outputs(model, joint, vecs):
    return model.similarity_score_joint(joint, vecs)


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
class TaskLoss:
    """One named loss of a task: fn(head output, labels, sentence vectors or None, TrainConfig) -> scalar."""

    fn: Callable[[Any, Any, Any, Any], Any]
    needs_vectors: bool = False  # uses the bi-encoder sentence vectors (not available with 'cross' encoding)


def _plain(loss: Callable[[Any, Any], Any]) -> TaskLoss:
    return TaskLoss(lambda out, y, vecs, cfg: loss(out, y))


def _bce_mnr(out, y, vecs, cfg):
    # ranking term on the pooled sentence vectors u, v (before dropout): duplicates' u_i against every v_j
    return _bce(out, y) + mnr_loss(vecs[0], vecs[1], y, cfg.mnr_scale)


def _sts_cosent(out, y, vecs, cfg):
    return cosent_loss(out.float() / 5.0, y, cfg.cosent_scale)  # score / 5: cosine units, where lambda = 20 is Su's


def _sts_mse_cosent(out, y, vecs, cfg):
    return _mse(out, y) + _sts_cosent(out, y, vecs, cfg)


def _categorical_divergence(a, b):
    return symmetric_kl(a, b)


def _bernoulli_divergence(a, b):
    return symmetric_kl_binary(a, b)


def _squared_divergence(a, b):
    import torch.nn.functional as F

    return F.mse_loss(a.float(), b.float())


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
    predict: Callable[[Any], Any]  # head output -> class id, 0/1 or a 0-5 score
    correlation: bool  # metric: Pearson r (True) or accuracy (False)
    head: str = ""  # the model's head attribute: MultitaskBert.<head>_head (bi) or .<head>_joint_head (cross)
    # multitask methods (docs/methods.md): the TrainConfig fields that choose them for this task
    losses: dict[str, TaskLoss] = field(default_factory=dict)  # named losses; the first is the report's (report_loss)
    loss_option: str | None = None  # TrainConfig field naming one of `losses` (None: the first)
    weight_option: str | None = None  # TrainConfig field of this task's fixed loss weight
    encoding_option: str | None = None  # pair tasks: TrainConfig field "bi" | "cross" | "both"
    joint_outputs: Callable[[Any, Any, Any], Any] | None = None  # (model, joint vector, sentence vectors or None)
    # SMART: divergence between the head outputs on perturbed and clean inputs (gradient to both sides)
    divergence: Callable[[Any, Any], Any] | None = None

    @property
    def classification(self) -> bool:
        """Classes (a likelihood over labels) rather than a regressed score: decides uncertainty weighting's form."""
        return self.integer_labels

    @property
    def report_loss(self) -> TaskLoss:
        """The report's loss: the first of `losses` (what the task trains on at TrainConfig's defaults)."""
        return next(iter(self.losses.values()))

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
                "sst_acc", "SST acc", "sst", "sst", "Predicted_Sentiment", _sst_outputs, _argmax, False,
                head="sst", losses={"ce": _plain(_cross_entropy)}, weight_option="sst_weight",
                divergence=_categorical_divergence),
    "quora": Task("quora", "Quora", "quora-{split}.csv", ("sentence1", "sentence2"), "is_duplicate", 0, 1, True,
                  "quora_acc", "Quora acc", "para", "para", "Predicted_Is_Paraphrase", _para_outputs, _positive, False,
                  head="para", losses={"bce": _plain(_bce), "bce_mnr": TaskLoss(_bce_mnr, needs_vectors=True)},
                  loss_option="quora_loss", weight_option="quora_weight", encoding_option="quora_encoding",
                  joint_outputs=_para_joint_outputs, divergence=_bernoulli_divergence),
    "sts": Task("sts", "STS", "sts-{split}.csv", ("sentence1", "sentence2"), "similarity", 0.0, 5.0, False,
                "sts_corr", "STS r", "sts", "sts", "Predicted_Similiarity",  # sic: the course's spelling
                _sts_outputs, _clamp_0_5, True,
                head="sts", losses={"mse": _plain(_mse), "cosent": TaskLoss(_sts_cosent),
                                    "mse_cosent": TaskLoss(_sts_mse_cosent)},
                loss_option="sts_loss", weight_option="sts_weight", encoding_option="sts_encoding",
                joint_outputs=_sts_joint_outputs, divergence=_squared_divergence),
}
TASKS: tuple[str, ...] = tuple(TASK_TABLE)
TASK_METRICS: tuple[str, ...] = tuple(t.metric for t in TASK_TABLE.values())  # sst_acc, quora_acc, sts_corr
SCORES: tuple[str, ...] = TASK_METRICS + ("overall",)  # what every trial records, per epoch and final
SCORE_NAMES: dict[str, str] = {**{t.metric: t.metric_display for t in TASK_TABLE.values()}, "overall": "overall"}
METRICS: tuple[str, ...] = ("overall", "overall_normalized") + TASK_METRICS  # what a study may optimise


def data_fingerprint(data_dir: str | os.PathLike, splits: tuple[str, ...] = ("train", "dev")) -> str:
    """SHA-1 over the train and dev files of every task (what a run trains and is scored on): the same
    data at another path has the same fingerprint; a missing file counts as "<missing>"."""
    h = hashlib.sha1()
    for task in TASK_TABLE.values():
        for split in splits:
            h.update(f"{task.name}/{split}:".encode())
            try:
                with open(Path(data_dir) / task.file_name(split), "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except OSError:
                h.update(b"<missing>")
    return h.hexdigest()


def has_data(data_dir: str | os.PathLike) -> bool:
    """Whether any train or dev file of the tasks is in `data_dir`."""
    return any((Path(data_dir) / t.file_name(s)).is_file() for t in TASK_TABLE.values() for s in ("train", "dev"))


def missing_data(data_dir: str | os.PathLike) -> list[str]:
    """The train and dev files of the tasks that are not in `data_dir` (empty when training can start)."""
    return [t.file_name(s) for t in TASK_TABLE.values() for s in ("train", "dev")
            if not (Path(data_dir) / t.file_name(s)).is_file()]


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
