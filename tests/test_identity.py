"""Issue 8, points 1, 2 and 7: a study's and a trial's state on disk belongs to them (identity, resume
verification, cleanup), and faults while writing it (a signal, a full disk, a damaged file) lose nothing.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import storage as storage_lib
from helpers import ROOT, handed_back_after_one_epoch, load, start_worker, without_fast_heartbeats, write_study
from mtbert.config import TrainConfig
from mtbert.train import train
from service.study import open_study
from studies import load_spec
from service.worker import Worker


@pytest.fixture
def env(env):
    """conftest's worker environment (private checkpoint and artifact folders, one thread) without its fast
    heartbeats: this file's workers have always run with the default ones, and they keep them so that they run
    as they did."""
    return without_fast_heartbeats(env)


def tiny_cfg(tiny_model: Path, tiny_data: Path, **kw) -> TrainConfig:
    base = dict(model=str(tiny_model), data_dir=str(tiny_data), epochs=2, batch_size=8, device="cpu",
                eval_batch_size=32, lr=1e-3)
    return TrainConfig(**{**base, **kw})


def with_keep_best(study_file: Path, keep_best: int, folder: Path) -> Path:
    """A copy of `study_file` (same name, so the same study name) in `folder`, with another keep_best."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / study_file.name
    copy.write_text(f"keep_best = {keep_best}\n" + study_file.read_text())
    return copy


def tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


# ------------------------------------------------------------------ mtbert: resume verification


@pytest.mark.slow  # a subprocess (search.py, mtbert.train) or real training: ~8-25 s
def test_train_cli_refuses_another_runs_checkpoint_in_one_line(tiny_model, tiny_data, tmp_path):
    """The reported bug: another run's folder returned the old metrics with train_seconds 0."""
    out = tmp_path / "runs" / "x"
    train(tiny_cfg(tiny_model, tiny_data, max_examples=300), out_dir=out, progress=False)  # the other run
    cmd = [sys.executable, "-m", "mtbert.train", "--model", str(tiny_model), "--data-dir", str(tiny_data),
           "--device", "cpu", "--max-examples", "300", "--lr", "1e-5", "--batch-size", "8", "--epochs", "2",
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stdout == "", proc.stdout  # no metrics at all, let alone the old ones
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{out} holds the checkpoint of another run (lr: 0.001 there, 1e-05 here)" in errors[0]
    assert "use a new --out, or --no-resume" in errors[0]

    proc = subprocess.run(cmd + ["--no-resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["train_seconds"] > 0 and final["epoch"] == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["identity"]["settings"]["lr"] == 1e-5


def test_resume_compares_the_settings_that_decide_the_result(tiny_model, tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_model, tiny_data)
    out = tmp_path / "run"
    train(cfg, out_dir=out, callback=lambda r: r.epoch == 1, progress=False, run_id="study-a/trial-0")
    for changed, name in ((cfg.replace(hidden_dropout_prob=0.1), "hidden_dropout_prob"),
                          (cfg.replace(epochs=3), "epochs"), (cfg.replace(seed=1), "seed")):
        with pytest.raises(RuntimeError, match=name) as info:  # mtbert.checkpoint.RunMismatch
            train(changed, out_dir=out, progress=False, run_id="study-a/trial-0")
        assert list(info.value.differences) == [name]
    with pytest.raises(RuntimeError, match="run id: study-a/trial-0 there, study-b/trial-0 here"):
        train(cfg, out_dir=out, progress=False, run_id="study-b/trial-0")
    # the same data at another path is the same run; other data is not
    moved = tmp_path / "moved-data"
    tiny_data.rename(moved)
    replayed = []
    resumed = train(cfg.replace(data_dir=str(moved), eval_batch_size=7), out_dir=out, callback=replayed.append,
                    progress=False, run_id="study-a/trial-0")  # a speed knob and the path may differ
    assert [r.resumed for r in replayed] == [True, False] and len(resumed) == 2
    sts = moved / "sts-train.csv"
    sts.write_text(sts.read_text() + "99\tnewid\tthe dog\tthe cat\t1.0\n")
    with pytest.raises(RuntimeError, match="data: other train/dev files there, these here"):
        train(cfg.replace(data_dir=str(moved)), out_dir=out, progress=False, run_id="study-a/trial-0")


@pytest.mark.slow  # a subprocess (search.py, mtbert.train) or real training: ~8-25 s
def test_a_damaged_checkpoint_is_one_clear_error(tiny_model, tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_model, tiny_data, epochs=1)
    out = tmp_path / "run"
    train(cfg, out_dir=out, progress=False)
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # torn
    with pytest.raises(Exception, match="unreadable checkpoint") as info:
        train(cfg, out_dir=out, progress=False)
    assert type(info.value).__name__ == "CheckpointUnreadable"
    proc = subprocess.run([sys.executable, "-m", "mtbert.train", "--model", str(tiny_model), "--data-dir",
                           str(tiny_data), "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
                           "--eval-batch-size", "32", "--out", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"{ckpt}: unreadable checkpoint" in errors[0] and "--no-resume" in errors[0]
    proc = subprocess.run([sys.executable, "-m", "mtbert.evaluate", "--checkpoint", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "unreadable checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_run(tiny_model, tiny_data, tmp_path):
    import socket

    cfg = tiny_cfg(tiny_model, tiny_data, epochs=1)
    out = tmp_path / "run"
    train(cfg, out_dir=out, progress=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    killed = out / f".checkpoint.pt.{host}.{dead.pid}.tmp"  # a writer SIGKILLed mid-write
    alive = out / f".checkpoint.pt.{host}.{os.getpid()}.tmp"  # a live writer's: not ours to remove
    elsewhere = out / f".checkpoint.pt.other-node.{dead.pid}.tmp"  # another node's process: unknown
    for f in (killed, alive, elsewhere):
        f.write_bytes(b"partial")
    train(cfg, out_dir=out, progress=False)
    assert not killed.exists() and alive.exists() and elsewhere.exists()


# ------------------------------------------------------------------ faults while writing


def test_disk_full_is_one_clear_error_and_leaves_no_temp_file(tiny_model, tiny_data, tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def full_disk_on_second_checkpoint(obj, f, *args, **kwargs):
        name = str(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", ""))
        if "checkpoint.pt" in name:
            saves.append(name)
            if len(saves) == 2:  # epoch 2's write: part of it lands, then the disk is full
                (f.write(b"x" * 1000) if hasattr(f, "write") else Path(name).write_bytes(b"x" * 1000))
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_second_checkpoint)
    out = tmp_path / "run"
    with pytest.raises((RuntimeError, OSError)) as info:
        train(tiny_cfg(tiny_model, tiny_data), out_dir=out, progress=False)
    assert type(info.value).__name__ == "CheckpointWriteError", info.value
    assert str(info.value) == f"no space left on device at {out} (writing checkpoint.pt)"
    assert tmp_files(tmp_path) == []
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the last good one is intact

    # in the search: that trial fails with the reason, and its temp file is gone with it
    saves.clear()
    study_file = write_study(tmp_path, "full", tiny_model, tiny_data, n_trials=1, epochs=2, pruner='type = "none"')
    spec = load_spec(study_file)
    study = open_study(spec, f"sqlite:///{tmp_path / 'f.db'}", {})
    Worker(study, spec, device="cpu", progress=False, max_failures=1, checkpoint_root=tmp_path / "ck").run()
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL
    assert f"no space left on device at {trial.user_attrs['checkpoint']}" in trial.user_attrs["fail_reason"]
    assert tmp_files(tmp_path / "ck") == []


SLOW_CHECKPOINT_WRITE = """
import os, runpy, sys, time
sys.path.insert(0, sys.argv[1])
import torch
real_save, marker = torch.save, os.environ["MARKER"]

def slow_save(obj, f, *args, **kwargs):  # the first checkpoint write takes 6 s after writing its bytes
    real_save(obj, f, *args, **kwargs)
    name = str(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", ""))
    if "checkpoint.pt" in name and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(6)

torch.save = slow_save
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigterm_during_a_checkpoint_write_keeps_the_epoch_and_no_temp_file(tmp_path, tiny_model, tiny_data, env):
    study_file = write_study(tmp_path, "sig", tiny_model, tiny_data, n_trials=1, epochs=3, pruner='type = "none"')
    url = f"sqlite:///{tmp_path / 'study.db'}"
    script = tmp_path / "slow_write.py"
    script.write_text(SLOW_CHECKPOINT_WRITE)
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT), str(ROOT / "worker.py"), "--study",
                             str(study_file), "--no-progress"], cwd=ROOT,
                            env={**env, "MTBERT_STORAGE": url, "MARKER": str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)  # while epoch 1's checkpoint is being written
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out
    study = load(url, "sig")
    first = study.trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"].startswith("stopped by a signal; will ")
    assert [t.state for t in study.trials[1:]] == [TrialState.WAITING]  # queued for retry
    folder = Path(first.user_attrs["checkpoint"])
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the epoch was not lost
    assert json.loads((folder / "metrics.json").read_text())[-1]["epoch"] == 1
    assert tmp_files(tmp_path) == []


# ------------------------------------------------------------------ the search: identity on disk


@pytest.mark.slow
def test_workers_opening_a_new_study_at_once_agree_on_its_uuid(tmp_path, tiny_model, tiny_data, storage_url):
    study_file = write_study(tmp_path, "race", tiny_model, tiny_data)
    code = ("import sys; from studies import load_spec; from service.study import open_study, study_uuid; "
            "print(study_uuid(open_study(load_spec(sys.argv[1]), sys.argv[2], {})))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(study_file), storage_url], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, results
    uuids = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(uuids) == 1
    assert load(storage_url, "race").user_attrs["study_uuid"] == uuids.pop()


def test_an_edited_study_uuid_is_refused_in_one_line(tmp_path, tiny_model, tiny_data, env):
    study_file = write_study(tmp_path, "edited", tiny_model, tiny_data, n_trials=1, epochs=1)
    url = f"sqlite:///{tmp_path / 'e.db'}"
    open_study(load_spec(study_file), url, {}).set_user_attr("study_uuid", "../../home")
    for cmd in (["worker.py"], ["search.py"]):
        proc = subprocess.run([sys.executable, *cmd, "--study", str(study_file)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**env, "MTBERT_STORAGE": url})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "user attribute study_uuid is '../../home', not a UUID" in proc.stderr


@pytest.mark.slow  # a subprocess (search.py, mtbert.train) or real training: ~8-25 s
def test_the_same_study_in_another_storage_trains_from_scratch_and_deletes_nothing_of_the_first(
        tmp_path, tiny_model, tiny_data, env, monkeypatch):
    """The issue's scenario: study A completes; the same study file in storage B (keep_best = 0)."""
    first = write_study(tmp_path, "twin", tiny_model, tiny_data, n_trials=1, epochs=2, pruner='type = "none"')
    second = with_keep_best(first, 0, tmp_path / "copy")
    url_a, url_b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    for study_file, url in ((first, url_a), (second, url_b)):
        proc = start_worker(study_file, url, env, "--seed", "0" if url == url_a else "1")
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out
    a, b = load(url_a, "twin").trials[0], load(url_b, "twin").trials[0]
    assert a.state == b.state == TrialState.COMPLETE
    assert "resumed_from_epoch" not in b.user_attrs and len(b.user_attrs["epoch_seconds"]) == 2  # trained both
    assert b.value == b.user_attrs["history"][-1]["overall"]  # its own score
    assert a.user_attrs["checkpoint"] != b.user_attrs["checkpoint"]
    assert (Path(a.user_attrs["checkpoint"]) / "checkpoint.pt").is_file()  # B's keep_best = 0 left A's alone
    assert not Path(b.user_attrs["checkpoint"]).exists()  # and did delete B's own

    from reports.export_best import export_best

    monkeypatch.setenv("MTBERT_CHECKPOINT_DIR", env["MTBERT_CHECKPOINT_DIR"])
    study_a = load(url_a, "twin")
    export_best(study_a, load_spec(first), tmp_path / "best")
    assert json.loads((tmp_path / "best" / "best_trial.json").read_text())["overall"] == a.value


def test_a_deleted_and_recreated_study_gets_a_new_identity_and_trains_from_scratch(tmp_path, tiny_model, tiny_data):
    study_file = write_study(tmp_path, "again", tiny_model, tiny_data, n_trials=1, epochs=2, pruner='type = "none"')
    spec = load_spec(study_file)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    study = open_study(spec, url, {})
    Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    old, old_attrs = study.trials[0], study.user_attrs
    optuna.delete_study(study_name="again", storage=storage_lib.open_storage(url))
    study = open_study(spec, url, {})
    Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    new = study.trials[0]
    assert new.state == TrialState.COMPLETE and "resumed_from_epoch" not in new.user_attrs
    assert len(new.user_attrs["epoch_seconds"]) == 2
    assert new.user_attrs["checkpoint"] != old.user_attrs["checkpoint"]
    assert (Path(old.user_attrs["checkpoint"]) / "checkpoint.pt").is_file()
    from service.study import study_key, study_uuid

    assert study_uuid(study) != old_attrs["study_uuid"] and study_key(study) == f"again-{study_uuid(study)[:8]}"


def test_cleanup_never_deletes_a_folder_named_by_a_trial_attribute(tmp_path, tiny_model, tiny_data, monkeypatch,
                                                                    caplog):
    """The reported attack: the dashboard's API writes user attrs without auth; cleanup deleted what they named."""
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import mtbert.train
    from optuna_dashboard import wsgi

    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    study_file = with_keep_best(write_study(tmp_path, "attack", tiny_model, tiny_data, n_trials=1, epochs=2,
                                            pruner='type = "none"'), 0, tmp_path / "keep0")
    spec = load_spec(study_file)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    study = open_study(spec, url, {})

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, wsgi(storage_lib.open_storage(url, heartbeat=False)), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real_train = mtbert.train.train

    def attacked_train(cfg, *args, callback=None, **kwargs):
        def on_epoch(result):
            running = study.get_trials(states=(TrialState.RUNNING,))[0]
            request = urllib.request.Request(
                f"http://127.0.0.1:{server.server_port}/api/trials/{running._trial_id}/user-attrs",
                data=json.dumps({"user_attrs": {"checkpoint": str(victim)}}).encode(),
                headers={"Content-Type": "application/json"}, method="POST")
            urllib.request.urlopen(request).close()  # no credentials needed
            return callback(result)
        return real_train(cfg, *args, callback=on_epoch, **kwargs)

    monkeypatch.setattr(mtbert.train, "train", attacked_train)
    try:
        Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    finally:
        server.shutdown()
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["checkpoint"] == str(victim)  # the attack landed
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert list((tmp_path / "ck").rglob("checkpoint.pt")) == []  # keep_best = 0: its own folder was deleted

    # and nothing outside the study's own checkpoint folder is ever deleted, whatever path reaches the cleanup
    from service.study import study_uuid

    worker = Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck")
    own = tmp_path / "ck" / study_uuid(study)
    link = own / "trial-7"
    link.symlink_to(victim)
    other_study = tmp_path / "ck" / "another-study-uuid" / "trial-0"
    other_study.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="worker"):
        for folder in (victim, link, own / ".." / ".." / "precious", tmp_path / "ck", own, other_study):
            worker.remove(folder)
    assert (victim / "thesis.tex").is_file() and other_study.is_dir() and own.is_dir()
    assert sum("not inside this study's checkpoint folder" in r.getMessage() for r in caplog.records) == 6


def test_export_uses_the_identity_not_the_checkpoint_attribute(tmp_path, tiny_model, tiny_data, monkeypatch):
    import mtbert.train
    from reports.export_best import export_best
    from storage import optuna_compat

    other = tmp_path / "other-run"  # a valid checkpoint of another run, named by the (writable) attribute
    train(tiny_cfg(tiny_model, tiny_data, epochs=1), out_dir=other, progress=False)
    study_file = write_study(tmp_path, "exp", tiny_model, tiny_data, n_trials=1, epochs=1, pruner='type = "none"')
    spec = load_spec(study_file)
    study = open_study(spec, f"sqlite:///{tmp_path / 'e.db'}", {})
    real_train = mtbert.train.train

    def attacked_train(cfg, *args, callback=None, **kwargs):
        def on_epoch(result):
            running = study.get_trials(states=(TrialState.RUNNING,))[0]
            optuna_compat.study_storage(study).set_trial_user_attr(running._trial_id, "checkpoint", str(other))
            return callback(result)
        return real_train(cfg, *args, callback=on_epoch, **kwargs)

    monkeypatch.setattr(mtbert.train, "train", attacked_train)
    monkeypatch.setenv("MTBERT_CHECKPOINT_DIR", str(tmp_path / "ck"))
    Worker(study, spec, device="cpu", progress=False).run()
    assert study.trials[0].user_attrs["checkpoint"] == str(other)
    export_best(study, spec, tmp_path / "best")
    exported = torch.load(tmp_path / "best" / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert exported.get("identity") is not None, "exported the checkpoint the attribute named"
    from reports.export_best import ExportError
    from service.study import run_id, trial_dir

    assert exported["identity"]["run_id"] == run_id(study, 0)  # the trial's own, found by identity
    # another run's checkpoint placed at the derived path is refused, not exported
    own = trial_dir(study, 0)
    for name in ("checkpoint.pt", "config.json"):
        (own / name).write_bytes((other / name).read_bytes())
    with pytest.raises(ExportError, match="holds the checkpoint of another run"):
        export_best(study, spec, tmp_path / "best2")


# ------------------------------------------------------------------ retries


def test_a_completed_retry_does_not_show_the_old_fail_reason(tmp_path, tiny_model, tiny_data, monkeypatch):
    study, run_worker = handed_back_after_one_epoch(tmp_path, tiny_model, tiny_data, monkeypatch)
    run_worker()
    first, retry = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "stopped by a signal; will resume from epoch 1"
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] == 1
    assert retry.user_attrs.get("fail_reason") is None
    assert retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["previous_fail_reasons"] == [{"trial": 0, "reason": "stopped by a signal; will resume from epoch 1"}]


def test_a_retry_whose_checkpoint_is_damaged_restarts_from_scratch(tmp_path, tiny_model, tiny_data, monkeypatch):
    from service.study import trial_dir

    study, run_worker = handed_back_after_one_epoch(tmp_path, tiny_model, tiny_data, monkeypatch)
    (trial_dir(study, 0, tmp_path / "ck") / "checkpoint.pt").write_bytes(b"not a checkpoint")
    run_worker()
    retry = study.trials[1]
    assert retry.state == TrialState.COMPLETE  # the configuration is not abandoned
    assert "unreadable checkpoint" in retry.user_attrs["restarted_from_scratch"]
    assert retry.user_attrs.get("resumed_from_epoch") is None and len(retry.user_attrs["epoch_seconds"]) == 2


def test_a_study_checks_its_data_by_content_not_by_path(tmp_path, tiny_model):
    """Nodes may mount the data at different paths (the same files join the study); other data is refused."""
    from service.study import StudyMismatch
    from tiny import write_data

    url = f"sqlite:///{tmp_path / 'data.db'}"
    first = write_data(tmp_path / "here" / "data")
    spec = load_spec(write_study(tmp_path, "moved", tiny_model, first, n_trials=2, epochs=1))
    open_study(spec, url, {})
    copy = write_data(tmp_path / "there" / "data")  # the same files at another path: same fingerprint
    moved, _ = spec.with_overrides(data_dir=str(copy))
    open_study(moved, url, {"data_dir": str(copy)})
    other = write_data(tmp_path / "other" / "data", seed=1)  # other sentences
    changed, _ = spec.with_overrides(data_dir=str(other))
    with pytest.raises(StudyMismatch, match="differs from the data study 'moved' was created with"):
        open_study(changed, url, {"data_dir": str(other)})


def test_the_data_fingerprint_changes_with_the_content_of_any_file(tmp_path):
    """A file edited in place (same size, mtime put back), replaced, or removed gives another fingerprint;
    the original content gives the original one again (content, not file times, is what counts)."""
    from mtbert import tasks
    from tiny import write_data

    data = write_data(tmp_path / "data")
    first = tasks.data_fingerprint(data)
    assert tasks.data_fingerprint(str(data)) == first
    sst = data / tasks.TASK_TABLE["sst"].file_name("train")
    before, st = sst.read_bytes(), sst.stat()
    sst.write_bytes(before.replace(b"awful", b"AWFUL"))  # same size
    os.utime(sst, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as before
    assert sst.stat().st_size == st.st_size and sst.stat().st_mtime_ns == st.st_mtime_ns
    edited = tasks.data_fingerprint(data)
    assert edited != first

    replacement = tmp_path / "replacement.csv"
    replacement.write_bytes(before)
    os.replace(replacement, sst)  # the original content, by rename
    assert tasks.data_fingerprint(data) == first

    sst.unlink()
    assert tasks.data_fingerprint(data) not in (first, edited)
