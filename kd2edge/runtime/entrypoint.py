"""The serving image's entrypoint: `serve`, `profile` or `healthcheck`.

    python -m kd2edge.runtime.entrypoint serve [--port N] [--max-new-tokens N] ...
    python -m kd2edge.runtime.entrypoint profile [--out DIR]
    python -m kd2edge.runtime.entrypoint healthcheck

Defaults come from `settings.json` beside the `kd2edge` folder (written by `kd2edge
package` from the device profile); the artifact is the `artifact/` folder there.
Torch-free and without kd2edge's CLI (argparse): it runs in the image, which holds only
the runtime libraries.

Environment (the image sets both):
    KD2EDGE_PORT         the port `serve` listens on unless --port says otherwise
    KD2EDGE_READY_FILE   `serve` writes its bound address there once it listens, and
                         `healthcheck` probes that address: the HEALTHCHECK follows the
                         port the server really uses (--port, KD2EDGE_PORT or port 0)

A model that cannot be loaded (a file the image's user cannot read, a damaged artifact)
is one line on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from kd2edge.errors import ConfigError, Kd2EdgeError
from kd2edge.runtime.service import QUEUE_TIMEOUT_S

MIB = 2**20
PORT_ENV = "KD2EDGE_PORT"
READY_FILE_ENV = "KD2EDGE_READY_FILE"


def app_dir() -> Path:
    """The folder holding `kd2edge/`, `settings.json` and `artifact/` (/app in the image)."""
    return Path(__file__).resolve().parents[2]


def load_settings(folder: Path) -> dict:
    """Read `settings.json` from `folder`.

    Raises:
        ConfigError: missing or unreadable (the image was not built from a `kd2edge package` context).
    """
    path = folder / "settings.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: build the image from a `kd2edge package` context",
                          source="entrypoint") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}): re-run `kd2edge package`", source="entrypoint") from None


def env_port(environ: dict[str, str], default: int) -> int:
    """The port named by KD2EDGE_PORT, else `default`.

    Raises:
        ConfigError: KD2EDGE_PORT is set but is not a port number.
    """
    value = environ.get(PORT_ENV, "").strip()
    if not value:
        return int(default)
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise ConfigError(f"{PORT_ENV}={value!r} is not a port number: set it to 0-65535", source="entrypoint")
    return int(value)


def health_target(port: int | None, settings: dict, environ: dict[str, str]) -> tuple[str, int]:
    """Where `healthcheck` probes: --port if given, else the address the running server wrote to
    KD2EDGE_READY_FILE, else KD2EDGE_PORT, else the settings' port; on loopback unless the
    server listens on one address only.

    Args:
        port: the --port option (None when not given).
        settings: the image's settings.
        environ: the environment.

    Returns:
        (host, port).
    """
    if port is not None:
        return "127.0.0.1", port
    ready = environ.get(READY_FILE_ENV)
    if ready:
        try:
            where = json.loads(Path(ready).read_text(encoding="utf-8"))
            host = where["host"] if where["host"] not in ("0.0.0.0", "::", "") else "127.0.0.1"
            return host, int(where["port"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not (yet) written: fall back to the configured port
    try:
        return "127.0.0.1", env_port(environ, settings["port"])
    except ConfigError:
        return "127.0.0.1", int(settings["port"])


def parser(settings: dict, environ: dict[str, str]) -> argparse.ArgumentParser:
    """The image's command line, with defaults from the settings and the environment.

    Raises:
        ConfigError: KD2EDGE_PORT is not a port number.
    """
    p = argparse.ArgumentParser(prog="kd2edge-image", description="kd2edge serving image")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve", help="serve the artifact over HTTP (POST /v1/answer, GET /healthz, GET /metrics)")
    s.add_argument("--host", default=settings["host"])
    s.add_argument("--port", type=int, default=env_port(environ, settings["port"]),
                   help=f"0 picks a free port (printed when ready) [default: ${PORT_ENV}, else the settings']")
    s.add_argument("--max-new-tokens", type=int, default=settings["max_new_tokens"])
    s.add_argument("--max-queue", type=int, default=settings["max_queue"],
                   help="requests waiting behind the running one before 503")
    s.add_argument("--queue-timeout", type=float, default=QUEUE_TIMEOUT_S,
                   help="seconds a request may wait for the model before 503")
    s.add_argument("--threads", type=int, default=settings["threads"])
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="access log: a text line or one JSON object per request")
    s.add_argument("--quiet", action="store_true", help="no access log")
    pr = sub.add_parser("profile", help="measure latency and memory on this device against the profile's budgets")
    pr.add_argument("--out", default=None, help="also write profile.json into this folder")
    pr.add_argument("--repeats", type=int, default=settings["profiling"]["repeats"])
    h = sub.add_parser("healthcheck", help="exit 0 when the local server answers GET /healthz")
    h.add_argument("--port", type=int, default=None,
                   help=f"[default: the running server's (${READY_FILE_ENV}), else ${PORT_ENV}, else the settings']")
    return p


def run_serve(args: argparse.Namespace, settings: dict, artifact: Path, environ: dict[str, str]) -> int:
    """Serve until SIGTERM; 0 after a graceful stop."""
    from kd2edge.runtime.serve import serve

    serve(artifact, host=args.host, port=args.port, providers=settings["providers"], threads=args.threads,
          allow_fallback=settings["allow_fallback"], max_new_tokens=args.max_new_tokens, max_queue=args.max_queue,
          context_length=settings["context_length"], log_format=None if args.quiet else args.log_format,
          ready_file=environ.get(READY_FILE_ENV) or None, queue_timeout_s=args.queue_timeout)
    return 0


def run_profile(args: argparse.Namespace, settings: dict, artifact: Path) -> int:
    """Measure the artifact on this device; 0 when every budget passes, 7 when one fails."""
    from kd2edge.runtime.access import check_readable
    from kd2edge.runtime.budgets import budget_verdicts
    from kd2edge.runtime.profiler import ProfileRequest, measure, peak_memory_mb

    check_readable(artifact)
    prof = settings["profiling"]
    request = ProfileRequest(artifact=str(artifact), providers=tuple(settings["providers"]),
                             threads=settings["threads"], prompt_lengths=tuple(prof["prompt_lengths"]),
                             new_tokens=prof["new_tokens"], warmup=prof["warmup"], repeats=args.repeats,
                             context_length=settings["context_length"], allow_fallback=settings["allow_fallback"],
                             shared_memory=prof["shared_memory"])
    result = measure(request)
    peak_mb, peak_as = peak_memory_mb(result)
    measured = {"size_mb": result["size_bytes"] / MIB, "peak_memory_mb": peak_mb,
                "ttft_ms_p50": result["latency"]["ttft_ms_p50"],
                "decode_tokens_per_s": result["latency"]["decode_tokens_per_s"]}
    report = {"profile": settings["profile"], "providers": result["providers"], "notes": result["notes"],
              "latency": result["latency"], "size_bytes": result["size_bytes"], "peak_rss_mb": result["peak_rss_mb"],
              "peak_memory_mb": peak_mb, "peak_memory_measured_as": peak_as,
              "shared_memory": result["shared_memory"], "host": result["host"],
              "budgets": budget_verdicts(settings["budgets"], measured)}
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0 if all(v["pass"] is not False for v in report["budgets"].values()) else 7


def run_healthcheck(args: argparse.Namespace, settings: dict, environ: dict[str, str]) -> int:
    """0 when the server answers GET /healthz with 200, else 1 (what Docker's HEALTHCHECK reads)."""
    host, port = health_target(args.port, settings, environ)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


def main(argv: list[str] | None = None) -> int:
    """Run one mode; user errors print one line and return their exit code."""
    folder = app_dir()
    environ = dict(os.environ)
    try:
        settings = load_settings(folder)
        args = parser(settings, environ).parse_args(argv)
        artifact = folder / settings["artifact"]
        if args.mode == "serve":
            return run_serve(args, settings, artifact, environ)
        if args.mode == "profile":
            return run_profile(args, settings, artifact)
        return run_healthcheck(args, settings, environ)
    except Kd2EdgeError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
