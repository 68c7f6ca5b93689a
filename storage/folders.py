"""The storage folder and the artifact and checkpoint folders under it (or under a shared folder)."""

from __future__ import annotations

import os
from pathlib import Path

import optuna

from storage.errors import StorageConfigError

__all__ = ["STORAGE_DIR", "artifact_store", "checkpoint_dir"]

# the default SQLite file, worker logs, trials CSVs, artifacts and checkpoints: storage/, or $MTBERT_STORAGE_DIR
# (the test suite points it at a temporary folder, so that it never writes into a user's storage/)
STORAGE_DIR: Path = Path(os.environ.get("MTBERT_STORAGE_DIR") or Path(__file__).resolve().parent).expanduser().resolve()


def _folder(variable: str, sub: str) -> Path:
    """``$MTBERT_SHARED_DIR/<sub>`` when that is set (cluster/slurm/worker.sbatch gives its tasks the
    same, so commands run afterwards on a login node find what the tasks wrote), else the folder in env
    ``variable``, else ``storage/<sub>``; created. StorageConfigError when it cannot be."""
    if os.environ.get("MTBERT_SHARED_DIR"):
        source, path = "MTBERT_SHARED_DIR", Path(os.environ["MTBERT_SHARED_DIR"]) / sub
    elif os.environ.get(variable):
        source, path = variable, Path(os.environ[variable])
    else:
        source, path = variable, STORAGE_DIR / sub
    path = path.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageConfigError(f"{source}: {str(path)!r}: cannot create the folder ({exc.strerror or exc})") \
            from None
    return path


def artifact_store() -> optuna.artifacts.FileSystemArtifactStore:
    """Artifact store under ``$MTBERT_SHARED_DIR/artifacts``, ``MTBERT_ARTIFACT_DIR`` or ``storage/artifacts``."""
    return optuna.artifacts.FileSystemArtifactStore(str(_folder("MTBERT_ARTIFACT_DIR", "artifacts")))


def checkpoint_dir() -> Path:
    """``$MTBERT_SHARED_DIR/checkpoints``, ``MTBERT_CHECKPOINT_DIR`` or ``storage/checkpoints`` (created)."""
    return _folder("MTBERT_CHECKPOINT_DIR", "checkpoints")
