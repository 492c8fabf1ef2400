"""The HTTP API as a Starlette (ASGI) application; `kd2edge.runtime.serve` runs it with uvicorn.

Routes:
    POST /v1/answer  {"question": str, "context": str} -> {"answer": str, "latency_ms": float}
    GET  /healthz    -> {"status": "ok", "model": ..., "providers": [...], "notes": [...], "max_new_tokens": n}
    GET  /metrics    -> Prometheus text (OpenMetrics when asked); `?format=json` for a JSON summary

Errors are JSON `{"error": message, "status": code}`: 400 invalid JSON / fields, 404 unknown
route, 405 wrong method (with Allow), 408 body not sent in time, 411 no Content-Length, 413
body (or prompt) too large, 415 not JSON, 500 the model failed, 503 queue full (with Retry-After).

Generation is blocking work (onnxruntime releases the GIL while it runs): it runs on one
worker thread, so requests generate one at a time and in arrival order, while the event
loop keeps accepting connections and answering /healthz and /metrics. Tokenizing runs in
Starlette's thread pool. The body limit is the Content-Length header, checked before
anything is read: h11 (uvicorn's HTTP parser) delivers exactly that many bytes, and chunked
bodies are refused (411), so no request can send more.

Imports only the standard library, starlette and kd2edge.runtime modules: it runs in the image.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kd2edge.errors import Kd2EdgeError
from kd2edge.runtime.metrics import ServerMetrics, route_label
from kd2edge.runtime.service import AnswerService, RequestError, parse_answer_request

MAX_BODY_BYTES = 64 * 1024      # a question plus a few pages of context
BODY_TIMEOUT_S = 30.0           # a client has this long to send its body once its headers are in
DRAIN_LIMIT_BYTES = 1 << 20     # a refused body up to this size is read first (see _drain)
ROUTES = {"/v1/answer": "POST", "/healthz": "GET", "/metrics": "GET"}
LOG_FORMATS = ("text", "json")
_STARTED = "kd2edge.started"    # scope keys this module sets: request start (perf_counter) ...
_LATENCY = "kd2edge.latency_s"  # ... an answered question's latency, for the metrics ...
_TOKENS = "kd2edge.tokens"      # ... and its generated tokens, for the access log


def runtime_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a model may raise on a valid request: kd2edge's own, and onnxruntime's.

    onnxruntime's exceptions (Fail, InvalidArgument, RuntimeException, ...) derive from
    Exception, not RuntimeError, so they are named one by one.

    Returns:
        A tuple for an `except` clause.
    """
    errors: list[type[BaseException]] = [Kd2EdgeError, RuntimeError, ValueError, OSError]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:
        return tuple(errors)
    errors += [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    return tuple(errors)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error reply every refusal uses: `{"error": message, "status": status}`."""
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def log_line(fmt: str, client: str, method: str, path: str, status: int, duration_s: float,
             extra: dict[str, Any] | None = None) -> str:
    """One access-log line for a finished request.

    Args:
        fmt: "text" (`client "METHOD path" status duration`) or "json" (one JSON object).
        client: the client's address.
        method, path, status: the request line and the status sent.
        duration_s: seconds from the request's arrival to its last byte sent.
        extra: more fields for the JSON line (tokens, error).

    Returns:
        The line, without a newline.
    """
    if fmt == "json":
        record = {"ts": round(time.time(), 3), "client": client, "method": method, "path": path,
                  "status": status, "duration_ms": round(duration_s * 1000, 3), **(extra or {})}
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return f'{client} "{method} {path}" {status} {duration_s * 1000:.1f} ms'


class RequestRecorder:
    """ASGI middleware: counts every request in the metrics and writes its access-log line.

    Args:
        app: the application it wraps.
        metrics: where requests are counted.
        log_format: "text", "json" or None (no access log).
        write: where log lines go (default: stderr).
    """

    def __init__(self, app, metrics: ServerMetrics, log_format: str | None = "text",
                 write: Callable[[str], None] | None = None):
        self.app = app
        self.metrics = metrics
        self.log_format = log_format
        self.write = write or _write_stderr

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[_STARTED] = time.perf_counter()
        sent = {"status": 500}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            duration = time.perf_counter() - scope[_STARTED]
            status = sent["status"]
            self.metrics.record(route_label(scope["path"], tuple(ROUTES)), status, scope.get(_LATENCY))
            if self.log_format:
                client = scope.get("client") or ("-", 0)
                extra = {"tokens": scope[_TOKENS]} if _TOKENS in scope else None
                self.write(log_line(self.log_format, str(client[0]), scope["method"], scope["path"], status,
                                    duration, extra))


def _write_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body of a JSON request, refused before reading when it cannot be one the server takes.

    Args:
        request: the request.
        max_bytes: the largest Content-Length accepted.
        timeout_s: how long the client may take to send the body.

    Returns:
        The body bytes.

    Raises:
        RequestError: 415 not JSON, 411 chunked or no Content-Length, 400 a bad Content-Length or a
            client gone before its body arrived, 413 too large, 408 not sent within `timeout_s`.
    """
    headers = request.headers
    ctype = headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, got {ctype}")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise RequestError(411, "chunked bodies are not accepted: send a Content-Length")
    length = headers.get("content-length")
    if length is None:
        raise RequestError(411, "missing Content-Length header")
    try:
        size = int(length)
    except ValueError:
        raise RequestError(400, f"Content-Length {length!r} is not a number") from None
    if size > max_bytes:
        await _drain(request, size, timeout_s)
        raise RequestError(413, f"body is {size} bytes; the limit is {max_bytes}: shorten the context")
    try:
        return await asyncio.wait_for(request.body(), timeout_s)
    except asyncio.TimeoutError:
        # Close the connection: the rest of this body would otherwise be read as the next request.
        raise RequestError(408, f"the body did not arrive within {timeout_s:.0f} s: send the whole request at once",
                           headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected before sending its whole body") from None


async def _drain(request: Request, size: int, timeout_s: float) -> None:
    """Read and drop a refused body of up to DRAIN_LIMIT_BYTES before replying.

    A client that sent `Connection: close` (urllib does) gets its connection closed after the
    reply; closing a socket with unread data resets it, and the client would lose the 413.
    """
    if size > DRAIN_LIMIT_BYTES:
        return

    async def drain() -> None:
        async for _ in request.stream():
            pass

    try:
        await asyncio.wait_for(drain(), timeout_s)
    except (asyncio.TimeoutError, ClientDisconnect):
        pass  # the 413 is sent anyway; this client is slow or gone


def make_app(service: AnswerService, metrics: ServerMetrics, max_body_bytes: int = MAX_BODY_BYTES,
             body_timeout_s: float = BODY_TIMEOUT_S, log_format: str | None = "text",
             write_log: Callable[[str], None] | None = None) -> Starlette:
    """The ASGI application serving `service`.

    Args:
        service: answers questions (the bounded queue and the one-at-a-time rule live there).
        metrics: the server's metrics, counted by every request and shown at /metrics.
        max_body_bytes: the largest request body accepted (413 beyond).
        body_timeout_s: how long a client may take to send its body (408 beyond).
        log_format: access log: "text", "json" (one JSON object per line) or None (off).
        write_log: where log lines go (default: stderr).

    Returns:
        A Starlette application; its lifespan starts and stops the generation thread.
    """
    if log_format is not None and log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS} or None, got {log_format!r}")
    failures = runtime_errors()
    state: dict[str, ThreadPoolExecutor] = {}

    @asynccontextmanager
    async def lifespan(app):
        # One thread: generations run one at a time, in the order requests were admitted.
        state["executor"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd2edge-generate")
        try:
            yield
        finally:
            state.pop("executor").shutdown(wait=True)

    async def answer(request: Request) -> Response:
        # The wait for the model counts from the request's arrival (perf_counter -> monotonic clock).
        arrived = time.monotonic() - (time.perf_counter() - request.scope[_STARTED])
        question, context = parse_answer_request(await read_body(request, max_body_bytes, body_timeout_s))
        try:
            # Admission first: a refusal under load costs no tokenizing and no thread hop.
            with service.admit():
                ids = await run_in_threadpool(service.prompt_ids, question, context)
                loop = asyncio.get_running_loop()
                generation = await loop.run_in_executor(state["executor"], service.generate, ids, arrived)
            text = service.extract(generation.text)
        except RequestError:
            raise
        except failures as e:
            # The runtime failed on a valid request: answer 500 and log it, instead of dropping the connection.
            _write_stderr(f"kd2edge serve: error answering {request.url.path}: {type(e).__name__}: {e}")
            return error_response(500, f"the model failed on this request: {type(e).__name__}")
        latency = time.perf_counter() - request.scope[_STARTED]
        request.scope[_LATENCY] = latency
        request.scope[_TOKENS] = len(generation.tokens)
        metrics.record_tokens(generation.prompt_tokens, len(generation.tokens))
        return JSONResponse({"answer": text, "latency_ms": round(latency * 1000, 3)})

    async def healthz(request: Request) -> Response:
        return JSONResponse(service.health())

    async def metrics_view(request: Request) -> Response:
        fmt = request.query_params.get("format", "prometheus")
        if fmt == "json":
            return JSONResponse(metrics.snapshot())
        if fmt not in ("prometheus", "text"):
            raise RequestError(400, f"format={fmt} is not known: use format=json, or none for Prometheus text")
        body, content_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type})

    async def refused(request: Request, exc: RequestError) -> Response:
        return error_response(exc.status, exc.message, exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        # Starlette's router raises these for unknown routes and wrong methods.
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            message = f"no route {path}: use POST /v1/answer, GET /healthz or GET /metrics"
        elif exc.status_code == 405:
            message = f"{path} accepts {ROUTES.get(path, 'another method')} only, not {method}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    app = Starlette(routes=[Route("/v1/answer", answer, methods=["POST"]), Route("/healthz", healthz, methods=["GET"]),
                            Route("/metrics", metrics_view, methods=["GET"])],
                    middleware=[Middleware(RequestRecorder, metrics=metrics, log_format=log_format, write=write_log)],
                    exception_handlers={RequestError: refused, HTTPException: http_error}, lifespan=lifespan)
    return app
