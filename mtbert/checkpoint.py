"""Checkpoints: one self-contained folder per run, rewritten atomically after every epoch.

Layout of a run folder:
    checkpoint.pt   model, optimizer, scheduler, RNG states, epoch, step, metrics history
    config.json     the TrainConfig of the run
    encoder/        the encoder's HF config and the tokenizer, so a checkpoint loads offline
    metrics.json    the per-epoch dev metrics (also inside checkpoint.pt)
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_run_files(out_dir: Path, config: dict[str, Any], encoder, tokenizer) -> None:
    """What a checkpoint needs besides the weights; written once at the start of a run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    encoder.config.save_pretrained(out_dir / "encoder")
    tokenizer.save_pretrained(out_dir / "encoder")


def save_checkpoint(out_dir: Path, *, model, optimizer, scheduler, epoch: int, step: int,
                    history: list[dict[str, Any]]) -> Path:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_states(),
        "epoch": epoch,
        "step": step,
        "history": history,
    }
    path = out_dir / CHECKPOINT
    _atomic_write(path, lambda p: torch.save(state, p))
    _atomic_write(out_dir / "metrics.json", lambda p: p.write_text(json.dumps(history, indent=2)))
    return path


def load_checkpoint(out_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=False)


def load_model(run_dir: Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, config) of a saved run, built from the run folder alone (no hub access)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .config import TrainConfig
    from .model import MultitaskBert

    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir, map_location=device)
    if state is None or not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no checkpoint here (expected {CHECKPOINT} and config.json)")
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(run_dir / "encoder"))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "encoder")
    model = MultitaskBert(encoder, cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, cfg
