"""Multitask fine-tuning: `python -m mtbert.train --help`.

One step = one batch of each task through the encoder in a single forward pass, the three
losses summed; an epoch runs until the largest training set is exhausted, cycling the others.
After every epoch: evaluate on dev, checkpoint, then call the caller's callback (which may stop
training, e.g. to prune). The loop never syncs with the GPU except every `log_every` steps.
`--step` picks how a step runs: eager (train_step below), or static shapes with or without CUDA
graphs (mtbert.static_step); 'auto' is graphs on CUDA, eager on CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint, set_rng_states, write_run_files
from .config import TrainConfig, add_config_arguments, resolve_data_dir, resolve_device
from .data import Batch, TaskData, TaskStream, load_splits
from .evaluate import evaluate
from .inputs import batch_pieces, embed_pieces, input_mode
from .model import MultitaskBert, load_pretrained
from .static_step import StaticStep, StepStats, compile_encoder, resolve_step
from .tasks import TASK_TABLE, TASKS

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, epoch: int):
        super().__init__(f"loss is NaN or infinite at step {step} (epoch {epoch}); "
                         "lower the learning rate or check the data")
        self.step, self.epoch = step, epoch


@dataclass
class EpochResult:
    """What the per-epoch callback receives."""

    epoch: int  # 1-based
    metrics: dict[str, float]  # dev metrics, see evaluate.summarize
    train_loss: float  # mean summed loss of the epoch's steps
    seconds: float  # wall time of the epoch, training and evaluation
    step: int  # optimizer steps so far
    resumed: bool = False  # True: replayed from a checkpoint, not trained in this call
    peak_memory_bytes: int | None = None  # CUDA: peak memory allocated by this process so far in the run
    # dev predictions behind `metrics` (task -> array in dev order); None for replayed epochs
    predictions: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able part (what the checkpoint's history keeps): everything but the predictions."""
        return {k: v for k, v in asdict(self).items() if k != "predictions"}


EpochCallback = Callable[[EpochResult], "bool | None"]  # return True to stop training


@dataclass
class Prepared:
    """What can be loaded once and shared by many runs: tokenizer, pretrained encoder, data."""

    tokenizer: Any
    encoder: nn.Module  # pretrained weights on CPU; every run trains its own copy
    train: dict[str, TaskData]
    dev: dict[str, TaskData]
    key: tuple = field(default=())

    def matches(self, cfg: TrainConfig) -> bool:
        return self.key == prepare_key(cfg)


def prepare_key(cfg: TrainConfig) -> tuple:
    return (cfg.model, str(resolve_data_dir(cfg.data_dir)), cfg.max_examples, cfg.max_length)


def prepare(cfg: TrainConfig) -> Prepared:
    """Load the tokenizer, the pretrained encoder and the tokenised train/dev splits."""
    encoder, tokenizer = load_pretrained(cfg.model)
    splits = load_splits(resolve_data_dir(cfg.data_dir), tokenizer, ("train", "dev"), cfg.max_length, cfg.max_examples)
    return Prepared(tokenizer, encoder, splits["train"], splits["dev"], prepare_key(cfg))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def task_losses(model: MultitaskBert, streams: dict[str, TaskStream], batches: list[Batch],
                mode: str) -> dict[str, torch.Tensor]:
    """Loss of each task in `batches`; `mode` says how sentences reach the encoder (mtbert.inputs)."""
    vecs = iter(embed_pieces(model, [p for b in batches for p in batch_pieces(streams[b.task], b)], mode))
    losses = {}
    for b in batches:
        task = TASK_TABLE[b.task]
        out = task.outputs(model, [next(vecs) for _ in task.sentence_columns])
        losses[b.task] = task.loss(out, streams[b.task].data.labels[b.rows])
    return losses


def train_step(model: MultitaskBert, optimizer, scheduler, streams: dict[str, TaskStream], batches: list[Batch],
               amp: bool, max_grad_norm: float, mode: str) -> torch.Tensor:
    """One optimizer step on the summed loss of `batches`; returns the loss without syncing."""
    device_type = batches[0].rows.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        loss = sum(task_losses(model, streams, batches, mode).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
    optimizer.step()
    scheduler.step()
    return loss.detach()


def epoch_plan(streams: dict[str, TaskStream], multitask: bool, epoch: int) -> list[list[tuple[str, int]]]:
    """The steps of one (0-based) epoch, each a list of (task, stream step).

    Multitask: max(batches per pass) steps, every task in each step, smaller tasks cycling.
    Sequential: all of SST's batches, then Quora's, then STS's, one task per step.
    """
    if multitask:
        n = max(s.batches_per_pass for s in streams.values())
        return [[(t, epoch * n + i) for t in TASKS] for i in range(n)]
    return [[(t, epoch * streams[t].batches_per_pass + i)] for t in TASKS for i in range(streams[t].batches_per_pass)]


def build_optimizer(model: MultitaskBert, cfg: TrainConfig, device: torch.device, total_steps: int):
    """AdamW with the heads at head_lr, no decay on biases/LayerNorm, and the lr schedule."""
    head_ids = {id(p) for p in model.head_parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        groups.setdefault((id(p) in head_ids, p.ndim >= 2), []).append(p)
    param_groups = [{"params": ps, "lr": cfg.head_lr if is_head else cfg.lr,
                     "weight_decay": cfg.weight_decay if decay else 0.0} for (is_head, decay), ps in groups.items()]
    optimizer = torch.optim.AdamW(param_groups, fused=device.type == "cuda")
    warmup = int(cfg.warmup_ratio * total_steps) if cfg.schedule == "linear" else 0

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(cfg: TrainConfig, prepared: Prepared | None = None, out_dir: str | Path | None = None,
          callback: EpochCallback | None = None, resume: bool = True, progress: bool = True) -> list[EpochResult]:
    """Train, evaluating and checkpointing after each epoch; return the per-epoch results.

    With `resume` and a checkpoint in `out_dir`, training continues after its epoch and ends where
    an uninterrupted run would have; the restored epochs are passed to `callback` first, with
    `resumed=True`. The callback returning True stops training after that epoch.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    if prepared is None or not prepared.matches(cfg):
        prepared = prepare(cfg)
    seed_everything(cfg.seed)
    model = MultitaskBert(copy.deepcopy(prepared.encoder), cfg).to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = cfg.amp and device.type == "cuda"
    train_data = {t: d.to(device) for t, d in prepared.train.items()}
    dev_data = {t: d.to(device) for t, d in prepared.dev.items()}
    round_to = 8 if device.type == "cuda" else 1
    streams = {t: TaskStream(train_data[t], cfg.batch_size, cfg.seed, round_to) for t in TASKS}
    steps_per_epoch = len(epoch_plan(streams, cfg.multitask, 0))
    mode = input_mode(device, cfg.packing)
    optimizer, scheduler = build_optimizer(model, cfg, device, steps_per_epoch * cfg.epochs)
    kind, note = resolve_step(cfg, device)
    if note:
        logger.info("%s", note)
    if cfg.compile:
        compile_encoder(model.encoder, kind, device)

    out = Path(out_dir) if out_dir is not None else None
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    state = load_checkpoint(out, map_location=device) if (out is not None and resume) else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        logger.info("resumed %s after epoch %d", out, start_epoch)
    elif out is not None:
        write_run_files(out, cfg.to_dict(), prepared.encoder, prepared.tokenizer)

    results = [EpochResult(**{**h, "resumed": True}) for h in history]
    for r in results:
        if callback is not None and callback(r):
            return results
    check_every = cfg.log_every if device.type == "cuda" else 1
    stats = StepStats(device)  # loss sum and first non-finite step, accumulated on the device
    stepper = None  # None: the eager step (train_step)
    if kind != "eager":
        try:
            compiled = "reduce-overhead" if cfg.compile and kind == "static" and device.type == "cuda" else None
            stepper = StaticStep(model, optimizer, scheduler, train_data, cfg, amp, steps_per_epoch * cfg.epochs,
                                 stats, graphs=kind == "graphs", compiled=compiled)
            logger.info("training step: %s", stepper.describe())
        except ValueError as exc:  # an optimizer or schedule the static step does not implement
            logger.info("%s: eager step", exc)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        plan = epoch_plan(streams, cfg.multitask, epoch)
        stats.reset()
        if stepper is not None:
            stepper.begin_epoch(plan, streams, step)  # the epoch's batches go to the device in one copy
        bar = tqdm(plan, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for i, tasks in enumerate(bar):
            if stepper is not None:
                stepper.step(i)  # queues the step (one graph replay with CUDA graphs); never waits
            else:
                batches = [streams[t].batch(s) for t, s in tasks]
                loss = train_step(model, optimizer, scheduler, streams, batches, amp, cfg.max_grad_norm, mode)
                stats.add(loss, step + 1)
            step += 1
            if (i + 1) % check_every == 0 or i == len(plan) - 1:
                bad = stats.first_nonfinite()  # SYNC: the loop's only wait for the device
                if bad is not None:
                    raise NonFiniteLossError(bad, epoch + 1)
                if progress:
                    bar.set_postfix(loss=f"{stats.mean(i + 1):.3f}", refresh=False)
        bar.close()
        if stepper is not None:
            stepper.end_epoch(step)  # optimizer and scheduler as the eager step leaves them
        metrics, predictions = evaluate(model, dev_data, cfg.eval_batch_size, amp, mode,
                                        widths=stepper.widths if stepper is not None else None)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result = EpochResult(epoch + 1, metrics, stats.mean(len(plan)), time.perf_counter() - t0, step,
                             peak_memory_bytes=peak, predictions=predictions)
        history.append({k: v for k, v in result.to_dict().items() if k != "resumed"})
        results.append(result)
        scores = " ".join(f"{t} {metrics[TASK_TABLE[t].metric]:.3f}" for t in TASKS)
        logger.info("epoch %d/%d: loss %.4f | %s | overall %.4f | %.0fs", epoch + 1, cfg.epochs, result.train_loss,
                    scores, metrics["overall"], result.seconds)
        if out is not None:
            save_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                            step=step, history=history)
        if callback is not None and callback(result):
            break
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Fine-tune one BERT encoder on SST-5, Quora and STS-B at once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--out", default=None, help="run folder: checkpoint, config and metrics (default: none)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start from scratch even if --out holds a checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k not in ("out", "resume", "quiet")})
    try:
        results = train(cfg, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    except (NonFiniteLossError, ValueError, RuntimeError) as exc:
        logger.error("%s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        logger.warning("interrupted: %s", f"{args.out} holds the last finished epoch; the same command resumes it"
                       if args.out else "nothing was saved (no --out)")
        sys.exit(130)
    final = results[-1]
    best = max(results, key=lambda r: r.metrics["overall"])
    print(json.dumps({"epoch": final.epoch, **final.metrics, "best_epoch": best.epoch,
                      "best_overall": best.metrics["overall"],
                      "train_seconds": round(sum(r.seconds for r in results if not r.resumed), 1)}))


if __name__ == "__main__":
    main()
