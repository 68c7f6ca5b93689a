"""Checkpoints: one self-contained folder per run, rewritten atomically after every epoch.

Layout of a run folder:
    checkpoint.pt   model, optimizer, scheduler, RNG states, epoch, step, metrics history, run identity
    config.json     the TrainConfig of the run
    run.json        the run identity (for people; the one that is checked is inside checkpoint.pt)
    encoder/        the encoder's HF config and the tokenizer, so a checkpoint loads offline
    metrics.json    the per-epoch dev metrics (also inside checkpoint.pt)

A run's identity is the caller's optional `run_id` plus the training settings that decide its result
(`run_settings`). It is stored inside checkpoint.pt, so it is replaced atomically with the weights it
describes; a resume compares it with the new run's and refuses another run's checkpoint
(`RunMismatch`). An unreadable checkpoint is `CheckpointUnreadable`; both are `ResumeError`.

Every write goes to a temp file that is renamed over the target (the temp file is removed on every
failure path), and a checkpoint write holds SIGINT/SIGTERM until it is complete (`deferred_signals`),
so a stop signal never costs the epoch being saved. Running out of disk is `CheckpointWriteError`
"no space left on device at FOLDER".
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SPEED_FIELDS, fields_with_role

CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.json"
IDENTITY_VERSION = 1

# What a resume compares: every TrainConfig field but the speed settings (mtbert.config.ROLES: they may differ
# between a run and its resume, e.g. a retry on another node or GPU); `model` by its resolved name (the
# "default" sentinel by what it resolves to) and `data_dir` by the content of its train and dev files (same
# data at another path still matches). A new field decides the result unless its declared role says otherwise.

logger = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """The checkpoint in a run folder cannot be resumed by this run."""


class RunMismatch(ResumeError):
    """The run folder holds another run's checkpoint; `differences` names the settings that differ."""

    def __init__(self, out_dir: Path, differences: dict[str, tuple[Any, Any]]):
        shown = "; ".join(f"{k}: {_short(there)} there, {_short(here)} here" for k, (there, here) in differences.items())
        super().__init__(f"{out_dir} holds the checkpoint of another run ({shown})")
        self.out_dir, self.differences = out_dir, differences


class CheckpointUnreadable(ResumeError):
    """checkpoint.pt exists but cannot be read (torn, truncated, corrupt or from an unknown format)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written (disk full, permissions, I/O error); nothing was replaced."""


def _short(value: Any) -> str:
    text = "none" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------ identity


def run_settings(cfg) -> dict[str, Any]:
    """The settings of a TrainConfig that decide a run's result (see SPEED_FIELDS)."""
    from .config import resolve_data_dir, resolve_model_name
    from .tasks import data_fingerprint

    compared_by_content = fields_with_role("encoder", "data")
    settings = {k: v for k, v in cfg.to_dict().items() if k not in SPEED_FIELDS | compared_by_content}
    settings["model"] = resolve_model_name(cfg.model)
    settings["data"] = data_fingerprint(resolve_data_dir(cfg.data_dir))
    return settings


def run_identity(cfg, run_id: str | None = None) -> dict[str, Any]:
    return {"version": IDENTITY_VERSION, "run_id": run_id, "settings": run_settings(cfg)}


def identity_differences(stored: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What differs between a checkpoint's identity and this run's: {name: (there, here)}; empty = same run."""
    if not isinstance(stored, dict) or stored.get("version") != IDENTITY_VERSION:
        return {"run identity": ("none (written by an older version)" if stored is None else "unknown format",
                                 "required")}
    diffs: dict[str, tuple[Any, Any]] = {}
    if stored.get("run_id") != current["run_id"]:
        diffs["run id"] = (stored.get("run_id"), current["run_id"])
    there, here = stored.get("settings") or {}, current["settings"]
    for key in sorted(set(there) | set(here)):
        if there.get(key, "<unset>") != here.get(key, "<unset>"):
            diffs[key] = (there.get(key, "<unset>"), here.get(key, "<unset>"))
    if "data" in diffs:  # hashes mean nothing to people
        diffs["data"] = ("other train/dev files", "these")
    return diffs


def verify_identity(out_dir: Path, state: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise RunMismatch unless the checkpoint `state` was written by the run `identity` describes."""
    diffs = identity_differences(state.get("identity"), identity)
    if diffs:
        raise RunMismatch(Path(out_dir), diffs)


def checkpoint_identity(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run identity inside a run folder's checkpoint.pt (memory-mapped: the weights are not read)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = safe_load(path, map_location="cpu", mmap=True)
    except CheckpointUnreadable:
        raise
    except Exception as exc:
        raise CheckpointUnreadable(f"{path}: unreadable checkpoint ({type(exc).__name__}: {_first_line(exc)})") \
            from None
    return state.get("identity") if isinstance(state, dict) else None


def safe_load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings and containers only, never code.

    A file that needs anything else (a planted pickle payload, or a checkpoint written before RNG states
    were stored as tensors) is CheckpointUnreadable with one line; nothing in it is run.
    """
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        # an object weights-only unpickling does not allow (a class, a function call) names its GLOBAL;
        # anything else is garbage or a torn file: the caller's "unreadable checkpoint"
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            raise CheckpointUnreadable(f"{path}: unreadable checkpoint (UnpicklingError: "
                                       f"{detail.group(1).strip() if detail else 'not a torch file'})") from None
        what = f" (it asks for {found.group(1)})"  # not torch's text: it advises weights_only=False
        raise CheckpointUnreadable(
            f"{path}: refused to load: it holds objects other than tensors and plain data, so reading it could "
            f"run code (a tampered file, or one written by an older mtbert version); nothing in it was run. "
            f"Delete it to retrain from scratch{what}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:200]


# ------------------------------------------------------------------ RNG


# Stored as tensors and plain numbers only, so a checkpoint loads with torch.load(weights_only=True):
# numpy's state holds an ndarray, which weights-only unpickling refuses (rightly: it needs numpy's
# reconstructors); the Mersenne Twister keys go in as int64 tensors instead.
def rng_states() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
              "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    py, nps = states["python"], states["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------ writing


@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs, then deliver them as they would have been.

    Python runs signal handlers in the main thread between bytecodes, whichever thread the OS
    delivered the signal to, so masking the main thread alone (pthread_sigmask) does not stop a
    handler from raising in the middle of a write while other threads (a heartbeat, tokenizers)
    exist. Instead the block's handlers only record the signal; when the block ends the previous
    handlers are back and each recorded signal is raised again: a worker's handler hands its trial
    back, Ctrl-C raises KeyboardInterrupt, a default SIGTERM ends the process — right after the write.
    Only the main thread can change handlers; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    for signum in signums:
        handler = signal.getsignal(signum)
        if handler is None:  # installed outside Python: cannot be put back, leave it alone
            continue
        previous[signum] = signal.signal(signum, lambda s, _frame: pending.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            logger.info("%s arrived during a checkpoint write; delivered now that the write is complete",
                        signal.Signals(signum).name)
            signal.raise_signal(signum)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _write_error(path: Path, exc: BaseException) -> CheckpointWriteError:
    """One clear error for a failed write; disk full (and quota) name the folder."""
    code = getattr(exc, "errno", None)
    # torch's zip writer reports a short write to a path as "unexpected pos N vs M"; we hand it a Python
    # file (whose write raises OSError with errno), but keep the message right if it ever shows up
    torch_short_write = isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc)
                                                           or "file write failed" in str(exc))
    if code in (errno.ENOSPC, errno.EDQUOT) or torch_short_write:
        return CheckpointWriteError(f"no space left on device at {path.parent} (writing {path.name})")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc) or type(exc).__name__
    return CheckpointWriteError(f"cannot write {path}: {reason}")


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False, sync: bool = False) -> None:
    """write(file) into a temp file next to `path`, then rename it over `path`; the temp file never survives."""
    tmp = _tmp_name(path)
    try:
        try:
            with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
                write(f)
                f.flush()
                if sync:  # the rename must not reach the disk before the data (power loss)
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            raise _write_error(path, exc) from None
    finally:  # every failure path, KeyboardInterrupt and the worker's interrupt included
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_stale_temp_files(out_dir: Path) -> None:
    """Temp files of this host's dead processes (killed mid-write, e.g. SIGKILL); others' are left alone."""
    mine = re.compile(rf"\.{re.escape(socket.gethostname())}\.(\d+)\.tmp$")  # .NAME.HOST.PID.tmp
    for tmp in Path(out_dir).glob(".*.tmp"):
        match = mine.search(tmp.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # that process is alive
        except ProcessLookupError:
            pass
        except OSError:
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            logger.info("removed %s, left by a process that died while writing", tmp)


def write_run_files(out_dir: Path, config: dict[str, Any], encoder, tokenizer,
                    identity: dict[str, Any] | None = None) -> None:
    """What a checkpoint needs besides the weights; written once at the start of a fresh run.

    A checkpoint left in the folder by an earlier run is removed first: from here on the folder is
    this run's, and a crash before its first epoch must not leave the old weights to be resumed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (CHECKPOINT, "metrics.json"):
        (out_dir / stale).unlink(missing_ok=True)
    _atomic_write(out_dir / "config.json", lambda f: f.write(json.dumps(config, indent=2)))
    if identity is not None:
        _atomic_write(out_dir / RUN_FILE, lambda f: f.write(json.dumps(identity, indent=2)))
    try:
        encoder.config.save_pretrained(out_dir / "encoder")
        tokenizer.save_pretrained(out_dir / "encoder")
    except OSError as exc:
        raise _write_error(out_dir / "encoder", exc) from None


def save_checkpoint(out_dir: Path, *, model, optimizer, scheduler, epoch: int, step: int,
                    history: list[dict[str, Any]], identity: dict[str, Any] | None = None) -> Path:
    """Write the run's state after `epoch`: both files, or (on any failure) neither, never half of one.

    SIGINT/SIGTERM wait until the write is complete (deferred_signals).
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_states(),
        "epoch": epoch,
        "step": step,
        "history": history,
        "identity": identity,
    }
    path = out_dir / CHECKPOINT
    with deferred_signals():
        _atomic_write(path, lambda f: torch.save(state, f), binary=True, sync=True)
        _atomic_write(out_dir / "metrics.json", lambda f: f.write(json.dumps(history, indent=2)))
    return path


# ------------------------------------------------------------------ reading

_STATE_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "step", "history")


def load_checkpoint(out_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state in out_dir/checkpoint.pt, None if there is none; CheckpointUnreadable if it is damaged."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = safe_load(path, map_location=map_location)
    except CheckpointUnreadable:
        raise
    except Exception as exc:  # torn zip, truncated pickle, garbage: every way a file can be damaged
        raise CheckpointUnreadable(f"{path}: unreadable checkpoint ({type(exc).__name__}: {_first_line(exc)})") \
            from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointUnreadable(f"{path}: not a checkpoint of mtbert.train (missing {', '.join(missing)})")
    return state


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
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointUnreadable(f"{run_dir / CHECKPOINT}: its weights do not fit its config.json "
                                   f"({_first_line(exc)})") from None
    return model.to(device).eval(), tokenizer, cfg
