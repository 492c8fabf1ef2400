"""kd2edge.package.docker: command lines and failure reports without Docker, and one slow real build and run."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from kd2edge.errors import ConfigError, ResourceError, StageError
from kd2edge.package import docker as dk


def _fake_docker(folder: Path, script: str) -> Path:
    """A `docker` executable (bash) in `folder`; put `folder` first on PATH to use it."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "docker"
    exe.write_text("#!/bin/bash\n" + textwrap.dedent(script))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


@pytest.fixture
def no_docker(tmp_path, monkeypatch):
    """PATH holds nothing but an empty folder (so no docker, dockerd or debootstrap)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_status_without_client(no_docker):
    ok, reason = dk.docker_status()
    assert not ok
    assert reason.startswith("no docker client on PATH")
    assert "apt-get install docker.io" in reason


def test_status_daemon_down(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", """\
        echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?" >&2
        exit 1
        """)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    ok, reason = dk.docker_status()
    assert not ok
    assert "does not answer" in reason and "Cannot connect to the Docker daemon" in reason
    assert "\n" not in reason


def test_status_daemon_hangs(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", "exec sleep 30\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    t0 = time.monotonic()
    ok, reason = dk.docker_status(timeout_s=1)
    assert not ok and "did not answer" in reason
    assert time.monotonic() - t0 < 10


def test_status_ok(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", 'if [ "$1" = info ]; then echo 20.10.24; fi\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    ok, reason = dk.docker_status()
    assert ok and "20.10.24" in reason


def test_ensure_daemon_reports_what_is_missing(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", 'echo "Cannot connect to the Docker daemon" >&2; exit 1\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # a client, but no dockerd
    with pytest.raises(ResourceError, match="no dockerd on PATH.*apt-get install docker.io"):
        dk.ensure_daemon(timeout_s=1)

    dockerd = tmp_path / "bin" / "dockerd"
    dockerd.write_text("#!/bin/bash\nexit 1\n")
    dockerd.chmod(0o755)
    monkeypatch.setattr(dk.os, "geteuid", lambda: 1000)
    with pytest.raises(ResourceError, match="needs root") as err:
        dk.ensure_daemon(timeout_s=1)
    assert "\n" not in str(err.value)


def test_ensure_daemon_reports_a_dockerd_that_dies(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", 'echo "Cannot connect to the Docker daemon" >&2; exit 1\n')
    dockerd = tmp_path / "bin" / "dockerd"
    dockerd.write_text('#!/bin/bash\necho "failed to start daemon: error initializing graphdriver" >&2\nexit 1\n')
    dockerd.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(dk.os, "geteuid", lambda: 0)
    with pytest.raises(ResourceError, match="dockerd exited \\(1\\) before answering.*graphdriver"):
        dk.ensure_daemon(timeout_s=20, log_dir=tmp_path / "logs")
    assert (tmp_path / "logs" / "dockerd.log").is_file()


def test_ensure_daemon_leaves_a_running_daemon_alone(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", "echo 20.10.24\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    out = dk.ensure_daemon()
    assert out["started"] is False and "20.10.24" in out["reason"]


def test_dockerd_argv():
    assert dk.dockerd_argv() == ["dockerd", "--bridge=none", "--iptables=false"]


def test_build_argv_and_env():
    assert dk.build_argv("/ctx", "kd2edge/x:1") == ["build", "--network", "host", "-t", "kd2edge/x:1", "/ctx"]
    argv = dk.build_argv(Path("/ctx"), "t", platform="linux/arm64", build_args={"A": "1"})
    assert argv == ["build", "--network", "host", "-t", "t", "--platform", "linux/arm64", "--build-arg", "A=1", "/ctx"]
    assert dk.build_env()["DOCKER_BUILDKIT"] == "0"  # the legacy builder: no registry for `# syntax=`


def test_run_argv():
    argv = dk.run_argv("img:1", ["serve", "--port", 8080], env={"A": "b c"}, user="10001", name="n",
                       labels={"k": "v"})
    assert argv == ["run", "--detach", "--network", "host", "--name", "n", "--user", "10001",
                    "--env", "A=b c", "--label", "k=v", "img:1", "serve", "--port", "8080"]
    assert dk.run_argv("img") == ["run", "--detach", "--network", "host", "img"]


def test_debootstrap_argv():
    argv = dk.debootstrap_argv("/r", "bookworm", "http://m/debian", arch="arm64")
    assert argv == ["debootstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates",
                    "--arch=arm64", "bookworm", "/r", "http://m/debian"]
    assert "--arch" not in " ".join(dk.debootstrap_argv("/r"))


def test_apt_mirror(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm\n")
    assert dk.apt_mirror((tmp_path / "d",)) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("# deb http://no/debian x main\n"
                                           "deb [arch=amd64] http://old.example/debian bookworm main\n")
    assert dk.apt_mirror((tmp_path / "sources.list",)) == "http://old.example/debian"
    assert dk.apt_mirror((tmp_path / "missing",)) == dk.DEFAULT_MIRROR


def test_platforms():
    assert dk.host_platform() in ("linux/amd64", "linux/arm64")
    arm = dk.stand_in_tag("python:3.11-slim-bookworm", "linux/arm64")
    assert arm == "kd2edge-stand-in/python:3.11-slim-bookworm-arm64"
    assert dk.stand_in_tag("docker.io/library/python", "linux/amd64") == "kd2edge-stand-in/python:latest-amd64"
    with pytest.raises(ConfigError, match="linux/riscv64 is not supported"):
        dk.stand_in_tag("python:3.11", "linux/riscv64")
    assert dk.binfmt_status(dk.host_platform()) == (True, "native")


def test_binfmt_status_reads_the_kernel_entry(tmp_path, monkeypatch):
    other = "linux/arm64" if dk.host_platform() == "linux/amd64" else "linux/amd64"
    qemu = dk.ARCHES[other][1]
    monkeypatch.setattr(dk, "BINFMT_DIR", tmp_path)
    ok, reason = dk.binfmt_status(other)
    assert not ok and "binfmt_misc is not mounted" in reason
    (tmp_path / "status").write_text("enabled\n")
    ok, reason = dk.binfmt_status(other)
    assert not ok and "install qemu-user-static" in reason
    (tmp_path / f"qemu-{qemu}").write_text(f"enabled\ninterpreter /usr/libexec/qemu-binfmt/{qemu}-binfmt-P\nflags: P\n")
    ok, reason = dk.binfmt_status(other)
    assert not ok and "F flag" in reason
    (tmp_path / f"qemu-{qemu}").write_text(f"enabled\ninterpreter /usr/bin/qemu-{qemu}-static\nflags: PF\n")
    assert dk.binfmt_status(other)[0]


def test_rootfs_tarball_needs_root_and_debootstrap(tmp_path, monkeypatch, no_docker):
    monkeypatch.setattr(dk.os, "geteuid", lambda: 1000)
    with pytest.raises(ResourceError, match="needs root"):
        dk.rootfs_tarball(tmp_path, platform=dk.host_platform())
    monkeypatch.setattr(dk.os, "geteuid", lambda: 0)
    with pytest.raises(ResourceError, match="apt-get install debootstrap"):
        dk.rootfs_tarball(tmp_path, platform=dk.host_platform())


def test_rootfs_tarball_is_cached(tmp_path, no_docker):
    key = dk.hashlib.sha256(f"bookworm amd64 {','.join(dk.BASE_PACKAGES)}".encode()).hexdigest()[:8]
    cached = tmp_path / f"rootfs-bookworm-amd64-{key}.tar.gz"
    cached.write_bytes(b"x")
    path, made = dk.rootfs_tarball(tmp_path, platform="linux/amd64", mirror="http://m/debian")
    assert path == cached and made["action"] == "cached"


def test_finish_rootfs(tmp_path):
    fs = tmp_path / "fs"
    for rel in ("usr/lib/python3.11/EXTERNALLY-MANAGED", "usr/share/doc/x/copyright",
                "var/cache/apt/archives/a.deb", "var/lib/apt/lists/l", "usr/lib/python3/x/__pycache__/a.pyc"):
        (fs / rel).parent.mkdir(parents=True, exist_ok=True)
        (fs / rel).write_text("x")
    dk._finish_rootfs(fs)
    assert not (fs / "usr/lib/python3.11/EXTERNALLY-MANAGED").exists()
    assert not list((fs / "usr/share/doc").iterdir()) and not list((fs / "var/lib/apt/lists").iterdir())
    assert not (fs / "var/cache/apt/archives/a.deb").exists()
    assert not (fs / "usr/lib/python3/x/__pycache__").exists()
    assert os.readlink(fs / "usr/local/bin/python") == "/usr/bin/python3"
    assert os.readlink(fs / "usr/local/bin/pip") == "/usr/bin/pip3"


def test_build_failure_reports_the_log_tail(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", """\
        [ "$DOCKER_BUILDKIT" = 0 ] || { echo "not the legacy builder" >&2; exit 3; }
        for ((i = 1; i <= 40; i++)); do echo "Step $i"; done
        echo "pull access denied for python, repository does not exist" >&2
        exit 1
        """)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM python:3.11-slim-bookworm\n")
    with pytest.raises(StageError) as err:
        dk.build_image(ctx, "kd2edge/t:1", log_path=tmp_path / "build.log", tail_lines=5)
    msg = str(err.value)
    assert "docker build of kd2edge/t:1 failed (exit 1)" in msg and "ensure_base_image" in msg
    assert "Step 40" in msg and "Step 30" not in msg and "\n" not in msg
    assert "Step 1\n" in (tmp_path / "build.log").read_text()


def test_build_timeout(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", 'echo "Step 1/3"; exec sleep 30\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM x\n")
    t0 = time.monotonic()
    with pytest.raises(StageError, match="did not finish within 1 s.*Step 1/3"):
        dk.build_image(ctx, "t", timeout_s=1)
    assert time.monotonic() - t0 < 15


def test_build_needs_a_dockerfile(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", "exit 0\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(StageError, match="has no Dockerfile"):
        dk.build_image(tmp_path, "t")


def test_calls_without_client_raise_resource_errors(no_docker, tmp_path):
    for call in (lambda: dk.image_size("x"), lambda: dk.build_image(tmp_path, "t"),
                 lambda: dk.run_container("x"), lambda: dk.stop_container("c"), lambda: dk.container_health("c")):
        with pytest.raises(ResourceError, match="no docker client"):
            call()


def test_run_container_refuses_a_busy_port(tmp_path, monkeypatch):
    import socket

    _fake_docker(tmp_path / "bin", "echo should-not-run; exit 1\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ResourceError, match=f"port {s.getsockname()[1]} on 127.0.0.1 is in use"):
            dk.run_container("img", port=s.getsockname()[1])


def test_container_calls_parse_docker_output(tmp_path, monkeypatch):
    _fake_docker(tmp_path / "bin", """\
        case "$1" in
          run) echo "Unable to find image locally" >&2; echo 0123abcd ;;
          stop) echo "$3" ;;
          inspect) case "$3" in *Health*) echo healthy ;; *ExitCode*) echo 0 ;; esac ;;
          rm) echo "$3" ;;
          image) [ "$5" = there ] && echo 1234 || { echo "No such image: $5" >&2; exit 1; } ;;
        esac
        """)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert dk.run_container("img", args=["x"]) == "0123abcd"
    assert dk.container_health("0123abcd") == "healthy"
    assert dk.stop_container("0123abcd", timeout_s=5) == 0
    assert dk.image_size("there") == 1234
    assert dk.image_size("missing") is None


def test_module_is_torch_free():
    code = "import sys, kd2edge.package.docker; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------- slow: real docker

SERVER = ("import os, runpy, signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
          "sys.argv[1:] = ['--bind', '127.0.0.1', os.environ['PORT']]; "
          "runpy.run_module('http.server', run_name='__main__', alter_sys=True)")
HEALTH = "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ['PORT'], timeout=2)"


@pytest.mark.slow
def test_build_and_run_http_server(tmp_path, docker_ready):
    """A trivial image serving `python -m http.server` on the host network: HTTP 200, healthy, exit 0 on stop."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "index.html").write_text("kd2edge docker test\n")
    (ctx / "Dockerfile").write_text(textwrap.dedent(f"""\
        # syntax=docker/dockerfile:1
        FROM {dk.DEFAULT_BASE_IMAGE}
        WORKDIR /srv
        COPY index.html /srv/index.html
        HEALTHCHECK --interval=1s --timeout=3s --retries=30 CMD ["python", "-c", "{HEALTH}"]
        ENTRYPOINT ["python", "-c", "{SERVER}"]
        """))
    tag = "kd2edge-test/http-server:latest"
    built = dk.build_image(ctx, tag, timeout_s=600)
    assert built["image_id"].startswith("sha256:") and built["size_bytes"] > 10_000_000
    assert dk.image_size(tag) == built["size_bytes"]

    port = dk.free_port()
    cid = dk.run_container(tag, port=port, env={"PORT": str(port)}, user="65534:65534")
    try:
        body, deadline = None, time.monotonic() + 60
        while body is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2) as resp:
                    assert resp.status == 200
                    body = resp.read().decode()
            except OSError:
                assert dk.container_state(cid)["status"] == "running", dk.container_logs(cid)
                time.sleep(0.3)
        assert body == "kd2edge docker test\n", dk.container_logs(cid)
        deadline = time.monotonic() + 60
        while dk.container_health(cid) != "healthy" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert dk.container_health(cid) == "healthy", dk.container_logs(cid)
    except BaseException:
        dk.stop_container(cid, timeout_s=5)
        raise
    assert dk.stop_container(cid, timeout_s=20) == 0
