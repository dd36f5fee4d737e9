"""One checker per kind of value that comes from outside: numbers with a rule, text, and config dicts.

Each checker returns the value when it obeys its rule and otherwise raises one `ValueError` naming the value,
the rule and what was given (`InvalidValue`, or `CheckpointError` for a config dict). The library calls them
where a value enters (`VisionLanguageModel.generation_kwargs`, `embed_files`, the config `from_dict`s) and the
CLI builds its argparse `type=` functions from the same checkers, so a value is judged by one rule wherever it
comes from, and the command can refuse it before loading a model.

Plain Python, no torch and no files: the module sits with the towers, lowest in the layers, so their config
`from_dict`s can use it. Output paths are checked where files are written (`vlm.weights.check_output_file`).
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, fields
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class InvalidValue(ValueError):
    """A value that breaks its rule: `str(err)` is "<name> must be <rule>, got <value>"; the parts are kept
    apart (`name`, `rule`, `value`) so a command line can word it after its own flag."""

    def __init__(self, name: str, rule: str, value: object) -> None:
        super().__init__(f"{name} must be {rule}, got {shorten(value)}")
        self.name, self.rule, self.value = name, rule, value


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, pickle-only, wrong keys or shapes, or a config
    of the wrong shape. (Defined here, below the towers, so their config `from_dict`s can raise it;
    `vlm.weights.CheckpointError` is this class.)"""


def shorten(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to about `limit` characters: a 50,000-character argument stays a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}...{text[-10:]} ({len(str(value)):,} chars)"


# -- numbers ------------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a user


def _is_real(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def positive_int(value: int, name: str) -> int:
    """An integer >= 1 (sizes, counts, batch sizes, max_new_tokens)."""
    if not _is_int(value) or value < 1:
        raise InvalidValue(name, "an integer >= 1", value)
    return value


def non_negative_int(value: int, name: str) -> int:
    """An integer >= 0 (top_k, where 0 means off)."""
    if not _is_int(value) or value < 0:
        raise InvalidValue(name, "an integer >= 0", value)
    return value


def non_negative_float(value: float, name: str) -> float:
    """A finite number >= 0 (temperature, where 0 means greedy); inf and nan are refused."""
    if not _is_real(value) or value < 0:
        raise InvalidValue(name, "a finite number >= 0", value)
    return float(value)


def positive_float(value: float, name: str) -> float:
    """A finite number > 0 (repetition_penalty)."""
    if not _is_real(value) or value <= 0:
        raise InvalidValue(name, "a finite number > 0", value)
    return float(value)


def probability(value: float, name: str) -> float:
    """A number in (0, 1] (top_p: 1 keeps every token, 0 would keep none)."""
    if not _is_real(value) or not 0 < value <= 1:
        raise InvalidValue(name, "a number in (0, 1]", value)
    return float(value)


def share(value: float, name: str) -> float:
    """A number in [0, 1]: a share of rows, from none to all."""
    if not _is_real(value) or not 0 <= value <= 1:
        raise InvalidValue(name, "a number in [0, 1]", value)
    return float(value)


# -- text ---------------------------------------------------------------------------------------------------------


def utf8_text(value: str, name: str) -> str:
    """A string that is valid Unicode text. Python hands over undecodable bytes (argv, a terminal in another
    encoding) as lone surrogates ("\\udce9"), which a tokenizer cannot encode; they are refused here."""
    if not isinstance(value, str):
        raise InvalidValue(name, "text", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidValue(
            name,
            f"valid UTF-8 text (character {err.start + 1} is an undecodable byte; check the encoding)",
            value,
        ) from None
    return value


# -- config dicts (config.json) -----------------------------------------------------------------------------------


def json_object(value: Any, where: str) -> dict[str, Any]:
    """A JSON object (dict with string keys); `where` names it in the error ("config.json", "vision")."""
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise CheckpointError(f"{where} must be a JSON object of key: value pairs, got {shorten(value)}")
    return value


def config_from_dict(cls: type[T], d: Any, where: str = "", ignore_unknown: bool = True) -> T:
    """Build the dataclass `cls` from a `config.json` dict, checking each value against its field's type hint
    (int, float, bool, str, None, unions, list[...] / tuple[..., ...], Literal) before the constructor runs, so
    "768" where an integer belongs is a `CheckpointError` naming the key, not a TypeError deep in a layer.
    Missing keys take the field defaults (one without a default is an error); keys `cls` does not have are skipped (`ignore_unknown`, Hugging Face
    configs carry many) or refused. A rule the constructor enforces (`__post_init__`) comes out as a
    `CheckpointError` too. `where` prefixes key names ("vision" -> "vision.hidden_size")."""
    prefix = f"{where}." if where else ""
    d = json_object(d, where or "the config")
    names = {f.name for f in fields(cls)}
    if not ignore_unknown and (unknown := sorted(set(d) - names)):
        raise CheckpointError(f"{where or 'the config'} has unknown keys: {', '.join(unknown)}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    if missing := [name for name in required if name not in d]:
        raise CheckpointError(f"{where or 'the config'} lacks {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in names & d.keys():
        value, hint = d[name], hints[name]
        if not fits(value, hint):
            raise CheckpointError(f"{prefix}{name} must be {describe(hint)}, got {shorten(value)}")
        kwargs[name] = tuple(value) if typing.get_origin(hint) is tuple else value
    try:
        return cls(**kwargs)
    except ValueError as err:  # a rule across fields (divisibility, one size matching another)
        raise CheckpointError(f"{where + ': ' if where else ''}{err}") from None


def fits(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a type hint? Numbers must be finite (JSON parsers accept NaN and Infinity)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin is typing.Union or origin is type(int | None):  # Optional[X] / X | None
        return any(fits(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(fits(item, args[0]) for item in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_real(value)
    if hint is str:
        return isinstance(value, str)
    return True  # a hint this reader does not know: the constructor judges


def describe(hint: Any) -> str:
    """A type hint in words, for error messages: `int | None` -> "an integer or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is type(int | None):
        return " or ".join(describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (list, tuple):
        return f"a list of {describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    words = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))
