"""Serve an exported artifact over HTTP with uvicorn: `kd2edge serve` and the image's default command.

The API is `kd2edge.runtime.app` (Starlette), the queue and the one-generation-at-a-time
rule are `kd2edge.runtime.service`. uvicorn does the HTTP: h11 parsing, keep-alive
(idle connections closed after KEEP_ALIVE_S), a listen backlog of BACKLOG (the standard
library's server had 5, and reset connections under load), at most MAX_CONNECTIONS open
connections, header size limits, and the graceful shutdown: on SIGTERM or SIGINT it stops
accepting, lets the requests in flight (and those queued) finish, and returns, so the
process exits 0, also as PID 1 in a container.

The socket is bound here, before uvicorn starts, so port 0 works (the bound port is printed
in the ready line) and a port in use is a one-line error.

Imports only the standard library, uvicorn and kd2edge.runtime modules (the model runtime
when an artifact is loaded): it runs in the image, on Python 3.10.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Callable

import uvicorn
from prometheus_client import disable_created_metrics

from kd2edge.errors import ArtifactError, Kd2EdgeError, ResourceError
from kd2edge.runtime.access import check_readable
from kd2edge.runtime.app import BODY_TIMEOUT_S, MAX_BODY_BYTES, make_app, runtime_errors
from kd2edge.runtime.metrics import ServerMetrics
from kd2edge.runtime.service import QUEUE_TIMEOUT_S, AnswerService

READY_LINE = "kd2edge serve: listening on http://{host}:{port}"
SERVER_HEADER = "kd2edge-serve"
BACKLOG = 2048                 # pending connections the kernel holds while the server is busy
MAX_CONNECTIONS = 1024         # open connections (and requests) beyond which uvicorn answers 503 itself
KEEP_ALIVE_S = 5               # an idle keep-alive connection is closed after this long
GRACEFUL_SHUTDOWN_S = 90       # on SIGTERM, requests still running after this long are cancelled
                               # (queued ones give up after QUEUE_TIMEOUT_S, then one generation runs out)
MAX_HEADER_BYTES = 16 * 1024   # request line + headers


def load_service(artifact: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 allow_fallback: bool = False, max_new_tokens: int = 24, max_queue: int = 8,
                 context_length: int = 2048, queue_timeout_s: float = QUEUE_TIMEOUT_S) -> AnswerService:
    """Load an exported artifact with the ONNX runtime and wrap it in an AnswerService.

    Raises:
        ArtifactError: a file this user cannot read, or a model the runtime cannot load
            (onnxruntime's own errors included, as one line).
        ModelError / ConfigError: from the runtime (e.g. a provider that is not available).
    """
    from kd2edge.runtime.lm import OnnxLM

    check_readable(artifact)
    try:
        model = OnnxLM.load(artifact, providers=providers, threads=threads, allow_fallback=allow_fallback)
    except Kd2EdgeError:
        raise  # already one line that says what to change
    except runtime_errors() as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise ArtifactError(f"onnxruntime cannot load the model in {artifact} ({type(e).__name__}: {first}): "
                            f"check that every file there is readable by uid {os.getuid()} and complete, "
                            f"else re-run `kd2edge export`") from None
    return AnswerService(model, max_new_tokens=max_new_tokens, max_queue=max_queue,
                         context_length=context_length, name=Path(artifact).name, queue_timeout_s=queue_timeout_s)


def bind(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one.

    Raises:
        ResourceError: the address cannot be bound (in use, not permitted, not an address here).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as e:
        # create_server appends "(while attempting to bind ...)" to strerror: name the errno's own text
        why = os.strerror(e.errno) if e.errno else str(e)
        raise ResourceError(f"cannot listen on {host}:{port} ({why}): choose another --port or --host") from None


class _Server(uvicorn.Server):
    """uvicorn's server, calling `on_ready(host, port)` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str, int], None] | None):
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None and sockets:
            host, port = sockets[0].getsockname()[:2]
            self._on_ready(host, port)


def make_server(service: AnswerService, max_body_bytes: int = MAX_BODY_BYTES, log_format: str | None = "text",
                on_ready: Callable[[str, int], None] | None = None, body_timeout_s: float = BODY_TIMEOUT_S,
                write_log: Callable[[str], None] | None = None) -> uvicorn.Server:
    """A uvicorn server for `service`; run it with `.run(sockets=[bind(host, port)])`.

    Args:
        service: what answers.
        max_body_bytes: the largest request body accepted (413 beyond).
        log_format: access log "text", "json" or None (off).
        on_ready: called with the bound (host, port) once the server accepts connections.
        body_timeout_s: how long a client may take to send its body (408 beyond).
        write_log: where access-log lines go (default: stderr).

    Returns:
        The server; `.should_exit = True` stops it gracefully from another thread.
    """
    # No `*_created` series: they double the text a scraper reads and carry no information here.
    # (A process-wide switch of prometheus_client; this process serves one model.)
    disable_created_metrics()
    metrics = ServerMetrics(service.load, model=service.name, providers=service.health()["providers"])
    app = make_app(service, metrics, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
                   log_format=log_format, write_log=write_log)
    config = uvicorn.Config(
        app, http="h11", loop="asyncio", ws="none", lifespan="on", interface="asgi3",
        log_config=None,            # no logging setup: uvicorn's warnings reach stderr, its info lines do not
        access_log=False,           # the app writes its own access log (text or JSON)
        server_header=False, headers=[("server", SERVER_HEADER)], proxy_headers=False,
        backlog=BACKLOG, limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    return _Server(config, on_ready)


def write_ready_file(path: str | Path, host: str, port: int) -> None:
    """Record where the server listens, for the image's healthcheck (written whole, then renamed).

    Args:
        path: the file to write.
        host, port: the bound address.
    """
    path = Path(path)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}) + "\n", encoding="utf-8")
    part.replace(path)


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8080, providers: list[str] | None = None,
          threads: int | None = None, allow_fallback: bool = False, max_new_tokens: int = 24,
          max_queue: int = 8, context_length: int = 2048, log_format: str | None = "text",
          ready_file: str | Path | None = None, queue_timeout_s: float = QUEUE_TIMEOUT_S) -> None:
    """Load `artifact` and serve it until SIGTERM or SIGINT; prints the ready line (with the bound port) to stderr.

    Must run in the main thread (signal handlers are installed there).

    Args:
        artifact: the export folder.
        host, port: where to listen (port 0: a free one).
        providers, threads, allow_fallback: the ONNX runtime's settings.
        max_new_tokens, max_queue, context_length, queue_timeout_s: the service's limits.
        log_format: access log "text", "json" or None (off).
        ready_file: when given, where the bound address is written once ready (removed on exit).

    Raises:
        ResourceError: the address cannot be bound.
        ArtifactError / ModelError / ConfigError: the artifact cannot be loaded.
    """
    service = load_service(artifact, providers, threads, allow_fallback, max_new_tokens, max_queue, context_length,
                           queue_timeout_s)
    for note in service.health()["notes"]:
        sys.stderr.write(f"kd2edge serve: warning: {note}\n")
    sock = bind(host, port)

    def ready(h: str, p: int) -> None:
        if ready_file:
            try:
                write_ready_file(ready_file, h, p)
            except OSError as e:  # a read-only /tmp: the healthcheck then probes KD2EDGE_PORT
                sys.stderr.write(f"kd2edge serve: warning: cannot write {ready_file} ({e.strerror}); "
                                 f"the healthcheck probes the configured port\n")
        sys.stderr.write(READY_LINE.format(host=h, port=p) + f" (providers: {', '.join(service.health()['providers'])})\n")
        sys.stderr.flush()

    server = make_server(service, log_format=log_format, on_ready=ready)
    # uvicorn replaces these handlers while it runs and, after its graceful shutdown, raises the
    # signal it caught again for the handlers it found. With the default SIGTERM handler that would
    # kill the process (exit 143 under `docker stop`); the server's own handler makes it a no-op, and
    # also turns a signal that arrives while uvicorn starts into a graceful stop.
    previous = {s: signal.signal(s, server.handle_exit) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
    sys.stderr.write("kd2edge serve: stopped\n")
