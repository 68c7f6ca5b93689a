"""Join a study and run its trials until the study's global budget is met.

    python worker.py --study lr_dropout                                # this machine, SQLite
    python worker.py --study lr_dropout --storage postgresql://... --gpu 1
    python worker.py --study lr_dropout:confirm                        # trials of search.py --confirm

Each trial: sample the study's space, train mtbert, report the study's metric after every epoch,
stop when the pruner says so. A trial whose worker died is retried (heartbeats) and resumes from
its last epoch checkpoint. SIGINT/SIGTERM hand the running trial back for retry and exit (a signal
that arrives while a checkpoint is being written waits until the write is complete).

A trial's run folder is derived from the study's identity, never from its user attributes:
`<checkpoint root>/<study uuid>/trial-<root>`; cleanup deletes only such folders. This file is the
command line; the worker itself is service/worker.py.
"""
from __future__ import annotations

import argparse
import logging
import sys

import storage as storage_lib
from mtbert.config import data_problem, device_problem
from service import confirm
from service.study import (SEED, StudyIdentityError, add_override_arguments, add_speed_arguments, bounded,
                           load_study_spec, open_study, storage_url, study_budget)
from service.worker import Worker, trial_source
from studies import StudySpecError

logger = logging.getLogger("worker")


def pin_device(name: str) -> None:
    """Make a CUDA worker's GPU the process's current device before anything touches CUDA: a worker on
    cuda:3 then opens no context on cuda:0 (emptying caches, device queries), which the packing
    estimate does not count. Training holds its device itself too (mtbert.static_step.device_guard)."""
    if name.startswith("cuda:"):
        import torch

        torch.cuda.set_device(torch.device(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="study name (a file in studies/) or path to a .toml; "
                        "with the suffix ':confirm', the confirmation that search.py --confirm created")
    storage_lib.add_storage_arguments(parser)
    parser.add_argument("--gpu", type=bounded(int, 0), default=None, help="GPU index to train on (sets --device cuda:I)")
    parser.add_argument("--device", default=None,
                        help="'cpu', 'cuda', 'cuda:1', ... (default: the study file's, else GPU if any)")
    parser.add_argument("--seed", type=SEED, default=None, help="the study's sampler seed if this worker creates the study (default: the "
                        "study file's, else random); trial k samples with a seed derived from it and k")
    parser.add_argument("--max-failures", type=bounded(int, 1), default=3,
                        help="stop after this many failed trials in a row (default: 3)")
    parser.add_argument("--poll-seconds", type=bounded(float, 0.01, 3600), default=5.0,
                        help="wait between checks when all remaining trials run elsewhere (default: 5)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no per-epoch progress bars")
    add_override_arguments(parser)
    add_speed_arguments(parser)
    args = parser.parse_args(argv)
    url = storage_url(args, logger)
    if url is None:
        return 2
    device = f"cuda:{args.gpu}" if args.gpu is not None else args.device
    try:
        if confirm.is_confirmation(args.study):  # X:confirm: the trials search.py --confirm enqueued
            spec, study = confirm.open_confirmation(args.study, url, args, seed=args.seed)
        else:
            spec, overrides = load_study_spec(args.study, args)
            study = None
        # the device this worker trains on must exist here: one error now, not a failed trial per claim
        problem = device_problem(device or spec.train.get("device", "auto"), available=True)
        if problem:
            logger.error("%s", problem)
            return 2
        if study is None and (problem := data_problem(spec.train.get("data_dir"))):
            logger.error("%s", problem)  # before the study is opened: a typo in a path leaves no empty study
            return 2
        pin_device(device or spec.train.get("device", "auto"))
        if study is None:
            study = open_study(spec, url, overrides, seed=args.seed)
    except (StudySpecError, StudyIdentityError, confirm.ConfirmError, storage_lib.StorageUnavailable) as exc:
        logger.error("%s", exc)
        return 2
    try:
        worker = Worker(study, spec, device=device, progress=args.progress, max_failures=args.max_failures,
                        poll_seconds=args.poll_seconds, step=args.step, amp=args.amp, source=trial_source(study))
    except storage_lib.StorageConfigError as exc:  # e.g. MTBERT_CHECKPOINT_DIR cannot be created
        logger.error("%s", exc)
        return 2
    worker.install_signal_handlers()
    from mtbert.data import DataError
    from mtbert.model import ModelLoadError

    try:
        try:
            ran = worker.run()
            trials = study.get_trials(deepcopy=False)  # inside the try: a storage outage here is one line too
        except KeyError:  # Optuna's "Record does not exist.": the study was deleted or renamed under us
            worker.check_storage()  # raises StorageLost with the line to show
            raise
    except (DataError, ModelLoadError, storage_lib.StorageLost) as exc:
        logger.error("%s", exc)
        return 2
    except storage_lib.StorageOutage as exc:
        logger.error("%s; this worker stops, its running trial is retried by another worker once the storage "
                     "is back", exc)
        return 3
    from service.ranking import tally_text

    logger.info("worker done: ran %d trial(s); study %s: %s of a budget of %d", ran, spec.name,
                tally_text(trials, prose=True), study_budget(study, spec))
    return 1 if worker.gave_up else 0


if __name__ == "__main__":
    sys.exit(main())
