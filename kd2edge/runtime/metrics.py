"""The server's metrics: Prometheus text for scrapers, and a JSON view for people and tests.

One `ServerMetrics` per server holds its own Prometheus registry (not the process-wide
default one), so several servers in one process, as in the tests, never share counters.
What it exposes (`GET /metrics`):

    kd2edge_requests_total{route, status}           requests served, by route and HTTP status
    kd2edge_answer_duration_seconds (histogram)     answered questions, request start to answer
    kd2edge_generated_tokens_total                  new tokens generated
    kd2edge_prompt_tokens_total                     prompt tokens processed
    kd2edge_queue_depth                             requests admitted and waiting to generate
    kd2edge_in_flight_generations                   requests generating now (0 or 1)
    kd2edge_max_queue                               the queue bound (503 beyond it)
    kd2edge_model_info{model, providers}            always 1; the labels say what is served
    process_* (Linux)                               resident memory, CPU seconds, open files

`GET /metrics?format=json` gives request counts, latency p50/p95 over the most recent
answers, token counts and the queue, as one JSON object.

Imports only the standard library, prometheus_client and kd2edge.runtime.stats: it runs in the image.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder

from kd2edge.runtime.stats import percentile

LATENCY_WINDOW = 2048       # latencies kept for the JSON view's p50/p95 (the most recent answers)
# Answer latency buckets (seconds): a 24-token answer takes tens of ms on a laptop, seconds on a
# small board, and a request may wait behind `max_queue` others.
ANSWER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OTHER_ROUTE = "other"       # the route label of requests to unknown paths (keeps the label set bounded)


@dataclass(frozen=True)
class LatencySummary:
    """p50 and p95 of a latency window, in milliseconds (None without data)."""

    count: int
    p50_ms: float | None
    p95_ms: float | None


def latency_summary(latencies_s: list[float]) -> LatencySummary:
    """p50 and p95 in milliseconds (linear interpolation, as numpy).

    Args:
        latencies_s: latencies in seconds, in any order.

    Returns:
        The count and the two percentiles, rounded to microseconds; None percentiles without data.
    """
    if not latencies_s:
        return LatencySummary(0, None, None)
    return LatencySummary(len(latencies_s), round(percentile(latencies_s, 50) * 1000, 3),
                          round(percentile(latencies_s, 95) * 1000, 3))


def route_label(path: str, routes: tuple[str, ...]) -> str:
    """The `route` label of a request path: the path itself for a known route, else "other".

    Args:
        path: the request's path (no query string).
        routes: the server's routes.

    Returns:
        A label from a bounded set, so unknown paths cannot grow the metrics without limit.
    """
    return path if path in routes else OTHER_ROUTE


class ServerMetrics:
    """Thread-safe request counters, answer latencies and token counts, in Prometheus and JSON.

    Args:
        load: returns the service's queue state now, {"in_flight", "queued", "max_queue"}
            (read at each scrape, so the gauges are never stale).
        model: the served model's name (a label of kd2edge_model_info).
        providers: the execution providers in use (a label of kd2edge_model_info).
        window: how many recent answer latencies the JSON view's percentiles use.
    """

    def __init__(self, load: Callable[[], dict], model: str = "model", providers: list[str] | None = None,
                 window: int = LATENCY_WINDOW):
        self._load = load
        self._lock = threading.Lock()
        self._by_status: Tally[int] = Tally()
        self._by_route: Tally[str] = Tally()
        self._latencies: deque[float] = deque(maxlen=window)
        self._tokens = {"generated": 0, "prompt": 0}
        self._started = time.monotonic()

        self.registry = CollectorRegistry()
        self._requests = Counter("kd2edge_requests", "HTTP requests served, by route and status.",
                                 ["route", "status"], registry=self.registry)
        self._answer_seconds = Histogram("kd2edge_answer_duration_seconds",
                                         "Answered questions: seconds from the request's arrival to its answer.",
                                         buckets=ANSWER_BUCKETS, registry=self.registry)
        self._generated = Counter("kd2edge_generated_tokens", "New tokens generated.", registry=self.registry)
        self._prompt = Counter("kd2edge_prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        for name, key, text in (("kd2edge_queue_depth", "queued", "Requests admitted and waiting to generate."),
                                ("kd2edge_in_flight_generations", "in_flight", "Requests generating now."),
                                ("kd2edge_max_queue", "max_queue", "Requests allowed to wait before 503.")):
            Gauge(name, text, registry=self.registry).set_function(lambda key=key: self._load()[key])
        info = Gauge("kd2edge_model_info", "The served model (always 1).", ["model", "providers"],
                     registry=self.registry)
        info.labels(model=model, providers=",".join(providers or [])).set(1)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, ...; nothing off Linux

    def record(self, route: str, status: int, latency_s: float | None = None) -> None:
        """Count one finished request.

        Args:
            route: its route label (see `route_label`).
            status: the HTTP status sent.
            latency_s: for an answered question only, seconds from arrival to answer.
        """
        with self._lock:
            self._by_status[status] += 1
            self._by_route[route] += 1
            if latency_s is not None:
                self._latencies.append(latency_s)
        self._requests.labels(route=route, status=str(status)).inc()
        if latency_s is not None:
            self._answer_seconds.observe(latency_s)

    def record_tokens(self, prompt: int, generated: int) -> None:
        """Count the tokens of one generation.

        Args:
            prompt: prompt tokens processed.
            generated: new tokens generated.
        """
        with self._lock:
            self._tokens["prompt"] += int(prompt)
            self._tokens["generated"] += int(generated)
        self._prompt.inc(int(prompt))
        self._generated.inc(int(generated))

    def snapshot(self) -> dict[str, Any]:
        """The JSON view: request counts, latency p50/p95 (ms) of recent answers, tokens, uptime, queue."""
        with self._lock:
            by_status = {str(k): v for k, v in sorted(self._by_status.items())}
            by_route = dict(sorted(self._by_route.items()))
            latencies = list(self._latencies)
            tokens = dict(self._tokens)
        summary = latency_summary(latencies)
        return {
            "requests": {"total": sum(by_status.values()), "by_status": by_status, "by_route": by_route},
            "latency_ms": {"p50": summary.p50_ms, "p95": summary.p95_ms, "window": summary.count},
            "tokens": tokens,
            "uptime_s": round(time.monotonic() - self._started, 3),
            **self._load(),
        }

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The Prometheus exposition of every metric, in the format the client asks for.

        Args:
            accept: the request's Accept header; OpenMetrics when it asks for it, else the text format.

        Returns:
            (body, content type).
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
