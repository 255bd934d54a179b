from dataclasses import dataclass, field

import pytest

from musefm.config import ConfigError, apply_overrides, from_dict, load_yaml
from musefm.data.build import BuildConfig


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    flag: bool = False


def test_overrides_nested_and_typed():
    config = apply_overrides(Outer(), ["inner.lr=3e-4", "inner.steps=20", "tags=[a,b]", "flag=true"])
    assert config.inner.lr == pytest.approx(3e-4) and config.inner.steps == 20
    assert config.tags == ["a", "b"] and config.flag is True


@pytest.mark.parametrize(
    "override, named",
    [("inner.nope=1", "inner.nope"), ("nope=1", "nope"), ("inner.steps=abc", "inner.steps"), ("flag=3", "flag")],
)
def test_bad_overrides_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        apply_overrides(Outer(), [override])


def test_yaml_round_trip_and_unknown_key(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("name: demo\ninner:\n  steps: 5\n")
    assert load_yaml(Outer, good, ["inner.lr=0.5"]).inner == Inner(lr=0.5, steps=5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner:\n  stepz: 5\n")
    with pytest.raises(ConfigError, match="inner.stepz"):
        load_yaml(Outer, bad)


def test_build_config_validation():
    with pytest.raises(Exception, match="source"):
        from_dict(BuildConfig, {"out": "x"})
    with pytest.raises(Exception, match="fraction"):
        from_dict(BuildConfig, {"sources": ["dir:x"], "out": "x", "valid_fraction": 0.6, "test_fraction": 0.5})
    with pytest.raises(ConfigError, match="tokenizer"):
        from_dict(BuildConfig, {"sources": ["dir:x"], "out": "x", "tokenizer": "abc"})
