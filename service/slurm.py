"""SLURM launcher: one job array (one task = one worker), then the study followed from the storage.

    python search.py --study lr_dropout --launcher slurm --workers 8 --storage-file ~/.mtbert-storage \\
        --shared-dir /shared/mtbert [--partition gpu] [--time 12:00:00] [--sbatch-arg=--account=lab]

Every task runs cluster/slurm/worker.sbatch (the script users may also submit by hand), which execs
worker.py. The storage URL reaches the tasks as the path of a mode-600 file (MTBERT_STORAGE_FILE in the
job's environment); neither the URL nor its password is on any command line or in the environment sbatch
exports. The shared folder (--shared-dir / MTBERT_SHARED_DIR) holds checkpoints, artifacts and the tasks'
output files. The launcher shows the same progress bar and leaderboard as the local one; failed tasks are
reported with the last error line of their output file. Ctrl-C on a terminal offers to scancel the array;
without a terminal (or on SIGTERM) the array keeps running and the command to cancel it is printed.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from sqlalchemy.engine import make_url

import storage as storage_lib
from service.progress import follow, last_error_line
from service.study import FINISHED, override_argv, speed_argv, study_budget, study_key, trial_counts
from studies import StudySpec

logger = logging.getLogger("search")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "slurm" / "worker.sbatch"

# terminal states of a job (scontrol's JobState); every other state (PENDING, RUNNING, REQUEUED,
# COMPLETING, SUSPENDED, ...) means the task may still run a worker
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED", "GONE"}
FAILED_STATES = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
GONE = "GONE"  # no longer known to the controller (purged after MinJobAge): ended, status unknown


class SlurmError(RuntimeError):
    """A SLURM command failed or is missing; the message is one line."""


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """search.py's --launcher and the options of the SLURM launcher."""
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: worker processes on this machine; slurm: one job array, one task per "
                             "worker (needs PostgreSQL; see docs/slurm.md) (default: local)")
    group = parser.add_argument_group("--launcher slurm")
    group.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    group.add_argument("--time", default=None, help="time limit per task, e.g. 12:00:00 (default: the partition's)")
    group.add_argument("--gres", default="auto",
                       help="generic resources per task: 'auto' asks gpu:1 when sinfo lists GPUs in the "
                            "partition, 'none' asks nothing, anything else goes to sbatch --gres (default: auto)")
    group.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                       help="extra sbatch option, repeatable: --sbatch-arg=--account=lab --sbatch-arg=--qos=low")
    group.add_argument("--task-env", action="append", default=[], metavar="NAME",
                       help="pass this environment variable to the array tasks too, repeatable; by default they "
                            "get only what a worker needs: MTBERT_*, PATH, HOME, python and conda variables, "
                            "CUDA_*, OMP_*, HF_* offline/cache and TRANSFORMERS_* flags, libpq SSL settings "
                            "(docs/security.md)")
    group.add_argument("--shared-dir", default=os.environ.get("MTBERT_SHARED_DIR"), metavar="DIR",
                       help="folder every node sees: checkpoints/, artifacts/ and logs/ go beneath it "
                            "(default: $MTBERT_SHARED_DIR, else the tasks use $MTBERT_CHECKPOINT_DIR and "
                            "$MTBERT_ARTIFACT_DIR or storage/ of this repository, which must then be shared)")


def check_arguments(args: argparse.Namespace, url: str) -> str | None:
    """Why these arguments cannot launch an array (one line), or None."""
    if args.launcher != "slurm":
        return None
    if args.workers is None or args.workers < 1:
        return "--launcher slurm needs --workers N (the number of array tasks, one worker each)"
    if args.workers_per_gpu not in (None, 1):
        return "--workers-per-gpu is for the local launcher; with SLURM one task is one worker on one GPU"
    parsed = _parse(url)
    if parsed is None or parsed.get_backend_name() != "postgresql":
        return (f"--launcher slurm needs a PostgreSQL storage the nodes can reach (--storage-file PATH holding "
                f"postgresql://...), not {storage_lib.redact(url)}: SQLite is for the workers of one machine")
    return None


def _parse(url: str):
    try:
        return make_url(url)
    except Exception:  # noqa: BLE001 - any unparsable URL
        return None


# ------------------------------------------------------------ slurm commands


def _slurm(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run a SLURM client command; its stdout, or SlurmError with its last stderr line."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: is SLURM installed on this machine (a login node)?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{cmd[0]} did not answer in {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise SlurmError(f"{cmd[0]} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc.stdout


def partition_has_gpus(partition: str | None) -> bool:
    """Whether sinfo lists a `gpu` generic resource on the partition's (else any) nodes."""
    out = _slurm(["sinfo", "--noheader", "--format=%G", *([f"--partition={partition}"] if partition else [])])
    return any(re.match(r"gpu(:|\(|$)", gres) for line in out.split() for gres in line.split(","))


def expand_indexes(text: str) -> list[int]:
    """Array task ids as scontrol writes them: '3', '0-7', '1,3-5', '0-10:2', '0-7%2' (throttle)."""
    out: list[int] = []
    for part in text.split("%")[0].split(","):
        if not part:
            continue
        span, _, step = part.partition(":")
        lo, _, hi = span.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    return out


@dataclass
class TaskState:
    state: str
    exit_code: int | None = None  # the worker's exit status; 128 + N when killed by signal N
    restarts: int = 0

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES


_FIELD = re.compile(r"(?:^|\s)(JobState|ExitCode|ArrayTaskId|Restarts)=(\S*)")


def parse_show_job(text: str) -> dict[int, TaskState]:
    """`scontrol --oneliner show job ARRAY_ID`: one record per task (pending tasks may share one)."""
    tasks: dict[int, TaskState] = {}
    for record in text.splitlines():
        fields: dict[str, str] = {}
        for key, value in _FIELD.findall(record):
            fields.setdefault(key, value)  # the first: a later "JobState=" may be in the Command's arguments
        if "JobState" not in fields or not fields.get("ArrayTaskId"):
            continue
        code = None
        if ":" in fields.get("ExitCode", ""):
            status, sig = (int(x) for x in fields["ExitCode"].split(":"))
            code = 128 + sig if sig else status
        state = TaskState(fields["JobState"], code, int(fields.get("Restarts") or 0))
        for i in expand_indexes(fields["ArrayTaskId"]):
            tasks[i] = state
    return tasks


class ArrayJob:
    """A submitted job array as the controller sees it, refreshed at most every `max_age` seconds."""

    def __init__(self, job_id: str, n_tasks: int, log_dir: Path, max_age: float = 3.0):
        self.job_id, self.n_tasks, self.log_dir, self.max_age = job_id, n_tasks, log_dir, max_age
        self.tasks: dict[int, TaskState] = {i: TaskState("PENDING") for i in range(n_tasks)}
        self._read_at = 0.0
        self._warned = False
        self.not_started: set[int] = set()  # pending tasks cancelled because the budget was met

    def refresh(self, force: bool = False) -> dict[int, TaskState]:
        if not force and time.monotonic() - self._read_at < self.max_age:
            return self.tasks
        self._read_at = time.monotonic()
        try:
            out = _slurm(["scontrol", "--oneliner", "show", "job", self.job_id])
        except SlurmError as exc:
            if "invalid job id" in str(exc).lower():  # purged after MinJobAge: every task has ended
                out = ""
            else:  # a busy controller: keep what we knew, say so once
                if not self._warned:
                    logger.warning("cannot read the array's state (%s); retrying", exc)
                    self._warned = True
                return self.tasks
        seen = parse_show_job(out)
        for i in range(self.n_tasks):
            self.tasks[i] = seen.get(i) or (self.tasks[i] if self.tasks[i].done else TaskState(GONE))
        return self.tasks

    def active(self) -> list[int]:
        return [i for i, t in self.refresh().items() if not t.done]

    def output_file(self, index: int) -> Path:
        return self.log_dir / f"worker-{self.job_id}_{index}.out"

    def cancel(self, pending_only: bool = False) -> None:
        if pending_only:
            self.not_started |= {i for i, t in self.refresh(force=True).items() if t.state == "PENDING"}
        _slurm(["scancel", *(["--state=PENDING"] if pending_only else []), self.job_id])


class ArrayTask:
    """One task, shaped like the local workers service.progress.follow watches (service.launch.LocalWorker):
    `proc.poll()` is None while the task is pending or running, else its exit status."""

    def __init__(self, job: ArrayJob, index: int):
        self.job, self.index = job, index

    @property
    def proc(self) -> "ArrayTask":
        return self

    def poll(self) -> int | None:
        task = self.job.refresh()[self.index]
        return None if not task.done else (task.exit_code or 0)

    @property
    def failed(self) -> bool:
        task = self.job.refresh()[self.index]
        return task.done and task.state in FAILED_STATES

    def exit_text(self) -> str:
        task = self.job.refresh()[self.index]
        return f"(task {self.job.job_id}_{self.index}) ended {task.state} (exit {task.exit_code})"

    def last_error(self) -> str:
        return last_error_line(self.job.output_file(self.index)) or "no output"


# ------------------------------------------------------------ submission


def storage_file_for_tasks(url: str, url_file: str | None, shared_dir: Path) -> Path:
    """The mode-600 file the tasks read the URL from: the one the URL came from, else one written
    under the shared folder (the URL was given with --storage or $MTBERT_STORAGE)."""
    source = storage_lib.worker_environment(url, url_file).get("MTBERT_STORAGE_FILE")
    if source:
        return Path(source)
    path = shared_dir / "storage-url"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file may have other bits
        os.write(fd, f"{url}\n".encode())
    finally:
        os.close(fd)
    logger.info("storage URL written to %s (mode 600) for the array tasks; next time pass --storage-file %s",
                path, path)
    return path


# What an array task inherits from this shell: what a worker (and sbatch itself) needs, nothing else.
# Everything not listed (other services' URLs, cloud keys, tokens) stays here; --task-env NAME adds one.
TASK_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
    "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "CONDA_EXE", "CONDA_PYTHON_EXE", "CONDA_SHLVL",
    "SLURM_CONF", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    # libpq's connection settings (not PGPASSWORD: the password belongs in the storage file)
    "PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL", "PGPASSFILE", "PGSERVICEFILE",
    "PGCONNECT_TIMEOUT", "PGAPPNAME", "PGTZ",
    "TOKENIZERS_PARALLELISM", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE",
})
TASK_ENV_PREFIXES = ("MTBERT_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "TORCH_", "PYTORCH_", "NCCL_",
                     "LC_", "SBATCH_")


def task_environment(url: str, storage_file: Path, shared_dir: str | None, seed: int | None,
                     extra: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """The environment sbatch runs with and exports to the tasks: the allowlist above (plus `extra`
    names) and the storage file's path, never the URL, its password or any other variable."""
    password = getattr(_parse(url), "password", None)
    wanted = TASK_ENV_NAMES | set(extra)
    env = {k: v for k, v in os.environ.items()
           if (k in wanted or k.startswith(TASK_ENV_PREFIXES))
           and k not in ("MTBERT_STORAGE", "MTBERT_STORAGE_FILE", "MTBERT_SEED")
           and url not in v and not (password and password in v)}
    env["MTBERT_STORAGE_FILE"] = str(storage_file)
    env["MTBERT_PYTHON"] = sys.executable
    env["MTBERT_ROOT"] = str(ROOT)
    if shared_dir:
        env["MTBERT_SHARED_DIR"] = str(Path(shared_dir).resolve())
        for name, sub in (("MTBERT_CHECKPOINT_DIR", "checkpoints"), ("MTBERT_ARTIFACT_DIR", "artifacts")):
            if env.get(name) and Path(env[name]).resolve() != Path(env["MTBERT_SHARED_DIR"]) / sub:
                logger.warning("%s=%s is ignored: the shared folder decides, the tasks use %s/%s", name, env[name],
                               env["MTBERT_SHARED_DIR"], sub)
    if seed is not None:
        env["MTBERT_SEED"] = str(seed)
    return env


def sbatch_command(study: str, spec: StudySpec, args: argparse.Namespace, log_dir: Path, gres: str | None) -> list[str]:
    """sbatch for an array of args.workers tasks of cluster/slurm/worker.sbatch (requeue, signal: its #SBATCH lines)."""
    passthrough = override_argv(args)
    if Path(study).is_file():  # tasks start in the repository: a relative path would point elsewhere
        study = str(Path(study).resolve())
    return ["sbatch", "--parsable", f"--array=0-{args.workers - 1}", f"--job-name=mtbert-{spec.name}",
            f"--output={log_dir}/worker-%A_%a.out", f"--chdir={ROOT}",
            *([f"--partition={args.partition}"] if args.partition else []),
            *([f"--time={args.time}"] if args.time else []),
            *([f"--gres={gres}"] if gres else []),
            *args.sbatch_arg, str(SCRIPT), "--study", study, *speed_argv(args), *passthrough]


def resolve_gres(args: argparse.Namespace) -> str | None:
    if args.gres == "none":
        return None
    if args.gres == "auto":
        return "gpu:1" if partition_has_gpus(args.partition) else None
    return args.gres


def submit(study: str, spec: StudySpec, url: str, args: argparse.Namespace, key: str) -> ArrayJob:
    """Submit the array; SlurmError when sbatch refuses it or the shared folder cannot be written. Task
    output goes to logs/<key>/ (key: the study's identity, service.study.study_key)."""
    shared = Path(args.shared_dir).resolve() if args.shared_dir else storage_lib.STORAGE_DIR
    log_dir = shared / "logs" / key
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        storage_file = storage_file_for_tasks(url, getattr(args, "storage_file", None), shared)
    except OSError as exc:
        raise SlurmError(f"cannot write to {exc.filename or shared}: {exc.strerror or exc} (--shared-dir must be a "
                         f"folder you can write that every node sees)") from None
    gres = resolve_gres(args)
    cmd = sbatch_command(study, spec, args, log_dir, gres)
    env = task_environment(url, storage_file, args.shared_dir, args.seed, getattr(args, "task_env", None) or ())
    logger.info("array tasks receive %d environment variable(s): %s (more with --task-env NAME)", len(env),
                " ".join(sorted(env)))
    out = _slurm(cmd, env=env)
    job_id = out.strip().split(";")[0]  # --parsable: "JOBID" or "JOBID;CLUSTER"
    logger.info("submitted job array %s: %d task(s)%s; task output in %s", job_id, args.workers,
                f" with --gres={gres}" if gres else " (no GPUs requested)", log_dir)
    return ArrayJob(job_id, args.workers, log_dir)


# ------------------------------------------------------------ after the array


def report_tasks(job: ArrayJob) -> int:
    """Log every task that failed (with its last error line) or was cancelled; how many failed."""
    failed = 0
    for i, task in sorted(job.refresh(force=True).items()):
        path = job.output_file(i)
        if task.state in FAILED_STATES:
            failed += 1
            logger.error("task %s_%d %s (exit %s): %s  [%s]", job.job_id, i, task.state, task.exit_code,
                         last_error_line(path) or "no output", path)
        elif i in job.not_started and task.state == "CANCELLED":
            logger.info("task %s_%d was not started: the budget was met", job.job_id, i)
        elif task.state in ("CANCELLED", "PREEMPTED"):
            logger.warning("task %s_%d was %s; a trial it ran was handed back for retry  [%s]", job.job_id, i,
                           task.state.lower(), path)
    return failed


def _wait_for_tasks(job: ArrayJob, timeout: float, poll: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while job.active():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def _on_interrupt(job: ArrayJob, status_command: str) -> None:
    """Ctrl-C (or SIGTERM): on a terminal ask whether to scancel the array; otherwise leave it running."""
    active = job.active()
    if not active:
        return
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    answer = ""
    if interactive:
        try:
            answer = input(f"\ncancel job array {job.job_id} ({len(active)} task(s) pending or running; their "
                           f"running trials are handed back and resume later)? [y/N] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            answer = ""
    if answer in ("y", "yes"):
        job.cancel()
        logger.warning("cancelled job array %s", job.job_id)
        return
    logger.warning("job array %s keeps running; follow it with `%s`, stop it with `scancel %s`", job.job_id,
                   status_command, job.job_id)


def run_array(study_arg: str, study: optuna.Study, spec: StudySpec, url: str, args: argparse.Namespace) -> int:
    """Submit the array, follow the study until its budget is met or every task has ended, report
    failed tasks. 0: budget met and no task failed; 1: a task failed or the budget is not met;
    2: sbatch refused the array; 130: interrupted (the array may keep running)."""
    try:
        job = submit(study_arg, spec, url, args, study_key(study))
    except SlurmError as exc:
        logger.error("%s", exc)
        return 2
    tasks = [ArrayTask(job, i) for i in range(job.n_tasks)]
    try:
        follow(study, spec, tasks)
        if sum(trial_counts(study)[s] for s in FINISHED) >= study_budget(study, spec):
            job.cancel(pending_only=True)  # tasks not started yet would find nothing to do
            if not _wait_for_tasks(job, timeout=600):
                logger.warning("tasks %s still running 10 minutes after the budget was met",
                               ", ".join(f"{job.job_id}_{i}" for i in job.active()))
    except KeyboardInterrupt:
        storage_option = f" --storage-file {args.storage_file}" if getattr(args, "storage_file", None) else ""
        named = f" --study-name {args.study_name}" if getattr(args, "study_name", None) else ""
        _on_interrupt(job, f"python search.py --study {study_arg}{named} --status{storage_option}")
        return 130
    except SlurmError as exc:
        logger.error("%s", exc)
        return 1
    failed = report_tasks(job)
    finished = sum(trial_counts(study)[s] for s in FINISHED)
    if finished < study_budget(study, spec):
        logger.error("every task of job array %s has ended with %d of %d trials finished; %s", job.job_id, finished,
                     study_budget(study, spec), "fix what failed, then run the same command again" if failed
                     else "run the same command again to continue the study")
        return 1
    return 1 if failed else 0
