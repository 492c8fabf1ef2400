import pytest

from kd2edge.errors import ProfileError
from kd2edge.profiles import list_profiles, load_profile

GOOD = """
description = "test board"
[hardware]
arch = "aarch64"
cores = 4
memory = "8GB"
memory_bandwidth = "17.1GB/s"
[runtime]
execution_providers = ["CPUExecutionProvider"]
threads = 4
[budgets]
max_artifact_mb = 100
max_peak_memory_mb = 500
max_ttft_ms = 1000
min_decode_tokens_per_s = 5
min_retention = 0.8
[quantization]
bits = 4
group_size = 128
[docker]
base_image = "python:3.11-slim"
platform = "linux/arm64"
"""


def test_builtin_profiles_are_the_four_devices():
    names = [p.name for p in list_profiles()]
    assert names == ["jetson-agx-orin", "jetson-orin-nano", "laptop-cpu", "raspberry-pi-5"]


def test_units_are_parsed_into_bytes():
    p = load_profile("raspberry-pi-5")
    assert p.hardware.memory == 8 * 10**9
    assert p.hardware.memory_bandwidth == pytest.approx(17.1e9)
    assert p.runtime.execution_providers == ("CPUExecutionProvider",)


def test_jetson_profiles_use_cuda_and_shared_memory():
    for name in ("jetson-orin-nano", "jetson-agx-orin"):
        p = load_profile(name)
        assert p.hardware.shared_memory
        assert "CUDAExecutionProvider" in p.runtime.execution_providers
        assert p.docker.platform == "linux/arm64"
    assert "TensorrtExecutionProvider" in load_profile("jetson-agx-orin").runtime.execution_providers


def test_profile_from_file(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    p = load_profile(path)
    assert p.name == "board" and p.hardware.cores == 4


def test_profile_is_frozen():
    p = load_profile("laptop-cpu")
    with pytest.raises(AttributeError):
        p.name = "x"


def test_every_problem_is_reported_at_once(tmp_path):
    bad = (GOOD.replace('memory = "8GB"', 'memory = "8 parsecs"')
               .replace("cores = 4", "cores = 0")
               .replace("bits = 4", "bits = 5\ncolour = 'red'")
               .replace('"CPUExecutionProvider"', '"QuantumExecutionProvider"'))
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    problems = err.value.problems
    joined = " | ".join(problems)
    assert "hardware.memory" in joined
    assert "hardware.cores: 0 is below the minimum 1" in joined
    assert "quantization.colour: unknown key" in joined
    assert "QuantumExecutionProvider" in joined
    assert len(problems) >= 4


def test_missing_section_and_unknown_name(tmp_path):
    path = tmp_path / "partial.toml"
    path.write_text(GOOD.split("[budgets]")[0])
    with pytest.raises(ProfileError, match="budgets: missing"):
        load_profile(path)
    with pytest.raises(ProfileError, match="unknown profile 'nope'.*laptop-cpu"):
        load_profile("nope")


def test_unparseable_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[hardware\narch=")
    with pytest.raises(ProfileError, match="cannot parse broken.toml"):
        load_profile(path)


def test_cross_field_problems_are_all_reported(tmp_path):
    bad = GOOD.replace('"CPUExecutionProvider"', '"CUDAExecutionProvider"').replace('"linux/arm64"', '"linux/amd64"')
    path = tmp_path / "cross.toml"
    path.write_text(bad)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    joined = " | ".join(err.value.problems)
    assert "needs CPUExecutionProvider" in joined and "does not match hardware.arch aarch64" in joined
