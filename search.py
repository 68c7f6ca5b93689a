"""Create or resume a study and run it: workers on this machine, one progress bar, a leaderboard.

    python search.py --study quickstart                  # CPU demo, SQLite under storage/
    python search.py --study lr_dropout                  # one worker per visible GPU
    python search.py --study lr_dropout --workers-per-gpu 4
    python search.py --study lr_dropout --status         # progress and leaderboard, runs nothing
    python search.py --study lr_dropout --dashboard      # optuna-dashboard on 127.0.0.1
    python search.py --study lr_dropout --report         # reports/lr_dropout/report.md and plots
    python search.py --study lr_dropout --export-best DIR  # best checkpoint and CS224N predictions
    python search.py --results                           # docs/results.md from the grid studies

More workers on other machines join with worker.py against the same (PostgreSQL) storage.
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

import optuna
import pandas as pd
from optuna.trial import TrialState
from tqdm.auto import tqdm

import storage as storage_lib
from service.ranking import best_trial, leaderboard
from studies import StudySpec, StudySpecError
from service.study import (FINISHED, OVERRIDE_FLAGS, add_override_arguments, configure_logging, load_study_spec,
                           open_study, trial_counts)

logger = logging.getLogger("search")
ROOT = Path(__file__).resolve().parent


# ------------------------------------------------------------ workers


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
    """Start worker.py processes on `study` (a name or a file path); the storage URL travels in the
    environment, never in argv. With --seed S, worker i samples with seed S + i."""
    log_dir.mkdir(parents=True, exist_ok=True)
    passthrough = []
    for flag in OVERRIDE_FLAGS:
        if getattr(args, flag) is not None:
            passthrough += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "MTBERT_STORAGE": url, "TOKENIZERS_PARALLELISM": "false"}
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


def follow(study: optuna.Study, spec: StudySpec, procs: list, poll: float = 2.0) -> None:
    """One progress bar for the study until its budget is met or every worker has exited."""
    bar = tqdm(total=spec.n_trials, desc=spec.name, unit="trial", dynamic_ncols=True)
    try:
        while True:
            counts = trial_counts(study)
            finished = sum(counts[s] for s in FINISHED)
            bar.n = min(finished, spec.n_trials)
            bar.set_postfix_str(progress_text(study, spec, counts), refresh=True)
            if finished >= spec.n_trials or all(p.poll() is not None for p, _ in procs):
                break
            time.sleep(poll)
    finally:
        bar.close()


def progress_text(study: optuna.Study, spec: StudySpec, counts) -> str:
    best = best_trial(study, spec)
    best_text = f"best {best.value:.4f} (#{best.number})" if best else "best -"
    return (f"complete {counts[TrialState.COMPLETE]} pruned {counts[TrialState.PRUNED]} "
            f"failed {counts[TrialState.FAIL]} running {counts[TrialState.RUNNING]} | {best_text}")


# ------------------------------------------------------------ results


def print_summary(study: optuna.Study, spec: StudySpec, top: int = 10) -> pd.DataFrame:
    df = leaderboard(study, spec)
    counts = trial_counts(study)
    print(f"\nstudy {spec.name}: {progress_text(study, spec, counts)} | budget {spec.n_trials}")
    if not df.empty:
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
            print(df.head(top).to_string(index=False))
    return df


def write_trials_csv(df: pd.DataFrame, name: str) -> Path:
    path = storage_lib.STORAGE_DIR / f"{name}-trials.csv"
    df.to_csv(path, index=False)
    return path


def run_dashboard(url: str, host: str, port: int) -> None:
    from optuna_dashboard import run_server

    logger.info("optuna-dashboard on http://%s:%d (Ctrl-C to stop)", host, port)
    run_server(storage_lib.open_storage(url, heartbeat=False), host=host, port=port,
               artifact_store=storage_lib.artifact_store())


def write_outputs(study: optuna.Study, spec: StudySpec, url: str, args: argparse.Namespace) -> int:
    """--report and --export-best: read the study, run nothing."""
    from reports.export_best import ExportError, export_best
    from reports.study_report import write_report

    if args.report:
        print(f"report written to {write_report(study, spec, Path(args.out or ROOT / 'reports' / spec.name), url)}")
        return 0
    try:
        print(f"best trial exported to {export_best(study, spec, Path(args.export_best), args.data_dir)}")
    except ExportError as exc:
        logger.error("%s", exc)
        return 2
    return 0


def write_results(url: str, out: Path) -> int:
    """--results: the source report's tables, ours next to theirs, from the storage."""
    from reports.results_page import write_results_page

    try:
        print(f"results page written to {write_results_page(url, out)}")
    except storage_lib.StorageUnavailable as exc:
        logger.error("%s", exc)
        return 2
    return 0


# ------------------------------------------------------------ main


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="study name (a file in studies/) or path to a .toml")
    parser.add_argument("--storage", default=None,
                        help="storage URL (default: $MTBERT_STORAGE, else SQLite in storage/)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes here (default: one per visible GPU, else 1 on CPU)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="pack several trials on each GPU")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampler seed: worker i gets SEED + i (default: the study file's, else random)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="print progress and leaderboard; run nothing")
    mode.add_argument("--dashboard", action="store_true", help="start optuna-dashboard on the study's storage")
    mode.add_argument("--report", action="store_true", help="write report.md and PNG plots of the study (--out)")
    mode.add_argument("--results", action="store_true",
                      help="regenerate the source-report results page from the storage (--out, default "
                           "docs/results.md); needs no --study")
    mode.add_argument("--export-best", metavar="DIR",
                      help="copy the best trial's checkpoint to DIR and write its CS224N predictions")
    parser.add_argument("--out", default=None, help="report folder (default: reports/<study>/) or results page")
    parser.add_argument("--host", default="127.0.0.1", help="dashboard address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="dashboard port")
    add_override_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.storage)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's or timeout's TERM stops workers like Ctrl-C
    url = storage_lib.resolve_url(args.storage)
    if args.results:
        return write_results(url, Path(args.out or ROOT / "docs" / "results.md"))
    if not args.study:
        parser.error("--study is required (except with --results)")
    try:
        spec, overrides = load_study_spec(args.study, args)
        if args.dashboard:
            try:
                run_dashboard(url, args.host, args.port)
            except OSError as exc:  # port taken, address not ours
                logger.error("cannot serve the dashboard on %s:%d: %s (pick another --port)", args.host,
                             args.port, exc.strerror or exc)
                return 2
            return 0
        if args.status or args.report or args.export_best:
            study = optuna.load_study(study_name=spec.name, storage=storage_lib.open_storage(url, heartbeat=False))
        else:
            study = open_study(spec, url, overrides, seed=args.seed, role="search")
    except KeyError:
        logger.error("no study %r in %s (python search.py --study %s creates it)", spec.name,
                     storage_lib.redact(url), spec.name)
        return 2
    except (StudySpecError, storage_lib.StorageUnavailable) as exc:
        logger.error("%s", exc)
        return 2
    if args.report or args.export_best:
        return write_outputs(study, spec, url, args)

    if not args.status:
        devices = worker_devices(args.workers, args.workers_per_gpu)
        log_dir = storage_lib.STORAGE_DIR / "logs" / spec.name
        procs = start_workers(args.study, url, devices, args, log_dir)
        try:
            follow(study, spec, procs)
            for p, _ in procs:  # the budget is met: workers exit by themselves
                p.wait()
        except KeyboardInterrupt:
            logger.warning("stopping workers; their running trials are handed back and resume next time")
        finally:
            stop_workers(procs)
        failed = [i for i, (p, _) in enumerate(procs) if p.returncode not in (0, -signal.SIGTERM)]
        for i in failed:
            logger.error("worker %d exited with %s; see %s", i, procs[i][0].returncode, log_dir / f"worker-{i}.log")

    df = print_summary(study, spec)
    if not df.empty and not args.status:
        print(f"\ntrials written to {write_trials_csv(df, spec.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
