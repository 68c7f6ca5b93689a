"""The results page (reports/results_page.py) against a small real study: the tiny seed_lr grid."""
from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import torch

import storage as storage_lib
from reports.results_page import FINDINGS, write_results_page
from studies import grid_key, load_spec
from service.study import open_study
from service.worker import Worker

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
SCORE_ATTRS = ("sst_acc", "quora_acc", "sts_corr", "overall")


@pytest.fixture(scope="module")
def tiny_seed_lr(tmp_path_factory, tiny_model) -> str:
    """Storage URL of a finished seed_lr grid on the tiny model: 1 epoch, 40 examples per task and split."""
    from tiny import write_data

    folder = tmp_path_factory.mktemp("seed-lr")
    data = write_data(folder / "data")
    mp = pytest.MonkeyPatch()
    mp.setenv("MTBERT_ARTIFACT_DIR", str(folder / "art"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: two spinning threads make a tiny trial 30x slower
    try:
        spec, overrides = load_spec("seed_lr").with_overrides(model=str(tiny_model), data_dir=str(data), epochs=1,
                                                               max_examples=40)
        url = f"sqlite:///{folder / 'results.db'}"
        study = open_study(spec, url, overrides)
        Worker(study, spec, device="cpu", progress=False, checkpoint_root=folder / "ckpt").run()
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return url


def table_rows(page: str, section: str) -> list[list[str]]:
    """The cells of the data rows of the first table under `## section`."""
    body = page.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]  # after header, alignment


def test_the_page_shows_the_storage_s_numbers_next_to_the_report_s(tiny_seed_lr, tmp_path):
    out = write_results_page(tiny_seed_lr, tmp_path / "docs" / "results.md")
    assert out == tmp_path / "docs" / "results.md"
    page = out.read_text()
    study = optuna.load_study(study_name="seed_lr", storage=storage_lib.open_storage(tiny_seed_lr, heartbeat=False))
    reference = load_spec("seed_lr").reference
    rows = table_rows(page, "seed_lr")
    assert len(rows) == 4 == len(study.trials)
    for t in study.trials:
        key = grid_key(t.params["lr"])
        (row,) = [r for r in rows if r[0] == f"lr = {key} (#{t.number})"]
        ref = reference[key]
        for cell, attr, metric in zip(row[1:5], SCORE_ATTRS, ("sst", "para", "sts", "overall")):
            assert cell == f"{t.user_attrs[attr]:.3f} / {ref[metric]:.3f}"
        model, data, epochs, device, wall = row[5:]
        assert model == Path(t.user_attrs["config"]["model"]).name
        assert (data, epochs, device) == ("40 per task/split", "1", "cpu")
        assert re.fullmatch(r"\d+ s", wall)
    assert "**dev set**" in page and "**test set**" in page
    assert "/ 0.531 |" in page and "/ 0.588 |" in page


def test_the_page_labels_the_profile_finds_and_says_how_to_reproduce(tiny_seed_lr, tmp_path):
    page = write_results_page(tiny_seed_lr, tmp_path / "results.md").read_text()
    assert "## Profile: CPU-scaled profile (epochs reduced to 1; data capped at 40 examples)" in page
    assert "**CPU-scaled profile" in page
    # absent studies: the report's numbers and how to run them
    for name in ("ablation", "seed_dropout"):
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert f"`python search.py --study {name}`" in section
        assert "(not run)" in section
    assert "stack_cosine (not run) | – / 0.390" in page
    # findings: every claim is listed; the lr one is decided from our rows, the ablation ones cannot be
    findings = page.split("\n## Findings\n", 1)[1].split("\n## ", 1)[0]
    for f in FINDINGS:
        assert f.claim in findings
    lr = findings.split("**Higher learning rates hurt.** — ours: **", 1)[1]
    assert lr.startswith(("holds**", "does not hold**"))
    assert "overall by lr: 1e-05 " in lr.split("\n")[2]
    assert findings.count("cannot tell (missing rows)") >= 5
    assert "cannot be checked by these grids" in findings
    # the rules reproduce the report's own claims from its own numbers
    assert findings.count("the report's numbers: holds") == len([f for f in FINDINGS if f.check])
    reproduce = page.split("\n## Reproduce\n", 1)[1]
    assert "python search.py --study seed_lr --epochs 1 --max-examples 40 --model " in reproduce
    assert f"--storage {tiny_seed_lr}" in reproduce
    assert "python search.py --results --out " in reproduce


def test_findings_on_the_report_s_numbers_all_hold():
    report = {name: {k: v for k, v in load_spec(name).reference.items()} for name in ("ablation", "seed_lr",
                                                                                      "seed_dropout")}
    verdicts = {f.claim: f.check(report)[0] for f in FINDINGS if f.check}
    assert set(verdicts.values()) == {"holds"}, verdicts
    worse = {**report, "seed_dropout": {**report["seed_dropout"], "0.2": {**report["seed_dropout"]["0.2"],
                                                                           "overall": 0.7}}}
    (dropout,) = [f for f in FINDINGS if "Dropout" in f.claim]
    verdict, numbers = dropout.check(worse)
    assert verdict == "does not hold" and "best dropout 0.2" in numbers


def test_an_empty_storage_gives_a_page_of_how_to_run_lines(tmp_path):
    page = write_results_page(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path / "r.md").read_text()
    assert "## Profile: no runs yet" in page
    for name in ("ablation", "seed_lr", "seed_dropout"):
        assert f"`python search.py --study {name}`" in page
    assert "CPU-scaled" not in page


def test_findings_compare_the_numbers_shown_and_flag_the_report_s_odd_overalls():
    from reports.results_page import StudyResults, reference_overall_mismatches, shown

    (lr,) = [f for f in FINDINGS if "learning rates" in f.claim]
    tie = {"seed_lr": {"1e-05": {"overall": 0.5191}, "0.0001": {"overall": 0.5189}}}
    assert lr.check({"seed_lr": shown(tie["seed_lr"])})[0] == "does not hold"  # 0.519 vs 0.519: a tie
    assert lr.check(tie)[0] == "holds"
    odd = reference_overall_mismatches(StudyResults("ablation", load_spec("ablation"), in_storage=False))
    assert [o.split(" (")[0] for o in odd] == ["for cosine", "for stack_cosine"]


def test_a_storage_password_never_reaches_the_page(tmp_path, monkeypatch):
    import reports.results_page as page_module

    url = "postgresql://mtbert:s3cr3t-pw@db.example:5432/mtbert"
    monkeypatch.setattr(page_module, "read_study", lambda storage, name: None)
    monkeypatch.setattr(page_module.storage_lib, "open_storage", lambda u, heartbeat: type(
        "Fake", (), {"engine": type("E", (), {"dispose": lambda self: None})()})())
    page = write_results_page(url, tmp_path / "r.md").read_text()
    assert "s3cr3t-pw" not in page
    assert "postgresql://mtbert:***@db.example:5432/mtbert" in page


def test_rerunning_leaves_a_page_alone_when_only_its_timestamp_would_change(tiny_seed_lr, tmp_path):
    """docs/results.md is tracked: `search.py --results` must not dirty it with a new timestamp alone."""
    import re

    from reports.results_page import update_results_page

    out = tmp_path / "results.md"
    assert update_results_page(tiny_seed_lr, out) == (out, True)
    page = out.read_text()
    old = re.sub(r" on \d{4}-\d\d-\d\d \d\d:\d\d UTC by ", " on 2020-01-01 00:00 UTC by ", page, count=1)
    assert old != page
    out.write_text(old)
    assert update_results_page(tiny_seed_lr, out) == (out, False)
    assert out.read_text() == old  # the old stamp stays: nothing else changed
    out.write_text(old.replace("## Profile", "## Profile (edited)"))
    assert update_results_page(tiny_seed_lr, out) == (out, True)
    assert "(edited)" not in out.read_text()
