"""The server's request handling, metrics and queueing, in-process with a controllable fake model.

The fake has the runtime's interface; its `generate` can be held open, so queueing,
503s and the one-at-a-time rule are tested deterministically, not by timing. The
server is the real one (uvicorn + Starlette) on a free loopback port, in a thread.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kd2edge.package.launch import request_json
from kd2edge.runtime.metrics import latency_summary, route_label
from kd2edge.runtime.serve import bind, make_server
from kd2edge.runtime.service import AnswerService, RequestError, parse_answer_request


@dataclass
class _Gen:
    text: str
    prompt_tokens: int = 0
    tokens: list = field(default_factory=list)


class FakeLM:
    """Encodes one token per character; answers the question reversed; can hold generate open."""

    providers = ["CPUExecutionProvider"]
    notes: list = []
    chat_template = "x"
    context_length = 4096

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.active = 0
        self.max_active = 0
        self.order: list[str] = []
        self.entered = threading.Semaphore(0)
        self._lock = threading.Lock()

    def format_prompt(self, text):
        return text

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def generate(self, ids, max_new_tokens, temperature=0.0):
        prompt = "".join(map(chr, ids))
        question = prompt.split("Question: ")[1].split("\n")[0]
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.order.append(question)
        self.entered.release()
        self.gate.wait(10)
        with self._lock:
            self.active -= 1
        answer = question[::-1]
        return _Gen(" " + answer + "\nQuestion: ignored", prompt_tokens=len(ids), tokens=list(answer) + ["<eos>"])


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'{"question": "q"}', "missing field 'context'"),
    (b'{"question": 3, "context": "c"}', "field 'question' must be a string, got int"),
    (b'{"question": "q", "context": "c", "top_k": 1}', "unknown field 'top_k'"),
    (b'{"question": "  ", "context": "c"}', "field 'question' is empty"),
])
def test_parse_answer_request_refuses_bad_bodies(body, message):
    with pytest.raises(RequestError, match=message) as info:
        parse_answer_request(body)
    assert info.value.status == 400


def test_parse_answer_request_strips_the_question():
    assert parse_answer_request(b'{"question": " Who? ", "context": "ctx"}') == ("Who?", "ctx")


def test_latency_summary_is_interpolated_in_ms():
    # ranks 0..3; p50 at rank 1.5 -> 0.25 s; p95 at rank 2.85 -> 0.3 + 0.85 * 0.1 = 0.385 s
    s = latency_summary([0.4, 0.1, 0.3, 0.2])
    assert (s.count, s.p50_ms, s.p95_ms) == (4, 250.0, 385.0)
    assert latency_summary([]).p50_ms is None


def test_route_labels_are_bounded():
    routes = ("/v1/answer", "/healthz")
    assert route_label("/healthz", routes) == "/healthz"
    assert route_label("/etc/passwd", routes) == route_label("/x" * 50, routes) == "other"


def test_answer_uses_the_evaluation_prompt_and_extracts_the_first_line():
    service = AnswerService(FakeLM(), max_new_tokens=8)
    assert service.answer("abc", "some context") == "cba"
    ids = service.prompt_ids("abc", "ctx")
    assert "".join(map(chr, ids)) == "Context: ctx\nQuestion: abc\nAnswer:"


def test_prompt_longer_than_the_window_gets_413():
    lm = FakeLM()
    lm.context_length = 50
    service = AnswerService(lm, max_new_tokens=10, context_length=2048)  # the model's 50 wins
    prompt_len = len("Context: \nQuestion: q\nAnswer:")  # 29 tokens
    assert service.answer("q", "") == "q"
    with pytest.raises(RequestError, match=f"{prompt_len + 12} tokens; this server accepts at most 40") as info:
        service.answer("q", "x" * 12)
    assert info.value.status == 413


class Live:
    """A real server (uvicorn + Starlette) on a free loopback port, run in a thread."""

    def __init__(self, service, **options):
        self.lines: list[str] = []
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(service, write_log=self.lines.append, **options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def live():
    """(FakeLM, Live) with a queue of 1, a 1000-byte body limit and a 1 s body timeout."""
    lm = FakeLM()
    server = Live(AnswerService(lm, max_new_tokens=8, max_queue=1), max_body_bytes=1000, log_format=None,
                  body_timeout_s=1.0)
    yield lm, server
    lm.gate.set()
    server.stop()


def _raw(port: int, data: bytes, timeout_s: float = 10) -> bytes:
    """Send raw bytes on a new connection and read the reply until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_http_errors_are_json_with_the_right_status(live):
    _, server = live
    url, ok = server.url, {"question": "q", "context": "c"}
    cases = [
        (request_json(url + "/v1/answer", "POST", body=b"{oops"), 400, "not valid JSON"),
        (request_json(url + "/v1/answer", "POST", {"question": 1, "context": "c"}), 400, "must be a string"),
        (request_json(url + "/v1/answer", "POST", body=b"x" * 5000), 413, "body is 5000 bytes; the limit is 1000"),
        (request_json(url + "/v1/answer", "POST", ok, headers={"Content-Type": "text/plain"}), 415, "application/json"),
        (request_json(url + "/nope"), 404, "no route /nope"),
        (request_json(url + "/v1/answer"), 405, "accepts POST only, not GET"),
        (request_json(url + "/healthz", "POST", ok), 405, "accepts GET only"),
        (request_json(url + "/healthz", "DELETE"), 405, "accepts GET only"),
        (request_json(url + "/metrics?format=yaml"), 400, "format=yaml is not known"),
    ]
    for (status, body, _), want_status, want_text in cases:
        assert status == want_status and body["status"] == want_status, body
        assert want_text in body["error"]
    assert cases[5][0][2]["Allow"] == "POST"


def test_bodies_without_a_length_get_411_and_slow_bodies_408(live):
    _, server = live
    head = b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    chunked = _raw(server.port, head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411 ") and b"send a Content-Length" in chunked
    no_length = _raw(server.port, head + b"\r\n")
    assert no_length.startswith(b"HTTP/1.1 411 ") and b"missing Content-Length" in no_length
    t0 = time.monotonic()
    slow = _raw(server.port, head + b"Content-Length: 40\r\n\r\n{\"question\"")  # 11 of 40 bytes, then nothing
    assert slow.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in slow
    assert time.monotonic() - t0 < 8


def test_keep_alive_serves_several_requests_on_one_connection(live):
    _, server = live
    body = json.dumps({"question": "ab", "context": ""}).encode()
    request = (b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        replies = []
        for _ in range(3):
            sock.sendall(request)
            data = b""
            while b'"latency_ms"' not in data or not data.endswith(b"}"):
                data += sock.recv(65536)
            replies.append(data)
    assert all(r.startswith(b"HTTP/1.1 200 ") and b'"answer":"ba"' in r for r in replies)


def test_metrics_in_json_count_requests_by_status_and_latency(live):
    _, server = live
    url = server.url
    for q in ("ab", "cd"):
        status, body, _ = request_json(url + "/v1/answer", "POST", {"question": q, "context": ""})
        assert (status, body["answer"]) == (200, q[::-1]) and body["latency_ms"] > 0
    request_json(url + "/missing")
    status, metrics, _ = request_json(url + "/metrics?format=json")
    assert status == 200
    # the metrics request itself is counted after its snapshot
    assert metrics["requests"]["by_status"] == {"200": 2, "404": 1}
    assert metrics["requests"]["by_route"] == {"/v1/answer": 2, "other": 1}
    assert metrics["latency_ms"]["window"] == 2 and metrics["latency_ms"]["p95"] >= metrics["latency_ms"]["p50"] > 0
    assert metrics["tokens"] == {"generated": 6, "prompt": 2 * len("Context: \nQuestion: ab\nAnswer:")}
    assert (metrics["in_flight"], metrics["queued"], metrics["max_queue"]) == (0, 0, 1)


def _families(text: str) -> dict:
    """{metric name: {(sample name, sorted labels): value}} parsed by prometheus_client's own parser."""
    out: dict = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return out


def test_metrics_are_prometheus_text_that_prometheus_client_parses(live):
    _, server = live
    url = server.url
    for q in ("ab", "cde"):
        assert request_json(url + "/v1/answer", "POST", {"question": q, "context": ""})[0] == 200
    request_json(url + "/v1/answer", "POST", body=b"{")
    request_json(url + "/nope")
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        content_type, text = resp.headers["Content-Type"], resp.read().decode()
    assert content_type.startswith("text/plain; version=")
    m = _families(text)
    requests = m["kd2edge_requests"]
    assert requests[("kd2edge_requests_total", (("route", "/v1/answer"), ("status", "200")))] == 2
    assert requests[("kd2edge_requests_total", (("route", "/v1/answer"), ("status", "400")))] == 1
    assert requests[("kd2edge_requests_total", (("route", "other"), ("status", "404")))] == 1
    latency = m["kd2edge_answer_duration_seconds"]
    assert latency[("kd2edge_answer_duration_seconds_count", ())] == 2
    assert latency[("kd2edge_answer_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert 0 < latency[("kd2edge_answer_duration_seconds_sum", ())] < 10
    assert m["kd2edge_generated_tokens"][("kd2edge_generated_tokens_total", ())] == 2 + 3 + 2  # answers + <eos>
    assert m["kd2edge_queue_depth"][("kd2edge_queue_depth", ())] == 0
    assert m["kd2edge_max_queue"][("kd2edge_max_queue", ())] == 1
    assert m["kd2edge_model_info"][("kd2edge_model_info", (("model", "model"), ("providers", "CPUExecutionProvider")))] == 1
    assert m["process_resident_memory_bytes"][("process_resident_memory_bytes", ())] > 1e6

    # a scraper that asks for OpenMetrics gets it
    req = urllib.request.Request(url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.read().decode().rstrip().endswith("# EOF")


def test_one_request_generates_at_a_time_and_a_full_queue_gets_503(live):
    lm, server = live
    url = server.url
    lm.gate.clear()
    results = {}

    def ask(name):
        results[name] = request_json(url + "/v1/answer", "POST", {"question": name, "context": ""})

    first = threading.Thread(target=ask, args=("one",))
    first.start()
    assert lm.entered.acquire(timeout=10)          # "one" is generating (held open)
    second = threading.Thread(target=ask, args=("two",))
    second.start()
    for _ in range(200):                           # wait until "two" is queued behind it
        if request_json(url + "/metrics?format=json")[1]["queued"] == 1:
            break
        time.sleep(0.02)
    health = request_json(url + "/healthz")        # the event loop still answers while the model is busy
    assert health[0] == 200
    status, body, headers = request_json(url + "/v1/answer", "POST", {"question": "three", "context": ""})
    assert (status, headers.get("Retry-After")) == (503, "1") and "server busy" in body["error"]
    lm.gate.set()
    first.join(10)
    second.join(10)
    assert results["one"][:2] == (200, {"answer": "eno", "latency_ms": results["one"][1]["latency_ms"]})
    assert results["two"][1]["answer"] == "owt"
    assert lm.max_active == 1 and lm.order == ["one", "two"]


def test_a_request_that_waited_too_long_for_the_model_gets_503_without_generating():
    lm = FakeLM()
    server = Live(AnswerService(lm, max_new_tokens=8, max_queue=2, queue_timeout_s=0.5), log_format=None)
    try:
        lm.gate.clear()
        results = {}

        def ask(name):
            results[name] = request_json(server.url + "/v1/answer", "POST", {"question": name, "context": ""})

        first = threading.Thread(target=ask, args=("one",))
        first.start()
        assert lm.entered.acquire(timeout=10)
        second = threading.Thread(target=ask, args=("two",))
        second.start()
        time.sleep(1.0)         # "two" waits behind "one" for longer than 0.5 s
        lm.gate.set()
        first.join(10)
        second.join(10)
    finally:
        server.stop()
    assert results["one"][0] == 200
    status, body, headers = results["two"]
    assert (status, headers["Retry-After"]) == (503, "1")
    assert re.search(r"server busy: this request waited \d+\.\d s for the model \(limit 0\.5 s\)", body["error"])
    assert lm.order == ["one"]  # "two" never reached the model


def test_json_request_log_has_one_object_per_request():
    lm = FakeLM()
    server = Live(AnswerService(lm, max_new_tokens=8, max_queue=1), log_format="json")
    try:
        request_json(server.url + "/v1/answer", "POST", {"question": "abc", "context": ""})
        request_json(server.url + "/healthz")
        request_json(server.url + "/v1/answer", "POST", body=b"[]")
    finally:
        server.stop()
    records = [json.loads(line) for line in server.lines]
    assert [(r["method"], r["path"], r["status"]) for r in records] == [
        ("POST", "/v1/answer", 200), ("GET", "/healthz", 200), ("POST", "/v1/answer", 400)]
    assert records[0]["tokens"] == 4 and records[0]["client"] == "127.0.0.1"
    assert all(r["duration_ms"] > 0 and r["ts"] > 1e9 for r in records)


def test_text_request_log_is_one_line_per_request():
    server = Live(AnswerService(FakeLM(), max_new_tokens=8), log_format="text")
    try:
        request_json(server.url + "/missing")
    finally:
        server.stop()
    assert len(server.lines) == 1 and server.lines[0].startswith('127.0.0.1 "GET /missing" 404 ')


def test_a_model_error_is_a_500_with_json(live):
    lm, server = live

    def broken(ids, max_new_tokens, temperature=0.0):
        raise RuntimeError("kernel failed")

    lm.generate = broken
    status, body, _ = request_json(server.url + "/v1/answer", "POST", {"question": "q", "context": ""})
    assert (status, body) == (500, {"error": "the model failed on this request: RuntimeError", "status": 500})
    assert request_json(server.url + "/healthz")[0] == 200
