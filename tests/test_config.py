"""YAML configs: keys and types checked, dotted overrides, and every shipped YAML loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from vlm.config import ConfigError, load_config, to_dict


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
