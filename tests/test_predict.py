"""Predictions for any CS224N-format file: `mtbert.evaluate --predict` and `search.py --export-best`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from optuna.trial import TrialState

from mtbert.config import TrainConfig
from mtbert.evaluate import main as evaluate_main
from mtbert.evaluate import output_name
from mtbert.tasks import task_of_file
from mtbert.train import train
from tiny import write_data

HEADERS = {"sst": "Predicted_Sentiment", "quora": "Predicted_Is_Paraphrase", "sts": "Predicted_Similiarity"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model) -> dict:
    """A trained tiny run folder and its data folder, with a holdout/ folder of unlabelled files."""
    folder = tmp_path_factory.mktemp("predict")
    data = write_data(folder / "data", n_dev=24)
    cfg = TrainConfig(model=str(tiny_model), data_dir=str(data), epochs=1, batch_size=8, device="cpu",
                      eval_batch_size=32, lr=1e-3)
    train(cfg, out_dir=folder / "run", progress=False)
    holdout = data / "holdout"
    holdout.mkdir()
    # the holdout files are the dev files without labels, plus malformed rows: predictions must equal dev's
    for task, dev_name, name in (("sst", "ids-sst-dev.csv", "ids-sst-holdout-student.csv"),
                                 ("quora", "quora-dev.csv", "quora-holdout-student.csv"),
                                 ("sts", "sts-dev.csv", "sts-holdout-student.csv")):
        lines = [line.rsplit("\t", 1)[0] for line in (data / dev_name).read_text().splitlines()]
        n_sentences = lines[0].count("\t") - 1
        bad = ["900\t\t" + "\t".join(["a b"] * n_sentences),  # no id
               "901\tbad2\t" + "\t".join(["a b"] * n_sentences) + "\textra",  # one field too many
               "902\tempty1" + "\t" * n_sentences]  # empty sentence(s): kept, so that the id has a prediction
        (holdout / name).write_text("\n".join(lines[:5] + bad + lines[5:]) + "\n")
    return {"run": folder / "run", "data": data, "holdout": holdout}


def rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_output_names_follow_the_course_and_generalise():
    assert output_name("sst", "ids-sst-holdout-student.csv") == "sst-holdout-output.csv"
    assert output_name("quora", "quora-holdout-student.csv") == "para-holdout-output.csv"
    assert output_name("sts", "sts-holdout-student.csv") == "sts-holdout-output.csv"
    assert output_name("sst", "ids-sst-test-student.csv") == "sst-test-output.csv"  # the old rule's names
    assert output_name("quora", "quora-dev.csv") == "para-dev-output.csv"
    assert output_name("sts", "my-pairs.csv") == "sts-my-pairs-output.csv"
    assert task_of_file("anything.csv", ["", "id", "sentence"]) == "sst"
    assert task_of_file("para-2025.csv", ["", "id", "sentence1", "sentence2"]) == "quora"
    with pytest.raises(ValueError, match="columns fit quora and sts: put one of 'para', 'quora', 'sts'"):
        task_of_file("pairs.csv", ["", "id", "sentence1", "sentence2"])
    with pytest.raises(ValueError, match="name says sts but its columns fit sst"):
        task_of_file("sts-x.csv", ["", "id", "sentence"])


def test_predict_writes_the_course_format_for_every_file(run, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    # the dev predictions of the same checkpoint, for comparison
    evaluate_main(["--checkpoint", str(run["run"]), "--data-dir", str(run["data"]), "--out", str(tmp_path / "dev")])
    capsys.readouterr()
    files = sorted(str(p) for p in run["holdout"].iterdir())
    with caplog.at_level(logging.WARNING, logger="mtbert.data"):
        evaluate_main(["--checkpoint", str(run["run"]), "--predict", *files, "--out", str(out)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {Path(v["output"]).name for v in result.values()} == {
        "sst-holdout-output.csv", "para-holdout-output.csv", "sts-holdout-output.csv"}
    assert all(v["rows"] == 25 and v["skipped"] == 2 for v in result.values())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipped 2 malformed" in m and "their ids get no prediction" in m for m in messages) == 3
    assert sum("1 row(s) with an empty sentence" in m for m in messages) == 3  # one warning per file
    for task, stem in (("sst", "sst"), ("quora", "para"), ("sts", "sts")):
        lines = rows(out / f"{stem}-holdout-output.csv")
        assert lines[0] == f"id \t {HEADERS[task]} "
        assert len(lines) == 26 and all(" , " in line and line.endswith(" ") for line in lines[1:])
        assert not any(line.startswith("bad") for line in lines)
        assert sum(line.startswith("empty1 , ") for line in lines) == 1  # an empty sentence still gets its id
        kept = [line for line in lines if not line.startswith("empty1 ")]
        assert kept == rows(tmp_path / "dev" / f"{stem}-dev-output.csv")  # same ids, order and values as dev


def test_a_file_that_fits_no_task_is_one_clear_error_and_nothing_is_written(run, tmp_path, caplog):
    weird = tmp_path / "notes.csv"
    weird.write_text("\tid\ttext\n0\ta\thello there\n")
    out = tmp_path / "out"
    good = run["holdout"] / "ids-sst-holdout-student.csv"
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", str(run["run"]), "--predict", str(good), str(weird), "--out", str(out)])
    assert exit_info.value.code == 1
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert f"{weird}: its columns (id, text) match no task" in message
    assert not out.exists()  # every file is checked before any is written
    ambiguous = tmp_path / "pairs.csv"
    ambiguous.write_text("\tid\tsentence1\tsentence2\n0\ta\tx y\ty z\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(run["run"]), "--predict", str(ambiguous), "--out", str(out)])
    assert "put one of 'para', 'quora', 'sts' in the file name" in caplog.text


def trained_trial(study, run, tiny_model, value: float, lr: float = 1e-3) -> None:
    """A complete trial of `study` with its own checkpoint, where the worker writes it (keyed by the
    study's identity)."""
    from service.study import run_id, trial_dir
    from helpers import made_trial

    study.add_trial(made_trial(TrialState.COMPLETE, value, 1))
    number = len(study.trials) - 1
    cfg = TrainConfig(model=str(tiny_model), data_dir=str(run["data"]), epochs=1, batch_size=8, device="cpu",
                      eval_batch_size=32, lr=lr)
    train(cfg, out_dir=trial_dir(study, number), run_id=run_id(study, number), progress=False)


def export_study(tmp_path, run, name: str):
    from service.study import open_study
    from studies import load_spec
    from helpers import write_study

    spec = load_spec(write_study(tmp_path, name, Path("unused"), run["data"], n_trials=3))
    return open_study(spec, f"sqlite:///{tmp_path / (name + '.db')}", {}), spec


def test_export_best_predicts_the_holdout_folder(run, tmp_path, tiny_model, monkeypatch):
    from reports.export_best import ExportError, export_best

    monkeypatch.setenv("MTBERT_CHECKPOINT_DIR", str(tmp_path / "ck"))
    study, spec = export_study(tmp_path, run, "edge")
    trained_trial(study, run, tiny_model, 0.4)
    out = export_best(study, spec, tmp_path / "best", run["data"])
    names = {p.name for p in (out / "predictions").iterdir()}
    assert {"sst-holdout-output.csv", "para-holdout-output.csv", "sts-holdout-output.csv"} <= names
    assert {"sst-dev-output.csv", "sts-test-output.csv"} <= names
    summary = json.loads((out / "best_trial.json").read_text())
    assert sorted(summary["predicted"].values()) == ["para-holdout-output.csv", "sst-holdout-output.csv",
                                                     "sts-holdout-output.csv"]
    # an explicit list instead of the folder; a bad file is the export's one clear error
    out2 = export_best(study, spec, tmp_path / "best2", run["data"], [run["holdout"] / "sts-holdout-student.csv"])
    assert not (out2 / "predictions" / "sst-holdout-output.csv").exists()
    assert (out2 / "predictions" / "sts-holdout-output.csv").is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("\tid\ttext\n0\ta\thello\n")
    with pytest.raises(ExportError, match="match no task"):
        export_best(study, spec, tmp_path / "best3", run["data"], [bad])


def test_a_stray_byte_or_a_bom_in_a_file_to_predict_is_no_crash(run, tmp_path, capsys):
    data = (run["holdout"] / "sts-holdout-student.csv").read_bytes()
    lines = data.split(b"\n")
    lines[3] = lines[3].replace(b" ", b" \xe9 ", 1)  # one byte that is not UTF-8, in a row
    stray = tmp_path / "sts-stray.csv"
    stray.write_bytes(b"\n".join(lines))
    bom = tmp_path / "ids-sst-bom-student.csv"
    bom.write_bytes(b"\xef\xbb\xbfid\tsentence\nA1\ta good film\nA2\ta bad film\n")  # a BOM, no index column
    evaluate_main(["--checkpoint", str(run["run"]), "--predict", str(stray), str(bom), "--out", str(tmp_path / "o")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result[str(stray)]["skipped"] == 3  # the fixture's two bad rows and the stray-byte row
    assert (result[str(bom)]["task"], result[str(bom)]["rows"]) == ("sst", 2)


def test_an_out_folder_that_is_a_file_is_one_line(run, tmp_path, caplog):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        caplog.clear()
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
            evaluate_main(["--checkpoint", str(run["run"]), "--predict",
                           str(run["holdout"] / "sts-holdout-student.csv"), "--out", str(out)])
        assert exit_info.value.code == 1 and f"cannot write {afile}" in caplog.text


def test_a_failed_export_leaves_the_previous_export_as_it_was(run, tmp_path, tiny_model, monkeypatch):
    from reports.export_best import ExportError, export_best

    monkeypatch.setenv("MTBERT_CHECKPOINT_DIR", str(tmp_path / "ck"))
    study, spec = export_study(tmp_path, run, "again")
    trained_trial(study, run, tiny_model, 0.4)
    out = tmp_path / "best"
    export_best(study, spec, out, run["data"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a better trial appears; its export fails on a bad file and must not leave its checkpoint in DIR
    trained_trial(study, run, tiny_model, 0.5, lr=1e-4)
    ambiguous = tmp_path / "pairs.csv"
    ambiguous.write_text("\tid\tsentence1\tsentence2\n0\ta\tx y\ty z\n")
    with pytest.raises(ExportError, match="put one of"):
        export_best(study, spec, out, run["data"], [ambiguous])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing of the failed export, nothing of the previous one lost
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # no staging folder left behind
    # a successful re-export replaces the previous one's entries (stale holdout outputs go with it)
    export_best(study, spec, out, run["data"], [run["holdout"] / "sts-holdout-student.csv"])
    assert sorted(p.name for p in (out / "predictions").glob("*holdout*")) == ["sts-holdout-output.csv"]


def test_a_cross_encoding_model_predicts_files_too(run, tmp_path, tiny_model, capsys):
    """--predict tokenises like training does: a pair task's joint "[CLS] s1 [SEP] s2" input included."""
    cfg = TrainConfig(model=str(tiny_model), data_dir=str(run["data"]), epochs=1, batch_size=8, device="cpu",
                      eval_batch_size=32, lr=1e-3, quora_encoding="cross", sts_encoding="both")
    train(cfg, out_dir=tmp_path / "cross", progress=False)
    files = [str(run["holdout"] / name) for name in ("quora-holdout-student.csv", "sts-holdout-student.csv")]
    evaluate_main(["--checkpoint", str(tmp_path / "cross"), "--predict", *files, "--out", str(tmp_path / "o")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(Path(v["output"]).name for v in result.values()) == ["para-holdout-output.csv",
                                                                        "sts-holdout-output.csv"]
    assert len(rows(tmp_path / "o" / "para-holdout-output.csv")) == 26
