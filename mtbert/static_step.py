"""A training step that the GPU, not Python, paces: static shapes, staged batches, CUDA graphs.

The eager step (mtbert.train.train_step) builds every step's inputs on the host, launches a few
hundred small kernels one by one, and so waits on Python: on an H200 it took ~50 ms per step at
batch 16 *and* 32. This module removes the host from the step:

- **Static shapes.** A step's sentences (one SST sentence, two Quora and two STS sentences per batch
  row: 5 x batch_size) go through the encoder in one forward, padded to one of a few widths
  (`bucket_widths`: 24, 32, 48, 64, 96, 128 for max_length 128). A short last batch of a pass is
  padded with repeated rows that are sliced off before the loss, so the encoder sees at most
  len(widths) shapes per batch size: 6 per batch size, 30 over the whole lr_dropout space (8..40).
  Padded positions are masked in attention and excluded from mean pooling, so padding does not
  change the math (tests/test_static_step.py checks the loss trajectory against the eager step).
- **Staged batches.** `begin_epoch` builds the epoch's row indices on the host and copies them to
  the device once; a step copies its row of that tensor into a static buffer (device to device).
- **No host sync.** The loss sum and the first non-finite step accumulate on the device
  (`StepStats`); the learning rate comes from a device table indexed by a device step counter;
  AdamW runs fused and capturable; gradient clipping multiplies by a device factor. Nothing in
  `step()` reads a device value on the host.
- **CUDA graphs** (`graphs=True`, CUDA only): per width, the first full step runs eagerly (a real
  step, on a side stream, creating lazy state: optimizer moments, cuBLAS workspaces, compiled
  kernels), the second is captured (forward, backward, clipping, AdamW, statistics) and every
  later one is one `graph.replay()`. All graphs share one memory pool: they never run at the same
  time, and nothing a graph leaves for later lives in the pool (parameters, gradients, optimizer
  state, statistics and the lr table are allocated outside it). Steps with a short batch run the
  same body eagerly. Capture, warm-up and replays run on the step's own device (a device guard and
  a capture stream of that device), never on the process's current device.
- **Graphs check themselves.** After the first replay of each width, one host read checks that the
  step counter advanced by exactly one and that the step's loss is finite. A capture that fails (or
  that torch says recorded an empty graph) or a replay that did not train sets `fallback`: the
  training loop (mtbert.train) runs the eager step from the next step on, and a process-wide
  decision (`graphs_unavailable`) makes later runs of this process start with the eager step. A
  replay that trained nothing is run again without graphs first, so no step is lost.

Between epochs (`end_epoch`) the optimizer and scheduler are put back exactly as the eager step
leaves them (float learning rates, scheduler at the step count), so checkpoints are the same.
Only the default method set is covered (`unsupported`): anything else runs the eager step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings

import numpy as np
import torch
from torch import nn

from .config import STATIC_FIELDS, TrainConfig
from .data import TaskData, TaskStream
from .inputs import Piece, padded
from .methods import task_loss
from .tasks import TASK_TABLE, TASKS

logger = logging.getLogger(__name__)

WIDTHS = (24, 32, 48, 64, 96, 128)  # on the full data: +8.5-9.1% token positions over rounding each step to 8
# (scripts/padding_widths.py); few shapes matter more than those positions when the step is launch-bound
# TrainConfig fields the static step implements as the eager step does (every role but "method",
# mtbert.config.ROLES); any other field away from its default (a multitask method, say) means the eager step runs
COVERED_FIELDS = STATIC_FIELDS


# ------------------------------------------------------------------ shapes


def bucket_widths(max_length: int, max_positions: int | None = None) -> tuple[int, ...]:
    """The widths a step may be padded to: WIDTHS below max_length (rounded up to 8), then that."""
    top = -(-max_length // 8) * 8
    if max_positions is not None:
        top = min(top, max_positions)
    return tuple(w for w in WIDTHS if w < top) + (top,)


def bucket(length: int, widths: tuple[int, ...]) -> int:
    """The narrowest width that holds `length` tokens."""
    for w in widths:
        if length <= w:
            return w
    raise ValueError(f"a sentence of {length} tokens is longer than the widest step width {widths[-1]}")


def sentences_per_example() -> int:
    """Sentences one batch row contributes to a multitask step: 1 (SST) + 2 (Quora) + 2 (STS)."""
    return sum(len(TASK_TABLE[t].sentence_columns) for t in TASKS)


def training_shapes(batch_sizes, max_length: int) -> set[tuple[int, int]]:
    """Every (sentences, width) encoder input the static step may run for these batch sizes."""
    return {(sentences_per_example() * b, w) for b in batch_sizes for w in bucket_widths(max_length)}


# ------------------------------------------------------------------ what runs


def unsupported(cfg: TrainConfig) -> str | None:
    """Why the static step cannot run `cfg` (None: it can)."""
    if not cfg.multitask:
        return "--no-multitask (one task per step)"
    if cfg.packing:
        return "--packing"
    defaults = TrainConfig()
    for f in dataclasses.fields(cfg):
        if f.name not in COVERED_FIELDS and getattr(cfg, f.name) != getattr(defaults, f.name):
            return f"{f.name}={getattr(cfg, f.name)!r}"
    return None


# What `--step auto` runs on CUDA. Only the eager step has run on a GPU (an H200, docs/gpu-steps.md);
# static and graphs are opt-in until a GPU run of scripts/gpu_verify.sh passes and its verdict is
# committed under docs/gpu/: switching this line to "graphs" then cites that verdict.
AUTO_ON_CUDA = "eager"

# The process-wide decision that CUDA graphs do not work here (a failed capture, an empty graph, a
# replay that did not train): the reason, or None. Later runs in this process do not try again.
_graphs_off: str | None = None


def graphs_unavailable() -> str | None:
    """Why CUDA graphs are off for the rest of this process (None: they are not)."""
    return _graphs_off


def turn_graphs_off(reason: str) -> None:
    """Record, for the rest of this process, that CUDA graphs failed (the first reason is kept)."""
    global _graphs_off
    if _graphs_off is None:
        _graphs_off = reason


def resolve_step(cfg: TrainConfig, device: torch.device) -> tuple[str, str | None]:
    """The step that runs ('eager', 'static' or 'graphs') and, when it differs from cfg.step's
    meaning, a note saying why. 'auto': AUTO_ON_CUDA (eager) on CUDA, eager elsewhere."""
    wanted = cfg.step if cfg.step != "auto" else (AUTO_ON_CUDA if device.type == "cuda" else "eager")
    if wanted == "eager":
        return "eager", None
    reason = unsupported(cfg)
    if reason is not None:
        return "eager", f"the {wanted} step covers the default method set only, not {reason}: eager step"
    if wanted == "graphs" and device.type != "cuda":
        return "static", "CUDA graphs need a CUDA device: static step without graphs"
    if wanted == "graphs" and graphs_unavailable() is not None:
        return "eager", f"CUDA graphs failed earlier in this process ({graphs_unavailable()}): eager step"
    return wanted, None


def device_guard(device: torch.device):
    """A context in which `device` is CUDA's current device (nothing on a CPU or MPS): streams,
    captures, generators and synchronisations without a device then mean this one, and no CUDA
    context is opened on any other GPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def compile_encoder(encoder: nn.Module, kind: str, device: torch.device) -> str | None:
    """torch.compile the encoder for step `kind`; return compile's mode (StaticStep's `compiled`).

    eager: dynamic shapes, as before. static: on CUDA mode="reduce-overhead" (compile's own CUDA
    graphs around the encoder's forward and backward, one per shape). graphs: default mode, its
    kernels inside this module's whole-step graphs. For both, torch's automatic dynamic shapes: the
    first shape compiles static, a second one recompiles with the changing sizes symbolic, so a run
    compiles about twice, not once per width; the recompile limit is raised to the shape bound of
    the lr_dropout space (30) plus the evaluation widths in case that ever falls back to per-shape.
    """
    if kind == "eager":
        encoder.compile(dynamic=True)
        return None
    from torch import _dynamo

    limit = len(training_shapes(range(8, 41, 8), 128)) + 2 * len(WIDTHS) + 4
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(_dynamo.config, name):
            setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), limit))
    mode = "reduce-overhead" if kind == "static" and device.type == "cuda" else None
    encoder.compile(mode=mode)
    return mode


# ------------------------------------------------------------------ statistics


class StepStats:
    """Loss sum and first non-finite step of an epoch, kept on the device: adding never syncs."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.first_bad.fill_(-1)

    def add(self, loss: torch.Tensor, step: int | torch.Tensor) -> None:
        """Count one step's loss; `step` is its 1-based number (a host int or a device scalar)."""
        loss = loss.detach().float()
        self.loss_sum.add_(loss)
        bad = torch.logical_and(~torch.isfinite(loss), self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, step, self.first_bad))

    def read(self, steps: int) -> tuple[int | None, float]:
        """The first step whose loss was NaN or infinite (None: none) and the mean loss over `steps`
        steps, in one host read. SYNC: waits for the device."""
        # one transfer instead of two; float32, not float64, which MPS lacks: step numbers stay exact below 2**24
        first, total = torch.stack((self.first_bad.float(), self.loss_sum)).tolist()
        return (None if first < 0 else int(first)), total / max(1, steps)


# ------------------------------------------------------------------ the step


def stage_epoch(plan: list[list[tuple[str, int]]], streams: dict[str, TaskStream], batch_size: int,
                widths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The rows, row counts and width of every step of an epoch, from host-side data only.

    rows: (steps, tasks x batch_size), each task's rows in TASKS order; a short batch is padded with
    copies of its first row (sliced off before the loss), so every step has the same rows.
    counts: (steps, tasks) real rows. widths: the bucket of each step's longest sentence.
    """
    b = batch_size
    rows = np.zeros((len(plan), len(TASKS) * b), np.int64)
    counts = np.zeros((len(plan), len(TASKS)), np.int64)
    step_widths = []
    for i, tasks in enumerate(plan):
        if [t for t, _ in tasks] != list(TASKS):
            raise ValueError("the static step runs multitask steps only (every task in every step)")
        longest = 0
        for j, (task, stream_step) in enumerate(tasks):
            batch = streams[task].batch(stream_step)  # host-side rows and lengths: no device reads
            n = len(batch.host_rows)
            rows[i, j * b:(j + 1) * b] = batch.host_rows[0]
            rows[i, j * b:j * b + n] = batch.host_rows
            counts[i, j] = n
            longest = max(longest, *batch.lengths)
        step_widths.append(bucket(longest, widths))
    return rows, counts, step_widths


class StaticStep:
    """The static-shape multitask step (see the module docstring); `graphs=True` adds CUDA graphs.

    Use: begin_epoch(plan, streams, step) once per epoch, step(i) for each of its steps,
    end_epoch(step) before evaluating or checkpointing.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data: dict[str, TaskData],
                 cfg: TrainConfig, amp: bool, total_steps: int, stats: StepStats, graphs: bool = False,
                 compiled: str | None = None):
        lambdas = getattr(scheduler, "lr_lambdas", None)
        # mtbert.train.build_optimizer always gives these: this guards other callers (bench, tests), not a fallback
        if not isinstance(optimizer, torch.optim.AdamW) or lambdas is None:
            raise ValueError("the static step needs AdamW and a LambdaLR schedule")
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.device = data[TASKS[0]].columns[0].ids.device
        self.batch_size, self.amp, self.max_grad_norm = cfg.batch_size, amp, cfg.max_grad_norm
        self.stats, self.cfg = stats, cfg
        self.graphs_on = graphs and self.device.type == "cuda" and graphs_unavailable() is None
        # set when graphs failed in this run: the caller runs the eager step from the next step on
        self.fallback: str | None = None
        self.mark_steps = compiled == "reduce-overhead"  # compile's CUDA graphs need to know where a step starts
        max_positions = getattr(getattr(model.encoder, "config", None), "max_position_embeddings", None)
        self.widths = bucket_widths(cfg.max_length, max_positions)
        b = self.batch_size
        self.rows = torch.zeros(len(TASKS) * b, dtype=torch.long, device=self.device)  # the step's rows, by task
        self.k = torch.zeros((), dtype=torch.long, device=self.device)  # optimizer steps done: the lr table's row
        # lr of every param group at every step, as the scheduler would set it: lr_table[k] is used by step k+1
        base = scheduler.base_lrs
        table = [[lr * float(f(s)) for lr, f in zip(base, lambdas)] for s in range(total_steps + 1)]
        self.lr_table = torch.tensor(table, dtype=torch.float32, device=self.device)
        self.lrs = [torch.zeros((), device=self.device) for _ in optimizer.param_groups]  # what AdamW reads
        self.saved_flags: list[dict] = []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.warm: set[int] = set()
        self.pool = None
        self.capture_stream = None  # one stream of self.device for every capture (they share the pool)
        self.graph_losses: dict[int, torch.Tensor] = {}  # a captured step's loss, until its first replay is checked
        self.loss: torch.Tensor | None = None  # the last _body's loss (during a capture: the graph's output)
        self.done = 0  # optimizer steps done, counted on the host: what the device counter k must read
        self.graph_error: str | None = None
        self.staged: torch.Tensor | None = None
        self.counts = np.zeros((0, len(TASKS)), np.int64)
        self.step_widths: list[int] = []

    # ---------------------------------------------------------- epochs

    def begin_epoch(self, plan: list[list[tuple[str, int]]], streams: dict[str, TaskStream], step: int) -> None:
        """Stage the epoch's batches on the device (one copy) and hand the optimizer device-side lrs."""
        rows, self.counts, self.step_widths = stage_epoch(plan, streams, self.batch_size, self.widths)
        host = torch.from_numpy(rows)
        if self.device.type == "cuda":
            host = host.pin_memory()
        self.staged = host.to(self.device, non_blocking=True)
        self.k.fill_(step)
        self.done = step
        self.saved_flags = []
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            self.saved_flags.append({k: group[k] for k in ("lr", "fused", "capturable", "foreach")})
            # fused + capturable AdamW reads its lr and step count from the device (CPU too, for the tests)
            group.update(lr=lr, fused=True, capturable=True, foreach=None)
        for p, state in self.optimizer.state.items():
            if "step" in state:  # a resumed eager run's step counts may sit on the host
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        # capturable AdamW warns when it steps outside a capture: the static step and the warm-up steps do that
        self.optimizer._warned_capturable_if_run_uncaptured = True

    def end_epoch(self, step: int) -> None:
        """Leave the optimizer and scheduler as the eager step would: float lrs, scheduler at `step`.

        Needed every epoch, not only at the end: the checkpoint written after each epoch must be the
        eager step's (`step` and `device` are speed fields, so a resume may run another step), and
        begin_epoch hands the device lrs back for the next epoch. Only param-group entries change
        hands (begin_epoch's step-count move is a no-op once the counts are on the device).
        """
        for group, flags in zip(self.optimizer.param_groups, self.saved_flags):
            group.update(flags)
        self.saved_flags = []
        self.scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": graphs bypass the wrapper
            warnings.simplefilter("ignore")
            self.scheduler.step()

    # ---------------------------------------------------------- steps

    def step(self, i: int) -> None:
        """Step i of the staged epoch. Queues work on the device; never waits for it."""
        self.rows.copy_(self.staged[i])  # device to device
        width, counts = self.step_widths[i], self.counts[i]
        full = bool((counts == self.batch_size).all())  # host numpy: no device read
        if self.graphs_on and full:
            self._graphed(width)
        else:
            self._body(width, tuple(int(n) for n in counts))
        self.done += 1

    def _inputs(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of the step's 5 x batch_size sentences, padded to `width`."""
        b = self.batch_size
        # host_lengths unused by padded(); the step never reads lengths on the host
        return padded([Piece(column, self.rows[j * b:(j + 1) * b], width, None)
                       for j, task in enumerate(TASKS) for column in self.data[task].columns])

    def _loss(self, width: int, counts: tuple[int, ...]) -> torch.Tensor:
        """Summed loss of the three tasks (the same table calls as mtbert.train.task_losses)."""
        b = self.batch_size
        ids, mask = self._inputs(width)
        vecs = iter(self.model.embed(ids, mask).split(b))
        losses = []
        for j, task_name in enumerate(TASKS):
            task, n = TASK_TABLE[task_name], counts[j]
            out = task.outputs(self.model, [next(vecs)[:n] for _ in task.sentence_columns])
            labels = self.data[task_name].labels[self.rows[j * b:j * b + n]]
            losses.append(task_loss(task, self.cfg)(out, labels, None, self.cfg))  # the eager step's loss choice
        return sum(losses)

    def _body(self, width: int, counts: tuple[int, ...]) -> None:
        """One optimizer step: what a CUDA graph captures. No host reads of device values."""
        if self.mark_steps:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            loss = self._loss(width, counts)
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay where the graphs read them
        loss.backward()
        if self.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm, foreach=True)
        for lr, value in zip(self.lrs, self.lr_table.index_select(0, self.k.view(1))[0]):
            lr.copy_(value)
        self.optimizer.step()
        self.k.add_(1)
        self.stats.add(loss, self.k)
        self.loss = loss.detach()

    # ---------------------------------------------------------- CUDA graphs

    def _graphed(self, width: int) -> None:
        """A full step at `width`: warm up, capture, or replay (see the module docstring)."""
        full = (self.batch_size,) * len(TASKS)
        graph = self.graphs.get(width)
        if graph is None:
            if width not in self.warm:  # first full step at this width: a real step, eagerly, on a side stream
                self.warm.add(width)
                with self._side_stream():
                    self._body(width, full)
                return
            graph = self._capture(width)
            if graph is None:  # the capture failed: this step without graphs, later ones eagerly (fallback)
                self._body(width, full)
                return
            self.graphs[width] = graph
        graph.replay()  # right after a capture too: capturing only recorded the step
        if width in self.graph_losses:
            self._check_first_replay(width)

    def _check_first_replay(self, width: int) -> None:
        """After the first replay of a width: did it train? One host read (SYNC), once per width.

        The device step counter must have advanced by exactly one and the step's loss be finite. A
        replay that advanced nothing trained nothing (an empty graph): the step is run again without
        graphs. Any failure turns graphs off (fallback, and for the process); a counter that moved by
        more than one means the run's state is unknown, and the run stops with that error.
        """
        k, loss = torch.stack((self.k.float(), self.graph_losses.pop(width).float())).tolist()
        advanced = round(k) - self.done
        if advanced == 1 and math.isfinite(loss):
            return
        self._graphs_failed(width, f"the first replay of the width-{width} graph advanced the step counter by "
                                   f"{advanced} (not 1) with loss {loss:g}")
        if advanced == 0:  # it trained nothing: the step once more, without graphs
            self._body(width, (self.batch_size,) * len(TASKS))
        elif advanced != 1:
            raise RuntimeError(f"CUDA graph replay at width {width} ran {advanced} steps instead of one; "
                               "the run's state is unknown (later runs in this process use the eager step)")
        # advanced == 1 with a non-finite loss: the step ran; the loop's NaN check reports it

    def _graphs_failed(self, width: int, reason: str) -> None:
        """Graphs off for this run (the caller switches to the eager step) and for the process, logged."""
        self.graphs_on = False
        self.graph_error = self.fallback = reason
        turn_graphs_off(reason)
        logger.warning("CUDA graphs at width %d: %s; this run goes on with the eager step, and later runs in "
                       "this process start with it", width, reason)

    def _on_device(self):
        return device_guard(self.device)

    @contextlib.contextmanager
    def _side_stream(self):
        """Run the block on a side stream that waits for, and is waited for by, the current one
        (CUDA's advice for the warm-up before a capture); on a CPU, just run it."""
        if self.device.type != "cuda":
            yield
            return
        with self._on_device():
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                yield
            current.wait_stream(side)

    def _capture(self, width: int):
        """Record one full step at `width` into a CUDA graph sharing the pool of the others; None if
        something in the step cannot be captured (fallback set, graphs off for the process).

        Not torch.cuda.graph: on a failed capture its __exit__ raises from capture_end before it
        restores the stream, which then stays current, and its error ("previous error during capture")
        hides the cause. Here the stream context always exits, and the first error is the one logged.
        Everything runs on self.device: its guard, a capture stream made on it.
        """
        graph = torch.cuda.CUDAGraph()
        with self._on_device():
            if self.capture_stream is None:
                self.capture_stream = torch.cuda.Stream(self.device)
            current = torch.cuda.current_stream(self.device)
            torch.cuda.synchronize(self.device)
            self.capture_stream.wait_stream(current)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with torch.cuda.stream(self.capture_stream):
                        graph.capture_begin(pool=self.pool)
                        try:
                            self._body(width, (self.batch_size,) * len(TASKS))
                        except BaseException:
                            with contextlib.suppress(Exception):  # end the capture; the body's error is the cause
                                graph.capture_end()
                            raise
                        graph.capture_end()
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                with contextlib.suppress(RuntimeError):
                    torch.cuda.synchronize(self.device)
                self._graphs_failed(width, f"capture failed: {first_cause(exc)}")
                return None
            finally:
                current.wait_stream(self.capture_stream)
            for w in caught:
                if "graph is empty" in str(w.message).lower():
                    self._graphs_failed(width, f"capture recorded an empty graph ({w.message})")
                    return None
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if self.pool is None:
            self.pool = graph.pool()
        self.graph_losses[width] = self.loss  # the graph's output: read once after its first replay
        return graph

    def describe(self) -> str:
        """One line for the log: what this step does."""
        shapes = f"static shapes (widths {', '.join(map(str, self.widths))})"
        if self.graphs_on:
            return f"{shapes} with CUDA graphs"
        return f"{shapes} (graphs off: {self.graph_error})" if self.graph_error else shapes

    def ran(self) -> str:
        """The step running now: 'graphs', or 'static' (never asked for graphs, or they failed:
        graph_error says why; the train loop then switches to the eager step, see `fallback`)."""
        return "graphs" if self.graphs_on else "static"


def first_cause(exc: BaseException) -> str:
    """'Type: first line' of the innermost exception in exc's chain: the real cause, not a later
    "previous error during capture"."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"
