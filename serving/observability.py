"""What operators see of each HTTP request: its metrics by route template, and its id in every log line.

A pure ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, so that a streamed answer is neither
buffered nor cut short: its duration runs to the last byte. ``/metrics`` is a plain route, which answers 200
where a mounted app answered 307 to ``/metrics/``.
"""

from __future__ import annotations

import secrets
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from liveloop.logs import log_context
from serving import metrics

UNMATCHED = "unmatched"  # the route label of a request no route took (a 404 on an unknown path)
REQUEST_ID_HEADER = "x-request-id"


class RequestObservability:
    """Counts and times each HTTP request by route template, method and status; gives it a request id (the
    client's ``X-Request-ID`` or a new one), returned in the response and carried by every log line it causes."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500  # an exception before any response is a 500
        headers = dict(scope["headers"])
        request_id = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")[:200] or secrets.token_hex(8)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode("latin-1"))]
            await send(message)

        try:
            with log_context(request_id=request_id):
                await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)
            metrics.HTTP_REQUESTS.labels(route, scope["method"], str(status)).inc()
            metrics.HTTP_DURATION.labels(route, scope["method"]).observe(time.perf_counter() - started)


def metrics_endpoint(request: Request) -> Response:
    """The process's Prometheus metrics (the default registry)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
