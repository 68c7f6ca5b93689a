"""Multitask fine-tuning: `python -m mtbert.train --help`.

One step = one batch of each task through the encoder in a single forward pass, the three
losses summed; an epoch runs until the largest training set is exhausted, cycling the others.
The multitask methods (task sampling, loss weighting, PCGrad, pair encoding, losses, layer-wise
lr decay; mtbert.methods) change what a step trains on and how its loss and gradient are formed.
After every epoch: evaluate on dev, checkpoint, then call the caller's callback (which may stop
training, e.g. to prune). The loop never syncs with the GPU except every `log_every` steps.
`--step` picks how a step runs: eager (train_step below), or static shapes with or without CUDA
graphs (mtbert.static_step); 'auto' is the eager step everywhere (the one that has run on a GPU;
static and graphs are opt-in, docs/gpu-steps.md). If CUDA graphs fail (capture, or a replay that did
not train), the run goes on with the eager step from the next step. A CUDA run holds its device as
CUDA's current device throughout (mtbert.static_step.device_guard).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # answer --help and bad arguments before the torch import below (seconds)
    from mtbert.cli import train_parser

    train_parser().parse_args()

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (CheckpointUnreadable, ResumeError, RunMismatch, load_checkpoint, remove_stale_temp_files,
                         run_identity, save_checkpoint, set_rng_states, verify_identity, write_run_files)
from .config import TrainConfig, amp_label, resolve_amp, resolve_data_dir, resolve_device
from .data import Batch, TaskData, TaskStream, joint_inputs, load_splits
from .evaluate import evaluate
from .inputs import batch_pieces, embed_pieces, input_mode
from .methods import (DEFAULTS, cosine_factor, head_output, layer_depth, layer_lr_scale, pcgrad_backward,
                      smart_regularizer, task_loss, task_plan, weigh_losses)
from .model import MultitaskBert, load_pretrained
from .static_step import StaticStep, StepStats, compile_encoder, device_guard, resolve_step
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
    step_kind: str = ""  # the training step that ran this epoch: eager, static, graphs, 'graphs, then eager'
    amp: str = ""  # what it computed in, as TrainConfig.amp resolved on this device: "bf16" or "off"
    eval_seconds: float = 0.0  # of `seconds`, the dev evaluation's share
    checkpoint_seconds: float = 0.0  # writing this epoch's checkpoint (after `seconds`; 0 without out_dir)
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


def task_outputs(model: MultitaskBert, streams: dict[str, TaskStream], batches: list[Batch],
                 mode: str) -> dict[str, tuple[torch.Tensor, list[torch.Tensor] | None]]:
    """Head output and sentence vectors (None when cross-encoded) of each task in `batches`; `mode`
    says how sentences reach the encoder (mtbert.inputs).

    Sentence vectors (bi-encoding) of all batches go through the encoder together; a cross-encoded
    pair task adds one forward of its joint "[CLS] s1 [SEP] s2" inputs.
    """
    bi = [b for b in batches if model.uses_vectors(b.task)]
    vecs = iter(embed_pieces(model, [p for b in bi for p in batch_pieces(streams[b.task], b)], mode) if bi else ())
    outputs = {}
    for b in batches:
        task, stream = TASK_TABLE[b.task], streams[b.task]
        v = [next(vecs) for _ in task.sentence_columns] if model.uses_vectors(b.task) else None
        joint = None
        if model.uses_joint(b.task):
            joint = model.embed(*joint_inputs(stream.data.pair, b.rows, stream.joint_length(b)))
        outputs[b.task] = (head_output(model, task, v, joint), v)
    return outputs


def task_losses(model: MultitaskBert, streams: dict[str, TaskStream], batches: list[Batch],
                mode: str, cfg: TrainConfig = DEFAULTS) -> dict[str, torch.Tensor]:
    """Loss of each task in `batches`: the task's loss that cfg names, plus, with smart_weight > 0
    in training mode, smart_weight times its SMART regulariser (two more forward passes)."""
    outputs = task_outputs(model, streams, batches, mode)
    losses = {}
    for b in batches:
        out, v = outputs[b.task]
        losses[b.task] = task_loss(TASK_TABLE[b.task], cfg)(out, streams[b.task].data.labels[b.rows], v, cfg)
    if cfg.smart_weight > 0 and model.training:
        def forward() -> dict[str, torch.Tensor]:
            return {t: out for t, (out, _) in task_outputs(model, streams, batches, mode).items()}

        smart = smart_regularizer(model, forward, {t: out for t, (out, _) in outputs.items()}, cfg)
        losses = {t: loss + cfg.smart_weight * smart[t] for t, loss in losses.items()}
    return losses


def train_step(model: MultitaskBert, optimizer, scheduler, streams: dict[str, TaskStream], batches: list[Batch],
               amp: bool, max_grad_norm: float, mode: str, cfg: TrainConfig = DEFAULTS) -> torch.Tensor:
    """One optimizer step on the (weighted) sum of the task losses of `batches`; returns it without syncing.

    cfg's methods: the loss weighting forms each task's term; with pcgrad the encoder's gradient is
    the sum of the PCGrad-projected task gradients (mtbert.methods.pcgrad_backward).
    """
    device_type = batches[0].rows.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        losses = task_losses(model, streams, batches, mode, cfg)
        log_vars = model.loss_log_vars if cfg.loss_weighting == "uncertainty" else None
        terms = weigh_losses(losses, cfg, log_vars)
        loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    if cfg.pcgrad and len(terms) > 1:
        shared = list(model.encoder.parameters())
        encoder_ids = {id(p) for p in shared}
        pcgrad_backward(terms, shared, [p for p in model.parameters() if id(p) not in encoder_ids])
    else:
        loss.backward()
    if max_grad_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
    optimizer.step()
    scheduler.step()
    return loss.detach()


def epoch_plan(streams: dict[str, TaskStream], multitask: bool, epoch: int, sampling: str = "all",
               epochs: int = 1, seed: int = 0) -> list[list[tuple[str, int]]]:
    """The steps of one (0-based) epoch, each a list of (task, stream step).

    Multitask: by `sampling` (TrainConfig.task_sampling, mtbert.methods.task_plan); "all" is
    max(batches per pass) steps, every task in each step, smaller tasks cycling.
    Sequential: all of SST's batches, then Quora's, then STS's, one task per step.
    """
    if multitask:
        return task_plan({t: len(streams[t].data) for t in TASKS}, {t: streams[t].batches_per_pass for t in TASKS},
                         sampling, epoch, epochs, seed)
    return [[(t, epoch * streams[t].batches_per_pass + i)] for t in TASKS for i in range(streams[t].batches_per_pass)]


def build_optimizer(model: MultitaskBert, cfg: TrainConfig, device: torch.device, total_steps: int):
    """AdamW with the heads at head_lr, no decay on biases/LayerNorm, and the lr schedule.

    layer_decay < 1: encoder parameters at lr * layer_decay ** (layers - depth), depth 0 the
    embeddings, the top layer at lr (mtbert.methods.layer_depth). Uncertainty weighting's
    log-variances: their own group at uncertainty_lr, no weight decay.
    """
    head_ids = {id(p) for p in model.head_parameters()}
    loss_ids = {id(p) for p in model.loss_parameters()}
    n_layers = model.encoder.config.num_hidden_layers
    groups: dict[tuple[str, bool, int], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        kind = "loss" if id(p) in loss_ids else "head" if id(p) in head_ids else "encoder"
        # depth splits the encoder's groups only under layer decay: at 1 the groups are the report's
        depth = layer_depth(name.removeprefix("encoder."), n_layers) if kind == "encoder" and cfg.layer_decay != 1 else 0
        groups.setdefault((kind, p.ndim >= 2 and kind != "loss", depth), []).append(p)
    lrs = {"head": cfg.head_lr, "loss": cfg.uncertainty_lr}
    param_groups = [{"params": ps,
                     "lr": lrs[kind] if kind in lrs else cfg.lr * layer_lr_scale(depth, n_layers, cfg.layer_decay),
                     "weight_decay": cfg.weight_decay if decay else 0.0}
                    for (kind, decay, depth), ps in groups.items()]
    optimizer = torch.optim.AdamW(param_groups, fused=device.type == "cuda")
    warmup = int(cfg.warmup_ratio * total_steps) if cfg.schedule != "constant" else 0

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "cosine":
            return cosine_factor(step, warmup, total_steps)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(cfg: TrainConfig, prepared: Prepared | None = None, out_dir: str | Path | None = None,
          callback: EpochCallback | None = None, resume: bool = True, progress: bool = True,
          run_id: str | None = None) -> list[EpochResult]:
    """Train, evaluating and checkpointing after each epoch; return the per-epoch results.

    With `resume` and a checkpoint in `out_dir`, training continues after its epoch and ends where
    an uninterrupted run would have; the restored epochs are passed to `callback` first, with
    `resumed=True`. The callback returning True stops training after that epoch.

    The checkpoint is resumed only if it was written by the same run: the same `run_id` (a caller's
    name for the run, e.g. the search's "<study uuid>/trial-<n>") and the same settings that decide
    the result (mtbert.checkpoint.run_settings); otherwise RunMismatch, and CheckpointUnreadable for a
    damaged file (both ResumeError; nothing in the folder is touched). Without `resume` the folder's
    old checkpoint is removed and the run starts from scratch.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    with device_guard(device):  # a worker on cuda:3 touches only cuda:3: model, streams, captures, syncs
        return _train(cfg, device, prepared, out_dir, callback, resume, progress, run_id)


def _train(cfg: TrainConfig, device: torch.device, prepared: Prepared | None, out_dir: str | Path | None,
           callback: EpochCallback | None, resume: bool, progress: bool, run_id: str | None) -> list[EpochResult]:
    """train() on its resolved device, inside that device's guard."""
    if prepared is None or not prepared.matches(cfg):
        prepared = prepare(cfg)
    seed_everything(cfg.seed)
    model = MultitaskBert(copy.deepcopy(prepared.encoder), cfg).to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp, amp_reason = resolve_amp(cfg.amp, device)  # training and evaluation alike
    logger.info("compute: %s", amp_reason)
    # the run's files record the resolved precision, not "auto": an export or evaluation on another machine
    # computes as this run did, whatever that machine's CPU would resolve "auto" to
    cfg = dataclasses.replace(cfg, amp=amp_label(amp))
    train_data = {t: d.to(device) for t, d in prepared.train.items()}
    dev_data = {t: d.to(device) for t, d in prepared.dev.items()}
    round_to = 8 if device.type == "cuda" else 1
    streams = {t: TaskStream(train_data[t], cfg.batch_size, cfg.seed, round_to) for t in TASKS}
    steps_per_epoch = len(epoch_plan(streams, cfg.multitask, 0, cfg.task_sampling, cfg.epochs, cfg.seed))
    mode = input_mode(device, cfg.packing)
    optimizer, scheduler = build_optimizer(model, cfg, device, steps_per_epoch * cfg.epochs)
    kind, note = resolve_step(cfg, device)  # final: what the static step cannot run is 'eager' already
    if note:
        logger.info("%s", note)
    compiled = compile_encoder(model.encoder, kind, device) if cfg.compile else None

    out = Path(out_dir) if out_dir is not None else None
    identity = run_identity(cfg, run_id) if out is not None else None
    history: list[dict[str, Any]] = []
    results: list[EpochResult] = []  # the restored epochs, then this call's
    start_epoch, step = 0, 0
    if out is not None and out.is_dir():
        remove_stale_temp_files(out)  # left by a process killed mid-write (SIGKILL, power loss)
    state = load_checkpoint(out, map_location=device) if (out is not None and resume) else None
    if state is not None:
        verify_identity(out, state, identity)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
            set_rng_states(state["rng"])
            start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
            results = [EpochResult(**{**h, "resumed": True}) for h in history]
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointUnreadable(f"{out / 'checkpoint.pt'}: cannot restore it "
                                       f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None
        logger.info("resumed %s after epoch %d", out, start_epoch)
    elif out is not None:
        write_run_files(out, cfg.to_dict(), prepared.encoder, prepared.tokenizer, identity)

    for r in results:
        if callback is not None and callback(r):
            return results
    check_every = cfg.log_every if device.type == "cuda" else 1
    stats = StepStats(device)  # loss sum and first non-finite step, accumulated on the device
    stepper = None  # None: the eager step (train_step)
    if kind != "eager":
        stepper = StaticStep(model, optimizer, scheduler, train_data, cfg, amp, steps_per_epoch * cfg.epochs,
                             stats, graphs=kind == "graphs", compiled=compiled)
        logger.info("training step: %s", stepper.describe())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        plan = epoch_plan(streams, cfg.multitask, epoch, cfg.task_sampling, cfg.epochs, cfg.seed)
        stats.reset()
        train_loss = 0.0  # the mean of the epoch's steps, read at the last step's check
        if stepper is not None:
            stepper.begin_epoch(plan, streams, step)  # the epoch's batches go to the device in one copy
        bar = tqdm(plan, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=not progress,
                   leave=False, dynamic_ncols=True)
        ran = kind if stepper is None else stepper.ran()
        for i, tasks in enumerate(bar):
            if stepper is not None:
                stepper.step(i)  # queues the step (one graph replay with CUDA graphs); never waits
                if stepper.fallback is not None:  # CUDA graphs failed (logged): the eager step from the next step on
                    stepper.end_epoch(step + 1)
                    stepper, kind, ran = None, "eager", f"{ran}, then eager"
            else:
                batches = [streams[t].batch(s) for t, s in tasks]
                loss = train_step(model, optimizer, scheduler, streams, batches, amp, cfg.max_grad_norm, mode, cfg)
                stats.add(loss, step + 1)
            step += 1
            if (i + 1) % check_every == 0 or i == len(plan) - 1:  # the last step always checks: train_loss
                bad, train_loss = stats.read(i + 1)  # SYNC: the loop's only wait for the device
                if bad is not None:
                    raise NonFiniteLossError(bad, epoch + 1)
                if progress:
                    bar.set_postfix(loss=f"{train_loss:.3f}", refresh=False)
        bar.close()
        if stepper is not None:
            stepper.end_epoch(step)  # optimizer and scheduler as the eager step leaves them
        t_eval = time.perf_counter()
        metrics, predictions = evaluate(model, dev_data, cfg.eval_batch_size, amp, mode,
                                        widths=stepper.widths if stepper is not None else None)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        t_end = time.perf_counter()
        result = EpochResult(epoch + 1, metrics, train_loss, t_end - t0, step,
                             peak_memory_bytes=peak, step_kind=ran, amp=cfg.amp,
                             eval_seconds=t_end - t_eval, predictions=predictions)
        history.append({k: v for k, v in result.to_dict().items() if k != "resumed"})
        results.append(result)
        scores = " ".join(f"{t} {metrics[TASK_TABLE[t].metric]:.3f}" for t in TASKS)
        logger.info("epoch %d/%d: loss %.4f | %s | overall %.4f | %.0fs", epoch + 1, cfg.epochs, result.train_loss,
                    scores, metrics["overall"], result.seconds)
        if out is not None:
            save_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                            step=step, history=history, identity=identity)
            result.checkpoint_seconds = time.perf_counter() - t_end  # where a study's time goes (reports.costs)
        if callback is not None and callback(result):
            break
    return results


def main(argv: list[str] | None = None) -> None:
    from .cli import train_parser

    parser = train_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k not in ("out", "resume", "quiet")})
    try:
        results = train(cfg, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    except RunMismatch as exc:
        logger.error("%s: use a new --out, or --no-resume to start over in it", exc)
        sys.exit(1)
    except ResumeError as exc:
        logger.error("%s: --no-resume starts over in that folder", exc)
        sys.exit(1)
    except (NonFiniteLossError, ValueError, RuntimeError) as exc:
        logger.error("%s", exc)
        sys.exit(1)
    except OSError as exc:  # --out is a file or not writable (a full disk is CheckpointWriteError above)
        logger.error("cannot write %s: %s", exc.filename or args.out, exc.strerror or exc)
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
