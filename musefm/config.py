"""Dataclass configs: presets, YAML files and ``key=value`` overrides, validated before any work.

Every config is a (possibly nested) dataclass. ``from_dict`` builds one from plain data and names
the offending key on any unknown key or badly typed value; ``apply_overrides`` takes CLI strings
such as ``optim.lr=3e-4`` or ``sources=[music21:bach,music21:oneills1850]`` (values parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from musefm.errors import MusefmError


class ConfigError(MusefmError):
    pass


def _check_value(value, annotation, key: str):
    """Coerce ``value`` to ``annotation`` where that is lossless; raise ConfigError otherwise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = args[0] if args else typing.Any
        items = [_check_value(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    values = {name: _check_value(value, hints[name], prefix + name) for name, value in data.items()}
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(config, overrides: list[str]):
    """A copy of ``config`` with dotted ``key=value`` overrides applied and validated.

    Keys must name fields of the dataclasses; below a field typed ``dict`` (free-form settings
    such as ``model_settings``) any key may be set, and the receiving code validates it.
    """
    data = to_dict(config)
    for text in overrides:
        path, value = _parse_override(text)
        node, schema = data, type(config)
        for depth, part in enumerate(path):
            name = ".".join(path[: depth + 1])
            is_last = depth == len(path) - 1
            if schema is dict or schema is None:  # free-form mapping: create as needed
                if is_last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
                continue
            fields = {f.name: f for f in dataclasses.fields(schema)}
            if part not in fields:
                raise ConfigError(f"unknown config key {name} (known: {', '.join(sorted(fields))})")
            if is_last:
                node[part] = value
                break
            field_type = typing.get_type_hints(schema)[part]
            schema = field_type if dataclasses.is_dataclass(field_type) else (dict if typing.get_origin(field_type) is dict or field_type is dict else None)
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"config key {name} has no sub-keys")
            node = node[part]
    return from_dict(type(config), data)


def load_yaml(cls, path: Path, overrides: list[str] | None = None):
    """A config from a YAML file, then overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        config = from_dict(cls, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return apply_overrides(config, overrides or [])
