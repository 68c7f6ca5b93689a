"""Create or resume a study and run it: workers on this machine, one progress bar, a leaderboard.

    python search.py --study quickstart                  # CPU demo, SQLite under storage/
    python search.py --study lr_dropout                  # one worker per visible GPU
    python search.py --study lr_dropout --workers-per-gpu 4
    python search.py --study lr_dropout --status         # progress and leaderboard, runs nothing
    python search.py --study lr_dropout --dashboard      # optuna-dashboard on 127.0.0.1
    python search.py --study lr_dropout --report         # reports/lr_dropout/report.md and plots
    python search.py --study lr_dropout --export-best DIR  # best checkpoint and CS224N predictions
    python search.py --study lr_dropout --confirm 3 --seeds 3  # then re-train the top 3 with 3 fresh seeds each
    python search.py --results                           # docs/results.md from the grid studies

More workers on other machines join with worker.py against the same (PostgreSQL) storage.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import optuna

import storage as storage_lib
from service import confirm
from service.launch import start_workers, stop_workers, worker_devices
from service.progress import follow, print_summary, write_trials_csv
from service.study import OVERRIDE_FLAGS, add_override_arguments, configure_logging, load_study_spec, open_study
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
        out = export_best(study, spec, Path(args.export_best), args.data_dir)
        print(f"exported {json.loads((out / 'best_trial.json').read_text())['chosen']} to {out}")
    except (ExportError, confirm.ConfirmError) as exc:
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


def run_workers(study_arg: str, study: optuna.Study, spec: StudySpec, url: str, args: argparse.Namespace) -> bool:
    """Local worker processes on `study` until its budget is met; False when interrupted (Ctrl-C, TERM)."""
    devices = worker_devices(args.workers, args.workers_per_gpu)
    log_dir = storage_lib.STORAGE_DIR / "logs" / spec.name
    procs = start_workers(study_arg, url, devices, args, log_dir)
    interrupted = False
    try:
        follow(study, spec, procs)
        for p, _ in procs:  # the budget is met: workers exit by themselves
            p.wait()
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("stopping workers; their running trials are handed back and resume next time")
    finally:
        stop_workers(procs)
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode not in (0, -signal.SIGTERM)]
    for i in failed:
        logger.error("worker %d exited with %s; see %s", i, procs[i][0].returncode, log_dir / f"worker-{i}.log")
    return not interrupted


def run_confirmation(study: optuna.Study, spec: StudySpec, url: str, args: argparse.Namespace,
                     request: confirm.Request) -> None:
    """--confirm K --seeds N (or [confirm]): enqueue X:confirm's trials once, then run them like the search's."""
    cstudy, cspec, _ = confirm.create(study, spec, url, request)
    plain = argparse.Namespace(**{**vars(args), **{k: None for k in OVERRIDE_FLAGS}})  # configs are recorded
    run_workers(f"{args.study}{confirm.SUFFIX}", cstudy, cspec, url, plain)


# ------------------------------------------------------------ main


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="study name (a file in studies/) or path to a .toml")
    storage_lib.add_storage_arguments(parser)
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
    parser.add_argument("--confirm", type=int, metavar="K", default=None,
                        help="after the search, re-train its top K complete configurations (full epochs, no "
                             "pruning) with --seeds fresh training seeds each, as the study <study>:confirm; "
                             "reruns enqueue nothing twice (default: the study file's [confirm] table, else "
                             "none; 0 = none)")
    parser.add_argument("--seeds", type=int, metavar="N", default=None,
                        help=f"training seeds per confirmed configuration (default: [confirm].seeds, else "
                             f"{confirm.DEFAULT_SEEDS})")
    parser.add_argument("--out", default=None, help="report folder (default: reports/<study>/) or results page")
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
    if (args.confirm is not None or args.seeds is not None) and (args.status or args.dashboard or args.report
                                                                 or args.export_best):
        parser.error("--confirm/--seeds run trials: not with --status, --dashboard, --report or --export-best")
    if args.confirm is not None and args.confirm < 0 or args.seeds is not None and args.seeds < 2:
        parser.error("--confirm K needs K >= 0 and --seeds N needs N >= 2 (a spread over seeds needs 2)")
    try:
        spec, overrides = load_study_spec(args.study, args)
        request = confirm.request_from(spec, args.confirm, args.seeds)  # --confirm/--seeds over [confirm]
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
    except (StudySpecError, confirm.ConfirmError, storage_lib.StorageUnavailable) as exc:
        logger.error("%s", exc)
        return 2
    if args.report or args.export_best:
        return write_outputs(study, spec, url, args)

    if not args.status:
        if run_workers(args.study, study, spec, url, args) and request is not None:
            try:
                run_confirmation(study, spec, url, args, request)
            except confirm.ConfirmError as exc:
                logger.error("%s", exc)
                return 2

    df = print_summary(study, spec)
    confirm.print_confirmation(study)
    if not df.empty and not args.status:
        print(f"\ntrials written to {write_trials_csv(df, spec.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
