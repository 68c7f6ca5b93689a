"""Opening a study and what every command of the service shares: the study-file overrides,
trial counts, logging, and the study's identity on disk. search.py, worker.py and the reports import
these; nothing here trains.

Identity: a study's name is not unique (two storages, or a study deleted and created again, can hold
the same name), so everything a study or trial writes to disk is keyed by a UUID recorded on the study
the first time it is opened (user attribute `study_uuid`): checkpoints in
`<checkpoint root>/<study uuid>/trial-<root>` (root: the first trial of a retry chain, whose retries
resume its checkpoint), worker logs in `storage/logs/<study key>/` and the trials CSV in
`storage/<study key>-trials.csv` (study key: "<name>-<first 8 hex digits of the uuid>").
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import secrets
import socket
import uuid
import warnings
import weakref
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, overload

import optuna
from optuna.trial import TrialState

import storage as storage_lib
from storage import optuna_compat
from studies import StudySpec, StudySpecError, load_spec
from studies.spec import OVERRIDES, _display, override_flag, spec_differences

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STUDY_UUID_ATTR = "study_uuid"


class StudyIdentityError(RuntimeError):
    """The study's recorded identity is unusable (its `study_uuid` attribute was edited)."""


OVERRIDE_FLAGS: tuple[str, ...] = tuple(OVERRIDES)  # argparse dests of add_override_arguments


def override_argv(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The overrides this command was given, as worker.py flags (`--epochs 3 --data-dir /d`), but `skip`."""
    argv: list[str] = []
    for name in OVERRIDE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and name not in skip:
            argv += [override_flag(name), str(value)]
    if getattr(args, "study_name", None) and "study_name" not in skip:
        argv += ["--study-name", args.study_name]
    return argv


def bounded(kind: type, low: float, high: float | None = None):
    """An argparse ``type``: a number of ``kind`` in [low, high], else argparse's one-line usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (high is not None and value > high):
            span = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'} "
                                             f"{span}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" wording for other failures
    return parse


SEED = bounded(int, 0, 2**31 - 1)  # numpy's and Optuna's samplers take 0 .. 2**32 - 1; trial k draws with trial_seed(seed, k)


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """The study-file overrides shared by worker.py and search.py."""
    parser.add_argument("--study-name", metavar="NAME",
                        help="the study's name in the storage (default: the study file's name); a smoke test "
                             "with --epochs/--max-examples and the real run of the same file live side by side "
                             "under two names, e.g. --study-name lr_dropout-smoke")
    group = parser.add_argument_group("overrides of the study file, recorded on the study")
    group.add_argument("--n-trials", type=int,
                       help="global budget of finished (complete or pruned) trials, for every worker (default: the study's "
                            "recorded budget; a new study takes the file's, and an edit of the file's changes it)")
    group.add_argument("--epochs", type=int, help="epochs per trial (default: the study file's)")
    group.add_argument("--max-examples", type=int,
                       help="examples per task and split, 0 = all (default: the study file's, else 0)")
    group.add_argument("--model", help="HF model id or local folder (default: the study file's, else the packaged "
                                       "all-MiniLM-L6-v2 or $MTBERT_DEFAULT_MODEL)")
    group.add_argument("--data-dir", type=absolute_path,
                       help="CS224N-format data folder (default: the study file's [train] data_dir, else "
                            "$MTBERT_DATA_DIR, else ./data)")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """Speed settings shared by worker.py and search.py: how a trial runs, not what it computes, so
    they may differ between the workers of one study (mtbert.config.RUNTIME_FIELDS) and are not
    recorded on the study; each trial records the step that ran (user attr `step`)."""
    from mtbert.config import AMPS, STEPS

    group = parser.add_argument_group("speed settings (any value joins an existing study)")
    group.add_argument("--step", choices=STEPS, default=None,
                       help="how each trial's training step runs: 'eager' (the step that has run on a GPU), "
                            "'static' or 'graphs' (opt-in, not yet run on a GPU: docs/gpu-steps.md), 'auto' "
                            "(eager) (default: the study file's [train] step, else auto)")
    group.add_argument("--amp", choices=AMPS, default=None,
                       help="precision: 'auto' (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), "
                            "'bf16' or 'off' (fp32); each trial records what it computed in (user attr `amp`) "
                            "(default: the study file's [train] amp, else auto)")


SPEED_FLAGS: tuple[str, ...] = ("step", "amp")  # argparse dests of add_speed_arguments


def speed_argv(args: argparse.Namespace) -> list[str]:
    """The speed settings this command was given, as worker.py flags (`--step eager`)."""
    argv: list[str] = []
    for name in SPEED_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            argv += [override_flag(name), str(value)]
    return argv


def absolute_path(text: str) -> str:
    """A command-line path made absolute against the current directory: workers run elsewhere (cwd = repository)."""
    return os.path.abspath(os.path.expanduser(text))


def load_study_spec(name: str, args: argparse.Namespace) -> tuple[StudySpec, dict[str, Any]]:
    """The study file with this command line's overrides applied (and its --study-name), and the overrides given."""
    spec, given = load_spec(name).with_overrides(**{k: getattr(args, k) for k in OVERRIDE_FLAGS})
    if getattr(args, "study_name", None):
        spec = spec.renamed(args.study_name)
    return spec, given


def open_study(spec: StudySpec, url: str | None, overrides: dict[str, Any], seed: int | None = None,
               role: str = "worker") -> optuna.Study:
    """Create or load the study in storage; record the spec and this run's overrides on it.

    An existing study must have been created with the same values in everything that changes results
    (studies.spec_differences: space, metric, direction, [train], sampler, pruner), else StudyMismatch
    names the differing fields and nothing is written. The budget may change: a new one is recorded.
    """
    rdb = storage_lib.open_storage(url)
    study = optuna.create_study(study_name=spec.name, storage=rdb, direction=spec.direction,
                                sampler=spec.make_sampler(seed), pruner=spec.make_pruner(), load_if_exists=True)
    attrs = study.user_attrs
    if "spec" not in attrs:
        study.set_user_attr("spec", spec.to_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.metric])
    else:
        differences = spec_differences(attrs["spec"], spec, overrides)
        if differences:
            raise StudyMismatch(f"{_display(spec.path)}: differs from study {spec.name!r} in "
                                f"{storage_lib.redact(storage_lib.resolve_url(url))} in what changes results: "
                                f"{'; '.join(differences)}. {mismatch_advice(attrs['spec'], spec, overrides, role)}")
    study_uuid(study)  # recorded now, before anything of the study is written to disk
    study.sampler = spec.trial_seeded_sampler(study_seed(study, spec, seed))
    check_data(study, spec)
    check_identity(study, spec)
    record = dict(overrides)
    if "n_trials" in overrides:
        if overrides["n_trials"] != study_budget(study):
            check_budget(study, spec)
    elif file_budget_edited(study, spec):
        check_budget(study, spec)
        record["n_trials"] = spec.n_trials  # a budget changed in the file is recorded like --n-trials
    if record:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        study.set_user_attr(f"overrides {stamp} {role}@{socket.gethostname()}:{os.getpid()}", record)
    return study


FILE_BUDGET_ATTR = "file_n_trials"  # study system attr: the study file's n_trials when a command last read it


def file_budget_edited(study: optuna.Study, spec: StudySpec) -> bool:
    """Whether the study file's n_trials was edited since a command last read it (and note the value now).

    A command without --n-trials runs on the study's recorded budget, not the file's: a worker that joins
    a `--n-trials 20` study with a plain command must not set its budget back to the file's 40 or 8. Only
    an edit of the file (its value differs from the one read last time) is a new budget.
    """
    attrs = optuna_compat.study_system_attrs(study)
    seen = attrs.get(FILE_BUDGET_ATTR)
    if seen != spec.n_trials:
        optuna_compat.set_study_system_attr(study, FILE_BUDGET_ATTR, spec.n_trials)
    # first read (a new study, or one created before this attr existed): the file's value is not an edit
    return seen is not None and seen != spec.n_trials and spec.n_trials != study_budget(study)


def spec_file(spec: StudySpec) -> str:
    """How a command names the study file: its name when it is in studies/, else its path."""
    from studies.spec import STUDIES_DIR

    path = Path(spec.path)
    return path.stem if path.parent.resolve() == STUDIES_DIR.resolve() else str(path)


def study_option(spec: StudySpec) -> str:
    """`--study lr_dropout` (and `--study-name NAME` where the study's storage name is not its file's): what
    a printed command needs to reach this study."""
    named = f" --study-name {spec.name}" if spec.name != Path(spec.path).stem else ""
    return f"--study {spec_file(spec)}{named}"


def mismatch_advice(recorded: dict[str, Any], spec: StudySpec, overrides: dict[str, Any], role: str) -> str:
    """The exact commands that continue the recorded study (its overrides given again) and that start a
    new study beside it (--study-name): usually a smoke test's flags changed the values, not an edit of the file."""
    from studies.spec import _normal, _result_fields

    old, new = _result_fields(recorded), _result_fields(spec.to_dict())
    changed = {k for k in old.keys() | new.keys() if _normal(old.get(k)) != _normal(new.get(k))}
    flags = {key: name for name, key in OVERRIDES.items() if name not in ("n_trials", "data_dir")}  # spec key -> flag
    base = f"python {'search.py' if role == 'search' else 'worker.py'} --study {spec_file(spec)}"
    named = f" --study-name {spec.name}" if spec.name != Path(spec.path).stem else ""
    suffix = "-".join(f"{k.replace('_', '')}{v}" for k, v in overrides.items() if k in ("epochs", "max_examples"))
    beside = f"{spec.name}-{suffix or 'full'}"
    new_study = f"start a new study beside it: {base}{override_text(overrides)} --study-name {beside}"
    if changed - set(flags):  # the file itself was edited: no flag restores it
        return f"Restore these values in the file to continue it, or {new_study}"
    try:  # what the file itself says: a value it already has needs no flag
        in_file = _result_fields(load_spec(spec.path).to_dict())
    except StudySpecError:
        in_file = {}
    restore = ""
    for key in sorted(changed):
        if key in in_file and _normal(in_file[key]) == _normal(old.get(key)) or key not in in_file and key not in old:
            continue
        value = old.get(key, 0 if flags[key] == "max_examples" else None)  # max_examples not set = 0 (all)
        if value is None:
            return f"To {new_study}"
        restore += f" {override_flag(flags[key])} {value}"
    return f"To continue it: {base}{restore}{named}; to {new_study}"


def override_text(overrides: dict[str, Any]) -> str:
    """` --epochs 2 --max-examples 200`: the given result-changing overrides as flags."""
    return "".join(f" {override_flag(k)} {v}" for k, v in overrides.items() if k not in ("n_trials", "data_dir"))


# ------------------------------------------------------------ identity

_uuids: "weakref.WeakKeyDictionary[optuna.Study, str]" = weakref.WeakKeyDictionary()


def study_uuid(study: optuna.Study, create: bool = True) -> str | None:
    """The study's UUID, recorded on it (user attribute `study_uuid`) by the first caller.

    Race-safe: it is set under the study's slot lock and read again there, so workers opening a new
    study at once all get the same one. A study deleted and created again gets a new one. With
    `create=False`, None for a study that has none yet (e.g. one created by an older version).
    """
    if study in _uuids:
        return _uuids[study]
    value = study.user_attrs.get(STUDY_UUID_ATTR)
    if value is None:
        if not create:
            return None
        with storage_lib.trial_slot_lock(optuna_compat.rdb_storage(study), study.study_name):
            value = study.user_attrs.get(STUDY_UUID_ATTR)
            if value is None:
                value = str(uuid.uuid4())
                study.set_user_attr(STUDY_UUID_ATTR, value)
    try:
        canonical = str(uuid.UUID(str(value)))
    except ValueError:
        canonical = None
    if canonical != value:  # it names folders: anything but a canonical UUID could point elsewhere
        raise StudyIdentityError(f"study {study.study_name}: user attribute {STUDY_UUID_ATTR} is {str(value)[:80]!r}, "
                                 "not a UUID; it names the study's folders on disk and must not be edited")
    _uuids[study] = value
    return value


SEED_ATTR = "sampler_seed"  # study system attr: the seed every trial's draws derive from


def study_seed(study: optuna.Study, spec: StudySpec, given: int | None = None) -> int:
    """The study's sampler seed, recorded on it (system attribute `sampler_seed`) by its first opener:
    `given` (--seed), else the file's [sampler].seed, else a random one. Trial k samples with a seed
    derived from it and k (studies.TrialSeededSampler), so no process, restart or extra worker repeats a
    draw. A later `given` that differs is ignored with a warning: the study's draws are already fixed."""
    recorded = optuna_compat.study_system_attrs(study).get(SEED_ATTR)
    if recorded is None:
        with storage_lib.trial_slot_lock(optuna_compat.rdb_storage(study), study.study_name):
            recorded = optuna_compat.study_system_attrs(study).get(SEED_ATTR)
            if recorded is None:
                recorded = given if given is not None else spec.sampler.get("seed")
                if not isinstance(recorded, int):
                    recorded = secrets.randbelow(2**31)
                optuna_compat.set_study_system_attr(study, SEED_ATTR, int(recorded))
                return int(recorded)
    if given is not None and given != recorded:
        logging.getLogger("study").warning("--seed %d ignored: study %s samples with its recorded seed %d (trial k "
                                           "with a seed derived from it and k)", given, study.study_name, recorded)
    return int(recorded)


def study_key(study: optuna.Study) -> str:
    """A filesystem-safe "<name>-<uuid8>" for the study's logs and CSV: readable, and unique per study."""
    name = re.sub(r"[^\w.-]", "_", study.study_name)[:64].lstrip(".") or "study"
    return f"{name}-{study_uuid(study)[:8]}"


def trial_root(trial: optuna.trial.FrozenTrial) -> int:
    """The first trial of `trial`'s retry chain (itself for a first attempt): whose checkpoint it resumes."""
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return int(history[0]) if history else trial.number


def trial_dir(study: optuna.Study, root: int, checkpoint_root: str | Path | None = None) -> Path:
    """`<checkpoint root>/<study uuid>/trial-<root>`: the run folder of a retry chain, derived from identity only
    (never from a trial's user attributes, which anyone who can reach the dashboard can write)."""
    base = Path(checkpoint_root) if checkpoint_root is not None else storage_lib.checkpoint_dir()
    return base / study_uuid(study) / f"trial-{int(root)}"


def run_id(study: optuna.Study, root: int) -> str:
    """What the worker tells mtbert.train this run is: a checkpoint of another study or trial never matches."""
    return f"{study_uuid(study)}/trial-{int(root)}"


def recorded_spec(study: optuna.Study, fallback: StudySpec) -> StudySpec:
    """The spec recorded on the study when it was created (overrides included); `fallback` (the file, which
    open_study compared with it) for a study recorded by an older version."""
    from studies import spec_from_dict

    data = study.user_attrs.get("spec")
    if not isinstance(data, dict):
        return fallback
    try:
        return spec_from_dict(data)
    except StudySpecError:
        return fallback


def trial_config(spec: StudySpec, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The TrainConfig a trial trained with, rebuilt as the worker built it: the spec's [train] values and
    the trial's params (presets expanded), code defaults for the rest, without the device. Never from the
    trial's user attrs: the dashboard can write those."""
    from mtbert.config import TrainConfig

    values = spec.suggest(optuna.trial.FixedTrial(dict(trial.params), number=trial.number))
    config = TrainConfig().replace(**values).to_dict()
    config.pop("device", None)
    return config


class StudyMismatch(StudySpecError):
    """The study file (with this command's overrides) differs from the spec recorded on the study."""


DATA_ATTR = "data_fingerprint"


def check_data(study: optuna.Study, spec: StudySpec) -> None:
    """The data this command would train on must be the data the study was created with: compared by
    content (mtbert.tasks.data_fingerprint), not by path, so nodes may mount it anywhere. The first
    opener that has the data records its fingerprint; a node without the data is not checked here (its
    worker stops with "file not found" before claiming a trial)."""
    from mtbert.config import resolve_data_dir
    from mtbert.tasks import data_fingerprint, has_data

    data_dir = resolve_data_dir(spec.train.get("data_dir"))
    if not has_data(data_dir):
        return
    local = data_fingerprint(data_dir)
    recorded = study.user_attrs.get(DATA_ATTR)
    if recorded is None:
        with storage_lib.trial_slot_lock(optuna_compat.rdb_storage(study), study.study_name):
            recorded = study.user_attrs.get(DATA_ATTR)
            if recorded is None:
                study.set_user_attr(DATA_ATTR, local)
                return
    if recorded != local:
        raise StudyMismatch(f"the data in {data_dir} differs from the data study {study.study_name!r} was created "
                            f"with (train/dev files' SHA-1 {local[:12]}, recorded {recorded[:12]}): point --data-dir "
                            f"(or $MTBERT_DATA_DIR) at the study's data, or copy the study file under a new name")


IDENTITY_ATTR = "identity"  # study system attr: what its trials train with (local_identity of its first opener)


def local_identity(spec: StudySpec) -> dict[str, Any]:
    """What this process would train the study's trials with: the resolved encoder by content (unless the
    space searches the model), every resolved TrainConfig value that changes results but the searched ones,
    and the training code's version (mtbert.provenance). Speed-only and runtime settings are left out."""
    from mtbert.config import RUNTIME_FIELDS, TrainConfig
    from mtbert.provenance import code_version, encoder_identity, result_settings

    searched = set().union(*(p.controls() for p in spec.space.values()))
    cfg = TrainConfig().replace(**spec.train)
    identity: dict[str, Any] = {"train": result_settings(cfg, RUNTIME_FIELDS | searched),
                                "code": code_version()}
    if "model" not in searched:
        try:
            identity["encoder"] = encoder_identity(cfg.model)
        except RuntimeError:  # e.g. no model package on this node: its loader says so, in one line
            pass
    return identity


def trial_identity(cfg) -> dict[str, Any]:
    """What one trial trained with (its system attr "identity"): the encoder by content, every resolved
    setting that changes results, the code version. A record for people and comparisons, never read back
    to decide what is trained or exported."""
    from mtbert.config import SPEED_FIELDS
    from mtbert.provenance import code_version, encoder_identity, result_settings

    identity: dict[str, Any] = {"train": result_settings(cfg, SPEED_FIELDS), "code": code_version()}
    try:
        identity["encoder"] = encoder_identity(cfg.model)
    except RuntimeError:
        pass
    return identity


def _short(sha: str) -> str:
    return sha[:len("sha256:") + 12] + "…" if sha.startswith("sha256:") else sha


def identity_differences(recorded: dict[str, Any], local: dict[str, Any]) -> list[str]:
    """What differs between a study's recorded identity and this process's, one phrase per item."""
    lines = []
    there, here = recorded.get("encoder"), local.get("encoder")
    if there and here and "unknown" not in (there.get("sha256"), here.get("sha256")) \
            and there.get("sha256") != here.get("sha256"):
        lines.append(f"encoder: study trained {_short(there['sha256'])} ({there.get('model')} → {there.get('resolved')}), "
                     f"this worker has {_short(here['sha256'])} ({here.get('model')} → {here.get('resolved')})")
    old, new = recorded.get("train") or {}, local.get("train") or {}
    for key in sorted(old.keys() | new.keys()):
        if json.dumps(old.get(key, "(not set)")) != json.dumps(new.get(key, "(not set)")):
            lines.append(f"train.{key}: study trained {json.dumps(old.get(key, '(not set)'))}, this worker has "
                         f"{json.dumps(new.get(key, '(not set)'))}")
    code_there, code_here = recorded.get("code") or {}, local.get("code") or {}
    if code_there.get("sha256") and code_there.get("sha256") != code_here.get("sha256"):
        lines.append(f"code: study trained mtbert sources {_short(code_there['sha256'])} (commit "
                     f"{(code_there.get('commit') or 'unknown')[:12]}), this worker has {_short(code_here['sha256'])} "
                     f"(commit {(code_here.get('commit') or 'unknown')[:12]})")
    return lines


def _known_encoder(encoder: Any) -> bool:
    """An encoder identity with a content hash (provenance.encoder_identity says "unknown" without the files)."""
    return isinstance(encoder, dict) and encoder.get("sha256") not in (None, "unknown")


def check_identity(study: optuna.Study, spec: StudySpec) -> None:
    """The first opener records what the study's trials train with; a later one that would train with
    something else (another encoder behind the same name, another TrainConfig default, other training
    code) is refused with one line naming what differs (StudyMismatch)."""
    local = local_identity(spec)
    recorded = optuna_compat.study_system_attrs(study).get(IDENTITY_ATTR)
    if recorded is None:
        with storage_lib.trial_slot_lock(optuna_compat.rdb_storage(study), study.study_name):
            recorded = optuna_compat.study_system_attrs(study).get(IDENTITY_ATTR)
            if recorded is None:
                optuna_compat.set_study_system_attr(study, IDENTITY_ATTR, local)
                return
    if not _known_encoder(recorded.get("encoder")) and _known_encoder(local.get("encoder")):
        # recorded by a node without the model (no encoder, or its hash "unknown"): the first node that has it
        # completes the record, under the lock, so the check is never switched off for the study
        with storage_lib.trial_slot_lock(optuna_compat.rdb_storage(study), study.study_name):
            recorded = optuna_compat.study_system_attrs(study).get(IDENTITY_ATTR) or {}
            if not _known_encoder(recorded.get("encoder")):
                recorded = {**recorded, "encoder": local["encoder"]}
                optuna_compat.set_study_system_attr(study, IDENTITY_ATTR, recorded)
    differences = identity_differences(recorded, local)
    if differences:
        raise StudyMismatch(f"refusing to join study {study.study_name!r}: this worker would change its results: "
                            f"{'; '.join(differences)} (run with the study's encoder and code, or copy the study "
                            f"file under a new name for a new study)")


def _recorded_budget(attrs: dict[str, Any]) -> int | None:
    """The budget recorded in a study's user attrs: the latest n_trials given, else its spec's."""
    given = [attrs[k]["n_trials"] for k in sorted(attrs)
             if k.startswith("overrides ") and isinstance(attrs[k], dict) and "n_trials" in attrs[k]]
    return given[-1] if given else (attrs.get("spec") or {}).get("n_trials")


@overload
def study_budget(study: optuna.Study, spec: StudySpec) -> int: ...
@overload
def study_budget(study: optuna.Study, spec: None = None) -> int | None: ...
def study_budget(study: optuna.Study, spec: StudySpec | None = None) -> int | None:
    """The one budget every worker and report goes by: the latest recorded on the study (a budget edited in
    the file or given with --n-trials is recorded when a command opens the study), else the spec's n_trials;
    without a spec, None where the study records none."""
    recorded = _recorded_budget(study.user_attrs)
    return recorded if recorded or spec is None else spec.n_trials


def check_budget(study: optuna.Study, spec: StudySpec) -> None:
    """A new budget must leave room for the trials already finished or running: a lower one is refused
    (it could only be overshot, and a report would read "5 finished of a budget of 2")."""
    counts = trial_counts(study)
    finished, running = sum(counts[s] for s in FINISHED), counts[TrialState.RUNNING]
    if spec.n_trials < finished + running:
        raise StudyMismatch(f"{spec.path}: n_trials: {spec.n_trials} is below the {finished} finished and {running} "
                            f"running trials of study {study.study_name!r}: give at least {finished + running}")


def trial_counts(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def configure_logging(url: str | None, quiet: bool = False) -> None:
    """Log format and levels; the storage URL's password is masked in every record from here on."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # we run trials with ask/tell and start optuna's heartbeat thread ourselves (Worker.run_trial)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    try:
        storage_lib.install_secret_filter(storage_lib.resolve_url(url))
    except storage_lib.StorageUnavailable:  # reported by the caller when it opens the storage
        pass


def storage_url(args: argparse.Namespace, log: logging.Logger) -> str | None:
    """The storage URL of a CLI's --storage / --storage-file (storage.add_storage_arguments), with
    logging configured to mask it; None, with one ERROR line on `log`, when it cannot be resolved."""
    try:
        url = storage_lib.resolve_url(args.storage, args.storage_file)
    except storage_lib.StorageUnavailable as exc:
        configure_logging(None)
        log.error("%s", exc)
        return None
    configure_logging(url)
    return url
