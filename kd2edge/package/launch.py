"""Start a server process, wait until it listens, talk JSON to it, stop it with SIGTERM.

Used by the package stage's smoke test, the tests and benchmarks/load_test.py. Not
part of the image (the entrypoint does not import it). Loopback only.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from email.message import Message
from pathlib import Path

from kd2edge.errors import StageError

_READY = re.compile(r"listening on http://([\d.]+):(\d+)")


class ServerProcess:
    """A server subprocess whose stderr announces `listening on http://HOST:PORT`.

    Use as a context manager; `stop()` sends SIGTERM and returns the exit code.
    """

    def __init__(self, argv: list[str], cwd: str | Path | None = None, env: dict | None = None,
                 ready_timeout_s: float = 120.0):
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.log: deque[str] = deque(maxlen=200)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.host, self.port = self._wait_ready(ready_timeout_s)
        self.url = f"http://{self.host}:{self.port}"

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            self._lines.put(line)
        self._lines.put(None)

    def _wait_ready(self, timeout_s: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self.proc.wait()
                raise StageError(f"the server exited ({self.proc.returncode}) before listening: {self.tail()}")
            m = _READY.search(line)
            if m:
                return m.group(1), int(m.group(2))
        self.proc.kill()
        self.proc.wait()
        raise StageError(f"the server did not listen within {timeout_s:.0f} s: {self.tail()}")

    def tail(self, n: int = 8) -> str:
        return " | ".join(list(self.log)[-n:])

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for a clean exit; SIGKILL (exit -9) if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def request_json(url: str, method: str = "GET", payload: object = None, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout_s: float = 120.0) -> tuple[int, dict, Message]:
    """Send one HTTP request and parse the JSON reply.

    Args:
        url: the full URL.
        payload: JSON-encoded as the body when given; `body` sends raw bytes instead.

    Returns:
        (status, parsed JSON body, response headers, looked up case-insensitively); 4xx/5xx replies
        are returned, not raised.

    Raises:
        OSError: the connection failed (refused, reset, timed out).
    """
    data = json.dumps(payload).encode() if payload is not None else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"{}"), resp.headers
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"{}"), e.headers
