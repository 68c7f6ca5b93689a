"""The worker: claim a study's trials and turn each into a training run, until the study's budget is met.

Two parts, each with its own job:
- `Worker` claims trials (under the study's trial-slot lock), reports their epochs and outcome to the
  study, hands a trial back on a signal and keeps only the checkpoints worth keeping;
- `TrialTrainer` trains one trial: its TrainConfig, run folder, retry bookkeeping and per-epoch user attrs.

Which trial a worker claims and with which values is a `TrialSource` it is given: `SearchTrials` (new
samples of the study's space within its budget) or, for a study made by `search.py --confirm`,
`service.confirm.ConfirmationTrials` (exactly the enqueued configurations and seeds). `trial_source(study)`
picks the one that fits a study.

A trial's run folder is derived from the study's identity, never from its user attributes:
`<checkpoint root>/<study uuid>/trial-<root>` (service.study.trial_dir), and mtbert.train resumes
it only if the checkpoint there was written by this trial's retry chain with the same settings;
otherwise (or if the checkpoint is damaged) the trial starts from scratch. Cleanup deletes only
such derived folders, and nothing that does not resolve inside the checkpoint root.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import shutil
import signal
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

import storage as storage_lib
from mtbert.tasks import SCORES
from service import confirm
from service.study import FINISHED, run_id, study_budget, study_uuid, trial_counts, trial_dir, trial_identity, trial_root
from storage import optuna_compat
from studies import StudySpec

logger = logging.getLogger("worker")  # the name worker.py's log lines always had

# what one attempt of a trial writes about itself: a retry inherits the attempt's user attrs (Optuna
# copies them), so it clears these when it starts, keeping the earlier reasons in `previous_fail_reasons`
ATTEMPT_ATTRS = ("fail_reason", "resumed_from_epoch", "restarted_from_scratch")


class NonFiniteScore(ValueError):
    """A trial's dev score is NaN or infinite: it fails with this reason (Optuna refuses such a value)."""


class WorkerInterrupted(BaseException):
    """SIGINT/SIGTERM while a trial runs: hand the trial back for retry."""


# ------------------------------------------------------------ which trials, with which values


class TrialSource(Protocol):
    """Which trial a worker claims next and with which values it trains; which checkpoints it keeps."""

    def claim(self, study: optuna.Study, spec: StudySpec, counts: dict[TrialState, int]) -> optuna.Trial | str:
        """A trial to run, "wait" (every remaining slot runs elsewhere) or "done"; called under the study's lock
        after stale trials were failed, with the study's trial counts."""

    def values(self, trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
        """The TrainConfig values of a claimed trial (before this worker's speed settings)."""

    def kept(self, ranked: list[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
        """Of the study's complete trials ranked best first, those whose checkpoints are kept."""


class SearchTrials:
    """A search: new samples of the study's space until its recorded budget is met."""

    def claim(self, study: optuna.Study, spec: StudySpec, counts: dict[TrialState, int]) -> optuna.Trial | str:
        finished, budget = sum(counts[s] for s in FINISHED), study_budget(study, spec)
        if finished >= budget:  # the study's recorded budget, read now: an edit reaches every worker at once
            return "done"
        if finished + counts[TrialState.RUNNING] >= budget:
            return "wait"
        return study.ask()

    def values(self, trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
        return spec.suggest(trial)

    def kept(self, ranked: list[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
        return ranked[: spec.keep_best]


def trial_source(study: optuna.Study) -> TrialSource:
    """The source that fits `study`: its confirmation plan (X:confirm: fixed configurations and seeds, never a
    new sample) when it has one, else a search."""
    return confirm.ConfirmationTrials.of(study) or SearchTrials()


# ------------------------------------------------------------ training one trial


def device_name(device: str) -> str:
    import torch

    from mtbert.config import resolve_device

    d = resolve_device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"


def free_accelerator_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


class TrialTrainer:
    """Trains the trials of one study: loads the model and data once, and turns a trial and its values into
    a training run in the trial's own folder, recording each epoch on the trial and reporting it to the pruner."""

    def __init__(self, study: optuna.Study, spec: StudySpec, checkpoint_root: Path, device: str | None = None,
                 step: str | None = None, amp: str | None = None, progress: bool = True):
        self.study, self.spec, self.checkpoint_root = study, spec, checkpoint_root
        self.device = device
        self.step = step  # --step: a speed setting over the study's [train] step (None: the study's)
        self.amp = amp  # --amp: likewise, over [train] amp
        self.progress = progress
        self.prepared = None  # tokenizer, pretrained encoder and data: loaded once, shared by trials
        self.dev_predictions = None  # of the running trial's last trained epoch

    def prepare(self, cfg=None) -> None:
        """Tokenizer, pretrained encoder and tokenised data for `cfg` (default: the study's fixed values)."""
        from mtbert.config import TrainConfig
        from mtbert.train import prepare

        cfg = cfg or TrainConfig().replace(**self.spec.train)
        if self.prepared is None or not self.prepared.matches(cfg):
            self.prepared = prepare(cfg)

    def train(self, trial: optuna.Trial, values: dict[str, Any]) -> float:
        """Train `trial` with `values` (resuming its retry chain's checkpoint); return its final dev metric.
        Raises optuna.TrialPruned when the pruner stops it."""
        from mtbert.checkpoint import ResumeError
        from mtbert.config import TrainConfig, resolve_data_dir
        from mtbert.train import train

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
        # where the epoch's time went (reports.costs): its dev evaluation, and the checkpoint write after it
        timings: dict[str, list[float]] = {"eval_seconds": [], "checkpoint_seconds": []}
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
                for key, values in timings.items():
                    values.append(round(getattr(result, key), 2))
            self.dev_predictions = result.predictions  # what the artifacts show: the last epoch's
            scores = {k: result.metrics[k] for k in SCORES}
            for key, score in scores.items():
                trial.set_user_attr(key, score)
            trial.set_user_attr("epochs_done", result.epoch)
            if result.peak_memory_bytes is not None:  # CUDA: peak memory of this trial so far
                trial.set_user_attr("peak_memory_bytes", result.peak_memory_bytes)
            trial.set_user_attr("epoch_seconds", epoch_seconds)
            for key, values in timings.items():
                trial.set_user_attr(key, values)
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
            for values in timings.values():
                values.clear()
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


# ------------------------------------------------------------ claiming and reporting trials


class Worker:
    """Runs trials of one study; see the module docstring."""

    def __init__(self, study: optuna.Study, spec: StudySpec, device: str | None = None, progress: bool = True,
                 max_failures: int = 3, poll_seconds: float = 5.0, checkpoint_root: Path | None = None,
                 artifact_store=None, step: str | None = None, amp: str | None = None,
                 source: TrialSource | None = None):
        self.study, self.spec = study, spec
        self.source = source if source is not None else trial_source(study)
        self.artifact_store = artifact_store  # default: storage.artifact_store(), opened at the first record
        self.max_failures, self.poll_seconds = max_failures, poll_seconds
        # trial folders are <root>/<study uuid>/trial-<n> (service.study.trial_dir); nothing outside is deleted
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root is not None else storage_lib.checkpoint_dir()
        self.trainer = TrialTrainer(study, spec, self.checkpoint_root, device=device, step=step, amp=amp,
                                    progress=progress)
        self.stop_requested = False
        self.in_trial = False
        self.gave_up = False

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
        self.trainer.prepare()
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

    def claim(self) -> optuna.Trial | str:
        """Under the study's lock: retry dead trials, then let the trial source start one (or say wait/done)."""
        with storage_lib.trial_slot_lock(optuna_compat.rdb_storage(self.study), self.study.study_name):
            self.check_storage()  # a deleted/replaced SQLite file or a renamed study: StorageLost, one line
            optuna_compat.adopt_unbeaten_trials(self.study)  # so that fail_stale_trials can judge them too
            fail_stale_trials(self.study)
            return self.source.claim(self.study, self.spec, trial_counts(self.study))

    def check_storage(self) -> None:
        """StorageLost when the storage or the study this worker opened is no longer there (storage.check_storage)."""
        storage_lib.check_storage(optuna_compat.rdb_storage(self.study), self.study.study_name,
                                  optuna_compat.study_id(self.study))

    def run_trial(self, trial: optuna.Trial) -> TrialState:
        """Train a claimed trial and tell the study how it ended; return its state (RUNNING: handed back)."""
        with optuna_compat.heartbeat(self.study, trial):
            try:
                self.in_trial = True
                value = self.trainer.train(trial, self.source.values(trial, self.spec))
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
            prepared = self.trainer.prepared
            dev = prepared.dev if prepared is not None else None
            record_trial(self.study, trial, dev, self.artifact_store, state, value, self.trainer.dev_predictions)
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

    # ------------------------------------------------------------ disk

    def cleanup_checkpoints(self, finished: FrozenTrial) -> None:
        """Keep only the checkpoints of the trials the trial source keeps (a search: the best `keep_best`).

        Every folder is derived from the study's identity and the trial's retry chain (trial_dir),
        never from user attributes, so only this study's own trial folders can ever be deleted.
        """
        if finished.state != TrialState.COMPLETE:
            self.remove(trial_dir(self.study, trial_root(finished), self.checkpoint_root))
            return
        from service.ranking import ranked_complete

        ranked = ranked_complete(self.study, self.spec)
        keep = {trial_dir(self.study, trial_root(t), self.checkpoint_root) for t in self.source.kept(ranked, self.spec)}
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
