"""Every command's --help: fast (mtbert.* parse their arguments before importing torch), named as it
is run, every option explained, every shown default true; and a skipped test group says why."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT
from mtbert.cli import bench_parser, evaluate_parser, train_parser
from mtbert.config import TrainConfig


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env or os.environ)


@pytest.mark.parametrize("module", ["mtbert.train", "mtbert.evaluate", "mtbert.bench"])
def test_mtbert_help_is_named_as_run_and_never_imports_torch(module):
    proc = run("-X", "importtime", "-m", module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m {module} ")
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "mtbert.cli" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "torch imported for --help"
    bad = run("-X", "importtime", "-m", module, "--no-such-flag")
    assert bad.returncode == 2 and f"python -m {module}: error:" in bad.stderr
    assert not re.search(r"\|\s+torch$", bad.stderr, re.M)  # bad arguments, too, answer before torch


@pytest.mark.parametrize("parser", [train_parser(), evaluate_parser(), bench_parser("")],
                         ids=["train", "evaluate", "bench"])
def test_every_option_is_explained_and_its_shown_default_is_true(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = parser._get_formatter()._expand_help(action)
        assert text.strip(), f"{action.option_strings} has no help"
        shown = re.findall(r"\(default: ([^)]*)\)", text)
        assert len(shown) <= 1, (action.option_strings, text)  # e.g. not "(default: none) (default: None)"
        if isinstance(action, argparse._StoreFalseAction) or action.const is True:
            # never "--no-resume (default: True)": that is the default of its destination, not of the flag
            assert not shown or shown[0] not in ("True", "False"), (action.option_strings, text)
            continue
        if action.default not in (None, False) and action.required is False:
            assert shown, f"{action.option_strings}: default {action.default!r} not shown"
            value = shown[0]
            if isinstance(action, argparse.BooleanOptionalAction):
                assert value == ("on" if action.default else "off"), (action.option_strings, text)
            elif action.default == "default":  # the model sentinel is explained, not shown as "default"
                assert "all-MiniLM-L6-v2" in value
            else:
                default = action.default
                expected = " ".join(map(str, default)) if isinstance(default, list) else str(default)
                assert value == expected, (action.option_strings, value, default)


def test_train_help_reads_as_the_issue_asked():
    text = run("-m", "mtbert.train", "--help").stdout
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and "(default: none)" not in flat and "(default: default)" not in flat
    assert "--no-resume start from scratch, replacing the checkpoint in --out (default: resume it" in flat
    assert "--stack, --no-stack Linear-LayerNorm-Dropout x2 stacks in the heads (default: on)" in flat
    assert "--model MODEL HF model id or local folder (default: the packaged all-MiniLM-L6-v2" in flat
    assert f"--epochs EPOCHS passes over the largest training set (default: {TrainConfig().epochs})" in flat


def test_search_and_worker_show_their_defaults():
    search = " ".join(run("search.py", "--help").stdout.split())
    assert "--port PORT dashboard port (default: 8080)" in search
    assert "--workers-per-gpu WORKERS_PER_GPU pack several trials on each GPU (default: chosen from GPU memory and encoder size" in search
    assert "(default: the study file's [train] data_dir, else $MTBERT_DATA_DIR, else ./data)" in search
    assert "Exit status: 0 when the budget is met" in search
    worker = " ".join(run("worker.py", "--help").stdout.split())
    assert "stop after this many failed trials in a row (default: 3)" in worker
    assert "wait between checks when all remaining trials run elsewhere (default: 5)" in worker


def test_counts_below_their_minimum_and_a_confirmation_name_are_usage_errors():
    for args, fragment in ((("-m", "mtbert.bench", "--steps", "0"), "argument --steps: must be a whole number >= 1"),
                           (("-m", "mtbert.bench", "--batch-sizes", "0"), "argument --batch-sizes: must be a whole"),
                           (("-m", "mtbert.bench", "--barrier", "dir:x"), "argument --barrier: expected DIR:N"),
                           (("-m", "mtbert.evaluate", "--checkpoint", "x", "--batch-size", "-1"), "--batch-size: must"),
                           (("search.py", "--study", "quickstart:confirm", "--status"),
                            "`python search.py --study quickstart --status` shows it")):
        proc = run(*args)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_skipped_postgresql_group_says_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MTBERT_TEST_PG_URL", "CI")}
    env.update(MTBERT_PG_PORT="1", MTBERT_PG_DIR=str(tmp_path / "pg"),  # no server there
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    probe = tmp_path / "test_probe.py"  # a PostgreSQL test, with the project's fixtures (tests/conftest.py)
    probe.write_text("def test_needs_postgres(pg_url):\n    pass\n")
    proc = run("-m", "pytest", "-q", "-p", "conftest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
               str(probe), env=env)
    assert "1 skipped" in proc.stdout, proc.stdout
    assert re.search(r"SKIPPED \[1\] .*test_probe\.py:\d+: PostgreSQL tests skipped: MTBERT_TEST_PG_URL is "
                     rf"not set and no local server answers storage/postgres\.sh status \(MTBERT_PG_DIR={tmp_path}/pg, "
                     r"MTBERT_PG_PORT=1\)", proc.stdout), proc.stdout
