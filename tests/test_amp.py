"""bf16 autocast where the device computes bf16 natively (mtbert.config.resolve_amp), fp32 elsewhere."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mtbert import config
from mtbert.cli import train_parser
from mtbert.config import TrainConfig, cpu_native_bf16, resolve_amp
from mtbert.model import MultitaskBert
from mtbert.train import train

CPU = torch.device("cpu")


@pytest.fixture
def fresh_probe():
    cpu_native_bf16.cache_clear()
    yield
    cpu_native_bf16.cache_clear()


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True),
                                           ("fpu avx2 fma", False), ("fpu avx512f avx512bw", False)])
def test_cpu_bf16_is_decided_by_the_cpuinfo_flags(tmp_path, fresh_probe, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    got, why = cpu_native_bf16(str(info))
    assert got is native
    assert ("bf16" in why) and (("neither" in why) is not native)


def test_without_cpuinfo_a_probe_decides(tmp_path, fresh_probe, monkeypatch):
    speed = {"float32": 1.0, "bfloat16": 70.0}
    monkeypatch.setattr(config, "_gemm_seconds", lambda dtype: speed[dtype])
    assert cpu_native_bf16(str(tmp_path / "missing"))[0] is False
    cpu_native_bf16.cache_clear()
    speed["bfloat16"] = 0.4
    native, why = cpu_native_bf16(str(tmp_path / "missing"))
    assert native and why.startswith("probe:")


def test_resolve_amp(monkeypatch):
    monkeypatch.setattr(config, "cpu_native_bf16", lambda: (True, "the CPU has avx512_bf16"))
    assert resolve_amp("auto", CPU) == (True, "bf16 autocast: amp auto, the CPU has avx512_bf16")
    monkeypatch.setattr(config, "cpu_native_bf16", lambda: (False, "the CPU has neither"))
    assert resolve_amp("auto", CPU)[0] is False and resolve_amp("auto", CPU)[1].startswith("fp32")
    assert resolve_amp("bf16", CPU)[0] is True  # forced, whatever the CPU
    assert resolve_amp("off", torch.device("cuda"))[0] is False
    assert resolve_amp("auto", torch.device("cuda"))[0] is True
    assert resolve_amp("auto", torch.device("mps"))[0] is False


def test_amp_options_and_the_old_booleans():
    parser = train_parser()
    assert [parser.parse_args(a).amp for a in ([], ["--amp"], ["--no-amp"], ["--amp", "off"])] == \
        ["auto", "bf16", "off", "off"]
    assert (TrainConfig(amp=True).amp, TrainConfig(amp=False).amp) == ("auto", "off")  # older config.json files
    with pytest.raises(ValueError, match="amp must be one of 'auto', 'bf16', 'off'"):
        TrainConfig(amp="fp16").validate()
    assert "20x" not in config.TrainConfig.__dataclass_fields__["amp"].metadata["help"]


@pytest.mark.slow  # a subprocess (search.py, mtbert.train) or real training: ~8-25 s
def test_auto_trains_and_evaluates_in_bf16_on_a_native_bf16_cpu(tiny_model: Path, tiny_data: Path, monkeypatch,
                                                                 caplog):
    """The encoder runs under CPU bf16 autocast in training and evaluation; weights and AdamW state stay fp32."""
    monkeypatch.setattr(config, "cpu_native_bf16", lambda: (True, "the CPU has amx_bf16"))
    seen: list[tuple[bool, bool]] = []
    states: list[torch.dtype] = []
    real_step = torch.optim.AdamW.step

    def record_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        states.extend(v.dtype for s in self.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", record_step)
    real_embed = MultitaskBert.embed

    def record_embed(self, *args, **kwargs):
        seen.append((self.training, torch.is_autocast_enabled("cpu") and
                     torch.get_autocast_dtype("cpu") == torch.bfloat16))
        return real_embed(self, *args, **kwargs)

    monkeypatch.setattr(MultitaskBert, "embed", record_embed)
    cfg = TrainConfig(model=str(tiny_model), data_dir=str(tiny_data), epochs=1, batch_size=16, device="cpu",
                      eval_batch_size=64, lr=1e-3)
    with caplog.at_level(logging.INFO, logger="mtbert.train"):
        results = train(cfg, progress=False)
    assert {training for training, _ in seen} == {True, False}  # both training and evaluation were seen
    assert all(bf16 for _, bf16 in seen)
    assert "compute: bf16 autocast: amp auto, the CPU has amx_bf16" in caplog.text
    assert states and set(states) == {torch.float32}
    assert results[-1].metrics["overall"] == results[-1].metrics["overall"]  # a number, not NaN

    seen.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtbert.train"):
        train(cfg.replace(amp="off"), progress=False)
    assert "compute: fp32: amp is off" in caplog.text and seen and not any(bf16 for _, bf16 in seen)


def test_a_run_records_the_precision_it_computed_in(tiny_model: Path, tiny_data: Path, tmp_path, monkeypatch):
    """'auto' resolves per machine, so the run's config.json and each epoch say what it resolved to: an export
    on another machine computes as the run did, and a study can tell its bf16 trials from its fp32 ones."""
    import json

    monkeypatch.setattr(config, "cpu_native_bf16", lambda: (True, "the CPU has amx_bf16"))
    cfg = TrainConfig(model=str(tiny_model), data_dir=str(tiny_data), epochs=1, batch_size=16, device="cpu",
                      eval_batch_size=64, max_examples=16)
    results = train(cfg, out_dir=tmp_path / "run", progress=False)
    assert results[-1].amp == "bf16"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["amp"] == "bf16"
    monkeypatch.setattr(config, "cpu_native_bf16", lambda: (False, "the CPU has neither"))
    assert train(cfg, out_dir=tmp_path / "run2", progress=False)[-1].amp == "off"
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["amp"] == "off"
