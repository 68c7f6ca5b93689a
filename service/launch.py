"""Local workers: one worker.py process per device, started and stopped by search.py; what each
failed worker last logged as an ERROR.

The storage URL travels to the workers in the environment, never on their command line.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import storage as storage_lib
from service.progress import last_error_line
from service.study import override_argv, speed_argv

logger = logging.getLogger("search")
ROOT = Path(__file__).resolve().parents[1]


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


# ------------------------------------------------------------ how many trials share a GPU

GIB = 1024 ** 3
CONTEXT_BYTES = 0.5 * GIB  # CUDA context, cuBLAS workspaces, allocator slack of one process
# most workers per GPU by encoder size: a small encoder leaves a big GPU mostly idle (on an H200 one
# MiniLM worker used <5% of it and five packed workers ran 3.3x the trials/hour of one), a big one
# fills more of it per worker; 8 is the most the packing measurement goes to (1, 2, 4, 8)
MOST_WORKERS = ((50e6, 8), (200e6, 4), (float("inf"), 2))


@dataclass(frozen=True)
class EncoderSize:
    """What a worker's memory depends on, read from the encoder's config.json (no weights loaded)."""

    params: int
    hidden: int
    layers: int

    @classmethod
    def of(cls, model: str) -> "EncoderSize":
        from transformers import AutoConfig

        from mtbert.config import resolve_model_name

        c = AutoConfig.from_pretrained(resolve_model_name(model))
        h, i = c.hidden_size, c.intermediate_size
        layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h  # attention, feed-forward, 2 LayerNorms
        embeddings = (c.vocab_size + c.max_position_embeddings + getattr(c, "type_vocab_size", 2) + 2) * h
        return cls(embeddings + c.num_hidden_layers * layer + h * h + h, h, c.num_hidden_layers)


def sentences_per_row() -> int:
    """Sentences one batch row puts through the encoder: one per sentence column of each task (a row holds
    one example of every task; bi-encoding, the default, encodes each sentence on its own)."""
    from mtbert.tasks import TASK_TABLE

    return sum(len(task.sentence_columns) for task in TASK_TABLE.values())


def worker_bytes(size: EncoderSize, batch_size: int = 40, max_length: int = 128) -> float:
    """Peak GPU memory of one worker at the widest step, estimated on the high side.

    16 bytes per parameter (fp32 weights, gradients, two AdamW moments), plus activations kept for
    the backward pass: ~34 x hidden bytes per token and layer in bf16 (Korthikanti et al. 2022;
    SDPA keeps no seq x seq matrix) for every sentence of a batch row (sentences_per_row) at max_length, twice (a CUDA graph's
    pool and the eager allocator's cache may each hold one step), plus the CUDA context.
    """
    tokens = sentences_per_row() * batch_size * max_length
    activations = 34 * size.hidden * tokens * size.layers
    return CONTEXT_BYTES + 16 * size.params + 2 * activations


def default_workers_per_gpu(size: EncoderSize | None, gpu_memory: int | None, cpu_cores: int | None = None,
                            batch_size: int = 40, max_length: int = 128) -> tuple[int, str]:
    """Workers per GPU for this encoder, and why: the fewest of what the encoder size allows
    (MOST_WORKERS), what fits in 90% of the GPU's memory (worker_bytes) and one CPU core each."""
    if size is None or gpu_memory is None:
        return 1, "GPU memory or encoder size unknown: 1 worker per GPU"
    most = next(n for limit, n in MOST_WORKERS if size.params < limit)
    need = worker_bytes(size, batch_size, max_length)
    fit = max(1, int(0.9 * gpu_memory // need))
    cores = max(1, cpu_cores) if cpu_cores else most
    n = min(most, fit, cores)
    why = (f"{size.params / 1e6:.0f}M-parameter encoder: at most {most} per GPU; {fit} fit in "
           f"{gpu_memory / GIB:.0f} GiB at ~{need / GIB:.1f} GiB each (batch {batch_size}, {max_length} tokens)")
    return n, why + (f"; {cores} CPU core(s) per GPU" if cores < min(most, fit) else "")


def gpu_memory_bytes() -> int | None:
    """Total memory of the smallest visible GPU, from nvidia-smi (no CUDA context in this process)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = {}
    for line in out.strip().splitlines():
        index, mib = (x.strip() for x in line.split(","))
        sizes[index] = int(float(mib)) * 1024 ** 2
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        chosen = [sizes[i] for i in visible.split(",") if i.strip() in sizes]
        sizes = dict(enumerate(chosen)) if chosen else sizes
    return min(sizes.values()) if sizes else None


def mps_active() -> bool:
    """Whether a CUDA MPS control daemon is running for this user (nvidia-cuda-mps-control -d)."""
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    return (pipe / "control").exists()


def worker_devices(workers: int | None, per_gpu: int | None, model: str | None = None,
                   batch_size: int = 40, max_length: int = 128) -> list[str]:
    """One device per worker: `per_gpu` workers on each visible GPU (default: default_workers_per_gpu
    for `model`, logged with the reason), one CPU worker without a GPU."""
    gpus = visible_gpus()
    if gpus == 0:
        return ["cpu"] * (workers or 1)
    if workers is None and per_gpu is None:
        try:
            size = EncoderSize.of(model or "default")
        except Exception as exc:  # no config.json, unknown model: fall back, say why
            logger.info("encoder size unknown (%s: %s)", type(exc).__name__, exc)
            size = None
        cores = len(os.sched_getaffinity(0)) // gpus if hasattr(os, "sched_getaffinity") else os.cpu_count()
        per_gpu, why = default_workers_per_gpu(size, gpu_memory_bytes(), cores, batch_size, max_length)
        logger.info("%d worker(s) per GPU (%s; --workers-per-gpu N overrides)", per_gpu, why)
    n = workers or gpus * (per_gpu or 1)
    logger.info("CUDA MPS %s", "on: the workers' kernels run concurrently" if mps_active() else
                "off: the workers time-slice each GPU (nvidia-cuda-mps-control -d starts MPS)")
    return [f"cuda:{i % gpus}" for i in range(n)]


def node_cores() -> int:
    """CPU cores this process may use (its affinity mask, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_worker(devices: list[str]) -> int | None:
    """OMP_NUM_THREADS for each of the workers on `devices`: the node's cores shared out, GPU workers
    (whose host side tokenises, collates and launches kernels) as CPU workers; None for one CPU
    worker, which may use them all."""
    if len(devices) == 1 and devices[0] == "cpu":
        return None
    return max(1, node_cores() // len(devices))


@dataclass
class LocalWorker:
    """One worker.py process started here, and where its output goes."""

    index: int
    device: str
    proc: subprocess.Popen
    log: IO[str]
    log_path: Path
    log_start: int  # the log is appended to: this run's output starts at this offset

    @property
    def failed(self) -> bool:
        """Exited on its own with an error (SIGTERM from stop_workers is not a failure)."""
        return self.proc.returncode not in (None, 0, -signal.SIGTERM)

    def exit_text(self) -> str:
        code = self.proc.returncode
        return f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with {code}"

    def last_error(self) -> str:
        """The last ERROR line this run wrote to the log (its message), else the log's last line."""
        if not os.access(self.log_path, os.R_OK):
            return f"(log {self.log_path} unreadable or missing)"
        return last_error_line(self.log_path, self.log_start) or f"(nothing in its log {self.log_path})"


def start_workers(study: str, url: str, devices: list[str], args: argparse.Namespace,
                  log_dir: Path) -> list[LocalWorker]:
    """Start worker.py processes on `study` (a name or a file path); the storage URL (or the path of
    the storage file it came from) travels in the environment, never in argv. No seed is passed: the
    study's seed is recorded on it (service.study.study_seed) and trial k's draws derive from it and k."""
    log_dir.mkdir(parents=True, exist_ok=True)
    passthrough = override_argv(args)
    env = {k: v for k, v in os.environ.items() if k not in ("MTBERT_STORAGE", "MTBERT_STORAGE_FILE")}
    env.update(storage_lib.worker_environment(url, getattr(args, "storage_file", None)), TOKENIZERS_PARALLELISM="false")
    if env.get("MTBERT_DATA_DIR"):  # workers run in the repository: a relative folder means the caller's
        env["MTBERT_DATA_DIR"] = os.path.abspath(env["MTBERT_DATA_DIR"])
    threads = threads_per_worker(devices)
    if threads is not None:  # share the cores instead of oversubscribing (8 GPU workers x 16 threads on 16 cores)
        env["OMP_NUM_THREADS"] = str(threads)
    speed = speed_argv(args)
    workers = []
    for i, device in enumerate(devices):
        path = log_dir / f"worker-{i}.log"
        log = open(path, "a")
        cmd = [sys.executable, str(ROOT / "worker.py"), "--study", study, "--device", device, "--no-progress",
               *speed, *passthrough]
        start = log.tell()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        workers.append(LocalWorker(i, device, proc, log, path, start))
        logger.info("worker %d on %s (log: %s)", i, device, path)
    return workers


def stop_workers(workers: list[LocalWorker], timeout: float = 120.0) -> None:
    """SIGTERM: each worker hands its running trial back for retry; then wait for them."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for w in workers:
        try:
            w.proc.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        w.log.close()
