"""Training-throughput benchmark: the project's steps against a naive CS224N-style step.

    python -m mtbert.bench                                   # CPU: reference, eager, static; MiniLM, batch 16
    python -m mtbert.bench --shapes bert-base --batch-sizes 16 32 --compile --jsonl docs/bench/h200-DATE.jsonl

Variants (same model, data and process; each starts from the same weights):
  reference       naive: fp32, tokenises every step, one encoder call per sentence list (5 per step),
                  random batches, `.item()` every step
  eager           the project's eager step (`--step eager`): pre-tokenised length-bucketed batches, bf16
                  autocast where `--amp` resolves to it (CUDA; CPUs with native bf16: mtbert.config.resolve_amp),
                  fused AdamW on CUDA, one fused forward on CUDA (one per column on CPU)
  eager-fp32      eager with amp off (today's CPU step on any CPU; the baseline of bf16)
  fused           eager with one forward per step padded to its longest sentence (CPU's alternative to
                  one forward per column; on CUDA the same as eager)
  packed          eager with several sentences per row (`--packing`, CUDA)
  static          static shapes, staged batches, no host sync (`--step static`; mtbert.static_step)
  graphs          static + CUDA graphs over the whole step (`--step graphs`, CUDA)
  compile         static + torch.compile(mode="reduce-overhead") of the encoder (`--step static --compile`)
  graphs+compile  graphs over the compiled encoder's kernels (`--step graphs --compile`)
  eager+compile   the eager step with the encoder compiled with dynamic shapes (the previous --compile)
  hf-trainer      a peer: transformers.Trainer fine-tunes the same encoder (a sequence-classification head,
                  use_cpu on CPU, bf16 where --amp resolves to it, dynamic padding, group_by_length) on the
                  sentences of the same steps, as many per step; needs `accelerate` (skipped without it)
The timed steps are the first --steps steps of an epoch. Eager and static warm up on --warmup steps;
graphs and the compiled variants run the timed steps twice first, so that every width is compiled or
captured before timing. On CUDA the timed steps run under torch.cuda.set_sync_debug_mode("warn") and
each row says how many host syncs they made (`host_syncs`). One JSON line per measurement (also
appended to --jsonl, with the device, versions, commit and load average), then a table.

The limit: before the variants, the same process measures the device's dense GEMM peak in fp32 and
bf16 at the encoder's shapes (F.linear at one step's tokens x hidden -> hidden, intermediate and
back; the best of them, `gemm` rows). Each variant's MFU is its model FLOP/s (6 x parameters +
attention per real token) against the measured peak of the dtype it computed in; on CUDA also
`mfu_datasheet`, against the card's dense bf16 datasheet peak where it is known.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

if __name__ == "__main__":  # answer --help and bad arguments before the torch import below (seconds)
    from mtbert.cli import bench_parser

    bench_parser(__doc__).parse_args()

import numpy as np
import torch

from .cli import BENCH_VARIANTS
from .config import TrainConfig, amp_label, resolve_amp, resolve_data_dir, resolve_device, resolve_model_name
from .data import RawTask, TaskStream, load_splits, read_task, task_path
from .methods import DEFAULTS
from .model import MultitaskBert, load_pretrained
from .inputs import batch_pieces, encoder_tokens, input_mode
from .static_step import StaticStep, StepStats, compile_encoder
from .tasks import TASK_TABLE, TASKS
from .train import build_optimizer, epoch_plan, train_step

logger = logging.getLogger(__name__)

MODES = ("per_piece", "fused", "packed")  # mtbert.inputs: how a step's sentences reach the encoder
VARIANTS = BENCH_VARIANTS  # (in mtbert.cli, where --help sees them without torch)
CUDA_ONLY = ("packed", "graphs", "compile", "graphs+compile", "eager+compile")
# datasheet dense bf16 peak, TFLOP/s (mfu_datasheet); the MFU itself is against the peak measured in the run
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass
class Measurement:
    name: str
    batch_size: int
    steps: int
    seconds: float
    sentences: int
    tokens: int  # real (non-padding) tokens
    flops: float
    # project variants: token positions the encoder computed in each input mode, over the same steps
    encoder_tokens: dict[str, int] = field(default_factory=dict)
    host_syncs: int | None = None  # CUDA: syncs in the timed steps (set_sync_debug_mode("warn"))
    peak_memory_bytes: int | None = None
    ran: str | None = None  # the step that actually ran the timed steps (graphs may turn off during a run)
    dtype: str = "fp32"  # what the encoder computed in: "fp32" or "bf16" (autocast)

    def row(self, peak: float | None, datasheet: float | None = None) -> dict:
        """peak: the measured GEMM peak of self.dtype (TFLOP/s); datasheet: the card's, CUDA."""
        tflops = self.flops / self.seconds / 1e12
        return {"name": self.name, "batch_size": self.batch_size, "steps": self.steps, "dtype": self.dtype,
                **({"ran": self.ran} if self.ran is not None else {}),
                "sentences_per_s": round(self.sentences / self.seconds, 1),
                "tokens_per_s": round(self.tokens / self.seconds, 1),
                "model_tflops": round(tflops, 4), "mfu": round(tflops / peak, 4) if peak else None,
                **({"mfu_datasheet": round(tflops / datasheet, 4)} if datasheet else {}),
                **({"encoder_tokens_per_real_token": {m: round(n / self.tokens, 3)
                                                      for m, n in self.encoder_tokens.items()}}
                   if self.encoder_tokens else {}),
                **({"host_syncs": self.host_syncs} if self.host_syncs is not None else {}),
                **({"peak_memory_gib": round(self.peak_memory_bytes / 2 ** 30, 2)}
                   if self.peak_memory_bytes is not None else {})}


def flops_per_token(encoder, seq_len: float) -> float:
    """Training FLOPs per token: 6 x non-embedding params + attention (PaLM appendix B)."""
    cfg = encoder.config
    params = sum(p.numel() for n, p in encoder.named_parameters() if "embeddings" not in n)
    return 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_shapes(encoder, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the encoder's dense layers at `tokens` rows: attention projections, FFN in and out."""
    h, i = encoder.config.hidden_size, encoder.config.intermediate_size
    return [(tokens, h, h), (tokens, h, i), (tokens, i, h)]


def gemm_tflops(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, budget: float = 0.5) -> float:
    """Dense F.linear (m x k) @ (k x n) in `dtype`: TFLOP/s, timed for about `budget` seconds (at least once)."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    t0 = time.perf_counter()
    torch.nn.functional.linear(x, w)  # warm-up: the library picks its kernel
    sync(device)
    first = time.perf_counter() - t0
    if first >= budget:  # a slow (emulated) dtype: one call is the measurement
        return 2 * m * k * n / first / 1e12
    t0, calls = time.perf_counter(), 0
    while True:
        torch.nn.functional.linear(x, w)
        calls += 1
        sync(device)
        if time.perf_counter() - t0 >= budget:
            break
    return 2 * m * k * n * calls / (time.perf_counter() - t0) / 1e12


def gemm_peak(encoder, tokens: int, device: torch.device) -> list[dict]:
    """One row per dtype: the best GEMM rate over the encoder's shapes, and each shape's."""
    rows = []
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if device.type == "cuda":  # what the training step runs under on CUDA (train.py)
            torch.backends.cuda.matmul.allow_tf32 = True
        by_shape = {f"{m}x{k}@{k}x{n}": round(gemm_tflops(device, dtype, m, k, n), 4)
                    for m, k, n in gemm_shapes(encoder, tokens)}
        rows.append({"name": "gemm", "dtype": label, "peak_tflops": max(by_shape.values()), "by_shape": by_shape})
    return rows


def reference_step(model, optimizer, tokenizer, raw: dict[str, RawTask], rng: np.random.Generator,
                   batch_size: int, device: torch.device) -> tuple[float, int, int]:
    """The naive step: tokenise now, one forward per sentence list, fp32, sync on .item()."""
    losses, sentences, tokens = [], 0, 0
    for task in TASKS:
        idx = rng.integers(0, len(raw[task].ids), batch_size)
        vecs = []
        for column in raw[task].sentences:
            enc = tokenizer([column[i] for i in idx], padding=True, truncation=True, max_length=128,
                            return_tensors="pt").to(device)
            vecs.append(model.embed(enc["input_ids"], enc["attention_mask"]))
            sentences += len(idx)
            tokens += int(enc["attention_mask"].sum())
        spec = TASK_TABLE[task]
        y = torch.tensor([raw[task].labels[i] for i in idx], device=device,
                         dtype=torch.int64 if spec.integer_labels else torch.float32)
        losses.append(spec.report_loss.fn(spec.outputs(model, vecs), y, vecs, DEFAULTS))
    loss = sum(losses)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), sentences, tokens


def run_reference(model, tokenizer, raw, cfg: TrainConfig, device, steps: int, warmup: int) -> Measurement:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(warmup):
        reference_step(model, optimizer, tokenizer, raw, rng, cfg.batch_size, device)
    sync(device)
    t0, sentences, tokens = time.perf_counter(), 0, 0
    for _ in range(steps):
        _, s, t = reference_step(model, optimizer, tokenizer, raw, rng, cfg.batch_size, device)
        sentences, tokens = sentences + s, tokens + t
    sync(device)
    seconds = time.perf_counter() - t0
    return Measurement("reference", cfg.batch_size, steps, seconds, sentences, tokens, 0.0)


class _Stepper:
    """The step of one variant behind one call: eager (train_step) or mtbert.static_step."""

    def __init__(self, variant: str, model, data, cfg: TrainConfig, device, plan, streams, total_steps: int):
        self.kind = {"static": "static", "compile": "static", "graphs": "graphs",
                     "graphs+compile": "graphs"}.get(variant, "eager")
        self.model, self.cfg, self.plan, self.streams, self.device = model, cfg, plan, streams, device
        self.amp = resolve_amp(cfg.amp, device)[0]
        self.mode = "fused" if variant == "fused" and not cfg.packing else input_mode(device, cfg.packing)
        compiled = compile_encoder(model.encoder, self.kind, device) if variant.endswith("compile") else None
        self.optimizer, self.scheduler = build_optimizer(model, cfg, device, total_steps)
        self.static = None
        if self.kind != "eager":
            self.static = StaticStep(model, self.optimizer, self.scheduler, data, cfg, self.amp, total_steps,
                                     StepStats(device), graphs=self.kind == "graphs",
                                     compiled=compiled)
            self.static.begin_epoch(plan, streams, 0)

    def __call__(self, i: int) -> None:
        if self.static is not None:
            self.static.step(i)
        else:
            batches = [self.streams[t].batch(s) for t, s in self.plan[i]]
            train_step(self.model, self.optimizer, self.scheduler, self.streams, batches, self.amp,
                       self.cfg.max_grad_norm, self.mode)


def run_project(model, data, cfg: TrainConfig, device, steps: int, warmup: int, variant: str,
                check_sync: bool, barrier: tuple[Path, int] | None = None) -> Measurement:
    """Time `steps` steps of the variant's step (see the module docstring for the warm-up)."""
    round_to = 8 if device.type == "cuda" else 1
    streams = {t: TaskStream(data[t], cfg.batch_size, cfg.seed, round_to) for t in TASKS}
    plan = epoch_plan(streams, True, 0)
    if len(plan) < max(steps, warmup):
        raise ValueError(f"an epoch has {len(plan)} steps at batch {cfg.batch_size}: lower --steps/--warmup")
    shaped = variant in ("graphs", "compile", "graphs+compile", "eager+compile")
    warm = [i for _ in range(2) for i in range(steps)] if shaped else list(range(warmup))
    timed = list(range(steps))
    step = _Stepper(variant, model, data, cfg, device, plan[:max(steps, warmup)], streams, len(warm) + steps + 1)
    model.train()
    for i in warm:
        step(i)
    if barrier is not None:
        wait_at_barrier(*barrier)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    syncs = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if check_sync and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        for i in timed:
            step(i)
        if check_sync and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
        sync(device)
        seconds = time.perf_counter() - t0
    sentences = tokens = 0
    slots = dict.fromkeys(MODES + ("static",), 0)
    widths = step.static.step_widths if step.static is not None else None
    for i in timed:  # counted on the host, from host-side lengths
        batches = [streams[t].batch(s) for t, s in plan[i]]
        pieces = [p for b in batches for p in batch_pieces(streams[b.task], b)]
        sentences += sum(len(p.host_lengths) for p in pieces)
        tokens += sum(int(p.host_lengths.sum()) for p in pieces)
        for m in MODES:  # padding each input mode would have cost on these very steps
            slots[m] += encoder_tokens(pieces, m)
        if widths is not None:
            slots["static"] += sum(len(p.host_lengths) for p in pieces) * widths[i]
    if widths is None:
        del slots["static"]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    ran = step.kind
    if step.static is not None:
        ran = step.static.ran()
        if step.static.graph_error:  # the row is labelled by what ran, not by what was asked for
            logger.warning("%s: graphs were turned off: %s", variant, step.static.graph_error)
            ran = f"static (graphs off: {step.static.graph_error})"
    return Measurement(variant, cfg.batch_size, steps, seconds, sentences, tokens, 0.0, slots, syncs, peak, ran=ran,
                       dtype=amp_label(step.amp).replace("off", "fp32"))


def hf_trainer_problem() -> str | None:
    """Why the hf-trainer variant cannot run here (one line), or None."""
    try:
        import accelerate  # noqa: F401  (transformers.Trainer needs it)
    except ImportError:
        return "hf-trainer needs accelerate (pip install accelerate; it is in requirements-dev.txt)"
    return None


def step_sentences(data, cfg: TrainConfig, device, n_steps: int) -> list[list[list[int]]]:
    """The token ids (unpadded) of every sentence of the first `n_steps` steps of run_project's plan."""
    streams = {t: TaskStream(data[t], cfg.batch_size, cfg.seed, 8 if device.type == "cuda" else 1) for t in TASKS}
    plan = epoch_plan(streams, True, 0)
    if len(plan) < n_steps:
        raise ValueError(f"an epoch has {len(plan)} steps at batch {cfg.batch_size}: lower --steps/--warmup")
    steps = []
    for tasks in plan[:n_steps]:
        sentences = []
        for b in (streams[t].batch(s) for t, s in tasks):
            for p in batch_pieces(streams[b.task], b):
                ids = p.column.ids[p.rows, :p.length].cpu()
                sentences += [ids[j, :int(n)].tolist() for j, n in enumerate(p.host_lengths)]
        steps.append(sentences)
    return steps


def run_hf_trainer(model_name: str, tokenizer, data, cfg: TrainConfig, device, steps: int, warmup: int,
                   amp: bool) -> Measurement:
    """transformers.Trainer on the same sentences, as many per step: the user's alternative to this project.

    The same encoder under AutoModelForSequenceClassification (5 labels; the head is a rounding error of
    the FLOPs), AdamW at the same lr, gradient clipping at 1, dynamic padding (DataCollatorWithPadding)
    and group_by_length sampling, use_cpu on CPU, bf16 where `amp`. The label is 0 for every sentence: this
    measures speed, not quality. Timed from the first step after `warmup` to the last step's end.
    """
    import tempfile

    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    per_step = step_sentences(data, cfg, device, warmup + steps)
    size = len(per_step[0])
    if any(len(s) != size for s in per_step):
        raise ValueError("hf-trainer needs the same number of sentences in every step")
    flat = [ids for step in per_step for ids in step]
    dataset = [{"input_ids": ids, "labels": 0} for ids in flat]  # a list is a map-style dataset
    collate = DataCollatorWithPadding(tokenizer)
    tokens_per_batch: list[int] = []

    def collator(features):
        batch = collate(features)
        tokens_per_batch.append(int(batch["attention_mask"].sum()))
        return batch

    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                sync(device)
                times["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + steps:
                sync(device)
                times["end"] = time.perf_counter()

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=5).float()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=size, max_steps=warmup + steps,
                                 learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=1.0,
                                 bf16=amp, use_cpu=device.type == "cpu", train_sampling_strategy="group_by_length",
                                 lr_scheduler_type="linear", warmup_steps=int(cfg.warmup_ratio * (warmup + steps)),
                                 optim="adamw_torch",
                                 logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                                 dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                callbacks=[Clock()]).train()
    seconds = times["end"] - times["start"]
    tokens = sum(tokens_per_batch[warmup:warmup + steps])
    return Measurement("hf-trainer", cfg.batch_size, steps, seconds, size * steps, tokens, 0.0,
                       dtype="bf16" if amp else "fp32")


def wait_at_barrier(folder: Path, processes: int, timeout: float = 600.0) -> None:
    """Packing runs: every bench process times its steps at once, after all have warmed up."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready-{os.getpid()}").touch()
    deadline = time.time() + timeout
    while len(list(folder.glob("ready-*"))) < processes:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(list(folder.glob('ready-*')))} of {processes} processes reached {folder}")
        time.sleep(0.05)


@functools.cache
def code_commit() -> str | None:
    """The commit of the code this process runs ("+uncommitted" with local edits), or None without git.

    Asked of git once per process: the code was imported at the start and every row ran that code.
    """
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        return f"{commit}+uncommitted" if commit and dirty else commit
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else platform), for the rows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What a JSON row needs to be traced: versions, commit, time, and the load on the machine."""
    import transformers

    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": code_commit(),
            "cpu_count": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> None:
    from .cli import bench_parser

    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps if args.steps is not None else (100 if cuda else 20)
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 3)
    variants = list(VARIANTS if args.variants == ["all"] else args.variants or
                    (["reference", "eager", "static"] + (["graphs"] if cuda else [])))
    variants += [v for v in (["packed"] if args.packing else []) + (["compile", "graphs+compile"] if args.compile
                                                                   else []) if v not in variants]
    if args.no_reference and "reference" in variants:
        variants.remove("reference")
    skipped = [v for v in variants if v in CUDA_ONLY and not cuda]
    if skipped:
        logger.info("skipping %s: CUDA only", ", ".join(skipped))
        variants = [v for v in variants if v not in skipped]
    if "hf-trainer" in variants and hf_trainer_problem():
        logger.info("skipping hf-trainer: %s", hf_trainer_problem())
        variants.remove("hf-trainer")
    if args.threads:
        torch.set_num_threads(args.threads)
    amp, amp_reason = resolve_amp(args.amp, device)
    barrier = (Path(args.barrier[0]), args.barrier[1]) if args.barrier else None
    if args.jsonl:  # a path that cannot be written fails now, not after the first measurement
        try:
            Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
            open(args.jsonl, "a").close()
        except OSError as exc:
            parser.error(f"--jsonl {args.jsonl}: cannot write it ({exc.strerror or exc})")
    encoder, tokenizer = load_pretrained(args.model)
    if args.shapes == "bert-base":
        from transformers import BertConfig, BertModel

        encoder = BertModel(BertConfig(vocab_size=len(tokenizer)))
    data_dir = resolve_data_dir(args.data_dir)
    train = load_splits(data_dir, tokenizer, ("train",))["train"]
    data = {t: d.to(device) for t, d in train.items()}
    raw = {t: read_task(task_path(data_dir, t, "train"), t) for t in TASKS} if "reference" in variants else {}
    name = torch.cuda.get_device_name(device) if cuda else f"cpu: {cpu_name()}"
    datasheet = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if cuda else None
    mean_len = float(np.mean(np.concatenate([c.lengths.numpy() for d in train.values() for c in d.columns])))
    per_token = flops_per_token(encoder, mean_len)
    params = sum(p.numel() for p in encoder.parameters())
    logger.info("device %s | encoder %.1fM params (%s) | variants %s | batch sizes %s | %d timed steps",
                name, params / 1e6, args.shapes, " ".join(variants), " ".join(map(str, args.batch_sizes)), steps)
    logger.info("compute: %s; %d intra-op threads", amp_reason, torch.get_num_threads())
    rerun = f"python -m mtbert.bench {' '.join(sys.argv[1:] if argv is None else argv)}".strip()

    def record(row: dict, load_before: float) -> None:
        print(json.dumps(row), flush=True)
        if args.jsonl:
            env = environment(device)
            env["loadavg_1min"] = [round(load_before, 2), env["loadavg_1min"]]  # before and after
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({**row, "warmup": warmup, "threads": torch.get_num_threads(), **env,
                                    "rerun": rerun}) + "\n")

    # the limit, in this process and at this load: one fused step's tokens at the largest batch size
    step_tokens = int(max(args.batch_sizes) * sum(len(TASK_TABLE[t].sentence_columns) for t in TASKS) * mean_len)
    load_before = os.getloadavg()[0]
    peaks = {}
    for row in gemm_peak(encoder, step_tokens, device):
        row = {"device": name, "tokens": step_tokens, **row}
        peaks[row["dtype"]] = row["peak_tflops"]
        record(row, load_before)
        load_before = os.getloadavg()[0]

    rows = []
    for bs in args.batch_sizes:
        for variant in variants:
            if args.compile and variant.endswith("compile") and bs != max(args.batch_sizes):
                continue  # --compile: the largest batch size only (compiling is slow)
            cfg = TrainConfig(batch_size=bs, device=str(device), packing=variant == "packed",
                              amp="off" if variant == "eager-fp32" else args.amp)
            torch.manual_seed(0)
            model = MultitaskBert(copy.deepcopy(encoder), cfg).to(device)
            load_before = os.getloadavg()[0]
            try:
                if variant == "reference":
                    m = run_reference(model, tokenizer, raw, cfg, device, steps, warmup)
                elif variant == "hf-trainer":
                    m = run_hf_trainer(resolve_model_name(args.model), tokenizer, data, cfg, device, steps,
                                       warmup, amp)
                else:
                    m = run_project(model, data, cfg, device, steps, warmup, variant, args.check_sync, barrier)
            except Exception as exc:  # one broken variant must not lose the others' numbers
                logger.error("%s at batch %d failed: %s: %s", variant, bs, type(exc).__name__, exc)
                continue
            finally:
                del model
                if variant.endswith("compile"):  # compiled graphs hold this model's weights
                    from torch import _dynamo

                    _dynamo.reset()
                if cuda:
                    torch.cuda.empty_cache()
            m.flops = m.tokens * per_token
            row = {"device": name, "encoder": args.shapes if args.shapes == "bert-base" else args.model,
                   "params": params, **m.row(peaks[m.dtype], datasheet if m.dtype == "bf16" else None)}
            record(row, load_before)
            rows.append(row)

    print("\nGEMM peak measured in this run (TFLOP/s): " + ", ".join(f"{k} {v:.3f}" for k, v in peaks.items()))
    print(f"\n{'variant':<16}{'batch':>6}{'dtype':>6}{'sent/s':>10}{'tok/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'x ref':>7}"
          f"{'x hf':>7}{'syncs':>7}")

    def ratio(r: dict, peer: str, key: str) -> float:
        other = next((x for x in rows if x["name"] == peer and x["batch_size"] == r["batch_size"]), None)
        return r[key] / other[key] if other else float("nan")

    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['name']:<16}{r['batch_size']:>6}{r['dtype']:>6}{r['sentences_per_s']:>10.0f}"
              f"{r['tokens_per_s']:>11.0f}{r['model_tflops']:>9.3f}{mfu:>7}"
              f"{ratio(r, 'reference', 'sentences_per_s'):>7.2f}{ratio(r, 'hf-trainer', 'tokens_per_s'):>7.2f}"
              f"{r.get('host_syncs', '-'):>7}")
    print("MFU: model FLOP/s over the GEMM peak of the row's dtype above; x ref: sentences/s over reference's; "
          "x hf: training tokens/s over hf-trainer's")
    for r in rows:
        if "encoder_tokens_per_real_token" in r:
            ratios = ", ".join(f"{m} {v:.2f}" for m, v in r["encoder_tokens_per_real_token"].items())
            print(f"encoder token positions per real token at batch {r['batch_size']} ({r['name']}'s steps): {ratios}")
    print(f"device: {name}; load average (1 min) now {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; rerun: {rerun}")
    if args.jsonl:
        print(f"rows appended to {args.jsonl}")


if __name__ == "__main__":
    main()
