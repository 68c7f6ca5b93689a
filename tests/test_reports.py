"""Per-trial notes and artifacts, the study report and the best-model export, on a small real study."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from optuna.trial import TrialState

from helpers import EPOCHS, N_DEV, ROOT, build_recorded_study, load, made_trial, write_study
from studies import load_spec
from service.study import open_study
from service.worker import Worker


def cli(study: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "search.py", "--study", str(study["file"]), *args], cwd=ROOT,
                          env=study["env"], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_model) -> dict:
    return build_recorded_study(tmp_path_factory.mktemp("reports"), tiny_model)


def note_of(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    from optuna_dashboard import get_note

    return get_note(optuna.Trial(study, trial._trial_id))


# ------------------------------------------------------------ what the worker records


def test_every_trial_records_where_each_epochs_time_went(recorded):
    # reports.costs splits a study's time into training, dev evaluation and checkpoint writes from these
    study = load(recorded["url"], recorded["name"])
    for t in study.trials:
        seconds, evals, saves = (t.user_attrs[k] for k in ("epoch_seconds", "eval_seconds", "checkpoint_seconds"))
        assert len(seconds) == len(evals) == len(saves) == len(t.intermediate_values) > 0
        assert all(0 < e < s for e, s in zip(evals, seconds)) and all(c > 0 for c in saves)
    text = cli(recorded, "--report", "--out", str(recorded["artifacts"].parent / "costs")).stdout
    report = (recorded["artifacts"].parent / "costs" / "report.md").read_text()
    assert "## Epochs by rung" in report and "| of which evaluation |" in report and "| checkpoints |" in report, text


def test_every_finished_trial_has_a_note_and_artifacts(recorded):
    study = load(recorded["url"], recorded["name"])
    states = [t.state for t in study.trials]
    assert TrialState.PRUNED in states and states.count(TrialState.COMPLETE) >= 2, states
    store = FileSystemArtifactStore(str(recorded["artifacts"]))
    for t in study.trials:
        history = t.user_attrs["history"]
        assert [h["epoch"] for h in history] == sorted(t.intermediate_values)
        assert history[-1]["overall"] == pytest.approx(t.intermediate_values[len(history)])
        note = note_of(study, t)
        rows = [line for line in note.splitlines() if re.match(r"\| \d+ \|", line)]
        assert len(rows) == len(history), note
        assert rows[-1].startswith(f"| {len(history)} | {history[-1]['sst_acc']:.4f} | {history[-1]['quora_acc']:.4f} "
                                   f"| {history[-1]['sts_corr']:.4f} | {history[-1]['overall']:.4f} |")
        assert "| epoch | SST acc | Quora acc | STS r | overall | seconds |" in note
        assert f"Dev scores on the full dev sets (SST {N_DEV}, Quora {N_DEV}, STS {N_DEV} examples)." in note
        assert ("pruned after epoch" in note) == (t.state == TrialState.PRUNED)

        metas = {m.filename: m for m in get_all_artifact_meta(t, storage=study._storage)}
        assert set(metas) == {"metrics.json", "sst-dev-output.csv", "para-dev-output.csv", "sts-dev-output.csv"}
        local = recorded["artifacts"].parent / f"download-{t.number}"
        local.mkdir()
        download_artifact(artifact_store=store, artifact_id=metas["metrics.json"].artifact_id,
                          file_path=str(local / "metrics.json"))
        metrics = json.loads((local / "metrics.json").read_text())
        assert metrics["history"] == history and metrics["params"] == t.params
        assert metrics["state"] == t.state.name and metrics["dev_examples"] == {"sst": N_DEV, "quora": N_DEV,
                                                                                "sts": N_DEV}
        download_artifact(artifact_store=store, artifact_id=metas["sst-dev-output.csv"].artifact_id,
                          file_path=str(local / "sst.csv"))
        lines = (local / "sst.csv").read_text().splitlines()
        assert lines[0].split() == ["id", "Predicted_Sentiment"] and len(lines) == 1 + N_DEV
        # the CSV holds the predictions of the last epoch's model: its accuracy is the recorded SST score
        rows = [line.split(",") for line in lines[1:]]  # "sst00007x , 3 ": tiny.write_data's label is 7 % 5
        correct = sum(int(pred) == int(uid.strip()[3:-1]) % 5 for uid, pred in rows)
        assert correct / N_DEV == pytest.approx(history[-1]["sst_acc"])


def test_the_note_says_when_dev_scores_are_capped(tmp_path):
    from service.trial_records import trial_note

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'c.db'}")
    trial = study.ask()
    trial.set_user_attr("config", {"max_examples": 300, "epochs": 5})
    trial.set_user_attr("history", [{"epoch": e, "sst_acc": 0.25, "quora_acc": 0.625, "sts_corr": -0.0312,
                                     "overall": 0.2813, "seconds": 61.3} for e in (1, 2)])
    note = trial_note(trial, TrialState.PRUNED, None, {"sst": [0] * 300, "quora": [0] * 300, "sts": [0] * 300})
    assert note.startswith("**Trial 0: pruned after epoch 2 of 5**\n")
    assert "| 2 | 0.2500 | 0.6250 | -0.0312 | 0.2813 | 61.3 |" in note
    assert ("Dev scores on a fixed subset of at most 300 dev examples per task (max_examples = 300) "
            "(SST 300, Quora 300, STS 300 examples), not the full dev sets.") in note


def test_a_recording_failure_never_fails_the_trial_or_the_worker(tmp_path, monkeypatch, caplog):
    import service.trial_records

    def broken(*args, **kwargs):
        raise OSError("artifact folder is read-only")

    monkeypatch.setattr(service.trial_records, "record_trial", broken)
    spec = load_spec(write_study(tmp_path, "rec", Path("unused"), Path("unused")))
    study = open_study(spec, f"sqlite:///{tmp_path / 'r.db'}", {})
    worker = Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck",
                    artifact_store=FileSystemArtifactStore(str(tmp_path)))
    trial = study.ask()
    with caplog.at_level(logging.WARNING, logger="worker"):
        worker.record(trial, TrialState.COMPLETE, 0.5)
    assert "note and artifacts not recorded: OSError: artifact folder is read-only" in caplog.text
    study.tell(trial, 0.5)
    assert study.trials[0].state == TrialState.COMPLETE


def test_without_optuna_dashboard_the_note_is_skipped_with_one_warning(tmp_path, monkeypatch, caplog):
    import service.trial_records as records

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails like a missing package
    monkeypatch.setattr(records, "_warned_no_dashboard", False)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'n.db'}")
    (tmp_path / "a").mkdir()
    store = FileSystemArtifactStore(str(tmp_path / "a"))
    with caplog.at_level(logging.WARNING, logger="service.trial_records"):
        for _ in range(2):
            trial = study.ask()
            trial.set_user_attr("history", [{"epoch": 1, "sst_acc": 0.5, "quora_acc": 0.5, "sts_corr": 0.1,
                                             "overall": 0.37, "seconds": 1.0}])
            records.record_trial(study, trial, None, store, TrialState.COMPLETE, 0.37)
            study.tell(trial, 0.37)
    assert caplog.text.count("optuna_dashboard is not installed") == 1
    assert [m.filename for m in get_all_artifact_meta(study.trials[1], storage=study._storage)] == ["metrics.json"]


# ------------------------------------------------------------ --report


def report_numbers_match_storage(text: str, study: optuna.Study, spec) -> None:
    trials = study.trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    best = max(complete, key=lambda t: t.value)
    assert f"Trial **#{best.number}**: overall **{best.value:.4f}** after {EPOCHS} epoch(s)" in text
    for key, name in (("sst_acc", "SST acc"), ("quora_acc", "Quora acc"), ("sts_corr", "STS r"),
                      ("overall", "overall")):
        assert f"| {name} | {best.user_attrs[key]:.4f} |" in text
    for name, value in best.params.items():
        assert f"| {name} | {value!r} |" in text
    assert (f"- trials: {len(complete) + len(pruned)} finished of a budget of {spec.n_trials}: {len(complete)} "
            f"complete, {len(pruned)} pruned, 0 failed, 0 running") in text
    saved = sum(EPOCHS - len(t.intermediate_values) for t in pruned)
    total = EPOCHS * (len(complete) + len(pruned))
    assert (f"Pruned trials: **{len(pruned)}** of {len(complete) + len(pruned)} finished. Compute saved: "
            f"**{saved} epoch(s)**, {100 * saved / total:.1f}% of the {total} epochs") in text
    for t in pruned:
        assert f"| #{t.number} | {len(t.intermediate_values)} of {EPOCHS} |" in text
    for t in complete:  # the top-trials table has every complete trial here (fewer than 10)
        assert re.search(rf"^\| {t.number} \| {t.value:.4f} \| {t.user_attrs['sst_acc']:.4f} \| "
                         rf"{t.user_attrs['quora_acc']:.4f} \| {t.user_attrs['sts_corr']:.4f} \|", text, re.M)


def test_report_numbers_come_from_the_storage_and_the_plots_are_real_images(recorded, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    proc = cli(recorded, "--report", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"report written to {out / 'report.md'}" in proc.stdout
    text = (out / "report.md").read_text()
    study = load(recorded["url"], recorded["name"])
    report_numbers_match_storage(text, study, recorded["spec"])

    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    importances = len(complete) >= 2 and len({repr(t.params) for t in complete}) > 1
    assert set(images) == {"history.png", "learning_curves.png", "task_curves.png", "params.png", "cost.png",
                           *(["importances.png"] if importances else [])}, text
    assert importances or "Skipped: parameter importances need" in text
    for name in images:
        path = out / name
        assert path.stat().st_size > 5_000, name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200, (name, image.size)


def test_the_reproduce_command_is_the_best_trial_s_exact_config(recorded, tmp_path):
    from mtbert.config import TrainConfig, add_config_arguments

    out = tmp_path / "report"
    assert cli(recorded, "--report", "--out", str(out)).returncode == 0
    text = (out / "report.md").read_text()
    command = re.search(r"^python -m mtbert\.train (.*)$", text, re.M).group(1).split()
    study = load(recorded["url"], recorded["name"])
    best = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    parser = argparse.ArgumentParser()  # what mtbert.train parses: every TrainConfig flag plus --out
    add_config_arguments(parser)
    parser.add_argument("--out")
    args = vars(parser.parse_args(command))
    assert args.pop("out") == f"runs/{recorded['name']}-trial{best.number}"
    recorded_config = {**best.user_attrs["config"], "device": TrainConfig().device}  # any device reproduces it
    assert TrainConfig(**args).to_dict() == recorded_config


def test_the_reproduce_command_ignores_a_tampered_config_attr(recorded, tmp_path):
    """The `config` user attr is writable from a dashboard: the command a user copies is rebuilt from the
    recorded spec and the trial's params, so an injected model path never reaches it (issue 17, finding 8)."""
    import sqlite3

    db = Path(recorded["url"].removeprefix("sqlite:///"))
    copy = tmp_path / db.name
    with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
        source.backup(target)  # the WAL's pages too
    url = f"sqlite:///{copy}"
    study = load(url, recorded["name"])
    best = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    tampered = {**best.user_attrs["config"], "model": "/home/attacker/evil-model"}
    import json

    with sqlite3.connect(copy) as db_:  # as a dashboard's POST /api/trials/N/user-attrs would
        db_.execute("UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = 'config'",
                    (json.dumps(tampered), best._trial_id))
    assert load(url, recorded["name"]).get_trials()[best.number].user_attrs["config"]["model"].endswith("evil-model")
    out = tmp_path / "report"
    proc = cli({**recorded, "env": {**recorded["env"], "MTBERT_STORAGE": url}}, "--report", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert "evil-model" not in text
    assert re.search(r"^python -m mtbert\.train .*--model ", text, re.M)  # the study's own model


def synthetic_study(folder: Path, trials: list[optuna.trial.FrozenTrial]) -> dict:
    """A study of hand-made trials (no training): for the report's and the export's edge cases."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = load_spec(write_study(folder, "edge", Path("unused"), Path("unused"), n_trials=3))
    url = f"sqlite:///{folder / 'edge.db'}"
    study = open_study(spec, url, {})
    for t in trials:
        study.add_trial(t)
    env = {**os.environ, "MTBERT_STORAGE": url, "MTBERT_ARTIFACT_DIR": str(folder / "a")}
    return {"file": folder / "edge.toml", "env": env}


def test_report_skips_importances_with_a_reason_when_there_are_too_few_trials(tmp_path):
    study = synthetic_study(tmp_path, [made_trial(TrialState.COMPLETE, 0.4, 3),
                                       made_trial(TrialState.PRUNED, None, 1)])
    proc = cli(study, "--report", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Skipped: parameter importances need at least 2 complete trials, the study has 1." in text
    assert "Compute saved: **2 epoch(s)**, 33.3% of the 6 epochs" in text
    assert "![Learning curves](learning_curves.png)" in text


# ------------------------------------------------------------ --export-best


@pytest.mark.slow  # a subprocess (search.py, mtbert.train) or real training: ~8-25 s
def test_export_best_copies_the_checkpoint_and_writes_cs224n_predictions(recorded, tmp_path):
    from mtbert.checkpoint import load_model

    out = tmp_path / "best"
    proc = cli(recorded, "--export-best", str(out))
    assert proc.returncode == 0, proc.stderr
    study = load(recorded["url"], recorded["name"])
    best = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    summary = json.loads((out / "best_trial.json").read_text())
    assert summary["trial"] == best.number and summary["overall"] == best.value
    model, _, cfg = load_model(out / "checkpoint")
    # the checkpoint records the precision the run resolved "auto" to (bf16 or off); the rest is the trial's config
    assert cfg.amp in ("bf16", "off") and best.user_attrs["config"]["amp"] == "auto"
    assert {**cfg.to_dict(), "amp": "auto"} == best.user_attrs["config"]
    expected = {"sst-dev-output.csv": "Predicted_Sentiment", "para-dev-output.csv": "Predicted_Is_Paraphrase",
                "sts-dev-output.csv": "Predicted_Similiarity", "sst-test-output.csv": "Predicted_Sentiment",
                "sts-test-output.csv": "Predicted_Similiarity"}  # tiny data has no Quora test file, like CS224N's
    assert {p.name for p in (out / "predictions").iterdir()} == set(expected)
    for name, header in expected.items():
        lines = (out / "predictions" / name).read_text().splitlines()
        assert lines[0].split() == ["id", header] and len(lines) == 1 + N_DEV  # full files, not the capped dev
        assert re.fullmatch(r"\w+ , [\d.]+ ", lines[1]), lines[1]


@pytest.mark.slow  # a subprocess (search.py, mtbert.train) or real training: ~8-25 s
def test_export_best_fails_clearly_without_a_complete_trial_or_its_checkpoint(tmp_path):
    none = synthetic_study(tmp_path / "none", [made_trial(TrialState.PRUNED, None, 1)])
    proc = cli(none, "--export-best", str(tmp_path / "out"))
    assert proc.returncode == 2 and "study edge has no complete trial to export" in proc.stderr
    gone = synthetic_study(tmp_path / "gone", [made_trial(TrialState.COMPLETE, 0.4, 3,
                                                          checkpoint=str(tmp_path / "deleted"))])
    proc = cli(gone, "--export-best", str(tmp_path / "out"))
    assert proc.returncode == 2
    # looked for where the study's identity says, not where the trial's (writable) attribute points
    assert re.search(r"the checkpoint of the best trial #0 is not at \S+/[0-9a-f-]{36}/trial-0 ", proc.stderr)
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
