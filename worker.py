"""Join a study and run its trials until the study's global budget is met.

    python worker.py --study lr_dropout                                # this machine, SQLite
    python worker.py --study lr_dropout --storage postgresql://... --gpu 1
    python worker.py --study lr_dropout:confirm                        # trials of search.py --confirm

Each trial: sample the study's space, train mtbert, report the study's metric after every epoch,
stop when the pruner says so. A trial whose worker died is retried (heartbeats) and resumes from
its last epoch checkpoint. SIGINT/SIGTERM hand the running trial back for retry and exit.
"""
from __future__ import annotations

import argparse
import gc
import logging
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
from mtbert.tasks import SCORES
from service import confirm, optuna_compat
from service.study import (FINISHED, add_override_arguments, configure_logging, load_study_spec, open_study,
                           trial_counts)
from studies import StudySpec, StudySpecError

logger = logging.getLogger("worker")

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
                 artifact_store=None):
        self.study, self.spec, self.device = study, spec, device
        self.artifact_store = artifact_store  # default: storage.artifact_store(), opened at the first record
        self.progress, self.max_failures, self.poll_seconds = progress, max_failures, poll_seconds
        self.checkpoint_root = (checkpoint_root or storage_lib.checkpoint_dir()) / spec.name
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
        if sum(counts[s] for s in FINISHED) >= self.spec.n_trials:
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
            fail_stale_trials(self.study)
            counts = trial_counts(self.study)
            if self.confirmation is not None:  # exactly its enqueued trials (and their retries); never a new sample
                return self.study.ask() if counts[TrialState.WAITING] else "wait" if counts[TrialState.RUNNING] else "done"
            finished = sum(counts[s] for s in FINISHED)
            if finished >= self.spec.n_trials:
                return "done"
            if finished + counts[TrialState.RUNNING] >= self.spec.n_trials:
                return "wait"
            return self.study.ask()

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
            except Exception as exc:  # OOM, NaN loss, bad data...: this trial fails, the worker goes on
                state, value = TrialState.FAIL, None
                reason = f"{type(exc).__name__}: {exc}"
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
            trial.set_user_attr("fail_reason", "worker stopped by a signal; retried")
            frozen = self.study.tell(trial, state=TrialState.FAIL)
            optuna_compat.queue_retry(self.study, frozen)
        logger.warning("trial %d handed back for retry", trial.number)

    # ------------------------------------------------------------ one trial

    def train_trial(self, trial: optuna.Trial) -> float:
        from mtbert.config import TrainConfig
        from mtbert.train import train

        if self.confirmation is not None:  # the parent trial's config with this trial's seed (service.confirm)
            values = self.confirmation.trial_values(trial, self.spec)
        else:
            values = self.spec.suggest(trial)
        cfg = TrainConfig().replace(**{**values, **({"device": self.device} if self.device else {})})
        self.prepare(cfg)  # a no-op unless the space searches the model or the data
        history = optuna_compat.retry_history(self.study, trial)
        root = history[0] if history else trial.number
        out = self.checkpoint_root / f"trial-{root}"
        trial.set_user_attr("checkpoint", str(out))
        trial.set_user_attr("device", device_name(cfg.device))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("config", cfg.to_dict())
        epoch_seconds: list[float] = []
        per_epoch: list[dict[str, Any]] = []  # user attr `history`: the dashboard note's rows
        self.dev_predictions = None

        def on_epoch(result) -> None:
            value = result.metrics[self.spec.metric]
            if result.resumed:
                trial.set_user_attr("resumed_from_epoch", result.epoch)
            else:
                epoch_seconds.append(round(result.seconds, 2))
            self.dev_predictions = result.predictions  # what the artifacts show: the last epoch's
            scores = {k: result.metrics[k] for k in SCORES}
            for key, score in scores.items():
                trial.set_user_attr(key, score)
            trial.set_user_attr("epochs_done", result.epoch)
            trial.set_user_attr("epoch_seconds", epoch_seconds)
            per_epoch.append({"epoch": result.epoch, **scores, "seconds": round(result.seconds, 2)})
            trial.set_user_attr("history", per_epoch)
            with warnings.catch_warnings():  # a resumed epoch may have been reported before the crash
                warnings.simplefilter("ignore")
                trial.report(value, result.epoch)
            # after the last epoch the work is done: keep the result rather than prune it
            if result.epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"epoch {result.epoch}: {self.spec.metric} {value:.4f}")

        logger.info("trial %d%s: %s", trial.number, f" (retry of {root})" if history else "", trial.params)
        results = train(cfg, self.prepared, out_dir=out, callback=on_epoch, resume=True, progress=self.progress)
        return results[-1].metrics[self.spec.metric]

    # ------------------------------------------------------------ disk

    def cleanup_checkpoints(self, finished: optuna.trial.FrozenTrial) -> None:
        """Keep only the checkpoints of the study's best `keep_best` complete trials."""
        if finished.state != TrialState.COMPLETE:
            remove(finished.user_attrs.get("checkpoint"))
            return
        from service.ranking import ranked_complete

        complete = [t for t in ranked_complete(self.study, self.spec) if t.user_attrs.get("checkpoint")]
        kept = complete[: self.spec.keep_best]
        if self.confirmation is not None:  # --export-best takes the best seed of the best configuration
            kept = confirm.best_seed_per_configuration(complete)
        keep = {t.user_attrs["checkpoint"] for t in kept}
        for t in complete:
            if t.user_attrs["checkpoint"] not in keep:
                remove(t.user_attrs["checkpoint"])

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


def remove(path: str | None) -> None:
    if path and Path(path).exists():
        shutil.rmtree(path, ignore_errors=True)


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
    parser.add_argument("--gpu", type=int, default=None, help="GPU index to train on (sets --device cuda:I)")
    parser.add_argument("--device", default=None,
                        help="'cpu', 'cuda', 'cuda:1', ... (default: the study file's, else GPU if any)")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (default: the study file's, else random)")
    parser.add_argument("--max-failures", type=int, default=3, help="stop after this many failed trials in a row")
    parser.add_argument("--poll-seconds", type=float, default=5.0,
                        help="wait between checks when all remaining trials run elsewhere")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no per-epoch progress bars")
    add_override_arguments(parser)
    args = parser.parse_args(argv)
    try:
        url = storage_lib.resolve_url(args.storage, args.storage_file)
    except storage_lib.StorageUnavailable as exc:
        configure_logging(None)
        logger.error("%s", exc)
        return 2
    configure_logging(url)
    device = f"cuda:{args.gpu}" if args.gpu is not None else args.device
    try:
        if confirm.is_confirmation(args.study):  # X:confirm: the trials search.py --confirm enqueued
            spec, study = confirm.open_confirmation(args.study, url, args, seed=args.seed)
        else:
            spec, overrides = load_study_spec(args.study, args)
            study = open_study(spec, url, overrides, seed=args.seed)
    except (StudySpecError, confirm.ConfirmError, storage_lib.StorageUnavailable) as exc:
        logger.error("%s", exc)
        return 2
    worker = Worker(study, spec, device=device, progress=args.progress, max_failures=args.max_failures,
                    poll_seconds=args.poll_seconds)
    worker.install_signal_handlers()
    from mtbert.data import DataError
    from mtbert.model import ModelLoadError

    try:
        ran = worker.run()
    except (DataError, ModelLoadError) as exc:
        logger.error("%s", exc)
        return 2
    counts = trial_counts(study)
    logger.info("worker done: ran %d trial(s); study %s has %d complete, %d pruned, %d failed of %d", ran,
                spec.name, counts[TrialState.COMPLETE], counts[TrialState.PRUNED], counts[TrialState.FAIL],
                spec.n_trials)
    return 1 if worker.gave_up else 0


if __name__ == "__main__":
    sys.exit(main())
