"""Scrubbing a storage URL's secrets from every log record."""

from __future__ import annotations

import logging

from storage.urls import scrub, secrets_of

__all__ = ["install_secret_filter"]


class _SecretFilter(logging.Filter):
    """Replaces known secrets in a record's final message (and traceback) by ``***``."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def _scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets or getattr(record, "_mtbert_scrubbed", False):
            return True
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = self._scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self._scrub(record.stack_info)
        record._mtbert_scrubbed = True
        return True


_secret_filter = _SecretFilter()
_base_factory = None


def install_secret_filter(url: str) -> None:
    """Scrub ``url``'s secrets (see :func:`secrets_of`: the password, also as a query parameter) from
    every log record, in any logger or handler. Idempotent.

    Records are scrubbed when created (covers all loggers and handlers added later);
    the filter is also attached to the root logger and its current handlers.
    """
    global _base_factory
    for secret in secrets_of(url):
        if secret not in _secret_filter.secrets:
            _secret_filter.secrets.append(secret)
    _secret_filter.secrets.sort(key=len, reverse=True)

    if _base_factory is None:
        _base_factory = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = _base_factory(*args, **kwargs)
            _secret_filter.filter(record)
            return record

        logging.setLogRecordFactory(factory)
    root = logging.getLogger()
    for target in (root, *root.handlers):
        if _secret_filter not in target.filters:
            target.addFilter(_secret_filter)
