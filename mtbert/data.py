"""The three tasks in CS224N format: loading, malformed-row handling, tokenisation cache, batching."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .tasks import TASK_TABLE, TASKS

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test-student")
# 2: pair tasks hold the joint "[CLS] s1 [SEP] s2" encoding (TaskData.pair); 3: unlabelled rows with an empty
# sentence are kept
CACHE_VERSION = 4  # 4: stored as plain tensors and data (weights-only loading)


class DataError(RuntimeError):
    """A data file is missing or unusable."""


@dataclass
class RawTask:
    """One split of one task as read from its file, malformed rows already skipped."""

    task: str
    ids: list[str]
    sentences: list[list[str]]  # one list per sentence column
    labels: list[float] | None  # None for unlabelled (test) files
    skipped: int


@dataclass
class Encoded:
    """Token ids of one sentence column: right-padded (N, L) int32 and the true lengths; for a joint
    pair encoding also the segment (token type) ids, where the tokenizer makes them."""

    ids: torch.Tensor
    lengths: torch.Tensor
    type_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Encoded":
        type_ids = None if self.type_ids is None else self.type_ids.to(device)
        return Encoded(self.ids.to(device), self.lengths.to(device), type_ids)


@dataclass
class TaskData:
    """One split of one task, tokenised: what the trainer and evaluator consume."""

    task: str
    ids: list[str]
    columns: list[Encoded]  # 1 for SST, 2 for the pair tasks
    labels: torch.Tensor | None  # int64 for sst/quora... float32 for sts
    skipped: int = 0
    pair: Encoded | None = None  # pair tasks: "[CLS] s1 [SEP] s2" jointly (cross-encoding), see encode_pairs


    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_lengths(self) -> np.ndarray:
        """Per example, the longest of its sentences (what length bucketing sorts by)."""
        return torch.stack([c.lengths for c in self.columns]).amax(0).cpu().numpy()

    def to(self, device: torch.device) -> "TaskData":
        labels = None if self.labels is None else self.labels.to(device)
        pair = None if self.pair is None else self.pair.to(device)
        return TaskData(self.task, self.ids, [c.to(device) for c in self.columns], labels, self.skipped, pair)


def task_path(data_dir: Path, task: str, split: str) -> Path:
    return Path(data_dir) / TASK_TABLE[task].file_name(split)


def _has_undecodable(values: list[str]) -> bool:
    """True when a value holds bytes that were not UTF-8 (kept as lone surrogates by surrogateescape)."""
    return any(any("\udc80" <= ch <= "\udcff" for ch in v) for v in values if not v.isascii())


def read_task(path: Path, task: str, labelled: bool = True) -> RawTask:
    """Read one CS224N-format file; skip and count malformed rows (one warning per file).

    Malformed: a missing or extra field, an unusable label, broken quoting, a byte that is not UTF-8,
    or a field longer than the csv module's limit (131072 characters): no sentence of the tasks comes
    near it. An empty field is malformed too, except a sentence of an unlabelled file (`labelled=False`:
    files to predict): that row is kept with its empty sentence, so that every id gets a prediction.
    """
    spec = TASK_TABLE[task]
    columns = spec.sentence_columns + ((spec.label_column,) if labelled else ())
    expected = ", ".join(("id",) + columns)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a tab-separated file with columns {expected})")
    ids: list[str] = []
    sentences: list[list[str]] = [[] for _ in spec.sentence_columns]
    labels: list[float] = []
    skipped, first_bad, empty = 0, None, 0
    try:
        f = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with f:
        reader = csv.DictReader(f, delimiter="\t")
        try:
            fieldnames = reader.fieldnames or []
        except (csv.Error, OSError) as exc:
            raise DataError(f"{path}: unreadable header line ({exc})") from None
        missing = [c for c in ("id",) + columns if c not in fieldnames]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected {expected})")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:  # a field over the csv limit: the row is dropped, reading goes on
                skipped += 1
                first_bad = first_bad or reader.line_num
                continue
            values = [(row.get(c) or "").strip() for c in ("id",) + columns]
            label = spec.parse_label(values[-1]) if labelled else 0.0
            # None key: more fields than the header; a newline inside a field: broken quoting
            if None in row or not values[0] or (labelled and not all(values)) or label is None \
                    or any("\n" in v for v in values) or _has_undecodable(values):
                skipped += 1
                first_bad = first_bad or reader.line_num
                continue
            empty += not all(values)
            ids.append(values[0])
            for i, column in enumerate(sentences):
                column.append(values[1 + i])
            if labelled:
                labels.append(label)
    if skipped:
        logger.warning("%s: skipped %d malformed row(s) (first at line %d)%s", path, skipped, first_bad,
                       "" if labelled else ": their ids get no prediction")
    if empty:
        logger.warning("%s: %d row(s) with an empty sentence, predicted from the empty text so that their ids "
                       "have a prediction", path, empty)
    return RawTask(task, ids, sentences, labels if labelled else None, skipped)


def subsample(raw: RawTask, max_examples: int) -> RawTask:
    """A deterministic cap: the same examples for every run, seed and tokenizer, in file order."""
    if not max_examples or len(raw.ids) <= max_examples:
        return raw
    keep = np.sort(np.random.default_rng(0).permutation(len(raw.ids))[:max_examples])
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    labels = None if raw.labels is None else pick(raw.labels)
    return RawTask(raw.task, pick(raw.ids), [pick(c) for c in raw.sentences], labels, raw.skipped)


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # drop the truncation/padding state that tokenising itself changes
        spec = json.loads(backend.to_str())
        text = json.dumps({k: v for k, v in spec.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        text = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("MTBERT_CACHE_DIR") or Path.home() / ".cache" / "mtbert")


def encode(sentences: list[str], tokenizer, max_length: int) -> Encoded:
    """Tokenise a column once; pad to a multiple of 8 so batches can round lengths up cheaply."""
    rows = tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    width = max(8, -(-max(map(len, rows), default=1) // 8) * 8)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
    return Encoded(ids, lengths)


def pair_max_length(max_length: int, tokenizer) -> int:
    """Token budget of a joint pair: two sentences' worth, within what the tokenizer's model takes."""
    limit = getattr(tokenizer, "model_max_length", None) or 0
    return min(2 * max_length, limit) if 0 < limit < 100_000 else 2 * max_length  # HF's "no limit" is 1e30


def encode_pairs(first: list[str], second: list[str], tokenizer, max_length: int) -> Encoded:
    """Tokenise sentence pairs jointly ("[CLS] s1 [SEP] s2 [SEP]" for BERT), longest sentence truncated
    first, with the segment ids the tokenizer makes (None where it makes none, e.g. RoBERTa)."""
    enc = tokenizer(first, second, truncation="longest_first", max_length=pair_max_length(max_length, tokenizer))
    rows = enc["input_ids"]
    types = enc.get("token_type_ids")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    width = max(8, -(-max(map(len, rows), default=1) // 8) * 8)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.int32)
    type_ids = None if types is None else torch.zeros((len(rows), width), dtype=torch.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        if type_ids is not None:
            type_ids[i, : len(r)] = torch.tensor(types[i], dtype=torch.int32)
    return Encoded(ids, lengths, type_ids)


def joint_inputs(pair: Encoded, rows: torch.Tensor, length: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Encoder input of the joint pairs `rows` padded to `length`: ids, attention mask, segment ids."""
    ids = pair.ids[rows, :length]
    if ids.shape[1] < length:  # a length rounded up past the column's own padding
        ids = torch.nn.functional.pad(ids, (0, length - ids.shape[1]))
    mask = (torch.arange(length, device=ids.device) < pair.lengths[rows].unsqueeze(1)).long()
    type_ids = None
    if pair.type_ids is not None:
        type_ids = pair.type_ids[rows, :length]
        if type_ids.shape[1] < length:
            type_ids = torch.nn.functional.pad(type_ids, (0, length - type_ids.shape[1]))
    return ids, mask, type_ids


def tokenize_task(raw: RawTask, tokenizer, max_length: int) -> TaskData:
    """Rows read by read_task -> what the model consumes: each sentence column, the joint pair encoding
    of a pair task (cross-encoding), and the labels as tensors when the file has them."""
    labels = None
    if raw.labels is not None:
        dtype = torch.int64 if TASK_TABLE[raw.task].integer_labels else torch.float32
        labels = torch.tensor(raw.labels, dtype=dtype)
    pair = encode_pairs(*raw.sentences, tokenizer, max_length) if len(raw.sentences) == 2 else None
    return TaskData(raw.task, raw.ids, [encode(c, tokenizer, max_length) for c in raw.sentences], labels,
                    raw.skipped, pair)


def load_task(data_dir: Path, task: str, split: str, tokenizer, max_length: int = 128,
              max_examples: int = 0, labelled: bool | None = None) -> TaskData:
    """Read, cap and tokenise one split; tokens are cached by tokenizer and file content."""
    path = task_path(data_dir, task, split)
    labelled = split != "test-student" if labelled is None else labelled
    if not path.is_file():  # the same clear error read_task would give, before hashing
        read_task(path, task, labelled)
    try:
        content = hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    key = hashlib.sha1(
        f"{CACHE_VERSION}|{_tokenizer_fingerprint(tokenizer)}|{content}"
        f"|{task}|{labelled}|{max_length}|{max_examples}".encode()
    ).hexdigest()
    cache = _cache_dir() / f"{task}-{split}-{key[:20]}.pt"
    if cache.is_file():
        try:
            # weights-only: a planted pickle in the cache folder is refused (and rebuilt), never run
            return _task_from_state(torch.load(cache, weights_only=True))
        except Exception:  # a torn, stale, foreign or tampered cache file is rebuilt, never trusted
            logger.info("rebuilding unreadable token cache %s", cache)
    raw = subsample(read_task(path, task, labelled), max_examples)
    if not raw.ids:
        raise DataError(f"{path}: no usable rows")
    data = tokenize_task(raw, tokenizer, max_length)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save(_task_state(data), tmp)
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only home is no reason to fail a run
        logger.debug("token cache not written: %s", exc)
    return data


def _encoded_state(e: Encoded | None) -> dict[str, Any] | None:
    return None if e is None else {"ids": e.ids, "lengths": e.lengths, "type_ids": e.type_ids}


def _task_state(data: TaskData) -> dict[str, Any]:
    """A TaskData as tensors and plain data: what torch.load(weights_only=True) reads back."""
    return {"task": data.task, "ids": list(data.ids), "columns": [_encoded_state(c) for c in data.columns],
            "labels": data.labels, "skipped": data.skipped, "pair": _encoded_state(data.pair)}


def _task_from_state(state: dict[str, Any]) -> TaskData:
    def enc(e: dict[str, Any] | None) -> Encoded | None:
        return None if e is None else Encoded(e["ids"], e["lengths"], e["type_ids"])

    return TaskData(state["task"], state["ids"], [enc(c) for c in state["columns"]], state["labels"],
                    state["skipped"], enc(state["pair"]))


def load_splits(data_dir: Path, tokenizer, splits: tuple[str, ...] = ("train", "dev"),
                max_length: int = 128, max_examples: int = 0) -> dict[str, dict[str, TaskData]]:
    """{split: {task: TaskData}} for the labelled splits a training run needs."""
    return {s: {t: load_task(data_dir, t, s, tokenizer, max_length, max_examples) for t in TASKS} for s in splits}


# ---------------------------------------------------------------- batching


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int | tuple[int, ...],
                     pool: int = 32) -> list[np.ndarray]:
    """Shuffle, sort by length inside pools of `pool` batches, cut into batches, shuffle the batches.

    Batches hold similar lengths (little padding) while the order stays random. Fully determined by
    `seed`, so any pass over any task can be rebuilt from (seed, task, pass) alone.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    chunk = batch_size * pool
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches by increasing length, for evaluation."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Batch:
    """Row indices (already on the data's device) of one batch of one task, and the padded length
    of each of its sentence columns."""

    task: str
    rows: torch.Tensor
    lengths: tuple[int, ...]
    host_rows: np.ndarray  # the same rows on the host: lengths are read here, never from the GPU


class TaskStream:
    """Endless, reproducible stream of length-bucketed batches of one task's training split.

    Batch `step` belongs to pass `step // batches_per_pass`; each pass is a fresh shuffle seeded by
    (seed, task, pass). Smaller tasks thus cycle with a new order each time, and a run resumed at
    any step sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, data: TaskData, batch_size: int, seed: int, round_to: int = 1):
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.round_to = round_to
        self.lengths = data.max_lengths
        self.column_lengths = [c.lengths.cpu().numpy() for c in data.columns]
        self.pair_lengths = None if data.pair is None else data.pair.lengths.cpu().numpy()  # cross-encoding
        self.batches_per_pass = -(-len(data) // batch_size)
        self._pass = -1
        self._rows: torch.Tensor | None = None
        self._plan: list[tuple[int, int, tuple[int, ...], np.ndarray]] = []

    def _build(self, pass_index: int) -> None:
        seed = (self.seed, TASKS.index(self.data.task), pass_index)
        batches = bucketed_batches(self.lengths, self.batch_size, seed)
        order = torch.from_numpy(np.concatenate(batches).astype(np.int64))
        device = self.data.columns[0].ids.device
        if device.type == "cuda":  # one pinned copy per pass instead of one per step
            order = order.pin_memory().to(device, non_blocking=True)
        self._rows, self._plan, start = order, [], 0
        r = self.round_to
        for b in batches:
            lengths = tuple(-(-int(c[b].max()) // r) * r for c in self.column_lengths)
            self._plan.append((start, start + len(b), lengths, b))
            start += len(b)
        self._pass = pass_index

    def batch(self, step: int) -> Batch:
        pass_index, i = divmod(step, self.batches_per_pass)
        if pass_index != self._pass:
            self._build(pass_index)
        start, end, lengths, host_rows = self._plan[i]
        return Batch(self.data.task, self._rows[start:end], lengths, host_rows)

    def joint_length(self, batch: Batch) -> int:
        """Padded length of the batch's joint pair inputs (rounded up like the sentence columns)."""
        return -(-int(self.pair_lengths[batch.host_rows].max()) // self.round_to) * self.round_to
