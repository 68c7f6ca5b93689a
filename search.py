"""Create or resume a study and run it: workers on this machine, one progress bar, a leaderboard.

    python search.py --study quickstart                  # CPU demo, SQLite under storage/
    python search.py --study lr_dropout                  # one worker per visible GPU
    python search.py --study lr_dropout --workers-per-gpu 4
    python search.py --study lr_dropout --status         # progress and leaderboard, runs nothing
    python search.py --study lr_dropout --dashboard      # optuna-dashboard on 127.0.0.1
    python search.py --study lr_dropout --report         # reports/lr_dropout/report.md and plots
    python search.py --study lr_dropout --export-best DIR  # best checkpoint, CS224N predictions (dev, test, holdout/)
    python search.py --results                           # docs/results.md from the grid studies

More workers on other machines join with worker.py against the same (PostgreSQL) storage.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import optuna

import storage as storage_lib
from service.launch import start_workers, stop_workers, worker_devices
from service.progress import follow, print_summary, write_trials_csv
from service.study import add_override_arguments, configure_logging, load_study_spec, open_study
from studies import StudySpec, StudySpecError

logger = logging.getLogger("search")
ROOT = Path(__file__).resolve().parent


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
        predict = [Path(p) for p in args.predict] if args.predict else None
        print(f"best trial exported to {export_best(study, spec, Path(args.export_best), args.data_dir, predict)}")
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
    storage_lib.add_storage_arguments(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes here (default: one per visible GPU, else 1 on CPU)")
    parser.add_argument("--workers-per-gpu", type=int, default=None,
                        help="pack several trials on each GPU (default: chosen from GPU memory and encoder size, "
                             "and logged; see service/launch.py default_workers_per_gpu)")
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
    parser.add_argument("--predict", nargs="+", metavar="FILE", default=None,
                        help="with --export-best: predict these CS224N-format files (default: every .csv in "
                             "<data dir>/holdout/, when present)")
    parser.add_argument("--host", default="127.0.0.1", help="dashboard address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="dashboard port")
    add_override_arguments(parser)
    args = parser.parse_args(argv)
    try:
        url = storage_lib.resolve_url(args.storage, args.storage_file)
    except storage_lib.StorageUnavailable as exc:
        configure_logging(None)
        logger.error("%s", exc)
        return 2
    configure_logging(url)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's or timeout's TERM stops workers like Ctrl-C
    if args.results:
        return write_results(url, Path(args.out or ROOT / "docs" / "results.md"))
    if not args.study:
        parser.error("--study is required (except with --results)")
    if args.predict and not args.export_best:
        parser.error("--predict goes with --export-best DIR")
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
        batch = spec.space["batch_size"].high if "batch_size" in spec.space else spec.train.get("batch_size", 16)
        devices = worker_devices(args.workers, args.workers_per_gpu, spec.train.get("model"), int(batch or 16),
                                 spec.train.get("max_length", 128))
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
