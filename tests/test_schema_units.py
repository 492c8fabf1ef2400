from dataclasses import dataclass, field
from typing import Literal

import pytest

from kd2edge.errors import ConfigError
from kd2edge.schema import Bytes, from_dict, rule, to_dict
from kd2edge.units import format_bytes, parse_bytes, parse_rate


@pytest.mark.parametrize("text,expected", [
    ("8GB", 8_000_000_000), ("512 MiB", 512 * 2**20), ("1.5KB", 1500), (1024, 1024), ("7", 7), ("2gib", 2 * 2**30),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["8 parsecs", "GB", "-1", "", True])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_parse_rate_and_format():
    assert parse_rate("68GB/s") == 68e9
    with pytest.raises(ValueError):
        parse_rate("68GB")
    assert format_bytes(1536) == "1.5 KiB"


@dataclass(frozen=True)
class Inner:
    size: Bytes = Bytes(0)


@dataclass(frozen=True)
class Outer:
    name: str
    n: int = field(default=1, metadata=rule(min=1, max=10))
    mode: Literal["a", "b"] = "a"
    ratio: float | None = None
    sizes: tuple[int, ...] = ()
    inner: Inner = Inner()


def test_from_dict_builds_and_round_trips():
    obj = from_dict(Outer, {"name": "x", "n": 3, "ratio": 1, "sizes": [1, 2], "inner": {"size": "1KB"}})
    assert obj == Outer("x", 3, "a", 1.0, (1, 2), Inner(Bytes(1000)))
    assert from_dict(Outer, to_dict(obj)) == obj


def test_from_dict_reports_all_problems():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"n": 11, "mode": "c", "ratio": "high", "sizes": [1, "x"], "inner": {"size": "big"}, "zz": 0})
    joined = " | ".join(err.value.problems)
    for fragment in ["zz: unknown key", "name: missing", "n: 11 is above the maximum 10", "mode: 'c' is not one of",
                     "ratio", "sizes[1]: expected a whole number", "inner.size"]:
        assert fragment in joined
    assert len(err.value.problems) == 7


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="n: expected a whole number, got True"):
        from_dict(Outer, {"name": "x", "n": True})
