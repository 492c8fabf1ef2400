"""Host description, mismatch warnings, Jetson memory readings."""

from __future__ import annotations

from kd2edge.runtime.host import (cpu_model, current_rss_bytes, host_info, host_mismatches, meminfo_used_mb,
                                    normalize_arch, parse_tegrastats, peak_rss_bytes)

X86_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core(TM) i7-1165G7 @ 2.80GHz\n"
PI_CPUINFO = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd0b\n\nRevision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
TEGRA_LINES = [
    "11-23-2026 10:00:00 RAM 2100/7620MB (lfb 4x4MB) SWAP 0/3810MB (cached 0MB) CPU [5%@729,3%@729] "
    "EMC_FREQ 0% GR3D_FREQ 0% cpu@45C",
    "11-23-2026 10:00:01 RAM 2950/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [90%@1510,88%@1510] "
    "EMC_FREQ 30% GR3D_FREQ 76% cpu@51C",
    "11-23-2026 10:00:02 RAM 2800/7620MB (lfb 2x4MB) SWAP 0/3810MB CPU [20%@1510] GR3D_FREQ 12%@[624]",
]


def test_host_info_has_every_field():
    h = host_info()
    assert h["arch"] in ("x86_64", "aarch64") or h["arch"]
    assert isinstance(h["cpu_model"], str) and h["cpu_model"]
    assert h["cores_logical"] >= 1 and 1 <= h["cores_usable"] <= h["cores_logical"]
    assert h["memory_bytes"] > 64 * 2**20
    assert h["os"] and h["python"].count(".") == 2
    assert "CPUExecutionProvider" in h["providers_available"]
    assert h["onnxruntime"][0].isdigit() and isinstance(h["jetson"], bool)


def test_arch_and_cpu_names():
    assert normalize_arch("AMD64") == "x86_64" and normalize_arch("arm64") == "aarch64"
    assert normalize_arch("x86_64") == "x86_64"
    assert cpu_model(X86_CPUINFO) == "Intel(R) Core(TM) i7-1165G7 @ 2.80GHz"
    assert cpu_model(PI_CPUINFO) == "Raspberry Pi 5 Model B Rev 1.0"
    assert cpu_model("processor\t: 0\n", device_model="NVIDIA Jetson Orin Nano Developer Kit") == \
        "NVIDIA Jetson Orin Nano Developer Kit"


def test_mismatch_warnings():
    host = {"arch": "x86_64", "providers_available": ["CPUExecutionProvider"], "onnxruntime": "1.32.0",
            "cores_usable": 2}
    assert host_mismatches(host, "x86_64", ["CPUExecutionProvider"], threads=2) == []
    warnings = host_mismatches(host, "aarch64", ["CUDAExecutionProvider", "CPUExecutionProvider"], threads=6)
    assert len(warnings) == 3
    assert "x86_64 but the profile is aarch64" in warnings[0]
    assert "CUDAExecutionProvider not available" in warnings[1]
    assert "6 threads but this host has 2 usable cores" in warnings[2]


def test_tegrastats_peak_and_gpu_load():
    s = parse_tegrastats(TEGRA_LINES)
    assert s == {"samples": 3, "ram_used_mb_first": 2100, "ram_used_mb_peak": 2950, "ram_total_mb": 7620,
                 "gpu_load_pct_peak": 76}
    assert parse_tegrastats(["no figures here"]) is None


def test_meminfo_used():
    text = "MemTotal:        8000000 kB\nMemFree:          100000 kB\nMemAvailable:    6976000 kB\n"
    assert meminfo_used_mb(text) == (8000000 - 6976000) / 1024  # 1000 MiB
    assert meminfo_used_mb("MemTotal: 5 kB\n") is None


def test_peak_rss_is_at_least_the_current_rss():
    assert peak_rss_bytes() >= current_rss_bytes() * 0.95 > 0


def test_profiling_code_does_not_import_torch():
    """The device image runs `kd2edge profile` without torch/transformers: its import path must not need them."""
    import subprocess
    import sys

    code = ("import sys; import kd2edge.profiling.cli, kd2edge.profiling.stage, kd2edge.runtime.profiler, "
            "kd2edge.profiling.baseline, kd2edge.report_html; "
            "print(sorted(m for m in ('torch', 'transformers', 'optimum') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """ru_maxrss survives fork+exec on Linux: a child of a big process must not report the parent's peak."""
    import subprocess
    import sys

    ballast = bytearray(400 * 2**20)  # this process grows by 400 MiB
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = "from kd2edge.runtime.host import peak_rss_bytes; print(peak_rss_bytes())"
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child_peak < 300 * 2**20
    del ballast
