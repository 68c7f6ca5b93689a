"""Local workers: one worker.py process per device, started and stopped by search.py.

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
from pathlib import Path

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


def start_workers(study: str, url: str, devices: list[str], args: argparse.Namespace, log_dir: Path) -> list:
    """Start worker.py processes on `study` (a name or a file path); the storage URL (or the path of
    the storage file it came from) travels in the environment, never in argv. With --seed S, worker i samples with seed S + i."""
    log_dir.mkdir(parents=True, exist_ok=True)
    passthrough = []
    for flag in OVERRIDE_FLAGS:
        if getattr(args, flag) is not None:
            passthrough += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {k: v for k, v in os.environ.items() if k not in ("MTBERT_STORAGE", "MTBERT_STORAGE_FILE")}
    env.update(storage_lib.worker_environment(url, getattr(args, "storage_file", None)), TOKENIZERS_PARALLELISM="false")
    if all(d == "cpu" for d in devices) and len(devices) > 1:  # share the cores instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(devices)))
    procs = []
    for i, device in enumerate(devices):
        log = open(log_dir / f"worker-{i}.log", "a")
        seed = [] if args.seed is None else ["--seed", str(args.seed + i)]
        cmd = [sys.executable, str(ROOT / "worker.py"), "--study", study, "--device", device, "--no-progress",
               *seed, *passthrough]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
        logger.info("worker %d on %s (log: %s)", i, device, log.name)
    return procs


def stop_workers(procs: list, timeout: float = 120.0) -> None:
    """SIGTERM: each worker hands its running trial back for retry; then wait for them."""
    for p, _ in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for p, log in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()
