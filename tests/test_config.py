"""YAML configs: keys, types and value rules checked, dotted overrides, wrong shapes as one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import pytest

from vlm.config import (
    AT_LEAST_ONE,
    NON_EMPTY,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    PROBABILITY,
    REGEX,
    SEED,
    Checked,
    ConfigError,
    checked,
    constructs,
    every,
    load_config,
    to_dict,
)


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass(frozen=True)
class Run:
    name: str
    steps: int = 10
    bf16: bool = False
    resume: str | None = None
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_file_and_overrides(tmp_path) -> None:
    path = write(tmp_path, "name: a\nsteps: 5\noptim:\n  lr: 0.1\n")
    cfg = load_config(Run, path, ["--optim.lr=2e-4", "--bf16=true", "--optim.betas=[0.8, 0.9]", "--resume=x"])
    assert cfg == Run(name="a", steps=5, bf16=True, resume="x", optim=Optim(lr=2e-4, betas=(0.8, 0.9)))
    assert to_dict(cfg)["optim"]["betas"] == [0.8, 0.9]
    assert load_config(Run, path, ["--optim.lr=1"]).optim.lr == 1.0  # an int where a float goes is fine


@pytest.mark.parametrize(("text", "overrides", "message"), [
    ("name: a\nstep: 5\n", [], "unknown key.*step; valid here: bf16, name, optim, resume, steps"),
    ("name: a\n", ["--optim.learning_rate=1"], r"unknown key.*optim.learning_rate"),
    ("name: a\nsteps: five\n", [], "steps: expected int, got 'five'"),
    ("name: a\nsteps: true\n", [], "steps: expected int"),
    ("name: a\n", ["--optim.schedule=linear"], "not one of"),
    ("name: a\n", ["optim.lr=1"], "overrides look like"),
    ("steps: 3\n", [], "name"),
    ("- a\n- b\n", [], "top level must be a mapping"),
])  # fmt: skip
def test_errors_name_the_problem(tmp_path, text, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Run, write(tmp_path, text), overrides)


# -- rules for values -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section(Checked):
    steps: int = checked(10, AT_LEAST_ONE)
    lr: float = checked(1e-3, POSITIVE)
    dropout: float = checked(0.0, PROBABILITY)
    limit: int | None = checked(None, AT_LEAST_ONE)  # None is "not set": no rule applies
    warmup: int = checked(0, NON_NEGATIVE_INT)
    every: int = checked(0, every("only at the end"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup > self.steps:
            raise ConfigError(f"warmup = {self.warmup}: must be <= steps ({self.steps})")


@dataclass(frozen=True)
class Top:
    section: Section = field(default_factory=Section)
    sections: tuple[Section, ...] = ()


@pytest.mark.parametrize(("override", "message"), [
    ("--section.steps=0", "section.steps = 0: must be an integer >= 1"),
    ("--section.lr=0", "section.lr = 0.0: must be > 0"),
    ("--section.lr=-1e-3", "section.lr = -0.001: must be > 0"),
    ("--section.lr=.nan", "section.lr = nan: must be a finite number"),
    ("--section.lr=inf", "section.lr = inf: must be a finite number"),
    ("--section.dropout=1", "section.dropout = 1.0: must be in [0, 1)"),
    ("--section.limit=0", "section.limit = 0: must be an integer >= 1"),
    ("--section.warmup=-1", "section.warmup = -1: must be an integer >= 0"),
    ("--section.every=-2", "section.every = -2: must be an integer >= 1, or 0 for only at the end"),
    ("--section.warmup=20", "section.warmup = 20: must be <= steps (10)"),  # a cross-field rule, prefixed too
    ("--sections=[{}, {steps: -1}]", "sections[1].steps = -1: must be an integer >= 1"),
])  # fmt: skip
def test_rules_name_the_key_the_value_and_the_rule(override, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Top, None, [override])
    assert str(err.value) == message


def test_rules_hold_for_values_that_keep_them_and_for_direct_construction() -> None:
    cfg = load_config(Top, None, ["--section.limit=null", "--section.every=0", "--section.dropout=0.5"])
    assert cfg.section == Section(dropout=0.5)
    with pytest.raises(ConfigError, match="steps = 0"):
        replace(cfg.section, steps=0)  # replace() builds a new one: the rules apply there too
    assert [f.name for f in fields(Section) if "rule" in f.metadata] == [f.name for f in fields(Section)]


def test_shared_checkers() -> None:
    assert REGEX.holds(r"lm\..*proj") and not REGEX.holds("(unclosed")
    assert SEED.holds(0) and SEED.holds(2**32 - 1) and not SEED.holds(2**32) and not SEED.holds(-1)
    assert not NON_EMPTY.holds(" \n") and NON_NEGATIVE.holds(0.0) and not NON_NEGATIVE.holds(-1e-9)
    with pytest.raises(ConfigError, match="^model.hidden_size: bad shape$"):
        constructs(_shape, "model.hidden_size", ok=False)
    constructs(_shape, ok=True)


def _shape(ok: bool) -> None:
    if not ok:
        raise ValueError("bad shape")


@pytest.mark.parametrize(("text", "overrides", "message"), [
    ("1: 2\n", [], r"^unknown key\(s\) 1; valid here"),  # a key that is not a string
    ("name: a\n5: x\nnull: y\n", [], r"^unknown key\(s\) 5, None;"),  # mixed key types still sort
    ("name: a\nsteps: [1, 2]\n", [], "steps: expected int"),
    ("name: a\noptim: [1]\n", [], "optim: expected a mapping for Optim"),
    ("name: a\noptim: 3\n", ["--optim.lr=1"], "optim is not a section"),
    ("name: " + "x" * 5000 + "\nsteps: " + "y" * 5000 + "\n", [], r"steps: expected int, got 'yyy.*\.\.\.$"),
    ("name: a\noptim: {schedule: true}\n", [], "not one of"),
])  # fmt: skip
def test_wrong_shapes_are_config_errors_of_one_short_line(tmp_path, text, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(Run, write(tmp_path, text), overrides)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_an_unreadable_file_is_a_config_error(tmp_path) -> None:
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Run, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Run, tmp_path / "missing.yaml")
