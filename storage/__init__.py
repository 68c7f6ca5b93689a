"""Storage for mtbert-search: every storage URL and engine setting lives here.

Workers share one Optuna study in SQL storage: SQLite (one machine, the default)
or PostgreSQL (many nodes; see ``storage/postgres.sh``). One module per concern:

- ``storage.urls``: which URL a command opens, how it reaches the processes it starts, redaction and secrets
- ``storage.settings``: heartbeat, retry and outage settings from the environment
- ``storage.engines``: opening a storage (engine settings per backend) and checking it is still there
- ``storage.outage``: riding out an unreachable storage (RetryingRDBStorage)
- ``storage.locks``: the per-study trial-slot lock and the table-creation lock
- ``storage.folders``: the storage folder, artifact and checkpoint folders
- ``storage.secret_filter``: scrubbing a URL's secrets from every log record
- ``storage.errors``: the storage's errors
- ``storage.optuna_compat``: the Optuna internals the service relies on, in one place

The public names are re-exported here: ``import storage; storage.open_storage(...)``.
"""

from __future__ import annotations

from storage import optuna_compat
from storage.engines import check_storage, open_storage
from storage.errors import StorageConfigError, StorageLost, StorageOutage, StorageUnavailable
from storage.folders import STORAGE_DIR, artifact_store, checkpoint_dir
from storage.locks import trial_slot_lock
from storage.outage import RetryingRDBStorage, is_connection_error
from storage.secret_filter import install_secret_filter
from storage.settings import env_number, heartbeat_settings, outage_seconds
from storage.urls import (DEFAULT_URL, add_storage_arguments, normalize_url, read_url_file, redact, resolve_url,
                          secrets_of, worker_environment)

__all__ = [
    "STORAGE_DIR",
    "DEFAULT_URL",
    "StorageUnavailable",
    "StorageConfigError",
    "StorageOutage",
    "RetryingRDBStorage",
    "is_connection_error",
    "env_number",
    "heartbeat_settings",
    "outage_seconds",
    "resolve_url",
    "normalize_url",
    "secrets_of",
    "read_url_file",
    "add_storage_arguments",
    "worker_environment",
    "redact",
    "open_storage",
    "trial_slot_lock",
    "StorageLost",
    "check_storage",
    "artifact_store",
    "checkpoint_dir",
    "install_secret_filter",
    "optuna_compat",
]
