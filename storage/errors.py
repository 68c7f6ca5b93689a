"""The storage's errors: each message is one line saying what happened, secret-free."""

from __future__ import annotations

__all__ = ["StorageUnavailable", "StorageConfigError", "StorageOutage", "StorageLost"]


class StorageUnavailable(RuntimeError):
    """The storage cannot be opened; the message names the redacted URL and the reason."""


class StorageConfigError(StorageUnavailable):
    """A storage setting in the environment is malformed; the message names the variable."""


class StorageOutage(StorageUnavailable):
    """The storage stayed unreachable longer than ``MTBERT_STORAGE_OUTAGE_SECONDS``; the message is one line."""


class StorageLost(StorageUnavailable):
    """The storage a run opened is gone: its SQLite file was deleted or replaced, or the study was deleted
    or renamed. Nothing written since is in the storage users will read: an error, never a leaderboard."""
