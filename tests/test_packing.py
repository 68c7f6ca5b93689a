"""Filling a GPU with trials: the default workers per GPU, MPS detection, peak memory, OOM as a failed trial."""
from __future__ import annotations

import logging

import pytest
import torch
from optuna.trial import TrialState

from service import launch
from service.launch import GIB, EncoderSize, default_workers_per_gpu, worker_bytes

MINILM = EncoderSize(22_713_216, 384, 6)  # all-MiniLM-L6-v2 (EncoderSize.of("default") reads the same)
BERT_BASE = EncoderSize(109_482_240, 768, 12)


def test_encoder_size_is_read_from_the_config_alone(tiny_model):
    from transformers import AutoModel

    size = EncoderSize.of(str(tiny_model))
    assert size.params == sum(p.numel() for p in AutoModel.from_pretrained(tiny_model).parameters())
    assert (size.hidden, size.layers) == (32, 2)


@pytest.mark.parametrize("size, memory_gib, cores, expected", [
    (MINILM, 141, 16, 8),  # H200: the encoder-size cap, not memory, decides
    (MINILM, 80, 16, 8),  # H100
    (MINILM, 24, 16, 4),  # a 24 GiB card: memory decides
    (MINILM, 80, 3, 3),  # three CPU cores per GPU: one core per worker
    (BERT_BASE, 80, 16, 4),
    (BERT_BASE, 24, 16, 1),
    (None, 80, 16, 1),  # unknown encoder: no packing
])
def test_default_workers_per_gpu(size, memory_gib, cores, expected):
    n, why = default_workers_per_gpu(size, memory_gib * GIB, cores)
    assert n == expected, why
    assert n * worker_bytes(size or MINILM) <= memory_gib * GIB or size is None  # never more than fits


def test_worker_memory_counts_the_sentences_of_every_task(monkeypatch):
    from mtbert import tasks

    # SST one sentence, Quora and STS two each: five sentences through the encoder per batch row
    assert launch.sentences_per_row() == 5
    one_row = 34 * MINILM.hidden * MINILM.layers * 128  # activation bytes of one sentence, as worker_bytes counts
    assert worker_bytes(MINILM, batch_size=1) == launch.CONTEXT_BYTES + 16 * MINILM.params + 2 * 5 * one_row
    # a task table with one sentence task less: the estimate follows the table, no hard-coded count
    monkeypatch.setattr(tasks, "TASK_TABLE", {k: v for k, v in tasks.TASK_TABLE.items() if v.pair})
    assert launch.sentences_per_row() == 4
    assert worker_bytes(MINILM, batch_size=1) == launch.CONTEXT_BYTES + 16 * MINILM.params + 2 * 4 * one_row


def test_search_says_what_it_chose_and_the_flag_overrides(monkeypatch, tiny_model, caplog):
    monkeypatch.setattr(launch, "visible_gpus", lambda: 1)
    monkeypatch.setattr(launch, "gpu_memory_bytes", lambda: 80 * GIB)
    with caplog.at_level(logging.INFO, logger="search"):
        devices = launch.worker_devices(None, None, str(tiny_model))
    assert devices == ["cuda:0"] * len(devices) and len(devices) >= 1
    chose = [r.getMessage() for r in caplog.records if "worker(s) per GPU" in r.getMessage()]
    assert chose and f"{len(devices)} worker(s) per GPU" in chose[0] and "--workers-per-gpu N overrides" in chose[0]
    assert any("CUDA MPS" in r.getMessage() for r in caplog.records)
    assert launch.worker_devices(None, 3, str(tiny_model)) == ["cuda:0"] * 3
    assert launch.worker_devices(2, None, str(tiny_model)) == ["cuda:0"] * 2


def test_mps_is_detected_by_its_control_pipe(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not launch.mps_active()
    (tmp_path / "control").touch()
    assert launch.mps_active()


def test_an_oom_mid_trial_fails_that_trial_with_its_reason_and_the_worker_goes_on(tmp_path, tiny_model, tiny_data,
                                                                                    monkeypatch):
    """The OOM comes from inside a training step after epoch 1 was reported, as it would on a crowded GPU."""
    import mtbert.train

    from service.study import open_study
    from studies import load_spec
    from helpers import write_study
    from service.worker import Worker

    real_step, real_train = mtbert.train.train_step, mtbert.train.train
    calls = []

    def step_that_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # epoch 2 of the first trial (6 steps per epoch)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.06 GiB is free.")
        return real_step(*args, **kwargs)

    def train_reporting_peak(cfg, prepared=None, out_dir=None, callback=None, **kwargs):
        def with_peak(result):  # what train() reports on CUDA, where max_memory_allocated exists
            result.peak_memory_bytes = 3 * GIB
            return callback(result)

        return real_train(cfg, prepared, out_dir=out_dir, callback=with_peak, **kwargs)

    monkeypatch.setattr(mtbert.train, "train_step", step_that_runs_out)
    monkeypatch.setattr(mtbert.train, "train", train_reporting_peak)
    spec = load_spec(write_study(tmp_path, "oom", tiny_model, tiny_data, n_trials=2, epochs=2, pruner='type = "none"'))
    study = open_study(spec, f"sqlite:///{tmp_path / 'o.db'}", {})
    ran = Worker(study, spec, device="cpu", progress=False, checkpoint_root=tmp_path / "ck").run()
    assert ran == 3  # the failed trial, then the two the budget asks for
    first, *rest = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["epochs_done"] == 1
    assert first.user_attrs["fail_reason"].startswith("OutOfMemoryError: CUDA out of memory")
    assert first.user_attrs["peak_memory_bytes"] == 3 * GIB
    assert [t.state for t in rest] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert all(t.user_attrs["peak_memory_bytes"] == 3 * GIB for t in rest)
