"""Answering questions with one model: request validation, the bounded queue, one generation at a time.

No HTTP here: `kd2edge.runtime.app` puts this service behind Starlette routes and
`kd2edge.runtime.serve` runs it with uvicorn; the package stage's smoke test calls
`AnswerService.answer` directly for its reference answer.

One model, one KV cache: generation runs behind a lock, one request at a time, so two
requests are never interleaved on the same cache. At most `max_queue` requests wait
behind the running one; a request that finds no free place is refused at once (503 +
Retry-After) instead of piling up, and one that waited longer than `queue_timeout_s`
for the model is refused then (503) instead of generating for a client that may be gone. The prompt is the one evaluation scores
(`kd2edge.data.prompts`), so a served answer is the answer the QA figures were measured on.

Standard library only (and kd2edge.data at call time): it runs in the image, on Python 3.10.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

ANSWER_FIELDS = ("question", "context")
RETRY_AFTER_S = 1   # what a 503 tells the client to wait: about one answer's time on a laptop
QUEUE_TIMEOUT_S = 60.0  # longest wait for the model; HTTP clients commonly give up after 60-120 s


class RequestError(Exception):
    """A request the server refuses: carries the HTTP status, a one-line reason and extra headers."""

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


class AnswerService:
    """Answers questions with one model, one generation at a time, behind a bounded queue.

    Args:
        model: an object with the runtime's interface (`kd2edge.runtime.lm.OnnxLM`):
            `format_prompt`, `encode`, `generate` (returning `tokens`, `prompt_tokens`, `text`),
            `providers`, `notes`.
        max_new_tokens: tokens generated per answer (greedy, so answers are deterministic).
        max_queue: requests allowed to wait behind the running one before 503.
        context_length: the token window served (at most the model's); longer prompts get 413.
        name: what /healthz calls the model.
        queue_timeout_s: longest a request may wait for the model before it is refused (503).
    """

    def __init__(self, model: Any, max_new_tokens: int = 24, max_queue: int = 8,
                 context_length: int = 2048, name: str = "model", queue_timeout_s: float = QUEUE_TIMEOUT_S):
        from kd2edge.data.items import QAItem
        from kd2edge.data.prompts import build_prompt, extract_answer

        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.max_queue = int(max_queue)
        self.context_length = min(int(context_length), int(getattr(model, "context_length", context_length)))
        self.name = name
        self.queue_timeout_s = float(queue_timeout_s)
        self._build_prompt, self._extract_answer, self._item = build_prompt, extract_answer, QAItem
        self._generate_lock = threading.Lock()
        # Places = the running request + the waiting ones; a request that finds none is refused.
        self._places = threading.BoundedSemaphore(self.max_queue + 1)
        self._state_lock = threading.Lock()
        self._admitted = 0
        self._running = 0

    def prompt_ids(self, question: str, context: str) -> list[int]:
        """Token ids of the evaluation's zero-shot prompt for this question.

        Encoded as `kd2edge evaluate` encodes it for an ONNX artifact: chat template applied,
        and the tokenizer's special tokens (a BOS) added only when there is no template to hold them.

        Raises:
            RequestError: 413 when the prompt and the answer do not fit the context window.
        """
        item = self._item(id="request", question=question, context=context)
        text = self.model.format_prompt(self._build_prompt(item))
        ids = list(self.model.encode(text, add_special_tokens=not getattr(self.model, "chat_template", None)))
        limit = self.context_length - self.max_new_tokens
        if len(ids) > limit:
            raise RequestError(413, f"question and context are {len(ids)} tokens; this server accepts at most "
                                    f"{limit} (context length {self.context_length} - {self.max_new_tokens} "
                                    f"new tokens): shorten the context")
        return ids

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one place in the queue for the duration of the block, without waiting for it.

        Raises:
            RequestError: 503 (with Retry-After) when `max_queue` requests already wait.
        """
        if not self._places.acquire(blocking=False):
            raise RequestError(503, f"server busy: {self.max_queue} requests already waiting, retry shortly",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
        with self._state_lock:
            self._admitted += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._admitted -= 1
            self._places.release()

    def generate(self, ids: list[int], arrived: float | None = None) -> Any:
        """Generate the answer tokens for a prompt, waiting for the model if another request holds it.

        Args:
            ids: prompt token ids (from `prompt_ids`).
            arrived: when the request arrived (time.monotonic()); its wait for the model counts from
                then (default: now).

        Returns:
            The model's generation (greedy): `.text`, `.tokens`, `.prompt_tokens`.

        Raises:
            RequestError: 503 when the request waited longer than `queue_timeout_s` for the model.
        """
        arrived = time.monotonic() if arrived is None else arrived
        with self._generate_lock:
            waited = time.monotonic() - arrived
            if waited > self.queue_timeout_s:
                raise RequestError(503, f"server busy: this request waited {waited:.1f} s for the model "
                                        f"(limit {self.queue_timeout_s:g} s), retry shortly",
                                   headers={"Retry-After": str(RETRY_AFTER_S)})
            with self._state_lock:
                self._running += 1
            try:
                return self.model.generate(ids, max_new_tokens=self.max_new_tokens, temperature=0.0)
            finally:
                with self._state_lock:
                    self._running -= 1

    def extract(self, text: str) -> str:
        """The answer in a generated text (its first line, as evaluation scores it)."""
        return self._extract_answer(text)

    def answer(self, question: str, context: str) -> str:
        """The model's answer to one question (greedy decoding), in the calling thread.

        Raises:
            RequestError: 503 when the queue is full, else 413 when the prompt does not fit the
                context window.
        """
        with self.admit():
            generation = self.generate(self.prompt_ids(question, context))
        return self.extract(generation.text)

    def health(self) -> dict:
        """What GET /healthz reports: status, model name, execution providers in use, fallback notes."""
        return {"status": "ok", "model": self.name, "providers": list(getattr(self.model, "providers", [])),
                "notes": list(getattr(self.model, "notes", [])), "max_new_tokens": self.max_new_tokens}

    def load(self) -> dict:
        """The queue now: requests generating (`in_flight`), waiting (`queued`), and the bound."""
        with self._state_lock:
            return {"in_flight": self._running, "queued": self._admitted - self._running,
                    "max_queue": self.max_queue}
