"""Bounded load test of `kd2edge serve` on loopback.

Starts the server on 127.0.0.1 (a free port), takes each question's single-request
answer as the reference (greedy decoding is deterministic), then runs many concurrent
clients for a fixed time and at most a fixed number of requests. Every reply must be
either the reference answer (200) or a clear refusal (503 queue full); a wrong answer,
another status or a lost request (connection error) fails the run (exit 1).

    python benchmarks/load_test.py ARTIFACT [--clients 16] [--duration 20] [--max-requests 2000]
    python benchmarks/load_test.py --url http://127.0.0.1:PORT [...]   # a server already running

ARTIFACT is an export folder (`kd2edge export`); without one, `--tiny` exports a tiny
random llama first (needs torch/optimum; its answers are nonsense but deterministic).
`--url` loads a server that is already running (e.g. the packaged image started with
`docker run --network host IMAGE serve --port PORT`); it must be on loopback.
Questions come from ../shared/data/squad_dev_sample.json when present (`--squad`),
else from a few built-in ones. Prints and optionally writes (--out) a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from kd2edge.package.launch import ServerProcess, request_json
from kd2edge.runtime.stats import percentile

BUILTIN = [
    ("Who founded the Velmora Institute?", "The Velmora Institute was founded in 1871 by Adaline Qorr in Tessaly."),
    ("When was Brimor founded?", "La ciudad de Brimor fue fundada en 1620 por el explorador Tomás Ivarra."),
    ("What does the port export?", "The port exports coffee, cocoa and timber; its lighthouse is 120 years old."),
    ("Which way does the river flow?", "A river flows north through the valley and feeds the monastery orchards."),
]
HARD_CAP_REQUESTS = 100_000
HARD_CAP_SECONDS = 600


def squad_questions(path: Path, n: int) -> list[tuple[str, str]]:
    """The first `n` (question, context) pairs of a SQuAD v1.1 JSON file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                out.append((qa["question"], para["context"]))
                if len(out) == n:
                    return out
    return out


def export_tiny(folder: Path) -> Path:
    """Export a tiny random llama (optimum, text-generation-with-past) as an 'export' artifact."""
    from optimum.exporters.onnx import main_export

    from kd2edge.artifacts import write_artifact
    from kd2edge.testing import sharp_tiny_model_dir

    src = sharp_tiny_model_dir(folder / "src", "llama")
    main_export(str(src), output=str(folder / "export"), task="text-generation-with-past", do_validation=False)
    write_artifact(folder / "export", "export", {"benchmark": "tiny"}, None, format="onnx")
    return folder / "export"


def run_load(url: str, questions: list[tuple[str, str]], expected: list[str], clients: int, duration_s: float,
             max_requests: int) -> dict:
    """Run `clients` threads against `url` until `duration_s` passes or `max_requests` were sent."""
    lock = threading.Lock()
    sent = [0]
    records: list[tuple[int, float, bool]] = []   # (status, latency s, answer correct)
    lost: list[str] = []
    deadline = time.monotonic() + duration_s

    def client(index: int) -> None:
        i = index
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            q, c = questions[i % len(questions)]
            started = time.perf_counter()
            try:
                status, body, _ = request_json(url + "/v1/answer", "POST", {"question": q, "context": c},
                                               timeout_s=120)
            except OSError as e:
                with lock:
                    lost.append(f"{type(e).__name__}: {e}")
                continue
            latency = time.perf_counter() - started
            with lock:
                records.append((status, latency, status == 200 and body.get("answer") == expected[i % len(questions)]))
            if status == 503:
                time.sleep(0.05)  # the server asked to retry later; a polite client backs off
            i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = [lat for status, lat, right in records if status == 200 and right]
    wrong = sum(1 for status, _, right in records if status == 200 and not right)
    by_status: dict[str, int] = {}
    for status, _, _ in records:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    return {
        "clients": clients, "duration_s": round(wall, 2), "sent": sent[0], "answered": len(records),
        "by_status": by_status, "correct": len(ok), "wrong": wrong, "lost": len(lost), "lost_examples": lost[:3],
        "refused_503": by_status.get("503", 0),
        "other_status": sum(v for k, v in by_status.items() if k not in ("200", "503")),
        "latency_ms": {"p50": round(percentile(ok, 50) * 1000, 1), "p95": round(percentile(ok, 95) * 1000, 1)}
        if ok else None,
        "throughput_rps": round(len(ok) / wall, 2),
    }


class RunningServer:
    """A server this script did not start (`--url`): nothing to stop; its exit code is not known here."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def stop(self, timeout_s: float = 0.0) -> int:
        return 0


def server_argv(artifact: Path, args: argparse.Namespace) -> list[str]:
    """The `kd2edge serve` command this script starts on a free loopback port."""
    argv = [sys.executable, "-m", "kd2edge.cli", "serve", str(artifact), "--host", "127.0.0.1", "--port", "0",
            "--quiet", "--max-queue", str(args.max_queue), "--max-new-tokens", str(args.max_new_tokens)]
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", nargs="?", help="export folder (omit with --tiny or --url)")
    p.add_argument("--tiny", action="store_true", help="export and serve a tiny random llama")
    p.add_argument("--url", default=None, help="load this running server (http://127.0.0.1:PORT) instead of starting one")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (capped at 600)")
    p.add_argument("--max-requests", type=int, default=2000, help=f"cap on requests sent (<= {HARD_CAP_REQUESTS})")
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--squad", default="../shared/data/squad_dev_sample.json")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds the started server may take to load the model and listen")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    args = p.parse_args(argv)
    if sum(map(bool, (args.artifact, args.tiny, args.url))) != 1:
        p.error("give one of: an export folder, --tiny, --url")
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be a loopback address (127.0.0.1): this benchmark sends load to this machine only")
    duration = min(args.duration, HARD_CAP_SECONDS)
    max_requests = min(args.max_requests, HARD_CAP_REQUESTS)

    with tempfile.TemporaryDirectory() as tmp:
        artifact = None if args.url else Path(args.artifact) if args.artifact else export_tiny(Path(tmp))
        squad = Path(args.squad)
        questions = squad_questions(squad, args.questions) if squad.is_file() else BUILTIN[:args.questions]
        server = RunningServer(args.url) if args.url else ServerProcess(server_argv(artifact, args),
                                                                        ready_timeout_s=args.ready_timeout)
        try:
            expected, single, kept = [], [], []
            for q, c in questions:  # one at a time: the reference answers and the unloaded latency
                status, body, _ = request_json(server.url + "/v1/answer", "POST", {"question": q, "context": c})
                if status == 413:
                    continue  # longer than the model's context: not a load-test input
                if status != 200:
                    print(f"single request failed: {status} {body}", file=sys.stderr)
                    return 1
                kept.append((q, c))
                expected.append(body["answer"])
                single.append(body["latency_ms"])
            skipped, questions = len(questions) - len(kept), kept
            if not questions:
                print("every question is longer than the model's context: use --squad '' (built-in ones)",
                      file=sys.stderr)
                return 1
            result = run_load(server.url, questions, expected, args.clients, duration, max_requests)
            result["server_metrics"] = request_json(server.url + "/metrics?format=json")[1]
            result["max_new_tokens"] = request_json(server.url + "/healthz")[1].get("max_new_tokens")
        finally:
            # Queued requests are answered (or time out after 60 s) before a graceful exit.
            code = server.stop(timeout_s=180)
        result.update(artifact=str(artifact) if artifact else None, url=args.url, tiny=args.tiny, questions=len(questions), skipped_too_long=skipped,
                      question_source=str(squad) if squad.is_file() else "built-in",
                      single_request_latency_ms={"p50": round(percentile(single, 50), 1)},
                      max_queue=result["server_metrics"].get("max_queue"), server_exit_code=None if args.url else code)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    failed = result["wrong"] or result["lost"] or result["other_status"] or code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
