"""`step` is a speed setting everywhere (issue 18): joinable on a study, --step on the CLIs, recorded per
trial; GPU workers share the node's cores; the bench labels a row by the step that ran."""
from __future__ import annotations

import argparse

import optuna
import pytest
import torch

from helpers import write_study
from service.study import open_study
from studies import load_spec
from studies.spec import spec_differences


def test_a_study_with_the_default_step_takes_a_worker_started_with_step_static(tmp_path, tiny_model, tiny_data,
                                                                                 monkeypatch):
    import worker

    study_file = write_study(tmp_path, "speed", tiny_model, tiny_data, n_trials=1, epochs=1)
    url = f"sqlite:///{tmp_path / 's.db'}"
    recorded = open_study(load_spec(study_file), url, {})  # created with the default step (auto)
    # a step in the study file is a speed setting too: not a changed spec
    text = study_file.read_text()
    study_file.write_text(text.replace('device = "cpu"', 'device = "cpu"\nstep = "static"'))
    assert spec_differences(recorded.user_attrs["spec"], load_spec(study_file)) == []
    study_file.write_text(text)
    monkeypatch.setenv("MTBERT_CHECKPOINT_DIR", str(tmp_path / "ck"))
    monkeypatch.setenv("MTBERT_ARTIFACT_DIR", str(tmp_path / "art"))
    code = worker.main(["--study", str(study_file), "--storage", url, "--step", "static", "--no-progress"])
    assert code == 0
    (trial,) = optuna.load_study(study_name="speed", storage=url).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["config"]["step"] == "static" and trial.user_attrs["step"] == "static"


@pytest.mark.slow
def test_workers_get_the_step_and_gpu_workers_a_share_of_the_cores(tmp_path, monkeypatch):
    from service import launch

    launched = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda cmd, **kw: launched.append((cmd, kw["env"])))
    monkeypatch.setattr(launch, "node_cores", lambda: 16, raising=False)  # raising=False: the old code too
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = argparse.Namespace(seed=None, n_trials=None, epochs=None, max_examples=None, model=None, data_dir=None,
                              step="eager")
    launch.start_workers("x", "sqlite:///x.db", [f"cuda:{i % 2}" for i in range(8)], args, tmp_path)
    assert len(launched) == 8
    for cmd, env in launched:
        assert cmd[cmd.index("--step") + 1] == "eager"
        assert env["OMP_NUM_THREADS"] == "2"  # 16 cores / 8 workers, not 16 threads each
    launched.clear()
    launch.start_workers("x", "sqlite:///x.db", ["cpu"], argparse.Namespace(**{**vars(args), "step": None}), tmp_path)
    (cmd, env), = launched
    assert "--step" not in cmd and "OMP_NUM_THREADS" not in env  # one CPU worker may use every core


def test_search_and_worker_take_step_and_slurm_tasks_get_it(tmp_path):
    from search import run
    from service import slurm

    import worker

    for main in (run, worker.main):
        try:
            main(["--help"])
        except SystemExit:
            pass
    args = argparse.Namespace(seed=None, n_trials=None, epochs=None, max_examples=None, model=None, data_dir=None,
                              step="graphs", workers=2, partition=None, time=None, sbatch_arg=[])
    spec = load_spec("lr_dropout")
    cmd = slurm.sbatch_command("lr_dropout", spec, args, tmp_path, None)
    assert cmd[cmd.index("--step") + 1] == "graphs"


def test_the_bench_row_names_the_step_that_ran(tiny_model, tiny_data):
    from mtbert.bench import run_project
    from mtbert.config import TrainConfig
    from mtbert.model import MultitaskBert
    from mtbert.train import prepare

    cfg = TrainConfig(model=str(tiny_model), data_dir=str(tiny_data), batch_size=4, device="cpu")
    prepared = prepare(cfg)
    for variant, ran in (("eager", "eager"), ("static", "static")):
        model = MultitaskBert(prepared.encoder, cfg)
        m = run_project(model, prepared.train, cfg, torch.device("cpu"), 2, 1, variant, check_sync=False)
        assert m.row(None)["ran"] == ran
