"""The one parser of typed records: every key and value checked against the dataclass fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

import pytest

from diffship.configs.fields import comma_list, option, parse, to_data
from diffship.errors import ConfigError, OptionError


@dataclass(frozen=True)
class Inner:
    size: tuple[int, int]
    note: str | None = None


@dataclass(frozen=True)
class Options:
    level: int | None = option(None, minimum=0, maximum=5)
    mode: str = option("fast", choices=("fast", "exact"))
    flag: bool = False
    scale: float = 1.0
    name: str = "x"
    sizes: tuple[tuple[int, int], ...] = option((), normalize=comma_list)
    tags: tuple[str, ...] = ()
    inner: Inner | None = None
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Cat:
    lives: int
    kind: Literal["cat"] = "cat"


@dataclass(frozen=True)
class Dog:
    tricks: list[str]
    kind: Literal["dog"] = "dog"


@dataclass(frozen=True)
class Zoo:
    animals: list[Union[Cat, Dog]]


def opts(**data):
    return parse(Options, data, "test option", error=OptionError)


def test_values_are_checked_and_converted_where_nothing_is_lost():
    o = opts(level=3, scale=2, name=1.0, sizes="64x64,96x128", tags=["a"], inner={"size": [8, 16]},
             extra={"k": 1})
    assert o.level == 3 and o.scale == 2.0 and isinstance(o.scale, float) and o.name == "1.0"
    assert o.sizes == ((64, 64), (96, 128)) and o.tags == ("a",) and o.inner == Inner(size=(8, 16))
    assert opts() == Options()


@pytest.mark.parametrize("data, message", [
    ({"levle": 1}, r"unknown test option\(s\) levle; it takes: level, mode, flag"),
    ({"level": 9}, r"test option level must be 0-5, got 9"),
    ({"level": "2"}, r"test option level must be a whole number or null, got '2'"),
    ({"level": True}, r"test option level must be a whole number or null, got True"),
    ({"flag": "yes"}, r"test option flag must be true or false, got 'yes'"),
    ({"mode": "slow"}, r"unknown mode 'slow'; choose one of: fast, exact"),
    ({"sizes": "64by64"}, r"test option sizes: '64by64' is not HEIGHTxWIDTH"),
    ({"tags": "a"}, r"test option tags must be a list of strings, got 'a'"),
    ({"scale": float("nan")}, r"test option scale must be a number"),
    ({"extra": {"k": "v"}}, r"test option extra must be a table of whole numbers"),
    ({"inner": {"size": [1, 2], "colour": 3}}, r"^inner: unknown test option\(s\) colour; it takes: size, note"),
])
def test_bad_values_are_refused_in_one_style(data, message):
    with pytest.raises(OptionError, match=message):
        opts(**data)


def test_missing_required_keys_and_where_the_data_came_from():
    with pytest.raises(ConfigError, match=r"^presets.toml \[a\]: key\(s\) size missing$"):
        parse(Inner, {}, "key", where="presets.toml [a]")
    with pytest.raises(ConfigError, match="expected a table of keys"):
        parse(Inner, [1, 2], "key")


def test_unions_of_records_are_told_apart_by_their_kind():
    zoo = parse(Zoo, {"animals": [{"kind": "dog", "tricks": ["sit"]}, {"kind": "cat", "lives": 9}]}, "key")
    assert zoo.animals == [Dog(tricks=["sit"]), Cat(lives=9)]
    # A malformed dog is reported as a dog, not as "not a cat".
    with pytest.raises(ConfigError, match=r"animals: key tricks must be a list of strings"):
        parse(Zoo, {"animals": [{"kind": "dog", "tricks": "sit"}]}, "key")


def test_to_data_is_plain_json_data():
    o = opts(sizes="8x8", inner={"size": [8, 8]})
    data = to_data(o)
    assert data["sizes"] == [[8, 8]] and data["inner"] == {"size": [8, 8], "note": None}
    assert "note" not in to_data(o.inner, drop_none=True)
    assert parse(Options, data, "test option") == o
