"""The SLURM launcher on a live one-node SLURM (munged, slurmctld, slurmd started here) against the real
PostgreSQL: an array meets the budget exactly, a task cancelled or requeued mid-trial hands its trial back
and the retry resumes from its checkpoint, a failing task is reported with its error line, and the storage
URL shows nowhere SLURM keeps or displays a job. Plus the launcher's parsing and decisions, without SLURM.

The cluster needs Debian's slurm-wlm and munge and root (slurmd); without them these tests skip, but under
CI=true they fail, like the PostgreSQL tests.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

import storage as storage_lib
from helpers import ROOT, assert_budget_met_exactly, free_port, load, write_study
from service.study import study_key, study_uuid
from service import slurm as launcher
from tiny import write_data

pytestmark = pytest.mark.slow  # real processes: see docs/testing.md

SCRIPT = ROOT / "cluster" / "slurm" / "worker.sbatch"


# ------------------------------------------------------------ a one-node cluster


def _no_slurm(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the SLURM tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def _stop(pid_file: Path) -> None:
    """SIGTERM the daemon whose pid is in pid_file (one we started), SIGKILL after 15 s."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(150):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _slurm_conf(d: Path, host: str, cpus: int, mem_mb: int) -> str:
    return f"""# written by tests/test_slurm.py for one run; private socket, ports and folders
ClusterName=mtbert-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the CPU count below is slots for tiny-model workers, not cores: trust it rather than the hardware
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmdSpoolDir={d}/spool
StateSaveLocation={d}/state
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmUser=root
KillWait=30
MinJobAge=600
SchedulerParameters=sched_min_interval=200000
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM on this machine for this module: its own munged (private socket), slurmctld and
    slurmd on free ports, all state in a temp folder; SLURM_CONF points the client commands at it."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if not shutil.which(b)]
    if missing:
        _no_slurm(f"SLURM not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        _no_slurm("the one-node SLURM of these tests runs slurmd, which needs root")
    if not Path("/etc/munge/munge.key").is_file():
        _no_slurm("no /etc/munge/munge.key (the munge package creates it)")
    d = Path(tempfile.mkdtemp(prefix="mtbert-slurm-", dir="/tmp"))  # short: socket paths are limited
    d.chmod(0o755)
    (d / "munge").mkdir(mode=0o755)
    shutil.chown(d / "munge", "munge", "munge")
    host = socket.gethostname().split(".")[0]
    cpus = max(os.cpu_count() or 1, 4)  # 3 workers + 1 hand-submitted task at once, whatever the cores
    mem_mb = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20 * 0.9)
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, host, cpus, mem_mb))
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    pid_files = [d / "slurmd.pid", d / "slurmctld.pid", d / "munge" / "munged.pid"]
    try:
        m = d / "munge"
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={m}/munge.socket",
                        f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
                       check=True, capture_output=True, timeout=30)
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, capture_output=True, timeout=30)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, capture_output=True, timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            logs = "".join(p.read_text()[-1500:] for p in (d / "slurmctld.log", d / "slurmd.log") if p.exists())
            pytest.fail(f"the one-node SLURM did not become idle in 60 s (sinfo: {state.strip()!r}):\n{logs}")
        yield d
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"starting {exc.cmd[0]} failed: {exc.stderr}", pytrace=False)
    finally:
        subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], capture_output=True, timeout=30)
        for _ in range(60):  # let the cancelled tasks' workers exit before slurmd goes
            if not subprocess.run(["squeue", "--noheader"], capture_output=True, text=True, timeout=30).stdout.strip():
                break
            time.sleep(1)
        for pid_file in pid_files:
            _stop(pid_file)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------ helpers


@pytest.fixture
def task_env(tmp_path):
    """What a user's shell exports to sbatch: fast heartbeats, one thread per CPU task, no URL anywhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("MTBERT_TEST_PG_URL", "MTBERT_STORAGE")}
    env.update(MTBERT_HEARTBEAT_INTERVAL="1", MTBERT_HEARTBEAT_GRACE="10", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def storage_file(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "storage-url"
    path.write_text(f"# the study's PostgreSQL\n{url}\n")
    path.chmod(0o600)
    return path


def show_job(job: str) -> dict[int, launcher.TaskState]:
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", job], capture_output=True, text=True).stdout
    return launcher.parse_show_job(out)


def wait_until_done(job: str, timeout: float = 400) -> dict[int, launcher.TaskState]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        tasks = show_job(job)
        if tasks and all(t.done for t in tasks.values()):
            return tasks
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"job array {job} still running after {timeout} s: {show_job(job)}")


def visible_job_text(job: str | None = None) -> str:
    """Everything squeue and scontrol show about a job (else about every job)."""
    ids = [job] if job else []
    texts = [subprocess.run(cmd, capture_output=True, text=True).stdout for cmd in (
        ["squeue", "--all", "--format=%all"], ["scontrol", "-dd", "show", "job", *ids],
        ["scontrol", "--oneliner", "show", "job", *ids])]
    return "\n".join(texts)


def stored_environments(cluster: Path) -> str:
    return "\n".join(p.read_bytes().replace(b"\0", b"\n").decode(errors="replace")
                     for p in cluster.glob("state/hash.*/job.*/environment"))


# ------------------------------------------------------------ on the live cluster


def test_search_launches_an_array_that_meets_the_budget_exactly_and_never_shows_the_url(
        slurm, tmp_path, tiny_model, tiny_data, clean_pg_url, task_env):
    password = make_url(clean_pg_url).password
    assert password
    url_file = storage_file(tmp_path, clean_pg_url)
    shared = tmp_path / "shared"
    study_file = write_study(tmp_path, "arr", tiny_model, tiny_data, n_trials=5, epochs=2)
    # a user's shell may hold the URL (here $MTBERT_STORAGE; --storage-file wins): it must not reach the job
    proc = subprocess.Popen([sys.executable, "search.py", "--study", str(study_file), "--launcher", "slurm",
                             "--workers", "3", "--storage-file", str(url_file), "--shared-dir", str(shared)],
                            cwd=ROOT, env={**task_env, "MTBERT_STORAGE": clean_pg_url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    while proc.poll() is None:  # what anyone on the cluster can see while the array runs
        seen.append(visible_job_text())
        time.sleep(2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "submitted job array" in err and "study arr: complete" in out and "budget 5" in out
    job = err.split("submitted job array ")[1].split(":")[0]
    seen.append(visible_job_text(job))
    assert any(f"ArrayJobId={job}" in text for text in seen)  # we did look at the live job
    stored = stored_environments(slurm)
    assert f"MTBERT_STORAGE_FILE={url_file}" in stored  # the tasks got the file's path ...
    for text in (*seen, stored, out, err):  # ... and the URL and its password show nowhere
        assert password not in text and clean_pg_url not in text

    tasks = show_job(job)
    assert sorted(tasks) == [0, 1, 2] and all(t.state == "COMPLETED" and t.exit_code == 0 for t in tasks.values())
    study = load(clean_pg_url, "arr")
    assert_budget_met_exactly(study, 5, 2)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)  # nothing RUNNING
    # checkpoints, artifacts and task output live in the one shared folder
    assert (shared / "checkpoints" / study_uuid(study)).is_dir() and any((shared / "artifacts").iterdir())
    log_dir = shared / "logs" / study_key(study)  # keyed by the study's identity, not its name
    logs = sorted(p.name for p in log_dir.iterdir())
    assert logs == [f"worker-{job}_{i}.out" for i in range(3)]
    ran = sum(1 for p in log_dir.iterdir() for line in p.read_text().splitlines()
              if " INFO worker: trial " in line and ": {" in line)
    assert ran == 5  # every trial ran once, spread over the tasks


# What happens to a task mid-trial: `scancel` (SIGTERM to all its processes, then the task ends), SIGTERM to
# the batch shell only (what --signal=B:TERM@120 sends before the time limit: reaches the worker only because
# the script execs it) and `scontrol requeue` (what a preempting scheduler does: SIGTERM, then the task runs again).
ACTIONS = {"scancel": ["scancel"], "batch-signal": ["scancel", "--batch", "--signal=TERM"],
           "requeue": ["scontrol", "requeue"]}


def test_a_task_cancelled_signalled_or_requeued_mid_trial_hands_its_trial_back_and_the_retry_resumes(
        slurm, tmp_path, tiny_model, clean_pg_url, task_env):
    """One array of 3 tasks, each hit by one action of ACTIONS after its trial's first epoch checkpoint: every
    trial is handed back, retried and resumed from its checkpoint; the requeued task runs again and does the
    retries; the budget is still exact."""
    epochs = 4
    # ~1 s epochs: at 300 examples (0.3 s epochs on a fast 2-core machine) a victim's last epochs could end
    # before its signal arrived, and the trial completed instead of being handed back
    data = write_data(tmp_path / "data", n_train=1200, n_dev=24, malformed=False)
    study_file = write_study(tmp_path, "pre", tiny_model, data, n_trials=3, epochs=epochs, pruner='type = "none"')
    out_dir = tmp_path / "shared" / "logs"
    out_dir.mkdir(parents=True)
    env = {**task_env, "MTBERT_STORAGE_FILE": str(storage_file(tmp_path, clean_pg_url)),
           "MTBERT_SHARED_DIR": str(tmp_path / "shared")}
    job = subprocess.run(["sbatch", "--parsable", "--array=0-2", f"--output={out_dir}/w-%A_%a.out", str(SCRIPT),
                          "--study", str(study_file)], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert "Requeue=1" in visible_job_text(job)  # the script's #SBATCH --requeue

    def task_running(trial_number: int) -> int:
        for i in range(3):
            path = out_dir / f"w-{job}_{i}.out"
            if path.exists() and f"INFO worker: trial {trial_number}: " in path.read_text():
                return i
        raise AssertionError(f"no task logged trial {trial_number}")

    victims: dict[str, tuple[int, int]] = {}  # action -> (trial number, task)
    deadline = time.time() + 300
    while len(victims) < len(ACTIONS) and time.time() < deadline:
        time.sleep(0.5)
        try:
            running = load(clean_pg_url, "pre").get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # no task has created the study yet
            continue
        hit = {number for number, _ in victims.values()}
        for t in running:  # first attempts only (a retry inherits its failed trial's user attributes)
            if t.user_attrs.get("epochs_done", 0) >= 1 and "failed_trial" not in t.system_attrs and t.number not in hit:
                action = list(ACTIONS)[len(victims)]
                victims[action] = (t.number, task_running(t.number))
                subprocess.run([*ACTIONS[action], f"{job}_{victims[action][1]}"], check=True)
                break
    assert len(victims) == len(ACTIONS), f"only {victims} ran past epoch 1 while running: {show_job(job)}"
    requeued = victims["requeue"][1]
    # a requeued job is held ~2 minutes (slurmctld's requeue delay); let it start again at once
    for _ in range(120):
        if show_job(job)[requeued].state == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}_{requeued}", "StartTime=now"], check=True)
            break
        time.sleep(0.5)
    tasks = wait_until_done(job)

    assert tasks[victims["scancel"][1]].state == "CANCELLED"
    signalled = tasks[victims["batch-signal"][1]]
    assert signalled.state == "COMPLETED" and signalled.exit_code == 0 and signalled.restarts == 0
    assert tasks[requeued].state == "COMPLETED" and tasks[requeued].restarts == 1
    requeued_out = (out_dir / f"w-{job}_{requeued}.out").read_text()
    assert "restart 0 on" in requeued_out and "restart 1 on" in requeued_out  # one output file, both runs
    study = load(clean_pg_url, "pre")
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and not [t for t in study.trials if t.state == TrialState.RUNNING]
    for action, (number, task) in victims.items():
        out = (out_dir / f"w-{job}_{task}.out").read_text()
        assert "SIGTERM received" in out and f"trial {number} handed back for retry" in out, action
        failed = study.trials[number]
        assert failed.state == TrialState.FAIL
        retry = next((t for t in study.trials if t.system_attrs.get("failed_trial") == number), None)
        assert retry is not None and retry.state == TrialState.COMPLETE and retry.params == failed.params, action
        resumed = retry.user_attrs["resumed_from_epoch"]
        assert resumed >= failed.user_attrs["epochs_done"] >= 1, action  # from the victim's last checkpoint
        assert len(retry.user_attrs["epoch_seconds"]) == epochs - resumed  # only the missing epochs trained
        assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))
    assert sorted(t.number for t in study.trials) == list(range(6))  # 3 + 3 retries, none lost or duplicated


def test_failing_tasks_are_reported_with_their_error_line(slurm, tmp_path, tiny_model, clean_pg_url, task_env):
    """A task whose node lacks the data fails with one clear line, which search.py shows (exit 1); a task that
    cannot reach the storage fails the same way, without the password."""
    bad_url = "postgresql://mtbert:s3cr3t-pw@127.0.0.1:1/mtbert"
    bad_file = tmp_path / "bad-url"
    bad_file.write_text(bad_url + "\n")
    bad_file.chmod(0o600)
    study_file = write_study(tmp_path, "nodata", tiny_model, tmp_path / "no-such-folder", n_trials=2, epochs=1)
    out = tmp_path / "by-hand.out"
    # the task by hand has its data (a worker checks the data before it opens the storage): only the URL is bad
    with_data = write_study(tmp_path, "nourl", tiny_model, write_data(tmp_path / "data"), n_trials=2, epochs=1)
    by_hand = subprocess.run(["sbatch", "--parsable", "--array=0", f"--output={out}", str(SCRIPT), "--study", str(with_data)],
                             cwd=ROOT, env={**task_env, "MTBERT_STORAGE_FILE": str(bad_file)}, capture_output=True,
                             text=True, check=True).stdout.strip()
    proc = subprocess.run([sys.executable, "search.py", "--study", str(study_file), "--launcher", "slurm",
                           "--workers", "2", "--storage-file", str(storage_file(tmp_path, clean_pg_url)),
                           "--shared-dir", str(tmp_path / "shared")], cwd=ROOT, env=task_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    job = proc.stderr.split("submitted job array ")[1].split(":")[0]
    for i in (0, 1):
        assert (f"task {job}_{i} FAILED (exit 2): worker: no CS224N data in {tmp_path}/no-such-folder (no such "
                "folder): pass --data-dir DIR or set MTBERT_DATA_DIR=DIR") in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout

    tasks = wait_until_done(by_hand, timeout=120)
    assert tasks[0].state == "FAILED" and tasks[0].exit_code == 2
    line = launcher.last_error_line(out)
    assert line == "worker: cannot reach storage postgresql://mtbert:***@127.0.0.1:1/mtbert: connection " \
                   "refused — is the server running? (storage/postgres.sh start)"
    assert "s3cr3t-pw" not in out.read_text() and "Traceback" not in out.read_text()


# ------------------------------------------------------------ without a cluster


SHOW_JOB = """\
JobId=11 ArrayJobId=11 ArrayTaskId=2-3%1 ArrayTaskThrottle=1 JobName=wrap JobState=PENDING Reason=JobArrayTaskLimit Requeue=1 Restarts=0 BatchFlag=1 ExitCode=0:0 Command=/x/worker.sbatch --study a JobState=FAKE
JobId=13 ArrayJobId=11 ArrayTaskId=1 ArrayTaskThrottle=1 JobName=wrap JobState=RUNNING Reason=None Requeue=1 Restarts=1 BatchFlag=1 ExitCode=0:0
JobId=12 ArrayJobId=11 ArrayTaskId=0 ArrayTaskThrottle=1 JobName=wrap JobState=CANCELLED Reason=None Requeue=1 Restarts=0 BatchFlag=1 ExitCode=0:15
JobId=14 ArrayJobId=11 ArrayTaskId=4 ArrayTaskThrottle=1 JobName=wrap JobState=FAILED Reason=NonZeroExitCode Requeue=1 Restarts=0 BatchFlag=1 ExitCode=2:0
"""  # from `scontrol --oneliner show job 11` on the live cluster (fields cut), plus a failed task


def test_scontrol_records_parse_into_task_states():
    tasks = launcher.parse_show_job(SHOW_JOB)
    assert sorted(tasks) == [0, 1, 2, 3, 4]
    assert tasks[2].state == tasks[3].state == "PENDING" and not tasks[2].done
    assert tasks[1].state == "RUNNING" and tasks[1].restarts == 1
    assert tasks[0].state == "CANCELLED" and tasks[0].exit_code == 128 + 15 and tasks[0].done
    assert tasks[4].state == "FAILED" and tasks[4].exit_code == 2
    assert launcher.expand_indexes("0-10:5,12") == [0, 5, 10, 12]


def test_gpus_are_requested_only_where_sinfo_lists_them(monkeypatch):
    answers = {"(null)\n": False, "gpu:a100:4(S:0-1)\n(null)\n": True, "gpu:2,nic:1\n": True, "gpuless:1\n": False}
    for out, expected in answers.items():
        monkeypatch.setattr(launcher, "_slurm", lambda cmd, out=out, **kw: out)
        assert launcher.partition_has_gpus(None) is expected
        args = argparse.Namespace(gres="auto", partition=None)
        assert launcher.resolve_gres(args) == ("gpu:1" if expected else None)
    assert launcher.resolve_gres(argparse.Namespace(gres="none", partition=None)) is None
    assert launcher.resolve_gres(argparse.Namespace(gres="gpu:h100:1", partition=None)) == "gpu:h100:1"


def slurm_args(**kw) -> argparse.Namespace:
    base = dict(launcher="slurm", workers=3, workers_per_gpu=None, partition="gpu", time="1:00:00", gres="auto",
                sbatch_arg=["--account=lab"], shared_dir=None, seed=None, storage_file=None, n_trials=None,
                epochs=2, max_examples=None, model=None, data_dir=None)
    return argparse.Namespace(**{**base, **kw})


def test_the_sbatch_command_and_environment_carry_the_storage_file_never_the_url(tmp_path, monkeypatch):
    url = "postgresql://mtbert:pw-9xq@db:5432/mtbert"
    monkeypatch.setenv("MTBERT_STORAGE", url)
    monkeypatch.setenv("SOME_TOOL_DSN", "host=db password=pw-9xq")  # another variable holding the password
    url_file = launcher.storage_file_for_tasks(url, None, tmp_path)  # the URL came from the environment
    assert url_file == tmp_path / "storage-url" and stat.S_IMODE(url_file.stat().st_mode) == 0o600
    assert storage_lib.read_url_file(url_file) == url
    env = launcher.task_environment(url, url_file, str(tmp_path), seed=7)
    assert env["MTBERT_STORAGE_FILE"] == str(url_file) and env["MTBERT_SEED"] == "7"
    assert env["MTBERT_SHARED_DIR"] == str(tmp_path) and "MTBERT_STORAGE" not in env
    assert not [k for k, v in env.items() if "pw-9xq" in v]
    spec = argparse.Namespace(name="x")
    cmd = launcher.sbatch_command("lr_dropout", spec, slurm_args(), tmp_path / "logs", "gpu:1")
    assert cmd[:3] == ["sbatch", "--parsable", "--array=0-2"]
    assert {"--partition=gpu", "--time=1:00:00", "--gres=gpu:1", "--account=lab"} <= set(cmd)
    assert cmd[cmd.index(str(SCRIPT)):] == [str(SCRIPT), "--study", "lr_dropout", "--epochs", "2"]
    assert not [a for a in cmd if "pw-9xq" in a]
    # a file the URL came from is passed on as it is
    given = tmp_path / "mine"
    given.write_text(url)
    given.chmod(0o600)
    assert launcher.storage_file_for_tasks(url, str(given), tmp_path / "other") == given.resolve()


def test_bad_launcher_arguments_are_one_clear_error(tmp_path):
    pg = "postgresql://u:p@h/db"
    assert launcher.check_arguments(slurm_args(), pg) is None
    assert "needs --workers N" in launcher.check_arguments(slurm_args(workers=None), pg)
    assert "--workers-per-gpu is for the local launcher" in launcher.check_arguments(slurm_args(workers_per_gpu=2), pg)
    assert "needs a PostgreSQL storage" in launcher.check_arguments(slurm_args(), f"sqlite:///{tmp_path}/x.db")
    proc = subprocess.run([sys.executable, "search.py", "--study", "quickstart", "--launcher", "slurm",
                           "--workers", "2", "--storage", f"sqlite:///{tmp_path / 's.db'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--launcher slurm needs a PostgreSQL storage" in proc.stderr
    assert not (tmp_path / "s.db").exists()  # refused before anything was created


def test_ctrl_c_asks_on_a_terminal_and_otherwise_leaves_the_array_running(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(launcher, "_slurm", lambda cmd, **kw: calls.append(cmd) or "")
    job = launcher.ArrayJob("42", 2, Path("/nowhere"))
    job.tasks = {0: launcher.TaskState("RUNNING"), 1: launcher.TaskState("PENDING")}
    monkeypatch.setattr(job, "refresh", lambda force=False: job.tasks)

    class Tty:
        def __init__(self, tty: bool):
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr(sys, "stdin", Tty(False))
    launcher._on_interrupt(job, "python search.py --study lr_dropout --status")
    assert calls == [] and "scancel 42" in caplog.text
    assert "keeps running; follow it with `python search.py --study lr_dropout --status`" in caplog.text

    monkeypatch.setattr(sys, "stdin", Tty(True))
    monkeypatch.setattr(sys, "stderr", Tty(True))
    for answer, cancelled in (("n", False), ("y", True)):
        monkeypatch.setattr("builtins.input", lambda prompt: answer)
        launcher._on_interrupt(job, "python search.py --study lr_dropout --status")
        assert (["scancel", "42"] in calls) is cancelled


def test_last_error_line_of_a_task_output(tmp_path):
    out = tmp_path / "w.out"
    out.write_text("mtbert worker: job 5 task 0 restart 0 on n1\n"
                   "2026-01-01 10:00:00,123 WARNING mtbert.data: skipped 3 malformed row(s)\n"
                   "2026-01-01 10:00:01,456 ERROR worker: /d/ids-sst-train.csv: file not found\n"
                   "2026-01-01 10:00:01,500 INFO worker: bye\n")
    assert launcher.last_error_line(out) == "worker: /d/ids-sst-train.csv: file not found"
    out.write_text("Traceback (most recent call last):\n  File x\nRuntimeError: CUDA error: no device\n")
    assert launcher.last_error_line(out) == "RuntimeError: CUDA error: no device"
    out.write_text("mtbert worker.sbatch: error: no worker.py in /x\n")
    assert launcher.last_error_line(out) == "mtbert worker.sbatch: error: no worker.py in /x"
    assert launcher.last_error_line(tmp_path / "missing.out") is None


def test_tasks_and_later_commands_agree_on_the_checkpoint_folder(tmp_path, monkeypatch, caplog):
    """worker.sbatch's shared-folder block and storage.checkpoint_dir() give the same folders whether or
    not a per-kind variable is also set (the shared folder decides), so --export-best on a login node
    finds what the tasks wrote; search.py says when it ignores a per-kind variable."""
    text = SCRIPT.read_text()
    block = text[text.index("if [[ -n ${MTBERT_SHARED_DIR:-} ]]"):]
    block = block[:block.index("\nfi\n") + 4]
    shared, mine = tmp_path / "shared", tmp_path / "mine"
    for own in (None, mine):
        env = {k: v for k, v in os.environ.items() if k not in ("MTBERT_CHECKPOINT_DIR", "MTBERT_ARTIFACT_DIR")}
        env["MTBERT_SHARED_DIR"] = str(shared)
        if own is not None:
            env["MTBERT_CHECKPOINT_DIR"] = str(own)
        task = subprocess.run(["bash", "-c", block + 'echo "$MTBERT_CHECKPOINT_DIR|$MTBERT_ARTIFACT_DIR"'], env=env,
                              capture_output=True, text=True, check=True).stdout.strip().split("|")
        monkeypatch.delenv("MTBERT_CHECKPOINT_DIR", raising=False)
        monkeypatch.delenv("MTBERT_ARTIFACT_DIR", raising=False)
        for k in ("MTBERT_SHARED_DIR", "MTBERT_CHECKPOINT_DIR"):
            if k in env:
                monkeypatch.setenv(k, env[k])
        assert task[0] == str(storage_lib.checkpoint_dir()) == str(shared / "checkpoints")
        assert task[1] == str(shared / "artifacts")
    url_file = launcher.storage_file_for_tasks("sqlite:///x.db", None, tmp_path)
    with caplog.at_level("WARNING", logger=launcher.logger.name):
        launcher.task_environment("sqlite:///x.db", url_file, str(shared), seed=None)
    assert f"MTBERT_CHECKPOINT_DIR={mine} is ignored: the shared folder decides, the tasks use {shared}/checkpoints" \
        in caplog.text


def test_array_tasks_receive_only_what_a_worker_needs_not_the_whole_environment(tmp_path, monkeypatch):
    """Issue 17 finding 9: sbatch exported every variable of the submitting shell (other URLs, keys) to the tasks."""
    url = "postgresql://mtbert:pw-9xq@db:5432/mtbert"
    secrets = {"FAKE_SECRET": "s3cr3t-1", "AWS_SECRET_ACCESS_KEY": "s3cr3t-2", "OTHER_DATABASE_URL": "s3cr3t-3",
               "GITHUB_TOKEN": "s3cr3t-4", "HF_TOKEN": "s3cr3t-5"}
    needed = {"PATH": os.environ["PATH"], "HOME": "/home/u", "MTBERT_DATA_DIR": "/data", "CUDA_VISIBLE_DEVICES": "0",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2", "VIRTUAL_ENV": "/venv",
              "PYTHONPATH": "/lib"}
    for name, value in {**secrets, **needed, "MY_TOOL_HOME": "/opt/tool"}.items():
        monkeypatch.setenv(name, value)
    url_file = tmp_path / "url"
    url_file.write_text(url)
    url_file.chmod(0o600)
    captured = {}

    def fake_slurm(cmd, env=None, **kw):
        captured["env"] = env
        return "4242"

    monkeypatch.setattr(launcher, "_slurm", fake_slurm)
    args = slurm_args(storage_file=str(url_file), shared_dir=str(tmp_path), task_env=["MY_TOOL_HOME"])
    launcher.submit("lr_dropout", argparse.Namespace(name="x"), url, args, "key")
    env = captured["env"]
    assert not [k for k, v in env.items() if "s3cr3t" in v or "pw-9xq" in v], sorted(env)
    assert {k: env.get(k) for k in needed} == needed
    assert env["MY_TOOL_HOME"] == "/opt/tool"  # --task-env adds a variable on purpose
    assert env["MTBERT_STORAGE_FILE"] == str(url_file) and env["MTBERT_SHARED_DIR"] == str(tmp_path.resolve())
    assert set(env) - set(needed) - {"MY_TOOL_HOME"} <= {k for k in os.environ if k not in secrets} | {
        "MTBERT_STORAGE_FILE", "MTBERT_PYTHON", "MTBERT_ROOT", "MTBERT_SHARED_DIR"}
