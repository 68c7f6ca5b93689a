"""Create or resume a study and run it: workers on this machine, one progress bar, a leaderboard.

    python search.py --study quickstart                  # CPU demo, SQLite under storage/
    python search.py --study lr_dropout                  # workers on every visible GPU
    python search.py --study lr_dropout --workers-per-gpu 4
    python search.py --study lr_dropout --launcher slurm --workers 8 --storage-file ~/.mtbert-storage
    python search.py --study lr_dropout --status         # progress and leaderboard, runs nothing
    python search.py --study lr_dropout --dashboard      # optuna-dashboard on 127.0.0.1
    python search.py --study lr_dropout --report         # reports/lr_dropout/report.md and plots
    python search.py --study lr_dropout --export-best DIR  # best checkpoint, CS224N predictions (dev, test, holdout/)
    python search.py --study lr_dropout --confirm 3 --seeds 3  # then re-train the top 3 with 3 fresh seeds each
    python search.py --results                           # docs/results.md from the grid studies

More workers on other machines join with worker.py against the same (PostgreSQL) storage.
A run prints one line per event (trial started, epoch done, pruned, complete, failed), then the
leaderboard, and writes the trials CSV and the report (reports/<study>/) once the budget is met.

Exit status: 0 when the budget is met (or was already: nothing to run) or the run was stopped
with Ctrl-C/SIGTERM (130 with --launcher slurm: the array may run on); 1 when a worker failed (its last ERROR line is printed); 2 for a bad study
file, storage or argument; 3 when the storage stayed unreachable longer than
MTBERT_STORAGE_OUTAGE_SECONDS (the running trials are retried when the study runs again).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna

import storage as storage_lib
from reports.confirmation import print_confirmation
from service import confirm
from service.launch import start_workers, stop_workers, worker_devices
from service.progress import follow, print_summary, write_trials_csv
from service.slurm import add_slurm_arguments, check_arguments, run_array
from service.study import (FINISHED, OVERRIDE_FLAGS, SEED, StudyIdentityError, add_override_arguments,
                           add_speed_arguments, bounded, load_study_spec, open_study, storage_url,
                           study_budget, study_key, study_option, trial_counts)
from mtbert.config import data_problem
from studies import StudySpec, StudySpecError

logger = logging.getLogger("search")
ROOT = Path(__file__).resolve().parent


def reports_dir() -> Path:
    """Where reports go without --out: reports/ here, or $MTBERT_REPORTS_DIR (the test suite's temporary folder)."""
    return Path(os.environ.get("MTBERT_REPORTS_DIR") or ROOT / "reports")


def run_dashboard(url: str, host: str, port: int, writable: bool = False) -> None:
    from service.dashboard import serve

    rdb = storage_lib.open_storage(url, heartbeat=False, create=False)
    artifacts = storage_lib.artifact_store()
    logger.info("optuna-dashboard on http://%s:%d, %s (Ctrl-C to stop)", host, port,
                "WRITABLE: its API can change, rename and delete studies" if writable
                else "read-only (--dashboard-writable allows changes)")
    serve(rdb, artifacts, host, port, writable=writable)


def write_outputs(study: optuna.Study, spec: StudySpec, url: str, args: argparse.Namespace) -> int:
    """--report and --export-best: read the study, run nothing."""
    from reports.export_best import ExportError, export_best
    from reports.study_report import write_report

    try:
        if args.report:
            print(f"report written to {write_report(study, spec, Path(args.out or reports_dir() / spec.name), url)}")
            return 0
        target = Path(args.export_best)
        if problem := repository_target_problem(target):
            logger.error("%s", problem)
            return 2
        predict = [Path(p) for p in args.predict] if args.predict else None
        out = export_best(study, spec, target, args.data_dir, predict)
        print(f"exported {json.loads((out / 'best_trial.json').read_text())['chosen']} to {out}")
    except ExportError as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:  # an output folder that is a file, not writable, a full disk
        logger.error("cannot write %s: %s", exc.filename or args.out or args.export_best, exc.strerror or exc)
        return 2
    return 0


def repository_target_problem(target: Path) -> str | None:
    """Why --export-best must not write to `target`, or None: a checkpoint is hundreds of MB, so a folder
    inside this repository must be one git ignores (runs/ is)."""
    resolved = target.resolve()
    if resolved != ROOT and ROOT not in resolved.parents:
        return None
    advice = "use a folder under runs/ (git-ignored), e.g. --export-best runs/best, or one outside the repository"
    if resolved == ROOT:
        return f"refusing to export into the repository root: {advice}"
    try:
        check = subprocess.run(["git", "check-ignore", "-q", str(resolved)], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no git here: nothing to tell
        return None
    if check.returncode != 1:  # 0: ignored; 128: not a git checkout (e.g. an unpacked archive)
        return None
    return f"refusing to export into {target}: it is inside the repository and not git-ignored; {advice}"


def write_results(url: str, out: Path) -> int:
    """--results: the source report's tables, ours next to theirs, from the storage; a page whose only change
    would be its timestamp is left as it is (docs/results.md is tracked)."""
    from reports.results_page import update_results_page

    try:
        storage_lib.open_storage(url, heartbeat=False, create=False).engine.dispose()  # "no storage at PATH"
        path, changed = update_results_page(url, out)
    except storage_lib.StorageUnavailable as exc:
        logger.error("%s", exc)
        return 2
    print(f"results page written to {path}" if changed else f"results page unchanged: {path} (only its timestamp "
                                                                 f"would change)")
    return 0


def write_study_report(study: optuna.Study, spec: StudySpec, url: str, out: str | None) -> None:
    """After a run that met the budget: the report, so the run ends with something to look at."""
    from reports.study_report import write_report

    try:
        print(f"report written to {write_report(study, spec, Path(out or reports_dir() / spec.name), url)}")
    except Exception as exc:  # the search itself succeeded: a report problem is a warning
        logger.warning("report not written: %s: %s (python search.py %s --report retries)",
                       type(exc).__name__, exc, study_option(spec))


def run_workers(study_arg: str, study: optuna.Study, spec: StudySpec, url: str,
                args: argparse.Namespace) -> tuple[int, bool]:
    """Workers on `study` until its budget is met, started by --launcher: (status, stopped).

    status: 0, 1 when a worker failed (its last ERROR line logged), 3 when the storage stayed down
    (SLURM: run_array's statuses); stopped: the run was interrupted (Ctrl-C, SIGTERM).
    """
    signal.signal(signal.SIGINT, _interrupt)  # a confirmation after a search starts with fresh handlers
    signal.signal(signal.SIGTERM, _interrupt)
    if problem := spec.pruning_problem():  # a run's settings, not an error: the study runs as written
        logger.warning("%s: %s", spec.path, problem)
    if args.launcher == "slurm":
        status = run_array(study_arg, study, spec, url, args)
        return status, status == 130
    p = spec.space.get("batch_size")  # the largest batch a trial may take sizes the packing
    batch = max(p.grid_values() or [p.high or 16]) if p else spec.train.get("batch_size", 16)
    devices = worker_devices(args.workers, args.workers_per_gpu, spec.train.get("model"), int(batch or 16),
                             spec.train.get("max_length", 128))
    log_dir = storage_lib.STORAGE_DIR / "logs" / study_key(study)  # by identity: one folder per study
    workers = start_workers(study_arg, url, devices, args, log_dir)
    _running[:] = workers
    outage, stopped, status = None, False, 0
    try:
        follow(study, spec, workers)
        for w in workers:  # the budget is met: workers exit by themselves
            w.proc.wait()
    except KeyboardInterrupt:
        stopped = True
        logger.warning("stopping workers; their running trials are handed back and resume next time")
    except storage_lib.StorageOutage as exc:  # the workers ride it out as long, then give up too
        outage = exc
    finally:
        signal.signal(signal.SIGINT, _during_shutdown)  # from here on a signal must not break the shutdown
        signal.signal(signal.SIGTERM, _during_shutdown)
        stop_workers(workers)
        if not stopped:  # the budget was met: a signal now stops what follows (a confirmation being set up)
            signal.signal(signal.SIGINT, _interrupt)
            signal.signal(signal.SIGTERM, _interrupt)
    for w in workers:
        if w.failed:
            logger.error("worker %d %s: %s (log: %s)", w.index, w.exit_text(), w.last_error(), w.log_path)
            status = 1
    if outage is not None:
        logger.error("%s; workers stopped, their running trials are retried when the study runs again", outage)
        return 3, stopped
    return status, stopped


def run_confirmation(study: optuna.Study, spec: StudySpec, url: str, args: argparse.Namespace,
                     request: confirm.Request) -> tuple[int, bool]:
    """--confirm K --seeds N (or [confirm]): enqueue X:confirm's trials once, then run them like the search's."""
    cstudy, cspec, _ = confirm.create(study, spec, url, request)
    # the configurations are recorded: no overrides but where this machine has the data
    plain = argparse.Namespace(**{**vars(args), **{k: None for k in OVERRIDE_FLAGS if k != "data_dir"}})
    return run_workers(f"{args.study}{confirm.SUFFIX}", cstudy, cspec, url, plain)


# ------------------------------------------------------------ main


def _interrupt(signum, _frame):
    """The first Ctrl-C or SIGTERM: stop (the workers hand their trials back). Later ones only say so:
    a second signal must not break the shutdown half-way (a third kills the workers)."""
    signal.signal(signal.SIGINT, _during_shutdown)
    signal.signal(signal.SIGTERM, _during_shutdown)
    raise KeyboardInterrupt(signal.Signals(signum).name)


_running: list = []  # the worker processes, for a third signal
_signals_during_shutdown = 0


def _during_shutdown(signum, _frame):
    global _signals_during_shutdown
    _signals_during_shutdown += 1
    if _signals_during_shutdown == 1:
        logger.warning("%s: already stopping; workers are handing back their running trials (once more to kill "
                       "them: their trials are then retried after the heartbeat grace period)",
                       signal.Signals(signum).name)
    else:
        for w in _running:
            if w.proc.poll() is None:
                w.proc.kill()


def check_storage(study: optuna.Study) -> None:
    """StorageLost when the study's SQLite file was deleted or replaced, or the study deleted or renamed."""
    from storage import optuna_compat

    storage_lib.check_storage(optuna_compat.rdb_storage(study), study.study_name, optuna_compat.study_id(study))


class NoStudy(LookupError):
    """The storage has no study of that name."""


def _load_existing(spec: StudySpec, url: str, study_arg: str) -> tuple[optuna.Study, StudySpec]:
    """The study for a command that only reads it, and the spec to read it with: the one recorded on the
    study where the file now differs from it in what changes results (the file is then the wrong guide)."""
    from studies import spec_from_dict
    from studies.spec import OVERRIDES, spec_differences

    rdb = storage_lib.open_storage(url, heartbeat=False, create=False)
    try:
        study = optuna.load_study(study_name=spec.name, storage=rdb)
    except KeyError:
        raise NoStudy(f"no study {spec.name!r} in {storage_lib.redact(url)} (python search.py "
                      f"{study_option(spec)} creates it)") from None
    recorded = study.user_attrs.get("spec")
    differences = spec_differences(recorded, spec) if recorded else []
    if differences and all(d.split(":")[0] in {OVERRIDES[k] for k in OVERRIDES} for d in differences):
        # the study ran with flags (a smoke test's --epochs/--max-examples), the file is as it was: no warning
        logger.info("study %r ran with other values than %s (%s): shown as recorded", spec.name, spec.path.name,
                    "; ".join(differences))
    elif differences:
        logger.warning("%s differs from the study's recorded spec (%s): showing the study as recorded",
                       spec.path, "; ".join(differences))
    if differences:
        try:
            spec = spec_from_dict(recorded)
        except StudySpecError as exc:  # recorded by an older version: fall back to the file
            logger.warning("recorded spec not usable (%s); using the file", exc)
    budget = study_budget(study, spec)
    if budget != spec.n_trials:  # e.g. a smoke test's --n-trials: show the study's own
        spec = dataclasses.replace(spec, n_trials=budget)
    return study, spec


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's or timeout's TERM stops workers like Ctrl-C
    try:
        return run(argv)
    except KeyboardInterrupt:  # before any worker started, or while only reading
        logger.warning("interrupted")
        return 130


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="study name (a file in studies/) or path to a .toml")
    storage_lib.add_storage_arguments(parser)
    parser.add_argument("--workers", type=bounded(int, 1), default=None,
                        help="worker processes here (default: --workers-per-gpu times the visible GPUs, else 1 on CPU); "
                             "with --launcher slurm: array tasks (required)")
    parser.add_argument("--workers-per-gpu", type=bounded(int, 1), default=None,
                        help="pack several trials on each GPU (default: chosen from GPU memory and encoder size, "
                             "and logged; see service/launch.py default_workers_per_gpu)")
    parser.add_argument("--seed", type=SEED, default=None,
                        help="the study's sampler seed, recorded when the study is created (default: the study file's, else "
                             "random); trial k samples with a seed derived from it and k, whichever worker runs it")
    add_speed_arguments(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="print progress and leaderboard; run nothing")
    mode.add_argument("--dashboard", action="store_true",
                      help="start optuna-dashboard on the study's storage, read-only: requests that would change, "
                           "rename or delete studies or trials are refused (see --dashboard-writable)")
    mode.add_argument("--report", action="store_true", help="write report.md and PNG plots of the study (--out)")
    mode.add_argument("--results", action="store_true",
                      help="regenerate the source-report results page from the storage (--out, default "
                           "docs/results.md); needs no --study")
    mode.add_argument("--export-best", metavar="DIR",
                      help="copy the best trial's checkpoint to DIR and write its CS224N predictions (with a "
                           "confirmation: the best confirmed configuration's best seed)")
    parser.add_argument("--confirm", type=bounded(int, 0), metavar="K", default=None,
                        help="after the search, re-train its top K complete configurations (full epochs, no "
                             "pruning) with --seeds fresh training seeds each, as the study <study>:confirm; "
                             "reruns enqueue nothing twice (default: the study file's [confirm] table, else "
                             "none; 0 = none)")
    parser.add_argument("--seeds", type=bounded(int, 2), metavar="N", default=None,
                        help=f"training seeds per confirmed configuration, at least 2 (default: [confirm].seeds, "
                             f"else {confirm.DEFAULT_SEEDS})")
    parser.add_argument("--out", default=None,
                        help="report folder (default: reports/<study>/) or results page (default: docs/results.md)")
    parser.add_argument("--predict", nargs="+", metavar="FILE", default=None,
                        help="with --export-best: predict these CS224N-format files (default: every .csv in "
                             "<data dir>/holdout/, when present)")
    parser.add_argument("--dashboard-writable", action="store_true",
                        help="with --dashboard: allow its write API (notes, user attrs, rename, delete); anyone who "
                             "reaches the port can then change or delete studies")
    parser.add_argument("--host", default="127.0.0.1", help="dashboard address (default: loopback only)")
    parser.add_argument("--port", type=bounded(int, 1, 65535), default=8080, help="dashboard port (default: 8080)")
    add_slurm_arguments(parser)
    add_override_arguments(parser)
    args = parser.parse_args(argv)
    url = storage_url(args, logger)
    if url is None:
        return 2
    problem = None if args.status or args.results or args.dashboard or args.report or args.export_best \
        else check_arguments(args, url)
    if problem:
        logger.error("%s", problem)
        return 2
    if args.results:
        return write_results(url, Path(args.out or ROOT / "docs" / "results.md"))
    if not args.study:
        parser.error("--study is required (except with --results)")
    if confirm.is_confirmation(args.study):
        parent = args.study[: -len(confirm.SUFFIX)]
        parser.error(f"{args.study} is a confirmation study: `python search.py --study {parent} --status` shows it, "
                     f"`--confirm K --seeds N` runs it, `worker.py --study {args.study}` joins it")
    if args.dashboard_writable and not args.dashboard:
        parser.error("--dashboard-writable goes with --dashboard")
    if args.predict and not args.export_best:
        parser.error("--predict goes with --export-best DIR")
    if (args.confirm is not None or args.seeds is not None) and (args.status or args.dashboard or args.report
                                                                 or args.export_best):
        parser.error("--confirm/--seeds run trials: not with --status, --dashboard, --report or --export-best")
    try:
        spec, overrides = load_study_spec(args.study, args)
        request = confirm.request_from(spec, args.confirm, args.seeds)  # --confirm/--seeds over [confirm]
        if args.dashboard:
            try:
                run_dashboard(url, args.host, args.port, writable=args.dashboard_writable)
            except KeyboardInterrupt:
                return 0
            except OSError as exc:  # port taken, address not ours
                logger.error("cannot serve the dashboard on %s:%d: %s (pick another --port)", args.host,
                             args.port, exc.strerror or exc)
                return 2
            return 0
        if args.status or args.report or args.export_best:
            study, spec = _load_existing(spec, url, args.study)
        elif args.launcher != "slurm" and (problem := data_problem(spec.train.get("data_dir"))):
            logger.error("%s", problem)  # before any worker starts (and before the study exists)
            return 2
        else:  # (SLURM: the data may be mounted on the compute nodes only; each task's worker checks)
            study = open_study(spec, url, overrides, seed=args.seed, role="search")
    except (StudySpecError, StudyIdentityError, confirm.ConfirmError, storage_lib.StorageUnavailable, NoStudy) as exc:
        logger.error("%s", exc)
        return 2
    if args.report or args.export_best:
        return write_outputs(study, spec, url, args)

    status = 0
    if not args.status:
        finished = sum(n for state, n in trial_counts(study).items() if state in FINISHED)
        if finished >= spec.n_trials and request is None:
            print(f"budget met: {finished} of {spec.n_trials} trials finished; nothing to run (raise the budget "
                  f"with --n-trials N, or see --report)")
            print_summary(study, spec)
            print_confirmation(study)
            return 0
        stopped = False
        if finished < spec.n_trials:
            try:
                status, stopped = run_workers(args.study, study, spec, url, args)
                check_storage(study)  # workers that finished on a deleted SQLite file print no leaderboard
            except storage_lib.StorageLost as exc:
                logger.error("%s", exc)
                return 2
            except KeyError:  # Optuna's "Record does not exist.": the study went away under the run
                try:
                    check_storage(study)
                except storage_lib.StorageLost as exc:
                    logger.error("%s", exc)
                    return 2
                raise
        else:
            print(f"budget met: {finished} of {spec.n_trials} trials finished; on to the confirmation")
        if status == 3:
            return 3
        if request is not None and (status != 0 or stopped):
            logger.warning("confirmation not started: the search %s; the same command continues it, then confirms",
                           "was stopped" if stopped else "had a failed worker")
        if request is not None and status == 0 and not stopped:
            try:
                status, stopped = run_confirmation(study, spec, url, args, request)
            except confirm.ConfirmError as exc:
                logger.error("%s", exc)
                return 2
            if status == 3:
                return 3

    df = print_summary(study, spec)
    print_confirmation(study)
    if not df.empty and not args.status:
        print(f"\ntrials written to {write_trials_csv(df, study_key(study))}")
        if sum(n for state, n in trial_counts(study).items() if state in FINISHED) >= study_budget(study, spec):
            write_study_report(study, spec, url, args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
