"""`benchmarks/load_test.py` as a short bounded test: `kd2edge serve` under concurrent load on loopback.

8 clients for about 5 s (at most 400 requests) against a tiny exported llama: every reply
must be the single-request (greedy, deterministic) answer or a clear 503 (queue full);
none may be lost, wrong or of another status; SIGTERM then stops the server with exit 0.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import pytest

from kd2edge.cli import main
from kd2edge.package.launch import ServerProcess, request_json

LOAD_TEST = Path(__file__).parents[2] / "benchmarks" / "load_test.py"


def _load_test_module():
    spec = importlib.util.spec_from_file_location("kd2edge_load_test", LOAD_TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from kd2edge.testing import tiny_gptq_checkpoint

    root = tmp_path_factory.mktemp("load")
    ckpt = tiny_gptq_checkpoint(root / "ckpt")
    assert main(["export", str(ckpt), "--out", str(root / "export")]) == 0
    return root / "export"


def _burst(url: str, question: tuple[str, str], n: int) -> list[tuple[int, dict, dict]]:
    """`n` requests sent at once; their (status, body, headers)."""
    replies: list = []
    lock = threading.Lock()

    def one():
        reply = request_json(url + "/v1/answer", "POST", {"question": question[0], "context": question[1]})
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def _settled_metrics(url: str, answers: int, wait_s: float = 5.0) -> dict:
    """/metrics once it has counted `answers` answer requests: a handler records a request just
    after sending its reply, so the last replies may reach the client before they are counted."""
    deadline = time.monotonic() + wait_s
    while True:
        metrics = request_json(url + "/metrics?format=json")[1]
        if metrics["requests"]["by_route"].get("/v1/answer", 0) >= answers or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def test_serve_holds_a_bounded_concurrent_load(exported):
    load = _load_test_module()
    questions = load.BUILTIN
    server = ServerProcess([sys.executable, "-m", "kd2edge.cli", "serve", str(exported), "--host", "127.0.0.1",
                            "--port", "0", "--quiet", "--max-queue", "2", "--max-new-tokens", "8", "--threads", "1"])
    try:
        expected = []
        for q, c in questions:   # one at a time: the reference answers
            status, body, _ = request_json(server.url + "/v1/answer", "POST", {"question": q, "context": c})
            assert status == 200, body
            expected.append(body["answer"])
        result = load.run_load(server.url, questions, expected, clients=8, duration_s=5.0, max_requests=400)
        burst = _burst(server.url, questions[0], 12)
        metrics = _settled_metrics(server.url, answers=len(questions) + result["answered"] + len(burst))
    finally:
        code = server.stop()

    assert result["lost"] == 0, result["lost_examples"]
    assert result["wrong"] == 0 and result["other_status"] == 0, result
    assert result["refused_503"] == result["by_status"].get("503", 0)
    assert result["correct"] > 0 and result["answered"] == result["sent"] <= 400
    assert set(result["by_status"]) <= {"200", "503"}
    for status, body, headers in burst:
        assert status in (200, 503), body
        if status == 200:
            assert body["answer"] == expected[0]
        else:   # a refusal says why and when to retry
            assert body["error"].startswith("server busy: 2 requests already waiting") and headers["Retry-After"] == "1"
    # The server counted what the clients saw: references + load + burst, each a 200 or a 503.
    # (/metrics polls are counted too, each a 200.)
    counted, routes = metrics["requests"]["by_status"], metrics["requests"]["by_route"]
    polls = routes.get("/metrics", 0)
    assert set(counted) <= {"200", "503"} and routes["/v1/answer"] + polls == sum(counted.values())
    assert counted["200"] - polls == len(questions) + result["correct"] + sum(s == 200 for s, _, _ in burst)
    assert code == 0, server.tail()
