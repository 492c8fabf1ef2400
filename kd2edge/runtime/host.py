"""The machine a profile actually ran on, and how it differs from the device profile.

Imports only the standard library and (lazily) onnxruntime, like the runtime; psutil is
used where installed, with Linux's /proc as the fallback on minimal device images.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}


def normalize_arch(machine: str) -> str:
    """platform.machine() spelled as the profiles spell it: x86_64 or aarch64."""
    m = machine.strip().lower()
    return _ARCH_ALIASES.get(m, m)


def cpu_model(cpuinfo: str, device_model: str = "") -> str:
    """The CPU's name from the text of /proc/cpuinfo.

    x86 has `model name`; ARM boards have no model name but a `Model` line (Raspberry Pi)
    or only a device-tree model (Jetson), passed as `device_model`.
    """
    for key in ("model name", "Model", "Hardware", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return device_model


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def is_jetson(device_model: str = "") -> bool:
    """Whether this is an NVIDIA Jetson (L4T) board."""
    return Path("/etc/nv_tegra_release").exists() or "jetson" in device_model.lower()


def host_info() -> dict:
    """What this machine is: CPU, cores, memory, OS, onnxruntime and its providers.

    Returns:
        {arch, cpu_model, device_model, cores_logical, cores_physical, cores_usable, memory_bytes,
         os, python, onnxruntime, providers_available, jetson}.
    """
    import onnxruntime

    device_model = _read("/proc/device-tree/model").strip("\x00\n ")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count()
    return {
        "arch": normalize_arch(platform.machine()),
        "cpu_model": cpu_model(_read("/proc/cpuinfo"), device_model) or platform.processor() or "unknown",
        "device_model": device_model or None,
        "cores_logical": os.cpu_count(),
        "cores_physical": _physical_cores(),
        "cores_usable": usable,
        "memory_bytes": _total_memory(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "providers_available": list(onnxruntime.get_available_providers()),
        "jetson": is_jetson(device_model),
    }


def host_mismatches(host: dict, arch: str, providers: list[str] | tuple[str, ...], threads: int) -> list[str]:
    """Ways the host differs from the device profile, as warnings (the figures are not the device's).

    Args:
        host: as returned by `host_info`.
        arch: the profile's hardware.arch.
        providers: the profile's execution providers, preferred first.
        threads: the profile's runtime.threads.
    """
    out = []
    if host["arch"] != arch:
        out.append(f"this host is {host['arch']} but the profile is {arch}: the figures are not the device's")
    missing = [p for p in providers if p not in host["providers_available"]]
    if missing:
        out.append(f"execution provider(s) {', '.join(missing)} not available here "
                   f"(onnxruntime {host['onnxruntime']} has {', '.join(host['providers_available'])})")
    usable = host.get("cores_usable") or host.get("cores_logical") or 0
    if usable and usable < threads:
        out.append(f"the profile runs {threads} threads but this host has {usable} usable cores")
    return out


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes.

    This is the *process* peak: interpreter, libraries and everything loaded before count too.
    On Linux it is /proc/self/status VmHWM, the high-water mark of this program's own memory:
    ru_maxrss survives fork and exec there, so a child started by a process that had loaded
    the teacher (3 GB) would report the parent's peak as its own.
    """
    import resource

    try:
        for line in _read("/proc/self/status").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int:
    """The resident set size of this process now (psutil, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:  # a minimal device image: Linux's own count
        resident_pages = int(_read("/proc/self/statm").split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def _physical_cores() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.cpu_count(logical=False)


def _total_memory() -> int:
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return psutil.virtual_memory().total


_TEGRA_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_TEGRA_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")


def parse_tegrastats(lines: list[str]) -> dict | None:
    """Peak system RAM in use and GPU load from tegrastats output lines.

    A line looks like `RAM 3131/7620MB (lfb 2x4MB) SWAP 0/3810MB ... GR3D_FREQ 45%@[624] ...`.
    On Jetson CPU and GPU share the RAM, so `RAM used` includes the GPU's allocations.

    Returns:
        {samples, ram_used_mb_first, ram_used_mb_peak, ram_total_mb, gpu_load_pct_peak}, or None
        when no line has a RAM figure.
    """
    used, total, gpu = [], None, []
    for line in lines:
        m = _TEGRA_RAM.search(line)
        if m:
            used.append(int(m.group(1)))
            total = int(m.group(2))
        g = _TEGRA_GPU.search(line)
        if g:
            gpu.append(int(g.group(1)))
    if not used:
        return None
    return {"samples": len(used), "ram_used_mb_first": used[0], "ram_used_mb_peak": max(used),
            "ram_total_mb": total, "gpu_load_pct_peak": max(gpu) if gpu else None}


def meminfo_used_mb(text: str) -> float | None:
    """System RAM in use (MemTotal - MemAvailable) in MiB from the text of /proc/meminfo."""
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE))
    if "MemTotal" not in fields or "MemAvailable" not in fields:
        return None
    return (int(fields["MemTotal"]) - int(fields["MemAvailable"])) / 1024


class SharedMemoryMonitor:
    """System-wide memory on shared-memory boards (Jetson), beside the process RSS.

    With `tegrastats` on PATH it runs as a separate process (so it costs the timed
    runtime calls nothing measurable) sampling every `interval_ms`; otherwise only
    /proc/meminfo snapshots at start and stop are taken (no peak, said so in `source`).
    """

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self._proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None
        self._start_used: float | None = None

    def __enter__(self) -> "SharedMemoryMonitor":
        self._start_used = meminfo_used_mb(_read("/proc/meminfo"))
        exe = shutil.which("tegrastats")
        if exe:
            try:
                self._proc = subprocess.Popen([exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, text=True)
            except OSError:
                self._proc = None
            else:
                self._reader = threading.Thread(target=self._collect, daemon=True)
                self._reader.start()
        return self

    def _collect(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            if self._reader is not None:
                self._reader.join(timeout=5)

    def result(self) -> dict | None:
        """{source, system_used_mb_before, system_used_mb_peak|after, ...} or None off Linux."""
        end_used = meminfo_used_mb(_read("/proc/meminfo"))
        stats = parse_tegrastats(self._lines)
        if stats is not None:
            before = self._start_used if self._start_used is not None else stats["ram_used_mb_first"]
            return {"source": "tegrastats", "system_used_mb_before": round(before, 1),
                    "system_used_mb_peak": stats["ram_used_mb_peak"], "system_total_mb": stats["ram_total_mb"],
                    "gpu_load_pct_peak": stats["gpu_load_pct_peak"], "samples": stats["samples"]}
        if self._start_used is None or end_used is None:
            return None
        return {"source": "/proc/meminfo snapshots (no tegrastats: no peak)",
                "system_used_mb_before": round(self._start_used, 1), "system_used_mb_after": round(end_used, 1)}
