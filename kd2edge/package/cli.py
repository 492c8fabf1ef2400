"""`kd2edge package` and `kd2edge serve`."""

from __future__ import annotations

from pathlib import Path

import click

from kd2edge.cli_common import config_option, emit, info, json_option, profile_option
from kd2edge.runtime.service import QUEUE_TIMEOUT_S


@click.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@profile_option
@config_option
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="The build context folder to write.")
@click.option("--image-name", default=None, help="Image repository name. [default: kd2edge-model]")
@click.option("--port", type=int, default=None, help="Port the server listens on in the image. [default: 8080]")
@click.option("--max-new-tokens", type=int, default=None, help="Tokens per served answer. [default: 24]")
@click.option("--no-smoke-test", is_flag=True, help="Skip serving one question from the context as a check.")
@click.option("--build", "build_image", is_flag=True,
              help="Also build the image with Docker, run it (host platform) and record id, size and times.")
@click.option("--force", is_flag=True, help="Rewrite the context even if it is up to date.")
@json_option
def package(artifact, profile, config_file, out, image_name, port, max_new_tokens, no_smoke_test, build_image, force,
            as_json):
    """Write a Docker build context (Dockerfile, pinned runtime, artifact, entrypoint) for a profile.

    ARTIFACT is the output folder of `kd2edge export`. The image's entrypoint has two
    modes: `serve` (default) and `profile`. Prints the docker build command to use; with
    --build it runs it (starting dockerd when none answers and this is root; without a
    registry the python base image is made from Debian packages), then runs the image on
    a free loopback port and checks it answers, becomes healthy and stops with exit 0.
    """
    from kd2edge.artifacts import Artifact
    from kd2edge.config import load_config
    from kd2edge.pipeline import run_stage

    overrides = {"package.image_name": image_name, "package.port": port, "package.max_new_tokens": max_new_tokens,
                 "package.smoke_test": False if no_smoke_test else None, "package.build": True if build_image else None}
    config = load_config(config_file, profile=profile, overrides=overrides)
    source = Artifact.load(artifact, stage="export")
    info(f"packaging {source.path} for {config.profile.name} ({config.profile.docker.platform}) into {out}")
    result = run_stage("package", config, source, Path(out), force=force)
    m = result.artifact.metrics
    summary = {"status": result.status, "context_dir": m["context_dir"], "image": m["image"],
               "platform": m["platform"], "build_command": m["build_command"], "requirements": m["requirements"],
               "checks": m["checks"], "build": m.get("build")}
    emit(summary, as_json, _summary)


def _summary(s: dict) -> str:
    from kd2edge.package.context import build_note
    from kd2edge.package.docker import host_platform

    smoke = s["checks"].get("smoke")
    smoke_line = (f"smoke test: answered {smoke['answer']!r} on {', '.join(smoke['providers'] or [])}, "
                  f"matches the runtime" if isinstance(smoke, dict) else f"smoke test: {smoke}")
    lines = [
        f"build context: {s['context_dir']} ({s['status']})",
        f"image: {s['image']} ({s['platform']})",
        f"requirements: {', '.join(s['requirements'])}",
        f"hadolint: {s['checks']['hadolint'] if isinstance(s['checks']['hadolint'], str) else 'findings'}",
        smoke_line,
    ]
    built = s.get("build")
    if built:
        mib = 2**20
        lines.append(f"built: {built['image_id'][:19]} in {built['build_seconds']:.1f} s, "
                     f"{built['size_bytes'] / mib:.0f} MiB (base {built['base']['image']}: "
                     f"{(built['base_size_bytes'] or 0) / mib:.0f} MiB, {built['base']['action']})")
        run = built["run"]
        lines.append(f"ran: healthy {run['healthy_seconds']:.1f} s after docker run, answered {run['answer']!r} "
                     f"in {run['answer_latency_ms']:.0f} ms, docker stop exit {run['exit_code']}"
                     if isinstance(run, dict) else f"ran: {run}")
    else:
        lines += ["build with:", f"  {s['build_command']}"]
        if s["platform"] != host_platform():
            lines.append(f"  ({build_note(s['platform'])})")
    lines.append(f"run with:   docker run --rm -p PORT:PORT {s['image']}   (profile on the device: ... {s['image']} profile)")
    return "\n".join(lines)


@click.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port (0 picks a free one, printed when ready).")
@profile_option
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=24, show_default=True,
              help="Tokens per answer (greedy).")
@click.option("--max-queue", type=click.IntRange(0, 1024), default=8, show_default=True,
              help="Requests waiting behind the running one before 503.")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="onnxruntime threads (0: one per core). [default: the profile's, else onnxruntime's]")
@click.option("--queue-timeout", type=click.FloatRange(min=0.1), default=QUEUE_TIMEOUT_S, show_default=True,
              help="Seconds a request may wait for the model before 503.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Access log: a text line, or one JSON object per request.")
@click.option("--quiet", is_flag=True, help="No access log.")
def serve(artifact, host, port, profile, max_new_tokens, max_queue, threads, queue_timeout, log_format, quiet):
    """Serve an exported artifact over HTTP: POST /v1/answer, GET /healthz, GET /metrics.

    The same server the packaged image runs (uvicorn + Starlette). GET /metrics is
    Prometheus text (`?format=json` for a JSON summary). SIGTERM or Ctrl-C finishes the
    requests in flight and exits 0.
    """
    from kd2edge.profiles import load_profile
    from kd2edge.runtime.serve import serve as run_server

    providers, context_length, fallback = None, 2048, False
    if profile is not None:
        p = load_profile(profile)
        providers = list(p.runtime.execution_providers)
        threads = threads or p.runtime.threads
        context_length = p.runtime.context_length
        fallback = providers != ["CPUExecutionProvider"]
    run_server(artifact, host=host, port=port, providers=providers, threads=threads, allow_fallback=fallback,
               max_new_tokens=max_new_tokens, max_queue=max_queue, context_length=context_length,
               log_format=None if quiet else log_format, queue_timeout_s=queue_timeout)
