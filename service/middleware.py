"""The gate every HTTP request passes: request id, body limits, access log, metrics.

A plain ASGI middleware (not ``BaseHTTPMiddleware``) because it runs on every request and must
stay cheap, and because it can refuse an oversized body before a byte of it is read. It also
bounds how long a client may take to send its body (uvicorn has no such timeout), and a client
that disconnects before its answer is counted as status 499 ("client closed request", nginx's
convention), not as a server error. Authentication is a FastAPI dependency (``service.app``).
The access log carries request id, method, route, status and latency, never a body or a query
string: requests hold health data.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from fastapi import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from service.metrics import ServiceMetrics

access_log = logging.getLogger("icu_forecast.service.access")

# The status recorded for a request whose client went away before the answer.
CLIENT_CLOSED = 499
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")


def _is_json(content_type: bytes) -> bool:
    base = content_type.split(b";", 1)[0].strip().lower()
    return base == b"application/json" or base.endswith(b"+json")


class GatewayMiddleware:
    def __init__(
        self,
        app: Any,
        *,
        metrics: ServiceMetrics,
        max_body_bytes: int,
        body_timeout_s: float,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.body_timeout_s = body_timeout_s
        # Requests refused here never reach the router; label them by path when it is one of
        # the app's own (an arbitrary path must not become a metric label).
        self.known_paths: frozenset[str] | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid_in = headers.get(b"x-request-id")
        rid = rid_in if rid_in and _REQUEST_ID.match(rid_in) else uuid.uuid4().hex.encode()
        rid_header = (b"x-request-id", rid)
        path, method = scope["path"], scope["method"]
        status, gone, seen, done = 500, False, 0, False
        deadline = time.monotonic() + self.body_timeout_s

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        async def limited_receive() -> dict:
            # Body bytes are counted as they arrive (a chunked body has no Content-Length to
            # check), and the whole body gets body_timeout_s (a trickling client holds a slot).
            nonlocal gone, seen, done
            if done:  # after the body: waiting for a disconnect has no deadline
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), deadline - time.monotonic())
                except TimeoutError:
                    detail = f"request body not received within {self.body_timeout_s:g} s"
                    raise HTTPException(408, detail) from None
            if message["type"] == "http.disconnect":
                gone = True
            elif message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, f"request body larger than {self.max_body} bytes")
                done = not message.get("more_body", False)
            return message

        try:
            if method in ("POST", "PUT", "PATCH"):
                length = headers.get(b"content-length")
                if length is not None and (not length.isdigit() or int(length) > self.max_body):
                    detail = f"request body larger than {self.max_body} bytes"
                    await JSONResponse({"detail": detail}, 413)(scope, receive, send_with_id)
                    return
                ctype = headers.get(b"content-type")
                if ctype is not None and not _is_json(ctype):
                    detail = "request body must be JSON (Content-Type: application/json)"
                    await JSONResponse({"detail": detail}, 415)(scope, receive, send_with_id)
                    return
            await self.app(scope, limited_receive, send_with_id)
        except ClientDisconnect:
            gone = True  # nobody to answer: not a server error
        finally:
            elapsed = time.perf_counter() - t0
            route = scope.get("route")
            if self.known_paths is None:
                routes = getattr(scope.get("app"), "routes", ())
                self.known_paths = frozenset(getattr(r, "path", "") for r in routes)
            template = getattr(route, "path", None) or (
                path if path in self.known_paths else "unmatched"
            )
            # A client gone while its body was read: whatever answer the app wrote (FastAPI makes
            # the ClientDisconnect a 400), nobody read it.
            status = CLIENT_CLOSED if gone else status
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(template).observe(elapsed)
            access_log.info(
                "request_id=%s method=%s route=%s status=%d latency_ms=%.2f",
                rid.decode(),
                method,
                template,
                status,
                elapsed * 1000,
            )
