"""Docker plumbing: find or start a daemon, make a stand-in base image, build, run and stop images.

Used by `kd2edge package --build` and the slow Docker test. Nothing happens at import time and
nothing here imports torch; every call to `docker`, `dockerd` or `debootstrap` has a timeout.

Machines without a reachable registry cannot pull `python:3.11-slim-bookworm`. `ensure_base_image`
then makes a local stand-in with that name from Debian packages (debootstrap + `docker load`),
so the package stage's Dockerfiles build unchanged. Containers run with `--network host` and
builds use `--network host` too: only loopback addresses are used, no bridge is needed.

Builds use Docker's legacy builder (`DOCKER_BUILDKIT=0`): it treats the templates'
`# syntax=docker/dockerfile:1` line as a comment, where BuildKit would fetch that frontend image
from a registry, and it needs no buildx plugin.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import platform as _platform
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kd2edge.errors import ConfigError, ResourceError, StageError

DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
DOCKERD_ARGV = ("dockerd", "--bridge=none", "--iptables=false")
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")  # local CAs (e.g. a TLS-inspecting proxy's) to trust
STAND_IN_LABEL = "org.kd2edge.stand-in"
STAND_IN_REPO = "kd2edge-stand-in"  # per-architecture copies: kd2edge-stand-in/python:3.11-slim-bookworm-arm64
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")

# Docker platform -> (Debian architecture, qemu/binfmt name).
ARCHES = {"linux/amd64": ("amd64", "x86_64"), "linux/arm64": ("arm64", "aarch64")}
_MACHINE_TO_PLATFORM = {"x86_64": "linux/amd64", "amd64": "linux/amd64", "aarch64": "linux/arm64",
                        "arm64": "linux/arm64"}
# The Debian package that provides each program called here.
_PACKAGES = {"docker": "docker.io", "dockerd": "docker.io", "debootstrap": "debootstrap", "mount": "mount",
             "update-binfmts": "binfmt-support", "tar": "tar"}
# Trimmed from the stand-in's root file system, like the official slim images (apt lists are refetched).
_TRIM = ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*", "usr/share/doc/*",
         "usr/share/man/*", "usr/share/locale/*")


# ----------------------------------------------------------------------------------------- helpers

def _run(argv: list[str], timeout_s: float, env: dict | None = None, input: str | None = None,
         cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing text output.

    Raises:
        ResourceError: the program is not installed.
        StageError: it ran longer than `timeout_s` (it is killed).
    """
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, input=input,
                              cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        package = _PACKAGES.get(Path(argv[0]).name, Path(argv[0]).name)
        raise ResourceError(f"{argv[0]} is not installed: install it (apt-get install {package})") from None
    except subprocess.TimeoutExpired:
        raise StageError(f"`{' '.join(argv[:3])} ...` did not finish within {timeout_s:.0f} s: "
                         f"check the daemon (docker info) and retry") from None


def _one_line(text: str, limit: int = 300) -> str:
    """Collapse output to one line (errors print as one line), keeping its end."""
    line = " | ".join(s.strip() for s in text.strip().splitlines() if s.strip())
    return line if len(line) <= limit else "..." + line[-limit:]


def docker_exe() -> str | None:
    """The `docker` client on PATH, or None."""
    return shutil.which("docker")


def _docker(*args: str, timeout_s: float = 60.0, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = docker_exe()
    if exe is None:
        raise ResourceError("no docker client on PATH: install Docker (apt-get install docker.io)")
    return _run([exe, *args], timeout_s, env=env)


def host_platform() -> str:
    """This machine's Docker platform, e.g. `linux/amd64`."""
    machine = _platform.machine().lower()
    return _MACHINE_TO_PLATFORM.get(machine, f"linux/{machine}")


def _arches(platform: str) -> tuple[str, str]:
    """(Debian arch, qemu arch) of a Docker platform.

    Raises:
        ConfigError: a platform other than linux/amd64 and linux/arm64.
    """
    try:
        return ARCHES[platform]
    except KeyError:
        raise ConfigError(f"platform {platform} is not supported: use one of {', '.join(ARCHES)}",
                          source="docker") from None


def _cache_root(cache_dir: str | Path | None) -> Path:
    """Where rootfs tarballs are kept: `cache_dir`, else $KD2EDGE_CACHE/docker, else ~/.cache/kd2edge/docker."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("KD2EDGE_CACHE") or Path.home() / ".cache" / "kd2edge") / "docker"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so two processes don't debootstrap the same tarball at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now at `host` (for a container on the host network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# ------------------------------------------------------------------------------------------ daemon

def docker_status(timeout_s: float = 15.0) -> tuple[bool, str]:
    """Whether a docker client exists and a daemon answers it.

    Args:
        timeout_s: how long to wait for `docker info`.

    Returns:
        (ok, reason): reason names the daemon's version when ok, else what is missing, in one line.
    """
    exe = docker_exe()
    if exe is None:
        return False, "no docker client on PATH: install Docker (apt-get install docker.io)"
    try:
        proc = subprocess.run([exe, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"the docker daemon did not answer `docker info` within {timeout_s:.0f} s"
    except OSError as e:
        return False, f"the docker client {exe} cannot run: {e}"
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version:
        why = _one_line(proc.stderr or proc.stdout) or f"docker info exited {proc.returncode}"
        return False, f"the docker daemon does not answer: {why}"
    return True, f"docker daemon {version} answers ({exe})"


def dockerd_argv() -> list[str]:
    """The command `ensure_daemon` starts: no bridge network and no iptables rules (host networking only)."""
    return list(DOCKERD_ARGV)


def ensure_daemon(timeout_s: float = 60.0, log_dir: str | Path | None = None) -> dict:
    """Make sure a Docker daemon answers, starting `dockerd --bridge=none --iptables=false` if none does.

    The daemon is started in its own session (it outlives this process) with its output in
    `log_dir/dockerd.log`. Starting one needs root and `dockerd` on PATH.

    Args:
        timeout_s: how long to wait for a daemon started here to answer.
        log_dir: folder for dockerd.log (default: the system temporary folder).

    Returns:
        {"started": bool, "reason": docker_status's reason, "seconds": float, and if started "pid", "log"}.

    Raises:
        ResourceError: no docker client or dockerd, not root, or the daemon started here did not answer.
    """
    t0 = time.monotonic()
    ok, reason = docker_status()
    if ok:
        return {"started": False, "reason": reason, "seconds": round(time.monotonic() - t0, 2)}
    if docker_exe() is None:
        raise ResourceError(reason)
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise ResourceError(f"{reason}; no dockerd on PATH to start one: install docker.io (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise ResourceError(f"{reason}; starting dockerd needs root: run "
                            f"`sudo {' '.join(DOCKERD_ARGV)} &` or start the docker service")
    log = Path(log_dir or tempfile.gettempdir()) / "dockerd.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen([dockerd, *DOCKERD_ARGV[1:]], stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        ok, reason = docker_status(timeout_s=max(1.0, min(10.0, deadline - time.monotonic())))
        if ok:
            return {"started": True, "reason": reason, "pid": proc.pid, "log": str(log),
                    "seconds": round(time.monotonic() - t0, 2)}
        if proc.poll() is not None:
            raise ResourceError(f"dockerd exited ({proc.returncode}) before answering: {_log_tail(log)} "
                                f"(full log: {log})")
    raise ResourceError(f"dockerd (pid {proc.pid}) did not answer within {timeout_s:.0f} s: {reason}; "
                        f"see {log}")


def _log_tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "(no log)"
    return _one_line("\n".join(lines))


# ------------------------------------------------------------------------------------------ images

def image_inspect(tag: str, fmt: str, timeout_s: float = 30.0) -> str | None:
    """`docker image inspect --format FMT TAG`, stripped; None if there is no such local image."""
    proc = _docker("image", "inspect", "--format", fmt, tag, timeout_s=timeout_s)
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_size(tag: str) -> int | None:
    """A local image's size in bytes (its layers, base included), or None if it is not there."""
    size = image_inspect(tag, "{{.Size}}")
    return int(size) if size else None


def image_platform(tag: str) -> str | None:
    """A local image's platform (`linux/arm64`), or None if it is not there."""
    return image_inspect(tag, "{{.Os}}/{{.Architecture}}")


def pull_image(name: str, platform: str, timeout_s: float = 600.0) -> tuple[bool, str]:
    """`docker pull --platform PLATFORM NAME`.

    Returns:
        (ok, reason): reason is docker's error in one line when the pull failed (no registry, no such tag).

    Raises:
        ResourceError: no docker client.
        StageError: the pull ran longer than `timeout_s`.
    """
    proc = _docker("pull", "--platform", platform, name, timeout_s=timeout_s)
    if proc.returncode == 0 and image_platform(name) == platform:
        return True, f"pulled {name} ({platform})"
    return False, _one_line(proc.stderr or proc.stdout or f"docker pull exited {proc.returncode}", 200)


def stand_in_tag(name: str, platform: str) -> str:
    """The local per-architecture copy of a stand-in: kd2edge-stand-in/python:3.11-slim-bookworm-arm64."""
    repo, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    return f"{STAND_IN_REPO}/{repo.rsplit('/', 1)[-1]}:{tag}-{_arches(platform)[0]}"


def apt_mirror(sources: tuple[str | Path, ...] = ("/etc/apt/sources.list.d", "/etc/apt/sources.list")) -> str:
    """The Debian mirror this machine's apt uses (first `.../debian` URI found), else deb.debian.org."""
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^URIs:\s*(\S+)", line) or re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
            if m and m.group(1).rstrip("/").endswith("/debian"):
                return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def debootstrap_argv(rootfs: str | Path, suite: str = "bookworm", mirror: str = DEFAULT_MIRROR,
                     arch: str | None = None, packages: tuple[str, ...] = BASE_PACKAGES) -> list[str]:
    """The debootstrap command that makes the stand-in's root file system (minbase plus `packages`)."""
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}"]
    if arch:
        argv.append(f"--arch={arch}")
    return argv + [suite, str(rootfs), mirror]


def binfmt_status(platform: str) -> tuple[bool, str]:
    """Whether this kernel runs binaries of `platform` (natively or through a registered QEMU).

    Returns:
        (ok, reason): reason says what to install or mount when not ok.
    """
    if platform == host_platform():
        return True, "native"
    qemu = _arches(platform)[1]
    entry = BINFMT_DIR / f"qemu-{qemu}"
    if not (BINFMT_DIR / "status").exists():
        return False, (f"binfmt_misc is not mounted at {BINFMT_DIR}: "
                       f"mount it (mount -t binfmt_misc binfmt_misc {BINFMT_DIR})")
    try:
        text = entry.read_text()
    except OSError:
        return False, f"no QEMU registered for {qemu}: install qemu-user-static and binfmt-support"
    if not text.startswith("enabled"):
        return False, f"the QEMU handler for {qemu} is disabled: run update-binfmts --enable qemu-{qemu}"
    flags = re.search(r"^flags:\s*(\S*)", text, re.M)
    if not flags or "F" not in flags.group(1):
        return False, (f"the QEMU handler for {qemu} lacks the F flag, so containers cannot use it: "
                       f"reinstall qemu-user-static (Debian's registers with F)")
    return True, f"qemu-{qemu} registered ({entry})"


def ensure_binfmt(platform: str) -> str:
    """Make the kernel run `platform` binaries: mount binfmt_misc and enable the QEMU handler if needed.

    Returns:
        binfmt_status's reason.

    Raises:
        ResourceError: still not possible; the message says what to install.
    """
    ok, reason = binfmt_status(platform)
    if ok:
        return reason
    if os.geteuid() == 0:
        if not (BINFMT_DIR / "status").exists():
            _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], 30)
        if shutil.which("update-binfmts"):
            _run(["update-binfmts", "--enable", f"qemu-{_arches(platform)[1]}"], 30)
        ok, reason = binfmt_status(platform)
    if not ok:
        raise ResourceError(f"cannot run {platform} binaries: {reason}")
    return reason


def rootfs_tarball(cache_dir: str | Path | None = None, suite: str = "bookworm", mirror: str | None = None,
                   platform: str | None = None, timeout_s: float = 3600.0) -> tuple[Path, dict]:
    """The cached root file system of a stand-in (debootstrapped on first use), as a .tar.gz.

    The file system is Debian minbase with Python, pip and CA certificates, trimmed, with
    `python`/`pip` in /usr/local/bin and without Python's EXTERNALLY-MANAGED marker (so `pip
    install` works as in the official images).

    Args:
        cache_dir: where tarballs are kept (default ~/.cache/kd2edge/docker).
        suite: the Debian release.
        mirror: a Debian mirror URL (default: the one this machine's apt uses).
        platform: `linux/amd64` or `linux/arm64` (default: this machine's).
        timeout_s: limit for debootstrap (emulated arm64 takes several minutes).

    Returns:
        (path, {"action": "cached" | "debootstrapped", "seconds": float, "mirror": str}).

    Raises:
        ResourceError: not root, debootstrap missing, a foreign platform QEMU cannot run, or debootstrap failed.
    """
    platform = platform or host_platform()
    arch = _arches(platform)[0]
    mirror = mirror or apt_mirror()
    key = hashlib.sha256(f"{suite} {arch} {','.join(BASE_PACKAGES)}".encode()).hexdigest()[:8]
    root = _cache_root(cache_dir)
    out = root / f"rootfs-{suite}-{arch}-{key}.tar.gz"
    t0 = time.monotonic()
    with _locked(root / f".{out.name}.lock"):
        if out.is_file():
            return out, {"action": "cached", "seconds": round(time.monotonic() - t0, 2), "mirror": mirror}
        if os.geteuid() != 0:
            raise ResourceError("making a base image with debootstrap needs root: run as root or pull the image")
        if shutil.which("debootstrap") is None:
            raise ResourceError("debootstrap is not installed: apt-get install debootstrap")
        if platform != host_platform():
            ensure_binfmt(platform)
        with tempfile.TemporaryDirectory(dir=root, prefix="rootfs-") as tmp:
            fs = Path(tmp) / "fs"
            argv = debootstrap_argv(fs, suite, mirror, arch if platform != host_platform() else None)
            proc = _run(argv, timeout_s)
            if proc.returncode != 0:
                log = fs / "debootstrap" / "debootstrap.log"
                detail = _log_tail(log) if log.exists() else _one_line(proc.stderr + proc.stdout)
                raise ResourceError(f"debootstrap {suite} {arch} from {mirror} failed ({proc.returncode}): {detail}; "
                                    f"check the mirror (pass mirror=...)")
            _finish_rootfs(fs)
            part = out.with_suffix(".part")
            proc = _run(["tar", "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*",
                         "-C", str(fs), "-czf", str(part), "."], 900)
            if proc.returncode != 0:
                part.unlink(missing_ok=True)
                raise ResourceError(f"packing the root file system failed: {_one_line(proc.stderr)}")
            part.replace(out)
    return out, {"action": "debootstrapped", "seconds": round(time.monotonic() - t0, 2), "mirror": mirror}


def _finish_rootfs(fs: Path) -> None:
    """Trim a debootstrapped tree and make it look like the official python image to pip and Dockerfiles."""
    for pattern in _TRIM:
        for path in fs.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for cache in list(fs.glob("usr/lib/python3*/**/__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    for marker in fs.glob("usr/lib/python3.*/EXTERNALLY-MANAGED"):
        marker.unlink()
    bin_dir = fs / "usr" / "local" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
        link = bin_dir / name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(target)


def _host_cas(ca_dir: Path | None) -> list[Path]:
    if ca_dir is None or not Path(ca_dir).is_dir():
        return []
    return sorted(p for p in Path(ca_dir).iterdir() if p.suffix == ".crt" and p.is_file())


def ensure_base_image(name: str = DEFAULT_BASE_IMAGE, suite: str = "bookworm", mirror: str | None = None,
                      platform: str | None = None, cache_dir: str | Path | None = None,
                      ca_dir: str | Path | None = HOST_CA_DIR, timeout_s: float = 3600.0) -> dict:
    """Make sure the local image `name` exists for `platform`, making a Debian stand-in if needed.

    Present with the right platform: nothing is done. Otherwise a kept per-architecture copy
    (`stand_in_tag`) is tagged `name`, or one is made: the cached rootfs tarball (see
    `rootfs_tarball`) becomes a one-layer image (`docker load`), with the `.crt` files of `ca_dir`
    added to its trusted CAs (machines whose egress inspects TLS need them for `pip install`).

    A local tag names one image, so `name` points at the platform asked for last; call this
    before each build for another platform.

    Args:
        name: the image name the Dockerfiles use.
        suite: Debian release of the stand-in (bookworm has Python 3.11).
        mirror: Debian mirror for debootstrap (default: the one this machine's apt uses).
        platform: `linux/amd64` or `linux/arm64` (default: this machine's).
        cache_dir: where the rootfs tarball is kept (default ~/.cache/kd2edge/docker).
        ca_dir: folder of extra CA certificates to trust in the stand-in; None for none.
        timeout_s: limit for debootstrap.

    Returns:
        {"image", "platform", "action": "present" | "retagged" | "imported", "seconds",
        "size_bytes", and when imported "rootfs" (its action, seconds, path)}.

    Raises:
        ResourceError: no daemon, not root, debootstrap or QEMU missing, or a docker step failed.
    """
    platform = platform or host_platform()
    debian_arch = _arches(platform)[0]
    t0 = time.monotonic()

    def result(action: str, **extra) -> dict:
        return {"image": name, "platform": platform, "action": action, "seconds": round(time.monotonic() - t0, 2),
                "size_bytes": image_size(name), **extra}

    if image_platform(name) == platform:
        return result("present")
    copy = stand_in_tag(name, platform)
    if image_platform(copy) == platform:
        _check(_docker("tag", copy, name), f"docker tag {copy} {name}")
        return result("retagged")

    tarball, made = rootfs_tarball(cache_dir, suite, mirror, platform, timeout_s)
    cas = _host_cas(Path(ca_dir) if ca_dir else None)
    with tempfile.TemporaryDirectory(dir=tarball.parent, prefix="load-") as tmp:
        # `docker load` of a one-layer image written here, not `docker import`: Docker 20.10's import
        # ignores `--platform` and stamps the daemon's architecture on the image, so an arm64 stand-in
        # would claim amd64 and `docker build --platform linux/arm64` would reject it.
        # The layer is the rootfs plus the extra CAs.
        folder = Path(tmp)
        diff_id = _write_layer(tarball, cas, folder / "layer.tar")
        config = image_config(platform, diff_id, {STAND_IN_LABEL: f"{suite}-{debian_arch}"},
                              f"kd2edge stand-in for {name}: Debian {suite} {debian_arch} from {made['mirror']}")
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        (folder / config_name).write_bytes(config)
        manifest = [{"Config": config_name, "RepoTags": [copy], "Layers": ["layer.tar"]}]
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with tarfile.open(folder / "image.tar", "w") as image_tar:
            for member in ("manifest.json", config_name, "layer.tar"):
                image_tar.add(folder / member, arcname=member)
            (folder / "layer.tar").unlink()
        proc = _docker("load", "--input", str(folder / "image.tar"), timeout_s=900)
    _check(proc, f"docker load of the {debian_arch} stand-in")
    if image_platform(copy) != platform:
        raise ResourceError(f"docker load made {copy} for {image_platform(copy)}, not {platform}: "
                            f"report this with `docker version`")
    _check(_docker("tag", copy, name), f"docker tag {copy} {name}")
    return result("imported", rootfs={"path": str(tarball), **made}, extra_cas=[c.name for c in cas])


def image_config(platform: str, diff_id: str, labels: dict[str, str], comment: str) -> bytes:
    """The JSON config of a one-layer image (what the official python images set that matters here)."""
    os_name, arch = platform.split("/")[:2]
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = {
        "architecture": arch, "os": os_name, "created": created,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
                   "Cmd": ["python3"], "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "kd2edge.package.docker.ensure_base_image", "comment": comment}],
    }
    if arch == "arm64":
        config["variant"] = "v8"
    return json.dumps(config, sort_keys=True).encode()


def _write_layer(tarball: Path, cas: list[Path], out: Path) -> str:
    """Copy a rootfs .tar.gz to the uncompressed layer `out`, trusting the extra CA certificates `cas`.

    They go to /usr/local/share/ca-certificates (kept by a later update-ca-certificates) and are
    appended to /etc/ssl/certs/ca-certificates.crt (what pip and OpenSSL read).

    Returns:
        The layer's diff id, "sha256:<hex of the uncompressed tar>".
    """
    extra = "".join(ca.read_text() for ca in cas).encode()
    bundle = "./etc/ssl/certs/ca-certificates.crt"
    with open(out, "wb") as raw:
        hashing = _HashingWriter(raw)
        with tarfile.open(tarball, "r:gz") as src, tarfile.open(fileobj=hashing, mode="w",
                                                                 format=tarfile.GNU_FORMAT) as dst:
            for member in src:
                if member.name == bundle and member.isfile() and cas:
                    data = src.extractfile(member).read().rstrip(b"\n") + b"\n" + extra
                    member.size = len(data)
                    dst.addfile(member, io.BytesIO(data))
                elif member.isfile():
                    dst.addfile(member, src.extractfile(member))
                else:
                    dst.addfile(member)
            for ca in cas:
                info = tarfile.TarInfo(f"./usr/local/share/ca-certificates/{ca.name}")
                data = ca.read_bytes()
                info.size, info.mode, info.mtime = len(data), 0o644, int(ca.stat().st_mtime)
                dst.addfile(info, io.BytesIO(data))
    return "sha256:" + hashing.sha.hexdigest()


class _HashingWriter:
    """A write-only file that hashes what passes through it."""

    def __init__(self, fh):
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.fh.tell()


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise ResourceError(f"{what} failed ({proc.returncode}): {_one_line(proc.stderr or proc.stdout)}")


# ------------------------------------------------------------------------------------------- build

def build_argv(context_dir: str | Path, tag: str, platform: str | None = None,
               build_args: dict[str, str] | None = None, dockerfile: str | Path | None = None) -> list[str]:
    """The `docker build` command line (without the client path): host network, optional platform."""
    argv = ["build", "--network", "host", "-t", tag]
    if platform:
        argv += ["--platform", platform]
    if dockerfile:
        argv += ["-f", str(dockerfile)]
    for key, value in (build_args or {}).items():
        argv += ["--build-arg", f"{key}={value}"]
    return argv + [str(context_dir)]


def build_env() -> dict[str, str]:
    """The environment for `docker build`: the legacy builder (works offline, ignores `# syntax=`)."""
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


def build_image(context_dir: str | Path, tag: str, platform: str | None = None, timeout_s: float = 1800.0,
                build_args: dict[str, str] | None = None, log_path: str | Path | None = None,
                tail_lines: int = 25) -> dict:
    """Build a Docker image from a context folder with `docker build --network host`.

    Args:
        context_dir: the build context (holds the Dockerfile).
        tag: the image's name:tag.
        platform: e.g. `linux/arm64`; None builds for the daemon's platform. The base image
            must exist locally for that platform (see `ensure_base_image`).
        timeout_s: the build is killed after this long.
        build_args: `--build-arg` values.
        log_path: where to write the full build log (default: none kept).
        tail_lines: how many last log lines to return and to put in errors.

    Returns:
        {"image_id", "size_bytes", "seconds", "log_tail"} (log_tail: the last lines, one string).

    Raises:
        ResourceError: no docker client.
        StageError: the build failed or ran past `timeout_s`; the message holds the log's last lines.
    """
    exe = docker_exe()
    if exe is None:
        raise ResourceError("no docker client on PATH: install Docker (apt-get install docker.io)")
    if not (Path(context_dir) / "Dockerfile").is_file():
        raise StageError(f"{context_dir} has no Dockerfile: pass the folder `kd2edge package` wrote")
    argv = [exe, *build_argv(context_dir, tag, platform, build_args)]
    tail: deque[str] = deque(maxlen=max(1, tail_lines))
    t0 = time.monotonic()
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=build_env(), start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                if log:
                    log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            rc = proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if log:
            log.close()
    seconds = round(time.monotonic() - t0, 1)
    text = "\n".join(tail)
    if timed_out:
        raise StageError(f"docker build of {tag} did not finish within {timeout_s:.0f} s: raise the timeout; "
                         f"last output: {_one_line(text, 600)}")
    if rc != 0:
        hint = ""
        if re.search(r"registry-1\.docker\.io|pull access denied|manifest unknown|no such host", text):
            hint = " (the base image is not local and no registry answers: make it with ensure_base_image)"
        elif re.search(r"exec format error", text):
            hint = f" (cannot run {platform} binaries: install qemu-user-static and binfmt-support)"
        raise StageError(f"docker build of {tag} failed (exit {rc}){hint}: {_one_line(text, 800)}")
    image_id = image_inspect(tag, "{{.Id}}")
    if not image_id:
        raise StageError(f"docker build reported success but {tag} is not a local image: {_one_line(text, 400)}")
    return {"image_id": image_id, "size_bytes": image_size(tag), "seconds": seconds, "log_tail": text}


# ---------------------------------------------------------------------------------------- containers

def run_argv(tag: str, args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
             user: str | None = None, name: str | None = None, platform: str | None = None,
             labels: dict[str, str] | None = None) -> list[str]:
    """The `docker run` command line (without the client path): detached, on the host network."""
    argv = ["run", "--detach", "--network", "host"]
    if name:
        argv += ["--name", name]
    if user:
        argv += ["--user", user]
    if platform:
        argv += ["--platform", platform]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    return argv + [tag, *map(str, args)]


def run_container(tag: str, port: int | None = None, args: list[str] | tuple[str, ...] = (),
                  env: dict[str, str] | None = None, user: str | None = None, name: str | None = None,
                  platform: str | None = None, timeout_s: float = 120.0) -> str:
    """Start a container in the background on the host network (`--network host`).

    With host networking the container's server listens on the host's own ports and `-p` does
    not apply: tell the server its port through `args` or `env`. `port`, when given, is checked
    free on 127.0.0.1 first and recorded in the label `org.kd2edge.port`.

    Args:
        tag: the image.
        port: the loopback port the container will listen on (checked, not passed on).
        args: the command after the image (replaces its CMD).
        env: environment variables for the container.
        user: `--user`, e.g. "10001" or "65534:65534".
        name: the container's name.
        platform: e.g. `linux/arm64` to pick that variant of the image.
        timeout_s: limit for `docker run` itself (not for the container).

    Returns:
        The container id. Remove it with `stop_container`.

    Raises:
        ResourceError: no docker client, or `port` is already in use.
        StageError: docker could not start the container.
    """
    if port is not None and _port_in_use(port):
        raise ResourceError(f"port {port} on 127.0.0.1 is in use: pick a free one (kd2edge.package.docker.free_port)")
    labels = {"org.kd2edge.port": str(port)} if port is not None else None
    proc = _docker(*run_argv(tag, args, env, user, name, platform, labels), timeout_s=timeout_s)
    if proc.returncode != 0:
        raise StageError(f"docker run {tag} failed ({proc.returncode}): {_one_line(proc.stderr or proc.stdout)}")
    return proc.stdout.strip().splitlines()[-1]


def stop_container(container: str, timeout_s: float = 30.0, remove: bool = True) -> int:
    """Stop a container with SIGTERM (SIGKILL after `timeout_s`) and return its exit code.

    Args:
        container: id or name.
        timeout_s: grace period before docker sends SIGKILL (exit code 137 then).
        remove: remove the container afterwards.

    Returns:
        The container's exit code (0: it stopped cleanly on SIGTERM).

    Raises:
        StageError: no such container, or docker did not answer.
    """
    proc = _docker("stop", "--time", str(int(timeout_s)), container, timeout_s=timeout_s + 60)
    if proc.returncode != 0:
        raise StageError(f"docker stop {container} failed: {_one_line(proc.stderr)}")
    code = _docker("inspect", "--format", "{{.State.ExitCode}}", container, timeout_s=30)
    if code.returncode != 0:
        raise StageError(f"docker inspect {container} failed: {_one_line(code.stderr)}")
    if remove:
        _docker("rm", "--force", container, timeout_s=60)
    return int(code.stdout.strip())


def container_health(container: str) -> str | None:
    """The container's health: "healthy", "starting" or "unhealthy"; None if its image has no HEALTHCHECK.

    Raises:
        StageError: no such container.
    """
    proc = _docker("inspect", "--format", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", container,
                   timeout_s=30)
    if proc.returncode != 0:
        raise StageError(f"docker inspect {container} failed: {_one_line(proc.stderr)}")
    return proc.stdout.strip() or None


def container_state(container: str) -> dict:
    """{"status": "running" | "exited" | ..., "exit_code": int} of a container.

    Raises:
        StageError: no such container.
    """
    proc = _docker("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", container, timeout_s=30)
    if proc.returncode != 0:
        raise StageError(f"docker inspect {container} failed: {_one_line(proc.stderr)}")
    status, code = proc.stdout.split()
    return {"status": status, "exit_code": int(code)}


def container_logs(container: str, tail: int = 50) -> str:
    """The last `tail` lines a container printed (stdout and stderr), or docker's error."""
    proc = _docker("logs", "--tail", str(tail), container, timeout_s=30)
    return (proc.stdout + proc.stderr).strip()
