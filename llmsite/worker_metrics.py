"""Prometheus figures of a Celery worker: pool processes write them to files, one HTTP port serves the sum.

prometheus_client's multiprocess mode: every process of the worker records into files under
PROMETHEUS_MULTIPROC_DIR, and the worker's main process answers scrapes with their total. The
port asks for the same bearer token as the web's /metrics (and, with DEBUG off, refuses without one).
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

logger = logging.getLogger("llmsite.worker_metrics")


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # each scrape would otherwise print a plain-text access line


def multiprocess_dir() -> Path:
    """The files' folder, emptied: counts left by an earlier run would be added to this one's."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    folder = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="llmsite-worker-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    # Pool processes forked from here inherit the variable; values made from now on go to files.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    return folder


def metrics_app(folder: Path):
    """WSGI app: the pool's summed metrics, behind the metrics token."""
    from django.conf import settings
    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    exposition = make_wsgi_app(registry)

    def app(environ, start_response):
        token = settings.METRICS_TOKEN
        if token or not settings.METRICS_OPEN_WITHOUT_TOKEN:
            sent = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").strip()
            if not token or not hmac.compare_digest(sent.encode(), token.encode()):
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"Send the metrics token as 'Authorization: Bearer <token>' (METRICS_TOKEN).\n"]
        return exposition(environ, start_response)

    return app


def worker_metrics_serve(*, host: str, port: int) -> None:
    folder = multiprocess_dir()
    server = make_server(host, port, metrics_app(folder), handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, name="worker-metrics", daemon=True).start()
    logger.info("worker metrics on http://%s:%s/metrics", host, port)
