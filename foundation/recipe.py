"""Recipes: YAML files read strictly into dataclasses. One loader for every job (pretrain, finetune, distill, learn).

A recipe's top-level keys are the fields of its config dataclass (``TrainConfig`` and the job configs that extend
it), nested sections are nested dataclasses. Loading is strict: an unknown or misspelt key is a ``ValueError``
naming the key, where it is, and the nearest valid key; values are type-checked against the annotations.
``--set section.key=value`` overrides are parsed as YAML scalars/lists (``--set optim.lr=3e-4``,
``--set data.train=[a,b]``) and go through the same validation.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ValueError("recipe key 'key' message")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"recipe key {key!r} {message}")


def suggest(name: str, valid) -> str:
    """"; did you mean 'x'? (valid: ...)" for an unknown ``name`` among ``valid``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.0)
    return (f"; did you mean {close[0]!r}?" if close else "") + f" (valid: {', '.join(sorted(valid))})"


def build(cls: type[T], values: dict, prefix: str = "") -> T:
    """An instance of dataclass ``cls`` from a nested dict; unknown keys and wrong types are ``ValueError``s
    naming the key as ``prefix + key``. Fields not given keep their defaults."""
    if not isinstance(values, dict):
        raise ValueError(f"recipe key {prefix.rstrip('.') or cls.__name__!r} must be a mapping of {cls.__name__} "
                         f"fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown recipe key {prefix + str(key)!r}" + suggest(str(key), names))
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from YAML) checked against the annotation ``tp``; dataclasses are built recursively."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where + ".")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"recipe key {where!r} is {value!r}; expected one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:  # a single path where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"recipe key {where!r} must be a list, got {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"recipe key {where!r} must be a mapping, got {value!r}")
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ValueError(f"recipe key {where!r} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def apply_overrides(values: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to the nested dict ``values`` in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
        key, raw = item.split("=", 1)
        node, parts = values, key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return values


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The recipe at ``path`` as a nested dict with ``--set`` overrides applied (FileNotFoundError / ValueError
    naming the file, and the line of a YAML syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} not found; recipes ship in recipes/*.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"recipe {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as "
                         f"UTF-8 YAML") from None
    except OSError as exc:
        raise ValueError(f"recipe {str(path)!r} cannot be read ({exc.strerror}); check the path and its "
                         f"permissions") from None
    try:
        values = yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {_yaml_problem(exc)}; fix the file") from None
    if not isinstance(values, dict):
        raise ValueError(f"recipe {str(path)!r} must be a YAML mapping of keys and sections (data:, optim: ...)")
    return apply_overrides(values, overrides)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one section",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_recipe(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read the recipe at ``path``, apply ``--set`` overrides, build ``cls`` (a config dataclass with a
    ``from_dict`` classmethod that validates). Errors name the file."""
    values = read_recipe(path, overrides)
    try:
        return cls.from_dict(values)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def to_dict(config) -> dict:
    """Plain nested dict (YAML/JSON-serialisable) of a config dataclass; ``cls.from_dict`` inverts it."""
    return dataclasses.asdict(config)
