"""The server's request handling, metrics and queueing, in-process with a controllable fake model.

The fake has the runtime's interface; its `generate` can be held open, so queueing,
503s and the one-at-a-time rule are tested deterministically, not by timing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from kd2edge.package.launch import request_json
from kd2edge.runtime.serve import (AnswerService, RequestError, latency_summary, make_server, parse_answer_request)


@dataclass
class _Gen:
    text: str


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
        self.entered = threading.Semaphore(0)
        self._lock = threading.Lock()

    def format_prompt(self, text):
        return text

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def generate(self, ids, max_new_tokens, temperature=0.0):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.release()
        self.gate.wait(10)
        prompt = "".join(map(chr, ids))
        question = prompt.split("Question: ")[1].split("\n")[0]
        with self._lock:
            self.active -= 1
        return _Gen(" " + question[::-1] + "\nQuestion: ignored")


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


@pytest.fixture
def live():
    """An in-process server on a free port around a FakeLM with a queue of 1."""
    lm = FakeLM()
    service = AnswerService(lm, max_new_tokens=8, max_queue=1)
    server = make_server(service, "127.0.0.1", 0, max_body_bytes=1000, access_log=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield lm, f"http://127.0.0.1:{server.server_address[1]}"
    lm.gate.set()
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_errors_are_json_with_the_right_status(live):
    _, url = live
    ok = {"question": "q", "context": "c"}
    cases = [
        (request_json(url + "/v1/answer", "POST", body=b"{oops"), 400, "not valid JSON"),
        (request_json(url + "/v1/answer", "POST", {"question": 1, "context": "c"}), 400, "must be a string"),
        (request_json(url + "/v1/answer", "POST", body=b"x" * 5000), 413, "body is 5000 bytes; the limit is 1000"),
        (request_json(url + "/v1/answer", "POST", ok, headers={"Content-Type": "text/plain"}), 415, "application/json"),
        (request_json(url + "/nope"), 404, "no route /nope"),
        (request_json(url + "/v1/answer"), 405, "accepts POST only, not GET"),
        (request_json(url + "/healthz", "POST", ok), 405, "accepts GET only"),
        (request_json(url + "/healthz", "DELETE"), 405, "accepts GET only"),
    ]
    for (status, body, _), want_status, want_text in cases:
        assert status == want_status and body["status"] == want_status, body
        assert want_text in body["error"]
    assert cases[5][0][2]["Allow"] == "POST"


def test_metrics_count_requests_by_status_and_latency(live):
    _, url = live
    for q in ("ab", "cd"):
        status, body, _ = request_json(url + "/v1/answer", "POST", {"question": q, "context": ""})
        assert (status, body["answer"]) == (200, q[::-1]) and body["latency_ms"] > 0
    request_json(url + "/missing")
    status, metrics, _ = request_json(url + "/metrics")
    assert status == 200
    # the metrics request itself is counted after its snapshot
    assert metrics["requests"]["by_status"] == {"200": 2, "404": 1}
    assert metrics["requests"]["by_route"] == {"/v1/answer": 2, "other": 1}
    assert metrics["latency_ms"]["window"] == 2 and metrics["latency_ms"]["p95"] >= metrics["latency_ms"]["p50"] > 0
    assert (metrics["in_flight"], metrics["queued"], metrics["max_queue"]) == (0, 0, 1)


def test_one_request_generates_at_a_time_and_a_full_queue_gets_503(live):
    lm, url = live
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
        if request_json(url + "/metrics")[1]["queued"] == 1:
            break
        threading.Event().wait(0.02)
    status, body, headers = request_json(url + "/v1/answer", "POST", {"question": "three", "context": ""})
    assert (status, headers.get("Retry-After")) == (503, "1") and "server busy" in body["error"]
    lm.gate.set()
    first.join(10)
    second.join(10)
    assert results["one"][:2] == (200, {"answer": "eno", "latency_ms": results["one"][1]["latency_ms"]})
    assert results["two"][1]["answer"] == "owt"
    assert lm.max_active == 1
