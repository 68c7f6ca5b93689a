"""Helpers shared by the test files (imported as `from helpers import ...`; the `env` fixture is in conftest.py).

Test files never import from each other: what two of them need lives here. The heavy imports (optuna, torch
through the worker) are made inside the functions, so that a file importing only ROOT stays cheap to collect.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------ a small study of the tiny model

STUDY = """
description = "{description}"
direction = "maximize"
metric = "overall"
n_trials = {n_trials}

[train]
epochs = {epochs}
batch_size = 8
model = "{model}"
data_dir = "{data}"
device = "cpu"
eval_batch_size = 64
{train}
[space]
lr = {{ type = "float", low = 1e-4, high = 1e-2, log = true }}
hidden_dropout_prob = {{ type = "float", low = 0.0, high = 0.3 }}

[sampler]
type = "{sampler}"
{sampler_extra}
[pruner]
{pruner}
"""


def _lines(text: str) -> str:
    """`text` as whole lines (a newline after the last one), or nothing."""
    return text if not text or text.endswith("\n") else text + "\n"


def write_study(folder: Path, name: str, model, data, n_trials: int = 6, epochs: int = 3,
                pruner: str = 'type = "median"\nn_startup_trials = 1', *, sampler: str = "tpe",
                sampler_extra: str = "constant_liar = true\nn_startup_trials = 2", train: str = "",
                description: str = "test study") -> Path:
    """`folder`/`name`.toml: a study of `model` on `data` (lr and dropout on CPU, batch 8).

    The defaults: 6 trials of 3 epochs, TPE with a constant liar, the median pruner. `train` and
    `sampler_extra` are lines added to [train] and [sampler]; `pruner` is the body of [pruner].
    """
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(description=description, n_trials=n_trials, epochs=epochs, model=model, data=data,
                                 train=_lines(train), sampler=sampler, sampler_extra=_lines(sampler_extra),
                                 pruner=pruner))
    return path


# ------------------------------------------------------------ workers and the study they write


def start_worker(study_file: Path, url: str, env: dict, *extra: str) -> subprocess.Popen:
    """worker.py on `study_file` against storage `url`, output (stdout and stderr together) piped."""
    return subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "--study", str(study_file), "--no-progress",
                             "--poll-seconds", "0.5", *extra], cwd=ROOT, env={**env, "MTBERT_STORAGE": url},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def without_fast_heartbeats(env: dict) -> dict:
    """`env` (conftest's worker environment) with the heartbeat settings of the shell (else the defaults) in
    place of its fast ones."""
    import os

    env = dict(env)
    for name in ("MTBERT_HEARTBEAT_INTERVAL", "MTBERT_HEARTBEAT_GRACE"):
        if name in os.environ:
            env[name] = os.environ[name]
        else:
            env.pop(name, None)
    return env


def load(url: str, name: str):
    """The optuna study `name` in storage `url`, opened without a heartbeat."""
    import optuna

    import storage as storage_lib

    return optuna.load_study(study_name=name, storage=storage_lib.open_storage(url, heartbeat=False))


def assert_budget_met_exactly(study, budget: int, epochs: int) -> None:
    """`budget` finished trials, numbered without gaps, each with every epoch it reached reported once."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == budget
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none duplicated
    for t in finished:
        steps = sorted(t.intermediate_values)
        expected = epochs if t.state == TrialState.COMPLETE else steps[-1]
        assert steps == list(range(1, expected + 1)), (t.number, steps)


def error_lines(text: str) -> list[str]:
    """The log lines of `text` at level ERROR."""
    return [line for line in text.splitlines() if " ERROR " in line]


def made_trial(state, value: float | None, epochs: int, **attrs):
    """A frozen trial (lr 1e-3, dropout 0.1) in `state`, 0.4 after each of `epochs` epochs, with scores and `attrs`."""
    import optuna

    return optuna.trial.create_trial(
        state=state, value=value, params={"lr": 1e-3, "hidden_dropout_prob": 0.1},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                       "hidden_dropout_prob": optuna.distributions.FloatDistribution(0.0, 0.3)},
        intermediate_values={e: 0.4 for e in range(1, epochs + 1)},
        user_attrs={"sst_acc": 0.3, "quora_acc": 0.6, "sts_corr": 0.3, "overall": 0.4, **attrs})


# ------------------------------------------------------------ a recorded study (reports, dashboard)

EPOCHS, N_DEV = 3, 24
# as in test_search's pruning test: two good runs, then a hopeless one (100x lower lr) that the median
# pruner stops; then one more with other params, so that parameter importances can be computed
ENQUEUED = [(1e-2, 0.0), (1e-2, 0.0), (1e-4, 0.0), (5e-3, 0.3)]
PRUNER = 'type = "median"\nn_startup_trials = 2\nn_warmup_steps = 0'


def build_recorded_study(folder: Path, model: Path, name: str = "rep") -> dict:
    """A small real study of the tiny model, some trials pruned, recorded by an in-process worker.

    Returns what the CLI needs: study file, storage URL and the environment of the subprocesses.
    """
    import os

    from optuna.artifacts import FileSystemArtifactStore

    from service.study import open_study
    from service.worker import Worker
    from studies import load_spec
    from tiny import write_data

    data = write_data(folder / "data", n_dev=N_DEV)
    study_file = write_study(folder, name, model, data, n_trials=len(ENQUEUED), epochs=EPOCHS, pruner=PRUNER)
    spec = load_spec(study_file)
    url = f"sqlite:///{folder / 'study.db'}"
    study = open_study(spec, url, {})
    for lr, dropout in ENQUEUED:
        study.enqueue_trial({"lr": lr, "hidden_dropout_prob": dropout})
    artifacts, checkpoints = folder / "artifacts", folder / "ckpt"
    artifacts.mkdir()
    Worker(study, spec, device="cpu", progress=False, checkpoint_root=checkpoints,
           artifact_store=FileSystemArtifactStore(str(artifacts))).run()
    env = {**os.environ, "MTBERT_STORAGE": url, "MTBERT_ARTIFACT_DIR": str(artifacts),
           "MTBERT_CHECKPOINT_DIR": str(checkpoints), "TOKENIZERS_PARALLELISM": "false"}
    return {"file": study_file, "spec": spec, "url": url, "env": env, "artifacts": artifacts, "name": name}


# ------------------------------------------------------------ a trial handed back (retries)


def interrupt_after_first_epoch(monkeypatch) -> None:
    """The next training run is handed back after its first epoch, as a worker's SIGTERM would."""
    import mtbert.train
    from service.worker import WorkerInterrupted

    real_train = mtbert.train.train

    def interrupted_train(cfg, *args, callback=None, **kwargs):
        def on_epoch(result):
            callback(result)
            if result.epoch == 1:
                raise WorkerInterrupted()
        monkeypatch.setattr(mtbert.train, "train", real_train)
        return real_train(cfg, *args, callback=on_epoch, **kwargs)

    monkeypatch.setattr(mtbert.train, "train", interrupted_train)


def handed_back_after_one_epoch(tmp_path, tiny_model, tiny_data, monkeypatch):
    """A one-trial study whose trial a worker handed back after its first epoch; and how to run a worker on it."""
    from service.study import open_study
    from service.worker import Worker
    from studies import load_spec

    study_file = write_study(tmp_path, "retry", tiny_model, tiny_data, n_trials=1, epochs=2, pruner='type = "none"')
    spec = load_spec(study_file)
    study = open_study(spec, f"sqlite:///{tmp_path / 'r.db'}", {})

    def run_worker() -> None:
        Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()

    interrupt_after_first_epoch(monkeypatch)
    run_worker()
    return study, run_worker


# ------------------------------------------------------------ servers on a local port (dashboard, PostgreSQL, SLURM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once the dashboard `proc` listens on 127.0.0.1:`port`; fail if it exits or does not within `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dashboard exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"dashboard not listening on 127.0.0.1:{port} after {timeout:.0f}s")


def study_id(port: int, name: str) -> int:
    """The dashboard's id of study `name` (its REST API on `port`)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as response:
        studies = json.load(response)["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == name)
