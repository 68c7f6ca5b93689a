"""The static-shape step (mtbert.static_step): same model as the eager step, bounded shapes, no host sync."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from mtbert.config import TrainConfig
from mtbert.data import Encoded, TaskData, TaskStream
from mtbert.model import MultitaskBert
from mtbert.static_step import (StaticStep, StepStats, bucket, bucket_widths, resolve_step, stage_epoch,
                                training_shapes, unsupported)
from mtbert.tasks import TASKS
from mtbert.train import build_optimizer, epoch_plan, prepare, train, train_step
from tiny import write_data

LR_DROPOUT_BATCH_SIZES = range(8, 41, 8)  # studies/lr_dropout.toml: batch_size 8..40 step 8


@pytest.fixture(scope="module")
def still_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny BERT without encoder dropout: both steps then compute the same function."""
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    for f in tiny_model.iterdir():
        shutil.copy(f, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def uneven_data(tmp_path) -> Path:
    """Tasks of different sizes (SST 70, Quora 48, STS 37 rows): cycling and short last batches."""
    folder = write_data(tmp_path / "d", n_train=48, malformed=False)
    for task, n in (("ids-sst-train.csv", 70), ("sts-train.csv", 37)):
        other = write_data(tmp_path / f"d{n}", n_train=n, malformed=False, seed=n)
        (folder / task).write_text((other / task).read_text())
    return folder


def cfg_for(model: Path, data: Path, **kw) -> TrainConfig:
    # fp32 on every CPU (amp "auto" is bf16 on CPUs with native bf16): eager and static are compared in fp32
    base = dict(model=str(model), data_dir=str(data), epochs=2, batch_size=10, device="cpu", eval_batch_size=32,
                amp="off", lr=1e-3, hidden_dropout_prob=0.0)
    return TrainConfig(**{**base, **kw})


def per_step_losses(cfg: TrainConfig, kind: str, epochs: int, setup=None):
    """Train `epochs` epochs with the eager or the static step: the loss of every step, the model,
    optimizer and scheduler. `setup(stepper)` may change the static step before it runs."""
    prepared = prepare(cfg)
    torch.manual_seed(cfg.seed)
    model = MultitaskBert(copy.deepcopy(prepared.encoder), cfg)
    streams = {t: TaskStream(prepared.train[t], cfg.batch_size, cfg.seed) for t in TASKS}
    steps_per_epoch = len(epoch_plan(streams, True, 0))
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"), steps_per_epoch * epochs)
    stats = StepStats(torch.device("cpu"))
    stepper = StaticStep(model, optimizer, scheduler, prepared.train, cfg, False, steps_per_epoch * epochs, stats)
    if setup is not None:
        setup(stepper)
    losses, step = [], 0
    for epoch in range(epochs):
        plan = epoch_plan(streams, True, epoch)
        if kind == "static":
            stepper.begin_epoch(plan, streams, step)
        for i, tasks in enumerate(plan):
            if kind == "static":
                before = float(stats.loss_sum)
                stepper.step(i)
                losses.append(float(stats.loss_sum) - before)
            else:
                batches = [streams[t].batch(s) for t, s in tasks]
                losses.append(float(train_step(model, optimizer, scheduler, streams, batches, False,
                                               cfg.max_grad_norm, "per_piece")))
            step += 1
        if kind == "static":
            stepper.end_epoch(step)
            assert stepper.step_widths and set(stepper.step_widths) <= set(stepper.widths)
    return losses, model, optimizer, scheduler


def test_static_step_has_the_eager_step_s_loss_trajectory(still_model, uneven_data):
    cfg = cfg_for(still_model, uneven_data)
    eager, eager_model, eager_opt, eager_sched = per_step_losses(cfg, "eager", epochs=2)
    static, static_model, static_opt, static_sched = per_step_losses(cfg, "static", epochs=2)
    assert len(eager) == len(static) == 14  # 70 SST rows / 10 = 7 steps per epoch, two epochs
    np.testing.assert_allclose(static, eager, rtol=2e-4, atol=1e-5)
    assert eager[-1] < eager[0]  # it trains: the comparison is not between two constants
    for (name, a), b in zip(eager_model.named_parameters(), static_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=2e-5, msg=name)
    # after end_epoch the optimizer and scheduler look as the eager step leaves them
    assert static_sched.last_epoch == eager_sched.last_epoch == 14
    for ga, gb in zip(eager_opt.param_groups, static_opt.param_groups):
        assert isinstance(gb["lr"], float) and gb["lr"] == pytest.approx(ga["lr"])
        assert (gb["fused"], gb["capturable"]) == (ga["fused"], ga["capturable"])


class FakeGraph:
    """Stands in for a captured CUDA graph on a CPU: a replay runs the recorded step again, reading
    the static buffers anew, as a real replay does; the capture itself runs nothing."""

    def __init__(self, stepper: StaticStep, width: int):
        self.stepper, self.width, self.replays = stepper, width, 0

    def replay(self) -> None:
        self.replays += 1
        self.stepper._body(self.width, (self.stepper.batch_size,) * len(TASKS))


def test_graph_bookkeeping_warms_up_captures_and_replays_each_width_once(still_model, uneven_data):
    """The graphs path's control flow on a CPU, with the capture faked: the trajectory must stay the
    eager step's (a capture that lost or doubled a step would change it)."""
    captured, graphs, full_steps = [], {}, []

    def fake_graphs(stepper):
        def capture(width):
            captured.append(width)
            graphs[width] = FakeGraph(stepper, width)
            return graphs[width]

        graphed = stepper._graphed

        def counted(width):
            full_steps.append(width)
            graphed(width)

        stepper.graphs_on = True
        stepper._capture = capture
        stepper._graphed = counted

    cfg = cfg_for(still_model, uneven_data)
    eager = per_step_losses(cfg, "eager", epochs=2)[0]
    losses, *_ = per_step_losses(cfg, "static", epochs=2, setup=fake_graphs)
    np.testing.assert_allclose(losses, eager, rtol=2e-4, atol=1e-5)
    assert sorted(captured) == sorted(set(full_steps))  # one capture per width
    for width, graph in graphs.items():  # per width: one warm-up step, then every full step is a replay
        assert graph.replays == full_steps.count(width) - 1
    assert 0 < len(full_steps) < len(eager)  # short steps (7 STS rows, 8 Quora rows) never went to a graph


@pytest.fixture(autouse=True)
def graphs_not_off(monkeypatch):
    """Each test starts in a process where CUDA graphs have not failed (the decision is process-wide)."""
    import mtbert.static_step as static_step

    monkeypatch.setattr(static_step, "_graphs_off", None, raising=False)  # raising=False: also on the old code


def fake_cuda_losses(cfg: TrainConfig, monkeypatch, mode: str, epochs: int = 2):
    """per-step losses of the graphs path on a faked cuda:3 (tests/fake_cuda.py), and the fake."""
    from fake_cuda import FakeCuda

    fakes = []

    def setup(stepper):
        fakes.append(FakeCuda(monkeypatch, stepper, target=3, mode=mode))

    losses, *_ = per_step_losses(cfg, "static", epochs=epochs, setup=setup)
    return losses, fakes[0]


def test_graphs_are_captured_and_replayed_on_the_trial_s_device(still_model, uneven_data, monkeypatch):
    """A worker on cuda:3 with the process's current device 0: every stream, capture and sync must be
    cuda:3's. (torch.cuda.graph's own capture stream is made on the current device: an empty graph.)"""
    cfg = cfg_for(still_model, uneven_data)
    eager = per_step_losses(cfg, "eager", epochs=2)[0]
    losses, cuda = fake_cuda_losses(cfg, monkeypatch, "device")
    assert cuda.captures and set(cuda.captures) == {(3, 3)}  # current device and capture stream: cuda:3
    assert set(cuda.streams) == {3} and set(cuda.synced) <= {3}
    assert cuda.stack == [] and cuda.current == 0  # every stream and device context exited
    np.testing.assert_allclose(losses, eager, rtol=2e-4, atol=1e-5)  # the replays trained
    assert cuda.stepper.graphs_on and cuda.stepper.fallback is None


def test_a_replay_that_trains_nothing_is_caught_and_the_run_goes_on_eagerly(still_model, uneven_data, monkeypatch):
    """An empty (or partial) graph whose replays do nothing, with no warning: the first replay's check
    sees the step counter stand still, runs the step again without graphs, and turns graphs off."""
    import mtbert.static_step as static_step

    cfg = cfg_for(still_model, uneven_data)
    eager = per_step_losses(cfg, "eager", epochs=2)[0]
    losses, cuda = fake_cuda_losses(cfg, monkeypatch, "empty")
    np.testing.assert_allclose(losses, eager, rtol=2e-4, atol=1e-5)  # no step lost, none counted twice
    stepper = cuda.stepper
    assert "advanced the step counter by 0" in stepper.fallback and not stepper.graphs_on
    assert len(stepper.graphs) == 1  # one width tried, then no more captures
    assert static_step.graphs_unavailable() == stepper.fallback
    kind, note = resolve_step(TrainConfig(step="graphs"), torch.device("cuda", 3))  # later trials: no retry
    assert kind == "eager" and "failed earlier in this process" in note


def test_a_failed_capture_restores_the_stream_and_logs_its_cause(still_model, uneven_data, monkeypatch, caplog):
    """The captured body raises, then capture_end raises 'previous error during capture' (as torch does):
    the capture stream must not stay current, the log must name the first error, and graphs stay off."""
    import logging

    import mtbert.static_step as static_step

    cfg = cfg_for(still_model, uneven_data)
    eager = per_step_losses(cfg, "eager", epochs=1)[0]
    with caplog.at_level(logging.WARNING, logger="mtbert"):
        losses, cuda = fake_cuda_losses(cfg, monkeypatch, "fail", epochs=1)
    assert cuda.stack == [] and cuda.current == 0
    np.testing.assert_allclose(losses, eager, rtol=2e-4, atol=1e-5)
    stepper = cuda.stepper
    assert not stepper.graphs_on and "operation not permitted" in stepper.graph_error
    assert "previous error" not in stepper.graph_error and stepper.fallback == stepper.graph_error
    assert "operation not permitted" in caplog.text and "graphs off: capture failed: RuntimeError" in stepper.describe()
    assert static_step.graphs_unavailable() is not None and len(cuda.captures) == 1  # tried once per process


def test_train_switches_to_the_eager_step_when_graphs_do_not_train(still_model, uneven_data, monkeypatch):
    """train() with graphs whose replays do nothing: the run must end where the eager step's does and say
    which step ran, never report the score of steps that did not train."""
    from fake_cuda import FakeCuda

    import mtbert.train as train_module

    class FakeGraphStep(StaticStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            FakeCuda(monkeypatch, self, target=3, mode="empty")

    cfg = cfg_for(still_model, uneven_data, epochs=2)
    eager = train(cfg, progress=False)
    monkeypatch.setattr(train_module, "StaticStep", FakeGraphStep)
    faked = train(cfg.replace(step="static"), progress=False)
    assert [r.step_kind for r in eager] == ["eager", "eager"]
    assert [r.step_kind for r in faked] == ["graphs, then eager", "eager"]
    for a, b in zip(eager, faked):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-3)
        assert b.metrics["overall"] == pytest.approx(a.metrics["overall"], abs=2e-3)


def first_epoch_stepper(cfg: TrainConfig) -> StaticStep:
    """A static step on cfg's data with its first epoch staged (begin_epoch), no step run yet."""
    prepared = prepare(cfg)
    streams = {t: TaskStream(prepared.train[t], cfg.batch_size, cfg.seed) for t in TASKS}
    model = MultitaskBert(copy.deepcopy(prepared.encoder), cfg)
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"), 100)
    stepper = StaticStep(model, optimizer, scheduler, prepared.train, cfg, False, 100, StepStats(torch.device("cpu")))
    stepper.begin_epoch(epoch_plan(streams, True, 0), streams, 0)
    return stepper


def test_padding_rows_of_a_short_batch_do_not_count(still_model, uneven_data):
    """STS has 37 rows: with batch 10 its 4th batch of every pass has 7; the static step pads it to 10."""
    stepper = first_epoch_stepper(cfg_for(still_model, uneven_data))
    counts = {t: sorted(set(stepper.counts[:, j].tolist())) for j, t in enumerate(TASKS)}
    assert counts == {"sst": [10], "quora": [8, 10], "sts": [7, 10]}  # 48 = 4 x 10 + 8, 37 = 3 x 10 + 7
    assert stepper.staged.shape == (7, 30)  # every step has the same rows: 3 tasks x 10
    j = TASKS.index("sts")
    i = int(np.flatnonzero(stepper.counts[:, j] == 7)[0])
    sts_rows = stepper.staged[i, 10 * j:10 * (j + 1)]
    assert (sts_rows[7:] == sts_rows[0]).all()  # padded with copies of a real row, sliced off before the loss


def test_train_with_the_static_step_matches_the_eager_step(still_model, uneven_data, tmp_path):
    eager = train(cfg_for(still_model, uneven_data, step="eager"), progress=False)
    static = train(cfg_for(still_model, uneven_data, step="static"), out_dir=tmp_path / "run", progress=False)
    for a, b in zip(eager, static):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4)
        for k in ("sst_acc", "quora_acc", "sts_corr"):
            assert b.metrics[k] == pytest.approx(a.metrics[k], abs=1e-3), k
    # resuming a static run gives the uninterrupted run's result
    part = train(cfg_for(still_model, uneven_data, step="static"), out_dir=tmp_path / "part",
                 callback=lambda r: r.epoch == 1, progress=False)
    assert len(part) == 1
    resumed = train(cfg_for(still_model, uneven_data, step="static"), out_dir=tmp_path / "part", progress=False)
    assert [r.metrics for r in resumed] == [r.metrics for r in static]


def test_static_step_stops_on_a_nan_loss_with_its_step(still_model, uneven_data):
    cfg = cfg_for(still_model, uneven_data, step="static", epochs=1)
    prepared = prepare(cfg)
    prepared.train["sts"].labels[:] = float("nan")
    from mtbert.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="at step 1 "):
        train(cfg, prepared, progress=False)


# ------------------------------------------------------------------ shapes


def fake_task(task: str, n: int, rng: np.random.Generator, columns: int) -> TaskData:
    """A task whose sentence lengths spread like the shared data's, with a long tail up to 128."""
    cols = []
    for _ in range(columns):
        lengths = torch.from_numpy(np.clip(np.exp(rng.normal(2.8, 0.7, n)), 3, 128).astype(np.int64)).int()
        cols.append(Encoded(torch.ones(n, 128, dtype=torch.int32), lengths))
    return TaskData(task, [str(i) for i in range(n)], cols, torch.zeros(n, dtype=torch.long))


def test_shapes_are_bounded_over_the_lr_dropout_batch_sizes():
    widths = bucket_widths(128)
    assert widths == (24, 32, 48, 64, 96, 128)
    assert bucket_widths(64) == (24, 32, 48, 64) and bucket_widths(128, max_positions=64)[-1] == 64
    assert [bucket(n, widths) for n in (1, 24, 25, 95, 97, 128)] == [24, 24, 32, 96, 128, 128]
    claimed = training_shapes(LR_DROPOUT_BATCH_SIZES, 128)
    assert len(claimed) == 30  # 5 batch sizes x 6 widths: what README and compile_encoder's limit say

    rng = np.random.default_rng(0)
    data = {"sst": fake_task("sst", 300, rng, 1), "quora": fake_task("quora", 500, rng, 2),
            "sts": fake_task("sts", 230, rng, 2)}
    seen = set()
    for b in LR_DROPOUT_BATCH_SIZES:
        streams = {t: TaskStream(data[t], b, seed=1) for t in TASKS}
        per_size = set()
        for epoch in range(2):
            rows, counts, step_widths = stage_epoch(epoch_plan(streams, True, epoch), streams, b, widths)
            assert rows.shape[1] == 3 * b  # rows per step never vary (short batches are padded)
            assert (counts < b).any()  # ... and there are short batches here (300, 500, 230 rows)
            per_size |= {(5 * b, w) for w in step_widths}
        assert len(per_size) <= len(widths)
        seen |= per_size
    assert seen <= claimed and len(seen) >= 25  # realistic lengths use (nearly) every bucket of every batch size


def test_auto_is_eager_on_cpu_and_other_methods_fall_back_to_eager(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_step(TrainConfig(), cpu) == ("eager", None)
    assert resolve_step(TrainConfig(step="static"), cpu) == ("static", None)
    kind, note = resolve_step(TrainConfig(step="graphs"), cpu)
    assert kind == "static" and "CUDA" in note
    # auto is the eager step on CUDA too, on every device and lr_dropout batch size: the step that has run on a GPU
    for device in ("cuda", "cuda:0", "cuda:3"):
        for b in LR_DROPOUT_BATCH_SIZES:
            assert resolve_step(TrainConfig(batch_size=b), torch.device(device)) == ("eager", None)
    assert resolve_step(TrainConfig(step="graphs"), torch.device("cuda:3")) == ("graphs", None)  # opt-in
    assert resolve_step(TrainConfig(step="static"), torch.device("cuda:3")) == ("static", None)
    kind, note = resolve_step(TrainConfig(multitask=False, step="graphs"), torch.device("cuda"))
    assert kind == "eager" and "--no-multitask" in note
    assert unsupported(TrainConfig(packing=True)) == "--packing"
    # a field the static step does not know (a multitask method, say), away from its default: eager
    import dataclasses

    import mtbert.static_step as static_step

    monkeypatch.setattr(static_step, "COVERED_FIELDS", static_step.COVERED_FIELDS - {"weight_decay"})
    assert unsupported(TrainConfig(weight_decay=0.1)) == "weight_decay=0.1"
    assert unsupported(TrainConfig()) is None and dataclasses.fields(TrainConfig)
    # the multitask methods (mtbert.methods) are not the static step's: each one runs the eager step
    from mtbert.methods import STEP_FIELDS, report_step

    cuda = torch.device("cuda")
    for cfg in (TrainConfig(pcgrad=True), TrainConfig(task_sampling="proportional"), TrainConfig(quora_encoding="cross"),
                TrainConfig(smart_weight=1.0), TrainConfig(sts_loss="cosent"), TrainConfig(layer_decay=0.9)):
        kind, note = resolve_step(cfg.replace(step="graphs"), cuda)  # opted in: still eager, with the reason
        assert kind == "eager" and "default method set only" in note, cfg
    assert not (set(STEP_FIELDS) & static_step.COVERED_FIELDS) and report_step(TrainConfig())


# ------------------------------------------------------------------ no host sync


SYNCS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu", "nonzero",
         "masked_select", "unique", "any", "all"}


class HostReads(TorchFunctionMode):
    """Records every call that reads a device value on the host (a sync on CUDA): .item(), bool(),
    int(), .tolist(), .cpu(), data-dependent shapes (nonzero, masked_select, unique, bool-mask
    indexing, 0-dim tensor indices), and any()/all() (whose only use is a bool read)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCS:
            self.calls.append(name)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and (i.dtype == torch.bool or i.dim() == 0) for i in index):
                self.calls.append(f"{name}[{'bool' if any(getattr(i, 'dtype', None) == torch.bool for i in index) else '0-dim'}]")
        return func(*args, **(kwargs or {}))


def test_the_static_step_never_reads_the_device(still_model, uneven_data):
    stepper = first_epoch_stepper(cfg_for(still_model, uneven_data))
    with HostReads() as spy:
        for i in range(len(stepper.step_widths)):  # full and short steps alike
            stepper.step(i)
    assert spy.calls == []
    # the detector is real: it sees the old loop's per-check read and the eager step's host-side AdamW
    flags = [~torch.isfinite(torch.tensor(1.0))]
    with HostReads() as spy:
        bool(torch.stack(flags).any())
    assert spy.calls == ["any", "__bool__"]
    with HostReads() as spy:  # ... and the loop's one read per check
        stepper.stats.read(1)
    assert spy.calls == ["tolist"]


def test_a_study_s_default_trial_on_cpu_still_uses_the_eager_step(tiny_model, tiny_data, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="mtbert"):
        train(cfg_for(tiny_model, tiny_data, epochs=1), progress=False)
    assert not any("training step: static" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.INFO, logger="mtbert"):
        train(cfg_for(tiny_model, tiny_data, epochs=1, step="graphs"), progress=False)
    assert any("CUDA graphs need a CUDA device" in r.getMessage() for r in caplog.records)
    assert any("training step: static shapes" in r.getMessage() for r in caplog.records)
