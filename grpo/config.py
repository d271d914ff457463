"""Typed dataclass configs from TOML files plus `key=value` overrides, and back to TOML.

A config file has one table per config, e.g. `[grpo]`, `[sampling]`; each table fills one dataclass. Unknown
keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def check_fields(config: Any, rule: str, ok: Callable[[Any], bool], *names: str) -> None:
    """A config's own check (its __post_init__): ValueError "NAME must be RULE, got VALUE" for the first named
    field whose value is not `ok` (None, an unset optional, passes; NaN fails every comparison). The loader
    puts the table name in front ("[sft] batch_size must be >= 1, got 0")."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not ok(value):
            raise ValueError(f"{name} must be {rule}, got {value!r}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a TOML or command-line value to the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(f"{key} expects true/false, got {value!r}")
        return bool(value)
    if annotation in (int, float, str):
        # int() would quietly turn 2.5 into 2, and int()/float() True into 1
        fraction = annotation is int and isinstance(value, float) and not value.is_integer()
        if fraction or (annotation is not str and isinstance(value, bool)):
            raise ConfigError(f"{key} expects {annotation.__name__}, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key} expects {annotation.__name__}, got {value!r}") from err
    if annotation is dict or origin is dict:
        table = _literal(value) if isinstance(value, str) else value  # `--set reward.options={}` replaces it
        if not isinstance(table, dict):
            raise ConfigError(f"{key} expects a table ({{ key = value, ... }}), got {value!r}")
        return table
    return value


def build_config(cls: type[T], values: dict[str, Any] | None = None, *, section: str = "") -> T:
    """Instantiate dataclass `cls` from a dict, type-checking every key."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"[{section}] " if section else ""
        raise ConfigError(f"{where}unknown option(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}" if section else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # a config's own validation (__post_init__)
        raise ConfigError(f"[{section}] {err}" if section else str(err)) from err


def read_toml(path: str | Path | None, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The tables of a TOML config file. A top-level `extends = "base.toml"` (relative to the file) reads that
    file first; this file's keys then replace the base's, table by table."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be a file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(f"{path}: extends {base} goes round in a circle")
    merged = read_toml(base_path, (*_seen, path.resolve()))
    for table, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(table), dict):
            merged[table] = {**merged[table], **values}
        else:
            merged[table] = values
    return merged


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, str]]:
    """`["grpo.lr=1e-5", "sampling.top_p=0.9"]` -> {"grpo": {"lr": "1e-5"}, "sampling": {"top_p": "0.9"}}."""
    out: dict[str, dict[str, str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        out.setdefault(section, {})[name] = value.strip()
    return out


def load_sections(
    sections: dict[str, type],
    toml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    other_tables: bool = False,
) -> dict[str, Any]:
    """Fill each named dataclass from the TOML table of that name, then apply `section.key=value` overrides.
    A table the file holds but `sections` does not name is an error (a typo), unless `other_tables`."""
    raw = read_toml(toml_path)
    unknown = sorted(set(raw) - set(sections))
    if unknown and not other_tables:
        raise ConfigError(f"unknown config table(s) {unknown}; known: {sorted(sections)}")
    for name, values in raw.items():  # before the overrides, which update the tables
        if not isinstance(values, dict):
            raise ConfigError(f"{name} must be a table ([{name}] with key = value lines), got {values!r}")
    for section, values in parse_overrides(overrides or []).items():
        if section not in sections:
            raise ConfigError(f"unknown config table {section!r} in override; known: {sorted(sections)}")
        table = raw.setdefault(section, {})
        for name, value in values.items():
            field, dot, key = name.partition(".")
            if dot:  # `reward.options.clip=5`: one entry of a table-valued field, typed as TOML would type it
                entries = table.get(field)
                table[field] = {**(entries if isinstance(entries, dict) else {}), key: _literal(value)}
            else:
                table[name] = value
    return {name: build_config(cls, raw.get(name), section=name) for name, cls in sections.items()}


def config_differences(saved: dict[str, Any], configs: dict[str, Any]) -> list[str]:
    """`table.key` names whose value in `configs` (dataclasses) differs from `saved` (tables as read back from
    a `to_toml` file), sorted. A key `saved` lacks is unchanged while its value is the field's default: the
    field was added after the run was written, and that run ran as the default does."""
    current = tomllib.loads(to_toml(configs))
    keys = {(table, key) for tables in (saved, current) for table, values in tables.items() for key in values}

    def differs(table: str, key: str) -> bool:
        value = current.get(table, {}).get(key)
        if key not in saved.get(table, {}):
            return value != _field_default(configs.get(table), key)
        return saved[table][key] != value

    return sorted(f"{table}.{key}" for table, key in keys if differs(table, key))


def _field_default(config: Any, name: str) -> Any:
    """A dataclass field's default as `to_toml` writes and TOML reads it back; a sentinel when it has none."""
    fields = {f.name: f for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}
    field = fields.get(name)
    if field is None or (
        field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ):
        return object()  # equal to nothing
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return None if default is None else tomllib.loads(f"value = {_toml_value(default)}")["value"]


def _literal(text: str) -> Any:
    """A command-line value as TOML reads it (5 -> int, 0.5 -> float, true -> bool); else the text itself."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(
        str(value)
    )  # a JSON string is a valid TOML basic string (escapes newlines, quotes, ...)


def to_toml(configs: dict[str, Any]) -> str:
    """Write configs as TOML tables; None values are left out (TOML has no null, and None is every default)."""
    lines: list[str] = []
    for section, config in configs.items():
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(config).items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
