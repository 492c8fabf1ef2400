"""The CLI shell: lazy imports, one-line errors, exit codes, config printing."""

import json
import subprocess
import sys

import pytest

from kd2edge import __version__
from kd2edge.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args", [["--help"], ["profiles", "list"], ["profiles", "show", "laptop-cpu"], ["--version"]])
def test_light_commands_do_not_import_torch(args):
    code = ("import sys; from kd2edge.cli import main; rc = main(%r); "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules]; "
            "assert rc == 0 and not heavy, (rc, heavy)") % (args,)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and __version__ in out


def test_profiles_list_shows_the_four_profiles(capsys):
    code, out, _ = run_cli(capsys, "profiles", "list")
    assert code == 0
    for name in ("laptop-cpu", "raspberry-pi-5", "jetson-orin-nano", "jetson-agx-orin"):
        assert name in out
    code, out, _ = run_cli(capsys, "profiles", "list", "--json")
    assert [p["name"] for p in json.loads(out)] == ["jetson-agx-orin", "jetson-orin-nano", "laptop-cpu", "raspberry-pi-5"]


def test_profiles_show_json(capsys):
    code, out, _ = run_cli(capsys, "profiles", "show", "jetson-orin-nano", "--json")
    data = json.loads(out)
    assert code == 0 and data["hardware"]["memory"] == 8_000_000_000 and data["hardware"]["shared_memory"] is True


def _one_line_error(err):
    """Progress lines may come first; the error itself is exactly one line, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert "Traceback" not in err
    return errors[0]


def test_unknown_profile_is_one_line(capsys):
    code, out, err = run_cli(capsys, "profiles", "show", "toaster")
    assert code == 2
    assert "unknown profile 'toaster'" in _one_line_error(err)


def test_malformed_profile_names_every_problem(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[hardware]\narch = "sparc"\ncores = -1\n')
    code, _, err = run_cli(capsys, "profiles", "show", str(bad))
    line = _one_line_error(err)
    assert code == 2
    for fragment in ("description: missing", "hardware.arch", "hardware.cores", "runtime: missing", "budgets: missing"):
        assert fragment in line


def test_bad_flag_is_one_line(capsys):
    code, _, err = run_cli(capsys, "run", "--steps", "many")
    assert code == 2 and "'many' is not a valid integer" in _one_line_error(err)


def test_print_config_is_loadable(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "run", "--profile", "raspberry-pi-5", "--steps", "7", "--print-config")
    assert code == 0
    path = tmp_path / "c.json"
    path.write_text(out)
    code, out2, _ = run_cli(capsys, "run", "--config", str(path), "--print-config")
    assert out2 == out and json.loads(out)["distill"]["steps"] == 7


def test_hub_id_offline_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "run", "--teacher", "someorg/not-cached-model", "--out", str(tmp_path / "r"))
    line = _one_line_error(err)
    assert code == 4 and "cannot reach the Hugging Face hub" in line and "pass DIR" in line
    assert not (tmp_path / "r").exists()


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert code == 4 and "not found" in _one_line_error(err)


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kd2edge.cli", "--debug", "profiles", "show", "toaster"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
