"""Storage settings read from the environment: heartbeats, retries, the outage limit."""

from __future__ import annotations

import math
import os

from storage.errors import StorageConfigError

__all__ = ["env_number", "heartbeat_settings", "outage_seconds"]


def env_number(name: str, default: float, minimum: float, integer: bool = True) -> float:
    """The number in env ``name`` (``default`` when unset or empty); :class:`StorageConfigError` when it
    is not a finite number >= ``minimum`` (a whole number with ``integer``)."""
    text = (os.environ.get(name) or "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum:
        kind = "a whole number" if integer else "a number"
        raise StorageConfigError(f"{name}={text!r}: must be {kind} >= {minimum:g}")
    return value


def heartbeat_settings() -> tuple[int, int, int]:
    """(interval, grace, max_retry) from ``MTBERT_HEARTBEAT_INTERVAL`` (30 s), ``MTBERT_HEARTBEAT_GRACE``
    (120 s, more than the interval) and ``MTBERT_MAX_RETRY`` (3); StorageConfigError when malformed."""
    interval = env_number("MTBERT_HEARTBEAT_INTERVAL", 30, 1)
    grace = env_number("MTBERT_HEARTBEAT_GRACE", 120, 1)
    if grace <= interval:
        raise StorageConfigError(f"MTBERT_HEARTBEAT_GRACE={grace} must be more than MTBERT_HEARTBEAT_INTERVAL="
                                 f"{interval}: a live worker's trial would be taken for dead")
    return interval, grace, env_number("MTBERT_MAX_RETRY", 3, 0)


def outage_seconds() -> float:
    """How long a process waits for an unreachable storage before giving up (``MTBERT_STORAGE_OUTAGE_SECONDS``,
    default 120 s; 0: give up at once)."""
    return env_number("MTBERT_STORAGE_OUTAGE_SECONDS", 120, 0, integer=False)
