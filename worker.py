"""Join a study and run its trials until the study's global budget is met.

    python worker.py --study lr_dropout                                # this machine, SQLite
    python worker.py --study lr_dropout --storage postgresql://... --gpu 1
    python worker.py --study lr_dropout:confirm                        # trials of search.py --confirm

Each trial: sample the study's space, train mtbert, report the study's metric after every epoch,
stop when the pruner says so. A trial whose worker died is retried (heartbeats) and resumes from
its last epoch checkpoint. SIGINT/SIGTERM hand the running trial back for retry and exit (a signal
that arrives while a checkpoint is being written waits until the write is complete).

A trial's run folder is derived from the study's identity, never from its user attributes:
`<checkpoint root>/<study uuid>/trial-<root>` (service.study.trial_dir), and mtbert.train resumes
it only if the checkpoint there was written by this trial's retry chain with the same settings;
otherwise (or if the checkpoint is damaged) the trial starts from scratch. Cleanup deletes only
such derived folders, and nothing that does not resolve inside the checkpoint root.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

import storage as storage_lib
from mtbert.tasks import SCORES, data_problem
from mtbert.config import device_problem
from service import confirm
from service.study import (FINISHED, SEED, StudyIdentityError, add_override_arguments, add_speed_arguments, bounded,
                           load_study_spec, open_study, run_id, storage_url, study_budget, study_uuid, trial_counts,
                           trial_dir, trial_identity, trial_root)
from storage import optuna_compat
from studies import StudySpec, StudySpecError

logger = logging.getLogger("worker")

# what one attempt of a trial writes about itself: a retry inherits the attempt's user attrs (Optuna
# copies them), so it clears these when it starts, keeping the earlier reasons in `previous_fail_reasons`
ATTEMPT_ATTRS = ("fail_reason", "resumed_from_epoch", "restarted_from_scratch")


class NonFiniteScore(ValueError):
    """A trial's dev score is NaN or infinite: it fails with this reason (Optuna refuses such a value)."""


class WorkerInterrupted(BaseException):
    """SIGINT/SIGTERM while a trial runs: hand the trial back for retry."""


def device_name(device: str) -> str:
    import torch

    from mtbert.config import resolve_device

    d = resolve_device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"


class Worker:
    """Runs trials of one study; see the module docstring."""

    def __init__(self, study: optuna.Study, spec: StudySpec, device: str | None = None, progress: bool = True,
                 max_failures: int = 3, poll_seconds: float = 5.0, checkpoint_root: Path | None = None,
                 artifact_store=None, step: str | None = None,
                 amp: str | None = None):
        self.study, self.spec, self.device = study, spec, device
        self.step = step  # --step: a speed setting over the study's [train] step (None: the study's)
        self.amp = amp  # --amp: likewise, over [train] amp
        self.artifact_store = artifact_store  # default: storage.artifact_store(), opened at the first record
        self.progress, self.max_failures, self.poll_seconds = progress, max_failures, poll_seconds
        # trial folders are <root>/<study uuid>/trial-<n> (service.study.trial_dir); nothing outside is deleted
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root is not None else storage_lib.checkpoint_dir()
        self.prepared = None  # tokenizer, pretrained encoder and data: loaded once, shared by trials
        self.dev_predictions = None  # of the running trial's last trained epoch
        self.stop_requested = False
        self.in_trial = False
        self.gave_up = False
        self.confirmation = confirm.Confirmation.of(study)  # X:confirm: fixed configurations and seeds, not samples

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        """Run trials until the budget is met, a stop is requested or `max_failures` trials in a row
        failed (then self.gave_up is set); return how many trials this worker ran.

        The model and data are loaded before the first trial is claimed, so a missing data folder
        or an unloadable model is one error (mtbert's DataError / ModelLoadError) and no failed trials.
        """
        counts = trial_counts(self.study)
        if sum(counts[s] for s in FINISHED) >= study_budget(self.study, self.spec):
            return 0
        self.prepare()
        ran, failures = 0, 0
        while not self.stop_requested:
            trial = self.claim()
            if trial == "done":
                break
            if trial == "wait":  # every remaining slot is running elsewhere; wait in case one dies
                time.sleep(self.poll_seconds)
                continue
            if self.stop_requested:  # a signal came while claiming
                self.hand_back(trial)
                break
            state = self.run_trial(trial)
            ran += 1
            failures = failures + 1 if state == TrialState.FAIL else 0
            if failures >= self.max_failures:
                logger.error("%d trials in a row failed; this worker stops", failures)
                self.gave_up = True
                break
        return ran

    def prepare(self, cfg=None) -> None:
        """Tokenizer, pretrained encoder and tokenised data for `cfg` (default: the study's fixed values)."""
        from mtbert.config import TrainConfig
        from mtbert.train import prepare

        cfg = cfg or TrainConfig().replace(**self.spec.train)
        if self.prepared is None or not self.prepared.matches(cfg):
            self.prepared = prepare(cfg)

    def claim(self) -> optuna.Trial | str:
        """Under the study's lock: retry dead trials, then start one only if the budget allows."""
        with storage_lib.trial_slot_lock(optuna_compat.rdb_storage(self.study), self.study.study_name):
            self.check_storage()  # a deleted/replaced SQLite file or a renamed study: StorageLost, one line
            optuna_compat.adopt_unbeaten_trials(self.study)  # so that fail_stale_trials can judge them too
            fail_stale_trials(self.study)
            counts = trial_counts(self.study)
            if self.confirmation is not None:  # exactly its enqueued trials (and their retries); never a new sample
                return self.study.ask() if counts[TrialState.WAITING] else "wait" if counts[TrialState.RUNNING] else "done"
            finished, budget = sum(counts[s] for s in FINISHED), study_budget(self.study, self.spec)
            if finished >= budget:  # the study's recorded budget, read now: an edit reaches every worker at once
                return "done"
            if finished + counts[TrialState.RUNNING] >= budget:
                return "wait"
            return self.study.ask()

    def check_storage(self) -> None:
        """StorageLost when the storage or the study this worker opened is no longer there (storage.check_storage)."""
        storage_lib.check_storage(optuna_compat.rdb_storage(self.study), self.study.study_name,
                                  optuna_compat.study_id(self.study))

    def run_trial(self, trial: optuna.Trial) -> TrialState:
        with optuna_compat.heartbeat(self.study, trial):
            try:
                self.in_trial = True
                value = self.train_trial(trial)
                state = TrialState.COMPLETE
            except optuna.TrialPruned as exc:
                state, value = TrialState.PRUNED, None
                logger.info("trial %d pruned: %s", trial.number, exc)
            except WorkerInterrupted:
                self.in_trial = False
                self.hand_back(trial)
                self.stop_requested = True
                return TrialState.RUNNING
            except storage_lib.StorageOutage:  # no write can succeed: the trial stays RUNNING, its
                raise                           # heartbeats stop, and another worker retries it later
            except optuna.exceptions.UpdateFinishedTrialError:
                # failed meanwhile by another worker (our heartbeats missed its grace, e.g. in a storage outage)
                frozen = self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                logger.warning("trial %d was marked %s by another worker (missed heartbeats); its retry resumes "
                               "from the checkpoint", trial.number, frozen.state.name)
                return frozen.state
            except Exception as exc:  # OOM, NaN loss, bad data...: this trial fails, the worker goes on
                state, value = TrialState.FAIL, None
                reason = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    trial.set_user_attr("fail_reason", reason[:2000])
                logger.error("trial %d failed: %s", trial.number, reason)
                free_accelerator_memory()
            finally:
                self.in_trial = False
            if state in FINISHED:  # before tell: Optuna attaches artifacts to running trials only
                self.record(trial, state, value)
        frozen = self.study.tell(trial, value, state=state, skip_if_finished=True)
        if frozen.state != state:  # failed meanwhile by another worker: our heartbeats came too late
            logger.warning("trial %d was marked %s by another worker (missed heartbeats); its retry resumes "
                           "from the checkpoint", trial.number, frozen.state.name)
            return frozen.state
        if state == TrialState.COMPLETE:
            logger.info("trial %d complete: %s %.4f", trial.number, self.spec.metric, value)
        self.cleanup_checkpoints(frozen)
        return state

    def record(self, trial: optuna.Trial, state: TrialState, value: float | None) -> None:
        """Dashboard note and artifacts of a finished trial (service.trial_records); never fails the worker."""
        try:
            from service.trial_records import record_trial

            if self.artifact_store is None:
                self.artifact_store = storage_lib.artifact_store()
            dev = self.prepared.dev if self.prepared is not None else None
            record_trial(self.study, trial, dev, self.artifact_store, state, value, self.dev_predictions)
        except Exception as exc:
            logger.warning("trial %d: note and artifacts not recorded: %s: %s", trial.number, type(exc).__name__, exc)

    def hand_back(self, trial: optuna.Trial) -> None:
        """Fail the trial now and queue its retry (it resumes from its checkpoint) under the lock."""
        with storage_lib.trial_slot_lock(optuna_compat.rdb_storage(self.study), self.study.study_name):
            optuna_compat.mark_handed_back(self.study, trial)  # not a crash: MTBERT_MAX_RETRY does not count it
            epoch = trial.user_attrs.get("epochs_done") or 0
            trial.set_user_attr("fail_reason", f"stopped by a signal; will resume from epoch {epoch}" if epoch
                                else "stopped by a signal; will start again")
            frozen = self.study.tell(trial, state=TrialState.FAIL)
            optuna_compat.queue_retry(self.study, frozen)
        logger.warning("trial %d handed back for retry: it resumes from its last checkpoint (not a failure: "
                       "MTBERT_MAX_RETRY counts crashes only)", trial.number)

    # ------------------------------------------------------------ one trial

    def train_trial(self, trial: optuna.Trial) -> float:
        from mtbert.checkpoint import ResumeError
        from mtbert.config import TrainConfig, resolve_data_dir
        from mtbert.train import train

        if self.confirmation is not None:  # the parent trial's config with this trial's seed (service.confirm)
            values = self.confirmation.trial_values(trial, self.spec)
        else:
            values = self.spec.suggest(trial)
        speed = {k: v for k, v in (("device", self.device), ("step", self.step), ("amp", self.amp)) if v}
        cfg = TrainConfig().replace(**{**values, **speed})
        self.prepare(cfg)  # a no-op unless the space searches the model or the data
        history = optuna_compat.retry_history(self.study, trial)
        root = history[0] if history else trial.number
        if history:
            self.start_retry(trial, history)
        out = trial_dir(self.study, root, self.checkpoint_root)
        trial.set_user_attr("checkpoint", str(out))  # for people only: cleanup and export derive the path
        trial.set_user_attr("device", device_name(cfg.device))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("config", cfg.to_dict())
        optuna_compat.set_trial_system_attr(self.study, trial, "identity", trial_identity(cfg))  # by content
        trial.set_user_attr("data_dir", os.path.abspath(resolve_data_dir(cfg.data_dir)))  # what the report reruns on
        epoch_seconds: list[float] = []
        per_epoch: list[dict[str, Any]] = []  # user attr `history`: the dashboard note's rows
        self.dev_predictions = None

        def on_epoch(result) -> None:
            value = result.metrics[self.spec.metric]
            if not math.isfinite(value):  # a failed trial with its reason, before it reaches report/tell
                raise NonFiniteScore(f"epoch {result.epoch}: {self.spec.metric} is {value} (training diverged: "
                                     "lower the learning rate)")
            if result.resumed:
                trial.set_user_attr("resumed_from_epoch", result.epoch)
            else:
                epoch_seconds.append(round(result.seconds, 2))
            self.dev_predictions = result.predictions  # what the artifacts show: the last epoch's
            scores = {k: result.metrics[k] for k in SCORES}
            for key, score in scores.items():
                trial.set_user_attr(key, score)
            trial.set_user_attr("epochs_done", result.epoch)
            if result.peak_memory_bytes is not None:  # CUDA: peak memory of this trial so far
                trial.set_user_attr("peak_memory_bytes", result.peak_memory_bytes)
            trial.set_user_attr("epoch_seconds", epoch_seconds)
            if not result.resumed and result.step_kind:  # which training step made this score (mtbert.static_step)
                trial.set_user_attr("step", result.step_kind)
            if result.amp:  # and in which precision ("auto" resolves per machine: bf16 or off)
                trial.set_user_attr("amp", result.amp)
            per_epoch.append({"epoch": result.epoch, **scores, "seconds": round(result.seconds, 2)})
            trial.set_user_attr("history", per_epoch)
            with warnings.catch_warnings():  # a resumed epoch may have been reported before the crash
                warnings.simplefilter("ignore")
                trial.report(value, result.epoch)
            # after the last epoch the work is done: keep the result rather than prune it
            if result.epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"epoch {result.epoch}: {self.spec.metric} {value:.4f}")

        logger.info("trial %d%s: %s", trial.number, f" (retry of {root})" if history else "", trial.params)
        kwargs = dict(out_dir=out, callback=on_epoch, progress=self.progress, run_id=run_id(self.study, root))
        try:
            results = train(cfg, self.prepared, resume=True, **kwargs)
        except ResumeError as exc:  # another run's or a damaged checkpoint: never report its score
            logger.warning("trial %d: %s; training it from scratch", trial.number, exc)
            trial.set_user_attr("restarted_from_scratch", str(exc)[:2000])
            epoch_seconds.clear()
            per_epoch.clear()
            results = train(cfg, self.prepared, resume=False, **kwargs)
        return results[-1].metrics[self.spec.metric]

    def start_retry(self, trial: optuna.Trial, history: list[int]) -> None:
        """Clear what the retried attempt wrote about itself (Optuna copies its user attrs into the retry),
        keeping its failure reason in `previous_fail_reasons`."""
        inherited = trial.user_attrs
        reasons = list(inherited.get("previous_fail_reasons") or [])
        reasons.append({"trial": history[-1], "reason": inherited.get("fail_reason")
                        or "worker lost (missed heartbeats)"})
        trial.set_user_attr("previous_fail_reasons", reasons)
        trial.set_user_attr("retry_of", history[-1])
        for key in ATTEMPT_ATTRS:
            if inherited.get(key) is not None:
                trial.set_user_attr(key, None)  # Optuna cannot delete an attribute

    # ------------------------------------------------------------ disk

    def cleanup_checkpoints(self, finished: optuna.trial.FrozenTrial) -> None:
        """Keep only the checkpoints of the study's best `keep_best` complete trials.

        Every folder is derived from the study's identity and the trial's retry chain (trial_dir),
        never from user attributes, so only this study's own trial folders can ever be deleted.
        """
        if finished.state != TrialState.COMPLETE:
            self.remove(trial_dir(self.study, trial_root(finished), self.checkpoint_root))
            return
        from service.ranking import ranked_complete

        ranked = ranked_complete(self.study, self.spec)
        kept = ranked[: self.spec.keep_best]
        if self.confirmation is not None:  # --export-best takes the best seed of the best configuration
            kept = confirm.best_seed_per_configuration(ranked)
        keep = {trial_dir(self.study, trial_root(t), self.checkpoint_root) for t in kept}
        for t in ranked:
            folder = trial_dir(self.study, trial_root(t), self.checkpoint_root)
            if folder not in keep:
                self.remove(folder)

    def remove(self, folder: Path) -> None:
        """Delete a trial folder, only if it resolves to a folder inside this study's folder of the
        checkpoint root (symlinks and `..` resolved first)."""
        own = (self.checkpoint_root / study_uuid(self.study)).resolve()
        target = folder.resolve()
        if target == own or not target.is_relative_to(own):
            logger.warning("not deleting %s: it is not inside this study's checkpoint folder %s", folder, own)
            return
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)

    # ------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            logger.warning("%s received: stopping after handing back the running trial",
                           signal.Signals(signum).name)
            self.stop_requested = True
            if self.in_trial:
                raise WorkerInterrupted()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def pin_device(name: str) -> None:
    """Make a CUDA worker's GPU the process's current device before anything touches CUDA: a worker on
    cuda:3 then opens no context on cuda:0 (emptying caches, device queries), which the packing
    estimate does not count. Training holds its device itself too (mtbert.static_step.device_guard)."""
    if name.startswith("cuda:"):
        import torch

        torch.cuda.set_device(torch.device(name))


def free_accelerator_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


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
                        poll_seconds=args.poll_seconds, step=args.step, amp=args.amp)
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
