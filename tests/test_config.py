"""rlkit.config: the one typed-config builder (recipes, methods, patches, CLI flags), and typed patch options
checked at recipe time."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from rlkit.config import ConfigError, add_arguments, build, field_docs, from_arguments
from rlkit.recipe import RecipeError, recipe_from_dict


@dataclass
class Inner:
    depth: int = 1


@dataclass
class Demo:
    """A config for the tests."""

    name: str = "x"
    """The name."""
    rate: float = 0.5
    """A rate in (0, 1]."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    flag: bool = False
    """Turn it on."""
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    stops: list[str] = field(default_factory=list)
    """Stop strings."""
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)
    source: str | None = field(default=None, metadata={"alias": "from"})

    def __post_init__(self):
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {self.rate}")


def test_build_types_aliases_and_errors():
    d = build(Demo, {"name": "n", "rate": "1e-1", "sizes": [3], "inner": {"depth": 2}, "from": "stage"}, "sec")
    assert (d.name, d.rate, d.sizes, d.inner.depth, d.source) == ("n", 0.1, [3], 2, "stage")
    cases = [({"nmae": 1}, "sec: unknown key 'nmae'; did you mean 'name'?"),
             ({"rate": 2.0}, "sec: rate must be in (0, 1], got 2.0"),
             ({"mode": "c"}, "sec.mode: 'c' is not one of 'a', 'b'"),
             ({"limit": "3"}, "sec.limit: expected an integer, got '3'"),
             ({"inner": {"dpeth": 1}}, "sec.inner: unknown key 'dpeth'; did you mean 'depth'?"),
             ({"flag": 1}, "sec.flag: expected true/false, got 1")]
    for data, message in cases:
        with pytest.raises(ConfigError) as err:
            build(Demo, data, "sec")
        assert str(err.value) == message
    assert RecipeError is ConfigError


def test_field_docs_read_attribute_docstrings():
    docs = field_docs(Demo)
    assert docs["rate"] == "A rate in (0, 1]." and docs["stops"] == "Stop strings." and "limit" not in docs


def test_cli_flags_come_from_the_dataclass():
    p = argparse.ArgumentParser()
    add_arguments(p, Demo, exclude=("inner",))
    args = p.parse_args(["--name", "q", "--mode", "b", "--flag", "--sizes", "4,5", "--stops", "a,b", "--stops", "\n"])
    d = from_arguments(Demo, args)
    assert (d.name, d.mode, d.flag, d.sizes, d.stops, d.rate) == ("q", "b", True, [4, 5], ["a,b", "\n"], 0.5)
    defaults = from_arguments(Demo, p.parse_args([]))
    assert defaults == Demo()
    help_text = p.format_help()
    assert "A rate in (0, 1]. (default: 0.5)" in help_text and "--no-flag" in help_text
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "z"])
    with pytest.raises(ConfigError, match="rate must be in"):
        from_arguments(Demo, p.parse_args(["--rate", "3"]))


def test_prefixed_flags_keep_two_configs_apart():
    p = argparse.ArgumentParser()
    add_arguments(p, Demo, exclude=("inner",))
    add_arguments(p, Inner, prefix="in_", rename={"depth": "inner_depth"})
    args = p.parse_args(["--inner-depth", "7"])
    assert from_arguments(Inner, args, prefix="in_").depth == 7


@pytest.mark.parametrize("patch, message", [
    ({"name": "hope", "train_lenght": 8}, r"model\.patches\[0\]\(hope\): unknown key 'train_lenght'; did you mean "
                                          r"'train_length'"),
    ({"name": "cog", "kernel": "fast"}, r"model\.patches\[0\]\(cog\): cog: kernel must be one of fused, autograd"),
    ({"name": "aoe", "top_k": 9}, r"model\.patches\[0\]\(aoe\): aoe: top_k \(9\) must be <= num_experts \(8\)"),
    ({"name": "moe", "layers": "some"}, r"moe: layers must be 'all' or a non-empty list"),
    ({"name": "moe", "d_low": 4}, r"moe: d_low applies to the aoe patch only"),
    ({"name": "aoe", "renormalize": "yes"}, r"\(aoe\)\.renormalize: expected true/false, got 'yes'"),
    ({"name": "hpe"}, r"model\.patches\[0\]\.name: unknown patch 'hpe'; did you mean 'hope'"),
])
def test_patch_options_are_checked_at_recipe_time(patch, message, monkeypatch):
    import rlkit.models

    monkeypatch.setattr(rlkit.models, "load_model", lambda *a, **k: pytest.fail("validation loaded a model"))
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"method": "sft", "model": {"name": "tiny", "patches": [patch]}})


def test_valid_patch_options_pass_and_reach_the_patch(tiny_model):
    from rlkit.patches import apply_patches, check_patches

    assert check_patches([{"name": "hope", "train_length": 64}]) == [
        {"train_length": 64, "cutoff": None, "min_rotary_pairs": 1}]
    model, _ = tiny_model
    apply_patches(model, [{"name": "hope", "train_length": 64}])
    assert model.config.rlkit_patches == [{"name": "hope", "train_length": 64}]
