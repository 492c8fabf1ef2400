"""Build a package context into an image and check the image by running it: `kd2edge package --build`.

`build` makes sure a daemon answers, gets the base image (present, pulled, or, for the official
python images on a machine without a registry, the Debian stand-in of `docker.ensure_base_image`)
and runs `docker build`. `check_container` starts the image on the host network on a free
loopback port, as its own user, and records what it sees: the time to the first answer of
/healthz, one answer and its latency, the status of a bad request, the time until Docker's
HEALTHCHECK reports healthy, and the exit code of `docker stop`. The package stage decides
from these whether the image passes.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from kd2edge.errors import ResourceError, StageError
from kd2edge.package import docker as dk

BUILD_TIMEOUT_S = 1800.0
PULL_TIMEOUT_S = 600.0
START_TIMEOUT_S = 180.0      # from `docker run` to the first /healthz answer (the model loads first)
HEALTHY_TIMEOUT_S = 90.0     # then until Docker's HEALTHCHECK says healthy (its interval is 10 s)


def prepare_base(name: str, platform: str, kind: str) -> dict:
    """Make sure the base image `name` is in the local store for `platform`.

    Args:
        name: the Dockerfile's FROM image.
        platform: e.g. linux/amd64.
        kind: "python" (an official python image, which a Debian stand-in can replace) or "l4t".

    Returns:
        {"image", "platform", "action": "present" | "pulled" | "retagged" | "imported", ...}: what was done;
        "retagged" and "imported" mean the Debian stand-in is used (no registry answered).

    Raises:
        ResourceError: the image is absent, cannot be pulled, and no stand-in can be made for it.
    """
    if dk.image_platform(name) == platform:
        return {"image": name, "platform": platform, "action": "present"}
    pulled, why = dk.pull_image(name, platform, timeout_s=PULL_TIMEOUT_S)
    if pulled:
        return {"image": name, "platform": platform, "action": "pulled"}
    if kind != "python":
        raise ResourceError(f"base image {name} ({platform}) is not local and cannot be pulled ({why}): "
                            f"pull it where its registry answers and `docker load` it here")
    made = dk.ensure_base_image(name, platform=platform)
    made["pull_error"] = why
    return made


def build(context_dir, tag: str, platform: str, base_name: str, base_kind: str,
          log_path=None, timeout_s: float = BUILD_TIMEOUT_S) -> dict:
    """Build a package context into the image `tag`.

    Args:
        context_dir: the context folder (holds the Dockerfile).
        tag: the image's name:tag.
        platform: the platform to build for (another architecture than the host's needs QEMU).
        base_name, base_kind: the base image and its kind (see `prepare_base`).
        log_path: where the full build log is written.
        timeout_s: limit for the build.

    Returns:
        {"image_id", "size_bytes", "build_seconds", "base": prepare_base's result, "base_size_bytes",
        "daemon": ensure_daemon's reason}.

    Raises:
        ResourceError: no Docker, no daemon that can be started, no base image, no QEMU for `platform`.
        StageError: the build failed (the message holds the end of its log).
    """
    daemon = dk.ensure_daemon()
    if platform != dk.host_platform():
        dk.ensure_binfmt(platform)
    base = prepare_base(base_name, platform, base_kind)
    built = dk.build_image(context_dir, tag, platform=platform, timeout_s=timeout_s, log_path=log_path)
    return {"image_id": built["image_id"], "size_bytes": built["size_bytes"], "build_seconds": built["seconds"],
            "base": base, "base_size_bytes": dk.image_size(base_name), "daemon": daemon["reason"]}


def _one_line(text: str, limit: int = 600) -> str:
    """Container output as one line (errors are one line), keeping its end."""
    line = " | ".join(s.strip() for s in text.splitlines() if s.strip())
    return line if len(line) <= limit else "..." + line[-limit:]


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; 4xx/5xx are returned, not raised.

    Raises:
        OSError: no connection.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def _post_json(url: str, body: bytes, timeout_s: float = 120.0) -> tuple[int, dict]:
    """(status, parsed JSON) of a JSON POST; 4xx/5xx are returned, not raised.

    Raises:
        OSError: no connection.
    """
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"{}")


def check_container(tag: str, question: str, context: str, platform: str | None = None,
                    start_timeout_s: float = START_TIMEOUT_S, healthy_timeout_s: float = HEALTHY_TIMEOUT_S) -> dict:
    """Run the image's server on a free loopback port (host network) and record what it does.

    The server is told its port with `serve --port N`, so the HEALTHCHECK must find that port itself.

    Args:
        tag: the image.
        question, context: one question to ask.
        platform: the image's platform (None: the host's).
        start_timeout_s: how long the server may take to answer /healthz.
        healthy_timeout_s: how long after that Docker may take to report healthy.

    Returns:
        {"port", "user", "listen_seconds" (docker run -> /healthz 200), "answer", "answer_latency_ms",
        "request_seconds", "bad_request_status", "health", "healthy_seconds" (docker run -> healthy),
        "exit_code" (of docker stop), "logs" (the last lines when something failed)}.

    Raises:
        StageError: the container exited or did not answer /healthz within `start_timeout_s`.
    """
    port = dk.free_port()
    started = time.monotonic()
    cid = dk.run_container(tag, port=port, args=["serve", "--port", str(port)], platform=platform)
    url = f"http://127.0.0.1:{port}"
    out: dict = {"port": port, "user": dk.image_inspect(tag, "{{.Config.User}}")}
    try:
        deadline = started + start_timeout_s
        while True:
            try:
                if _get(url + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            state = dk.container_state(cid)
            if state["status"] != "running":
                raise StageError(f"the container exited ({state['exit_code']}) before serving: "
                                 f"{_one_line(dk.container_logs(cid, 8))}")
            if time.monotonic() > deadline:
                raise StageError(f"the container did not answer /healthz within {start_timeout_s:.0f} s: "
                                 f"{_one_line(dk.container_logs(cid, 8))}")
            time.sleep(0.2)
        out["listen_seconds"] = round(time.monotonic() - started, 2)
        t0 = time.perf_counter()
        status, body = _post_json(url + "/v1/answer", json.dumps({"question": question, "context": context}).encode())
        out["request_seconds"] = round(time.perf_counter() - t0, 4)
        out["answer_status"], out["answer"], out["answer_latency_ms"] = status, body.get("answer"), body.get("latency_ms")
        out["bad_request_status"] = _post_json(url + "/v1/answer", b'{"question": 1}')[0]
        health_deadline = time.monotonic() + healthy_timeout_s
        while (health := dk.container_health(cid)) not in ("healthy", "unhealthy", None) \
                and time.monotonic() < health_deadline:
            time.sleep(0.5)
        out["health"] = health
        if health == "healthy":
            out["healthy_seconds"] = round(time.monotonic() - started, 2)
        else:
            out["logs"] = dk.container_logs(cid, 20)
    except BaseException:
        dk.stop_container(cid, timeout_s=5)
        raise
    out["exit_code"] = dk.stop_container(cid, timeout_s=30)
    return out
