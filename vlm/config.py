"""YAML file -> typed, frozen dataclasses, with dotted command-line overrides, every value checked.

    config = load_config(TrainConfig, "configs/x.yaml", ["--train.lr=2e-4", "--data.sources=[emoji,flags]"])

Config flows one way (YAML -> dataclasses -> constructors). Every key is checked against the dataclass
fields: an unknown key, in the file or an override, is an error naming the valid ones, and every value is
checked against its field's type (ints, and YAML 1.1's string-typed `2e-4`, are accepted where floats are
expected; nothing else is coerced). Override values are parsed as YAML, so `2e-4`, `true`, `[a, b]` and `null`
mean what they look like.

Then every value is checked against its field's rule, when the config is built and before anything loads: a
field declared `steps: int = checked(1000, AT_LEAST_ONE)` carries a `Rule`, and dataclasses that derive from
`Checked` test their fields' rules (and any cross-field rule of their own `__post_init__`) on construction,
`dataclasses.replace` included. Whatever is wrong, `load_config` raises one `ConfigError` whose message names
the key, the value and the rule ("train.grad_accum = 0: must be an integer >= 1"), never another exception.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")
_SHOWN = 60  # characters of a value shown in an error message: a hostile value must not flood the terminal


class ConfigError(ValueError):
    """A config file or override that does not fit the schema or breaks a value's rule."""


# -- rules for values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What one kind of config value must be: `holds(value)` tests it, `text` completes "must be ..."."""

    holds: Callable[[Any], bool]
    text: str

    def check(self, key: str, value: Any) -> None:
        """Raise `ConfigError` naming `key`, the value and this rule unless the value keeps it (None, the
        "not set" of an optional field, always does)."""
        if value is None:
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} = {shown(value)}: must be a finite number")
        if not self.holds(value):
            raise ConfigError(f"{key} = {shown(value)}: must be {self.text}")


def at_least(low: int, text: str = "") -> Rule:
    """An integer >= `low`; `text` says what 0 (or another value below) would have meant, where it means
    something ("an integer >= 1, or 0 for only at the end" is `every`)."""
    return Rule(lambda v: v >= low, text or f"an integer >= {low}")


def every(zero: str) -> Rule:
    """The period of something done every N steps: N >= 1, or 0 with the documented meaning `zero`."""
    return Rule(lambda v: v >= 0, f"an integer >= 1, or 0 for {zero}")


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


AT_LEAST_ONE = at_least(1)  # counts and sizes: steps, batch sizes, layers, ranks
NON_NEGATIVE_INT = at_least(0)  # warm-up steps
POSITIVE = Rule(lambda v: v > 0, "> 0")  # learning rates, sampling weights
NON_NEGATIVE = Rule(lambda v: v >= 0, ">= 0")  # weight decay
PROBABILITY = Rule(lambda v: 0 <= v < 1, "in [0, 1)")  # dropout: 1 would drop everything
SHARE = Rule(lambda v: 0 <= v <= 1, "in [0, 1]")  # a share of rows: none to all
SEED = Rule(lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")  # what torch, numpy and random all take
NON_EMPTY = Rule(lambda v: bool(v.strip()), "a non-empty string")  # names and folders
REGEX = Rule(_compiles, "a valid regular expression")


REQUIRED: Any = dataclasses.MISSING  # the default of a `checked` field that has none


def checked(default: Any, rule: Rule) -> Any:
    """A dataclass field with a default (or `REQUIRED`) and a `Rule`: `steps: int = checked(1000, AT_LEAST_ONE)`."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def check_fields(config: Any) -> None:
    """Raise `ConfigError` for the first field of dataclass `config` that breaks its rule (keys are relative
    to `config`: `load_config` prefixes the section)."""
    for f in dataclasses.fields(config):
        rule = f.metadata.get("rule")
        if rule is not None:
            rule.check(f.name, getattr(config, f.name))


class Checked:
    """Base of a config dataclass whose fields' rules are checked whenever it is built. A subclass with
    cross-field rules overrides `__post_init__`, calls this one first, and raises `ConfigError` messages that
    start with one of its keys (`load_config` puts the section in front)."""

    def __post_init__(self) -> None:
        check_fields(self)


def constructs(factory: Callable[..., Any], key: str = "", **values: Any) -> None:
    """Check `values` against the rules of what they will build (a tower config that wants `hidden_size`
    divisible by the heads): `factory(**values)`, its `ValueError` raised as a `ConfigError` (after `key: `
    when its message does not start with a key). So a shape rule has one home, its class, and is still
    checked when the YAML is read."""
    try:
        factory(**values)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}" if key else str(err)) from None


def require_path(key: str, value: str | Path, what: str = "file") -> None:
    """`ConfigError` unless `value` (a path named by config key `key`) exists: a data file is checked before
    any model loads, so a typo costs a second, not the minutes of loading before the data is read."""
    if not Path(value).expanduser().exists():
        raise ConfigError(f"{key} = {shown(str(value))}: no such {what}")


def require_folder(key: str, value: str | Path) -> None:
    """`ConfigError` when `value` (a folder to write, named by `key`) is there but is not a folder."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} = {shown(str(value))}: is a file, not a folder")


def shown(value: Any) -> str:
    """`repr(value)` cut to a readable length, for error messages."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


# -- reading -----------------------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Read `path` (YAML), apply `--a.b=value` overrides, and build `cls`, checking keys, types and rules.
    Raises `ConfigError`, with one line naming the problem, for anything that does not fit."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {' '.join(str(err).split())}") from err
        except RecursionError:
            raise ConfigError(f"cannot read config {path}: nested too deeply") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return build(cls, raw, "")


def parse_override(item: str) -> tuple[str, Any]:
    """`--a.b=value` -> ("a.b", the value parsed as YAML)."""
    if not item.startswith("--") or "=" not in item:
        raise ConfigError(f"overrides look like --section.key=value, got {shown(item)}")
    key, _, text = item[2:].partition("=")
    try:
        return key, yaml.safe_load(text) if text else ""
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {shown(item)}: cannot parse the value: {' '.join(str(err).split())}"
        ) from err


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `raw[a][b] = value` for key "a.b", making sections that are not there yet."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[leaf] = value


def build(cls: type[T], raw: Any, where: str) -> T:
    """Instantiate dataclass `cls` from a mapping, recursively, with key, type and rule checks."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where.rstrip('.') or 'config'}: expected a mapping for {cls.__name__}, got {shown(raw)}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # a key that is no plain name (a number, a null, a 5,000-character line) is shown as its short repr
    unknown = sorted(k if _plain(k) else shown(k) for k in raw if k not in fields)
    if unknown:
        named = ", ".join(where + k for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ConfigError(f"unknown key(s) {named}; valid here: {', '.join(sorted(fields))}")
    values = {name: convert(hints[name], raw[name], f"{where}{name}") for name in fields if name in raw}
    try:
        return cls(**values)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {err}") from err
    except ConfigError as err:  # a rule of the section (`Checked`): its message starts with the key
        raise ConfigError(f"{where}{err}") from None


def _plain(key: Any) -> bool:
    return isinstance(key, str) and key.isidentifier() and len(key) <= _SHOWN


def convert(hint: Any, value: Any, where: str) -> Any:
    """`value` as type `hint` (a dataclass, union, Literal, list/tuple, dict or scalar), or `ConfigError`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {shown(value)} fits none of {hint}")
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):  # True == 1, but is not "1"
            raise ConfigError(f"{where}: {shown(value)} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        item = args[0] if args else Any
        converted = [convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {shown(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads 2e-4 (no dot) as a string; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {shown(value)}")
        return value
    raise ConfigError(f"{where}: unsupported config type {hint}")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML-able data (tuples as lists), for saving beside checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def dump(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
