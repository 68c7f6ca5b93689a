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
from service.study import OVERRIDE_FLAGS

logger = logging.getLogger("search")
ROOT = Path(__file__).resolve().parents[1]


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def worker_devices(workers: int | None, per_gpu: int) -> list[str]:
    """One device per worker: per_gpu workers on each visible GPU by default, one CPU worker without."""
    gpus = visible_gpus()
    if gpus == 0:
        return ["cpu"] * (workers or 1)
    n = workers or gpus * per_gpu
    return [f"cuda:{i % gpus}" for i in range(n)]


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
        return last_error_line(self.log_path, self.log_start)


def last_error_line(path: Path, start: int = 0) -> str:
    """The message of the last `... ERROR name: message` line after byte `start` of a worker log,
    else its last non-empty line (a traceback's last line), else a note that the log is empty."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError as exc:
        return f"(log {path} unreadable: {exc.strerror or exc})"
    for line in reversed(lines):
        if " ERROR " in line:
            return line.split(" ERROR ", 1)[1]
    return lines[-1] if lines else "(nothing in its log)"


def start_workers(study: str, url: str, devices: list[str], args: argparse.Namespace,
                  log_dir: Path) -> list[LocalWorker]:
    """Start worker.py processes on `study` (a name or a file path); the storage URL (or the path of
    the storage file it came from) travels in the environment, never in argv. With --seed S, worker i
    samples with seed S + i."""
    log_dir.mkdir(parents=True, exist_ok=True)
    passthrough = []
    for flag in OVERRIDE_FLAGS:
        if getattr(args, flag) is not None:
            passthrough += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {k: v for k, v in os.environ.items() if k not in ("MTBERT_STORAGE", "MTBERT_STORAGE_FILE")}
    env.update(storage_lib.worker_environment(url, getattr(args, "storage_file", None)), TOKENIZERS_PARALLELISM="false")
    if env.get("MTBERT_DATA_DIR"):  # workers run in the repository: a relative folder means the caller's
        env["MTBERT_DATA_DIR"] = os.path.abspath(env["MTBERT_DATA_DIR"])
    if all(d == "cpu" for d in devices) and len(devices) > 1:  # share the cores instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(devices)))
    workers = []
    for i, device in enumerate(devices):
        path = log_dir / f"worker-{i}.log"
        log = open(path, "a")
        seed = [] if args.seed is None else ["--seed", str(args.seed + i)]
        cmd = [sys.executable, str(ROOT / "worker.py"), "--study", study, "--device", device, "--no-progress",
               *seed, *passthrough]
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
