import json

import pytest

from kd2edge.config import dump_config, load_config
from kd2edge.errors import ConfigError


def test_defaults_resolve_from_the_profile():
    c = load_config(profile="raspberry-pi-5")
    assert c.profile.name == "raspberry-pi-5"
    assert (c.quantize.bits, c.quantize.group_size, c.quantize.act_order) == (4, 128, True)
    assert c.export.exporter == c.profile.runtime.exporter
    assert c.evaluate.data == c.data == "xquad"


def test_flags_override_and_none_means_not_given():
    c = load_config(overrides={"quantize.bits": 8, "distill.steps": None, "seed": 3})
    assert c.quantize.bits == 8 and c.seed == 3
    assert c.distill.steps == load_config().distill.steps


def test_print_config_round_trips(tmp_path):
    c = load_config(profile="jetson-orin-nano", overrides={"distill.temperature": 2.0})
    path = tmp_path / "run.json"
    path.write_text(dump_config(c))
    assert load_config(path) == c


def test_toml_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('profile = "laptop-cpu"\nseed = 7\n[quantize]\nmethod = "rtn"\n')
    c = load_config(path)
    assert c.seed == 7 and c.quantize.method == "rtn"


def test_config_errors_are_collected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"seed": -1, "quantize": {"bits": 5, "group_size": 100}, "distill": {"lossy": 1}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(err.value.problems) == 4


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_stage_config_decides_fingerprints():
    a, b = load_config(), load_config(overrides={"quantize.damp": 0.05})
    assert a.stage_config("distill") == b.stage_config("distill")
    assert a.stage_config("quantize") != b.stage_config("quantize")
    assert "device" in a.stage_config("profile")


def test_a_single_local_file_for_training_and_evaluation_is_warned(tmp_path):
    from kd2edge.config import data_leak_warning

    path = str(tmp_path / "qa.json")
    assert "training and evaluation both read" in data_leak_warning(load_config(overrides={"data": path + "@all"}))
    assert data_leak_warning(load_config(overrides={"data": path})) is None   # split by article
    split = load_config(overrides={"data": path + "@all", "evaluate.data": path + "@validation"})
    assert data_leak_warning(split) is None
    assert data_leak_warning(load_config()) is None


def test_every_shipped_recipe_is_a_valid_config_found_by_name():
    """`--config NAME` reads kd2edge/recipes/NAME.toml; each one loads (unknown keys would be errors)
    and changes something from the defaults."""
    from kd2edge.config import config_path, load_config, recipes_dir

    recipes = sorted(p.stem for p in recipes_dir().glob("*.toml"))
    assert "study" in recipes
    for name in recipes:
        assert config_path(name) == recipes_dir() / f"{name}.toml"
        assert load_config(name) != load_config()
    study = load_config("study").distill
    assert study.max_param_fraction <= 0.43   # the study's compression: >= 57% fewer parameters
