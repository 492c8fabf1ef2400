"""An HTTP JSON server that answers questions with an exported artifact.

Routes:
    POST /v1/answer  {"question": str, "context": str} -> {"answer": str, "latency_ms": float}
    GET  /healthz    -> {"status": "ok", "model": ..., "providers": [...], "notes": [...]}
    GET  /metrics    -> request counts by status, latency p50/p95, in-flight and queued requests

Errors are JSON `{"error": message, "status": code}`: 400 invalid JSON / fields, 404
unknown route, 405 wrong method, 411 no Content-Length, 413 body (or prompt) too
large, 415 not JSON, 503 queue full.

One model, one KV cache: generation runs behind a lock, one request at a time, so
two requests are never interleaved on the same cache. At most `max_queue` requests
wait behind the running one; beyond that the server answers 503 at once instead of
piling up threads. SIGTERM (or Ctrl-C) stops accepting, finishes the requests in
flight and returns, so the process exits 0.

This module is torch-free (stdlib + kd2edge.runtime.lm): it runs in the Docker image.
The prompt is the one evaluation scores (`kd2edge.data.prompts`), so a served answer
is the answer the QA figures were measured on.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from kd2edge.errors import Kd2EdgeError, ResourceError
from kd2edge.runtime.stats import percentile

MAX_BODY_BYTES = 64 * 1024      # a question plus a few pages of context
LATENCY_WINDOW = 2048           # latencies kept for p50/p95 (the most recent answers)
ANSWER_FIELDS = ("question", "context")
ROUTES = {"/v1/answer": "POST", "/healthz": "GET", "/metrics": "GET"}
READY_LINE = "kd2edge serve: listening on http://{host}:{port}"


class RequestError(Exception):
    """A request the server refuses: carries the HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = headers or {}


def parse_answer_request(body: bytes) -> tuple[str, str]:
    """Validate a `/v1/answer` body.

    Args:
        body: the raw request body.

    Returns:
        (question, context); the question is stripped and non-empty.

    Raises:
        RequestError: 400 naming what is wrong (invalid JSON or UTF-8, not an object,
            missing / unknown / non-string fields, empty question).
    """
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "body is not UTF-8: send JSON text encoded as UTF-8") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"body is not valid JSON ({e.msg} at character {e.pos}): "
                                'send {"question": "...", "context": "..."}') from None
    if not isinstance(data, dict):
        raise RequestError(400, f'body must be a JSON object, got {type(data).__name__}: '
                                'send {"question": "...", "context": "..."}')
    problems = [f"missing field '{k}'" for k in ANSWER_FIELDS if k not in data]
    problems += [f"field '{k}' must be a string, got {type(data[k]).__name__}"
                 for k in ANSWER_FIELDS if k in data and not isinstance(data[k], str)]
    problems += [f"unknown field '{k}' (allowed: {', '.join(ANSWER_FIELDS)})" for k in data if k not in ANSWER_FIELDS]
    if not problems and not data["question"].strip():
        problems.append("field 'question' is empty")
    if problems:
        raise RequestError(400, "; ".join(problems))
    return data["question"].strip(), data["context"]


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50_ms: float | None
    p95_ms: float | None


def latency_summary(latencies_s: list[float]) -> LatencySummary:
    """p50 and p95 in milliseconds (linear interpolation, as numpy); None without data."""
    if not latencies_s:
        return LatencySummary(0, None, None)
    return LatencySummary(len(latencies_s), round(percentile(latencies_s, 50) * 1000, 3),
                          round(percentile(latencies_s, 95) * 1000, 3))


class ServerMetrics:
    """Thread-safe request counters and a window of recent answer latencies."""

    def __init__(self, window: int = LATENCY_WINDOW):
        self._lock = threading.Lock()
        self._by_status: Counter[int] = Counter()
        self._by_route: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=window)
        self._started = time.monotonic()

    def record(self, route: str, status: int, latency_s: float | None = None) -> None:
        """Count one finished request; `latency_s` only for answered `/v1/answer` requests."""
        with self._lock:
            self._by_status[status] += 1
            self._by_route[route] += 1
            if latency_s is not None:
                self._latencies.append(latency_s)

    def snapshot(self, extra: dict[str, Any] | None = None) -> dict:
        with self._lock:
            by_status = {str(k): v for k, v in sorted(self._by_status.items())}
            by_route = dict(sorted(self._by_route.items()))
            latencies = list(self._latencies)
        summary = latency_summary(latencies)
        return {
            "requests": {"total": sum(by_status.values()), "by_status": by_status, "by_route": by_route},
            "latency_ms": {"p50": summary.p50_ms, "p95": summary.p95_ms, "window": summary.count},
            "uptime_s": round(time.monotonic() - self._started, 3),
            **(extra or {}),
        }


class AnswerService:
    """Answers questions with one model, one request at a time, behind a bounded queue.

    Args:
        model: an object with the runtime's interface (`kd2edge.runtime.OnnxLM`):
            `format_prompt`, `encode`, `generate`, `providers`, `notes`.
        max_new_tokens: tokens generated per answer (greedy, so answers are deterministic).
        max_queue: requests allowed to wait behind the running one before 503.
        context_length: the token window served (at most the model's); longer prompts get 413.
        name: what /healthz calls the model.
    """

    def __init__(self, model: Any, max_new_tokens: int = 24, max_queue: int = 8,
                 context_length: int = 2048, name: str = "model"):
        from kd2edge.data.prompts import build_prompt, extract_answer
        from kd2edge.data.items import QAItem

        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.max_queue = int(max_queue)
        self.context_length = min(int(context_length), int(getattr(model, "context_length", context_length)))
        self.name = name
        self._build_prompt, self._extract_answer, self._item = build_prompt, extract_answer, QAItem
        self._generate_lock = threading.Lock()
        # Slots = the running request + the waiting ones; a request that finds none is refused.
        self._slots = threading.BoundedSemaphore(self.max_queue + 1)
        self._state_lock = threading.Lock()
        self._waiting = 0
        self._running = 0

    def prompt_ids(self, question: str, context: str) -> list[int]:
        """Token ids of the evaluation's zero-shot prompt for this question, as `kd2edge evaluate`
        encodes it for an ONNX artifact: chat template applied, and the tokenizer's special
        tokens (a BOS) added only when there is no template to hold them."""
        item = self._item(id="request", question=question, context=context)
        text = self.model.format_prompt(self._build_prompt(item))
        return list(self.model.encode(text, add_special_tokens=not getattr(self.model, "chat_template", None)))

    def answer(self, question: str, context: str) -> str:
        """The model's answer to one question (greedy decoding).

        Raises:
            RequestError: 413 when the prompt does not fit the context window,
                503 when the queue is full.
        """
        ids = self.prompt_ids(question, context)
        limit = self.context_length - self.max_new_tokens
        if len(ids) > limit:
            raise RequestError(413, f"question and context are {len(ids)} tokens; this server accepts at most "
                                    f"{limit} (context length {self.context_length} - {self.max_new_tokens} "
                                    f"new tokens): shorten the context")
        if not self._slots.acquire(blocking=False):
            raise RequestError(503, f"server busy: {self.max_queue} requests already waiting, retry shortly",
                               headers={"Retry-After": "1"})
        try:
            with self._state_lock:
                self._waiting += 1
            with self._generate_lock:
                with self._state_lock:
                    self._waiting -= 1
                    self._running += 1
                try:
                    generation = self.model.generate(ids, max_new_tokens=self.max_new_tokens, temperature=0.0)
                finally:
                    with self._state_lock:
                        self._running -= 1
        finally:
            self._slots.release()
        return self._extract_answer(generation.text)

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "providers": list(getattr(self.model, "providers", [])),
                "notes": list(getattr(self.model, "notes", [])), "max_new_tokens": self.max_new_tokens}

    def load(self) -> dict:
        with self._state_lock:
            return {"in_flight": self._running, "queued": self._waiting, "max_queue": self.max_queue}


class _Handler(BaseHTTPRequestHandler):
    server_version = "kd2edge-serve"
    # HTTP/1.0: one request per connection, so no idle keep-alive thread can hold up shutdown.
    protocol_version = "HTTP/1.0"
    timeout = 30  # seconds a client may take to send its request (slow clients cannot pin a thread)

    # Set on the subclass made per server (see make_server).
    service: AnswerService
    metrics: ServerMetrics
    max_body_bytes: int
    access_log: bool

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self):  # noqa: N802
        self._dispatch("PATCH")

    def do_OPTIONS(self):  # noqa: N802
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        started = time.perf_counter()
        route = self.path.split("?", 1)[0]
        known = route if route in ROUTES else "other"
        try:
            if route not in ROUTES:
                raise RequestError(404, f"no route {route}: use POST /v1/answer, GET /healthz or GET /metrics")
            if method != ROUTES[route]:
                raise RequestError(405, f"{route} accepts {ROUTES[route]} only, not {method}",
                                   headers={"Allow": ROUTES[route]})
            if route == "/healthz":
                self._send(200, self.service.health())
            elif route == "/metrics":
                self._send(200, self.metrics.snapshot(self.service.load()))
            else:
                question, context = parse_answer_request(self._read_body())
                answer = self.service.answer(question, context)
                latency = time.perf_counter() - started
                self._send(200, {"answer": answer, "latency_ms": round(latency * 1000, 3)})
                self.metrics.record(known, 200, latency)
                return
            self.metrics.record(known, 200)
        except RequestError as e:
            self._send(e.status, {"error": e.message, "status": e.status}, e.headers)
            self.metrics.record(known, e.status)
        except (Kd2EdgeError, RuntimeError, ValueError, OSError) as e:
            # The runtime failed on a valid request (onnxruntime raises RuntimeError
            # subclasses): answer 500 instead of dropping the connection, and log it.
            sys.stderr.write(f"kd2edge serve: error answering {route}: {type(e).__name__}: {e}\n")
            self._send(500, {"error": f"the model failed on this request: {type(e).__name__}", "status": 500})
            self.metrics.record(known, 500)

    def _read_body(self) -> bytes:
        ctype = self.headers.get("Content-Type", "application/json").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(415, f"Content-Type must be application/json, got {ctype}")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "chunked bodies are not accepted: send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "missing Content-Length header")
        try:
            size = int(length)
        except ValueError:
            raise RequestError(400, f"Content-Length {length!r} is not a number") from None
        if size < 0:
            raise RequestError(400, f"Content-Length {size} is negative")
        if size > self.max_body_bytes:
            self._discard(size)
            raise RequestError(413, f"body is {size} bytes; the limit is {self.max_body_bytes}: shorten the context")
        return self.rfile.read(size)

    def _discard(self, size: int) -> None:
        """Read and drop up to 1 MiB of a refused body: closing a socket with unread data
        resets the connection, and the client would lose the 413 reply."""
        left = min(size, 1 << 20)
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; the request is still counted

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if self.access_log:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


class _Server(ThreadingHTTPServer):
    # Handler threads are joined on server_close(): in-flight requests finish before exit.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True


def make_server(service: AnswerService, host: str = "127.0.0.1", port: int = 8080,
                max_body_bytes: int = MAX_BODY_BYTES, access_log: bool = True) -> ThreadingHTTPServer:
    """A threading HTTP server bound to (host, port) serving `service`; port 0 picks a free one.

    Raises:
        OSError: the address cannot be bound (in use, not permitted).
    """
    handler = type("Handler", (_Handler,), {"service": service, "metrics": ServerMetrics(),
                                            "max_body_bytes": int(max_body_bytes), "access_log": access_log})
    return _Server((host, port), handler)


def run_until_signal(server: ThreadingHTTPServer, on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and return.

    Must be called from the main thread (signal handlers are installed there).
    """
    def stop(signum, frame):
        # shutdown() waits for serve_forever to return, so it cannot run in this (the serving) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        host, port = server.server_address[:2]
        if on_ready is not None:
            on_ready(host, port)
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # joins the handler threads: the answers in flight are sent first
        for s, handler in previous.items():
            signal.signal(s, handler)


def load_service(artifact: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 allow_fallback: bool = False, max_new_tokens: int = 24, max_queue: int = 8,
                 context_length: int = 2048) -> AnswerService:
    """Load an exported artifact with the ONNX runtime and wrap it in an AnswerService.

    Raises:
        ArtifactError / ModelError: from the runtime, when the artifact cannot be loaded.
    """
    from kd2edge.runtime.lm import OnnxLM

    model = OnnxLM.load(artifact, providers=providers, threads=threads, allow_fallback=allow_fallback)
    return AnswerService(model, max_new_tokens=max_new_tokens, max_queue=max_queue,
                         context_length=context_length, name=Path(artifact).name)


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8080, providers: list[str] | None = None,
          threads: int | None = None, allow_fallback: bool = False, max_new_tokens: int = 24,
          max_queue: int = 8, context_length: int = 2048, access_log: bool = True) -> None:
    """Load `artifact` and serve it until SIGTERM; prints the ready line (with the bound port) to stderr.

    Raises:
        ResourceError: the address cannot be bound.
        ArtifactError / ModelError: the artifact cannot be loaded.
    """
    service = load_service(artifact, providers, threads, allow_fallback, max_new_tokens, max_queue, context_length)
    for note in service.health()["notes"]:
        sys.stderr.write(f"kd2edge serve: warning: {note}\n")
    try:
        server = make_server(service, host, port, access_log=access_log)
    except OSError as e:
        raise ResourceError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None

    def ready(h: str, p: int) -> None:
        sys.stderr.write(READY_LINE.format(host=h, port=p) + f" (providers: {', '.join(service.health()['providers'])})\n")
        sys.stderr.flush()

    run_until_signal(server, on_ready=ready)
    sys.stderr.write("kd2edge serve: stopped\n")
