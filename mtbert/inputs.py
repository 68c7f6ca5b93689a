"""Encoder inputs of a step: padded (one forward per piece or all fused) or packed.

A piece is one sentence column of one batch. Three ways to feed pieces to the encoder:
- per piece: each padded to its own longest sentence (CPU: padding costs compute there);
- fused: all pieces in one forward, padded to the longest sentence of the step (GPU: one launch
  sequence instead of five);
- packed: all pieces in one forward with several sentences per row of `width` tokens, each
  attending only to itself (block-diagonal mask, positions restarting at 0): about half the
  tokens of the fused form on this data, for the same result.
Everything is built from host-side lengths, so none of it waits for the GPU.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from .data import Batch, Encoded, TaskStream


@dataclass
class Piece:
    column: Encoded
    rows: torch.Tensor  # on the data's device
    length: int  # padded length of this piece
    host_lengths: np.ndarray  # true length of each of its sentences


def batch_pieces(stream: TaskStream, batch: Batch) -> list[Piece]:
    """The encoder inputs of one batch: one piece per sentence column."""
    return [Piece(c, batch.rows, n, lengths[batch.host_rows])
            for c, n, lengths in zip(stream.data.columns, batch.lengths, stream.column_lengths)]


def padded(pieces: list[Piece]) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder input from several pieces, padded to the longest: ids and attention mask."""
    length = max(p.length for p in pieces)
    ids = []
    for p in pieces:
        part = p.column.ids[p.rows, :length]
        if part.shape[1] < length:  # another piece of this input is longer than this whole column
            part = torch.nn.functional.pad(part, (0, length - part.shape[1]))
        ids.append(part)
    lengths = torch.cat([p.column.lengths[p.rows] for p in pieces])
    mask = torch.arange(length, device=lengths.device) < lengths.unsqueeze(1)
    return torch.cat(ids), mask.long()


@dataclass
class Packed:
    """Sentences packed several to a row; see pack()."""

    ids: torch.Tensor  # (rows, width)
    position_ids: torch.Tensor  # (rows, width), restarting at 0 for every sentence
    mask: torch.Tensor  # (rows, 1, width, width) bool: True where a token may attend
    token_slots: torch.Tensor  # flat slot (row * width + column) of every real token, sentence by sentence
    token_sentence: torch.Tensor  # sentence index of every real token
    first_slots: torch.Tensor  # flat slot of each sentence's first token
    lengths: torch.Tensor  # (sentences,) float


def _rows_for(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Worst-fit decreasing: (row, offset) of every sentence and the number of rows."""
    row_of, offset_of = np.empty(len(lengths), np.int64), np.empty(len(lengths), np.int64)
    free: list[tuple[int, int]] = []  # (-free tokens, row)
    rows = 0
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        if free and -free[0][0] >= n:
            space, r = heapq.heappop(free)
            space = -space
        else:
            r, space, rows = rows, width, rows + 1
        row_of[i], offset_of[i] = r, width - space
        if space - n > 0:
            heapq.heappush(free, (-(space - n), r))
    return row_of, offset_of, rows


def pack(pieces: list[Piece], width: int) -> Packed:
    """Pack every sentence of `pieces` into rows of `width` tokens (width >= the longest sentence)."""
    lengths = np.concatenate([p.host_lengths for p in pieces]).astype(np.int64)
    row_of, offset_of, rows = _rows_for(lengths, width)
    starts = row_of * width + offset_of
    total = int(lengths.sum())
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    token_slots = np.repeat(starts, lengths) + within
    token_sentence = np.repeat(np.arange(len(lengths)), lengths)
    # where each token sits in the concatenation of the pieces' flattened (n, length) id blocks
    block_starts = np.cumsum([0] + [len(p.host_lengths) * p.length for p in pieces])[:-1]
    sentence_src = np.concatenate([b + np.arange(len(p.host_lengths)) * p.length for b, p in zip(block_starts, pieces)])
    token_src = np.repeat(sentence_src, lengths) + within
    positions = np.zeros(rows * width, np.int64)
    positions[token_slots] = within
    segment = np.full(rows * width, -1, np.int64)
    segment[token_slots] = token_sentence

    device = pieces[0].rows.device
    host = torch.from_numpy(np.concatenate([token_slots, token_src, token_sentence, starts, lengths,
                                            positions, segment]))
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    n, s = total, len(lengths)
    slots, src, sentence, firsts, lens, pos, seg = flat.split([n, n, n, s, s, rows * width, rows * width])
    values = torch.cat([p.column.ids[p.rows, :p.length].reshape(-1) for p in pieces])
    ids = torch.zeros(rows * width, dtype=values.dtype, device=device)
    ids[slots] = values[src]
    seg = seg.view(rows, width)
    mask = (seg.unsqueeze(2) == seg.unsqueeze(1)).unsqueeze(1)  # padding attends to padding: no empty rows
    return Packed(ids.view(rows, width), pos.view(rows, width), mask, slots, sentence, firsts, lens.float())


def input_mode(device: torch.device, packing: bool) -> str:
    return "per_piece" if device.type != "cuda" else ("packed" if packing else "fused")


def packed_width(pieces: list[Piece]) -> int:
    return max(64, -(-max(p.length for p in pieces) // 32) * 32)


def encoder_tokens(pieces: list[Piece], mode: str) -> int:
    """Token positions the encoder computes for `pieces` in `mode`: the real tokens plus padding."""
    if mode == "packed":
        width = packed_width(pieces)
        return _rows_for(np.concatenate([p.host_lengths for p in pieces]), width)[2] * width
    if mode == "fused":
        return sum(len(p.host_lengths) for p in pieces) * max(p.length for p in pieces)
    return sum(len(p.host_lengths) * p.length for p in pieces)


def embed_pieces(model, pieces: list[Piece], mode: str) -> list[torch.Tensor]:
    """Sentence vectors of each piece; mode is "per_piece", "fused" or "packed" (see module docstring)."""
    if mode == "packed":
        vecs = [model.embed_packed(pack(pieces, packed_width(pieces)))]
    else:
        groups = [pieces] if mode == "fused" else [[p] for p in pieces]
        vecs = [model.embed(*padded(g)) for g in groups]
    return list(torch.cat(vecs).split([len(p.host_lengths) for p in pieces]))
