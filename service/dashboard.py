"""optuna-dashboard as search.py --dashboard serves it: read-only unless --dashboard-writable.

The dashboard's API can delete and rename studies, write trial user attributes and notes, and tell
trials; on a shared login node "loopback only" is no boundary (any local user reaches the port). So by
default every request that could change the storage (any method but GET, HEAD and OPTIONS) is refused
with 403 before it reaches the dashboard; `--dashboard-writable` serves it as optuna-dashboard ships.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

logger = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REFUSAL = ("this dashboard is read-only (python search.py --dashboard): it cannot change, rename or delete "
           "studies or trials; restart it with --dashboard-writable to allow that")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def read_only(app: WSGIApp) -> WSGIApp:
    """`app` with every request that is not GET, HEAD or OPTIONS answered 403 (JSON, like the dashboard's)."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method in SAFE_METHODS:
            return app(environ, start_response)
        logger.warning("refused %s %s: the dashboard is read-only", method, environ.get("PATH_INFO", ""))
        body = json.dumps({"reason": REFUSAL}).encode()
        start_response("403 Forbidden", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return guarded


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug(format, *args)


def serve(storage, artifact_store, host: str, port: int, writable: bool = False) -> None:
    """Serve the dashboard on host:port until interrupted (wsgiref, as optuna_dashboard.run_server does)."""
    from optuna_dashboard import wsgi

    app = wsgi(storage, artifact_store=artifact_store)
    serve_app(app if writable else read_only(app), host, port)


def serve_app(app: WSGIApp, host: str, port: int) -> None:
    """Serve `app` until KeyboardInterrupt (Ctrl-C, or SIGTERM as search.py turns it into one).

    The server loop runs in a thread and the main thread only waits: a signal's KeyboardInterrupt is raised
    in the main thread, and wsgiref's request handler catches *every* exception (a bare except) and keeps
    serving, so a SIGTERM that landed while a request was being answered was swallowed and the dashboard
    never stopped."""
    server = make_server(host, port, app, handler_class=_QuietHandler)
    crashed: list[BaseException] = []

    def loop_body() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            crashed.append(exc)

    with server:
        loop = threading.Thread(target=loop_body, name="dashboard", daemon=True)
        loop.start()
        try:
            while loop.is_alive():
                loop.join(0.5)
        finally:
            server.shutdown()  # returns once the request being answered (if any) is done
    if crashed:  # the server loop itself failed: an error, not a silent exit 0
        raise crashed[0]
