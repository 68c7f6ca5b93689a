"""What a run trains with, by content: the resolved encoder, every resolved setting, the code version.

A study records these when it is created and every joining worker compares its own (service.study
check_identity): a worker with another encoder behind the same name ("default" and
$MTBERT_DEFAULT_MODEL), another TrainConfig default or other training code would change results.
Each hash is computed once per process.
"""
from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any

from .config import TrainConfig, fields_with_role, resolve_model_name

PACKAGE_DIR = Path(__file__).resolve().parent
# the files of a model folder that transformers loads: weights, configs, tokenizer (not READMEs, not .git*)
_MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".pt", ".pth", ".msgpack", ".h5")


def _hash_files(files: list[Path], base: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return f"sha256:{digest.hexdigest()}"


@functools.lru_cache(maxsize=None)
def _folder_hash(folder: str) -> str:
    base = Path(folder)
    files = sorted(p for p in base.iterdir() if p.is_file() and p.suffix in _MODEL_SUFFIXES)
    return _hash_files(files, base)


def _local_folder(name: str) -> Path | None:
    """The folder a model name loads from: a local folder, else its snapshot in the Hugging Face cache."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True)).resolve()
    except Exception:  # not cached, not an id: the loader reports it (ModelLoadError)
        return None


def encoder_identity(model: str) -> dict[str, str]:
    """{"model": as given, "resolved": the folder or id it loads, "sha256": content hash of its weight,
    config and tokenizer files} ("sha256" is "unknown" where the folder cannot be found)."""
    name = resolve_model_name(model)
    folder = _local_folder(name)
    return {"model": model, "resolved": str(folder or name),
            "sha256": _folder_hash(str(folder)) if folder is not None else "unknown"}


@functools.lru_cache(maxsize=None)
def code_version() -> dict[str, str | None]:
    """{"sha256": hash of the training library's sources (mtbert/*.py), "commit": the git commit, if any}.
    The hash is what is compared: a commit that changes no training code changes no result."""
    source = _hash_files(sorted(PACKAGE_DIR.glob("*.py")), PACKAGE_DIR)
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"sha256": source, "commit": commit}


def result_settings(cfg: TrainConfig, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every resolved TrainConfig value that decides a result, but `skip` (speed-only and runtime fields,
    the model, which is compared by content, and the data, compared by mtbert.tasks.data_fingerprint)."""
    by_content = fields_with_role("encoder", "data")
    return {k: v for k, v in cfg.to_dict().items() if k not in skip and k not in by_content}
